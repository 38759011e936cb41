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
- scale out when the ranks the group has cannot bring the predicted imbalance under the
  threshold but more GPUs (up to `max_extra_gpus` beyond the spec's size) can: the fewest extra
  ranks predicted at most `scale_in_margin` x the threshold (so measurement noise does not leave
  it just above), else the best within the budget if that still gains `min_gain`;
- scale in (back to the spec's size) after the cooldown when the load allows: the base-size plan
  is predicted at most `scale_in_margin` x the threshold (a band below the threshold, so a
  scale-in never triggers the next scale-out), or the load is gone;
- load gone (a whole window with too few tokens) for a cooldown: back to the resting map, the
  one planned for uniform load on the spec's ranks, so replicas made for old traffic go too;
- never act on a window with too few tokens otherwise, or when the metrics are missing or stale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from moe_operator.placement import MoEShape, PlacementError, Plan, local_first_load
from moe_operator.placement import plan as make_plan
from moe_operator.topology import Topology

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
    """(L, G) load of `p` for logical load (L, E) under the runtime's replica choice: tokens sit on
    the ranks evenly (data-parallel attention), a token uses the expert's copies on its own node
    if there are any (split evenly among them), else splits evenly over all of the copies.

    So where the copies sit matters, not only how many there are: a node's tokens reach only its
    own copies, and a copy on a node of g GPUs (out of G) takes g/G of its expert's load divided by
    the copies there. Adding GPUs on a new node therefore helps little (the new node brings its
    own share of tokens); adding them on the nodes that hold the hot experts does."""
    L, G, _ = p.expert_map.shape
    node_of = p.node_of_rank()  # (G,)
    origin = np.bincount(node_of) / G  # (N,) share of tokens starting on each node
    out = np.zeros((L, G))
    for layer in range(L):
        pairs = logical[layer][:, None] * origin[None, :]  # (E, N) load by source node
        out[layer] = local_first_load(p.expert_map[layer], node_of, pairs)[0]
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
    base_ranks: int = 0  # the spec's expertParallelSize (0: the current plan's size, no scaling)
    max_extra_gpus: int = 0  # ranks scale-out may add beyond base_ranks
    scale_in_margin: float = 0.9  # scale in only when the base-size plan is predicted <= this x threshold
    attention_tp: int = 1  # ranks come in attention TP groups of this many on one node: scale-out adds whole groups


@dataclass
class State:
    """Per-deployment memory of the autoscaler (rebuilt from scratch after an operator restart)."""

    samples: list[Sample] = field(default_factory=list)
    above_since: float | None = None
    idle_since: float | None = None
    last_change: float = -math.inf
    last_imbalance: float | None = None


@dataclass
class Decision:
    action: str  # "none" | "rebalance" | "scale-out" | "scale-in" | "restore"
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


def base_topology(current: Plan, base: int, topo: Topology) -> Topology:
    """The GPUs of `current`'s first `base` ranks (the spec's size): where a scale-in goes back to."""
    per_node: dict[str, int] = {}
    for r in current.ranks[:base]:
        per_node[r.node] = per_node.get(r.node, 0) + 1
    nodes = tuple(replace(n, gpus=per_node[n.name]) for n in topo.nodes if n.name in per_node)
    return Topology(nodes=nodes, skipped=())


def _planned(shape: MoEShape, topo: Topology, load: np.ndarray | None, previous: Plan | None, redundant: int,
             cfg: Config) -> Plan:
    new = make_plan(shape, topo, load=load, previous=previous, redundant=redundant, attention_tp=cfg.attention_tp)
    return _cap_replicas(new, cfg.max_replicas_per_expert, shape.n_routed_experts)


def _on_base_ranks(shape: MoEShape, cfg: Config, current: Plan, topo: Topology, logical: np.ndarray | None) -> Plan:
    """A plan on the GPUs of `current`'s first `base_ranks` ranks: for measured load, keeping what
    it can of their experts; without load (None), the resting map planned from scratch."""
    base = cfg.base_ranks or current.num_ranks
    prev = None if logical is None else Plan(ranks=current.ranks[:base], expert_map=current.expert_map[:, :base],
                                             metrics={}, shape=current.shape)
    return _planned(shape, base_topology(current, base, topo), None if logical is None else logical + 1e-9, prev,
                    base - shape.n_routed_experts, cfg)


def _changed(state: State, now: float, action: str, why: str, imb: float | None, new: Plan, predicted: float | None,
             shape: MoEShape) -> Decision:
    """A decision that publishes `new`: the window and cooldown start again."""
    state.above_since = None
    state.last_change = now
    return Decision(action, why, imb, new, predicted, hot_experts(new, shape.n_routed_experts))


def _restore(state: State, cfg: Config, now: float, shape: MoEShape, current: Plan, topo: Topology,
             why: str) -> Decision | None:
    """Back to the resting map on the spec's ranks, or None when `current` already has its ranks
    and replica counts."""
    new = _on_base_ranks(shape, cfg, current, topo, None)
    if new.num_ranks == current.num_ranks and np.array_equal(new.replica_counts(shape.n_routed_experts),
                                                             current.replica_counts(shape.n_routed_experts)):
        return None
    action = "scale-in" if current.num_ranks > new.num_ranks else "restore"
    return _changed(state, now, action, why, state.last_imbalance, new, None, shape)


def _scale_in_if_fits(state: State, cfg: Config, now: float, shape: MoEShape, current: Plan, topo: Topology,
                      logical: np.ndarray, imb: float) -> Decision | None:
    """A scale-in to the spec's ranks when their plan is predicted <= `scale_in_margin` x threshold."""
    small = _on_base_ranks(shape, cfg, current, topo, logical)
    pred = imbalance(predicted_physical(small, logical))
    if pred > cfg.threshold * cfg.scale_in_margin:
        return None
    return _changed(state, now, "scale-in", f"imbalance {imb:.2f}; {small.num_ranks} ranks are predicted {pred:.2f} "
                                            f"<= {cfg.scale_in_margin:.2f} x threshold {cfg.threshold:.2f}",
                    imb, small, pred, shape)


def _scale_out(state: State, cfg: Config, now: float, shape: MoEShape, current: Plan, wide: Topology,
               logical: np.ndarray, redundant: int, imb: float, predicted: float, now_pred: float) -> Decision | None:
    """The fewest extra ranks on `wide`'s free GPUs predicted inside the band (<= `scale_in_margin`
    x threshold), else the best within the budget; None unless it gains `min_gain` over both the
    current map and a same-size rebalance (`predicted`). With attention TP, whole TP groups only."""
    budget = (cfg.base_ranks or current.num_ranks) + cfg.max_extra_gpus - current.num_ranks
    best = None
    for k in range(cfg.attention_tp, budget + 1, cfg.attention_tp):
        try:
            bigger = _planned(shape, wide, logical + 1e-9, current, redundant + k, cfg)
        except PlacementError:
            break  # no more free GPUs
        pred = imbalance(predicted_physical(bigger, logical))
        if best is None or pred < best[1] - 1e-9:
            best = (bigger, pred, k)
        if pred <= cfg.threshold * cfg.scale_in_margin:  # aim inside the band: room for noise
            break
    if best is None or best[1] >= min(predicted, now_pred) * (1 - cfg.min_gain):
        return None
    bigger, pred, k = best
    return _changed(state, now, "scale-out", f"imbalance {imb:.2f} > {cfg.threshold:.2f} for {cfg.window_s:.0f}s; "
                                             f"{current.num_ranks} ranks reach only {predicted:.2f}, "
                                             f"{k} more predicted {pred:.2f}", imb, bigger, pred, shape)


def decide(state: State, cfg: Config, now: float, shape: MoEShape, current: Plan, topo: Topology,
           redundant: int, grow_topo: Topology | Callable[[], Topology | None] | None = None) -> Decision:
    """One evaluation. `state.samples` must already hold the newest sample. `topo` holds at least
    the current ranks' GPUs; `grow_topo` (free GPUs included; or a function that returns it, called
    only when a scale-out is considered, since finding free GPUs means listing every pod) is where
    a scale-out may add ranks."""
    stale = cfg.stale_s or 3 * cfg.window_s
    if not state.samples or now - state.samples[-1].t > stale:
        state.above_since = None
        raise MetricsError("no recent load samples")
    inc, span = window_increase(state.samples, cfg.window_s, now)
    logical, physical = loads(inc, shape.moe_layers, shape.n_routed_experts, current.num_ranks)
    total = logical.sum()
    cooled = now - state.last_change >= cfg.cooldown_s
    base = cfg.base_ranks or current.num_ranks
    if span <= 0 or total < cfg.min_tokens:
        state.above_since = None
        if span >= cfg.window_s * 0.5:  # samples span the window (the sampling interval quantises it)
            state.idle_since = state.idle_since if state.idle_since is not None else now
            if cooled and now - state.idle_since >= cfg.window_s:
                d = _restore(state, cfg, now, shape, current, topo,
                             f"no load for {now - state.idle_since + cfg.window_s:.0f}s: back to the resting map "
                             f"on {base} ranks")
                if d is not None:
                    return d
        return Decision("none", f"only {total:.0f} routed tokens in the window (need {cfg.min_tokens:.0f})",
                        hot=hot_experts(current, shape.n_routed_experts))
    state.idle_since = None
    imb = imbalance(physical)
    state.last_imbalance = imb
    hot = hot_experts(current, shape.n_routed_experts)
    if imb <= cfg.threshold:
        state.above_since = None
        if current.num_ranks > base and cooled:
            d = _scale_in_if_fits(state, cfg, now, shape, current, topo, logical, imb)
            if d is not None:
                return d
        return Decision("none", f"imbalance {imb:.2f} <= threshold {cfg.threshold:.2f}", imb, hot=hot)
    if state.above_since is None:
        state.above_since = now
    if now - state.above_since < cfg.window_s:
        return Decision("none", f"imbalance {imb:.2f} above threshold for {now - state.above_since:.0f}s "
                                f"(acting after {cfg.window_s:.0f}s)", imb, hot=hot)
    if now - state.last_change < cfg.cooldown_s:
        return Decision("none", f"imbalance {imb:.2f} but in cooldown for "
                                f"{cfg.cooldown_s - (now - state.last_change):.0f}s more", imb, hot=hot)
    if current.num_ranks > base:  # the load moved: fewer GPUs may now do (before a same-size rebalance)
        d = _scale_in_if_fits(state, cfg, now, shape, current, topo, logical, imb)
        if d is not None:
            return d
    new = _planned(shape, topo, logical + 1e-9, current, redundant, cfg)
    predicted = imbalance(predicted_physical(new, logical))
    now_pred = imbalance(predicted_physical(current, logical))
    if predicted > cfg.threshold and current.num_ranks < base + cfg.max_extra_gpus and grow_topo is not None:
        wide = grow_topo() if callable(grow_topo) else grow_topo
        d = None if wide is None else _scale_out(state, cfg, now, shape, current, wide, logical, redundant, imb,
                                                  predicted, now_pred)
        if d is not None:
            return d
    if predicted > now_pred * (1 - cfg.min_gain):
        state.above_since = None
        state.last_change = now  # do not retry every interval: wait a cooldown before trying again
        return Decision("none", f"imbalance {imb:.2f}; a new map would only reach {predicted:.2f}", imb, hot=hot)
    return _changed(state, now, "rebalance", f"imbalance {imb:.2f} > {cfg.threshold:.2f} for {cfg.window_s:.0f}s; "
                                             f"new map predicted {predicted:.2f}", imb, new, predicted, shape)


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
