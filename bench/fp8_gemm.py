"""Decode-sized blockwise FP8 GEMMs on a CUDA GPU: our Triton kernel (`fp8_triton.fp8_gemm`, a sweep
of tile sizes and K splits) against cuBLAS (`torch._scaled_mm`) and against a plain bf16 matmul of
the same (dequantized) weight, at DeepSeek-V3's expert shapes.

Every timing is of CUDA-graph replays of a whole FP8 linear (the one-kernel activation quantizer,
then the GEMM) or of the bf16 matmul: the GPU's own time, no launch overhead. Each Triton
configuration is first checked against the exact emulated product (relative error < 8e-3, bf16
output); a configuration that fails is reported and never counted. Last, the whole SwiGLU expert
(w1, w3: 2048 x 7168; w2: 7168 x 2048) is timed with the best configuration per shape and token
count against the cuBLAS path and against bf16.

    PYTHONPATH=worker python bench/fp8_gemm.py [--tokens 1,16,64,128,256,512] [--budget-s 150]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
import torch.nn.functional as F

from moe_worker import fp8
from moe_worker.fp8_triton import act_quant_padded, fp8_gemm

SHAPES = {"w1/w3 2048x7168": (2048, 7168), "w2 7168x2048": (7168, 2048)}


def graph_time_us(fn, *args, replays: int = 50) -> float:
    """Mean time of `replays` CUDA-graph replays of `fn(*args)`, in microseconds."""
    fn(*args)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*args)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bf16_linear(x, w16):
    return x @ w16.t()


def cublas_linear(x, q, s):
    xq, xs = act_quant_padded(x, None, fp8.SCALED_MM_ROWS, fp8.ACT_AMAX_FLOOR, fp8.FP8_MAX)
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.t(), out_dtype=torch.bfloat16)
    return y[: x.shape[0]]


def triton_linear(x, q, s, cfg):
    xq, xs = act_quant_padded(x, None, cfg["block_m"], fp8.ACT_AMAX_FLOOR, fp8.FP8_MAX)
    return fp8_gemm(xq, xs, q, s, x.shape[0], torch.bfloat16, **cfg)


def expert(linear, x, w13, w2):
    """SwiGLU expert from one linear function; w13 is used for both w1 and w3 (same shape)."""
    return linear(F.silu(linear(x, *w13)) * linear(x, *w13), *w2)


def configs(T: int):
    for bm, bn, sk in itertools.product((16, 64), (32, 64), (1, 2, 4, 8)):
        if bm > 16 and T <= 16:
            continue
        yield {"block_m": bm, "block_n": bn, "split_k": sk, "num_warps": 4, "num_stages": 4}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,16,64,128,256,512")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop sweeping after this long")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    tokens = [int(t) for t in a.tokens.split(",")]
    t0 = time.monotonic()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  (us per linear, CUDA-graph replays)")
    weights, best = {}, {}
    for name, (N, K) in SHAPES.items():
        g = torch.Generator().manual_seed(N)
        q, s = fp8.quantize_weight(torch.randn(N, K, generator=g) / K**0.5)
        q, s = q.cuda(), s.cuda()
        w16 = fp8.dequantize_weight(q, s, torch.bfloat16)
        weights[name] = (q, s, w16)
        print(f"{name}: {'T':>4} {'bf16':>7} {'cuBLAS':>7} {'x bf16':>6} | {'Triton':>7} {'x bf16':>6} {'x cuBLAS':>8}  best config")
        for T in tokens:
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
            ref = fp8.linear(x.float(), q, s, impl="emulate")
            t16 = graph_time_us(bf16_linear, x, w16)
            tcb = graph_time_us(cublas_linear, x, q, s)
            found = None
            for cfg in configs(T):
                if time.monotonic() - t0 > a.budget_s:
                    break
                try:
                    err = rel(triton_linear(x, q, s, cfg), ref)
                except Exception as e:  # a configuration Triton cannot build on this GPU
                    print(f"    {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                if not err < 8e-3:
                    print(f"    {cfg}: WRONG, relative error {err:.3g}")
                    continue
                t = graph_time_us(triton_linear, x, q, s, cfg)
                if found is None or t < found[0]:
                    found = (t, cfg)
            if found is None:
                print(f"{'':>{len(name) + 1}} {T:>4} {t16:7.1f} {tcb:7.1f} {tcb / t16:6.2f} | (no configuration ran)")
                continue
            tt, cfg = found
            best[(name, T)] = cfg
            short = f"BM{cfg['block_m']} BN{cfg['block_n']} SK{cfg['split_k']}"
            print(f"{'':>{len(name) + 1}} {T:>4} {t16:7.1f} {tcb:7.1f} {tcb / t16:6.2f} | {tt:7.1f} {tt / t16:6.2f} {tt / tcb:8.2f}  {short}", flush=True)

    (q1, s1, w1), (q2, s2, w2) = weights["w1/w3 2048x7168"], weights["w2 7168x2048"]
    print("\nSwiGLU expert (w1, w3, w2), us:  T    bf16  FP8 cuBLAS  x bf16 | FP8 Triton best  x bf16")
    for T in tokens:
        c1, c2 = best.get(("w1/w3 2048x7168", T)), best.get(("w2 7168x2048", T))
        if c1 is None or c2 is None:
            continue
        x = torch.randn(T, 7168, device="cuda", dtype=torch.bfloat16)
        t16 = graph_time_us(expert, bf16_linear, x, (w1,), (w2,))
        tcb = graph_time_us(expert, cublas_linear, x, (q1, s1), (q2, s2))
        ttr = graph_time_us(expert, triton_linear, x, (q1, s1, c1), (q2, s2, c2))
        print(f"{'':>32} {T:>4} {t16:7.1f} {tcb:11.1f} {tcb / t16:7.2f} | {ttr:15.1f} {ttr / t16:7.2f}", flush=True)
    print(f"(w3 timed with w1's weight: same shape; {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
