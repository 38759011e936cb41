"""Dispatch and combine: one process against `run_local_experts`, and 4 gloo ranks with replicas,
a rank without experts, a rank without tokens, FP8 payload, bf16 combine, two interleaved
exchanges, and the per-expert token counts the receiving ranks export.

Tolerances (relative to the largest |output|): fp32 payload and combine reorder fp32 sums only
(< 1e-6); an FP8 payload is compared with the reference on the same 1x128-quantized input, so it
is exact up to summation order too; a bf16 combine rounds each partial sum once (2**-8 = 4e-3).
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from moe_worker.dispatch import DispatchConfig, Dispatcher, interleave
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
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    dist.destroy_process_group()
    return gathered


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
