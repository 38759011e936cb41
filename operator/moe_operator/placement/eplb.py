"""DeepSeek's Expert Parallelism Load Balancer (EPLB), re-implemented in numpy as the baseline.

Written from the algorithm's description in ``shared/notes/deepseek-v3.md`` section 3 (the original
is deepseek-ai/EPLB, MIT licence); the entry point has the same signature and results:
``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)``.

Differences from the original, none of which changes a result when loads have no ties:
- numpy instead of torch; every Python loop runs over items or replica slots and is vectorised
  across rows (layers, or layers x nodes), where the original's packing loops over rows too.
  This makes the baseline as fast as it can reasonably be, so that time ratios are honest.
- Sorting is stable, so equal loads keep their index order (torch's sort is not stable).

Physical slot ``p`` lives on GPU ``p // (num_replicas // num_gpus)`` and on node
``p // (num_replicas // num_nodes)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_operator import placement


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy LPT filling of ``num_packs`` packs with exactly ``n / num_packs`` items each.

    ``weight`` (rows, n) -> ``pack_index`` (rows, n), ``rank_in_pack`` (rows, n), both int64.
    Items are taken heaviest first; each goes to the lightest pack that is not full (first on ties).
    """
    weight = np.asarray(weight, dtype=np.float64)
    rows, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        # One item per pack: the identity (the original does not sort in this case either).
        idx = np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n)).copy()
        return idx, np.zeros((rows, n), dtype=np.int64)
    order = np.argsort(-weight, axis=-1, kind="stable")  # (rows, n) heaviest first
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    pack_weight = np.zeros((rows, num_packs))
    pack_items = np.zeros((rows, num_packs), dtype=np.int64)
    r = np.arange(rows)
    for j in range(n):
        item = order[:, j]
        pack = np.where(pack_items < per_pack, pack_weight, np.inf).argmin(-1)  # (rows,)
        pack_index[r, item] = pack
        rank_in_pack[r, item] = pack_items[r, pack]
        pack_weight[r, pack] += weight[r, item]
        pack_items[r, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy min-max of per-replica load: each extra slot copies the expert with most load per copy.

    ``weight`` (rows, num_log) -> ``phy2log`` (rows, num_phy), ``rank`` (rows, num_phy) (which copy
    of its expert a slot is), ``logcnt`` (rows, num_log) copies per expert.
    """
    weight = np.asarray(weight, dtype=np.float64)
    rows, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"{num_phy} physical slots cannot hold {num_log} logical experts")
    phy2log = np.empty((rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    r = np.arange(rows)
    for i in range(num_log, num_phy):
        j = (weight / logcnt).argmax(-1)  # (rows,), first on ties
        phy2log[:, i] = j
        rank[:, i] = logcnt[r, j]
        logcnt[r, j] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a permutation (rows, n)."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups -> nodes, then replicas within each node, then replicas -> GPUs within each node.

    ``weight`` (L, E) -> ``phy2log`` (L, R), ``phyrank`` (L, R), ``logcnt`` (L, E).
    """
    L, E = weight.shape
    R = num_physical_experts
    if E % num_groups or num_groups % num_nodes or num_gpus % num_nodes or R % num_gpus:
        raise ValueError(
            f"hierarchical EPLB needs experts % groups == groups % nodes == gpus % nodes == replicas % gpus == 0 "
            f"(got {E} experts, {num_groups} groups, {num_nodes} nodes, {num_gpus} GPUs, {R} replicas)"
        )
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = R // num_gpus
    experts_per_node = E // num_nodes
    R_node = R // num_nodes

    # 1. Pack groups onto nodes by group load; order experts node-major ("middle logical" ids).
    tokens_per_group = weight.reshape(L, num_groups, group_size).sum(-1)  # (L, groups)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    # log2mlog[l, e]: position of logical expert e in the node-major order.
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[..., None] + np.arange(group_size)
    ).reshape(L, E)
    mlog2log = _inverse(log2mlog)

    # 2. Replicate within each node: every node gets R/N slots for its E/N experts.
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * num_nodes, experts_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, R_node)  # (L*N, R/N) ...

    # 3. Pack replicas onto the node's GPUs, each replica carrying load / copies.
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, axis=1)
    gpu_pack, gpu_rank = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = gpu_pack * phy_per_gpu + gpu_rank
    pphy2phy = _inverse(phy2pphy)

    # 4. Back to logical ids, adding each node's offset in the middle-logical order.
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (
        pphy2mlog.reshape(L, num_nodes, R_node) + (np.arange(num_nodes) * experts_per_node)[:, None]
    ).reshape(L, R)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, R)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, E), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point. ``weight`` (L, E) loads -> ``phy2log`` (L, R), ``log2phy`` (L, E, maxcnt)
    (physical slots of each expert's copies, -1 padded), ``logcnt`` (L, E).

    Hierarchical policy when ``num_groups % num_nodes == 0``, otherwise the global policy (the same
    function with one group and one node).
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2:
        raise ValueError(f"weight must be (layers, experts), got shape {weight.shape}")
    L, E = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maxcnt = int(logcnt.max())
    log2phy = np.full((L, E * maxcnt), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy,
        phy2log * maxcnt + phyrank,
        np.broadcast_to(np.arange(num_replicas), (L, num_replicas)),
        axis=1,
    )
    return phy2log, log2phy.reshape(L, E, maxcnt), logcnt


def is_hierarchical(num_groups: int, num_nodes: int) -> bool:
    """Which policy ``rebalance_experts`` uses."""
    return num_groups % num_nodes == 0


def eplb_plan(
    shape: placement.MoEShape,
    topology: Any,
    load: Any,
    redundant: int | None = None,
    max_experts_per_gpu: int = 1,
) -> placement.Plan:
    """EPLB applied to a topology, as a ``placement.Plan`` so it can be evaluated like the planner's.

    Ranks are the planner's (``placement.select_ranks``); EPLB needs the same number of GPUs on
    every node and the same number of physical experts on every GPU.
    """
    w = placement.expert_load(shape, load)
    ranks, caps = placement.select_ranks(shape, topology, redundant, max_experts_per_gpu)
    per_gpu = int(caps[0])
    if (caps != per_gpu).any():
        raise placement.PlacementError("EPLB needs the same number of experts on every GPU")
    nodes = [r.node for r in ranks]
    node_names = list(dict.fromkeys(nodes))
    per_node = {n: nodes.count(n) for n in node_names}
    if len(set(per_node.values())) != 1:
        raise placement.PlacementError(f"EPLB needs the same number of GPUs on every node, got {per_node}")
    G = len(ranks)
    phy2log, _, _ = rebalance_experts(w, G * per_gpu, shape.n_group, len(node_names), G)
    return placement.Plan(
        ranks=ranks, expert_map=phy2log.reshape(w.shape[0], G, per_gpu).astype(np.int32), shape=shape
    )


__all__ = [
    "balanced_packing",
    "eplb_plan",
    "is_hierarchical",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]
