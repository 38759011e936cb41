"""The synthetic gate follows DeepSeek-V3's routing rules, and its knobs do what they say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_operator.placement import MoEShape
from moe_operator.placement.traces import (
    Trace,
    TraceError,
    drift_popularity,
    expert_popularity,
    generate_trace,
)

SMALL = MoEShape(moe_layers=3, n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=8)


def test_shapes_ranges_and_gate_rules() -> None:
    t = generate_trace(SMALL, 500, seed=1)
    assert t.topk_ids.shape == (3, 500, 8) and t.topk_ids.dtype == np.int32
    assert t.weights is not None and t.weights.shape == (3, 500, 8) and t.weights.dtype == np.float32
    ids = t.topk_ids
    assert ids.min() >= 0 and ids.max() < 64
    # k distinct experts per token, from at most topk_group groups.
    assert (np.sort(ids, -1)[..., 1:] != np.sort(ids, -1)[..., :-1]).all()
    groups = ids // SMALL.group_size
    n_groups = np.array([[len(set(row)) for row in layer] for layer in groups])
    assert n_groups.max() <= SMALL.topk_group
    # Normalised sigmoid weights times the routed scaling factor, best expert first.
    np.testing.assert_allclose(t.weights.sum(-1), 2.5, rtol=1e-5)
    assert (np.diff(t.weights, axis=-1) <= 1e-7).all()


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    a = generate_trace(SMALL, 200, seed=3, coactivation=0.5)
    b = generate_trace(SMALL, 200, seed=3, coactivation=0.5)
    c = generate_trace(SMALL, 200, seed=4, coactivation=0.5)
    assert np.array_equal(a.topk_ids, b.topk_ids) and np.array_equal(a.weights, b.weights)
    assert not np.array_equal(a.topk_ids, c.topk_ids)


def test_expert_load_counts_every_choice() -> None:
    t = generate_trace(SMALL, 300, seed=0)
    load = t.expert_load(64)
    assert load.shape == (3, 64)
    assert (load.sum(1) == 300 * 8).all()
    assert load[0, int(t.topk_ids[0, 0, 0])] >= 1
    with pytest.raises(TraceError, match="expert id"):
        t.expert_load(10)


def test_skew_makes_load_uneven() -> None:
    shape = MoEShape(moe_layers=2, n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8)

    def max_over_mean(skew: float) -> float:
        load = generate_trace(shape, 2000, skew=skew, seed=0).expert_load(256)
        return float((load.max(1) / load.mean(1)).mean())

    flat, default, steep = max_over_mean(0.0), max_over_mean(1.0), max_over_mean(2.0)
    assert flat < 2.0 < default < steep
    assert 2.5 < default < 6.0  # the calibration the module docstring promises (about 4x)


def test_coactivation_concentrates_expert_pairs() -> None:
    # With a shared per-token topic, some pairs of experts are chosen together far more often.
    def top_pair_share(c: float) -> float:
        ids = generate_trace(SMALL, 3000, coactivation=c, skew=0.0, seed=5).topk_ids[0]
        pairs = np.zeros((64, 64))
        for k1 in range(8):
            for k2 in range(k1 + 1, 8):
                np.add.at(pairs, (ids[:, k1], ids[:, k2]), 1)
        pairs = pairs + pairs.T
        return float(np.sort(pairs.ravel())[-50:].sum() / pairs.sum())

    assert top_pair_share(0.8) > 1.5 * top_pair_share(0.0)


def test_popularity_drift_and_explicit_popularity() -> None:
    pop = expert_popularity(3, 64, skew=1.0, seed=2)
    assert pop.shape == (3, 64)
    assert np.array_equal(pop, expert_popularity(3, 64, skew=1.0, seed=2))
    moved = drift_popularity(pop, 0.5, seed=9)
    delta = moved - pop
    assert 0.05 < delta.std() < 0.3  # 0.3 * 0.5 = 0.15 logit std
    assert np.array_equal(drift_popularity(pop, 0.0), pop)
    # Two very popular experts of one group: their group always wins (group score = sum of its
    # top-2 scores) and both are chosen by every token. One alone would not always carry its group.
    hot = np.zeros((3, 64))
    hot[:, 6:8] = 20.0
    ids = generate_trace(SMALL, 100, popularity=hot).topk_ids
    assert (ids == 6).any(-1).all() and (ids == 7).any(-1).all()


def test_save_and_load(tmp_path: Path) -> None:
    t = generate_trace(SMALL, 50, seed=0)
    path = tmp_path / "trace.npz"
    t.save(path)
    back = Trace.load(path)
    assert np.array_equal(back.topk_ids, t.topk_ids) and np.array_equal(back.weights, t.weights)
    # Without weights, and under a name that does not end in .npz.
    bare = tmp_path / "bare.trace"
    Trace(t.topk_ids).save(bare)
    assert Trace.load(bare).weights is None


def test_bad_traces(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", ids=np.zeros((1, 2, 3), dtype=np.int32))
    with pytest.raises(TraceError, match="no array 'topk_ids'"):
        Trace.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(TraceError, match="not a readable"):
        Trace.load(tmp_path / "junk.npz")
    with pytest.raises(TraceError, match="shape"):
        Trace(np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(TraceError, match="integers"):
        Trace(np.zeros((1, 2, 3)))
    with pytest.raises(TraceError, match="negative"):
        Trace(-np.ones((1, 2, 3), dtype=np.int32))
    with pytest.raises(TraceError, match="weights"):
        Trace(np.zeros((1, 2, 3), dtype=np.int32), np.zeros((1, 2, 2)))
    with pytest.raises(TraceError, match="coactivation"):
        generate_trace(SMALL, 10, coactivation=1.5)
    with pytest.raises(TraceError, match="popularity"):
        generate_trace(SMALL, 10, popularity=np.zeros((2, 64)))
