"""One-pass activation quantization for the CUDA FP8 path (Triton).

`fp8.act_quant` in plain PyTorch is about ten kernel launches per linear (cast, pad, abs, amax,
clamp, divide, clamp, cast, copy, transpose of the scales); at decode sizes those launches, not the
GEMM, set an FP8 expert's time. `act_quant_padded` does it in one kernel: it reads x once, writes
the e4m3 values and the 1x128 scales already outer-dim-major (the layout cuBLAS's blockwise GEMM
wants), and zero-fills the token rows up to a multiple of `rows` (the padding the GEMM needs).

The numbers are those of `fp8.act_quant`, bit for bit: s = max(amax, 1e-4) / 448 in fp32 (rounded
up to a power of two for "ue8m0"), q = e4m3(clamp(x / s, -448, 448)) rounded to nearest even.
Padding rows come out as q = 0 with the scale of an all-zero group. Tested against `act_quant` on
the GPU (tests/worker/test_worker_cuda.py). Triton's CPU interpreter runs it too, but its own
fp32 -> e4m3 conversion is off at binade carries (126.1 -> 64 instead of 128), so only the scales
and the layout can be checked there.
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
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
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
