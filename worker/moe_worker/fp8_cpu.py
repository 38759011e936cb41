"""A fused FP8 x bf16 product for few tokens on x86 CPUs with AVX512-BF16 (C, built on first use).

The PyTorch `weight_only` path decodes e4m3 weights into a bf16 scratch tile in memory and then
multiplies: at decode sizes (a few tokens) that extra pass over the weights is most of its time.
This kernel decodes 32 weights at a time into registers and feeds them straight to `vdpbf16ps`:
each weight byte is read once, nothing is written back. Four weight rows share each activation load
(four independent accumulation chains), and every row stream is prefetched 2 KB ahead: without the
prefetch, cold weights (a rank's experts never fit in cache) arrived at a third of the bandwidth.

From 5 to 16 tokens `matmul_rounded` decodes to bf16(value * s) instead (DeepSeek's weight_dequant
rounding): the scale inside the weight frees the per-block accumulators, so two rows x eight tokens
fit the registers. Above 16 tokens `dequant_rows` writes such rows into a tile for PyTorch's GEMM.

Its speed against bf16 and against PyTorch's own path: `bench/expert.py --impls weight_only`
(figures in the README).

Numbers: every e4m3 value is a normal bf16 number, written exactly (normals by integer ops, the 7
subnormal codes by a table), and the activations enter as bf16. So each product is exact (except
that `vdpbf16ps` reads bf16 subnormal activations, below 2**-126, as zero, and flushes such
products), the sum of one 128-wide block is accumulated in fp32 and
multiplied by that block's scale in fp32, and the only rounding besides fp32 summation is the
output's. DeepSeek's bf16 path (dequantize to bf16, bf16 matmul) rounds the weights too.

The two e4m3 NaN codes decode as +-480, as `fp8.dequantize_weight` reads them (real weights never
hold them: quantization saturates at 448).

Built with the system C compiler into ~/.cache/moe-operator/kernels (source hash in the name) the
first time it is needed; where there is no compiler or no AVX512-BF16, `kernel()` is None and
`fp8.linear` keeps the PyTorch path. `MOE_FP8_CPU_KERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

MAX_TOKENS = 4
"""Up to this many tokens `matmul` (exact products; the fastest there: four rows share each
activation load). Beyond, its per-block accumulators leave room for one row at a time and every
row re-reads all tokens' activations, and `matmul_rounded` is faster."""
ROUNDED_MAX_TOKENS = 16
"""Up to this many tokens `matmul_rounded`; beyond, dequantized tiles into PyTorch's GEMM are faster
(the crossover `bench/expert.py --tokens 8,16,24 --impls weight_only` shows; the exact kernel is
slower than the rounded one from 8 tokens on)."""

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

/* 32 e4m3 codes -> 32 bf16 lanes holding their values exactly (every e4m3 value is a normal bf16).
   A normal code S EEEE MMM is 2**(E-7) * (1 + M/8): its bf16 has the sign, exponent field E + 120
   and mantissa MMM0000. Sign-extending the byte to 16 bits and shifting left by 4 puts S in bit 15
   and EEEEMMM in bits 10..4 (the mask clears the extension's copies of S), and adding 120 << 7
   rebases the exponent (no carry reaches the sign). The 7 subnormal codes (E == 0: M * 2**-9) and
   zero come from an 8-entry table; they are rare in real weights, so the lookup is a branch. */
static inline __m512i decode32(const uint8_t *p, __mmask32 valid, __m512i table) {
    __m512i b = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(valid, p));
    __m512i v = _mm512_and_si512(_mm512_slli_epi16(b, 4), _mm512_set1_epi16((short)0x87F0));
    __mmask32 sub = _mm512_testn_epi16_mask(v, _mm512_set1_epi16(0x0780));
    v = _mm512_add_epi16(v, _mm512_set1_epi16(120 << 7));
    if (sub) {
        __m512i mag = _mm512_permutexvar_epi16(b, table); /* index: the low 5 bits, M when E == 0 */
        __m512i sign = _mm512_and_si512(v, _mm512_set1_epi16((short)0x8000));
        v = _mm512_mask_mov_epi16(v, sub, _mm512_or_si512(mag, sign));
    }
    return v;
}

/* The first min(left, 32) of 32 lanes: the columns left in a row or block. */
static inline __mmask32 tail_mask(int left) {
    return left >= 32 ? (__mmask32)0xFFFFFFFFu : (((__mmask32)1 << left) - 1);
}

/* bf16 bits of M * 2**-9 for M = 0..7 (0 stays 0): decode32's table. */
static inline __m512i subnormal_table(void) {
    static const short sub[8] = {0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};
    return _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)sub));
}

/* decode32's lanes (the values) times the block scale sc, rounded once to bf16: bf16(value * s). */
static inline __m512i scale32(__m512i w, __m512 sc) {
    __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
    __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, sc), _mm512_mul_ps(lo, sc));
}

#define PREFETCH 2048 /* bytes ahead in each weight row: cold weights arrive from DRAM in time */
/* Row n + r of a group of R, k bytes in: prefetch the same row further on, or the next group's. */
#define PREFETCH_ROW(q, K, n, r, R, k)                                                               \
    do {                                                                                            \
        long ahead_ = (long)(k) + PREFETCH;                                                         \
        _mm_prefetch((const char *)((q) + (ahead_ < (K) ? (long)((n) + (r)) * (K) + ahead_             \
                                               : (long)((n) + (R) + (r)) * (K) + ahead_ - (K))), _MM_HINT_T0); \
    } while (0)

/* y[t, n] (fp32) = sum_k x[t, k] * w[n, k] for rows n0 <= n < n1 in groups of R rows, TT tokens.
   x: (T, K) bf16, row stride ldx (>= K, zero-padded to a multiple of 32);
   q: (N, K) e4m3 codes; s: (ceil(N/128), ceil(K/128)) fp32 block scales. R rows share one decoded
   activation load and give R * TT independent accumulation chains (one chain alone is latency-bound);
   R divides 128 and n0 is a multiple of R, so a group's rows share their block scales. */
#define KERNEL(R, TT)                                                                                \
static void rows_##R##_##TT(const uint16_t *x, long ldx, int K, const uint8_t *q, const float *s,      \
                            int KB, float *y, long ldy, int n0, int n1, __m512i table) {              \
    for (int n = n0; n + R <= n1; n += R) {                                                         \
        const float *sr = s + (long)(n / 128) * KB;                                                 \
        __m512 acc[R][TT];                                                                          \
        for (int r = 0; r < R; r++)                                                                 \
            for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();                           \
        for (int kb = 0; kb < KB; kb++) {                                                           \
            __m512 blk[R][TT];                                                                      \
            for (int r = 0; r < R; r++)                                                             \
                for (int t = 0; t < TT; t++) blk[r][t] = _mm512_setzero_ps();                       \
            int k1 = (kb + 1) * 128 < K ? (kb + 1) * 128 : K;                                       \
            for (int k = kb * 128; k < k1; k += 32) {                                               \
                __mmask32 valid = tail_mask(k1 - k);                                                \
                __m512i xv[TT];                                                                     \
                for (int t = 0; t < TT; t++) xv[t] = _mm512_loadu_si512((const void *)(x + t * ldx + k)); \
                for (int r = 0; r < R; r++) {                                                       \
                    PREFETCH_ROW(q, K, n, r, R, k);                                                 \
                    __m512i w = decode32(q + (long)(n + r) * K + k, valid, table);                  \
                    for (int t = 0; t < TT; t++)                                                    \
                        blk[r][t] = _mm512_dpbf16_ps(blk[r][t], (__m512bh)xv[t], (__m512bh)w);      \
                }                                                                                   \
            }                                                                                       \
            __m512 sc = _mm512_set1_ps(sr[kb]);                                                     \
            for (int r = 0; r < R; r++)                                                             \
                for (int t = 0; t < TT; t++) acc[r][t] = _mm512_fmadd_ps(blk[r][t], sc, acc[r][t]); \
        }                                                                                           \
        for (int r = 0; r < R; r++)                                                                 \
            for (int t = 0; t < TT; t++) y[t * ldy + n + r] = _mm512_reduce_add_ps(acc[r][t]);      \
    }                                                                                               \
}
KERNEL(4, 1)
KERNEL(4, 2)
KERNEL(2, 4)
KERNEL(1, 8)
KERNEL(1, 1)
KERNEL(1, 2)
KERNEL(1, 4)

typedef void (*rows_fn)(const uint16_t *, long, int, const uint8_t *, const float *, int, float *, long,
                        int, int, __m512i);

/* How one kernel family takes T tokens: chunks of TT tokens, largest first; each chunk runs the
   R-row kernel over whole groups of rows, then the one-row kernel over the rows left. */
typedef struct { int tt, r; rows_fn grouped, single; } chunk;

static void by_chunks(const chunk *plan, const uint16_t *x, long ldx, int T, int K, const uint8_t *q,
                      const float *s, int KB, float *y, long ldy, int n0, int n1, __m512i table) {
    int t = 0;
    for (const chunk *c = plan; c->tt; c++)
        for (; t + c->tt <= T; t += c->tt) {
            int whole = n0 + (n1 - n0) / c->r * c->r;
            c->grouped(x + t * ldx, ldx, K, q, s, KB, y + t * ldy, ldy, n0, whole, table);
            if (whole < n1) c->single(x + t * ldx, ldx, K, q, s, KB, y + t * ldy, ldy, whole, n1, table);
        }
}

static const chunk EXACT[] = {
    {8, 1, rows_1_8, rows_1_8}, {4, 2, rows_2_4, rows_1_4}, {2, 4, rows_4_2, rows_1_2}, {1, 4, rows_4_1, rows_1_1}, {0}};

/* The rounded variant, for more tokens: weights decoded to bf16(value * s) in registers (DeepSeek's
   weight_dequant rounding, one per weight) and multiplied with plain bf16(x); with the scale inside
   the weight no per-block accumulators are needed, so two rows x eight tokens fit the registers
   and each activation load serves two rows. */
#define KERNEL_ROUNDED(R, TT)                                                                        \
static void rrows_##R##_##TT(const uint16_t *x, long ldx, int K, const uint8_t *q, const float *s,     \
                             int KB, float *y, long ldy, int n0, int n1, __m512i table) {             \
    for (int n = n0; n + R <= n1; n += R) {                                                         \
        const float *sr = s + (long)(n / 128) * KB;                                                 \
        __m512 acc[R][TT];                                                                          \
        for (int r = 0; r < R; r++)                                                                 \
            for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();                           \
        for (int k = 0; k < K; k += 32) {                                                           \
            __mmask32 valid = tail_mask(K - k);                                                     \
            __m512 sc = _mm512_set1_ps(sr[k / 128]);                                                \
            __m512i xv[TT];                                                                         \
            for (int t = 0; t < TT; t++) xv[t] = _mm512_loadu_si512((const void *)(x + t * ldx + k)); \
            for (int r = 0; r < R; r++) {                                                           \
                PREFETCH_ROW(q, K, n, r, R, k);                                                     \
                __m512i w = scale32(decode32(q + (long)(n + r) * K + k, valid, table), sc);         \
                for (int t = 0; t < TT; t++)                                                        \
                    acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)xv[t], (__m512bh)w);          \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < R; r++)                                                                 \
            for (int t = 0; t < TT; t++) y[t * ldy + n + r] = _mm512_reduce_add_ps(acc[r][t]);      \
    }                                                                                               \
}
KERNEL_ROUNDED(2, 8)
KERNEL_ROUNDED(1, 8)
KERNEL_ROUNDED(4, 4)
KERNEL_ROUNDED(1, 4)
KERNEL_ROUNDED(4, 2)
KERNEL_ROUNDED(1, 2)
KERNEL_ROUNDED(4, 1)
KERNEL_ROUNDED(1, 1)

static const chunk ROUNDED[] = {
    {8, 2, rrows_2_8, rrows_1_8}, {4, 4, rrows_4_4, rrows_1_4}, {2, 4, rrows_4_2, rrows_1_2}, {1, 4, rrows_4_1, rrows_1_1},
    {0}};

/* out[n - n0, k] = bf16(value(q[n, k]) * s[n / 128, k / 128]) for n0 <= n < n1: the fp32 product
   rounded once to nearest even, as DeepSeek's weight_dequant (and fp8.dequantize_weight) computes it.
   out has row stride ldo >= K. */
static void dequant_rows(const uint8_t *q, int K, const float *s, int KB, uint16_t *out, long ldo,
                         int n0, int n1, __m512i table) {
    for (int n = n0; n < n1; n++) {
        const uint8_t *qr = q + (long)n * K;
        const float *sr = s + (long)(n / 128) * KB;
        uint16_t *o = out + (long)(n - n0) * ldo;
        for (int k = 0; k < K; k += 32) {
            __mmask32 valid = tail_mask(K - k);
            _mm_prefetch((const char *)(qr + k + PREFETCH), _MM_HINT_T0);
            __m512 sc = _mm512_set1_ps(sr[k / 128]);
            _mm512_mask_storeu_epi16(o + k, valid, scale32(decode32(qr + k, valid, table), sc));
        }
    }
}

void fp8_dequant(const uint8_t *q, int K, const float *s, int KB, uint16_t *out, long ldo, int n0, int n1,
                 int threads) {
    __m512i table = subnormal_table();
    int rows = n1 - n0, per = (rows + threads - 1) / threads;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < threads; i++) {
        int a = n0 + i * per, b = a + per < n1 ? a + per : n1;
        if (a < b) dequant_rows(q, K, s, KB, out + (long)(a - n0) * ldo, ldo, a, b, table);
    }
}

/* All N rows, 128-row blocks spread over `threads` OpenMP threads. Built with -fopenmp, this
   library needs libgomp.so.1, which the loader finds already loaded by PyTorch: the same runtime
   and thread pool as PyTorch's own operators, so no second set of threads spins against them.
   rounded: the weights are rounded to bf16(value * s) (the rrows kernels), else products are exact. */
void fp8_matmul(const uint16_t *x, long ldx, int T, int K, const uint8_t *q, const float *s, int KB,
                float *y, long ldy, int N, int threads, int rounded) {
    __m512i table = subnormal_table();
    int blocks = (N + 127) / 128;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        int n1 = (b + 1) * 128 < N ? (b + 1) * 128 : N;
        by_chunks(rounded ? ROUNDED : EXACT, x, ldx, T, K, q, s, KB, y, ldy, b * 128, n1, table);
    }
}
"""

_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_state: dict = {}


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return all(f in have for f in flags)
    return False


def _build() -> ctypes.CDLL | None:
    if os.environ.get("MOE_FP8_CPU_KERNEL", "1") == "0":
        return None
    if not _cpu_has("avx512f", "avx512bw", "avx512vl", "avx512_bf16"):
        return None
    try:
        return _compile_and_load()
    except (OSError, subprocess.SubprocessError) as e:  # no compiler, unwritable cache, noexec mount, ...
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(
            f"FP8 CPU kernel unavailable ({e}{': ' + detail.decode(errors='replace')[-500:] if detail else ''}); "
            "using the PyTorch path",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _compile_and_load() -> ctypes.CDLL:
    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = Path(base) / "moe-operator" / "kernels"
    lib = cache / f"fp8_cpu-{digest}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "fp8_cpu.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / lib.name
            cc = os.environ.get("CC", "cc")
            subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], check=True, capture_output=True, timeout=120)
            os.replace(out, lib)  # atomic: concurrent ranks may build the same file
    dll = ctypes.CDLL(str(lib))
    f = dll.fp8_matmul
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int]  # fmt: skip
    f = dll.fp8_dequant
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                  ctypes.c_int, ctypes.c_int, ctypes.c_int]  # fmt: skip
    return dll


def _check(q: torch.Tensor, scale: torch.Tensor) -> ctypes.CDLL:
    """The library, after checking what the kernels read without bounds checks of their own."""
    dll = kernel()
    if dll is None:
        raise RuntimeError("the FP8 CPU kernel is not available here (see fp8_cpu.kernel())")
    N, K = q.shape
    want = (-(-N // 128), -(-K // 128))
    if q.dtype != torch.float8_e4m3fn or q.device.type != "cpu":
        raise ValueError(f"weight: expected float8_e4m3fn on the CPU, got {q.dtype} on {q.device}")
    if scale.device.type != "cpu" or tuple(scale.shape) != want:
        raise ValueError(f"weight_scale_inv: expected shape {want} on the CPU, got {tuple(scale.shape)} on {scale.device}")
    return dll


def kernel():
    """The loaded library, or None where it cannot be built or run here (built once per process)."""
    with _lock:
        if "dll" not in _state:
            _state["dll"] = _build()
        return _state["dll"]


def matmul(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 (T, K) bf16; q (N, K) e4m3; scale (ceil(N/128), ceil(K/128)) fp32 -> (T, N)
    bf16 = x2 @ dequant(q, scale)^T with exact products and fp32 sums (fastest up to MAX_TOKENS)."""
    return _matmul(x2, q, scale, rounded=False)


def matmul_rounded(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 (T, K) bf16 @ bf16(dequant(q, scale))^T -> (T, N) bf16: the weights rounded once to bf16
    as DeepSeek's weight_dequant does, decoded in registers, fp32 sums (up to ROUNDED_MAX_TOKENS)."""
    return _matmul(x2, q, scale, rounded=True)


def _matmul(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rounded: bool) -> torch.Tensor:
    dll = _check(q, scale)
    if x2.dtype != torch.bfloat16 or x2.device.type != "cpu" or x2.dim() != 2 or x2.shape[1] != q.shape[1]:
        raise ValueError(f"activations: expected bf16 (T, {q.shape[1]}) on the CPU, got {x2.dtype} "
                         f"{tuple(x2.shape)} on {x2.device}")  # fmt: skip
    T, K = x2.shape
    N = q.shape[0]
    kp = -(-K // 32) * 32
    xs = torch.zeros(T, kp, dtype=torch.bfloat16)
    xs[:, :K] = x2
    qc = q.contiguous().view(torch.uint8)
    sc = scale.float().contiguous()
    y = torch.empty(T, N, dtype=torch.float32)
    threads = max(1, min(torch.get_num_threads(), -(-N // 128)))
    dll.fp8_matmul(xs.data_ptr(), kp, T, K, qc.data_ptr(), sc.data_ptr(), sc.shape[1], y.data_ptr(), N, N, threads,
                   int(rounded))  # fmt: skip
    return y.to(torch.bfloat16)


def dequant_rows(q: torch.Tensor, scale: torch.Tensor, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows n0..n1 of the e4m3 weight q (N, K) with its block scales, as bf16 into out[: n1 - n0, :K]
    (out: bf16, row stride >= K, contiguous rows): bf16(value * s), the fp32 product rounded once."""
    dll = _check(q, scale)
    N, K = q.shape
    if not (q.is_contiguous() and scale.dtype == torch.float32 and scale.is_contiguous()):
        raise ValueError("dequant_rows needs a contiguous weight and contiguous fp32 scales")
    if not 0 <= n0 <= n1 <= N:
        raise ValueError(f"rows {n0}..{n1} outside the weight's 0..{N}")
    if out.dtype != torch.bfloat16 or out.stride(1) != 1 or out.shape[0] < n1 - n0 or out.shape[1] < K:
        raise ValueError("dequant_rows needs a bf16 output of at least (rows, K) with unit column stride")
    threads = max(1, min(torch.get_num_threads(), n1 - n0))
    dll.fp8_dequant(q.view(torch.uint8).data_ptr(), K, scale.data_ptr(), scale.shape[1], out.data_ptr(),
                    out.stride(0), n0, n1, threads)  # fmt: skip
    return out

