"""Triton kernels for the CUDA FP8 path: one-pass activation quantization (used by `fp8.linear`)
and a blockwise FP8 GEMM for decode-sized batches (`fp8_gemm`, which `fp8.linear` takes for up to
`fp8.DECODE_ROWS` tokens where it is faster than cuBLAS: `fp8.set_decode_gemm`).

`fp8.act_quant` in plain PyTorch is about ten kernel launches per linear (cast, pad, abs, amax,
clamp, divide, clamp, cast, copy, transpose of the scales); at decode sizes those launches, not the
GEMM, set an FP8 expert's time. `act_quant_padded` does it in one kernel: it reads x once, writes
the e4m3 values and the 1x128 scales already outer-dim-major (the layout cuBLAS's blockwise GEMM
wants), and zero-fills the token rows up to a multiple of `rows` (the padding the GEMM needs).

The numbers are those of `fp8.act_quant`, bit for bit, for finite activations (a NaN is dropped
from amax and clamped, where act_quant propagates it): s = max(amax, 1e-4) / 448 in fp32 (rounded
up to a power of two for "ue8m0"), q = e4m3(clamp(x / s, -448, 448)) rounded to nearest even.
Padding rows come out as q = 0 with the scale of an all-zero group. Tested against `act_quant` on
the GPU (tests/worker/test_worker_cuda.py). Triton's CPU interpreter runs it too, but its own
fp32 -> e4m3 conversion is off at binade carries (126.1 -> 64 instead of 128), so only the scales
and the layout can be checked there.

`fp8_gemm`: a first version (16 x 32 tiles, no K split) passed the CUDA tests on an H200 but was
slower than cuBLAS at decode sizes (docs/gpu-h200.md). This version splits K over
more programs (`fp8.decode_split_k`); `bench/fp8_gemm.py` sweeps its tiles and splits against
cuBLAS and bf16. `fp8.linear` times it against cuBLAS at the first product of each weight shape and
token bucket and keeps the faster (not yet run on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 16
GROUP = 128


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, T, K, stride_x, stride_q, stride_s,
    AMAX_FLOOR: tl.constexpr, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr,
    BLOCK_T: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_T token rows x one 128-wide group. Rows >= T read as zeros."""
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # row offsets pass 2**31 for long prefills
    cols = g * GROUP + tl.arange(0, GROUP)
    in_x = (rows[:, None] < T) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=in_x, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR)  # (BLOCK_T,)
    s = amax / FP8_MAX
    if UE8M0:  # smallest power of two >= s (s is a positive normal float)
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    v = tl.math.div_rn(x, s[:, None])  # IEEE division, as PyTorch's (plain `/` is approximate)
    v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    q = v.to(tl.float8e4nv)  # round to nearest even (cvt.rn.satfinite on sm89+)
    out_q = cols[None, :] < K
    tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q, mask=(rows[:, None] >= 0) & out_q)
    tl.store(s_ptr + g * stride_s + rows, s)


def act_quant_padded(
    x: torch.Tensor, scale_fmt: str | None, rows: int, amax_floor: float, fp8_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) -> (q (Tp, K) e4m3, s (Tp, G) fp32 with strides (1, Tp)), Tp = T rounded up to
    `rows` (a multiple of BLOCK_T); the rows past T are padding."""
    T, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    G = triton.cdiv(K, GROUP)
    Tp = triton.cdiv(max(T, 1), rows) * rows
    Tp = triton.cdiv(Tp, BLOCK_T) * BLOCK_T
    q = torch.empty(Tp, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(G, Tp, dtype=torch.float32, device=x.device)
    _act_quant_kernel[(Tp // BLOCK_T, G)](
        x, q, s, T, K, x.stride(0), q.stride(0), s.stride(0),
        AMAX_FLOOR=amax_floor, FP8_MAX=fp8_max, UE8M0=scale_fmt == "ue8m0", BLOCK_T=BLOCK_T, GROUP=GROUP,
    )  # fmt: skip
    return q, s.t()


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, stride_a, stride_as, stride_b, stride_bs, stride_cs, stride_c,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """C[split] (M, N) = sum over this split's 128-wide K blocks g of (A_g @ B_g^T) * sa[:, g] * sb[n // 128, g].

    Each block's product is a fresh fp32 dot, scaled, then added to the fp32 accumulator: the
    per-block promotion DeepSeek-V3 prescribes for Hopper's FP8 tensor cores (report 3.5.2). With
    SPLIT_K > 1 every split writes its own fp32 partial (summed after, in a fixed order)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    G = tl.cdiv(K, GROUP)
    per_split = tl.cdiv(G, SPLIT_K)
    g0 = pid_k * per_split
    g1 = tl.minimum(g0 + per_split, G)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, GROUP)
    a_ptrs = a_ptr + rm[:, None] * stride_a + g0 * GROUP + rk[None, :]
    b_ptrs = b_ptr + rn[:, None] * stride_b + g0 * GROUP + rk[None, :]
    sa_ptrs = as_ptr + rm  # outer-dim-major scales: stride 1 along tokens
    sb_ptrs = bs_ptr + (rn // GROUP) * stride_bs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g0, g1):
        k_left = K - g * GROUP
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rn[:, None] < N) & (rk[None, :] < k_left), other=0.0)
        sa = tl.load(sa_ptrs + g * stride_as, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptrs + g, mask=rn < N, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        a_ptrs += GROUP
        b_ptrs += GROUP
    c = acc.to(c_ptr.dtype.element_ty)
    c_ptrs = c_ptr + pid_k * stride_cs + rm[:, None] * stride_c + rn[None, :]
    tl.store(c_ptrs, c, mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp8_gemm(
    xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, M: int, out_dtype: torch.dtype,
    *, block_m: int = 16, block_n: int = 32, split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:  # fmt: skip
    """Blockwise FP8 product for few tokens: xq (>= M, K) e4m3 with 1x128 scales xs (stride 1 along
    tokens, as `act_quant_padded` writes them), w (N, K) e4m3 with 128x128 scales ws -> (M, N).

    For decode-sized batches, where cuBLAS's blockwise kernels leave most of the GPU idle: small
    tiles over N and, with split_k > 1, the K blocks split over more programs (fp32 partials summed
    in a fixed order, so results do not depend on scheduling)."""
    N, K = w.shape
    if xq.shape[0] < M or xq.shape[1] != K or xq.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"fp8_gemm: activations {tuple(xq.shape)} do not fit {M} tokens x K={K} (unit column stride)")
    if xs.stride(0) != 1 or not ws.is_contiguous() or ws.shape != (triton.cdiv(N, GROUP), triton.cdiv(K, GROUP)):
        raise ValueError("fp8_gemm: activation scales must be outer-dim-major, weight scales contiguous (N/128, K/128)")
    if split_k == 1:
        c = torch.empty(1, M, N, dtype=out_dtype, device=xq.device)
    else:
        c = torch.empty(split_k, M, N, dtype=torch.float32, device=xq.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _fp8_gemm_kernel[grid](
        xq, xs, w, ws, c, M, N, K, xq.stride(0), xs.stride(1), w.stride(0), ws.stride(0), c.stride(0), c.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP=GROUP, SPLIT_K=split_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return c[0] if split_k == 1 else c.sum(0).to(out_dtype)
