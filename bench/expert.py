"""One DeepSeek-V3 routed expert (SwiGLU, hidden 7168, expert width 2048): FP8 vs bf16.

For each token count, times the FP8 expert (`moe_worker.model.MLP` with e4m3 weights and
128x128 `weight_scale_inv`, through `fp8.linear`) against the same expert with the dequantized
weights in bf16 and plain `torch.matmul`. Runs alternate (bf16, fp8 paths, bf16, ...) so drift on a
shared machine hits both alike; the table gives medians and the median of per-round ratios.

CPU target (issue 6): FP8 time <= 1.3x bf16 while holding half the bytes. On an AVX512-BF16 CPU
`weight_only` is our C code (`moe_worker.fp8_cpu`): fused kernels up to 16 tokens and C-dequantized
bf16 tiles into PyTorch's GEMM above; `MOE_FP8_CPU_KERNEL=0` times the PyTorch-only path. On a CUDA device the
"scaled_mm" path is timed as well (instead of the emulated CPU reference) and reported in TFLOPS
against 1979 (H100/H200 dense FP8 peak); GPU times are CUDA-event times of back-to-back calls
(about 20 ms per timing), so launch overhead is included, as an eager rank pays it; `--graphs`
times CUDA-graph replays instead (the GPU's own time, as a rank that captures its decode step).

    PYTHONPATH=worker python bench/expert.py [--tokens 1,16,128,512] [--rounds 7] [--impls emulate,weight_only]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from moe_worker import fp8, fp8_cpu
from moe_worker.model import MLP

HIDDEN, INTER = 7168, 2048
FP8_PEAK_TFLOPS = 1979.0


def build(device: torch.device, seed: int = 0):
    """FP8 expert module and the bf16 weights of the same (dequantized) expert."""
    g = torch.Generator().manual_seed(seed)
    expert = MLP(HIDDEN, INTER, dtype=torch.bfloat16, fp8=True, device=device)
    bf16 = {}
    for name, (out_f, in_f) in {"w1": (INTER, HIDDEN), "w3": (INTER, HIDDEN), "w2": (HIDDEN, INTER)}.items():
        w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
        q, s = fp8.quantize_weight(w)
        lin = getattr(expert, name)
        with torch.no_grad():
            lin.weight.copy_(q)
            lin.scale.copy_(s)
        bf16[name] = fp8.dequantize_weight(q, s, torch.bfloat16).to(device)
    return expert, bf16


def bf16_expert(x, w):
    """The baseline: plain bf16 torch.matmul SwiGLU."""
    return torch.matmul(F.silu(torch.matmul(x, w["w1"].t())) * torch.matmul(x, w["w3"].t()), w["w2"].t())


def timed(fn, device, reps: int = 1) -> float:
    """Seconds per call of `fn`, over `reps` back-to-back calls (CUDA: device events around them)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def graphed(fn, device):
    """`fn` captured once in a CUDA graph; the returned callable replays it (no host work per call).
    A path that syncs with the host cannot be captured: it is timed eagerly, and says so."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        print(f"  (not graph-capturable, timed eagerly: {str(e).splitlines()[0][:100]})")
        torch.cuda.synchronize(device)
        return fn
    return graph.replay


def reps_for(fn, device, target_s: float) -> int:
    """Calls per timing so one timing lasts about `target_s` (1 on CPU: calls there are long)."""
    if device.type != "cuda":
        return 1
    return max(1, min(1000, int(target_s / max(timed(fn, device, 3), 1e-7))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,16,128,512")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--impls", default=None, help="fp8 paths to time (default: emulate,weight_only [+scaled_mm on CUDA])")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--graphs", action="store_true", help="CUDA: time CUDA-graph replays (GPU time, no launch overhead)")
    p.add_argument("--decode-gemm", choices=fp8.DECODE_GEMMS, default="cublas",
                   help="CUDA scaled_mm path up to fp8.DECODE_ROWS tokens: cuBLAS, our Triton kernel, or the faster")
    a = p.parse_args(argv)
    fp8.set_decode_gemm(a.decode_gemm)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger(fp8.__name__).setLevel(logging.INFO)  # its decode-GEMM choices, with their times
    device = torch.device(a.device)
    impls = a.impls.split(",") if a.impls else ["emulate", "weight_only"]
    if a.impls is None and fp8.scaled_mm_supported(device):
        impls = ["scaled_mm", "weight_only"]  # the emulated path is a CPU reference
    tokens = [int(t) for t in a.tokens.split(",")]

    expert, w16 = build(device)
    fp8_bytes = sum(t.numel() * t.element_size() for t in expert.parameters())
    bf16_bytes = sum(t.numel() * t.element_size() for t in w16.values())
    if a.graphs and device.type != "cuda":
        p.error("--graphs needs a CUDA device")
    mode = ", CUDA-graph replays" if a.graphs else (", eager calls" if device.type == "cuda" else "")
    print(f"device: {device} ({torch.get_num_threads()} threads{mode})  torch {torch.__version__}  "
          f"decode GEMM {a.decode_gemm}")
    print(
        f"bytes per expert: bf16 {bf16_bytes / 1e6:.2f} MB, fp8 {fp8_bytes / 1e6:.2f} MB "
        f"(weights + weight_scale_inv) = {fp8_bytes / bf16_bytes:.4f}x"
    )
    head = f"{'tokens':>6} {'bf16 ms':>9} {'bf16 tok/s':>11}"
    for impl in impls:
        head += f" | {impl + ' ms':>16} {'tok/s':>9} {'ratio':>6}"
        if device.type == "cuda":
            head += f" {'TFLOPS':>7} {'%peak':>6}"
    print(head)
    worst: dict[str, float] = {}
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16).to(device)
            runs = {"bf16": lambda x=x: bf16_expert(x, w16)}
            for impl in impls:

                def run(impl=impl, x=x):
                    expert.w1.impl = expert.w2.impl = expert.w3.impl = impl
                    return expert(x)

                runs[impl] = run
            for fn in runs.values():  # warm-up
                fn()
            if a.graphs:
                runs = {k: graphed(fn, device) for k, fn in runs.items()}
            reps = {k: reps_for(fn, device, 0.02) for k, fn in runs.items()}
            times: dict[str, list[float]] = {k: [] for k in runs}
            ratios: dict[str, list[float]] = {k: [] for k in impls}
            for _ in range(a.rounds):
                t16 = timed(runs["bf16"], device, reps["bf16"])
                times["bf16"].append(t16)
                for impl in impls:
                    t = timed(runs[impl], device, reps[impl])
                    times[impl].append(t)
                    ratios[impl].append(t / t16)
            b = statistics.median(times["bf16"])
            line = f"{T:>6} {b * 1e3:>9.3f} {T / b:>11.0f}"
            for impl in impls:
                t = statistics.median(times[impl])
                r = statistics.median(ratios[impl])
                worst[impl] = max(worst.get(impl, 0.0), r)
                line += f" | {t * 1e3:>16.3f} {T / t:>9.0f} {r:>5.2f}x"
                if device.type == "cuda":
                    tflops = 2 * 3 * T * HIDDEN * INTER / t / 1e12
                    line += f" {tflops:>7.1f} {100 * tflops / FP8_PEAK_TFLOPS:>5.1f}%"
            print(line, flush=True)
    pool = getattr(fp8._SCRATCH, "pool", {})
    scratch = sum(b.numel() * b.element_size() for b in pool.values())
    slots = ", ".join(f"{k[0]} {b.numel() * b.element_size() / 1e6:.1f}" for k, b in pool.items())
    resident = sum(t.numel() * t.element_size() for t in expert.parameters())
    print(
        f"after the runs the FP8 expert still holds {resident / 1e6:.2f} MB; the CPU paths share "
        f"{scratch / 1e6:.1f} MB of per-thread decode scratch ({slots} MB; whatever the number of experts)"
    )
    if device.type == "cpu" and fp8_cpu.kernel() is not None:
        print(
            f"weight_only here: fused C kernels up to {fp8_cpu.ROUNDED_MAX_TOKENS} tokens (no scratch; exact "
            f"products up to {fp8_cpu.MAX_TOKENS}), above that tiles of {fp8.DEQUANT_TILE_ROWS} dequantized rows "
            "(the 'dq' scratch) into PyTorch's GEMM"
        )
    else:
        xq = max(max(1, fp8.WO_TILE_ELEMENTS // (k * 128)) * fp8._WO_ACT_SIDE_TOKENS * k * 2 for k in (HIDDEN, INTER))
        print(
            "per call, weight_only also allocates its (T, out) output and, at T <= "
            f"{fp8._WO_ACT_SIDE_TOKENS}, the block-scaled activations of one tile: at most {xq / 1e6:.1f} MB"
        )
    for impl, r in worst.items():
        verdict = "meets" if r <= 1.3 else "misses"
        print(f"{impl}: worst ratio {r:.2f}x -> {verdict} the <= 1.3x target at half the bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
