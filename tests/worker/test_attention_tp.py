"""Attention tensor parallelism: consecutive ranks split the MLA heads of the sequences they serve
together, reduce-scatter the partial sums onto slices of the tokens for the feed-forward and the
EP exchange, and all-gather them back (`engine.attention_tp`).

The EP groups here generate the same greedy tokens, logit sums and prompt logits as the
single-process reference (`test_ep_engine.Reference`), with TP 2 and 4, overlap off and on, across
an expert-map switch, and when a rank of a TP group dies. Three checkpoints: the tiny-ep16
architecture in bf16 and in FP8, and an FP8 one with 8 heads of v_head_dim 64. The last splits
o_proj by head at 128-column blocks for TP 2 and 4 (the reduce-scatter path, DeepSeek-V3's case);
the tiny FP8 model's 4 x 32 columns cannot be split without changing the FP8 rounding, so its
ranks keep o_proj whole and gather the heads' values (`MLA.o_split`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from test_ep_engine import (
    ENGINE,
    PROMPTS,
    Reference,
    _front_rank,
    _rejoin_rank,
    check_group,
    plan_doc,
    requests,
    standard_phases,
    tiny_ep16_config,
)

from moe_worker.checkpoint import Checkpoint, make_checkpoint
from moe_worker.engine import EngineConfig, RankConfig
from moe_worker.engine.scheduler import Scheduler, _Ticket
from moe_worker.engine_api import GenerationRequest, ModelInfo
from moe_worker.expertmap import write_plan_files
from moe_worker.fp8 import Linear, quantize_weight
from moe_worker.launch import Job, Phase, run_local, spawn_ranks
from moe_worker.model import Transformer


def tp_fp8_config() -> dict:
    cfg = tiny_ep16_config()
    cfg.update(num_attention_heads=8, num_key_value_heads=8, v_head_dim=64)
    return cfg


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return make_checkpoint(tiny_ep16_config(), tmp_path_factory.mktemp("tp") / "bf16", dtype="bf16", seed=2)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    return make_checkpoint(tp_fp8_config(), tmp_path_factory.mktemp("tp") / "fp8", dtype="fp8", seed=3)


@pytest.fixture(scope="module")
def tiny_fp8_ckpt(tmp_path_factory):
    return make_checkpoint(tiny_ep16_config(), tmp_path_factory.mktemp("tp") / "tiny-fp8", dtype="fp8", seed=1)


@pytest.fixture(scope="module")
def tiny_fp8_ref(tiny_fp8_ckpt):
    return Reference(tiny_fp8_ckpt)


@pytest.fixture(scope="module")
def bf16_ref(bf16_ckpt):
    return Reference(bf16_ckpt)


@pytest.fixture(scope="module")
def fp8_ref(fp8_ckpt):
    return Reference(fp8_ckpt)


def run_tp(ckpt, world: int, tp: int, tmp_path, phases, engine: EngineConfig = ENGINE, **job_kw):
    plan = write_plan_files(tmp_path / "plan", plan_doc(world, replicas=False, shift=0), 1)
    return run_local(ckpt, world, Job(phases, **job_kw), engine=replace(engine, attention_tp=tp), expert_map=plan,
                     timeout_s=300)


# ---- one layer's attention, in process ----------------------------------------------------------


def _attention(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """Layer 0's attention output for x (1, S, D), causal, no cache."""
    S = x.shape[1]
    rope = model.rotary(torch.arange(S))
    mask = torch.full((S, S), float("-inf")).triu(1)
    return model.layers[0].attn(x, rope, 0, mask, None, model.attn_impl)


def _tp_attention(shards: list[Transformer], x: torch.Tensor) -> torch.Tensor:
    """What the group computes: the shards' partial sums added up, or (o_proj whole) their heads'
    values put side by side through o_proj."""
    outs = [_attention(s, x) for s in shards]
    a = shards[0].layers[0].attn
    return sum(outs) if a.o_split else a.wo(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("which", ["bf16", "fp8", "tiny_fp8"])
@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_the_shards_add_up_to_the_whole_attention(which, impl, request):
    ckpt = Checkpoint(request.getfixturevalue(f"{which}_ckpt"))
    whole = ckpt.build(dtype=torch.float32, attn_impl=impl)
    x = torch.randn(1, 7, whole.args.hidden_size, generator=torch.Generator().manual_seed(0))
    want = _attention(whole, x)
    for tp in (2, 4):
        shards = [ckpt.build(dtype=torch.float32, attn_impl=impl, attention_tp=(t, tp)) for t in range(tp)]
        assert all(s.layers[0].attn.n_heads == whole.args.num_attention_heads // tp for s in shards)
        assert shards[0].layers[0].attn.o_split == (which != "tiny_fp8")
        got = _tp_attention(shards, x)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (which, impl, tp)
        # One shard alone is far from the whole: the combination is what the test checks.
        alone = _attention(shards[0], x)
        assert alone.shape != want.shape or (alone - want).abs().max() > 1e-2 * want.abs().max()
        with pytest.raises(ValueError, match="partial sums"):
            shards[0](torch.tensor([[1, 2]]))


def test_fp8_row_and_column_shards_use_the_checkpoints_own_blocks():
    # Rows 40..100 of a (300, 384) FP8 weight: stored as rows 0..128 (whole blocks), cut after
    # the product: exactly the unsharded product's rows. Columns 128..256: an aligned shard, the
    # same activation groups: its partial sums add up with the other columns' to the whole.
    g = torch.Generator().manual_seed(1)
    q, s = quantize_weight(torch.randn(300, 384, generator=g))
    whole = Linear(384, 300, fp8=True)
    whole.weight.data, whole.scale.data = q, s
    x = torch.randn(5, 384, generator=g)
    want = whole(x)
    rows = Linear(384, 300, fp8=True, shard=(0, 40, 100))
    assert rows.weight.shape == (128, 384)
    rows.weight.data, rows.scale.data = q[:128], s[:1]
    assert torch.equal(rows(x), want[:, 40:100])
    assert rows.dequantized_weight().shape == (60, 384)
    parts = []
    for lo, hi in ((0, 128), (128, 256), (256, 384)):
        col = Linear(384, 300, fp8=True, shard=(1, lo, hi))
        col.weight.data, col.scale.data = q[:, lo:hi], s[:, lo // 128:hi // 128]
        parts.append(col(x[:, lo:hi]))
    assert (sum(parts) - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(ValueError, match="shard"):
        Linear(384, 300, shard=(1, 300, 400))
    with pytest.raises(ValueError, match="FP8 column shard 64:128 of 384 is not whole 128-column blocks"):
        Linear(384, 300, fp8=True, shard=(1, 64, 128))


def test_the_loader_reads_only_the_shard(bf16_ckpt, fp8_ckpt, monkeypatch):
    parts = {}
    read = Checkpoint.read

    def spy(self, name, shape=None, dtypes=None, part=None):
        parts[name] = part
        return read(self, name, shape, dtypes, part)

    for path in (bf16_ckpt, fp8_ckpt):
        ckpt = Checkpoint(path)
        whole = ckpt.build(dtype=torch.float32)
        monkeypatch.setattr(Checkpoint, "read", spy)
        half = ckpt.build(dtype=torch.float32, attention_tp=(1, 2))
        monkeypatch.undo()
        # Only the rank's part is read from the file (FP8: whole 128-row blocks of it).
        o_proj = parts["model.layers.1.self_attn.o_proj.weight"]
        assert o_proj[0] == 1 and o_proj[2] - o_proj[1] < whole.layers[1].attn.wo.in_features
        assert parts["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] is None
        a, b = whole.layers[1].attn, half.layers[1].attn
        H, V = whole.args.num_attention_heads, whole.args.v_head_dim
        assert torch.equal(b.wo.dequantized_weight(), a.wo.dequantized_weight()[:, H // 2 * V:])
        nv = whole.args.qk_nope_head_dim + V
        assert torch.equal(b.wkv_b.dequantized_weight(), a.wkv_b.dequantized_weight()[H // 2 * nv:])
        assert torch.equal(b.wkv_a.weight, a.wkv_a.weight)  # the latent projection stays whole


# ---- rank 0's scheduling -------------------------------------------------------------------------


def _scheduler(world: int, tp: int) -> Scheduler:
    info = ModelInfo(name="m", vocab_size=512, max_context=64, max_new_tokens=8, eos_token_id=None)
    return Scheduler(world, EngineConfig(attention_tp=tp, max_seqs_per_rank=4), info)


def _ticket(i: int) -> _Ticket:
    return _Ticket(GenerationRequest(f"r{i}", (1, 2, 3), max_tokens=4))


def test_rank_0_schedules_per_tp_group_and_sends_its_sequences_to_every_rank_of_it():
    sched = _scheduler(8, 2)
    for i in range(6):
        sched.add(_ticket(i))
    plan = sched.build(0, None)
    groups = [[w.seq for w in plan.work[r]] for r in range(8)]
    assert all(groups[r] == groups[r + 1] for r in range(0, 8, 2))  # a TP group's ranks: the same sequences
    assert sorted(s for r in range(0, 8, 2) for s in groups[r]) == list(range(6))
    assert {r.rank for r in sched.running.values()} <= {0, 2, 4, 6}
    # A finished sequence is released on every rank of its group.
    seq = groups[2][0]
    sched._finish(seq, "length")
    plan = sched.build(1, None)
    assert plan.release[2] == plan.release[3] == [seq] and not plan.release[0]
    # Rank 5 lost: TP group (4, 5) loses its sequences to the queue and takes no new ones.
    on_45 = [s for s, r in sched.running.items() if r.rank == 4]
    assert sched.lose({5}) == len(on_45) > 0
    plan = sched.build(2, None)
    assert not plan.work[4] and not plan.work[5]
    assert all(sched.running[s].rank in (0, 2, 6) for s in sched.running)


# ---- EP groups on CPU (gloo) ---------------------------------------------------------------------


@pytest.mark.parametrize(("world", "tp", "which"), [(4, 2, "bf16"), (4, 4, "fp8"), (8, 2, "fp8"),
                                                    (4, 2, "tiny_fp8")])
def test_ep_groups_with_attention_tp_generate_the_references_tokens(world, tp, which, request, tmp_path):
    ckpt, ref = request.getfixturevalue(f"{which}_ckpt"), request.getfixturevalue(f"{which}_ref")
    res = run_tp(ckpt, world, tp, tmp_path, standard_phases(world))
    check_group(res, ref, world, switch_phase=2, switch_gen=2)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sixteen_ranks_with_attention_tp(tp, fp8_ckpt, fp8_ref, tmp_path):
    res = run_tp(fp8_ckpt, 16, tp, tmp_path, standard_phases(16))
    check_group(res, fp8_ref, 16, switch_phase=2, switch_gen=2)


def test_a_dead_rank_takes_its_tp_groups_sequences_elsewhere(fp8_ckpt, fp8_ref, tmp_path):
    # Rank 3 (TP group 2..3) exits mid-generation. Rank 2 can no longer attend (it lacks rank 3's
    # heads): it drops its caches and serves experts only; rank 0 recomputes the group's two
    # sequences on TP group 0..1 from prompt + tokens so far. Every answer equals the reference.
    res = run_tp(fp8_ckpt, 4, 2, tmp_path, [Phase(requests("x"), overlap="on"), Phase(requests("after"))],
                 exit_rank_at_step=(3, 3))
    for ph in res.phases:
        fp8_ref.check(ph, "4 ranks TP2, rank 3 lost")
    (step, lost, moved, took), = res.recoveries
    assert lost == [3] and moved == 2, res.recoveries


def test_a_replacement_rank_makes_its_tp_group_whole_again(fp8_ckpt, fp8_ref, tmp_path):
    # Rank 3 dies mid-generation and its replacement process joins the running group: TP group
    # 2..3 is formed again and rank 0 schedules sequences to it again; all answers as the reference.
    plan_dir = tmp_path / "plan"
    write_plan_files(plan_dir, plan_doc(4, replicas=False, shift=0), 1)
    out = spawn_ranks(4, _rejoin_rank, (str(fp8_ckpt), str(plan_dir), replace(ENGINE, attention_tp=2)), timeout_s=300)
    want = [fp8_ref.gen[p][0] for p in PROMPTS]
    assert out["first"] == want and out["second"] == want
    (_, lost, moved, _), = out["recoveries"]
    assert lost == [3] and moved >= 1
    assert out["busy"] == [0, 2], out["busy"]  # both TP groups serve again


def test_the_others_join_a_new_rank_0_with_attention_tp(fp8_ckpt, fp8_ref, tmp_path):
    plan_dir = tmp_path / "plan"
    write_plan_files(plan_dir, plan_doc(4, replicas=False, shift=0), 1)
    out = spawn_ranks(4, _front_rank, (str(fp8_ckpt), str(plan_dir), replace(ENGINE, attention_tp=2)), timeout_s=300)
    assert out["outputs"] == [fp8_ref.gen[p][0] for p in PROMPTS]


def test_chunked_prefill_with_attention_tp(fp8_ckpt, fp8_ref, tmp_path):
    # Prompts prefilled over several 4-token steps, decode beside them, overlapped micro-batches.
    res = run_tp(fp8_ckpt, 4, 2, tmp_path, standard_phases(4)[:2], engine=replace(ENGINE, max_step_tokens=4))
    for ph in res.phases:
        fp8_ref.check(ph, "4 ranks TP2, 4 tokens per step")


def _one_rank_cannot_admit(rank: int, world: int, port: int, ckpt: str, plan: str) -> dict | None:
    """TP group 0..1; rank 1 fails to set up sequence 0 (as if out of memory), rank 0 does not."""
    from moe_worker.engine import start_rank

    rc = RankConfig(rank=rank, world_size=world, checkpoint=ckpt, master_port=port, expert_map=plan,
                    engine=replace(ENGINE, attention_tp=2))
    r = start_rank(rc)
    if rank == 1:
        admit = r.runner._admit

        def failing(w, failed):
            if w.seq == 0:
                failed[w.seq] = "rank 1: injected: no memory for its KV cache"
                return True
            return admit(w, failed)

        r.runner._admit = failing
        r.run()
        return None
    eng = r.engine
    try:
        out = []
        for t in [eng.submit(q) for q in requests("x")[:2]]:
            try:
                out.append(eng._wait(t, 120).output_ids)
            except Exception as e:  # noqa: BLE001 - the failed request's error is the result
                out.append(str(e))
        return {"out": out, "recoveries": list(eng.recoveries)}
    finally:
        eng.shutdown()


def test_a_sequence_one_rank_of_a_tp_group_cannot_set_up_fails_alone(fp8_ckpt, fp8_ref, tmp_path):
    # The group agrees which new sequences to drop, so its ranks run the same tokens: the
    # sequence fails, the other is answered, and the group never breaks.
    plan = write_plan_files(tmp_path / "plan", plan_doc(2, replicas=False, shift=0), 1)
    res = spawn_ranks(2, _one_rank_cannot_admit, (str(fp8_ckpt), str(plan)), timeout_s=300)
    failed, answered = res["out"]
    assert "attention TP group could not set the sequence up" in failed or "injected" in failed, failed
    assert answered == fp8_ref.gen[PROMPTS[1]][0] and res["recoveries"] == []


def test_generate_cli_with_attention_tp_equals_one_rank(fp8_ckpt):
    def generate(*extra: str) -> list[int]:
        out = subprocess.run([sys.executable, "-m", "moe_worker.cli", "generate", "--checkpoint", str(fp8_ckpt),
                              "--prompt-ids", "5,6,7", "--max-new-tokens", "5", "--json", *extra],
                             capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout)["output_ids"]

    assert generate("--world-size", "4", "--attention-tp", "2") == generate()
    bad = subprocess.run([sys.executable, "-m", "moe_worker.cli", "generate", "--checkpoint", str(fp8_ckpt),
                          "--prompt-ids", "1", "--world-size", "4", "--attention-tp", "3"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--attention-tp 3 must be >= 1 and divide --world-size 4" in bad.stderr


def test_a_tp_that_does_not_divide_the_heads_is_refused_by_name(fp8_ckpt):
    env = {"MOE_CHECKPOINT": str(fp8_ckpt), "WORLD_SIZE": "16", "MOE_ATTENTION_TP": "16"}
    assert RankConfig.from_env(env).engine.attention_tp == 16
    with pytest.raises(ValueError, match="env MOE_ATTENTION_TP=.0.: expected an integer >= 1"):
        RankConfig.from_env({**env, "MOE_ATTENTION_TP": "0"})
    from moe_worker.engine.runner import check_attention_tp

    with pytest.raises(ValueError, match=r"attention TP 16 \(MOE_ATTENTION_TP\) must divide the group's 16 ranks "
                                         r"and the model's 8 attention heads"):
        check_attention_tp(16, 16, 8)

