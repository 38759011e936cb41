"""The EP group end to end on CPU (gloo): N = 1, 4, 8, 16 ranks generate the same greedy tokens,
logit sums and prompt logits as the single-process reference (`Transformer.forward` with a KV
cache, batch 1), with and without overlapped micro-batches, without and with replicas, and across
an expert-map switch in the middle of generation; a rank that fails to load a map keeps the group
on the old one; a rank that dies brings the group down by itself, fast.

The model is manifests/tiny-ep16.yaml's architecture (12 routed experts, 3 MoE layers, hidden
128) with random weights. Tolerances: the EP path sums the same fp32 products in another order
(and batches tokens of several sequences into one GEMM), about 1e-6 of the logits' scale; a wrong
route, position or cache slot moves logits by > 1e-2. The reference asserts a top-2 logit gap of
at least 1e-3 at every greedy step, so equal tokens are a real check, not luck.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from moe_worker.checkpoint import Checkpoint, load_model, make_checkpoint
from moe_worker.engine import (
    EngineConfig,
    RankConfig,
    StepPlan,
    build_runner,
    run_rank_from_env,
    split_micro_batches,
    start_rank,
)
from moe_worker.engine.runner import _Chunk
from moe_worker.engine_api import GenerationRequest, RequestError
from moe_worker.expertmap import parse_plan, write_plan_files
from moe_worker.launch import GroupFailed, Job, Phase, run_local, spawn_ranks
from moe_worker.metrics import WorkerMetrics
from moe_worker.model import ParallelContext

REPO = Path(__file__).resolve().parents[2]
MARGIN = 1e-3
HF_BASE = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "moe_layer_freq": 1,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "hidden_act": "silu", "tie_word_embeddings": False, "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
}
PROMPTS = [(1, 2, 3), (5, 6, 7, 8, 9, 10, 11, 12, 13), (400,), (17, 300, 2, 99, 45)]
MAX_TOKENS = [6, 4, 6, 5]
LOGITS_PROMPT = (3, 1, 4, 1, 5, 9, 2, 6)
ENGINE = EngineConfig(map_poll_s=0.0, background_load=False, dist_timeout_s=30.0)


def tiny_ep16_config() -> dict:
    arch = yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text())["spec"]["model"]["architecture"]
    cfg = dict(HF_BASE)
    cfg.update({re.sub(r"([A-Z])", r"_\1", k).lower(): v for k, v in arch.items()})
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


def plan_doc(world: int, *, replicas: bool, shift: int, nodes: int = 2) -> dict:
    """A PLAN.json for the 12-expert model: every expert once (rotated per layer and by `shift`),
    plus with `replicas` one more expert on every rank; ranks split over `nodes` nodes."""
    layers = []
    for li in range(3):
        hosts: list[list[int]] = [[] for _ in range(world)]
        for e in range(12):
            hosts[(e + shift + li) % world].append(e)
        if replicas:
            for r in range(world):
                extra = (5 * r + shift + 2 * li + 1) % 12
                if extra not in hosts[r]:
                    hosts[r].append(extra)
        layers.append(hosts)
    ranks = [{"rank": r, "node": f"node-{r * nodes // world}", "gpu": r % max(1, world // nodes)} for r in range(world)]
    return {"ranks": ranks, "expert_map": layers, "metrics": {}}


def requests(tag: str) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}-{i}", p, max_tokens=n) for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True))]


class Reference:
    def __init__(self, ckpt: Path):
        self.model = load_model(ckpt, dtype=torch.float32)
        self.gen = {p: self._greedy(p, n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)}
        self.logits = self.model(torch.tensor([LOGITS_PROMPT]))[0]

    def _greedy(self, prompt, n):
        m = self.model
        cache = m.new_cache(1, len(prompt) + n)
        logits = m(torch.tensor([prompt]), 0, cache)[0, -1]
        out, sums, pos = [], [], len(prompt)
        for i in range(n):
            top = logits.topk(2).values
            assert top[0] - top[1] > MARGIN, f"near tie in the reference for {prompt} at step {i}: pick another prompt"
            out.append(int(logits.argmax()))
            sums.append(float(logits.sum()))
            if i + 1 < n:
                logits = m(torch.tensor([[out[-1]]]), pos, cache)[0, -1]
                pos += 1
        return out, sums

    def check(self, phase, what: str) -> None:
        for res, p in zip(phase.results, PROMPTS, strict=True):
            want, sums = self.gen[p]
            assert res["output_ids"] == want, (what, p, res["output_ids"], want)
            assert res["finish_reason"] == "length"
            got = np.array(res["logit_sums"])
            assert np.abs(got - np.array(sums)).max() <= 1e-3 + 1e-5 * np.abs(sums).max(), (what, p, got, sums)
        if phase.logits is not None:
            ref = self.logits.numpy()
            assert phase.logits.shape == ref.shape
            assert np.abs(phase.logits - ref).max() <= 1e-5 * np.abs(ref).max(), what


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    return make_checkpoint(tiny_ep16_config(), tmp_path_factory.mktemp("ep") / "fp8", dtype="fp8", seed=1)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return make_checkpoint(tiny_ep16_config(), tmp_path_factory.mktemp("ep") / "bf16", dtype="bf16", seed=2)


@pytest.fixture(scope="module")
def fp8_ref(fp8_ckpt):
    return Reference(fp8_ckpt)


@pytest.fixture(scope="module")
def bf16_ref(bf16_ckpt):
    return Reference(bf16_ckpt)


def run_group(ckpt, world, tmp_path, job_phases, **job_kw):
    plan = write_plan_files(tmp_path / "plan", plan_doc(world, replicas=False, shift=0), 1)
    return run_local(ckpt, world, Job(job_phases, **job_kw), engine=ENGINE, expert_map=plan, timeout_s=300)


def standard_phases(world: int, switch_gen: int = 2) -> list[Phase]:
    """overlap off (+ prompt logits), overlap on, switch to a map with replicas mid-generation, on."""
    return [
        Phase(requests("off"), overlap="off", logits_prompt=LOGITS_PROMPT),
        Phase(requests("on"), overlap="on"),
        Phase(requests("switch"), overlap="off", update_after_tokens=2,
              plan_update=(plan_doc(world, replicas=True, shift=1), switch_gen)),
        Phase(requests("replicas-on"), overlap="on"),
    ]


def check_group(res, ref, world: int, switch_phase: int, switch_gen: int) -> None:
    names = ["off", "on", "switch", "replicas-on", "after"]
    for i, ph in enumerate(res.phases):
        ref.check(ph, f"{world} ranks, phase {names[i]}")
    # The switch happened while the phase's requests were generating, and only once.
    (step, gen), = res.switches
    first, last = res.phases[switch_phase].steps
    assert gen == switch_gen == res.generation and first + 2 <= step < last, (res.switches, first, last)
    # Overlap on really ran two micro-batches: twice the exchanges per step (3 MoE layers).
    def exchanges(i):
        return res.phases[i].dispatch["exchanges"] - (res.phases[i - 1].dispatch["exchanges"] if i else 0)

    def steps(i):
        return res.phases[i].steps[1] - res.phases[i].steps[0]

    assert exchanges(1) == 2 * 3 * steps(1) and exchanges(0) <= 3 * steps(0) + 3
    assert res.dispatch["offrank_pairs"] > 0 and res.dispatch["dispatch_bytes"] > 0


def test_one_rank_in_process(fp8_ckpt, fp8_ref, tmp_path):
    # One sequence per "rank" at most 2: requests queue and the scheduler admits them later.
    plan = write_plan_files(tmp_path / "plan", plan_doc(1, replicas=False, shift=0), 1)
    res = run_local(fp8_ckpt, 1, Job([Phase(requests("a"), overlap="off", logits_prompt=LOGITS_PROMPT),
                                      Phase(requests("b"), overlap="on")]),
                    engine=EngineConfig(max_seqs_per_rank=2, map_poll_s=0.0), expert_map=plan)
    for ph in res.phases:
        fp8_ref.check(ph, "1 rank")
    assert res.dispatch == {} and res.switches == []


def test_four_ranks_fp8_dispatch_switch_and_a_failed_map(fp8_ckpt, fp8_ref, tmp_path):
    phases = standard_phases(4)
    # Generation 2 fails to load on rank 2: nobody switches; generation 3 then loads everywhere.
    phases[3] = Phase(requests("replicas-on"), overlap="on", update_after_tokens=2,
                      plan_update=(plan_doc(4, replicas=True, shift=2), 3))
    phases.append(Phase(requests("after"), overlap="on"))
    res = run_group(fp8_ckpt, 4, tmp_path, phases, map_load_fails=(2, 2))
    check_group(res, fp8_ref, 4, switch_phase=3, switch_gen=3)
    assert len(res.map_errors) == 1 and "rank 2: expert map generation 2: loading experts failed" in res.map_errors[0]
    # FP8 checkpoint: the payload is e4m3 + scales (128 + 4 bytes) + 4 ids and 4 weights.
    assert res.dispatch["dispatch_bytes"] == res.dispatch["offrank_rows"] * (128 + 4 + 32)


def test_eight_ranks_bf16_checkpoint(bf16_ckpt, bf16_ref, tmp_path):
    res = run_group(bf16_ckpt, 8, tmp_path, standard_phases(8))
    check_group(res, bf16_ref, 8, switch_phase=2, switch_gen=2)
    assert res.dispatch["dispatch_bytes"] == res.dispatch["offrank_rows"] * (4 * 128 + 32)  # fp32 rows


@pytest.mark.slow
def test_sixteen_ranks(fp8_ckpt, fp8_ref, tmp_path):
    t = time.monotonic()
    res = run_group(fp8_ckpt, 16, tmp_path, standard_phases(16))
    check_group(res, fp8_ref, 16, switch_phase=2, switch_gen=2)
    assert time.monotonic() - t < 120


def test_a_dead_rank_is_healed_in_place(fp8_ckpt, fp8_ref, tmp_path):
    # Rank 3 exits in the middle of generation (its third step with work). The other three
    # re-form without it, serve its experts from the degraded map (no replicas: each of its
    # experts is read from the checkpoint by one survivor) and recompute its sequence on another
    # rank from prompt + tokens so far: every answer equals the reference.
    res = run_group(fp8_ckpt, 4, tmp_path, [Phase(requests("x"), overlap="on"), Phase(requests("after"))],
                    exit_rank_at_step=(3, 3))
    for ph in res.phases:
        fp8_ref.check(ph, "4 ranks, rank 3 lost")
    (step, lost, moved, took), = res.recoveries
    assert lost == [3] and moved == 1, res.recoveries
    print(f"re-formed without rank 3 in {took:.2f} s")


def test_a_hung_rank_is_dropped_when_its_heartbeat_stops(fp8_ckpt, fp8_ref, tmp_path):
    # Rank 2 stops (SIGSTOP: its sockets stay open, nothing errors). The others wait for it in
    # slices; rank 0 sees its heartbeat silent for peer_lost_s (2 s), marks the group broken,
    # and all re-form without it, long before the collective timeout (20 s here; a survivor's
    # exit still waits that long for the old group's op to the stopped rank).
    plan = write_plan_files(tmp_path / "plan", plan_doc(4, replicas=True, shift=0), 1)
    cfg = EngineConfig(map_poll_s=0.0, background_load=False, dist_timeout_s=20.0)
    res = run_local(fp8_ckpt, 4, Job([Phase(requests("x"), overlap="off")], stop_rank_at_step=(2, 2)),
                    engine=cfg, expert_map=plan, timeout_s=300)
    fp8_ref.check(res.phases[0], "4 ranks, rank 2 hung")
    (step, lost, moved, took), = res.recoveries
    assert lost == [2] and moved == 1, res.recoveries
    assert res.wall_s < 15, res.wall_s  # (the timeout alone would take 20 s)


def test_a_bad_initial_map_stops_every_rank_with_its_reason(fp8_ckpt, tmp_path):
    doc = plan_doc(4, replicas=False, shift=0)
    doc["expert_map"][1][2].append(99)  # the model has 12 experts
    plan = write_plan_files(tmp_path / "plan", doc, 1)
    with pytest.raises(GroupFailed) as info:
        run_local(fp8_ckpt, 4, Job([Phase(requests("x"))]), engine=ENGINE, expert_map=plan, timeout_s=120)
    e = info.value
    why = "plan expert_map layer 1 rank 2: expert ids [99] outside 0..11"
    assert e.first == 0 and why in e.errors[0]
    assert all(f"EP group start failed: rank 0: ExpertMapError: {why}" in e.errors[r] for r in (1, 2, 3))
    assert e.killed == [] and e.exited_by_themselves_s < 10


# ---- growing and shrinking a running group ---------------------------------------------------


def _wait_world(engine, world: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.world != world:
        assert engine.failure is None, engine.failure
        assert time.monotonic() < deadline, f"group did not reach {world} ranks: {engine.resizes}"
        time.sleep(0.05)


def _resize_rank(rank: int, world: int, port: int, ckpt: str, plan_dir: str) -> dict | None:
    """Ranks 0-3 start a group of 4 (the plan file's ranks); 4 and 5 are started at the same time
    (as the operator's new pods would be), wait for a plan that lists them, then join it."""
    from moe_worker.engine import RankConfig, start_rank

    plan = str(Path(plan_dir) / "plan.json")
    rc = RankConfig(rank=rank, world_size=world, checkpoint=ckpt, master_port=port, expert_map=plan, engine=ENGINE)
    r = start_rank(rc)
    if r.engine is None:
        r.run()
        return None
    eng = r.engine
    outputs = []
    try:
        def phase(tag: str, update: tuple[dict, int] | None = None, world_after: int | None = None) -> None:
            tickets = [eng.submit(q) for q in requests(tag)]
            if update is not None:
                write_plan_files(plan_dir, *update)  # while the phase's requests are generating
                _wait_world(eng, world_after)
            outputs.append([eng._wait(t, 120).output_ids for t in tickets])

        phase("four")
        phase("grow", (plan_doc(6, replicas=True, shift=1, nodes=3), 2), 6)
        phase("six")
        phase("shrink", (plan_doc(4, replicas=False, shift=2), 3), 4)
        phase("four-again")
        return {"outputs": outputs, "resizes": list(eng.resizes), "switches": list(eng.switches),
                "generation": eng.runner.emap.generation}
    finally:
        eng.shutdown()


def test_a_running_group_grows_and_shrinks_without_restarting(fp8_ckpt, fp8_ref, tmp_path):
    plan_dir = tmp_path / "plan"
    write_plan_files(plan_dir, plan_doc(4, replicas=False, shift=0), 1)
    out = spawn_ranks(6, _resize_rank, (str(fp8_ckpt), str(plan_dir)), timeout_s=300)
    want = [fp8_ref.gen[p][0] for p in PROMPTS]
    assert out["outputs"] == [want] * 5  # same tokens before, during and after each resize
    (_, g1, a1, b1, s1), (_, g2, a2, b2, s2) = out["resizes"]
    print(f"resize step: grow {s1:.3f} s, shrink {s2:.3f} s")
    assert (g1, a1, b1) == (2, 4, 6) and (g2, a2, b2) == (3, 6, 4)
    assert [g for _, g in out["switches"]] == [2, 3] and out["generation"] == 3


def _first_life(rank: int, world: int, port: int, ckpt: str, plan: str, engine: EngineConfig = ENGINE) -> None:
    """The first process of a rank that dies (exit 17) at its second step with work."""
    import os as _os

    from moe_worker.engine import RankConfig, start_rank

    seen = [0]

    def die(plan_, r):
        seen[0] += plan_.has_work()
        if seen[0] >= 2:
            _os._exit(17)

    rc = RankConfig(rank=rank, world_size=world, checkpoint=ckpt, master_port=port, expert_map=plan, engine=engine)
    start_rank(rc, before_step=die).run()


def _rejoin_rank(rank: int, world: int, port: int, ckpt: str, plan_dir: str,
                 engine: EngineConfig = ENGINE) -> dict | None:
    """Rank 3 runs its first life in a child process that dies mid-generation, then starts again
    in this process, as the operator's replacement pod would, and joins the running group."""
    import os as _os

    from moe_worker.engine import RankConfig, start_rank

    plan = str(Path(plan_dir) / "plan.json")
    rc = RankConfig(rank=rank, world_size=world, checkpoint=ckpt, master_port=port, expert_map=plan, engine=engine)
    if rank == 3:
        pid = _os.fork()  # (a daemonic process cannot start a multiprocessing child; this one has no threads yet)
        if pid == 0:
            try:
                _first_life(rank, world, port, ckpt, plan, engine)
            finally:
                _os._exit(1)
        _, status = _os.waitpid(pid, 0)
        assert _os.waitstatus_to_exitcode(status) == 17, status
        start_rank(rc).run()
        return None
    r = start_rank(rc)
    if r.engine is None:
        r.run()
        return None
    eng = r.engine
    try:
        first = [eng._wait(t, 120).output_ids for t in [eng.submit(q) for q in requests("lose")]]
        deadline = time.monotonic() + 120
        while eng.runner.emap.lost or len(eng.control.live) != world:
            assert time.monotonic() < deadline and eng.failure is None, (eng.failure, eng.recoveries)
            time.sleep(0.05)
        tickets = [eng.submit(q) for q in requests("whole")]
        busy: set[int] = set()  # the ranks (TP groups) rank 0 scheduled the second batch to
        while not all(t.done.is_set() for t in tickets):
            with eng.scheduler.lock:
                busy |= {r_.rank for r_ in eng.scheduler.running.values()}
            time.sleep(0.005)
        second = [eng._wait(t, 120).output_ids for t in tickets]
        hosts = {r_: eng.runner.emap.owned(r_) for r_ in range(world)}
        return {"first": first, "second": second, "recoveries": list(eng.recoveries), "resizes": list(eng.resizes),
                "hosts": hosts, "map": eng.runner.emap.digest, "busy": sorted(busy)}
    finally:
        eng.shutdown()


def test_a_replacement_rank_rejoins_the_running_group(fp8_ckpt, fp8_ref, tmp_path):
    plan_dir = tmp_path / "plan"
    write_plan_files(plan_dir, plan_doc(4, replicas=False, shift=0), 1)
    out = spawn_ranks(4, _rejoin_rank, (str(fp8_ckpt), str(plan_dir)), timeout_s=300)
    want = [fp8_ref.gen[p][0] for p in PROMPTS]
    assert out["first"] == want and out["second"] == want
    (_, lost, _, _), = out["recoveries"]
    (_, gen, old, new, took), = out["resizes"]  # the rejoin step
    assert lost == [3] and (gen, old, new) == (1, 4, 4)
    # Whole again: the published map, every rank holding exactly its experts of it.
    full = parse_plan(json.dumps(plan_doc(4, replicas=False, shift=0)), Checkpoint(fp8_ckpt).args, 4, 1)
    assert out["map"] == full.digest and out["hosts"] == {r: full.owned(r) for r in range(4)}


def _front_first_life(world: int, port: int, ckpt: str, plan: str, engine: EngineConfig = ENGINE) -> None:
    """The first rank-0 process: starts serving, and dies (exit 17) once the first token is out."""
    import os as _os

    from moe_worker.engine import RankConfig, start_rank

    rc = RankConfig(rank=0, world_size=world, checkpoint=ckpt, master_port=port, expert_map=plan, engine=engine)
    eng = start_rank(rc).engine
    tickets = [eng.submit(q) for q in requests("doomed")]
    deadline = time.monotonic() + 120
    while not any(t.output for t in tickets) and time.monotonic() < deadline:
        time.sleep(0.01)
    _os._exit(17)


def _front_rank(rank: int, world: int, port: int, ckpt: str, plan_dir: str,
                engine: EngineConfig = ENGINE) -> dict | None:
    """Rank 0 runs a first life that dies mid-generation, then a second, as the operator's
    replacement pod would; ranks 1..3 keep their processes and join the new rank 0's group."""
    import os as _os

    from moe_worker.engine import RankConfig, start_rank

    plan = str(Path(plan_dir) / "plan.json")
    rc = RankConfig(rank=rank, world_size=world, checkpoint=ckpt, master_port=port, expert_map=plan, engine=engine)
    if rank != 0:
        start_rank(rc).run()
        return None
    pid = _os.fork()  # (a daemonic process cannot start a multiprocessing child; this one has no threads yet)
    if pid == 0:
        try:
            _front_first_life(world, port, ckpt, plan, engine)
        finally:
            _os._exit(1)
    _, status = _os.waitpid(pid, 0)
    assert _os.waitstatus_to_exitcode(status) == 17, status
    t0 = time.monotonic()
    eng = start_rank(rc).engine
    try:
        formed = time.monotonic() - t0
        out = [eng._wait(t, 120).output_ids for t in [eng.submit(q) for q in requests("new-front")]]
        return {"outputs": out, "formed_s": formed}
    finally:
        eng.shutdown()


def test_the_others_join_a_new_rank_0_without_restarting(fp8_ckpt, fp8_ref, tmp_path):
    # spawn_ranks fails the test if rank 1, 2 or 3 exits non-zero: they must survive rank 0.
    plan_dir = tmp_path / "plan"
    write_plan_files(plan_dir, plan_doc(4, replicas=False, shift=0), 1)
    out = spawn_ranks(4, _front_rank, (str(fp8_ckpt), str(plan_dir)), timeout_s=300)
    assert out["outputs"] == [fp8_ref.gen[p][0] for p in PROMPTS]
    print(f"new rank 0 formed the group with the 3 old ranks in {out['formed_s']:.2f} s")


def test_map_errors_and_switches_while_idle_in_process(fp8_ckpt, fp8_ref, tmp_path):
    plan = write_plan_files(tmp_path / "plan", plan_doc(1, replicas=False, shift=0), 1)
    metrics = WorkerMetrics()
    cfg = EngineConfig(map_poll_s=0.0, background_load=False, idle_heartbeat_s=0.02)
    engine = start_rank(RankConfig(0, 1, str(fp8_ckpt), expert_map=str(plan), engine=cfg), metrics=metrics).engine
    value = metrics.registry.get_sample_value
    lbl = {"rank": "0", "group": "0"}

    def wait_for(cond):
        deadline = time.monotonic() + 20
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.02)
        return cond()

    try:
        assert value("moe_expert_map_generation", lbl) == 1 and value("moe_group_ready", lbl) == 1
        write_plan_files(tmp_path / "plan", plan_doc(2, replicas=False, shift=0), 2)  # not for a group of 1
        assert wait_for(lambda: value("moe_expert_map_errors_total", lbl) == 1)
        assert "plan has 2 ranks, the EP group has 1" in engine.map_errors[0]
        assert value("moe_expert_map_generation", lbl) == 1 and engine.switches == []
        doc = plan_doc(1, replicas=False, shift=0)
        doc["ranks"][0]["node"] = "elsewhere"
        write_plan_files(tmp_path / "plan", doc, 3)
        # taken at an idle heartbeat (the rank sets the gauge; the engine records the switch after the step)
        assert wait_for(lambda: value("moe_expert_map_generation", lbl) == 3 and engine.switches)
        assert [g for _, g in engine.switches] == [3] and engine.runner.emap.nodes == ("elsewhere",)
        out = engine.run(requests("after"), timeout=60)
        assert [r.output_ids for r in out] == [fp8_ref.gen[p][0] for p in PROMPTS]
    finally:
        engine.shutdown()
    assert not engine.ready()


def test_a_rank_holds_exactly_its_new_maps_experts_after_racing_switches(fp8_ckpt, tmp_path):
    """Generation 2 staged, 3 loading in the background, the group switches to 2: after the switch
    to 3 the rank holds exactly what 3 assigns it (3 == 1 here: it brings back every expert 2
    dropped), and a switch that finds an expert still missing reads it rather than failing later."""
    plan = write_plan_files(tmp_path / "plan", plan_doc(4, replicas=True, shift=0), 1)
    cfg = EngineConfig(map_poll_s=0.0, background_load=True)
    emap = parse_plan(plan.read_text(), Checkpoint(fp8_ckpt).args, 4, 1)
    runner = build_runner(fp8_ckpt, emap, cfg, ctx=ParallelContext(1, 4, None), plan_path=plan)
    gate, reads = threading.Event(), []
    read = runner.switcher.load_experts

    def gated(added):
        reads.append(added)
        if len(reads) == 2:
            gate.wait(20)
        return read(added)

    runner.switcher.load_experts = gated

    def held():
        return {m.layer_id: tuple(sorted(m.local_experts())) for m in runner.model.moe_layers()}

    def switch(step, generation):
        runner.run_step(StepPlan(step, [[] for _ in range(4)], [[] for _ in range(4)], switch_to=generation))

    assert held() == emap.owned(1)
    write_plan_files(tmp_path / "plan", plan_doc(4, replicas=True, shift=1), 2)
    runner.switcher.poll()
    runner.switcher.wait_idle(20)
    write_plan_files(tmp_path / "plan", plan_doc(4, replicas=True, shift=0), 3)
    runner.switcher.poll()
    switch(0, 2)
    assert held() == runner.emap.owned(1) and runner.emap.generation == 2
    gate.set()
    runner.switcher.wait_idle(20)
    switch(1, 3)
    assert held() == emap.owned(1) and runner.emap.generation == 3

    # A staged generation that lacks a module (as a loader racing another map would leave it).
    write_plan_files(tmp_path / "plan", plan_doc(4, replicas=True, shift=2), 4)
    runner.switcher.poll()
    runner.switcher.wait_idle(20)
    runner.switcher.staged.experts.clear()
    switch(2, 4)
    assert held() == runner.emap.owned(1) and runner.emap.generation == 4


def test_micro_batches_split_a_prompt_in_two_halves():
    def chunk(seq, n, start=0):
        return _Chunk(seq, list(range(n)), start, None, True, False)

    a, b = split_micro_batches([chunk(0, 1, 7), chunk(1, 9), chunk(2, 1, 3)], 2)  # 11 tokens: 6 + 5
    assert [(c.seq, len(c.tokens), c.start, c.last) for c in a] == [(0, 1, 7, True), (1, 5, 0, False)]
    assert [(c.seq, len(c.tokens), c.start, c.last) for c in b] == [(1, 4, 5, True), (2, 1, 3, True)]
    assert b[0].tokens == [5, 6, 7, 8]
    assert split_micro_batches([chunk(0, 1)], 2) == [[chunk(0, 1)], []]  # one decode token: B is empty
    assert split_micro_batches([], 2) == [[], []]


# ---- the pod entry point and the async Engine API ----------------------------------------------


def _env_rank(rank: int, world: int, port: int, env: dict) -> dict | None:
    env = {**env, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_PORT": str(port)}
    metrics = WorkerMetrics(rank=rank)
    engine = run_rank_from_env(metrics, env)
    if engine is None:  # rank 1: served until rank 0 shut the group down
        assert metrics.registry.get_sample_value("moe_expert_map_generation", {"rank": "1", "group": "0"}) == 5
        return None

    async def main():
        reqs = requests("async")
        gen = [asyncio.create_task(engine.generate(r)) for r in reqs[:3]]
        streamed = [tok async for tok in engine.stream(reqs[3])]
        try:
            await engine.generate(GenerationRequest("bad", (), max_tokens=2))
            bad = "accepted"
        except RequestError as err:
            bad = str(err)
        try:
            await engine.generate(GenerationRequest("long", (1,) * 10, max_tokens=60))
        except RequestError as err:
            bad += " | " + str(err)
        return [r.output_ids for r in await asyncio.gather(*gen)] + [streamed], bad

    try:
        outputs, bad = asyncio.run(main())
        ready = engine.ready()
        lbl = {"rank": "0", "group": "0"}
        value = metrics.registry.get_sample_value
        return {"outputs": outputs, "bad": bad, "ready": ready, "info": engine.info.max_context,
                "group_ready": value("moe_group_ready", lbl), "generation": value("moe_expert_map_generation", lbl),
                "routed": sum(s.value for m in metrics.registry.collect() if m.name == "moe_expert_tokens"
                              for s in m.samples if s.name.endswith("_total"))}
    finally:
        engine.shutdown()


def test_run_rank_from_env_two_pods(fp8_ckpt, fp8_ref, tmp_path):
    plan = write_plan_files(tmp_path / "plan", plan_doc(2, replicas=True, shift=0), 5)
    env = {"MASTER_ADDR": "127.0.0.1", "MOE_CHECKPOINT": str(fp8_ckpt), "MOE_EXPERT_MAP": str(plan),
           "MOE_MAX_CONTEXT": "64", "MOE_DIST_TIMEOUT_S": "30"}
    out = spawn_ranks(2, _env_rank, (env,), timeout_s=120)
    assert out["outputs"] == [fp8_ref.gen[p][0] for p in PROMPTS]
    assert out["ready"] and out["group_ready"] == 1 and out["generation"] == 5 and out["info"] == 64
    assert "empty prompt" in out["bad"] and "exceeds the context of 64" in out["bad"]
    assert out["routed"] > 0  # rank 0 counted the routed tokens its experts computed


# ---- the command line ------------------------------------------------------------------------


def test_cli_generate_and_logits_with_four_ranks(fp8_ckpt, fp8_ref, tmp_path, capsys):
    from moe_worker.cli import main

    outs = {}
    for n in (1, 4):
        assert main(["generate", "--checkpoint", str(fp8_ckpt), "--world-size", str(n), "--prompt-ids", "1,2,3",
                     "--max-new-tokens", "6", "--json"]) == 0
        outs[n] = json.loads(capsys.readouterr().out)
    want, sums = fp8_ref.gen[(1, 2, 3)]
    for n in (1, 4):
        assert outs[n]["output_ids"] == want and outs[n]["world_size"] == n
        assert abs(outs[n]["logits_checksum"] - sum(sums)) < 1e-3
    assert main(["logits", "--checkpoint", str(fp8_ckpt), "--world-size", "4",
                 "--input-ids", ",".join(map(str, LOGITS_PROMPT)), "--out", str(tmp_path / "l.npy")]) == 0
    got = np.load(tmp_path / "l.npy")
    ref = fp8_ref.logits.numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert "(4 ranks)" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(fp8_ckpt), "--world-size", "0", "--prompt-ids", "1"]) == 2
    assert "--world-size must be >= 1" in capsys.readouterr().err


class _Store:
    """The few TCPStore calls `_join_running` makes, with a hook on every `set`."""

    def __init__(self, on_set):
        self.kv: dict[str, bytes] = {}
        self.on_set = on_set

    def check(self, keys):
        return all(k in self.kv for k in keys)

    def get(self, key):
        return self.kv[key]

    def set(self, key, value):
        self.kv[key] = value.encode() if isinstance(value, str) else value
        self.on_set(self, key, self.kv[key].decode())

    def delete_key(self, key):
        return self.kv.pop(key, None) is not None


def test_a_joining_rank_joins_the_generation_rank_0_chose_even_after_it_moved_on(fp8_ckpt, tmp_path, monkeypatch):
    # Rank 4 announces generation 2, then sees generation 3 in its plan file and announces that;
    # rank 0 had read "2" just before and regroups to 2: the rank must join 2, with 2's map.
    from moe_worker.checkpoint import Checkpoint
    from moe_worker.engine import membership as eng_membership
    from moe_worker.engine import startup as eng_startup
    from moe_worker.model import ParallelContext

    plan_dir = tmp_path / "plan"
    write_plan_files(plan_dir, plan_doc(6, replicas=False, shift=1), 2)

    def on_set(store, key, value):
        if key == "join/4" and value.startswith("2:"):
            store.kv["first-announced"] = value.encode()
            write_plan_files(plan_dir, plan_doc(6, replicas=True, shift=3), 3)  # the operator moves on
        elif key == "join/4" and value.startswith("3:"):
            # rank 0 regrouped to what it had read: generation 2
            digest = store.kv["first-announced"].decode().split(":")[1]
            store.kv["admit/4"] = json.dumps({"generation": 2, "digest": digest, "epoch": 3, "world": 6}).encode()

    formed = []

    def form(self, members, world):
        formed.append((tuple(members), world, self.epoch))
        return ParallelContext(self.rank, world, None), None

    monkeypatch.setattr(eng_membership._Membership, "form", form)
    store = _Store(on_set)
    rc = RankConfig(rank=4, world_size=6, checkpoint=str(fp8_ckpt), expert_map=str(plan_dir / "plan.json"),
                    engine=ENGINE)
    membership = eng_membership._Membership(store, 4, "gloo", torch.device("cpu"), None)
    rank = eng_startup._join_running(rc, membership, Checkpoint(str(fp8_ckpt)).args, None, None)
    assert formed == [(tuple(range(6)), 6, 3)]
    assert rank.runner.emap.generation == 2 and rank.runner.ctx.world_size == 6
    assert store.kv["join/4"].decode().startswith("3:")  # it had moved on, and still joined 2
