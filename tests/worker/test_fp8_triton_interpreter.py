"""The Triton kernels of the CUDA FP8 path, run on the CPU by Triton's interpreter.

The interpreter runs the kernels' indexing, masks, K splits and scale layouts exactly as written,
so this catches those mistakes without a GPU. Its own fp32 -> e4m3 conversion is wrong at binade
carries (126.1 -> 64), so the e4m3 codes `act_quant_padded` writes are checked only on a GPU
(test_worker_cuda.py); here the GEMM gets its activations from `fp8.act_quant`. The interpreter
must be chosen before Triton compiles anything, hence a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from moe_worker import fp8
    from moe_worker.fp8_triton import act_quant_padded, fp8_gemm

    g = torch.Generator().manual_seed(0)
    for T, N, K, split_k, block_n in [(1, 64, 256, 1, 32), (5, 100, 384, 2, 64), (17, 192, 640, 4, 32),
                                      (33, 130, 512, 3, 64), (9, 70, 300, 2, 32)]:
        q, s = fp8.quantize_weight(torch.randn(N, K, generator=g) / K**0.5)
        x = torch.randn(T, K, generator=g)
        xq, xs = fp8.act_quant(F.pad(x, (0, 0, 0, -T % 16)))
        xs = xs.t().contiguous().t()  # outer-dim-major, as act_quant_padded writes them
        ref = fp8.linear(x, q, s, impl="emulate")
        for dtype in (torch.float32, torch.bfloat16):
            y = fp8_gemm(xq, xs, q, s, T, dtype, split_k=split_k, block_n=block_n)
            assert y.shape == (T, N) and y.dtype == dtype, (y.shape, y.dtype)
            err = float((y.double() - ref.double()).norm() / ref.double().norm())
            assert err < (1e-6 if dtype == torch.float32 else 8e-3), (T, N, K, split_k, dtype, err)

    for T, K, fmt in [(1, 7168, None), (3, 320, "ue8m0"), (17, 1000, None)]:
        x = torch.randn(T, K, generator=g) * torch.exp2(torch.randint(-12, 12, (T, K), generator=g).float())
        q, s = act_quant_padded(x.to(torch.bfloat16), fmt, 16, fp8.ACT_AMAX_FLOOR, fp8.FP8_MAX)
        _, rs = fp8.act_quant(x.to(torch.bfloat16), fmt)
        assert q.shape == (16 * -(-T // 16), K) and s.shape == (q.shape[0], rs.shape[1]) and s.stride(0) == 1
        assert torch.equal(s[:T], rs), (T, K, fmt)
        _, zs = fp8.act_quant(torch.zeros(1, K), fmt)
        assert torch.equal(s[T:], zs.expand(q.shape[0] - T, -1)) and not q[T:].float().any()
    print("ok")
    """
)


def test_triton_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
