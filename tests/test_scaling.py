"""Load-driven rebalancing decisions (pure): measurement, hysteresis, cooldown, staleness."""

from __future__ import annotations

import numpy as np
import pytest

from moe_operator.controller import scaling
from moe_operator.placement import MoEShape, plan
from moe_operator.topology import Topology

SHAPE = MoEShape(moe_layers=3, n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=4)
TOPO = Topology.synthetic(2, 8)


def base_plan():
    return plan(SHAPE, TOPO, redundant=4)


def exposition(p, logical: np.ndarray) -> str:
    """What the ranks would export after routing `logical` (L, E) tokens, split over copies."""
    phys = scaling.predicted_physical(p, logical)
    lines = ["# TYPE moe_expert_tokens_total counter"]
    counts = p.replica_counts(SHAPE.n_routed_experts)
    for layer in range(p.num_layers):
        for r in range(p.num_ranks):
            for e in p.experts_on(layer, r):
                v = logical[layer, e] / counts[layer, e]
                lines.append(f'moe_expert_tokens_total{{rank="{r}",group="0",layer="{layer}",expert="{e}",'
                             f'source="remote"}} {v}')
    assert np.isclose(phys.sum(), logical.sum())
    return "\n".join(lines) + "\n"


def test_parse_sums_sources_and_rejects_bad_labels():
    text = ('moe_expert_tokens_total{rank="1",group="0",layer="2",expert="5",source="node"} 3\n'
            'moe_expert_tokens_total{rank="1",group="0",layer="2",expert="5",source="remote"} 4\n'
            'moe_rank_tokens_total{rank="1",group="0",layer="2"} 7\n')
    assert scaling.parse_expert_tokens(text) == {(1, 2, 5): 7.0}
    with pytest.raises(scaling.MetricsError):
        scaling.parse_expert_tokens('moe_expert_tokens_total{rank="x",layer="2",expert="5"} 3\n')


def test_window_increase_handles_counter_reset():
    s = [scaling.Sample(0, {(0, 0, 1): 100.0}), scaling.Sample(10, {(0, 0, 1): 150.0}),
         scaling.Sample(20, {(0, 0, 1): 30.0})]
    inc, span = scaling.window_increase(s, 10, 20)
    assert inc == {(0, 0, 1): 30.0} and span == 10


def test_imbalance_is_one_for_uniform_and_grows_with_skew():
    assert scaling.imbalance(np.ones((3, 16))) == pytest.approx(1.0)
    skew = np.ones((3, 16))
    skew[:, 0] = 5
    assert scaling.imbalance(skew) == pytest.approx(5 / (20 / 16))


def feed(state, p, logical_per_s, t0, t1, step=5.0):
    cum = np.zeros_like(logical_per_s)
    t = t0
    while t <= t1:
        state.samples.append(scaling.Sample(t, scaling.parse_expert_tokens(exposition(p, cum))))
        cum = cum + logical_per_s * step
        t += step
    return t - step


def test_balanced_load_never_rebalances_over_ten_windows():
    p = base_plan()
    # 12 experts on 16 GPUs: uniform load leaves the 8 unreplicated experts' GPUs at 100 against a
    # mean of 75, so max/mean is 4/3 at best; the threshold must sit above that floor.
    cfg = scaling.Config(threshold=1.4, window_s=20, cooldown_s=60, min_tokens=100)
    st = scaling.State()
    uniform = np.full((3, 12), 100.0)
    t = 0.0
    for _ in range(10):
        t = feed(st, p, uniform, t, t + 20)
        d = scaling.decide(st, cfg, t, SHAPE, p, TOPO, redundant=4)
        assert d.action == "none", d.reason
        t += 5
    assert st.last_imbalance == pytest.approx(4 / 3)


def test_skewed_load_rebalances_once_after_a_window_then_cools_down():
    p = base_plan()
    cfg = scaling.Config(threshold=1.3, window_s=20, cooldown_s=60, min_tokens=100)
    st = scaling.State()
    hot = np.full((3, 12), 10.0)
    hot[:, 7] = 400.0  # expert 7 is hot in every layer
    t = feed(st, p, hot, 0, 10)
    d = scaling.decide(st, cfg, t, SHAPE, p, TOPO, redundant=4)
    assert d.action == "none" and "acting after" in d.reason and d.imbalance > 1.3
    t = feed(st, p, hot, t + 5, t + 30)
    d = scaling.decide(st, cfg, t, SHAPE, p, TOPO, redundant=4)
    assert d.action == "rebalance", d.reason
    counts = d.plan.replica_counts(12)
    assert (counts[:, 7] > p.replica_counts(12)[:, 7]).all()
    assert (counts[:, 7] <= cfg.max_replicas_per_expert).all()
    assert d.predicted < d.imbalance
    assert any(e == 7 for _, e, _ in d.hot)
    # right after a change: cooldown, even if the (old) window still looks skewed
    d2 = scaling.decide(st, cfg, t + 5, SHAPE, d.plan, TOPO, redundant=4)
    assert d2.action == "none"


def test_stale_or_missing_metrics_raise():
    p = base_plan()
    st = scaling.State()
    with pytest.raises(scaling.MetricsError):
        scaling.decide(st, scaling.Config(), 100.0, SHAPE, p, TOPO, redundant=4)
    st.samples.append(scaling.Sample(0, {}))
    with pytest.raises(scaling.MetricsError):
        scaling.decide(st, scaling.Config(window_s=10), 100.0, SHAPE, p, TOPO, redundant=4)


def test_too_few_tokens_means_no_action():
    p = base_plan()
    st = scaling.State()
    hot = np.zeros((3, 12))
    hot[:, 0] = 1.0
    t = feed(st, p, hot, 0, 100)
    d = scaling.decide(st, scaling.Config(min_tokens=10_000, window_s=20), t, SHAPE, p, TOPO, redundant=4)
    assert d.action == "none" and "routed tokens" in d.reason


# ---- scale-out onto extra GPUs, scale-in, and the resting map ---------------------------------

# One NVLink domain of 24 GPUs (as one KWOK node): the group's 16 and 8 free. With node-local
# replica choice, extra GPUs pay off where the hot experts' tokens start (`predicted_physical`).
ONE = Topology.synthetic(1, 16)
WIDE = Topology.synthetic(1, 24)


def _hot4() -> np.ndarray:
    hot = np.full((3, 12), 10.0)
    hot[:, :4] = 400.0  # four hot experts per layer: 4 spare GPUs cannot spread them enough
    return hot


def _one_plan():
    return plan(SHAPE, ONE, redundant=4)


def _grow(st, cfg, p):
    """Skewed load until the autoscaler scales out; (the grown plan, time)."""
    t = feed(st, p, _hot4(), 0, 10)
    scaling.decide(st, cfg, t, SHAPE, p, ONE, redundant=4, grow_topo=WIDE)
    t = feed(st, p, _hot4(), t + 5, t + 30)
    d = scaling.decide(st, cfg, t, SHAPE, p, ONE, redundant=4, grow_topo=WIDE)
    assert d.action == "scale-out", d.reason
    return d.plan, t


def test_scale_out_adds_the_fewest_ranks_that_reach_the_threshold_and_keeps_the_old_ones():
    p = _one_plan()
    cfg = scaling.Config(threshold=1.7, window_s=20, cooldown_s=60, min_tokens=100, base_ranks=16, max_extra_gpus=8)
    st = scaling.State()
    t = feed(st, p, _hot4(), 0, 10)
    scaling.decide(st, cfg, t, SHAPE, p, ONE, redundant=4, grow_topo=WIDE)
    t = feed(st, p, _hot4(), t + 5, t + 30)
    # Without a budget: only a rebalance within the 16 ranks, which cannot reach 1.7.
    only = scaling.decide(scaling.State(samples=list(st.samples)), scaling.Config(**{**cfg.__dict__, "max_extra_gpus": 0}),
                          t, SHAPE, p, ONE, redundant=4, grow_topo=WIDE)
    assert only.action in ("rebalance", "none") and (only.plan is None or only.plan.num_ranks == 16)
    d = scaling.decide(st, cfg, t, SHAPE, p, ONE, redundant=4, grow_topo=WIDE)
    assert d.action == "scale-out", d.reason
    assert only.predicted is None or only.predicted > cfg.threshold
    target = cfg.threshold * cfg.scale_in_margin
    assert 16 < d.plan.num_ranks <= 24 and d.predicted <= target, (d.plan.num_ranks, d.predicted)
    # fewest: one rank fewer would not have reached the target
    fewer = scaling._planned(SHAPE, WIDE, _hot4() + 1e-9, p, d.plan.num_ranks - 1 - 12, cfg)
    assert scaling.imbalance(scaling.predicted_physical(fewer, _hot4())) > target
    # the group's GPUs stay in the plan; the new ranks are on free GPUs
    old = {(r.node, r.gpu) for r in p.ranks}
    assert old <= {(r.node, r.gpu) for r in d.plan.ranks}
    # no budget left after it: a further evaluation in cooldown does nothing
    assert scaling.decide(st, cfg, t + 5, SHAPE, d.plan, ONE, redundant=d.plan.num_ranks - 12,
                          grow_topo=WIDE).action == "none"


def test_scale_in_when_the_load_allows_then_never_flaps():
    p = _one_plan()
    cfg = scaling.Config(threshold=1.7, window_s=20, cooldown_s=60, min_tokens=100, base_ranks=16, max_extra_gpus=8)
    st = scaling.State()
    grown, t = _grow(st, cfg, p)
    assert grown is not None and grown.num_ranks > 16
    uniform = np.full((3, 12), 100.0)
    st.samples.clear()
    t = feed(st, grown, uniform, t + 5, t + 30)
    d = scaling.decide(st, cfg, t, SHAPE, grown, WIDE, redundant=grown.num_ranks - 12, grow_topo=WIDE)
    assert d.action == "none" and "threshold" in d.reason  # below the threshold, but in cooldown
    t = feed(st, grown, uniform, t + 5, t + 60)
    d = scaling.decide(st, cfg, t, SHAPE, grown, WIDE, redundant=grown.num_ranks - 12, grow_topo=WIDE)
    assert d.action == "scale-in", d.reason
    assert d.plan.num_ranks == 16 and d.predicted <= cfg.threshold * cfg.scale_in_margin
    # back on the GPUs of ranks 0..15
    assert {(r.node, r.gpu) for r in d.plan.ranks} <= {(r.node, r.gpu) for r in grown.ranks[:16]} | {
        (n.name, g) for n in ONE.nodes for g in range(n.gpus)}
    assert {r.node for r in d.plan.ranks} <= {r.node for r in grown.ranks[:16]}
    # the same balanced load for ten windows on 16 ranks: nothing more happens
    small = d.plan
    st.samples.clear()
    for _ in range(10):
        t = feed(st, small, uniform, t + 5, t + 25)
        d = scaling.decide(st, cfg, t, SHAPE, small, ONE, redundant=4, grow_topo=WIDE)
        assert d.action == "none" and d.imbalance <= cfg.threshold, d.reason


def test_no_load_for_a_cooldown_goes_back_to_the_resting_map():
    p = _one_plan()
    cfg = scaling.Config(threshold=1.7, window_s=20, cooldown_s=60, min_tokens=100, base_ranks=16, max_extra_gpus=8)
    st = scaling.State()
    grown, t = _grow(st, cfg, p)
    idle = np.zeros((3, 12))
    st.samples.clear()
    t = feed(st, grown, idle, t + 5, t + 30)
    d = scaling.decide(st, cfg, t, SHAPE, grown, WIDE, redundant=grown.num_ranks - 12, grow_topo=WIDE)
    assert d.action == "none" and "routed tokens" in d.reason  # idle, but in cooldown
    t = feed(st, grown, idle, t + 5, t + 60)
    d = scaling.decide(st, cfg, t, SHAPE, grown, WIDE, redundant=grown.num_ranks - 12, grow_topo=WIDE)
    assert d.action == "scale-in", d.reason
    assert d.plan.num_ranks == 16
    assert np.array_equal(d.plan.replica_counts(12), p.replica_counts(12))  # the uniform-load replicas
    # A rebalanced map on the spec's ranks goes back too ("restore"); the resting map stays put.
    def idle_for_two_windows(plan_now):
        st = scaling.State()
        t = feed(st, plan_now, idle, 0, 30)
        first = scaling.decide(st, cfg, t, SHAPE, plan_now, ONE, redundant=4)
        assert first.action == "none"  # idle for less than a window so far
        t = feed(st, plan_now, idle, t + 5, t + 30)
        return scaling.decide(st, cfg, t, SHAPE, plan_now, ONE, redundant=4)

    assert idle_for_two_windows(p).action == "none"
    late = np.full((3, 12), 10.0)
    late[:, 8:] = 400.0  # hot experts that uniform load would not replicate
    skewed = scaling._planned(SHAPE, ONE, late, None, 4, cfg)
    assert not np.array_equal(skewed.replica_counts(12), p.replica_counts(12))
    d3 = idle_for_two_windows(skewed)
    assert d3.action == "restore" and np.array_equal(d3.plan.replica_counts(12), p.replica_counts(12))


def test_no_scale_out_onto_a_new_node_that_would_not_help():
    # The group fills two 8-GPU nodes; the free GPUs are on a third node. With node-local replica
    # choice the new node's ranks bring their own tokens, so extra copies there do not lower the
    # busiest GPU's load: the autoscaler must not spend the GPUs.
    p = base_plan()
    cfg = scaling.Config(threshold=1.7, window_s=20, cooldown_s=60, min_tokens=100, base_ranks=16, max_extra_gpus=8)
    st = scaling.State()
    t = feed(st, p, _hot4(), 0, 10)
    scaling.decide(st, cfg, t, SHAPE, p, TOPO, redundant=4, grow_topo=Topology.synthetic(3, 8))
    t = feed(st, p, _hot4(), t + 5, t + 30)
    d = scaling.decide(st, cfg, t, SHAPE, p, TOPO, redundant=4, grow_topo=Topology.synthetic(3, 8))
    assert d.action != "scale-out", d.reason


def test_at_deepseek_scale_scale_out_onto_new_nodes_does_help():
    # 36 nodes x 8 GPUs hold EP288 (256 experts + 32 spares); four free 8-GPU nodes. With many
    # nodes, copies on distinct nodes split their expert's load evenly, so new nodes pay off.
    shape = MoEShape(moe_layers=4, n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8)
    base_topo, wide = Topology.synthetic(36, 8), Topology.synthetic(40, 8)
    p = plan(shape, base_topo, redundant=32)
    load = np.full((4, 256), 10.0)
    load[:, :48] = 120.0  # 48 hot experts per layer: 32 spares cannot give each a second copy
    cfg = scaling.Config(threshold=1.3, window_s=20, cooldown_s=60, min_tokens=100, base_ranks=288,
                         max_extra_gpus=32, max_replicas_per_expert=4)
    st = scaling.State()

    def expo(pl, logical):
        counts = pl.replica_counts(256)
        return {(r, layer, e): logical[layer, e] / counts[layer, e]
                for layer in range(4) for r in range(pl.num_ranks) for e in pl.experts_on(layer, r)}

    for t in range(0, 65, 5):
        st.samples.append(scaling.Sample(float(t), expo(p, load * t)))
        d = scaling.decide(st, cfg, float(t), shape, p, base_topo, redundant=32, grow_topo=wide)
        if d.action != "none":
            break
    # 32 spares give 32 of the 48 hot experts a second copy, so the busiest GPU stays as it is;
    # 16 more GPUs give all 48 a second copy (more would not lower the busiest GPU further).
    assert d.action == "scale-out", d.reason
    assert d.plan.num_ranks == 288 + 16, d.reason
    same_size = scaling._planned(shape, base_topo, load + 1e-9, p, 32, cfg)
    assert d.predicted < scaling.imbalance(scaling.predicted_physical(same_size, load)) * 0.95
    assert 288 < d.plan.num_ranks <= 320
    assert {(r.node, r.gpu) for r in p.ranks} <= {(r.node, r.gpu) for r in d.plan.ranks}
