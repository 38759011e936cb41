"""Dispatch and combine: one process against `run_local_experts`, and 4 gloo ranks with replicas,
a rank without experts, a rank without tokens, FP8 payload, bf16 combine, two interleaved
exchanges, and the per-expert token counts the receiving ranks export. The capacity buckets of
the single dispatch all-to-all: exact counts (capacity 1), a capacity some buckets overflow, one
none does, and the adaptive capacity across changing batch sizes give bit-identical results.

Tolerances (relative to the largest |output|): fp32 payload and combine reorder fp32 sums only
(< 1e-6); an FP8 payload is compared with the reference on the same 1x128-quantized input, so it
is exact up to summation order too; a bf16 combine rounds each partial sum once (2**-8 = 4e-3).
"""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist

from moe_worker.dispatch import DispatchConfig, Dispatcher, _Pool, _segments, interleave
from moe_worker.expertmap import ExpertMap
from moe_worker.fp8 import act_quant_dequant, quantize_weight
from moe_worker.launch import spawn_ranks
from moe_worker.metrics import EXPERT_TOKENS, WorkerMetrics
from moe_worker.model import MLP, ParallelContext, run_local_experts

E, K, D, INTER, LAYER = 12, 4, 200, 48, 1  # D = 200: the last FP8 group is partial
# Rank 2 hosts nothing; expert 0 has replicas on ranks 0, 1 (node a) and 3 (node b); 5 on 1 and 3.
HOSTS = ((0, 1, 2, 3, 4), (0, 5, 6), (), (0, 5, 7, 8, 9, 10, 11))
NODES = ("a", "a", "b", "b")
TOKENS = (7, 33, 0, 5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def experts(dtype: torch.dtype, fp8: bool) -> dict[int, MLP]:
    """The same 12 experts in every process (weights from the expert id)."""
    out = {}
    for e in range(E):
        m = MLP(D, INTER, dtype=dtype, fp8=fp8)
        g = torch.Generator().manual_seed(e)
        for lin in (m.w1, m.w2, m.w3):
            w = torch.randn(lin.out_features, lin.in_features, generator=g) / lin.in_features**0.5
            with torch.no_grad():
                if fp8:
                    q, s = quantize_weight(w)
                    lin.weight.copy_(q)
                    lin.scale.copy_(s)
                else:
                    lin.weight.copy_(w)
        out[e] = m
    return out


def routing(rank: int, T: int, salt: int = 0):
    g = torch.Generator().manual_seed(100 * rank + salt)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    w = torch.rand(T, K, generator=g)
    return x, ids, w


def emap() -> ExpertMap:
    return ExpertMap(1, NODES, (LAYER,), (HOSTS,), E)


def test_single_process_dispatch_is_run_local_experts():
    m = ExpertMap(0, ("n",), (LAYER,), ((tuple(range(E)),),), E)
    x, ids, w = routing(0, 9)
    for fp8 in (False, True):
        ex = experts(torch.float32, fp8)
        d = Dispatcher(ParallelContext(), m, config=DispatchConfig(fp8_payload=fp8))
        got = d(x, ids, w, ex, LAYER)
        xin = act_quant_dequant(x) if fp8 else x
        ref = run_local_experts(xin, ids, w, ex, LAYER)
        assert rel(got, ref) == 0.0 if not fp8 else rel(got, ref) < 1e-6
        assert d.stats.offrank_pairs == 0 and d.stats.dispatch_bytes == 0 and d.stats.rows == 9
    # Capacity 9 = every token's row fills the one bucket exactly (no gather); 4 overflows.
    ex = experts(torch.float32, False)
    ref = run_local_experts(x, ids, w, ex, LAYER)
    for cap in (9, 4, None):
        d = Dispatcher(ParallelContext(), m, config=DispatchConfig(capacity=cap))
        for _ in range(2):
            assert rel(d(x, ids, w, ex, LAYER), ref) == 0.0
        assert d.stats.overflow_rounds == {9: 0, 4: 2, None: 1}[cap]
    empty = Dispatcher(ParallelContext(), m)(x[:0], ids[:0], w[:0], experts(torch.float32, False), LAYER)
    assert empty.shape == (0, D)


def _dispatch_rank(rank: int, world: int, port: int) -> dict:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    ctx = ParallelContext(rank, world, dist.group.WORLD)
    T = TOKENS[rank]
    out: dict = {}
    with torch.inference_mode():
        for name, dtype, fp8_experts, cfg, tol in (
            ("fp32", torch.float32, False, DispatchConfig(), 1e-6),
            ("fp8-payload", torch.float32, True, DispatchConfig(fp8_payload=True), 1e-6),
            ("bf16-combine", torch.float32, False, DispatchConfig(combine_dtype=torch.bfloat16), 1e-2),
            ("bf16", torch.bfloat16, False, DispatchConfig(), 2e-2),
        ):
            all_ex = experts(dtype, fp8_experts)
            mine = {e: all_ex[e] for e in HOSTS[rank]}
            metrics = WorkerMetrics(rank=rank)
            d = Dispatcher(ctx, emap(), config=cfg, metrics=metrics)
            x, ids, w = routing(rank, T)
            x = x.to(dtype)
            got = d(x, ids, w, mine, LAYER)
            xin = act_quant_dequant(x).to(dtype) if cfg.fp8_payload else x
            ref = run_local_experts(xin, ids, w, all_ex, LAYER)
            err = rel(got, ref) if T else 0.0
            d.flush_metrics()
            received = {}
            for s in metrics.registry.collect():
                if s.name == EXPERT_TOKENS.removesuffix("_total"):
                    for smp in s.samples:
                        if smp.name == EXPERT_TOKENS:
                            key = (int(smp.labels["expert"]), smp.labels["source"])
                            received[key] = received.get(key, 0) + int(smp.value)
            sent_to = d.sent_to[LAYER].tolist()
            out[name] = {
                "err": err, "tol": tol, "shape": tuple(got.shape), "dtype": str(got.dtype),
                "received": received, "sent_to": sent_to, "stats": vars(d.stats).copy(),
                "row_bytes": d.layout(D, K, dtype).row_bytes,
                "expert0_dest": [int(r) for r, c in enumerate(sent_to) if c] if rank == 1 else None,
            }
        # Two exchanges in flight at once, advanced in alternation (the overlap schedule).
        all_ex = experts(torch.float32, False)
        d = Dispatcher(ctx, emap())
        (xa, ia, wa), (xb, ib, wb) = routing(rank, T, 1), routing(rank, T + 3, 2)
        results = {}

        def mb(tag, x, ids, w):
            ex = d.start(x, ids, w, {e: all_ex[e] for e in HOSTS[rank]}, LAYER)
            for _ in range(3):
                yield
                ex.advance()
            results[tag] = ex.result()

        interleave([mb("a", xa, ia, wa), mb("b", xb, ib, wb)])
        ea = rel(results["a"], run_local_experts(xa, ia, wa, all_ex, LAYER)) if T else 0.0
        eb = rel(results["b"], run_local_experts(xb, ib, wb, all_ex, LAYER))
        out["interleaved"] = {"err": max(ea, eb), "tol": 1e-6}
        # Replica choice of expert 0 only: rank 1 (node a) splits between ranks 0 and 1, rank 3
        # (node b) keeps them on its own replica.
        x0, _, w0 = routing(rank, 40, 3)
        d0 = Dispatcher(ctx, emap())
        d0(x0, torch.zeros(40, 1, dtype=torch.long), w0[:, :1], {e: all_ex[e] for e in HOSTS[rank]}, LAYER)
        out["expert0_sent_to"] = d0.sent_to[LAYER].tolist()
        out["capacity"] = _capacity_modes(rank, ctx, all_ex)
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    dist.destroy_process_group()
    return gathered


# Batches of the adaptive run per rank: the first exchange starts at capacity 1 (all overflow),
# the second has the same sizes (fits what was learnt), the third is twice as large (overflows),
# the fourth is skewed (rank 1 has most tokens: the padding rule falls back to capacity 1), the
# fifth is tiny with ranks without tokens.
ADAPTIVE_T = ((20, 24, 18, 22), (20, 24, 18, 22), (40, 48, 36, 44), (7, 33, 0, 5), (1, 0, 0, 2))


def _capacity_modes(rank: int, ctx: ParallelContext, all_ex: dict) -> dict:
    """The same exchanges under several capacities: results, overflow rounds, learnt capacities."""
    mine = {e: all_ex[e] for e in HOSTS[rank]}
    res: dict = {"equal": [], "err": [], "overflow": {}, "learnt": [], "pad_ok": [], "biggest": [], "rows": []}
    batches = [routing(rank, Ts[rank], 10 + i) for i, Ts in enumerate(ADAPTIVE_T)]
    exact = Dispatcher(ctx, emap(), config=DispatchConfig(capacity=1))
    ref = []
    for x, ids, w in batches:
        ex = exact.start(x, ids, w, mine, LAYER)
        while not ex.advance():
            pass
        ref.append(ex.result())
        res["biggest"].append(max(ex.send_counts))  # this rank's largest bucket
        res["rows"].append(sum(ex.send_counts))
    res["overflow"]["exact"] = exact.stats.overflow_rounds
    for name, cfg in (("small", DispatchConfig(capacity=3)), ("large", DispatchConfig(capacity=64)),
                      ("adaptive", DispatchConfig())):
        d = Dispatcher(ctx, emap(), config=cfg)
        for i, (x, ids, w) in enumerate(batches):
            got = d(x, ids, w, mine, LAYER)
            res["equal"].append((name, i, torch.equal(got, ref[i])))
            res["err"].append(rel(got, run_local_experts(x, ids, w, all_ex, LAYER)) if len(x) else 0.0)
            if name == "adaptive":
                res["learnt"].append(d.capacity[LAYER])
        res["overflow"][name] = d.stats.overflow_rounds
        if name == "large":  # wire bytes: 3 peers x 64 rows x (row + header) per exchange
            st, lay = d.stats, d.layout(D, K, torch.float32)
            res["pad_ok"].append(st.dispatch_bytes + st.pad_bytes == len(batches) * 3 * 64 * lay.wire_bytes)
    # Two exchanges in flight, one overflowing the learnt capacity and one not, buffers reused.
    d = Dispatcher(ctx, emap())
    for sizes in ((6, 6), (6, 6), (6, 30), (30, 6)):
        (xa, ia, wa), (xb, ib, wb) = (routing(rank, sizes[0] + rank, 20), routing(rank, sizes[1] + rank, 21))
        results = {}

        def mb(tag, x, ids, w, d=d, results=results):
            ex = d.start(x, ids, w, mine, LAYER)
            for _ in range(3):
                yield
                ex.advance()
            results[tag] = ex.result()

        interleave([mb("a", xa, ia, wa), mb("b", xb, ib, wb)])
        res["err"].append(rel(results["a"], run_local_experts(xa, ia, wa, all_ex, LAYER)))
        res["err"].append(rel(results["b"], run_local_experts(xb, ib, wb, all_ex, LAYER)))
    res["overflow"]["interleaved"] = d.stats.overflow_rounds
    return res


@pytest.fixture(scope="module")
def four_ranks():
    return spawn_ranks(4, _dispatch_rank, timeout_s=240)


def test_dispatch_matches_local_compute_on_4_ranks(four_ranks):
    for rank, res in enumerate(four_ranks):
        for name in ("fp32", "fp8-payload", "bf16-combine", "bf16", "interleaved"):
            r = res[name]
            assert r["err"] <= r["tol"], (rank, name, r["err"])
        assert res["fp32"]["shape"] == (TOKENS[rank], D)
        assert res["bf16"]["dtype"] == "torch.bfloat16" and res["fp32"]["dtype"] == "torch.float32"


def test_bytes_and_pairs_add_up(four_ranks):
    for rank, res in enumerate(four_ranks):
        for name in ("fp32", "fp8-payload", "bf16"):
            st, sent_to = res[name]["stats"], res[name]["sent_to"]
            assert st["pairs"] == TOKENS[rank] * K == sum(sent_to)
            assert st["offrank_pairs"] == sum(sent_to) - sent_to[rank]
            assert st["dispatch_bytes"] == st["offrank_rows"] * res[name]["row_bytes"]
            assert st["rows"] <= st["pairs"]  # a token goes once to each rank, whatever it hosts there
    # Row sizes: D values + K ids + K weights; e4m3 + ceil(200/128) = 2 scales for FP8.
    assert four_ranks[0]["fp32"]["row_bytes"] == 4 * D + 8 * K
    assert four_ranks[0]["bf16"]["row_bytes"] == 2 * D + 8 * K
    assert four_ranks[0]["fp8-payload"]["row_bytes"] == D + 4 * 2 + 8 * K


def test_received_tokens_are_counted_per_expert_and_source(four_ranks):
    for name in ("fp32", "fp8-payload"):
        sent_total = sum(r[name]["stats"]["pairs"] for r in four_ranks)
        recv = [r[name]["received"] for r in four_ranks]
        assert sum(sum(c.values()) for c in recv) == sent_total
        for rank, counts in enumerate(recv):
            assert {e for e, _ in counts} <= set(HOSTS[rank])  # only experts the rank hosts
        # Pairs from a rank's own node are 'node', others 'remote': check against the senders.
        same = sum(r[name]["sent_to"][d] for s, r in enumerate(four_ranks) for d in range(4) if NODES[d] == NODES[s])
        assert sum(c for counts in recv for (e, src), c in counts.items() if src == "node") == same


def test_replicas_are_chosen_on_the_own_node_and_balanced(four_ranks):
    by_rank = [r["expert0_sent_to"] for r in four_ranks]
    assert by_rank[1][2] == 0 and by_rank[1][3] == 0 and abs(by_rank[1][0] - by_rank[1][1]) <= 1
    assert by_rank[1][0] + by_rank[1][1] == 40
    assert by_rank[3] == [0, 0, 0, 40]  # node b's replica is rank 3 itself
    assert by_rank[2] == [0, 0, 0, 40]  # rank 2 (node b) hosts nothing: node b's replica


def test_capacity_buckets_overflow_and_exact_counts_agree(four_ranks):
    for rank, res in enumerate(four_ranks):
        cap = res["capacity"]
        assert all(eq for _, _, eq in cap["equal"]), (rank, [c for c in cap["equal"] if not c[2]])
        assert max(cap["err"]) < 1e-6
        assert cap["pad_ok"] == [True]
        # Overflow is decided for the whole group: every rank counts the same rounds.
        assert cap["overflow"] == four_ranks[0]["capacity"]["overflow"]
        assert cap["learnt"] == four_ranks[0]["capacity"]["learnt"]
    # The second round runs exactly when some rank's bucket for some rank exceeds the capacity.
    biggest = [max(r["capacity"]["biggest"][i] for r in four_ranks) for i in range(len(ADAPTIVE_T))]
    rows = [sum(r["capacity"]["rows"][i] for r in four_ranks) for i in range(len(ADAPTIVE_T))]
    ov = four_ranks[0]["capacity"]["overflow"]
    assert ov["exact"] == sum(b > 1 for b in biggest) >= 3
    assert ov["small"] == sum(b > 3 for b in biggest) >= 1  # rank 1's 33 tokens overflow capacity 3
    assert ov["large"] == 0 and max(biggest) <= 64
    # Adaptive: capacity 1 first, then learnt from each exchange's headers: the largest bucket x
    # 1.25 + 1, at most the most tokens of a rank, and 1 when W * W * C > 3 x all rows.
    learnt = four_ranks[0]["capacity"]["learnt"]
    expect = []
    for i, Ts in enumerate(ADAPTIVE_T):
        c = min(math.ceil(biggest[i] * 1.25) + 1, max(Ts))
        expect.append(max(1, c if 16 * c <= 3 * rows[i] else 1))
    assert learnt == expect
    assert learnt[0] > 1 and learnt[2] > learnt[1] and learnt[3] == 1  # both branches ran
    assert ov["adaptive"] == sum(b > c for b, c in zip(biggest, [1, *learnt[:-1]], strict=True)) >= 2
    assert ov["interleaved"] >= 2  # both micro-batches start at capacity 1


def test_pool_reuses_buffers_and_never_shares_one():
    pool = _Pool(torch.device("cpu"))
    held_a: list = []
    held_b: list = []
    a = pool.take((100, 8), torch.float32, held_a)
    b = pool.take((100, 8), torch.float32, held_b)
    assert a.data_ptr() != b.data_ptr()
    ptr = a.data_ptr()
    pool.give(held_a)
    assert held_a == []
    c = pool.take((50, 8), torch.bfloat16, held_a)  # smaller: the freed buffer again
    assert c.data_ptr() == ptr and c.shape == (50, 8) and c.dtype == torch.bfloat16
    assert pool.take((0, 8), torch.float32, held_a).numel() == 0


def test_segments_and_config_checks():
    idx = _segments(torch.tensor([10, 0, 5]), torch.tensor([2, 0, 3]))
    assert idx.tolist() == [10, 11, 5, 6, 7]
    with pytest.raises(ValueError):
        DispatchConfig(capacity=0)
