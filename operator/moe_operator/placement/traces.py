"""Synthetic routing traces that follow DeepSeek-V3's gate, for tests and benchmarks (numpy only).

Per MoE layer and token the gate of DeepSeek-V3 (``inference/model.py``, notes section 5.4) does:
1. ``scores = sigmoid(x @ W_gate)``, shape (tokens, n_routed_experts);
2. group score = sum of the top-2 (bias-corrected) scores in each of ``n_group`` groups;
3. keep the top ``topk_group`` groups, mask the others;
4. ``topk_ids = topk(scores, num_experts_per_tok)``; weights = the chosen scores, normalised to
   sum 1, times ``routed_scaling_factor``.

We have no hidden states, so the gate logits are synthesised as
    logit[l, t, e] = popularity[l, e] + sqrt(1 - c) * noise[t, e] + sqrt(c) * topic[t] . embed[l, e]
- ``popularity`` (layers, experts): the per-layer skew of expert load, N(0, (0.3 skew)^2); hot
  experts in one layer are unrelated to hot experts in the next. The 0.3 makes ``skew=1`` give a
  busiest expert about 4x the mean load and a load coefficient of variation about 0.65 at
  DeepSeek-V3's shape (top-8 of 256 picks from the tail, so small offsets already matter);
  ``skew=0.5`` gives about 2.2x, ``skew=1.5`` about 7x.
- ``noise``: independent N(0, 1) per (token, expert), the part of routing nothing predicts.
- ``topic``: a per-token latent vector shared by all layers, ``embed`` a per-(layer, expert)
  vector; with co-activation ``c`` > 0 tokens with similar topics choose similar experts, so some
  experts are picked together far more often than by chance. ``c`` = 0: independent choices.
The total per-logit variance does not depend on ``c``, so ``skew`` keeps its meaning.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TOPICS = 16
SKEW_SCALE = 0.3  # logit std of expert popularity per unit of ``skew`` (see the module docstring)


class TraceError(ValueError):
    """A trace file or array that does not have the documented shape."""


@dataclass(frozen=True, eq=False)
class Trace:
    """Routing decisions of a batch of tokens in every MoE layer."""

    topk_ids: np.ndarray
    """(moe_layers, tokens, experts_per_token) int32: logical experts each token chose."""
    weights: np.ndarray | None = None
    """(moe_layers, tokens, experts_per_token) float32 combine weights, or None."""

    def __post_init__(self) -> None:
        ids = np.asarray(self.topk_ids)
        if ids.ndim != 3:
            raise TraceError(
                f"topk_ids must have shape (moe_layers, tokens, experts_per_token), got {ids.shape}"
            )
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TraceError(f"topk_ids must be integers, got dtype {ids.dtype}")
        if ids.size and ids.min() < 0:
            raise TraceError(f"topk_ids has a negative expert id ({int(ids.min())})")
        object.__setattr__(self, "topk_ids", ids.astype(np.int32, copy=False))
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float32)
            if w.shape != ids.shape:
                raise TraceError(f"weights has shape {w.shape}, topk_ids {ids.shape}; they must match")
            object.__setattr__(self, "weights", w)

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[1])

    def expert_load(self, n_experts: int) -> np.ndarray:
        """(layers, n_experts) int64: how many tokens chose each expert in each layer."""
        ids = self.topk_ids
        if ids.size and ids.max() >= n_experts:
            raise TraceError(f"topk_ids has expert id {int(ids.max())} but the model has {n_experts} experts")
        offs = (np.arange(ids.shape[0], dtype=np.int64) * n_experts)[:, None, None]
        return np.bincount((ids + offs).ravel(), minlength=ids.shape[0] * n_experts).reshape(
            ids.shape[0], n_experts
        )

    def save(self, path: str | Path) -> None:
        arrays: dict[str, Any] = {"topk_ids": self.topk_ids}
        if self.weights is not None:
            arrays["weights"] = self.weights
        with open(path, "wb") as f:  # np.savez would append ".npz" to a name without it
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            with np.load(path, allow_pickle=False) as z:
                if "topk_ids" not in z.files:
                    raise TraceError(f"{path}: no array 'topk_ids' (found: {', '.join(z.files) or 'none'})")
                ids = z["topk_ids"]
                weights = z["weights"] if "weights" in z.files else None
        except TraceError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise TraceError(f"{path}: not a readable .npz file ({exc})") from None
        return cls(ids, weights)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # One independent stream per (seed, purpose, layer): a layer's draws do not depend on how many
    # layers or tokens were asked for before it.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *stream])


def expert_popularity(moe_layers: int, n_experts: int, *, skew: float = 1.0, seed: int = 0) -> np.ndarray:
    """(moe_layers, n_experts) float64 logit offsets; larger ``skew``, more uneven expert load."""
    if skew < 0:
        raise TraceError(f"skew must be >= 0, got {skew}")
    scale = SKEW_SCALE * skew
    return np.stack([_rng(seed, 1, layer).standard_normal(n_experts) * scale for layer in range(moe_layers)])


def drift_popularity(popularity: np.ndarray, sigma: float, *, seed: int = 1) -> np.ndarray:
    """The same experts after a workload change: each logit offset moves by N(0, (0.3 sigma)^2),
    in the units of ``skew`` (sigma = 0.5 at skew 1: a moderate shift of which experts are hot)."""
    if sigma < 0:
        raise TraceError(f"sigma must be >= 0, got {sigma}")
    return popularity + _rng(seed, 2).standard_normal(popularity.shape) * (SKEW_SCALE * sigma)


def generate_trace(
    shape: Any,
    tokens: int,
    *,
    skew: float = 1.0,
    coactivation: float = 0.0,
    popularity: np.ndarray | None = None,
    seed: int = 0,
    routed_scaling_factor: float = 2.5,
    topics: int = DEFAULT_TOPICS,
) -> Trace:
    """Route ``tokens`` synthetic tokens through every MoE layer of ``shape`` (a ``MoEShape``).

    ``popularity``: (layers, experts) logit offsets; default ``expert_popularity(..., skew, seed)``.
    ``coactivation`` in [0, 1]: share of the logit variance explained by a per-token topic.
    """
    L, E = int(shape.moe_layers), int(shape.n_routed_experts)
    n_group, topk_group, k = int(shape.n_group), int(shape.topk_group), int(shape.num_experts_per_tok)
    if tokens < 0:
        raise TraceError(f"tokens must be >= 0, got {tokens}")
    if not 0.0 <= coactivation <= 1.0:
        raise TraceError(f"coactivation must be in [0, 1], got {coactivation}")
    if E % n_group or topk_group > n_group or k > topk_group * (E // n_group):
        raise TraceError(
            f"inconsistent shape: {E} experts, {n_group} groups, top-{topk_group} groups, top-{k}"
        )
    if popularity is None:
        popularity = expert_popularity(L, E, skew=skew, seed=seed)
    popularity = np.asarray(popularity, dtype=np.float64)
    if popularity.shape != (L, E):
        raise TraceError(f"popularity has shape {popularity.shape}, expected ({L}, {E})")

    # (tokens, topics): one topic vector per token, shared by all layers.
    topic = _rng(seed, 3).standard_normal((tokens, topics)) / np.sqrt(topics)
    a, b = np.sqrt(1.0 - coactivation), np.sqrt(coactivation)
    gs = E // n_group
    ids = np.empty((L, tokens, k), dtype=np.int32)
    weights = np.empty((L, tokens, k), dtype=np.float32)
    rows = np.arange(tokens)[:, None]
    for layer in range(L):
        rng = _rng(seed, 4, layer)
        logits = popularity[layer] + a * rng.standard_normal((tokens, E))  # (tokens, E)
        if b:
            embed = rng.standard_normal((topics, E))  # (topics, E)
            logits += b * (topic @ embed)
        scores = 1.0 / (1.0 + np.exp(-logits))  # (tokens, E), sigmoid as in V3
        grouped = scores.reshape(tokens, n_group, gs)
        # (tokens, n_group): sum of the two best scores in each group.
        top2 = -np.partition(-grouped, min(1, gs - 1), axis=-1)[..., : min(2, gs)]
        group_score = top2.sum(-1)
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :topk_group]  # (tokens, topk_group)
        mask = np.zeros((tokens, n_group), dtype=bool)
        mask[rows, keep] = True
        masked = np.where(np.repeat(mask, gs, axis=1), scores, -np.inf)
        # Top-k of the surviving experts, then best first; equal scores ordered by expert id.
        top = np.argpartition(-masked, k - 1, axis=-1)[:, :k]  # (tokens, k), unordered
        order = np.lexsort((top, -masked[rows, top]), axis=-1)
        top = np.take_along_axis(top, order, axis=-1)
        w = scores[rows, top]
        ids[layer] = top
        weights[layer] = w / w.sum(-1, keepdims=True) * routed_scaling_factor
    return Trace(ids, weights)


__all__ = ["Trace", "TraceError", "drift_popularity", "expert_popularity", "generate_trace"]
