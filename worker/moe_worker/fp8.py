"""FP8 e4m3 block quantization in DeepSeek-V3's checkpoint format, inside one `Linear`.

Format (README_WEIGHTS.md, report section 3.3.2):
- a weight W (out, in) is stored as e4m3 `q` plus `weight_scale_inv` s of shape
  (ceil(out/128), ceil(in/128)) fp32, with W[i, j] ~= q[i, j] * s[i // 128, j // 128]; blocks cut
  by the matrix edge are zero-padded when their scale is computed;
- activations are quantized on the fly per token per 128 channels (1x128 groups):
  s = max(amax, 1e-4) / 448, q = e4m3(x / s)  (DeepSeek `act_quant`).

`linear()` is the only place that decides how a product is computed (`Linear.impl`):
- "scaled_mm": CUDA with compute capability >= 8.9: act_quant + `torch._scaled_mm` with 1x128 x
  128x128 block scales (cuBLAS blockwise scaling; sm90), token rows padded to a multiple of 16, for
  in_features a multiple of 512 (SCALED_MM_K; other widths are emulated). If the
  kernel refuses (older CUDA, sm89 or sm100 without blockwise support) the call falls back to
  "emulate" for that weight shape on that device, with one warning.
- "emulate": the exact CPU fallback. It computes what the FP8 kernel computes,
  sum_k (qa[m,k] * sa[m,k//128]) * (qw[n,k] * sw[n//128,k//128]), with the same e4m3 values and
  scales (activation rounding bit-identical to `act_quant`), in fp32: it differs from the GPU
  kernel only by fp32 rounding and summation order (~1e-7 relative), not by any quantization.
- "weight_only": like DeepSeek's `gemm_impl="bf16"`: unquantized activations times dequantized
  weights in the activation dtype; the fast CPU path, not the FP8 numerics (see `_weight_only`).
  On an AVX512-BF16 CPU with bf16 activations it is our C code (`fp8_cpu`): a fused kernel up to
  16 tokens (exact products up to 4), dequantized tiles into PyTorch's GEMM above.
- "auto": "scaled_mm" where supported, else "emulate".

CPU paths never keep a dequantized copy of a weight: they decode a few hundred rows at a time into
a small scratch tile and multiply tile by tile, so an FP8 expert keeps holding half the bytes of bf16.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moe_common.model_args import FP8_BLOCK

from . import fp8_cpu

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite e4m3fn value."""
ACT_AMAX_FLOOR = 1e-4
"""DeepSeek's `act_quant` clamps a group's amax to at least this, so all-zero groups get a scale."""

Impl = Literal["auto", "scaled_mm", "emulate", "weight_only"]
IMPLS: tuple[str, ...] = ("auto", "scaled_mm", "emulate", "weight_only")

TILE_ELEMENTS = 1 << 20
"""Weight elements decoded per tile on the CPU paths (about 4 MB of fp32 scratch)."""

_SCALED_MM_BROKEN: set[tuple[str, int, int]] = set()  # (device, out, in) where torch._scaled_mm refused
SCALED_MM_ROWS = 16
"""scaled_mm pads the token rows to a multiple of this: cuBLAS's blockwise FP8 GEMM refused 1 and 3
rows (CUBLAS_STATUS_NOT_SUPPORTED) on an H200 with torch 2.11 + CUDA 13.0, and ran 4 and more."""
SCALED_MM_K = 512
"""scaled_mm only for in_features a multiple of this. On that H200 the blockwise GEMM returned
wrong numbers, without an error, for K = 128, 256, 384, 640 and 896 (relative error 0.39 to 2e3
against the exact product) and was right for K = 512, 1024, 2048 and 7168: K/128 scale columns not
a multiple of 4 (the weight scales' leading dimension then is not 16-byte aligned, our guess). Every
FP8 linear of DeepSeek-V3 has such a K (7168, 1536, 512, 2048, 16384, 18432); other widths take
the exact emulated path."""
_SCRATCH = threading.local()  # per-thread reusable decode buffers: fresh 8 MB buffers page-fault


def _scratch(slot: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) buffer reused across calls on this thread (contents undefined). A buffer
    outgrown by a larger call is kept, not freed: a CUDA graph captured with it (`engine.graphs`)
    still reads and writes that memory at every replay."""
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
        _SCRATCH.outgrown = []
    key = (slot, dtype, str(device))
    buf = pool.get(key)
    if buf is None or buf.numel() < rows * cols:
        if buf is not None and buf.is_cuda:
            _SCRATCH.outgrown.append(buf)
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = pool[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buf[: rows * cols].view(rows, cols)


def scratch_buffers() -> list[torch.Tensor]:
    """This thread's scratch buffers, outgrown ones included (a CUDA graph that used them keeps
    a reference, so they outlive the thread)."""
    return [*getattr(_SCRATCH, "pool", {}).values(), *getattr(_SCRATCH, "outgrown", [])]


def scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for an (out, in) weight: one fp32 per 128x128 block."""
    return math.ceil(out_features / FP8_BLOCK), math.ceil(in_features / FP8_BLOCK)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (q (out, in) e4m3, scale_inv (ceil(out/128), ceil(in/128)) fp32).

    Per 128x128 block: s = amax / 448 (1 for an all-zero block), q = e4m3(w / s), round to nearest
    even. Partial edge blocks are zero-padded, so padding never changes a scale.
    """
    out_f, in_f = w.shape
    so, si = scale_shape(out_f, in_f)
    padded = torch.zeros(so * FP8_BLOCK, si * FP8_BLOCK, dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(so, FP8_BLOCK, si, FP8_BLOCK)  # (so, 128, si, 128)
    amax = blocks.abs().amax(dim=(1, 3))  # (so, si)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(so * FP8_BLOCK, si * FP8_BLOCK)[:out_f, :in_f].contiguous()
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (out, in) e4m3 with scale_inv -> (out, in) `dtype`: fp32 product q * s, then one rounding."""
    out_f, in_f = q.shape
    result = torch.empty(out_f, in_f, dtype=dtype, device=q.device)
    decoder = _TileDecoder(q, scale)
    for r0, r, tile in decoder.tiles():
        result[r0 : r0 + r].copy_(tile)
    return result


def act_quant(x: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (..., K) e4m3, s (..., ceil(K/128)) fp32), per token per 128 channels.

    DeepSeek `act_quant`: s = max(amax, 1e-4) / 448 (rounded up to a power of two when
    scale_fmt == "ue8m0"), q = e4m3(x / s). A last partial group is zero-padded.
    """
    groups, s = _act_groups(x, scale_fmt)
    q = (groups / s[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    K = x.shape[-1]
    return q.flatten(-2)[..., :K].contiguous(), s


def act_quant_dequant(x: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """fp32 tensor equal, bit for bit, to `q.float() * s` of `act_quant(x)`; no e4m3 tensor made.

    Rounding to e4m3 is done arithmetically (exact power-of-two steps and round-half-even), which
    on CPU is several times faster than PyTorch's scalar float8 conversion.
    """
    groups, s = _act_groups(x, scale_fmt)
    v = (groups / s[..., None]).clamp_(-FP8_MAX, FP8_MAX)
    out = round_to_e4m3(v).mul_(s[..., None])
    K = x.shape[-1]
    return out.flatten(-2)[..., :K]


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3fn value (ties to even) of fp32 `v` with |v| <= 448, as fp32."""
    _, ex = torch.frexp(v)  # |v| = m * 2**ex, m in [0.5, 1); ex == 0 for v == 0
    # e4m3: 3 mantissa bits, smallest normal exponent -6, so the spacing is 2**(max(ex-1, -6) - 3).
    step_exp = (ex - 1).clamp_(min=-6) - 3  # in [-9, 5]
    step = ((step_exp + 127) << 23).view(torch.float32)  # exact 2**step_exp from its bit pattern
    return torch.round(v / step).mul_(step)


def _act_groups(x: torch.Tensor, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (fp32 groups (..., G, 128) zero-padded, scales (..., G))."""
    K = x.shape[-1]
    G = math.ceil(K / FP8_BLOCK)
    xf = x.float()
    if K != G * FP8_BLOCK:
        xf = F.pad(xf, (0, G * FP8_BLOCK - K))
    groups = xf.unflatten(-1, (G, FP8_BLOCK))
    amax = groups.abs().amax(dim=-1).clamp_(min=ACT_AMAX_FLOOR)
    s = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        s = _pow2_ceil(s)
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt {scale_fmt!r}: expected None or 'ue8m0'")
    return groups, s


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s (s > 0), exactly."""
    m, ex = torch.frexp(s)
    ex = torch.where(m == 0.5, ex - 1, ex)
    return ((ex + 127) << 23).view(torch.float32)


# ---------------------------------------------------------------------------------------------
# Tile-wise decoding (CPU paths)
# ---------------------------------------------------------------------------------------------


_FP16_LANES_MASK = 0xBF80_BF80_BF80_BF80 - (1 << 64)
"""0xBF80 in each of the four int16 lanes of an int64, as the signed value PyTorch takes."""


class _TileDecoder:
    """Decodes rows of an e4m3 weight into fp32 scratch, tile by tile, exactly (= q.float() * s).

    The e4m3 byte S EEEE MMM becomes the fp16 bit pattern S 0 EEEE MMM 0000000, which is the same
    number times 2**-8 for every finite e4m3 value, subnormals included (both formats keep 3
    mantissa bits at the top, and fp16's exponent bias is 8 above e4m3's). That takes three
    vectorised integer passes instead of PyTorch's scalar float8 conversion; the 2**8 is folded
    into the scale, which is exact.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, tile_elements: int | None = None):
        self.q = q
        self.out_f, self.in_f = q.shape
        kb = math.ceil(self.in_f / FP8_BLOCK)
        self.kp = kb * FP8_BLOCK  # padded row length: whole 128-groups
        # (out, kb): the scale of each row's k-blocks, times 2**8 to undo the fp16 decode's 2**-8.
        self.row_scale = scale.float().repeat_interleave(FP8_BLOCK, dim=0)[: self.out_f] * 256.0
        self.rows = max(1, min(self.out_f, (tile_elements or TILE_ELEMENTS) // self.kp))
        self._i16 = _scratch("i16", self.rows, self.kp, torch.int16, q.device)
        self._i16[:, self.in_f :].zero_()  # padding columns decode to 0
        self._f32 = _scratch("f32", self.rows, self.kp, torch.float32, q.device)

    def tiles(self):
        """Yield (first row, rows, fp32 tile (rows, in)) covering the weight top to bottom."""
        kb = self.kp // FP8_BLOCK
        src = self.q.view(torch.int8)
        for r0 in range(0, self.out_f, self.rows):
            r = min(self.rows, self.out_f - r0)
            i16 = self._i16[:r]
            i16[:, : self.in_f].copy_(src[r0 : r0 + r])  # sign-extends: negatives become 0xFF80 | EEEEMMM
            words = i16.view(torch.int64)  # four int16 lanes at once, as in _decode_bf16_times_2m120
            words.bitwise_left_shift_(7)  # per lane: bits 15, 14 = S, S; bits 13..7 = EEEEMMM
            words.bitwise_and_(_FP16_LANES_MASK)  # keep S and EEEEMMM; clear bit 14 and carried-in bits 6..0
            f32 = self._f32[:r]
            f32.copy_(i16.view(torch.float16))
            f32.view(r, kb, FP8_BLOCK).mul_(self.row_scale[r0 : r0 + r, :, None])
            yield r0, r, f32[:, : self.in_f]


_LANES_MASK = 0x87F0_87F0_87F0_87F0 - (1 << 64)
"""0x87F0 in each of the four int16 lanes of an int64, as the signed value PyTorch takes."""


def _decode_bf16_times_2m120(src: torch.Tensor, dst: torch.Tensor) -> None:
    """e4m3 rows (r, K) as int8 -> bf16 bit patterns in int16 `dst` (r, Kp >= K), value * 2**-120 exactly.

    The byte S EEEE MMM becomes the bf16 bit pattern S 0000 EEEE MMM 0000: the exponent field is
    E (bias 127 instead of 7) and subnormals line up as in `_TileDecoder`. Codes with E == 0
    (|value| < 2**-6, below 1/28672 of their block's amax) are bf16 subnormals after the shift.
    Columns K..Kp of `dst` become 0. Three integer passes: a sign-extending copy, then shift and
    mask. When `dst` is contiguous with Kp % 4 == 0 the last two run on int64 words (four lanes at
    once, faster than int16 ops): the shift carries each lane's top four bits into
    the next lane's bits 3..0, which the mask clears along with bits 14..11.
    """
    K = src.shape[1]
    dst[:, :K].copy_(src)  # sign-extends: negatives become 0xFF80 | EEEEMMM
    if dst.shape[1] > K:
        dst[:, K:].zero_()
    if dst.is_contiguous() and dst.shape[1] % 4 == 0 and dst.storage_offset() % 4 == 0:
        words = dst.view(torch.int64)
        words.bitwise_left_shift_(4)  # per lane: bits 15..11 = S, bits 10..4 = EEEEMMM
        words.bitwise_and_(_LANES_MASK)  # keep the sign and EEEEMMM in each lane
    else:
        dst.bitwise_left_shift_(4)
        dst.bitwise_and_(-30736)  # 0x87F0


WO_TILE_ELEMENTS = 1 << 22
"""Weight elements decoded per tile on the weight_only path (8 MB of int16 scratch)."""
_WO_ACT_SIDE_TOKENS = 32  # up to this many tokens the block scales are applied to the activations
_POW2_120 = 2.0**120


def _weight_only(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 activations x (T, K) times the e4m3 weight, decoded tile by tile straight to bf16.

    Weights decode to bf16 as value * 2**-120 with integer ops only; the block scale (times 2**120)
    is then applied where it is cheaper:
    - T <= 32 (memory-bound): to the activations. For each 128-row block b, x_b = bf16(x * s[b, k//128]
      * 2**120) and y[:, b] = x_b @ raw_b^T, all blocks of a tile in one bmm. x86 bf16 dot products
      (AVX512-BF16) may flush bf16 subnormal inputs: e4m3 codes with E == 0 can count as zero here.
    - T > 32 (compute-bound): to the weights, raw * bf16(s * 2**120), then x @ w^T.
    Either way one extra bf16 rounding (of x * s, or of s) on top of DeepSeek's weight_dequant, so
    each product carries at most 2**-8 relative error, plus the bf16 output rounding.

    On an AVX512-BF16 CPU (bf16 activations) our C code runs instead (`fp8_cpu`): exact products
    up to fp8_cpu.MAX_TOKENS tokens, DeepSeek's weight_dequant rounding (bf16(value * s)) above,
    fp32 sums; both are inside the bound above.
    """
    T = x2.shape[0]
    N, K = q.shape
    if x2.device.type == "cpu" and x2.dtype == torch.bfloat16 and fp8_cpu.kernel() is not None:
        if T <= fp8_cpu.MAX_TOKENS:
            return fp8_cpu.matmul(x2, q, scale)  # exact products, fp32 sums: within this path's bound
        if T <= fp8_cpu.ROUNDED_MAX_TOKENS:
            return fp8_cpu.matmul_rounded(x2, q, scale)
        return _dequant_tiles_matmul(x2, q, scale)
    if x2.dtype != torch.bfloat16 or float(scale.max()) >= 2.0**7:  # 2**120 * s must stay finite in bf16
        return _tiled_matmul(x2, q, scale, x2.dtype)
    kb = math.ceil(K / FP8_BLOCK)
    kp = kb * FP8_BLOCK
    nb = math.ceil(N / FP8_BLOCK)
    s120 = scale.float() * _POW2_120  # (nb, kb), exact
    src = q.view(torch.int8)
    rows = min(max(1, WO_TILE_ELEMENTS // (kp * FP8_BLOCK)), nb) * FP8_BLOCK  # whole 128-row blocks
    i16 = _scratch("i16", rows, kp, torch.int16, q.device)
    yt = torch.empty(N, T, dtype=torch.bfloat16, device=q.device)  # (N, T): tiles are contiguous rows
    xf = x2.float()
    act_side = T <= _WO_ACT_SIDE_TOKENS and float(xf.abs().max()) * float(s120.max()) < 2.0**127
    if act_side:
        xs = F.pad(xf, (0, kp - K)).view(1, T, kp)  # (1, T, kp)
        # (nb, 1, kp): each block's scales spread over their 128 columns, so the multiply below
        # broadcasts over tokens only and runs vectorised along kp (an inner stride-0 broadcast is ~2x slower).
        s_cols = s120.repeat_interleave(FP8_BLOCK, dim=1).view(nb, 1, kp)
        xq = torch.empty(rows // FP8_BLOCK, T, kp, dtype=torch.bfloat16, device=q.device)
    else:
        row_scale = s120.to(torch.bfloat16).repeat_interleave(FP8_BLOCK, dim=0)[:N]  # (N, kb)
    for n0 in range(0, N, rows):
        r = min(rows, N - n0)
        _decode_bf16_times_2m120(src[n0 : n0 + r], i16[:r])  # padding columns decode to 0
        raw = i16[:r].view(torch.bfloat16)  # (r, kp) = weight / s * 2**-120, zero beyond K
        if act_side:
            blocks = math.ceil(r / FP8_BLOCK)
            if r % FP8_BLOCK:  # last partial block: bmm wants whole 128-row blocks
                i16[r : blocks * FP8_BLOCK].zero_()
            b0 = n0 // FP8_BLOCK
            xqb = xq[:blocks]
            torch.mul(xs, s_cols[b0 : b0 + blocks], out=xqb)  # fp32 math, one bf16 rounding
            out = torch.bmm(
                i16[: blocks * FP8_BLOCK].view(torch.bfloat16).view(blocks, FP8_BLOCK, kp),
                xqb.transpose(1, 2),
            )  # (blocks, 128, T)
            yt[n0 : n0 + r] = out.view(blocks * FP8_BLOCK, T)[:r]
        else:
            raw.view(r, kb, FP8_BLOCK).mul_(row_scale[n0 : n0 + r, :, None])
            torch.mm(raw[:, :K], x2.t(), out=yt[n0 : n0 + r])
    return yt.t()


DEQUANT_TILE_ROWS = 512
"""Weight rows dequantized per tile by the C code before PyTorch's bf16 GEMM (more than
fp8_cpu.ROUNDED_MAX_TOKENS tokens)."""


def _dequant_tiles_matmul(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 x (T, K) @ bf16(dequant(q))^T: the C kernel writes a tile of rows as DeepSeek's
    weight_dequant would (fp32 product, one rounding), PyTorch's GEMM multiplies it while it is hot."""
    T = x2.shape[0]
    N, K = q.shape
    qc, sc = q.contiguous(), scale.float().contiguous()
    rows = max(1, min(DEQUANT_TILE_ROWS, N))
    tile = _scratch("dq", rows, K, torch.bfloat16, x2.device)
    yt = torch.empty(N, T, dtype=torch.bfloat16)  # (N, T): tiles are contiguous rows
    xt = x2.t()
    for n0 in range(0, N, rows):
        r = min(rows, N - n0)
        fp8_cpu.dequant_rows(qc, sc, n0, n0 + r, tile)
        torch.mm(tile[:r], xt, out=yt[n0 : n0 + r])
    return yt.t()


def _tiled_matmul(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """x2 (T, K) @ dequant(q)^T -> (T, N) in `compute_dtype`, one decoded tile of rows at a time."""
    T = x2.shape[0]
    N = q.shape[0]
    decoder = _TileDecoder(q, scale)
    xt = x2.to(compute_dtype).t()  # (K, T)
    yt = torch.empty(N, T, dtype=compute_dtype, device=x2.device)  # (N, T): row tiles are contiguous
    cast = None
    if compute_dtype != torch.float32:
        cast = _scratch("cast", decoder.rows, q.shape[1], compute_dtype, x2.device)
    for r0, r, tile in decoder.tiles():
        if cast is not None:
            tile = cast[:r].copy_(tile)  # one rounding of the fp32 product q * s, as DeepSeek's weight_dequant
        torch.mm(tile, xt, out=yt[r0 : r0 + r])
    return yt.t()


# ---------------------------------------------------------------------------------------------
# The one linear()
# ---------------------------------------------------------------------------------------------


def scaled_mm_supported(device: torch.device) -> bool:
    """CUDA device with compute capability >= 8.9 (Ada, Hopper and later)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Concrete implementation for `impl` on `device` ("auto" picks scaled_mm or emulate)."""
    if impl not in IMPLS:
        raise ValueError(f"fp8 impl {impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return "scaled_mm" if scaled_mm_supported(device) else "emulate"
    if impl == "scaled_mm" and not scaled_mm_supported(device):
        raise ValueError(f"fp8 impl 'scaled_mm' needs a CUDA device with compute capability >= 8.9, got {device}")
    return impl


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    scale_fmt: str | None = None,
) -> torch.Tensor:
    """y = x W^T, (..., in) -> (..., out) in x.dtype. W is float, or e4m3 with its weight_scale_inv."""
    if weight.dtype != FP8_DTYPE:
        if scale is not None:
            raise ValueError("a weight_scale_inv was given for a weight that is not float8_e4m3fn")
        return F.linear(x, weight)
    if scale is None:
        raise ValueError("a float8_e4m3fn weight needs its weight_scale_inv")
    out_f, in_f = weight.shape
    x2 = x.reshape(-1, in_f)  # (tokens, in)
    if x2.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], out_f)
    kind = resolve_impl(impl, x.device)
    if kind == "scaled_mm":
        y = _scaled_mm_or_fallback(x2, weight, scale, scale_fmt)
    elif kind == "emulate":
        y = _emulate(x2, weight, scale, scale_fmt)
    else:
        y = _weight_only(x2, weight, scale)
    return y.reshape(*x.shape[:-1], out_f)


def _emulate(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """Exact fallback: quantize-dequantize the activations (1x128), fp32 product with the exact weight."""
    xq = act_quant_dequant(x2, scale_fmt)  # (T, K) fp32, each value = e4m3 * fp32 scale exactly
    return _tiled_matmul(xq, weight, scale, torch.float32).to(x2.dtype)


def _scaled_mm_or_fallback(x2, weight, scale, scale_fmt):
    y = _decode_product(x2, weight, scale, scale_fmt)
    if y is not None:
        return y
    out_f, in_f = weight.shape
    key = (str(x2.device), out_f, in_f)
    if _scaled_mm_takes(*key):
        try:
            return _scaled_mm_blockwise(x2, weight, scale, scale_fmt)
        except (RuntimeError, NotImplementedError) as e:
            _SCALED_MM_BROKEN.add(key)
            warnings.warn(
                f"torch._scaled_mm with 1x128/128x128 block scales failed on {key[0]} for a {out_f}x{in_f} "
                f"weight ({e}); using the emulated FP8 path for that shape from now on",
                RuntimeWarning,
                stacklevel=3,
            )
    return _emulate(x2, weight, scale, scale_fmt)


def _scaled_mm_takes(device: str, out_f: int, in_f: int) -> bool:
    """Whether cuBLAS's blockwise GEMM serves an (out_f, in_f) weight on `device` (SCALED_MM_K; it
    refused that shape there before: `_SCALED_MM_BROKEN`)."""
    return (device, out_f, in_f) not in _SCALED_MM_BROKEN and in_f % SCALED_MM_K == 0 and out_f % 16 == 0


def _scaled_mm_blockwise(x2, weight, scale, scale_fmt):
    """cuBLAS blockwise FP8 GEMM: A (T, K) e4m3 with 1x128 scales, B = W^T with 128x128 scales.

    Token rows are zero-padded to a multiple of SCALED_MM_ROWS (their outputs are dropped). The
    activations are quantized by one Triton kernel where Triton is installed, else by `act_quant`
    (same numbers). fp32 activations get an fp32 output, anything else bf16 (cast back).
    """
    T = x2.shape[0]
    triton_quant = _triton_act_quant()
    if triton_quant is not None:
        xq, xs = triton_quant(x2, scale_fmt, SCALED_MM_ROWS, ACT_AMAX_FLOOR, FP8_MAX)
    else:
        pad = -T % SCALED_MM_ROWS
        xq, xs = act_quant(F.pad(x2, (0, 0, 0, pad)) if pad else x2, scale_fmt)  # (Tp, K) e4m3, (Tp, K/128)
        xs = xs.t().contiguous().t()  # 1x128 scales must be outer-dim-major (stride 1 along tokens)
    y = torch._scaled_mm(
        xq,
        weight.t(),  # (K, N) column-major view of the row-major (N, K) weight
        scale_a=xs,
        scale_b=scale.t(),  # (K/128, N/128), K-major
        out_dtype=torch.float32 if x2.dtype == torch.float32 else torch.bfloat16,
    )
    return (y[:T] if y.shape[0] != T else y).to(x2.dtype)


# ---- decode-sized products on CUDA: cuBLAS or our split-K Triton kernel, whichever is faster ----

DECODE_ROWS = 64
"""CUDA FP8 products of at most this many token rows may run `fp8_triton.fp8_gemm` (split-K) instead
of cuBLAS's blockwise GEMM, which leaves most of the GPU idle at such sizes."""
DECODE_GEMMS = ("cublas", "auto", "triton")
_DECODE_GEMM = ["cublas"]
_DECODE_CHOICE: dict[tuple, str] = {}
"""(device, N, K, token bucket, activation dtype) -> "triton" or "cublas": the product that
`_decode_product` took the first time it met that key."""


def set_decode_gemm(mode: str) -> None:
    """How decode-sized FP8 products run on CUDA (EngineConfig.fp8_decode_gemm, MOE_FP8_DECODE_GEMM):
    "cublas" (the default until a GPU run has measured the others): always torch._scaled_mm;
    "triton": our kernel wherever it agrees with the exact product; "auto": the first product of
    each weight shape and token bucket times both and keeps the faster. "auto" decides per process
    by timing, so two ranks may round the same product differently (ranks of an attention TP group
    compute the same latent); "cublas" and "triton" give every rank the same kernel for a shape."""
    if mode not in DECODE_GEMMS:
        raise ValueError(f"FP8 decode GEMM {mode!r}: expected one of {DECODE_GEMMS}")
    _DECODE_GEMM[0] = mode
    _DECODE_CHOICE.clear()


def _decode_product(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    scale_fmt: str | None) -> torch.Tensor | None:
    """x2 W^T by the Triton kernel when that is this key's choice; None: the caller uses cuBLAS."""
    T, (N, K) = x2.shape[0], weight.shape
    mode = _DECODE_GEMM[0]
    if mode == "cublas" or T > DECODE_ROWS or not x2.is_cuda or _triton_act_quant() is None:
        return None
    key = (str(x2.device), N, K, 1 << (T - 1).bit_length(), x2.dtype)
    choice = _DECODE_CHOICE.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return None  # nothing can be timed inside a CUDA-graph capture: cuBLAS this time
        choice = _DECODE_CHOICE[key] = _choose_decode_gemm(key, x2, weight, scale, scale_fmt, mode)
    if choice != "triton":
        return None
    try:  # (a token count of the bucket may compile another variant of the kernel)
        return _triton_product(x2, weight, scale, scale_fmt)
    except Exception as e:  # noqa: BLE001 - any failure of our kernel: cuBLAS for this key from now on
        _DECODE_CHOICE[key] = "cublas"
        warnings.warn(f"the Triton FP8 decode GEMM failed for a {N}x{K} weight at {T} tokens ({type(e).__name__}: "
                      f"{e}); using cuBLAS for that shape and token bucket from now on", RuntimeWarning, stacklevel=3)
        return None


def _choose_decode_gemm(key: tuple, x2, weight, scale, scale_fmt, mode: str) -> str:
    """Check the Triton product against the exact one (`_emulate`) and, in "auto", time it against
    cuBLAS (or against the emulated product where cuBLAS refuses the shape, see SCALED_MM_K)."""
    N, K = weight.shape
    cublas_ok = _scaled_mm_takes(str(x2.device), N, K)
    candidates: dict[str, Callable[[], torch.Tensor]] = {"triton": lambda: _triton_product(x2, weight, scale, scale_fmt)}
    if mode == "auto":
        other = _scaled_mm_blockwise if cublas_ok else _emulate
        candidates["cublas"] = lambda: other(x2, weight, scale, scale_fmt)
    reference = _emulate(x2.float(), weight, scale, scale_fmt)
    tol = 1e-3 if x2.dtype == torch.float32 else 8e-3  # as cuBLAS's own (tests/worker/test_worker_cuda.py)
    pick, report = choose_fastest(candidates, reference, tol, _cuda_time if mode == "auto" else None, default="cublas")
    log.info("FP8 decode GEMM %dx%d, up to %d tokens, %s: %s (%s)", N, K, key[3], x2.dtype, pick,
             ", ".join(f"{k} {v}" for k, v in report.items()))
    return pick


def choose_fastest(candidates: dict[str, Callable[[], torch.Tensor]], reference: torch.Tensor, tol: float,
                   timer: Callable[[Callable[[], torch.Tensor]], float] | None, default: str) -> tuple[str, dict[str, str]]:
    """The name of the fastest candidate whose result is within relative error `tol` of `reference`
    (by `timer(fn)` seconds; without a timer the first correct one), or `default` when none is;
    with what was found of each, for the log."""
    ok: dict[str, float] = {}
    report: dict[str, str] = {}
    for name, fn in candidates.items():
        try:
            y = fn().float()
            err = float((y - reference).norm() / reference.norm().clamp_min(1e-30))
        except Exception as e:  # noqa: BLE001 - a kernel that fails to build or run is not taken
            report[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        if not err <= tol:
            report[name] = f"wrong: relative error {err:.2e}"
            continue
        ok[name] = timer(fn) if timer is not None else 0.0
        report[name] = f"{ok[name] * 1e6:.1f} us" if timer is not None else "agrees"
    if not ok:
        return default, report
    return min(ok, key=ok.__getitem__), report


def _cuda_time(fn: Callable[[], torch.Tensor], runs: int = 20) -> float:
    """Median seconds of `fn` on the current CUDA stream (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _triton_product(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """x2 W^T by `fp8_triton`: the one-kernel activation quantizer, then the split-K blockwise GEMM
    (fp32 output for fp32 activations, else bf16, cast back to x2's dtype)."""
    from .fp8_triton import BLOCK_T, fp8_gemm

    T = x2.shape[0]
    xq, xs = _triton_act_quant()(x2, scale_fmt, BLOCK_T, ACT_AMAX_FLOOR, FP8_MAX)
    out = torch.float32 if x2.dtype == torch.float32 else torch.bfloat16
    split = decode_split_k(T, *weight.shape, torch.cuda.get_device_properties(x2.device).multi_processor_count)
    return fp8_gemm(xq, xs, weight, scale.contiguous(), T, out, split_k=split).to(x2.dtype)


def decode_split_k(tokens: int, n: int, k: int, sms: int, block_m: int = 16, block_n: int = 32) -> int:
    """K splits for `fp8_gemm` so that about two programs run per SM: the output tiles alone are
    too few for a GPU at decode sizes (an expert's 2048 x 7168 w1 at one token: 64 tiles for 132
    SMs). At most 8 splits, and at least two 128-wide K blocks each."""
    tiles = -(-tokens // block_m) * -(-n // block_n)
    blocks = -(-k // FP8_BLOCK)
    return max(1, min(8, blocks // 2, round(2 * sms / tiles)))


_TRITON_ACT_QUANT: list = []


def _triton_act_quant():
    """fp8_triton.act_quant_padded, or None where Triton is not installed (imported once)."""
    if not _TRITON_ACT_QUANT:
        try:
            from .fp8_triton import act_quant_padded
        except ImportError:
            act_quant_padded = None
        _TRITON_ACT_QUANT.append(act_quant_padded)
    return _TRITON_ACT_QUANT[0]


@dataclass(frozen=True)
class Shard:
    """The part of a full (out, in) weight that one rank of a tensor-parallel group holds: along
    `dim` (0: output rows, 1: input columns) entries [start, stop) of `full`.

    A row shard stores [lo, hi): the range widened to whole blocks of `block` (128 for FP8
    weights, 1 otherwise), so that it multiplies with the checkpoint's own 128x128 block scales;
    the widened rows are cut from the output (exact: an output row depends on its own weight row
    only). An FP8 column shard must be whole blocks: FP8 quantizes the input per 128 columns, and
    a group cut between ranks would round differently from the unsharded product (`MLA.o_split`)."""

    dim: int
    start: int
    stop: int
    full: int
    block: int = 1

    @property
    def lo(self) -> int:
        return self.start // self.block * self.block

    @property
    def hi(self) -> int:
        return min(-(-self.stop // self.block) * self.block, self.full)

    @property
    def widened(self) -> bool:
        return (self.lo, self.hi) != (self.start, self.stop)


def new_weight(rows: int, cols: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """An empty (rows, cols) = (out, in) weight. An fp32 weight on the CPU is stored column-major
    (its transpose is contiguous): MKL multiplies a few rows by it (decode) faster than by a
    row-major one, and many rows as fast. The loader fills weights in place, so the layout stays;
    the values and shape do not change."""
    if dtype == torch.float32 and torch.device("cpu" if device is None else device).type == "cpu":
        return torch.empty(cols, rows, dtype=dtype, device=device).t()
    return torch.empty(rows, cols, dtype=dtype, device=device)


class Linear(nn.Module):
    """y = x W^T without bias. Holds `weight` (out, in) and, for e4m3 weights, `scale` = weight_scale_inv.

    The checkpoint decides nothing here: the model builds each Linear as fp8 or not (from
    `ModelArgs.quantization`), and the loader checks that the stored tensors agree. With a
    `shard` (tensor parallelism) `in_features`/`out_features` are the full weight's and the rank
    holds `shard`'s part of it; `weight` is (stored rows, stored columns).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        fp8: bool = False,
        device: torch.device | str | None = None,
        shard: tuple[int, int, int] | None = None,
    ):
        """shard: (dim, start, stop) of the full weight this rank holds (see `Shard`)."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.impl: str = "auto"
        """How an fp8 product is computed: one of IMPLS (see module docstring)."""
        self.scale_fmt: str | None = None
        """Activation scale format, from ModelArgs.quantization.scale_fmt."""
        self.shard: Shard | None = None
        rows, cols = out_features, in_features
        if shard is not None:
            dim, start, stop = shard
            full = (out_features, in_features)[dim]
            if dim not in (0, 1) or not 0 <= start < stop <= full:
                raise ValueError(f"shard {shard} of a ({out_features}, {in_features}) weight")
            self.shard = Shard(dim, start, stop, full, FP8_BLOCK if fp8 else 1)
            if dim == 1 and self.shard.widened:
                raise ValueError(f"FP8 column shard {start}:{stop} of {full} is not whole {FP8_BLOCK}-column blocks")
            part = self.shard.hi - self.shard.lo
            rows, cols = (part, cols) if dim == 0 else (rows, part)
        wdtype = FP8_DTYPE if fp8 else dtype
        self.weight = nn.Parameter(new_weight(rows, cols, wdtype, device), requires_grad=False)
        if fp8:
            self.scale = nn.Parameter(torch.empty(scale_shape(rows, cols), dtype=torch.float32, device=device),
                                      requires_grad=False)
        else:
            self.register_parameter("scale", None)

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == FP8_DTYPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, s = self.weight, self.shard
        if w.dtype != FP8_DTYPE and s is None:
            return F.linear(x, w)  # (the common case, straight)
        y = linear(x, w, self.scale, impl=self.impl, scale_fmt=self.scale_fmt)
        if s is not None and s.widened:  # (rows only)
            y = y[..., s.start - s.lo:s.stop - s.lo]
        return y

    __call__ = forward
    """Called straight, without nn.Module's call machinery (hooks): a leaf that runs ~50 times per
    decoded token, where that machinery costs about as much as a small product."""

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) weight in `dtype` (default: the activation dtype for float weights, fp32 for
        fp8); with a shard, the rank's part of it ((stop - start) rows or columns)."""
        if not self.is_fp8:
            w = self.weight if dtype is None else self.weight.to(dtype)
        else:
            w = dequantize_weight(self.weight, self.scale, dtype or torch.float32)
        s = self.shard
        if s is not None and s.widened:
            w = w.narrow(s.dim, s.start - s.lo, s.stop - s.start)
        return w

    def extra_repr(self) -> str:
        kind = "fp8 e4m3 128x128" if self.is_fp8 else str(self.weight.dtype).replace("torch.", "")
        part = "" if self.shard is None else f", {('rows', 'columns')[self.shard.dim]} {self.shard.start}:{self.shard.stop}"
        return f"in={self.in_features}, out={self.out_features}, {kind}{part}"
