"""The two collectives of attention tensor parallelism (`AttentionTP`), per attention layer.

The ranks of a TP group (ranks [g * tp, (g + 1) * tp)) serve the same sequences: each computes
attention for its share of the heads over the same T tokens, giving a partial sum of o_proj.

- `reduce_scatter` sums the partials and leaves each rank 1/tp of the token rows: the residual
  add, the norm and the feed-forward (dense MLP, or the MoE gate and its EP exchange) then run on
  that slice only, so no token enters the EP exchange twice;
- `all_gather` puts the T rows back together on every rank of the group for the next layer's
  attention (whose latent projections and cache are whole on every rank).

Together they move one all-reduce's bytes, 2 (tp - 1) / tp x T x hidden per rank; an all-reduce
instead would leave every rank with all T rows and the MoE would either run tp times over or need
the same slicing and gather anyway. DeepSeek runs its prefill with attention TP4 plus sequence
parallelism the same way (notes/deepseek-v3.md).

Where o_proj cannot be split by head (FP8 with fewer than 128 columns per rank: tiny models, not
DeepSeek-V3) every rank keeps it whole, `gather_heads` collects the heads' values instead of
reducing sums, and each rank applies o_proj to its own rows: the same numbers as unsharded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model import ParallelContext


class AttentionTP:
    """Reduce-scatter and all-gather over this rank's TP group, on token rows."""

    def __init__(self, ctx: ParallelContext, wait_work: Callable[[Any], None] | None = None,
                 device: torch.device | None = None):
        self.device = device
        self.size = ctx.tp
        self.rank = ctx.tp_rank
        self.group = ctx.tp_group
        self.rank_id = ctx.rank
        self.wait_work = wait_work
        """How to wait for a collective (in slices, watching for a broken group); None: plainly."""

    def rows(self, tokens: int) -> slice:
        """This rank's token rows of `tokens`: chunks of `chunk(tokens)`, the last ones short or empty."""
        c = self.chunk(tokens)
        return slice(min(self.rank * c, tokens), min((self.rank + 1) * c, tokens))

    def chunk(self, tokens: int) -> int:
        """Rows per rank of `tokens` rows: ceil(tokens / tp) (the collectives pad to tp of them)."""
        return -(-tokens // self.size)

    def reduce_scatter(self, part: torch.Tensor) -> torch.Tensor:
        """part (T, D), this rank's partial sum -> the group's sum at this rank's `rows(T)`."""
        self._check()
        T, D = part.shape
        c = self.chunk(T)
        padded = F.pad(part, (0, 0, 0, c * self.size - T)).contiguous()
        out = part.new_empty(c, D)
        self._wait(dist.reduce_scatter_tensor(out, padded, group=self.group, async_op=True))
        rows = self.rows(T)
        return out[: rows.stop - rows.start]

    def gather_heads(self, heads: torch.Tensor) -> torch.Tensor:
        """heads (T, H/tp * V), this rank's heads' values before o_proj -> (T, H * V), every
        head's, in head order (for an o_proj every rank holds whole: `MLA.o_split`)."""
        self._check()
        T, W = heads.shape
        buf = heads.new_empty(self.size * T, W)
        self._wait(dist.all_gather_into_tensor(buf, heads.contiguous(), group=self.group, async_op=True))
        return buf.view(self.size, T, W).transpose(0, 1).reshape(T, self.size * W)

    def all_gather(self, mine: torch.Tensor, tokens: int) -> torch.Tensor:
        """mine (rows(tokens), D) from every rank of the group -> (tokens, D) on each."""
        self._check()
        c = self.chunk(tokens)
        buf = mine.new_empty(c * self.size, mine.shape[1])
        self._wait(dist.all_gather_into_tensor(buf, F.pad(mine, (0, 0, 0, c - mine.shape[0])).contiguous(),
                                               group=self.group, async_op=True))
        return buf[:tokens]

    def any_failed(self, failed: list[bool]) -> list[bool]:
        """Per new sequence of the step (the same list on every rank of the group): whether any
        rank of the group failed to set it up. The group must drop the same ones, or its
        collectives would get different token counts."""
        self._check()
        flags = torch.tensor([int(f) for f in failed], dtype=torch.int32, device=self.device)
        self._wait(dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return [bool(f) for f in flags.tolist()]

    def _check(self) -> None:
        if self.group is None:
            raise RuntimeError(f"rank {self.rank_id}: its attention TP group lost a rank; it cannot run sequences "
                               "until the group is whole again")

    def _wait(self, work: Any) -> None:
        if self.wait_work is not None:
            self.wait_work(work)
        else:
            work.wait()
