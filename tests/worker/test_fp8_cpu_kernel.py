"""The AVX512-BF16 FP8 kernel (`fp8_cpu`): every e4m3 code exact, products exact, sums fp32.

Skipped where the kernel cannot be built (no C compiler, or a CPU without AVX512-BF16); then
`fp8.linear` keeps the PyTorch path, which test_worker_fp8.py covers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moe_worker import fp8, fp8_cpu

pytestmark = pytest.mark.skipif(fp8_cpu.kernel() is None, reason="fp8_cpu kernel not available here")

G = torch.Generator().manual_seed(11)


def exact(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x.double() @ fp8.dequantize_weight(q, s).double().t()


def every_code() -> torch.Tensor:
    """(254, 160) weight whose row i is code i repeated (the two NaN codes never occur in weights)."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)
    return codes[:, None].expand(-1, 160).contiguous().view(fp8.FP8_DTYPE)


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 16])
def test_every_code_decodes_exactly(tokens, rounded):
    """A one-hot token reads each row's code back, per variant (4- and 2-row groups and the single
    row tail: 254 rows is not a multiple of 4); with scale 1 the rounded kernel is exact too."""
    q = every_code()
    x = torch.zeros(tokens, 160, dtype=torch.bfloat16)
    for t in range(tokens):
        x[t, 37 * t % 160] = 1.0
    y = (fp8_cpu.matmul_rounded if rounded else fp8_cpu.matmul)(x, q, torch.ones(2, 2))
    assert torch.equal(y.float(), q.float()[:, 0].expand(tokens, -1))
    out = torch.empty(254, 160, dtype=torch.bfloat16)
    assert torch.equal(fp8_cpu.dequant_rows(q, torch.ones(2, 2), 0, 254, out).float(), q.float())


def test_inputs_the_kernels_cannot_take_are_refused():
    q, s = fp8.quantize_weight(torch.randn(256, 512, generator=G))
    x = torch.randn(2, 512, generator=G).bfloat16()
    with pytest.raises(ValueError, match="activations"):
        fp8_cpu.matmul(x[:, :256], q, s)  # K does not match: would read past the weight
    with pytest.raises(ValueError, match="activations"):
        fp8_cpu.matmul(x.float(), q, s)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        fp8_cpu.matmul(x, q, s[:1])
    with pytest.raises(ValueError, match="weight:"):
        fp8_cpu.matmul(x, q.view(torch.uint8), s)
    with pytest.raises(ValueError, match="rows"):
        fp8_cpu.dequant_rows(q, s, 0, 257, torch.empty(257, 512, dtype=torch.bfloat16))


def test_an_unwritable_cache_means_the_pytorch_path(tmp_path):
    """No place to build the kernel: a warning, kernel() None, and weight_only still works."""
    code = (
        "import warnings, torch\n"
        "from moe_worker import fp8, fp8_cpu\n"
        "fp8_cpu._SOURCE += '/* new */'\n"  # a source no earlier run has built
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    print(fp8_cpu.kernel() is None, any('unavailable' in str(x.message) for x in w))\n"
        "q, s = fp8.quantize_weight(torch.randn(64, 128))\n"
        "print(fp8.linear(torch.randn(1, 128).bfloat16(), q, s, impl='weight_only').shape)\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME="/proc/no-such-dir")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["True True", "torch.Size([1, 64])"]


@pytest.mark.parametrize("tokens", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("shape", [(200, 300), (257, 320), (576, 1024), (130, 129)])
def test_products_are_exact_and_sums_fp32(tokens, shape):
    """Only the fp32 summation and the bf16 output round: |y - exact| <= 2**-8 |exact| + 1e-5 sum|x w|."""
    out_f, in_f = shape
    q, s = fp8.quantize_weight(torch.randn(out_f, in_f, generator=G) / in_f**0.5)
    x = (torch.randn(tokens, in_f, generator=G) * torch.exp2(torch.randint(-6, 6, (tokens, in_f), generator=G))).to(
        torch.bfloat16
    )
    y = fp8_cpu.matmul(x, q, s)
    ref = exact(x, q, s)
    mag = x.double().abs() @ fp8.dequantize_weight(q, s).double().abs().t()
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, out_f)
    assert ((y.double() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-5 * mag).all()


def test_weight_only_takes_the_kernel_for_few_tokens(monkeypatch):
    calls = []
    real = fp8_cpu.matmul
    monkeypatch.setattr(fp8_cpu, "matmul", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    q, s = fp8.quantize_weight(torch.randn(256, 512, generator=G))
    for tokens in (1, fp8_cpu.MAX_TOKENS, fp8_cpu.MAX_TOKENS + 1):
        fp8.linear(torch.randn(tokens, 512, generator=G).bfloat16(), q, s, impl="weight_only")
    big = torch.full((1, 512), 2.0**100, dtype=torch.bfloat16)  # any bf16 activation: no rescaling inside
    y = fp8.linear(big, q, s, impl="weight_only")
    assert calls == [1, fp8_cpu.MAX_TOKENS, 1]
    assert torch.equal(y, fp8_cpu.matmul(big, q, s)) and torch.isfinite(y).all()


def test_switched_off_by_env():
    code = "from moe_worker import fp8_cpu; print(fp8_cpu.kernel() is None)"
    env = dict(os.environ, MOE_FP8_CPU_KERNEL="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("shape", [(200, 300), (257, 320), (130, 129), (1024, 7168)])
def test_dequant_rows_equals_weight_dequant(shape):
    """bf16(value * s) bit for bit as fp8.dequantize_weight, for any row range and ragged widths."""
    q, s = fp8.quantize_weight(torch.randn(*shape, generator=G) / shape[1] ** 0.5)
    ref = fp8.dequantize_weight(q, s, torch.bfloat16)
    out = torch.full((shape[0], shape[1] + 5), float("nan"), dtype=torch.bfloat16)  # wider rows
    fp8_cpu.dequant_rows(q, s, 0, shape[0], out)
    assert torch.equal(out[:, : shape[1]], ref) and out[:, shape[1] :].isnan().all()
    n0, n1 = shape[0] // 3, shape[0] - 1
    part = torch.empty(n1 - n0, shape[1], dtype=torch.bfloat16)
    fp8_cpu.dequant_rows(q, s, n0, n1, part)
    assert torch.equal(part, ref[n0:n1])


@pytest.mark.parametrize("tokens", [17, 100])
def test_weight_only_beyond_the_kernel_uses_dequantized_tiles(tokens, monkeypatch):
    """More tokens: tiles of bf16(value * s) rows (DeepSeek's weight_dequant) through PyTorch's GEMM."""
    monkeypatch.setattr(fp8, "DEQUANT_TILE_ROWS", 128)  # several tiles, the last one partial
    q, s = fp8.quantize_weight(torch.randn(300, 512, generator=G) / 512**0.5)
    x = torch.randn(tokens, 512, generator=G).bfloat16()
    y = fp8.linear(x, q, s, impl="weight_only")
    w16 = fp8.dequantize_weight(q, s, torch.bfloat16)
    ref = x.double() @ w16.double().t()  # the same bf16 weights, exact sums
    assert y.shape == (tokens, 300)
    assert ((y.double() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-3 * (x.double().abs() @ w16.double().abs().t())).all()


@pytest.mark.parametrize("tokens", [1, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("shape", [(200, 300), (257, 320), (130, 129)])
def test_rounded_kernel_multiplies_weight_dequant_rows(tokens, shape):
    """matmul_rounded = x @ bf16(value * s)^T with fp32 sums: the weights DeepSeek's bf16 path uses."""
    out_f, in_f = shape
    q, s = fp8.quantize_weight(torch.randn(out_f, in_f, generator=G) / in_f**0.5)
    x = torch.randn(tokens, in_f, generator=G).bfloat16()
    w16 = fp8.dequantize_weight(q, s, torch.bfloat16)
    ref = x.double() @ w16.double().t()
    y = fp8_cpu.matmul_rounded(x, q, s)
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, out_f)
    assert ((y.double() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-5 * (x.double().abs() @ w16.double().abs().t())).all()


def test_weight_only_picks_the_rounded_kernel_between(monkeypatch):
    calls = []
    real = fp8_cpu.matmul_rounded
    monkeypatch.setattr(fp8_cpu, "matmul_rounded", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    q, s = fp8.quantize_weight(torch.randn(256, 512, generator=G))
    for tokens in (fp8_cpu.MAX_TOKENS, fp8_cpu.MAX_TOKENS + 1, fp8_cpu.ROUNDED_MAX_TOKENS, fp8_cpu.ROUNDED_MAX_TOKENS + 1):
        fp8.linear(torch.randn(tokens, 512, generator=G).bfloat16(), q, s, impl="weight_only")
    assert calls == [fp8_cpu.MAX_TOKENS + 1, fp8_cpu.ROUNDED_MAX_TOKENS]
