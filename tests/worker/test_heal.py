"""The pure parts of healing a group in place (issue 16): the degraded expert map, the scheduler's
recomputation of a lost rank's sequences, and sampling that a recomputation reproduces. The
multi-process paths (a rank killed, hung, replaced) are in test_ep_engine; the real control plane
in tests/test_heal_e2e.py."""

from __future__ import annotations

import itertools

import pytest
from test_ep_engine import plan_doc, tiny_ep16_config

from moe_common.model_args import ModelArgs
from moe_worker.engine import EngineConfig, RankConfig, Scheduler, StepReply, model_info, start_rank
from moe_worker.engine.scheduler import _Ticket
from moe_worker.engine_api import GenerationRequest
from moe_worker.expertmap import ExpertMap, ExpertMapError, degrade, parse_plan
from moe_worker.sampling import token_seed
from support import DictStore


@pytest.fixture(scope="module")
def args() -> ModelArgs:
    return ModelArgs.from_hf_config(tiny_ep16_config())


def plan(args: ModelArgs, world: int, *, replicas: bool) -> ExpertMap:
    return parse_plan(plan_doc(world, replicas=replicas, shift=0), args, world, 7)


# ---- the degraded map ----------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "replicas", "lost"), [
    (4, False, {3}), (4, True, {1}), (8, True, {0, 5}), (16, False, {2, 3, 4}), (16, True, set(range(1, 15))),
])
def test_degraded_map_hosts_every_expert_with_fewest_moves(args, world, replicas, lost):
    full = plan(args, world, replicas=replicas)
    deg = degrade(full, lost)
    assert deg.generation == full.generation and deg.lost == frozenset(lost) and deg.digest != full.digest
    assert deg.members == tuple(r for r in range(world) if r not in lost)
    for i, layer in enumerate(full.moe_layers):
        # Every expert still hosted; the lost ranks host nothing.
        assert all(reps for reps in deg.replicas(layer))
        assert all(deg.hosts[i][r] == () for r in lost)
        # Fewest moves: survivors keep everything they had; only experts that lost every copy
        # move, each to exactly one survivor.
        orphans = {e for e, reps in enumerate(full.replicas(layer)) if set(reps) <= lost}
        added = {r: set(deg.hosts[i][r]) - set(full.hosts[i][r]) for r in deg.members}
        assert all(set(full.hosts[i][r]) <= set(deg.hosts[i][r]) for r in deg.members)
        assert sorted(itertools.chain.from_iterable(added.values())) == sorted(orphans)
        # One copy per GPU: an expert's replicas are distinct ranks (cells are sets).
        assert all(len(set(reps)) == len(reps) for reps in deg.replicas(layer))


def test_degraded_map_spreads_the_reads_and_is_cumulative(args):
    full = plan(args, 4, replicas=False)  # 3 experts per rank and layer
    deg = degrade(full, {3})
    # Rank 3's three experts of a layer go to three different survivors, in every layer.
    for i in range(len(full.moe_layers)):
        assert [len(deg.hosts[i][r]) - len(full.hosts[i][r]) for r in range(3)] == [1, 1, 1]
    # Losing another rank later moves only what the second loss orphaned: the experts read for the
    # first stay where they are.
    again = degrade(deg, {1})
    assert again.lost == {1, 3} and all(again.hosts[i][r] == () for i in range(3) for r in (1, 3))
    for i in range(3):
        assert all(set(deg.hosts[i][r]) <= set(again.hosts[i][r]) for r in (0, 2))
        assert sorted(e for r in (0, 2) for e in set(again.hosts[i][r]) - set(deg.hosts[i][r])) == sorted(
            deg.hosts[i][1])


def test_degraded_map_refuses_what_cannot_be_served(args):
    full = plan(args, 4, replicas=False)
    with pytest.raises(ExpertMapError, match="every rank of the map is lost"):
        degrade(full, range(4))
    with pytest.raises(ExpertMapError, match=r"lost ranks \[7\] are not ranks of the map"):
        degrade(full, {7})


# ---- recomputation of a lost rank's sequences ----------------------------------------------------


def reply(sched: Scheduler, rank: int, token: int) -> StepReply:
    return StepReply(rank, {s: (token, 0.0) for s, r in sched.running.items() if r.rank == rank}, (0, ""), 0)


def test_a_lost_ranks_sequences_are_recomputed_from_prompt_and_output(args):
    cfg = EngineConfig()
    sched = Scheduler(3, cfg, model_info(args, cfg))
    tickets = [_Ticket(GenerationRequest(f"r{i}", (10 + i, 20 + i), max_tokens=8, temperature=0.7)) for i in range(3)]
    for t in tickets:
        sched.add(t)
    plan0 = sched.build(0, None)
    assert [len(w) for w in plan0.work] == [1, 1, 1]
    sched.update([reply(sched, r, 100 + r) for r in range(3)], {})
    plan1 = sched.build(1, None)  # a decode step for all three ... which breaks on rank 1
    sched.step_broke(plan1)
    on_1 = next(t for t in tickets if t.output == [101])
    assert sched.lose({1}) == 1 and sched.lost == {1} and on_1.recomputed == 1
    plan2 = sched.build(2, None)
    assert plan2.work[1] == []  # nothing goes to the lost rank
    redo = [w for ws in plan2.work for w in ws if w.new]
    # The lost sequence: a prefill of prompt + the token it had, drawing token number 1 next,
    # with the seed rank 0 chose for it; the KV budget it takes is the original one.
    (w,) = redo
    assert w.tokens == [11, 21, 101] and w.start == 0 and w.drawn == 1 and w.max_len == 2 + 8
    assert w.seed == on_1.seed and w.temperature == 0.7
    # The others re-send the decode step the broken step carried (uncommitted), unchanged.
    again = [w for ws in plan2.work for w in ws if not w.new]
    assert sorted((w.tokens, w.start) for w in again) == sorted((w.tokens, w.start) for ws in plan1.work for w in ws
                                                                if ws is not plan1.work[1])
    # After the step the recomputed sequence continues where it was.
    sched.update([reply(sched, r, 300 + r) for r in range(3)], {})
    assert on_1.output == [101, 300 + next(r.rank for r in sched.running.values() if r.ticket is on_1)]
    assert sched.running[next(s for s, r in sched.running.items() if r.ticket is on_1)].pos == 3


def test_token_seeds_differ_per_index_and_seed():
    seeds = {token_seed(s, i) for s in (0, 1, -5, 2**62) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)


def test_a_recomputed_sampled_sequence_draws_the_same_tokens(tmp_path):
    # One process: generate with sampling, then replay a recomputation at every cut point (the
    # request re-admitted with part of its output, as after its rank was lost): same tokens.
    from moe_worker.checkpoint import make_checkpoint

    ckpt = make_checkpoint(tiny_ep16_config(), tmp_path / "ckpt", dtype="bf16", seed=3)
    eng = start_rank(RankConfig(rank=0, world_size=1, checkpoint=str(ckpt),
                                engine=EngineConfig(dtype="fp32", map_poll_s=0.0))).engine
    try:
        req = GenerationRequest("s", (5, 6, 7), max_tokens=8, temperature=1.5, seed=1234)
        want = eng.run([req], timeout=120)[0].output_ids
        unseeded = eng.submit(GenerationRequest("u", (5, 6, 7), max_tokens=8, temperature=1.5))
        eng._wait(unseeded, 120)
        assert len(set(want)) > 1  # really sampled (greedy on this model repeats less randomly)
        for cut in (1, 4, 7):
            for t, seed in ((_Ticket(req), 1234), (_Ticket(unseeded.req), unseeded.seed)):
                t.seed, t.output = seed, list((want if seed == 1234 else unseeded.result.output_ids)[:cut])
                eng._enqueue(t)
                got = eng._wait(t, 120).output_ids
                assert got == (want if seed == 1234 else unseeded.result.output_ids), (cut, seed)
    finally:
        eng.shutdown()


# ---- noticing a dead or hung peer ----------------------------------------------------------------


def test_rank_0_notices_a_silent_a_replaced_and_not_a_forged_heartbeat(monkeypatch):
    from moe_worker.engine import membership
    from moe_worker.engine.auth import SignedStore

    clock = [100.0]
    monkeypatch.setattr(membership.time, "monotonic", lambda: clock[0])
    raw, key = DictStore(), b"s" * 32
    SignedStore(raw, key, create_session=True)
    one, two = (membership._Heartbeat(SignedStore(raw, key), r, watch=False) for r in (1, 2))
    zero = membership._Heartbeat(SignedStore(raw, key), 0, watch=True)
    one.beat(), two.beat()
    zero.watch_ranks({1: one.incarnation, 2: two.incarnation})
    zero._sample()
    clock[0] = 101.0
    one.beat()  # rank 2 stops beating (dead or stopped)
    zero._sample()
    clock[0] = 102.5
    raw.set("hb/2", f"{two.incarnation}:99".encode())  # a forgery of rank 2's beat: not a beat
    zero._sample()
    assert zero.silent_for(1) == 1.5 and zero.silent_for(2) == 2.5
    # Rank 1's pod was replaced: a new process beats for rank 1; the one that formed the group is gone.
    membership._Heartbeat(SignedStore(raw, key), 1, watch=False).beat()
    zero._sample()
    assert zero.silent_for(1) == float("inf")
