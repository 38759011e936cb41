"""Choosing the next token from a logits row: the one sampling rule of both engines."""

from __future__ import annotations

import torch

from .engine_api import SequenceError


def sample(row: torch.Tensor, temperature: float, generator: torch.Generator | None, top_p: float = 1.0) -> int:
    """Next token from a logits row (vocab,): greedy for temperature 0 (first max on ties), else a
    draw from softmax(row / temperature). The row is shifted to max 0 and divided in float64, so
    any finite temperature works: tiny ones send every other token to -inf (greedy among the
    maxima), huge ones send every logit to 0 (uniform). With top_p < 1 the draw is among the
    fewest most likely tokens whose probabilities reach top_p (the most likely one always; ties
    in id order). Non-finite logits fail the sequence."""
    if not bool(torch.isfinite(row).all()):
        raise _non_finite(row)
    if temperature <= 0:
        return int(torch.argmax(row))
    scaled = (row.double() - row.max().double()) / temperature
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the tokens ahead of each
        keep = before < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def greedy(rows: torch.Tensor) -> list[int | SequenceError]:
    """`sample` at temperature 0 for every row of rows (n, vocab) at once: the first maximum of
    each, or the SequenceError of a row with non-finite logits."""
    tokens = rows.argmax(dim=-1).tolist()
    finite = torch.isfinite(rows).all(dim=-1).tolist()
    return [tok if ok else _non_finite(row) for tok, ok, row in zip(tokens, finite, rows, strict=True)]


def _non_finite(row: torch.Tensor) -> SequenceError:
    bad = int((~torch.isfinite(row)).sum())
    return SequenceError(f"the model produced {bad} non-finite logits (NaN or inf) for this sequence")


_MASK64 = (1 << 64) - 1


def token_seed(seed: int, index: int) -> int:
    """The seed of the draw for a sequence's `index`-th generated token (a splitmix64 mix of both).

    Each draw depends only on (request seed, token index), not on what ran before it on the rank,
    so a sequence recomputed on another rank after a fault draws exactly the tokens it would have.
    """
    x = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)
