"""Load-driven expert replicas: measured per-expert load -> imbalance -> a new expert map.

Pure logic (numpy only); `reconcile` feeds it samples and applies what it decides.

Load comes from the ranks' counter `moe_expert_tokens_total{layer, expert}` (tokens each rank
computed for each logical expert it hosts), either scraped from every rank's /metrics or read
from Prometheus. Summed over ranks it is the logical load (L, E); per rank it is the physical
load (L, G). Imbalance of a layer = max rank load / mean rank load; the deployment's imbalance is
the token-weighted mean over layers (single layers of a tiny sample are noisy).

Decisions, with hysteresis and cooldown so that it never flaps:
- rebalance when imbalance stays above the threshold for a whole window, the cooldown since the
  last change has passed, and the planner's new map is predicted to cut the imbalance by at
  least `min_gain`;
- never act on a window with too few tokens, or when the metrics are missing or stale.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .placement import MoEShape, Plan
from .placement import plan as make_plan
from .topology import Topology

EXPERT_TOKENS = "moe_expert_tokens_total"

_LINE = re.compile(r'^moe_expert_tokens_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.eE+-]+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class MetricsError(RuntimeError):
    """Load cannot be measured (source down, stale, or malformed)."""


def parse_expert_tokens(text: str) -> dict[tuple[int, int, int], float]:
    """{(rank, layer, expert): tokens} from a Prometheus text exposition (sources summed)."""
    out: dict[tuple[int, int, int], float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group("labels")))
        try:
            key = (int(labels["rank"]), int(labels["layer"]), int(labels["expert"]))
        except (KeyError, ValueError):
            raise MetricsError(f"{EXPERT_TOKENS} sample without integer rank/layer/expert labels: {line[:120]}") from None
        out[key] = out.get(key, 0.0) + float(m.group("value"))
    return out


@dataclass
class Sample:
    """Cumulative counters at time t: {(rank, layer, expert): tokens}."""

    t: float
    counts: dict[tuple[int, int, int], float]


def window_increase(samples: list[Sample], window_s: float, now: float) -> tuple[dict, float]:
    """Counter increase over the last `window_s` (resets count from zero), and the span covered."""
    if len(samples) < 2:
        return {}, 0.0
    start = next((s for s in samples if s.t >= now - window_s - 1e-9), samples[0])
    if start is samples[-1]:
        start = samples[-2]
    end = samples[-1]
    inc = {}
    for k, v in end.counts.items():
        v0 = start.counts.get(k, 0.0)
        inc[k] = v - v0 if v >= v0 else v  # a restarted rank starts its counters at zero
    return inc, end.t - start.t


def loads(inc: dict[tuple[int, int, int], float], layers: int, experts: int, ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(L, E) logical load and (L, G) physical load from {(rank, layer, expert): tokens}."""
    logical = np.zeros((layers, experts))
    physical = np.zeros((layers, ranks))
    for (r, layer, e), v in inc.items():
        if 0 <= layer < layers and 0 <= e < experts and 0 <= r < ranks:
            logical[layer, e] += v
            physical[layer, r] += v
    return logical, physical


def imbalance(physical: np.ndarray) -> float:
    """Token-weighted mean over layers of max rank load / mean rank load (1.0 = perfect)."""
    tot = physical.sum(1)
    mask = tot > 0
    if not mask.any():
        return 1.0
    per_layer = physical[mask].max(1) / physical[mask].mean(1)
    return float((per_layer * tot[mask]).sum() / tot[mask].sum())


def predicted_physical(p: Plan, logical: np.ndarray) -> np.ndarray:
    """(L, G) load if each expert's tokens split evenly over its copies (the runtime's rule when
    no copy is on the token's node)."""
    L, G, _ = p.expert_map.shape
    counts = p.replica_counts(logical.shape[1])  # (L, E)
    share = np.divide(logical, counts, out=np.zeros_like(logical), where=counts > 0)
    out = np.zeros((L, G))
    for layer in range(L):
        em = p.expert_map[layer]
        valid = em >= 0
        out[layer] = np.where(valid, share[layer][np.where(valid, em, 0)], 0).sum(1)
    return out


@dataclass
class Config:
    threshold: float = 1.3
    window_s: float = 60.0
    cooldown_s: float = 300.0
    max_replicas_per_expert: int = 4
    min_tokens: float = 1000.0  # do not judge a window with fewer routed tokens than this
    min_gain: float = 0.05  # the new map must cut imbalance by at least this fraction
    stale_s: float = 0.0  # samples older than this count as stale (0: 3 x window)


@dataclass
class State:
    """Per-deployment memory of the autoscaler (rebuilt from scratch after an operator restart)."""

    samples: list[Sample] = field(default_factory=list)
    above_since: float | None = None
    last_change: float = -math.inf
    last_imbalance: float | None = None


@dataclass
class Decision:
    action: str  # "none" | "rebalance"
    reason: str
    imbalance: float | None = None
    plan: Plan | None = None
    predicted: float | None = None
    hot: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, expert, replicas)


def hot_experts(p: Plan, n_experts: int, limit: int = 32) -> list[tuple[int, int, int]]:
    counts = p.replica_counts(n_experts)
    idx = np.argwhere(counts > 1)
    ranked = sorted(((int(counts[layer, e]), int(layer), int(e)) for layer, e in idx), reverse=True)[:limit]
    return [(layer, e, c) for c, layer, e in ranked]


def decide(state: State, cfg: Config, now: float, shape: MoEShape, current: Plan, topo: Topology,
           redundant: int) -> Decision:
    """One evaluation. `state.samples` must already hold the newest sample."""
    stale = cfg.stale_s or 3 * cfg.window_s
    if not state.samples or now - state.samples[-1].t > stale:
        state.above_since = None
        raise MetricsError("no recent load samples")
    inc, span = window_increase(state.samples, cfg.window_s, now)
    logical, physical = loads(inc, shape.moe_layers, shape.n_routed_experts, current.num_ranks)
    total = logical.sum()
    if span <= 0 or total < cfg.min_tokens:
        state.above_since = None
        return Decision("none", f"only {total:.0f} routed tokens in the window (need {cfg.min_tokens:.0f})",
                        hot=hot_experts(current, shape.n_routed_experts))
    imb = imbalance(physical)
    state.last_imbalance = imb
    hot = hot_experts(current, shape.n_routed_experts)
    if imb <= cfg.threshold:
        state.above_since = None
        return Decision("none", f"imbalance {imb:.2f} <= threshold {cfg.threshold:.2f}", imb, hot=hot)
    if state.above_since is None:
        state.above_since = now
    if now - state.above_since < cfg.window_s:
        return Decision("none", f"imbalance {imb:.2f} above threshold for {now - state.above_since:.0f}s "
                                f"(acting after {cfg.window_s:.0f}s)", imb, hot=hot)
    if now - state.last_change < cfg.cooldown_s:
        return Decision("none", f"imbalance {imb:.2f} but in cooldown for "
                                f"{cfg.cooldown_s - (now - state.last_change):.0f}s more", imb, hot=hot)
    new = make_plan(shape, topo, load=logical + 1e-9, previous=current, redundant=redundant)
    new = _cap_replicas(new, cfg.max_replicas_per_expert, shape.n_routed_experts)
    predicted = imbalance(predicted_physical(new, logical))
    now_pred = imbalance(predicted_physical(current, logical))
    if predicted > now_pred * (1 - cfg.min_gain):
        state.above_since = None
        state.last_change = now  # do not retry every interval: wait a cooldown before trying again
        return Decision("none", f"imbalance {imb:.2f}; a new map would only reach {predicted:.2f}", imb, hot=hot)
    state.above_since = None
    state.last_change = now
    return Decision("rebalance", f"imbalance {imb:.2f} > {cfg.threshold:.2f} for {cfg.window_s:.0f}s; "
                                 f"new map predicted {predicted:.2f}", imb, new, predicted,
                    hot_experts(new, shape.n_routed_experts))


def _cap_replicas(p: Plan, cap: int, n_experts: int) -> Plan:
    """Hand copies beyond `cap` of one expert to the least-replicated experts (keeps validity)."""
    em = p.expert_map.copy()
    counts = p.replica_counts(n_experts)
    if counts.max() <= cap:
        return p
    for layer in range(em.shape[0]):
        c = counts[layer].copy()
        for r in range(em.shape[1]):
            for k in range(em.shape[2]):
                e = em[layer, r, k]
                if e >= 0 and c[e] > cap:
                    target = int(np.argmin(c))
                    c[e] -= 1
                    c[target] += 1
                    em[layer, r, k] = target
    return Plan(ranks=p.ranks, expert_map=em, metrics=p.metrics, shape=p.shape)
