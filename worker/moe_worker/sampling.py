"""Choosing the next token from a logits row: the one sampling rule of both engines."""

from __future__ import annotations

import torch

from .engine_api import SequenceError


def sample(row: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Next token from a logits row (vocab,): greedy for temperature 0 (first max on ties), else a
    draw from softmax(row / temperature). The row is shifted to max 0 and divided in float64, so
    any finite temperature works: tiny ones send every other token to -inf (greedy among the
    maxima), huge ones send every logit to 0 (uniform). Non-finite logits fail the sequence."""
    if not bool(torch.isfinite(row).all()):
        bad = int((~torch.isfinite(row)).sum())
        raise SequenceError(f"the model produced {bad} non-finite logits (NaN or inf) for this sequence")
    if temperature <= 0:
        return int(torch.argmax(row))
    scaled = (row.double() - row.max().double()) / temperature
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
