"""Expert-parallel dispatch + combine on local gloo ranks: bytes, time against a bare all-to-all,
and what two overlapped micro-batches buy.

Setup per world size W (8, 16): one logical expert per rank (DeepSeek's decode layout), top-k =
W/2 (so 8 at EP16, as DeepSeek-V3), uniform random routing, T tokens per rank, activations in
bf16 (payload and combine bf16; `--fp8` sends e4m3 + 1x128 scales). Ranks on nodes of 8.

Columns (all times: median over iterations of the slowest rank, all ranks start together):
- disp B/tok, comb B/tok: bytes this layer sent to other ranks per token (payload + 8K bytes of
  ids and weights per row; combine rows are D bf16) and `xmin`: against the minimum, off-rank
  (token, expert) pairs x D x 2 bytes (top-k x hidden x dtype size, off-rank pairs only).
- exch ms: one layer's counts exchange + rows + (identity) experts + partial sums back + sum.
- bare ms: one `all_to_all_single` moving the same bytes per rank pair in one call; `x` = exch /
  bare (target: within 1.3x). bare2 ms: the two calls any dispatch + combine needs at least (the
  rows out, then the sums back, bare); `x2` = exch / bare2: what counts, packing and compute add.
- overlap: a step of L layers in two micro-batches with synthetic compute per layer per micro-batch
  (a bf16 matmul chain sized so compute ~ communication: attention before dispatch, the shared
  expert while rows are in flight; the matmul count is tuned until C ~ M). C = compute only, M =
  exchanges only, O = interleaved; eff = (C + M) / O (target > 1.3 where C ~ M); seq = both
  micro-batches with compute and exchanges but not interleaved (overlap off); seq/ovl its speedup.

    PYTHONPATH=worker python bench/dispatch.py [--ranks 8,16] [--tokens 16,128,1024] [--hidden 1024]
        [--iters 7] [--layers 4] [--fp8] [--no-overlap]

CPU caveat: gloo's all-to-all runs in its own threads, so overlap needs idle cores; with W ranks
on a machine of fewer cores every thread competes for the same cores and the ratio measures that.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from moe_worker.dispatch import DispatchConfig, Dispatcher, interleave
from moe_worker.expertmap import ExpertMap
from moe_worker.launch import spawn_ranks
from moe_worker.model import ParallelContext

LAYER = 0


class Identity(nn.Module):
    def forward(self, x):
        return x


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _timed(fn, iters: int) -> float:
    """Median over iterations of the slowest rank's time of fn()."""
    out = []
    for _ in range(iters):
        dist.barrier()
        t = time.perf_counter()
        fn()
        out.append(_slowest(time.perf_counter() - t))
    return statistics.median(out)


def _bench_rank(rank: int, world: int, port: int, opts: dict) -> list[dict] | None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    ctx = ParallelContext(rank, world, dist.group.WORLD)
    E, K, D = world, max(1, min(8, world // 2)), opts["hidden"]
    emap = ExpertMap(0, tuple(f"node-{r // 8}" for r in range(world)), (LAYER,), (tuple((r,) for r in range(world)),), E)
    d = Dispatcher(ctx, emap, config=DispatchConfig(fp8_payload=opts["fp8"]))
    experts = {rank: Identity()}
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(rank)
    rows = []
    with torch.inference_mode():
        for T in opts["tokens"]:
            x = torch.randn(T, D, generator=g).to(dtype)
            ids = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
            w = torch.rand(T, K, generator=g)

            def exchange(x=x, ids=ids, w=w):
                ex = d.start(x, ids, w, experts, LAYER)
                while not ex.advance():
                    pass
                return ex

            for _ in range(2):
                ex = exchange()
            d.stats.reset()
            ex = exchange()
            st = d.stats
            comb_row = D * 2
            totals = _sum([T, st.offrank_pairs, st.dispatch_bytes, st.combine_bytes])
            t_exch = _timed(exchange, opts["iters"])

            # The same bytes per rank pair in one bare all_to_all_single.
            row_b = d.layout(D, K, dtype).row_bytes
            send = [ex.send_counts[j] * row_b + ex.recv_counts[j] * comb_row for j in range(world)]
            recv = [ex.recv_counts[j] * row_b + ex.send_counts[j] * comb_row for j in range(world)]
            sbuf = torch.empty(sum(send), dtype=torch.uint8)
            rbuf = torch.empty(sum(recv), dtype=torch.uint8)

            def bare(rbuf=rbuf, sbuf=sbuf, recv=recv, send=send):
                dist.all_to_all_single(rbuf, sbuf, recv, send)

            bare()
            t_bare = _timed(bare, opts["iters"])
            # And the irreducible round trip: dispatch bytes out, then combine bytes back.
            s1 = [ex.send_counts[j] * row_b for j in range(world)]
            r1 = [ex.recv_counts[j] * row_b for j in range(world)]
            s2 = [ex.recv_counts[j] * comb_row for j in range(world)]
            r2 = [ex.send_counts[j] * comb_row for j in range(world)]
            bufs = [torch.empty(sum(v), dtype=torch.uint8) for v in (r1, s1, r2, s2)]

            def bare2(bufs=bufs, s1=s1, r1=r1, s2=s2, r2=r2):
                dist.all_to_all_single(bufs[0], bufs[1], r1, s1)
                dist.all_to_all_single(bufs[2], bufs[3], r2, s2)

            bare2()
            t_bare2 = _timed(bare2, opts["iters"])
            tok, pairs, db, cb = totals
            minimum = pairs * D * 2 / tok
            row = {"W": world, "K": K, "T": T, "D": D, "disp_B": db / tok, "comb_B": cb / tok,
                   "disp_x": db / tok / minimum if minimum else 0.0, "comb_x": cb / tok / minimum if minimum else 0.0,
                   "exch_ms": t_exch * 1e3, "bare_ms": t_bare * 1e3, "bare2_ms": t_bare2 * 1e3}
            if opts["overlap"] and T >= 2:
                row.update(_overlap(d, experts, x, ids, w, opts, t_exch))
            rows.append(row)
    dist.destroy_process_group()
    return rows if rank == 0 else None


def _overlap(d: Dispatcher, experts, x, ids, w, opts: dict, t_exch: float) -> dict:
    """Two micro-batches of T/2 tokens through `layers` layers: compute only, exchanges only,
    both back to back, and both interleaved."""
    T, D = x.shape
    half = T // 2
    mbs = [(x[:half], ids[:half], w[:half]), (x[half:], ids[half:], w[half:])]
    L = opts["layers"]
    wmat = torch.randn(D, D, dtype=x.dtype) / D**0.5

    def compute(h, reps):
        for _ in range(reps):
            h = torch.tanh(h @ wmat)
        return h

    reps = 2

    def mb_gen(h, i, w_, do_compute, do_comm):
        for _ in range(L):
            if do_compute:
                h = compute(h, reps // 2)
            if do_comm:
                ex = d.start(h, i, w_, experts, LAYER)
                yield
                ex.advance()
            if do_compute:
                compute(h, reps // 2)
            if do_comm:
                yield
                ex.advance()
                yield
                ex.advance()
                h = ex.result()

    def run(do_compute, do_comm, overlapped):
        gens = [mb_gen(*mb, do_compute, do_comm) for mb in mbs]
        if overlapped:
            interleave(gens)
        else:
            for gen in gens:
                interleave([gen])

    it = opts["iters"]
    comm = _timed(lambda: run(False, True, False), it)
    for _ in range(2):  # size the compute so that C ~ M (half before dispatch, half while rows fly)
        comp = _timed(lambda: run(True, False, False), it)
        reps = max(2, round(reps * comm / comp / 2) * 2)
    comp = _timed(lambda: run(True, False, False), it)
    seq = _timed(lambda: run(True, True, False), it)
    ovl = _timed(lambda: run(True, True, True), it)
    return {"C_ms": comp * 1e3, "M_ms": comm * 1e3, "seq_ms": seq * 1e3, "ovl_ms": ovl * 1e3,
            "eff": (comp + comm) / ovl, "speedup": seq / ovl, "reps": reps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="8,16")
    p.add_argument("--tokens", default="16,128,1024", help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--layers", type=int, default=4, help="layers of the overlap step")
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch payload")
    p.add_argument("--no-overlap", dest="overlap", action="store_false")
    a = p.parse_args(argv)
    opts = {"tokens": [int(t) for t in a.tokens.split(",")], "hidden": a.hidden, "iters": a.iters,
            "layers": a.layers, "fp8": a.fp8, "overlap": a.overlap}
    print(f"dispatch bench: hidden {a.hidden}, bf16 activations, {'fp8' if a.fp8 else 'bf16'} payload, bf16 combine; "
          f"gloo, 1 torch thread per rank, {os.cpu_count()} CPUs; ranks {a.ranks}, tokens/rank {a.tokens}")
    head = (f"{'W':>3} {'K':>2} {'T':>5} | {'disp B/tok':>10} {'xmin':>5} {'comb B/tok':>10} {'xmin':>5} | "
            f"{'exch ms':>8} {'bare ms':>8} {'x':>5} {'bare2 ms':>8} {'x2':>5}")
    if a.overlap:
        head += f" | {'C ms':>7} {'M ms':>7} {'seq ms':>7} {'ovl ms':>7} {'eff':>5} {'seq/ovl':>7}"
    print(head)
    print("-" * len(head))
    for world in (int(r) for r in a.ranks.split(",")):
        t = time.monotonic()
        rows = spawn_ranks(world, _bench_rank, (opts,), timeout_s=3600)
        for r in rows:
            line = (f"{r['W']:>3} {r['K']:>2} {r['T']:>5} | {r['disp_B']:>10.0f} {r['disp_x']:>5.2f} "
                    f"{r['comb_B']:>10.0f} {r['comb_x']:>5.2f} | {r['exch_ms']:>8.2f} {r['bare_ms']:>8.2f} "
                    f"{r['exch_ms'] / r['bare_ms']:>5.2f} {r['bare2_ms']:>8.2f} {r['exch_ms'] / r['bare2_ms']:>5.2f}")
            if "eff" in r:
                line += (f" | {r['C_ms']:>7.1f} {r['M_ms']:>7.1f} {r['seq_ms']:>7.1f} {r['ovl_ms']:>7.1f} "
                         f"{r['eff']:>5.2f} {r['speedup']:>7.2f}")
            print(line, flush=True)
        print(f"  ({world} ranks: {time.monotonic() - t:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
