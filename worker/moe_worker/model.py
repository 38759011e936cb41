"""DeepSeek-V3 in plain PyTorch: MLA attention, sigmoid group-limited gate, SwiGLU experts.

Follows deepseek-ai/DeepSeek-V3 `inference/model.py` (the semantics of the released weights) and
is checked against Hugging Face transformers' `DeepseekV3ForCausalLM`. Where the two differ we do
what the reference does and say so:
- RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... as the reference's complex multiply. HF
  with `rope_interleave=True` de-interleaves its output; q and k get the same permutation, so the
  scores q.k are equal. The cached rope key here keeps the reference layout.
- The router logits are computed in fp32 (as HF; the reference uses the activation dtype). The
  bias `e_score_correction_bias` only selects; weights come from the unbiased sigmoid scores.
  Non-selected groups are masked with -inf (reference, HF 5.x; HF 4.51 masked with 0.0, which
  picks differently when biased scores are negative).
- Expert outputs are combined in fp32 and cast once (the reference adds in bf16).
- HF's YaRN rules are used (`config.YarnScaling`): for DeepSeek-V3's config (mscale ==
  mscale_all_dim == 1) they equal the reference: no cos/sin factor, softmax scale * mscale**2.

Parallelism hooks (the model itself has no collectives and never imports torch.distributed):
- `ParallelContext` is passed in and kept on the model for the runtime.
- Each `MoE` holds only the experts this rank owns (`owned_experts`), and computes the routed part
  through one replaceable callable, `MoE.routed(x, topk_ids, topk_weights, experts, layer_id)`.
  The default `run_local_experts` needs every selected expert to be local; an expert-parallel
  runtime swaps in a dispatch -> `run_local_experts` -> combine object without touching the rest.

Shapes: B batch, S new tokens, T cached + new tokens, H heads, D hidden, C kv_lora_rank,
R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, E routed experts, K top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moe_common.model_args import FP8_BLOCK, ModelArgs, o_proj_splits

from .fp8 import Linear, linear, new_weight

AttnImpl = Literal["naive", "absorb"]


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in its expert-parallel group. The model only stores it."""

    rank: int = 0
    """This process's rank in the group (its column of the expert map)."""
    world_size: int = 1
    """Ranks of the group's expert map."""
    group: Any = None
    """The torch.distributed process group, or None for a single process."""
    members: tuple[int, ...] | None = None
    """The ranks in `group`, in group order, when some of the map's ranks are lost (the group
    serves on without them); None: every rank, group rank = rank."""
    tp: int = 1
    """Attention tensor-parallel degree: ranks [g * tp, (g + 1) * tp) split the attention heads
    of the sequences they serve together (`tp_rank` = rank % tp)."""
    tp_group: Any = None
    """The process group of this rank's TP group (None: tp == 1, or a member of it is lost)."""

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def tp_ranks(self) -> range:
        return tp_group(self.rank, self.tp)

    def live(self) -> tuple[int, ...]:
        """The ranks in the process group, ascending."""
        return self.members if self.members is not None else tuple(range(self.world_size))


def tp_group(rank: int, tp: int) -> range:
    """The ranks of `rank`'s attention TP group: the block of `tp` consecutive ranks it is in."""
    first = rank - rank % tp
    return range(first, first + tp)


def all_experts(args: ModelArgs) -> dict[int, range]:
    """Ownership map of a single process: every routed expert of every MoE layer."""
    return {layer: range(args.n_routed_experts) for layer in args.moe_layers}


# ---------------------------------------------------------------------------------------------
# Small modules
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight (as HF)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # (a module attribute costs a lookup each time it is read)
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return F.rms_norm(x, w.shape, w, self.eps)  # one call; on CPU bitwise the same
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    __call__ = forward  # a leaf: called straight, without nn.Module's call machinery (as fp8.Linear)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 (x itself when it is: `.float()` costs a dispatch even then, ~70 per token)."""
    return x if x.dtype == torch.float32 else x.float()


class Rotary(nn.Module):
    """RoPE with DeepSeek-V3's YaRN frequencies, for the R = qk_rope_head_dim rotated dims."""

    def __init__(self, args: ModelArgs, device=None):
        super().__init__()
        dim, base = args.qk_rope_head_dim, args.rope_theta
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))  # (R/2,)
        self.attention_factor = 1.0
        y = args.rope_scaling
        if y is not None:
            # YaRN (reference precompute_freqs_cis, HF _compute_yarn_parameters with truncate=True):
            # frequencies rotating fewer than beta_slow times over the original context are divided
            # by `factor`, those rotating more than beta_fast times are kept, a linear ramp between.
            def correction_dim(rotations: float) -> float:
                return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

            low = max(math.floor(correction_dim(y.beta_fast)), 0)
            high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
            keep = 1 - ramp  # 1: extrapolate (unscaled), 0: interpolate
            inv_freq = inv_freq / y.factor * (1 - keep) + inv_freq * keep
            self.attention_factor = y.attention_factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (S,) int -> the rotation (S, R/2) complex64: (cos + i sin) x attention factor."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return torch.complex(angles.cos() * self.attention_factor, angles.sin() * self.attention_factor)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, S, [H,] R) by `rot` (S, R/2) (`Rotary`); computed in fp32,
    as a complex product (pair (a, b) times cos + i sin: a cos - b sin, a sin + b cos)."""
    if x.dim() > 3:
        rot = rot.view(rot.shape[0], *(1,) * (x.dim() - 3), rot.shape[1])  # (S, 1, R/2)
    pairs = _fp32(x).unflatten(-1, (-1, 2))  # (..., R/2, 2)
    if pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-2]):
        pairs = pairs.contiguous()  # (a complex view needs every pair at an even offset)
    xc = torch.view_as_complex(pairs)  # (..., R/2)
    out = torch.view_as_real(xc * rot).flatten(-2)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


@dataclass
class Stacked:
    """Linears that read the same input, as one product: their weights (and FP8 scales) are views
    of one tensor stacked along the output rows, which the loader fills in place. With FP8 weights
    every part but the last must be whole 128-row blocks (the scales then stack too)."""

    first: Linear
    weight: torch.Tensor
    scale: torch.Tensor | None

    @classmethod
    def of(cls, *linears: Linear) -> Stacked:
        return cls(linears[0], _stack(linears, "weight"), _stack(linears, "scale") if linears[0].is_fp8 else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x through every part, outputs side by side; None when the parts' weights are no longer
        views of the stack (re-pointed by `.to()` or an assignment): the caller runs them one by one."""
        f = self.first
        if f.weight.data_ptr() != self.weight.data_ptr():
            return None
        if self.scale is None:
            return F.linear(x, self.weight)
        return linear(x, self.weight, self.scale, impl=f.impl, scale_fmt=f.scale_fmt)


def _stack(linears: tuple[Linear, ...], name: str) -> torch.Tensor:
    """One tensor for the linears' `name` (weight or scale) stacked along dim 0; each linear's
    becomes a view of its part."""
    parts = [getattr(lin, name) for lin in linears]
    a, rows = parts[0], sum(p.shape[0] for p in parts)
    both = (new_weight(rows, a.shape[1], a.dtype, a.device) if name == "weight"
            else torch.empty((rows, *a.shape[1:]), dtype=a.dtype, device=a.device))
    start = 0
    for lin, p in zip(linears, parts, strict=True):
        setattr(lin, name, nn.Parameter(both[start:start + p.shape[0]], requires_grad=False))
        start += p.shape[0]
    return both


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Dense layers, the shared expert and every routed expert.

    w1 and w3 are the two halves of one (2 x inter, dim) weight (`Stacked`), so both take one GEMM.
    With FP8 weights that needs whole 128-row blocks per half; otherwise they stay two GEMMs."""

    def __init__(self, dim: int, inter_dim: int, *, dtype: torch.dtype, fp8: bool, device=None):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, dtype=dtype, fp8=fp8, device=device)  # gate_proj
        self.w2 = Linear(inter_dim, dim, dtype=dtype, fp8=fp8, device=device)  # down_proj
        self.w3 = Linear(dim, inter_dim, dtype=dtype, fp8=fp8, device=device)  # up_proj
        self.w13 = Stacked.of(self.w1, self.w3) if not fp8 or inter_dim % FP8_BLOCK == 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.w13(x) if self.w13 is not None else None
        if both is not None:
            gate, up = _fp32(both).chunk(2, dim=-1)
        else:
            gate, up = _fp32(self.w1(x)), _fp32(self.w3(x))
        h = F.silu(gate) * up  # (..., inter) in fp32, as the reference
        return self.w2(h if x.dtype == torch.float32 else h.to(x.dtype))

    __call__ = forward  # called straight, as fp8.Linear: ~20 times per decoded token


# ---------------------------------------------------------------------------------------------
# MLA attention
# ---------------------------------------------------------------------------------------------


class LayerCache:
    """Attention state of one layer for a batch of sequences that advance together.

    absorb: `kv` (B, T_max, C) normalised latent and `pe` (B, T_max, R) rotated key: C + R values
    per token. naive: `k` (B, T_max, H, N + R) and `v` (B, T_max, H, V), the reference's full cache.
    """

    def __init__(self, args: ModelArgs, impl: AttnImpl, batch: int, max_len: int, dtype, device=None,
                 heads: int | None = None):
        self.impl = impl
        H = heads or args.num_attention_heads  # naive: this rank's heads (attention TP)
        if impl == "absorb":
            self.kv = torch.zeros(batch, max_len, args.kv_lora_rank, dtype=dtype, device=device)
            self.pe = torch.zeros(batch, max_len, args.qk_rope_head_dim, dtype=dtype, device=device)
        else:
            self.k = torch.zeros(batch, max_len, H, args.qk_head_dim, dtype=dtype, device=device)
            self.v = torch.zeros(batch, max_len, H, args.v_head_dim, dtype=dtype, device=device)

    # One sequence's latent store (batch row 0), as the packed path uses it; see PagedView.
    def write(self, start: int, kv: torch.Tensor, pe: torch.Tensor) -> None:
        self.kv[0, start:start + kv.shape[0]] = kv
        self.pe[0, start:start + pe.shape[0]] = pe

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[0, :end], self.pe[0, :end]

    @property
    def length(self) -> int:
        return self.kv.shape[1] if self.impl == "absorb" else self.k.shape[1]


class PagedLatentCache:
    """One rank's latent cache (absorbed attention) for all its sequences, in fixed-size pages.

    Per layer one pool of `pages * page_size` rows of the normalised latent (C) and the rotated
    key (R). A sequence gets the pages its positions need when it is admitted and gives them back
    when it ends: no per-sequence allocation, no fragmentation, and the decode step gathers every
    sequence's keys from one pool with one index (its block table, as FlashMLA pages its cache).
    The pools are `torch.empty`: on CPU untouched pages cost no memory; on a GPU the size comes
    from the operator's memory model (MOE_KV_CACHE_TOKENS)."""

    def __init__(self, args: ModelArgs, pages: int, page_size: int, dtype: torch.dtype, device=None):
        if pages < 1 or page_size < 1:
            raise ValueError(f"a paged cache needs pages >= 1 and page_size >= 1, got {pages} x {page_size}")
        rows = pages * page_size + 1
        self.page_size, self.pages = page_size, pages
        self.scratch_row = rows - 1
        """A row no sequence holds: where padding rows of a fixed-size decode batch (`DecodeGraphs`)
        write and read their latent."""
        self.kv = [torch.empty(rows, args.kv_lora_rank, dtype=dtype, device=device)
                   for _ in range(args.num_hidden_layers)]
        self.pe = [torch.empty(rows, args.qk_rope_head_dim, dtype=dtype, device=device)
                   for _ in range(args.num_hidden_layers)]
        self._free = list(range(pages - 1, -1, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def allocate(self, positions: int) -> PagedSeq:
        """Pages for `positions` positions; MemoryError when the pool has too few free."""
        need = -(-positions // self.page_size)
        if need > len(self._free):
            raise MemoryError(f"the paged KV cache has {len(self._free)} free pages of {self.page_size} positions, "
                              f"{need} needed for {positions}")
        pages = [self._free.pop() for _ in range(need)]
        device = self.kv[0].device
        slots = (torch.tensor(pages, device=device)[:, None] * self.page_size
                 + torch.arange(self.page_size, device=device)[None, :]).flatten()[:positions]
        return PagedSeq(pages, slots, positions)

    def release(self, seq: PagedSeq) -> None:
        self._free.extend(reversed(seq.pages))
        seq.pages = []

    def view(self, seq: PagedSeq, layer: int) -> PagedView:
        return PagedView(self.kv[layer], self.pe[layer], seq.slots)


@dataclass
class PagedSeq:
    """A sequence's pages and its block table expanded to rows: position p is row slots[p]."""

    pages: list[int]
    slots: torch.Tensor
    max_len: int


@dataclass
class DecodeRows:
    """Where the decode tokens of a micro-batch sit in the paged pools, the same for every layer
    (so the engine computes it once per step): `new` (B,) the row each new token's latent goes to;
    `keys` (B, longest) the rows of each sequence's keys so far, padded with row 0; `pad` (B,
    longest) True at the padding (None for one sequence: no padding)."""

    new: torch.Tensor
    keys: torch.Tensor
    pad: torch.Tensor | None

    @classmethod
    def of(cls, slots: list[torch.Tensor], starts: list[int]) -> DecodeRows:
        """For sequences with rows `slots` (`PagedSeq.slots`) each decoding position starts[b]."""
        for q, p in zip(slots, starts, strict=True):
            if p >= q.shape[0]:
                raise ValueError(f"KV cache holds {q.shape[0]} positions, step needs {p + 1}")
        device = slots[0].device
        new = torch.stack([q[p] for q, p in zip(slots, starts, strict=True)])
        if len(slots) == 1:
            return cls(new, slots[0][: starts[0] + 1][None], None)
        ends = torch.tensor(starts, device=device) + 1
        keys = torch.nn.utils.rnn.pad_sequence([q[: p + 1] for q, p in zip(slots, starts, strict=True)],
                                               batch_first=True)
        pad = torch.arange(keys.shape[1], device=device)[None, :] >= ends[:, None]
        return cls(new, keys, pad)


class PagedView:
    """One sequence's positions in one layer's pools (the LayerCache write/read interface)."""

    def __init__(self, kv: torch.Tensor, pe: torch.Tensor, slots: torch.Tensor):
        self.kv, self.pe, self.slots = kv, pe, slots

    def write(self, start: int, kv: torch.Tensor, pe: torch.Tensor) -> None:
        rows = self.slots[start:start + kv.shape[0]]
        self.kv[rows] = kv
        self.pe[rows] = pe

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.slots[:end]
        return self.kv[rows], self.pe[rows]

    @property
    def length(self) -> int:
        return self.slots.shape[0]


class KVCache:
    """Per-layer attention state; `model.new_cache(batch, max_len)` makes one."""

    def __init__(self, args: ModelArgs, impl: AttnImpl, batch: int, max_len: int, dtype, device=None,
                 heads: int | None = None):
        self.batch = batch
        self.max_len = max_len
        self.impl = impl
        self.layers = [LayerCache(args, impl, batch, max_len, dtype, device, heads)
                       for _ in range(args.num_hidden_layers)]

    def values_per_token_per_layer(self) -> int:
        """Cached numbers per token per layer (C + R = 576 for DeepSeek-V3 with absorb)."""
        c = self.layers[0]
        if self.impl == "absorb":
            return c.kv.shape[-1] + c.pe.shape[-1]
        return c.k.shape[-2] * (c.k.shape[-1] + c.v.shape[-1])


class MLA(nn.Module):
    """Multi-head latent attention, naive (full K/V) or weight-absorbed (latent cache).

    With attention tensor parallelism `tp` = (t, n) this rank holds heads [t * H/n, (t+1) * H/n):
    their rows of q_b_proj and kv_b_proj and their columns of o_proj; q_a, kv_a and the latent
    cache are whole on every rank of the group. Its output is then this rank's partial sum of
    o_proj over its heads: the sum over the group's ranks is the attention output.

    Unless (`o_split` False) o_proj is FP8 and a rank's columns are not whole 128-column blocks:
    FP8 quantizes o_proj's input per token per 128 columns, and a group cut between ranks would
    round differently from the unsharded model. Then every rank holds o_proj whole and the output
    is this rank's heads' values before it, (..., H/n * V): the group gathers them and applies
    o_proj to its rows (DeepSeek-V3 splits: 16384 columns over TP 2-8; tiny test models may not)."""

    def __init__(self, args: ModelArgs, *, dtype: torch.dtype, fp8: bool, device=None, tp: tuple[int, int] = (0, 1)):
        super().__init__()
        self.args = args
        H, D = args.num_attention_heads, args.hidden_size
        t, n = tp
        if H % n or not 0 <= t < n:
            raise ValueError(f"attention TP {n} must divide num_attention_heads ({H}); rank {t} of it")
        self.n_heads = H // n
        """The heads this rank computes."""
        h0, h1 = t * self.n_heads, (t + 1) * self.n_heads

        def heads(per_head: int, dim: int = 0) -> tuple[int, int, int] | None:
            return None if n == 1 else (dim, h0 * per_head, h1 * per_head)

        lin = {"dtype": dtype, "fp8": fp8, "device": device}
        if args.q_lora_rank is None:
            self.wq = Linear(D, H * args.qk_head_dim, **lin, shard=heads(args.qk_head_dim))  # q_proj
        else:
            self.wq_a = Linear(D, args.q_lora_rank, **lin)  # q_a_proj
            self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps, dtype, device)  # q_a_layernorm
            self.wq_b = Linear(args.q_lora_rank, H * args.qk_head_dim, **lin, shard=heads(args.qk_head_dim))  # q_b_proj
        self.wkv_a = Linear(D, args.kv_lora_rank + args.qk_rope_head_dim, **lin)  # kv_a_proj_with_mqa
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps, dtype, device)  # kv_a_layernorm
        self.wqkv_a = (Stacked.of(self.wq_a, self.wkv_a)  # one product of x for both (and one FP8 quantization)
                       if args.q_lora_rank is not None and (not fp8 or args.q_lora_rank % FP8_BLOCK == 0) else None)
        nv = args.qk_nope_head_dim + args.v_head_dim
        self.wkv_b = Linear(args.kv_lora_rank, H * nv, **lin, shard=heads(nv))  # kv_b_proj
        self.o_split = o_proj_splits(H, args.v_head_dim, n, fp8)
        self.wo = Linear(H * args.v_head_dim, D, **lin,
                         shard=heads(args.v_head_dim, dim=1) if self.o_split else None)  # o_proj
        self.softmax_scale = args.softmax_scale

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        start_pos: int,
        mask: torch.Tensor | None,
        cache: LayerCache | None,
        impl: AttnImpl,
    ) -> torch.Tensor:
        """x (B, S, D) at positions start_pos.. -> (B, S, D). mask (S, T) additive, T = start_pos + S."""
        end = start_pos + x.shape[1]
        q_nope, q_pe, kv, k_pe = self._project(x, rope)
        if cache is not None and end > cache.length:
            raise ValueError(f"KV cache holds {cache.length} positions, step needs {end}")
        if impl == "naive":
            out = self._naive(q_nope, q_pe, kv, k_pe, start_pos, mask, cache)
        elif impl == "absorb":
            out = self._absorb(q_nope, q_pe, kv, k_pe, start_pos, mask, cache)
        else:
            raise ValueError(f"attention impl {impl!r}: expected 'naive' or 'absorb'")
        return self._out(out.flatten(2))  # (B, S, H * V) -> (B, S, D)

    def _project(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, S, D) -> the queries q_nope (B, S, H, N) and q_pe (B, S, H, R) rotated, and the
        tokens' normalised latent kv (B, S, C) and rotated key k_pe (B, S, R)."""
        a = self.args
        B, S, _ = x.shape
        H, N, R, C = self.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank
        both = self.wqkv_a(x) if self.wqkv_a is not None else None
        if both is not None:
            q_a, kv_a = both.split([a.q_lora_rank, C + R], dim=-1)
        else:
            q_a, kv_a = self.wq_a(x) if a.q_lora_rank is not None else None, self.wkv_a(x)
        q = self.wq(x) if a.q_lora_rank is None else self.wq_b(self.q_norm(q_a))
        q_nope, q_pe = q.view(B, S, H, N + R).split([N, R], dim=-1)
        kv, k_pe = kv_a.split([C, R], dim=-1)
        pe = apply_rope(torch.cat([q_pe, k_pe[:, :, None]], dim=2), rope)  # the key as one more head: one rotation
        return q_nope, pe[:, :, :H], self.kv_norm(kv), pe[:, :, H]

    def _naive(self, q_nope, q_pe, kv, k_pe, start_pos, mask, cache):
        """Reference path: expand the latent to per-head K and V, attend over full K/V."""
        a = self.args
        B, S, H, _ = q_nope.shape
        N, V = a.qk_nope_head_dim, a.v_head_dim
        kv = self.wkv_b(kv).view(B, S, H, N + V)
        k_nope, v = kv.split([N, V], dim=-1)  # (B, S, H, N), (B, S, H, V)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, H, -1)], dim=-1)  # (B, S, H, N + R)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, S, H, N + R)
        if cache is not None:
            end = start_pos + S
            cache.k[:B, start_pos:end] = k
            cache.v[:B, start_pos:end] = v
            k, v = cache.k[:B, :end], cache.v[:B, :end]  # (B, T, H, N + R), (B, T, H, V)
        scores = torch.einsum("bshd,bthd->bsht", q, k) * self.softmax_scale  # (B, S, H, T)
        probs = _softmax(scores, mask)
        return torch.einsum("bsht,bthd->bshd", probs, v)  # (B, S, H, V)

    def _absorb(self, q_nope, q_pe, kv, k_pe, start_pos, mask, cache):
        """W_UK folded into the query and W_UV applied after attention: attend over the latent."""
        wkv_b, q_lat = self._absorbed_query(q_nope)
        out = self._latent_attention(q_lat, q_pe, kv, k_pe, start_pos, mask, cache)  # (B, S, H, C)
        return torch.einsum("bshc,hvc->bshv", out, wkv_b[:, self.args.qk_nope_head_dim:])  # (B, S, H, V)

    def _absorbed_query(self, q_nope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj as (H, N + V, C) and the query folded into the latent space (..., H, C)."""
        a = self.args
        H, N, C = self.n_heads, a.qk_nope_head_dim, a.kv_lora_rank
        # kv_b_proj (H * (N + V), C): dequantized per call, never kept (it would double its bytes).
        # As in DeepSeek's reference, the absorbed form multiplies by the dequantized weight, so with
        # FP8 "emulate" products it skips the latent's 1x128 activation rounding that naive applies.
        wkv_b = self.wkv_b.dequantized_weight(q_nope.dtype).view(H, -1, C)  # (H, N + V, C)
        q = q_nope.reshape(-1, H, N).transpose(0, 1)  # (H, tokens, N)
        return wkv_b, torch.bmm(q, wkv_b[:, :N]).transpose(0, 1).reshape(*q_nope.shape[:-1], C)  # (..., H, C)

    def _latent_attention(self, q_lat, q_pe, kv, k_pe, start_pos, mask, cache):
        """q_lat (B, S, H, C), q_pe (B, S, H, R) over the latent keys -> (B, S, H, C)."""
        B, S = q_lat.shape[:2]
        if cache is not None:
            end = start_pos + S
            cache.kv[:B, start_pos:end] = kv
            cache.pe[:B, start_pos:end] = k_pe
            kv, k_pe = cache.kv[:B, :end], cache.pe[:B, :end]  # (B, T, C), (B, T, R)
        scores = (
            torch.einsum("bshc,btc->bsht", q_lat, kv) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        ) * self.softmax_scale  # (B, S, H, T)
        probs = _softmax(scores, mask)
        return torch.einsum("bsht,btc->bshc", probs, kv)  # (B, S, H, C)

    def forward_packed(self, x: torch.Tensor, rope: torch.Tensor, segments: list[Segment],
                       impl: AttnImpl, decode_rows: DecodeRows | None = None) -> torch.Tensor:
        """Attention for the tokens of many sequences packed together: x (T, D), rope for each
        token's position, `segments` in x's order (each sequence's tokens, its first position, its
        cache) -> (T, D). The projections run once over all T tokens; with the absorbed form every
        single-token (decode) segment attends in one batched call over its latent cache (keys
        padded to the longest, padding masked), and the longer (prefill) segments in another (their
        queries and keys padded, causal masks per segment). Same values as `forward` per sequence,
        up to the order of sums. `decode_rows`: the decode segments' rows in their (one) paged pool,
        when the caller computed them for all layers at once."""
        T = x.shape[0]
        H, C = self.n_heads, self.args.kv_lora_rank
        q_nope, q_pe, kv, k_pe = self._project(x[None], rope)  # (1, T, ...)
        offsets = [0]
        for seg in segments:
            if seg.start + seg.length > seg.cache.length:
                raise ValueError(f"KV cache holds {seg.cache.length} positions, step needs {seg.start + seg.length}")
            offsets.append(offsets[-1] + seg.length)
        if impl == "naive":
            outs = [self._naive(q_nope[:, o:o + g.length], q_pe[:, o:o + g.length], kv[:, o:o + g.length],
                                k_pe[:, o:o + g.length], g.start, causal_mask(g.start, g.length, x.device), g.cache)
                    for g, o in zip(segments, offsets, strict=False)]
            return self._out(torch.cat(outs, dim=1).flatten(2))[0]
        if impl != "absorb":
            raise ValueError(f"attention impl {impl!r}: expected 'naive' or 'absorb'")
        wkv_b, q_lat = self._absorbed_query(q_nope)  # (1, T, H, C)
        decode = [(i, g) for i, g in enumerate(segments) if g.length == 1]
        prefill = [(offsets[i], g) for i, g in enumerate(segments) if g.length > 1]
        out = torch.empty(T, H, C, dtype=q_lat.dtype, device=x.device) if prefill else None
        for o, g in prefill:
            g.cache.write(g.start, kv[0, o:o + g.length], k_pe[0, o:o + g.length])
        # One batched call unless padding would more than double the scores (a long chunk deep
        # into its prompt beside short ones): then one call per chunk, as a varlen kernel would.
        real = sum(g.length * (g.start + g.length) for _, g in prefill)
        padded = len(prefill) * max((g.length for _, g in prefill), default=0) * max(
            (g.start + g.length for _, g in prefill), default=0)
        if len(prefill) > 1 and padded <= 2 * real:
            self._prefill_attention(q_lat[0], q_pe[0], prefill, out)
        else:
            for o, g in prefill:
                keys, pes = g.cache.read(g.start + g.length)
                sl = slice(o, o + g.length)
                out[sl] = self._latent_attention(q_lat[:, sl], q_pe[:, sl], keys[None], pes[None], g.start,
                                                 causal_mask(g.start, g.length, x.device), None)[0]
        if decode and not prefill:  # its rows are the packed rows, in order
            out = self._decode_attention(q_lat[0], q_pe[0], kv[0], k_pe[0], segments, decode_rows)
        elif decode:
            rows = torch.tensor([offsets[i] for i, _ in decode], device=x.device)
            out[rows] = self._decode_attention(q_lat[0, rows], q_pe[0, rows], kv[0, rows], k_pe[0, rows],
                                               [g for _, g in decode], decode_rows)
        return self._values_out(out, wkv_b)

    def forward_decode(self, x: torch.Tensor, rope: torch.Tensor, kv_pool: torch.Tensor, pe_pool: torch.Tensor,
                       rows: DecodeRows) -> torch.Tensor:
        """Absorbed attention for one new token of each of B sequences whose latents are in one
        layer's paged pools (`PagedLatentCache.kv[layer]`, `.pe[layer]`) at `rows`: x (B, D),
        rope (B, R/2) -> (B, D). The decode step's path: no per-sequence work at all."""
        q_nope, q_pe, kv, k_pe = self._project(x[None], rope)  # (1, B, ...)
        wkv_b, q_lat = self._absorbed_query(q_nope)
        out = self._paged_attention(q_lat[0], q_pe[0], kv[0], k_pe[0], kv_pool, pe_pool, rows)  # (B, H, C)
        return self._values_out(out, wkv_b)

    def _values_out(self, out: torch.Tensor, wkv_b: torch.Tensor) -> torch.Tensor:
        """Packed rows' attention over the latent (T, H, C) -> W_UV (kv_b_proj's value part, of
        `wkv_b` (H, N + V, C)) -> (T, H * V) -> o_proj (`_out`) -> (T, D)."""
        v = torch.bmm(out.transpose(0, 1), wkv_b[:, self.args.qk_nope_head_dim:].transpose(1, 2)).transpose(0, 1)
        return self._out(v.flatten(1)[None])[0]

    def _out(self, heads: torch.Tensor) -> torch.Tensor:
        """The heads' values (..., H * V) through o_proj (or as they are: see `o_split`)."""
        return self.wo(heads) if self.o_split else heads

    def _prefill_attention(self, q_lat: torch.Tensor, q_pe: torch.Tensor, prefill: list[tuple[int, Segment]],
                           out: torch.Tensor) -> None:
        """Several prompt chunks in one batched call: q_lat (T, H, C), q_pe (T, H, R) of the packed
        tokens; `prefill` (row offset, segment) with their latents already in their caches. Each
        segment's queries (padded to the longest chunk) attend over its keys so far (padded to
        the longest), causally; the result goes to `out`'s rows (T, H, C)."""
        dev = q_lat.device
        keys, pes = zip(*(g.cache.read(g.start + g.length) for _, g in prefill), strict=True)
        pad = torch.nn.utils.rnn.pad_sequence
        K, P = pad(list(keys), batch_first=True), pad(list(pes), batch_first=True)  # (B, Tk, C), (B, Tk, R)
        Q = pad([q_lat[o:o + g.length] for o, g in prefill], batch_first=True)  # (B, S, H, C)
        Qp = pad([q_pe[o:o + g.length] for o, g in prefill], batch_first=True)  # (B, S, H, R)
        S, Tk = Q.shape[1], K.shape[1]
        starts = torch.tensor([g.start for _, g in prefill], device=dev)
        lengths = torch.tensor([g.length for _, g in prefill], device=dev)
        # query s of segment b sees keys t <= start + s; padded queries see key 0 only (no NaN), dropped after
        s_idx, t_idx = torch.arange(S, device=dev), torch.arange(Tk, device=dev)
        visible = t_idx[None, None, :] <= (starts[:, None] + s_idx[None, :])[..., None]  # (B, S, Tk)
        visible &= (s_idx[None, :] < lengths[:, None])[..., None] | (t_idx == 0)[None, None, :]
        mask = torch.zeros(visible.shape, device=dev).masked_fill_(~visible, float("-inf"))
        o = self._latent_attention(Q, Qp, K, P, 0, mask, None)  # (B, S, H, C)
        for b, (row, g) in enumerate(prefill):
            out[row:row + g.length] = o[b, :g.length]

    def _decode_attention(self, q_lat, q_pe, kv, k_pe, segments: list[Segment],
                          rows: DecodeRows | None = None) -> torch.Tensor:
        """One new token for each of B sequences: q_lat (B, H, C), q_pe (B, H, R), their latent kv
        (B, C) and rotated key (B, R) -> (B, H, C). Each token's latent goes into its cache; the
        keys of all B are gathered, padded to the longest, into one batched attention."""
        B = len(segments)
        views = [g.cache for g in segments]
        if all(isinstance(v, PagedView) and v.kv is views[0].kv for v in views):  # one pool
            rows = rows or DecodeRows.of([v.slots for v in views], [g.start for g in segments])
            return self._paged_attention(q_lat, q_pe, kv, k_pe, views[0].kv, views[0].pe, rows)
        if B == 1:  # attend over the sequence's own keys: nothing to pad
            g = segments[0]
            g.cache.write(g.start, kv, k_pe)
            keys, pes = (t[None] for t in g.cache.read(g.start + 1))
            pad = None
        else:
            for b, g in enumerate(segments):
                g.cache.write(g.start, kv[b:b + 1], k_pe[b:b + 1])
            ends = [g.start + 1 for g in segments]
            longest = max(ends)
            keys = kv.new_zeros(B, longest, kv.shape[-1])
            pes = k_pe.new_zeros(B, longest, k_pe.shape[-1])
            for b, (g, end) in enumerate(zip(segments, ends, strict=True)):
                keys[b, :end], pes[b, :end] = g.cache.read(end)
            pad = torch.arange(longest, device=q_lat.device)[None, :] >= torch.tensor(ends, device=q_lat.device)[:, None]
        return self._attend_keys(q_lat, q_pe, keys, pes, pad)

    def _paged_attention(self, q_lat, q_pe, kv, k_pe, pool_kv: torch.Tensor, pool_pe: torch.Tensor,
                         rows: DecodeRows) -> torch.Tensor:
        """`_decode_attention` over one layer's paged pools: one scatter of the B new rows, one
        gather of every sequence's keys (padding: row 0, masked) -> (B, H, C)."""
        pool_kv[rows.new] = kv
        pool_pe[rows.new] = k_pe
        keys, pes, pad = pool_kv[rows.keys], pool_pe[rows.keys], rows.pad
        if pad is not None:
            # The padding reads row 0 of the pool, whatever it holds (a failed sequence's NaN):
            # zero it, since masked scores still multiply those rows by 0 in the last product.
            keys = keys.masked_fill(pad[..., None], 0)
            pes = pes.masked_fill(pad[..., None], 0)
        return self._attend_keys(q_lat, q_pe, keys, pes, pad)

    def _attend_keys(self, q_lat, q_pe, keys, pes, pad: torch.Tensor | None) -> torch.Tensor:
        """q_lat (B, H, C), q_pe (B, H, R) over keys (B, T, C), pes (B, T, R), True in `pad` (B, T)
        masked -> (B, H, C)."""
        # (B, H, C) x (B, C, T): batched matmuls (einsum's parsing costs more than the products here);
        # scale * (q_lat k + q_pe pe) as one bmm and one baddbmm
        scale = self.softmax_scale
        scores = torch.baddbmm(torch.bmm(q_lat, keys.transpose(1, 2)), q_pe, pes.transpose(1, 2), beta=scale, alpha=scale)
        scores = _fp32(scores)
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        return torch.bmm(probs if probs.dtype == q_lat.dtype else probs.to(q_lat.dtype), keys)  # (B, H, C)


@dataclass
class Segment:
    """One sequence's tokens in a packed batch: `length` tokens at positions start.. of `cache`."""

    start: int
    length: int
    cache: LayerCache | PagedView



def _softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """scores (B, S, H, T) + mask (S, T), or one per sequence (B, S, T) -> probabilities in fp32,
    cast to the scores' dtype."""
    dtype = scores.dtype
    if mask is not None:
        scores = scores + mask.unsqueeze(-2)  # fp32 mask: promotes, the softmax is fp32 anyway
    return scores.softmax(dim=-1, dtype=torch.float32).to(dtype)


def causal_mask(start_pos: int, S: int, device=None) -> torch.Tensor | None:
    """(S, start_pos + S) additive mask, -inf where key position > query position; None for S == 1."""
    if S == 1:
        return None
    q_pos = torch.arange(start_pos, start_pos + S, device=device)[:, None]
    k_pos = torch.arange(start_pos + S, device=device)[None, :]
    return torch.zeros(S, start_pos + S, device=device).masked_fill_(k_pos > q_pos, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Gate and MoE
# ---------------------------------------------------------------------------------------------


class Gate(nn.Module):
    """DeepSeek-V3 router: sigmoid scores, bias for selection only, group-limited top-k."""

    def __init__(self, args: ModelArgs, device=None):
        super().__init__()
        self.args = args
        E, D = args.n_routed_experts, args.hidden_size
        self.weight = nn.Parameter(new_weight(E, D, torch.float32, device), requires_grad=False)
        # e_score_correction_bias: fp32 (E,), load-balancing bias added to the scores for selection.
        self.bias = nn.Parameter(torch.zeros(E, dtype=torch.float32, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> (weights (T, K) fp32, expert ids (T, K) int64)."""
        a = self.args
        scores = F.linear(_fp32(x), self.weight).sigmoid()  # (T, E)
        return route(scores, self.bias, a)


def route(scores: torch.Tensor, bias: torch.Tensor, a: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference `Gate.forward` after the sigmoid: scores (T, E) fp32 -> weights (T, K), ids (T, K)."""
    T = scores.shape[0]
    biased = scores + bias  # (T, E), used only to choose experts
    if a.n_group > 1:
        grouped = biased.view(T, a.n_group, a.experts_per_group)  # (T, G, E/G)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, G): sum of the top-2 per group
        keep = group_scores.topk(a.topk_group, dim=-1).indices  # (T, topk_group)
        drop = torch.ones(T, a.n_group, dtype=torch.bool, device=scores.device).scatter_(1, keep, False)
        biased = grouped.masked_fill(drop[..., None], float("-inf")).flatten(1)  # (T, E)
    ids = biased.topk(a.num_experts_per_tok, dim=-1).indices  # (T, K)
    weights = scores.gather(1, ids)  # unbiased scores of the chosen experts
    if a.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * a.routed_scaling_factor, ids


Stages = Generator[None, None, torch.Tensor]
"""A computation that yields while a collective it started is in flight and returns its result."""


class Exchange(Protocol):
    """One MoE layer's token exchange in flight (an EP runtime's; see `MoE.stages`)."""

    def advance(self) -> None: ...

    def result(self) -> torch.Tensor: ...


class StartExchange(Protocol):
    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 experts: Mapping[int, MLP], layer_id: int) -> Exchange: ...


def run_stages(stages: Stages) -> torch.Tensor:
    """Run a `Stages` computation to its end (nothing else to overlap with) and return its result."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


class RoutedExperts(Protocol):
    """The routed-expert computation of one MoE layer; an EP runtime provides its own."""

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: Mapping[int, MLP],
        layer_id: int,
    ) -> torch.Tensor:
        """x (T, D), topk_ids (T, K) int64, topk_weights (T, K) fp32, the experts this rank owns
        -> (T, D): sum_k topk_weights[t, k] * expert[topk_ids[t, k]](x[t])."""
        ...


def run_local_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: Mapping[int, MLP],
    layer_id: int = -1,
    *,
    skip: int | None = None,
) -> torch.Tensor:
    """sum_k w[t, k] * E_{id[t, k]}(x[t]) over local experts, tokens grouped per expert.

    Every id must be in `experts`, except ids equal to `skip` (e.g. -1 marking slots served by
    another rank), which contribute nothing. Accumulates in fp32, returns x.dtype.
    """
    T, K = topk_ids.shape
    y = torch.zeros(T, x.shape[-1], dtype=torch.float32, device=x.device)
    if T == 1:  # one token (a lone decode): its experts in id order, no grouping
        for eid, w in sorted(zip(topk_ids[0].tolist(), topk_weights[0].tolist(), strict=True)):
            if skip is not None and eid == skip:
                continue
            y += _fp32(_expert(experts, eid, layer_id)(x)) * w  # (product, then sum: as the grouped path rounds)
        return y.to(x.dtype)
    flat = topk_ids.reshape(-1)  # (T * K,)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, in token order within one
    ids, counts = torch.unique_consecutive(flat[order], return_counts=True)
    tokens = torch.div(order, K, rounding_mode="floor")  # (T * K,) the token of each grouped slot
    weights = topk_weights.reshape(-1)[order, None]  # (T * K, 1)
    start = 0
    for eid, n in zip(ids.tolist(), counts.tolist(), strict=True):
        tok, w = tokens[start:start + n], weights[start:start + n]
        start += n
        if skip is not None and eid == skip:
            continue
        y.index_add_(0, tok, _fp32(_expert(experts, eid, layer_id)(x[tok])) * w)  # (n, D) into their tokens
    return y.to(x.dtype)


def _expert(experts: Mapping[int, MLP], eid: int, layer_id: int) -> MLP:
    expert = experts.get(eid)
    if expert is None:
        raise KeyError(f"layer {layer_id}: tokens routed to expert {eid}, which this rank does not hold")
    return expert


class MoE(nn.Module):
    """Gate, the routed experts this rank owns, and the shared expert."""

    def __init__(self, args: ModelArgs, layer_id: int, owned: Iterable[int], *, dtype, fp8: bool, device=None):
        super().__init__()
        self.args = args
        self.layer_id = layer_id
        self._expert_kw = {"dtype": dtype, "fp8": fp8, "device": device}
        self.gate = Gate(args, device)
        self.experts = nn.ModuleDict()
        for eid in sorted(set(owned)):
            self.add_expert(eid)
        self.shared_experts = (
            MLP(args.hidden_size, args.n_shared_experts * args.moe_intermediate_size, **self._expert_kw)
            if args.n_shared_experts > 0
            else None
        )
        self.routed: RoutedExperts = run_local_experts
        """Computes the routed part; replace it to dispatch tokens to other ranks."""

    @property
    def owned_experts(self) -> frozenset[int]:
        return frozenset(int(k) for k in self.experts)

    def local_experts(self) -> dict[int, MLP]:
        """Expert id -> module, for the experts this rank holds."""
        return {int(k): m for k, m in self.experts.items()}

    def new_expert(self) -> MLP:
        """An uninitialised routed expert of this layer's shape, not yet registered."""
        return MLP(self.args.hidden_size, self.args.moe_intermediate_size, **self._expert_kw)

    def add_expert(self, eid: int, expert: MLP | None = None) -> MLP:
        """Register `expert` (default: a new uninitialised one) as routed expert `eid`.

        For an expert-map switch, load the module first (`Checkpoint.read_expert`) and add it
        between steps, so a step never sees a half-loaded expert.
        """
        if not 0 <= eid < self.args.n_routed_experts:
            raise ValueError(f"layer {self.layer_id}: expert {eid} out of range 0..{self.args.n_routed_experts - 1}")
        expert = self.new_expert() if expert is None else expert
        self.experts[str(eid)] = expert
        return expert

    def remove_expert(self, eid: int) -> None:
        del self.experts[str(eid)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D)."""
        shape = x.shape
        return run_stages(self.stages(x.reshape(-1, shape[-1]))).view(shape)

    def stages(self, x: torch.Tensor, exchange: StartExchange | None = None) -> Stages:
        """x (T, D) -> (T, D), the one definition of the layer's computation. Without `exchange`
        the routed experts run here (`self.routed`). With one, an EP runtime moves the tokens:
        `exchange(...)` starts the dispatch and returns an object whose three `advance()` calls
        each finish one collective; this generator yields while each is in flight (three yields,
        whatever the token count), and the shared expert runs during the second."""
        weights, ids = self.gate(x)  # (T, K) fp32, (T, K) int64
        shared = self.shared_experts
        y = yield from self.routed_stages(x, weights, ids, exchange, (lambda: shared(x)) if shared is not None else None)
        return y

    def routed_stages(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, exchange: StartExchange | None,
                      shared: Callable[[], torch.Tensor] | None) -> Stages:
        """`stages` after the gate: the routed experts of x (T, D) for the gate's `weights` and
        `ids`, plus `shared()` (the shared expert's output, computed while the rows are in flight)."""
        if exchange is None:
            y = self.routed(x, ids, weights, self.local_experts(), self.layer_id)
            both = shared() if shared is not None else None
        else:
            ex = exchange(x, ids, weights, self.local_experts(), self.layer_id)
            yield  # counts in flight
            ex.advance()
            both = shared() if shared is not None else None
            yield  # rows in flight; the shared expert ran meanwhile
            ex.advance()
            yield  # partial sums in flight
            ex.advance()
            y = ex.result()
        return y + both if both is not None else y


# ---------------------------------------------------------------------------------------------
# Blocks and the model
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h)); ffn dense or MoE."""

    def __init__(self, args: ModelArgs, layer_id: int, owned: Iterable[int], *, dtype, fp8: bool, device=None,
                 tp: tuple[int, int] = (0, 1)):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)  # input_layernorm
        self.attn = MLA(args, dtype=dtype, fp8=fp8, device=device, tp=tp)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)  # post_attention_layernorm
        if args.is_moe_layer(layer_id):
            self.ffn: nn.Module = MoE(args, layer_id, owned, dtype=dtype, fp8=fp8, device=device)
        else:
            self.ffn = MLP(args.hidden_size, args.intermediate_size, dtype=dtype, fp8=fp8, device=device)

    def forward(self, x, rope, start_pos, mask, cache, impl):
        return run_stages(self.ffn_stages(self.attend(x, rope, start_pos, mask, cache, impl)))

    def attend(self, x, rope, start_pos, mask, cache, impl) -> torch.Tensor:
        """x (B, S, D) -> x + attention (the first half of the block)."""
        return x + self.attn(self.attn_norm(x), rope, start_pos, mask, cache, impl)

    def ffn_stages(self, x: torch.Tensor, exchange: StartExchange | None = None) -> Stages:
        """x (..., D) -> x + feed-forward (the second half), as `MoE.stages` (yields only with an
        `exchange`, in MoE layers)."""
        xn = self.ffn_norm(x)
        if not isinstance(self.ffn, MoE):
            return x + self.ffn(xn)
        y = yield from self.ffn.stages(xn.reshape(-1, xn.shape[-1]), exchange)
        return x + y.view(x.shape)


class Transformer(nn.Module):
    """DeepSeek-V3 causal LM. Parameters are allocated empty; `checkpoint.load` fills them."""

    def __init__(
        self,
        args: ModelArgs,
        *,
        dtype: torch.dtype = torch.bfloat16,
        attn_impl: AttnImpl = "absorb",
        fp8: bool | None = None,
        fp8_impl: str = "auto",
        owned_experts: Mapping[int, Iterable[int]] | None = None,
        ctx: ParallelContext | None = None,
        device: torch.device | str | None = None,
        attention_tp: tuple[int, int] = (0, 1),
    ):
        """
        dtype: activations and non-FP8 weights (bf16 in production, fp32 for references).
        fp8: keep the linear weights in e4m3 (default: when the config has a quantization_config);
            False dequantizes an FP8 checkpoint into `dtype` at load time.
        fp8_impl: how FP8 products are computed (fp8.IMPLS).
        owned_experts: MoE layer -> routed experts this rank holds (default: all of them).
        attention_tp: (t, n): this rank is rank t of an attention tensor-parallel group of n and
            holds its heads only (`MLA`); its forward then gives partial sums (the EP runtime
            reduces them over the group). (0, 1): whole attention.
        """
        super().__init__()
        self.args = args
        self.dtype = dtype
        self.attn_impl: AttnImpl = attn_impl
        self.ctx = ctx or ParallelContext()
        self.fp8 = args.quantization is not None if fp8 is None else fp8
        if self.fp8 and args.quantization is None:
            raise ValueError("fp8=True needs a config with quantization_config")
        owned = all_experts(args) if owned_experts is None else dict(owned_experts)
        unknown = set(owned) - set(args.moe_layers)
        if unknown:
            raise ValueError(f"owned_experts names layers {sorted(unknown)} that are not MoE layers")
        D = args.hidden_size
        self.embed = nn.Embedding(args.vocab_size, D, dtype=dtype, device=device)  # embed_tokens
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Block(args, i, owned.get(i, ()), dtype=dtype, fp8=self.fp8, device=device, tp=attention_tp)
            for i in range(args.num_hidden_layers)
        )
        self.norm = RMSNorm(D, args.rms_norm_eps, dtype, device)
        # lm_head stays in the activation dtype in DeepSeek's FP8 checkpoints.
        self.head = Linear(D, args.vocab_size, dtype=dtype, fp8=False, device=device)
        self.rotary = Rotary(args, device)
        self.set_fp8_impl(fp8_impl)

    def set_fp8_impl(self, impl: str) -> None:
        """Choose how every FP8 linear multiplies (see fp8.IMPLS)."""
        scale_fmt = self.args.quantization.scale_fmt if self.args.quantization else None
        for m in self.modules():
            if isinstance(m, Linear):
                m.impl = impl
                m.scale_fmt = scale_fmt

    def moe_layers(self) -> Iterator[MoE]:
        """The MoE modules, in layer order (for the EP runtime to set `routed` and experts)."""
        for block in self.layers:
            if isinstance(block.ffn, MoE):
                yield block.ffn

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """Empty attention state for `batch` sequences of up to `max_len` positions."""
        return KVCache(self.args, self.attn_impl, batch, max_len, self.dtype, self.embed.weight.device,
                       self.layers[0].attn.n_heads)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, S) at positions start_pos..start_pos+S-1 -> logits (B, S, vocab) fp32.

        Without a cache the S tokens are the whole sequence (start_pos must be 0). With one, the
        step's K/V (or latent) is written at start_pos.. and attention reads positions 0..end.
        """
        B, S = tokens.shape
        if self.layers[0].attn.n_heads != self.args.num_attention_heads:
            raise ValueError("this model holds one rank's share of the attention heads (attention TP): its forward "
                             "gives partial sums; the EP runtime runs it")
        if cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs the cache that holds the earlier positions")
        if cache is not None and cache.impl != self.attn_impl:
            raise ValueError(f"cache was made for attn_impl={cache.impl!r}, model uses {self.attn_impl!r}")
        if cache is not None and B > cache.batch:
            raise ValueError(f"batch {B} exceeds the cache's {cache.batch}")
        positions = torch.arange(start_pos, start_pos + S, device=tokens.device)
        rope = self.rotary(positions)  # (S, R/2) complex rotation
        mask = causal_mask(start_pos, S, tokens.device)  # (S, T) or None
        h = self.embed(tokens)  # (B, S, D)
        for i, block in enumerate(self.layers):
            h = block(h, rope, start_pos, mask, None if cache is None else cache.layers[i], self.attn_impl)
        return _fp32(self.head(self.norm(h)))  # (B, S, vocab)
