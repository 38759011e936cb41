"""FP8 e4m3 with 128x128 weight blocks and 1x128 activation groups: format, exactness, error bounds.

The bound FP8 implies, used below. e4m3 keeps 3 mantissa bits, so rounding a value v in the normal
range moves it by at most 2**-4 |v| (half a step of 2**(e-3)); below 2**-6 (subnormals) steps are
2**-9, so by at most 2**-10. In units of a group's scale s:  |x - dq(q(x))| <= 2**-4 |x| + 2**-10 s.
For y = x W^T with exact weights, the activation rounding alone gives, per output element,
    |y_fp8 - y| <= 2**-4 (|x| @ |W|^T) + 2**-10 (s_x @ |W|^T)       (s_x: each element's group scale)
plus fp32 summation error, far smaller. Tests check that every element is inside this bound and that
the bound is not vacuous (the typical error is a sizeable fraction of it).
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_worker import fp8
from moe_worker.fp8 import FP8_DTYPE, Linear

G = torch.Generator().manual_seed(1234)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def expand_blocks(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(ceil(rows/128), ceil(cols/128)) block scales -> (rows, cols) per-element scales."""
    return s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


def finite_codes() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return codes[(codes & 0x7F) != 0x7F]  # 0x7F / 0xFF are NaN in e4m3fn


def test_scale_shape_partial_blocks():
    assert fp8.scale_shape(7168, 2048) == (56, 16)
    assert fp8.scale_shape(576, 7168) == (5, 56)  # kv_a_proj_with_mqa: 4.5 blocks of rows
    assert fp8.scale_shape(80, 320) == (1, 3)


def test_dequantize_is_exact_for_every_code():
    """The integer-trick decoder equals q.float() * s for all 254 finite codes, partial blocks too."""
    codes = finite_codes()
    q = codes.repeat(130, 2)[:, :300].contiguous().view(FP8_DTYPE)  # (130, 300): 2 x 3 blocks, partial
    s = torch.tensor([[0.37, 1.5, 3.0e-3], [2.0**-20, 7.0, 1.0]])
    expected = q.float() * expand_blocks(s, 130, 300)
    assert torch.equal(fp8.dequantize_weight(q, s), expected)
    assert torch.equal(fp8.dequantize_weight(q, s, torch.bfloat16), expected.to(torch.bfloat16))


def decode_bf16(codes: torch.Tensor, padded_cols: int | None = None) -> torch.Tensor:
    """Run the weight_only decoder on (rows, K) uint8 codes; returns the fp32 values (times 2**120)."""
    rows, K = codes.shape
    dst = torch.full((rows, padded_cols or K), 0x5555, dtype=torch.int16)  # garbage where padding goes
    fp8._decode_bf16_times_2m120(codes.view(torch.int8), dst)
    return dst.view(torch.bfloat16).float() * 2.0**120


@pytest.mark.parametrize("shape, padded", [((2, 127), None), ((1, 256), None), ((2, 127), 128), ((3, 300), 384)])
def test_bf16_decoder_is_exact_for_every_code(shape, padded):
    """All 256 bit patterns, on the int64 four-lane path (contiguous, width % 4 == 0) and the int16 one.

    Finite codes (zeros, subnormals, normals, both signs) give q.float() exactly; padding columns 0.
    e4m3fn has no inf, and its two NaN codes (S 1111 111) are never written by quantize_weight:
    the decoder turns them into +-480 (the next step above 448), which is stated here, not hidden.
    """
    rows, K = shape
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    perm = torch.randperm(rows * K, generator=G) % 256  # every code, in scrambled lane positions
    grid = codes[perm].view(rows, K)
    got = decode_bf16(grid, padded)
    finite = (grid & 0x7F) != 0x7F
    expected = grid.view(FP8_DTYPE).float()
    assert finite.sum() < grid.numel() and (~finite).sum() > 0  # both kinds present
    assert torch.equal(got[:, :K][finite], expected[finite])
    assert torch.equal(got[:, :K][~finite].abs(), torch.full(((~finite).sum().item(),), 480.0))
    assert torch.equal(torch.signbit(got[:, :K]), (grid & 0x80) != 0)  # -0.0 keeps its sign too
    assert torch.equal(got[:, K:], torch.zeros(rows, (padded or K) - K))


def test_bf16_decoder_lane_paths_agree():
    """The int64 path (shift carries bits across lanes) equals the lane-by-lane int16 path bit for bit."""
    codes = torch.randint(0, 256, (64, 1024), generator=G, dtype=torch.int32).to(torch.uint8)
    fast = torch.empty(64, 1024, dtype=torch.int16)
    fp8._decode_bf16_times_2m120(codes.view(torch.int8), fast)
    slow = torch.empty(64, 1025, dtype=torch.int16)[:, :1024]  # not contiguous: int16 ops
    fp8._decode_bf16_times_2m120(codes.view(torch.int8), slow)
    assert torch.equal(fast, slow)


def test_round_to_e4m3_matches_torch_cast():
    v = randn(100_000) * torch.exp2(torch.randint(-16, 9, (100_000,), generator=G).float())
    ties = (torch.arange(-2000, 2000).float() + 0.5) * 2.0**-9  # exact halfway points, subnormal steps
    v = torch.cat([v.clamp(-448, 448), ties, torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0**-6, 2.0**-9, 2.0**-10])])
    assert torch.equal(fp8.round_to_e4m3(v), v.to(FP8_DTYPE).float())


def test_act_quant_scales_and_padding():
    x = randn(5, 300, scale=3.0)
    x[0, :128] = 0.0  # all-zero group: amax clamped to 1e-4
    q, s = fp8.act_quant(x)
    assert q.shape == (5, 300) and q.dtype == FP8_DTYPE and s.shape == (5, 3)
    groups = torch.nn.functional.pad(x, (0, 84)).view(5, 3, 128)
    assert torch.equal(s, groups.abs().amax(-1).clamp(min=1e-4) / 448)
    assert s[0, 0] == pytest.approx(1e-4 / 448)
    # act_quant_dequant is bit-identical to quantizing and dequantizing
    deq = (torch.nn.functional.pad(q.float(), (0, 84)).view(5, 3, 128) * s[..., None]).flatten(1)[:, :300]
    assert torch.equal(fp8.act_quant_dequant(x), deq)


def test_act_quant_ue8m0_scales_are_powers_of_two():
    x = randn(4, 256, scale=5.0)
    _, s = fp8.act_quant(x, "ue8m0")
    amax = x.view(4, 2, 128).abs().amax(-1) / 448
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert (s >= amax).all() and (s < 2 * amax).all()
    assert torch.equal(fp8.act_quant_dequant(x, "ue8m0"), (fp8.act_quant(x, "ue8m0")[0].float().view(4, 2, 128) * s[..., None]).flatten(1))


def test_quantize_weight_zero_pads_partial_blocks():
    w = torch.zeros(200, 300)
    w[150, 290] = -3.5  # the only value of block (1, 2), which the matrix edge cuts to 72 x 44
    w[:128, :128] = randn(128, 128)
    q, s = fp8.quantize_weight(w)
    assert q.shape == (200, 300) and q.dtype == FP8_DTYPE and s.shape == (2, 3) and s.dtype == torch.float32
    assert s[1, 2] == pytest.approx(3.5 / 448)  # padding zeros did not change the block's amax
    assert s[0, 1] == 1.0  # all-zero block
    assert q[150, 290].float() == -448.0


def test_weight_quantization_error_bound():
    w = randn(300, 520) * torch.exp2(torch.randint(-8, 3, (300, 520), generator=G).float())
    q, s = fp8.quantize_weight(w)
    err = (fp8.dequantize_weight(q, s) - w).abs()
    bound = 2.0**-4 * w.abs() + 2.0**-10 * expand_blocks(s, 300, 520)
    assert (err <= bound * (1 + 1e-6)).all()
    assert err.max() > 0.1 * bound.max()  # the quantization is not a no-op


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().t()).float()


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_emulate_equals_the_fp8_definition(tokens):
    """The CPU fallback computes (dq(q(x)) @ dq(W)^T): checked against float64, so only fp32 rounding differs."""
    w = randn(200, 300) / 300**0.5
    q, s = fp8.quantize_weight(w)
    x = randn(tokens, 300)
    y = fp8.linear(x, q, s, impl="emulate")
    xq, xs = fp8.act_quant(x)
    xd = (torch.nn.functional.pad(xq.float(), (0, 84)).view(tokens, 3, 128) * xs[..., None]).flatten(1)[:, :300]
    exact = reference(xd, q.float().double() * expand_blocks(s, 200, 300).double())
    assert y.dtype == torch.float32
    assert ((y - exact).abs() <= 1e-5 * (xd.abs() @ fp8.dequantize_weight(q, s).abs().t()) + 1e-30).all()


def fp8_bound(x: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    """2**-4 |x| @ |W|^T + 2**-10 s_x @ |W|^T  (+1e-5 relative for fp32 summation)."""
    T, K = x.shape
    _, xs = fp8.act_quant(x)
    sx = xs.repeat_interleave(128, 1)[:, :K]  # (T, K) group scale of each element
    mag = x.abs() @ wd.abs().t()
    return 2.0**-4 * mag + 2.0**-10 * (sx @ wd.abs().t()) + 1e-5 * mag


def test_fp8_vs_dequantized_within_the_fp8_bound():
    """Acceptance: FP8 path vs the same (dequantized) weights without FP8 activations."""
    wd_list = []
    for out_f, in_f in [(256, 320), (80, 320), (320, 128)]:
        q, s = fp8.quantize_weight(randn(out_f, in_f) / in_f**0.5)
        x = randn(33, in_f) * torch.exp2(torch.randint(-3, 4, (33, in_f), generator=G).float())
        wd = fp8.dequantize_weight(q, s)
        wd_list.append(wd)
        y = fp8.linear(x, q, s, impl="emulate")
        exact = reference(x, wd)  # dequantized weights, unquantized activations, float64
        bound = fp8_bound(x, wd)
        err = (y - exact).abs()
        assert (err <= bound).all()
        # Not vacuous: activation rounding really happens, at the expected size.
        rel_rms = (err.pow(2).mean() / exact.pow(2).mean()).sqrt()
        assert 0.003 < rel_rms < 0.05
        assert err.max() > 0.02 * bound.max()

        # The bf16 "dequantized" path (DeepSeek gemm_impl="bf16"): weights and activations rounded
        # to bf16 (2**-9 each), output rounded to bf16 (2**-9 |y|).
        xb = x.to(torch.bfloat16)
        y16 = (xb @ fp8.dequantize_weight(q, s, torch.bfloat16).t()).float()
        mag = x.abs() @ wd.abs().t()
        assert ((y - y16).abs() <= bound + 2.0**-8 * mag + 2.0**-8 * y16.abs()).all()


@pytest.mark.parametrize("tokens", [1, 5, 32, 33, 100])
@pytest.mark.parametrize("shape", [(256, 320), (200, 300), (576, 1024)])
def test_weight_only_bound(tokens, shape):
    """weight_only (fast CPU path): one extra bf16 rounding per product and a bf16 output."""
    out_f, in_f = shape
    q, s = fp8.quantize_weight(randn(out_f, in_f) / in_f**0.5)
    wd = fp8.dequantize_weight(q, s)
    x = randn(tokens, in_f).to(torch.bfloat16)
    y = fp8.linear(x, q, s, impl="weight_only")
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, out_f)
    exact = reference(x.float(), wd)
    mag = x.float().abs() @ wd.abs().t()
    # + e4m3 subnormal weights (|w| < 2**-6 s) that the bf16 dot product may flush
    flush = 2.0**-6 * (x.float().abs() @ expand_blocks(s, out_f, in_f).t())
    bound = 2.0**-7 * mag + 2.0**-8 * exact.abs() + flush
    assert ((y.float() - exact).abs() <= bound).all()


def test_weight_only_fp32_activations_are_exact():
    q, s = fp8.quantize_weight(randn(130, 300))
    x = randn(3, 300)
    exact = reference(x, fp8.dequantize_weight(q, s))
    assert torch.allclose(fp8.linear(x, q, s, impl="weight_only"), exact, rtol=1e-5, atol=1e-5)


def test_tiles_do_not_change_results(monkeypatch):
    q, s = fp8.quantize_weight(randn(1000, 300))
    whole = fp8.dequantize_weight(q, s)
    monkeypatch.setattr(fp8, "TILE_ELEMENTS", 384 * 5)  # 5 rows per tile, not a multiple of 128
    assert torch.equal(fp8.dequantize_weight(q, s), whole)
    decoder = fp8._TileDecoder(q, s)
    assert decoder.rows == 5  # the scratch is bounded by TILE_ELEMENTS, not by the weight
    x = randn(3, 300).to(torch.bfloat16)
    monkeypatch.setattr(fp8, "WO_TILE_ELEMENTS", 384 * 128)  # one 128-row block per tile
    small = fp8.linear(x, q, s, impl="weight_only")
    monkeypatch.setattr(fp8, "WO_TILE_ELEMENTS", 1 << 22)
    assert torch.equal(small, fp8.linear(x, q, s, impl="weight_only"))


def test_linear_module_holds_weight_and_scale():
    lin = Linear(300, 200, fp8=True)
    assert lin.weight.dtype == FP8_DTYPE and lin.scale.shape == (2, 3) and lin.is_fp8
    q, s = fp8.quantize_weight(randn(200, 300))
    with torch.no_grad():
        lin.weight.copy_(q)
        lin.scale.copy_(s)
    x = randn(2, 4, 300)
    assert lin(x).shape == (2, 4, 200)
    assert torch.equal(lin(x), fp8.linear(x, q, s, impl="emulate"))
    assert torch.equal(lin.dequantized_weight(), fp8.dequantize_weight(q, s))
    resident = sum(t.numel() * t.element_size() for t in lin.state_dict().values())
    assert resident == 200 * 300 + 2 * 3 * 4  # one byte per weight plus the scales, nothing else kept
    dense = Linear(300, 200, dtype=torch.float32)
    assert dense.scale is None and not dense.is_fp8


def test_linear_rejects_inconsistent_arguments():
    q, s = fp8.quantize_weight(randn(8, 128))
    with pytest.raises(ValueError, match="needs its weight_scale_inv"):
        fp8.linear(randn(1, 128), q)
    with pytest.raises(ValueError, match="not float8_e4m3fn"):
        fp8.linear(randn(1, 128), randn(8, 128), s)
    with pytest.raises(ValueError, match="expected one of"):
        fp8.linear(randn(1, 128), q, s, impl="fast")


def test_impl_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert fp8.resolve_impl("auto", cpu) == "emulate"
    assert fp8.resolve_impl("weight_only", cpu) == "weight_only"
    with pytest.raises(ValueError, match="compute capability"):
        fp8.resolve_impl("scaled_mm", cpu)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="needs a CUDA device with compute capability >= 8.9",
)
def test_scaled_mm_matches_emulation_on_gpu():
    dev = torch.device("cuda")
    q, s = fp8.quantize_weight(randn(2048, 7168) / 7168**0.5)
    q, s = q.to(dev), s.to(dev)
    x = randn(64, 7168).to(dev, torch.bfloat16)
    y = fp8.linear(x, q, s, impl="scaled_mm")
    ref = fp8.linear(x.float(), q, s, impl="emulate")
    assert y.dtype == torch.bfloat16
    assert math.isclose(0.0, float((y.float() - ref).abs().max() / ref.abs().max()), abs_tol=1e-2)


@pytest.mark.parametrize("impl", ["emulate", "weight_only"])
def test_zero_tokens(impl):
    """An expert-parallel rank can receive no tokens for a linear."""
    q, s = fp8.quantize_weight(randn(64, 256))
    y = fp8.linear(torch.zeros(0, 256, dtype=torch.bfloat16), q, s, impl=impl)
    assert y.shape == (0, 64) and y.dtype == torch.bfloat16


# ---- the decode-sized product on CUDA: cuBLAS or the Triton kernel (fp8._decode_product) ----


def test_choose_fastest_takes_the_fastest_correct_candidate():
    ref = torch.ones(4, 8)
    cands = {"slow": lambda: ref.clone(), "fast_wrong": lambda: ref * 1.1, "fast": lambda: ref + 1e-5,
             "broken": lambda: (_ for _ in ()).throw(RuntimeError("no kernel image"))}
    times = {"slow": 3.0, "fast_wrong": 1.0, "fast": 2.0, "broken": 0.5}
    timer = lambda fn: times[next(k for k, f in cands.items() if f is fn)]  # noqa: E731
    pick, report = fp8.choose_fastest(cands, ref, 1e-3, timer, default="slow")
    assert pick == "fast"
    assert report["fast_wrong"].startswith("wrong") and report["broken"].startswith("failed: RuntimeError")
    assert report["slow"] == "3000000.0 us"


def test_choose_fastest_without_a_correct_candidate_keeps_the_default():
    ref = torch.ones(3)
    assert fp8.choose_fastest({"triton": lambda: ref * 2}, ref, 8e-3, None, default="cublas")[0] == "cublas"
    assert fp8.choose_fastest({"triton": lambda: ref * torch.nan}, ref, 8e-3, None, default="cublas")[0] == "cublas"
    assert fp8.choose_fastest({"triton": lambda: ref}, ref, 8e-3, None, default="cublas")[0] == "triton"


def test_decode_split_k_fills_the_gpu():
    # DeepSeek-V3's expert on an H100/H200 (132 SMs): w1/w3 (2048 x 7168) at one token has 64 output
    # tiles, so it splits K four ways; w2 (7168 x 2048) has 224 and does not split.
    assert fp8.decode_split_k(1, 2048, 7168, 132) == 4
    assert fp8.decode_split_k(1, 7168, 2048, 132) == 1
    assert fp8.decode_split_k(64, 2048, 7168, 132) == 1
    assert fp8.decode_split_k(1, 576, 7168, 132) == 8  # kv_a: 18 tiles, at most 8 splits
    assert fp8.decode_split_k(1, 64, 256, 132) == 1  # two K blocks: no split leaves each fewer than two


def test_decode_gemm_setting():
    try:
        fp8.set_decode_gemm("triton")
        x, (q, s) = torch.randn(2, 512), fp8.quantize_weight(torch.randn(64, 512))
        assert fp8._decode_product(x, q, s, None) is None  # on the CPU: never
        with pytest.raises(ValueError, match="FP8 decode GEMM 'fast'"):
            fp8.set_decode_gemm("fast")
    finally:
        fp8.set_decode_gemm("cublas")
