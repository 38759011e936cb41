"""Topology-aware expert placement: which logical experts each GPU rank hosts in every MoE layer.

Pure and deterministic: numpy in, numpy out, no clock, no randomness, no Kubernetes.

Terms. ``E`` routed experts per MoE layer, ``L`` MoE layers, ``G`` ranks (one GPU each), ``P``
physical experts ("cells") per layer: one per rank when ``E <= G`` (``P = G``, ``G - E`` of
them replicas), several per rank only when ``E > G`` and the caller allows packing.

The planner, for all layers at once (loops run over rounds, never over experts or layers):
1. Replica counts. Without a previous plan: EPLB's greedy min-max of load per copy, which is
   optimal for the busiest GPU when every GPU holds one expert, computed with one partition
   instead of one step per replica. With one: the fewest changes to its counts that bring the
   busiest copy within ``balance_tolerance`` of that optimum (experts below their minimum
   ``ceil(load / target)`` get exactly the copies they lack; surplus copies are taken where
   losing one raises the load per copy least).
2. Cells kept from the previous plan (re-plans only): every (node, gpu) keeps its expert while
   that expert still needs that many copies; second copies on one node and copies on the busiest
   nodes are dropped first.
3. Fresh plans with one expert per GPU: copies dealt per expert group (``_deal_groups``). The
   groups lie along the node line in order, each on a run of cells sized so that its nodes end
   near the mean load: a group lighter than the mean per cell keeps its heaviest copies and
   hands its lightest to the heavier groups' runs as filler. Inside a run, rounds of
   longest-processing-time-first, vectorised over (layer, group): heaviest copy to the node
   that would finish earliest, never to a node that holds its expert. Since DeepSeek-V3 routes
   a token to ``topk_group`` groups, a group on few nodes bounds the nodes a token reaches.
   A few swaps (``_refine``, same-group pairs preferred) then trim the busiest node.
4. The other copies (re-plans, packing, or what a run could not take), by rounds of
   longest-processing-time-first: each round pairs the next f
   heaviest copies with the f bins (nodes; GPUs when packing) that have room, heaviest copy to
   the least-loaded bin; a copy never joins a node (GPU, when packing) that already holds its
   expert while another has room, so copies sit on distinct nodes and a token finds a local copy
   more often. Within a round, copies of nearly equal load (``group_affinity`` x a cell's mean)
   are re-paired by their expert group's place along the node line (groups in order, each as
   long as its share of the load) with bins in topology order: groups align with nodes where
   loads allow (exactly, for uniform load), at no cost in balance beyond that band.
5. Re-plans only, bounded swaps: when packing, up to P/8 per layer bring GPUs back near a fresh
   plan's busiest (kept copies carry the new load); ``max_swaps`` (0 by default: moves cost
   weight transfers) does the same for nodes.

Lower bounds that frame the benchmark (``bench/placement.py`` prints both):
- Cross-node share. Tokens start uniformly over nodes and use a local copy when there is one, so
  the share of (token, expert) pairs that leave their node is ``1 - sum_e p_e k_e / N`` (``p_e``
  load share, ``k_e`` nodes holding e, ``N`` nodes). With ``k_e <= c_e`` (copies) and ``c_e``
  fixed, up to the 1% budget, by the per-GPU balance, EPLB's global policy already has ``k_e =
  c_e`` at one expert per GPU (replicas fill the slots after the originals), so no placement can
  do clearly better there; the planner matches it.
- Moves after a drift. Every expert whose count must rise to keep the busiest copy within the
  tolerance is one weight transfer; the planner moves exactly that many (one expert per GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_operator.placement.schema import (
    MoEShape,
    PlacementError,
    Plan,
    RankSlot,
    counts_of,
    tp_group_problem,
)
from moe_operator.topology import Topology

DEFAULT_BALANCE_TOLERANCE = 0.005
DEFAULT_NODE_TOLERANCE = 0.05
DEFAULT_MAX_SWAPS = 0
DEFAULT_GROUP_AFFINITY = 0.1


# Packing: loads within this fraction of a cell's mean count as equal when pairing copies with
# GPUs, so that equal copies go to distinct nodes and near their group.
_PACK_BAND = 0.02

# After group dealing (fresh plans, one expert per GPU): up to this many swaps per layer between
# the busiest node and one of the ``_BALANCE_PARTNERS`` lightest, until the busiest is within
# ``_BALANCE_TOL`` of the mean; a swap across groups scores ``_BALANCE_PEN`` x a node's mean
# load worse, so swaps inside a group win whenever one helps.
_BALANCE_SWAPS = 6
_BALANCE_TOL = 0.005
_BALANCE_PEN = 1.0
_BALANCE_PARTNERS = 4

_ROUND = 4  # decimals of the metrics written into a plan (stable JSON across platforms)


# ----------------------------------------------------------------------------------------------
# Inputs


def expert_load(shape: MoEShape, load: Any) -> np.ndarray:
    """(L, E) float64 load per expert from any of: None (uniform), an (E,) or (L, E) array of
    token counts, an (L, tokens, k) array of routed expert ids, or an object with ``topk_ids``.
    Layers with no load at all are treated as uniform."""
    L, E = shape.moe_layers, shape.n_routed_experts
    if load is None:
        return np.ones((L, E))
    if hasattr(load, "topk_ids"):
        load = load.topk_ids
    arr = np.asarray(load)
    if arr.ndim == 3:
        if arr.shape[0] != L:
            raise PlacementError(f"trace has {arr.shape[0]} layers but the model has {L} MoE layers")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise PlacementError(f"trace topk_ids must be integers, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= E):
            raise PlacementError(
                f"trace has expert ids outside 0..{E - 1} (min {arr.min()}, max {arr.max()})"
            )
        w = counts_of(arr.reshape(L, -1), E).astype(np.float64)
    elif arr.ndim in (1, 2):
        if not (np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating)):
            raise PlacementError(f"load must be numeric, got {arr.dtype}")
        if arr.ndim == 1:
            arr = np.broadcast_to(arr, (L, arr.shape[0]))
        if arr.shape != (L, E):
            raise PlacementError(
                f"load has shape {arr.shape}, expected ({L}, {E}) = (MoE layers, routed experts)"
            )
        w = arr.astype(np.float64)
        if not np.isfinite(w).all() or (w < 0).any():
            raise PlacementError("load must be finite and non-negative")
    else:
        raise PlacementError(
            f"load must be (layers, experts) counts or (layers, tokens, k) expert ids, got shape {arr.shape}"
        )
    w = np.array(w, dtype=np.float64)  # writable copy
    w[w.sum(1) <= 0] = 1.0
    return w


def select_ranks(
    shape: MoEShape,
    topology: Topology,
    redundant: int | None = None,
    max_experts_per_gpu: int = 1,
    previous: Plan | None = None,
    attention_tp: int = 1,
) -> tuple[tuple[RankSlot, ...], np.ndarray]:
    """The GPU slots the plan uses, in topology order, and experts per rank ``caps`` (G,) int64.

    One expert per GPU when ``E + redundant`` slots exist (``redundant=None``: every free slot).
    Otherwise, only if ``max_experts_per_gpu > 1``: every slot, ``E + redundant`` experts spread
    as evenly as possible (``redundant=None``: enough to give every GPU the same number).
    Slots that ``previous`` used are preferred, so a re-plan keeps its GPUs.

    ``attention_tp`` N > 1: slots are taken N at a time from one node, so that ranks [g*N, (g+1)*N)
    (TP group g) share a node (``tp_group_problem``); a node's free slots beyond a multiple of N
    stay unused. A block that holds a slot of ``previous`` is preferred, so after a node loss the
    surviving TP groups stay and only whole new groups are placed.
    """
    _check_rank_args(redundant, max_experts_per_gpu, attention_tp)
    n_slots = topology.num_slots
    if n_slots == 0:
        why = topology.describe_skipped()
        raise PlacementError("no schedulable GPU slots in the topology" + (f": {why}" if why else ""))
    tp = int(attention_tp)
    usable = sum(n.gpus // tp * tp for n in topology.nodes)  # slots in whole TP groups
    if usable == 0:
        raise PlacementError(f"no whole attention TP group fits: {_tp_slots_note(topology, tp, usable)}")
    try:
        caps = _experts_per_rank(shape.n_routed_experts, usable, redundant, max_experts_per_gpu, topology)  # (G,)
    except PlacementError as e:
        if usable == n_slots:
            raise
        try:  # would the GPUs do without the TP constraint? Then say only that.
            G = _experts_per_rank(shape.n_routed_experts, n_slots, redundant, max_experts_per_gpu, topology).size
        except PlacementError:
            raise PlacementError(f"{e}; {_tp_slots_note(topology, tp, usable)}") from None
        raise PlacementError(f"cannot place {G} ranks in whole attention TP groups: "
                             f"{_tp_slots_note(topology, tp, usable)}") from None
    G = caps.size
    if G % tp:
        raise PlacementError(f"{G} ranks ({shape.n_routed_experts} routed experts + {G - shape.n_routed_experts} "
                             f"redundant) do not form whole attention TP groups of {tp}")
    slots = topology.slots
    prev_keys = set() if previous is None else {(r.node, r.gpu) for r in previous.ranks}
    # Blocks of tp slots of one node: its slots in `previous` first, then its others in order.
    blocks: list[tuple[bool, int, list[int]]] = []  # (holds no previous slot, first slot, slots)
    first = 0
    for node in topology.nodes:
        idx = sorted(range(first, first + node.gpus), key=lambda i: (slots[i].node, slots[i].gpu) not in prev_keys)
        first += node.gpus
        for b in range(node.gpus // tp):
            block = idx[b * tp : (b + 1) * tp]
            blocks.append((all((slots[i].node, slots[i].gpu) not in prev_keys for i in block), min(block), block))
    blocks.sort(key=lambda blk: blk[:2])
    chosen = sorted(i for _, _, block in blocks[: G // tp] for i in block)
    ranks = tuple(RankSlot(rank=k, node=slots[i].node, gpu=slots[i].gpu) for k, i in enumerate(chosen))
    return ranks, caps


def _tp_slots_note(topology: Topology, tp: int, usable: int) -> str:
    """Why fewer slots than the topology's free GPUs can be used with attention TP ``tp``."""
    short = [f"{n.name}: {n.gpus}" for n in topology.nodes if n.gpus % tp]
    more = f", and {len(short) - 5} more" if len(short) > 5 else ""
    return (f"attention TP {tp}: a TP group's {tp} ranks must share one node, so only {usable} of the "
            f"{topology.num_slots} free GPU slots can hold whole TP groups (free GPUs not a multiple of {tp}: "
            f"{', '.join(short[:5])}{more})")


def _check_rank_args(redundant: int | None, max_experts_per_gpu: int, attention_tp: int = 1) -> None:
    if (
        isinstance(max_experts_per_gpu, bool)
        or not isinstance(max_experts_per_gpu, (int, np.integer))
        or max_experts_per_gpu < 1
    ):
        raise PlacementError(f"max_experts_per_gpu must be a positive integer, got {max_experts_per_gpu!r}")
    if redundant is not None and (
        isinstance(redundant, bool) or not isinstance(redundant, (int, np.integer)) or redundant < 0
    ):
        raise PlacementError(f"redundant must be a non-negative integer, got {redundant!r}")
    if isinstance(attention_tp, bool) or not isinstance(attention_tp, (int, np.integer)) or attention_tp < 1:
        raise PlacementError(f"attention_tp must be a positive integer, got {attention_tp!r}")


def _experts_per_rank(
    E: int, n_slots: int, redundant: int | None, max_experts_per_gpu: int, topology: Topology
) -> np.ndarray:
    """(G,) int64 experts each rank hosts, or PlacementError saying why ``E`` experts plus
    ``redundant`` do not fit ``n_slots`` GPU slots."""
    n_redundant = 0 if redundant is None else int(redundant)
    if E + n_redundant <= n_slots:  # one expert per GPU
        G = n_slots if redundant is None else E + n_redundant
        return np.ones(G, dtype=np.int64)
    if max_experts_per_gpu == 1:
        if E > n_slots:
            raise PlacementError(
                f"cannot place {E} routed experts on {n_slots} GPU slots with one expert per GPU: "
                f"E > G; add {E - n_slots} GPUs or allow max_experts_per_gpu >= {math.ceil(E / n_slots)}"
                + (f" ({topology.describe_skipped()})" if topology.skipped else "")
            )
        raise PlacementError(
            f"{E} routed experts + {n_redundant} redundant need {E + n_redundant} GPU slots but the topology "
            f"has {n_slots}; use at most {n_slots - E} redundant experts"
        )
    # Packing: every slot, the physical experts spread as evenly as possible.
    G = n_slots
    P = math.ceil(E / G) * G if redundant is None else E + n_redundant
    if P > G * max_experts_per_gpu:
        raise PlacementError(
            f"{P} physical experts ({E} routed + {P - E} redundant) on {G} GPU slots need "
            f"{math.ceil(P / G)} experts per GPU, more than max_experts_per_gpu={max_experts_per_gpu}"
        )
    if P > E * G:
        raise PlacementError(
            f"{P} physical experts on {G} GPU slots would put two copies of one of the {E} experts on one GPU; "
            f"use at most {E * G - E} redundant experts"
        )
    per_rank, rem = divmod(P, G)
    return per_rank + (np.arange(G) < rem).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Replica counts


def optimal_counts(w: np.ndarray, total: int, max_count: int | None = None) -> np.ndarray:
    """(L, E) copies per expert minimising the largest load per copy, ``total`` copies per layer.

    Identical to EPLB's greedy ``replicate_experts`` (each extra copy goes to the expert with the
    most load per copy, lowest id on ties): the extra copies it makes are exactly the ``total - E``
    largest values of ``w[e] / j`` (j = 1, 2, ...: the load per copy when the (j+1)-th copy is
    added), because each expert's values fall with j. One partition instead of one step per copy.
    ``max_count`` caps the copies of one expert (packing: one per GPU at most).
    """
    L, E = w.shape
    extra = total - E
    copies = np.ones((L, E), dtype=np.int64)
    if extra <= 0:
        return copies
    # An expert's last extra copy was chosen at a value >= the optimum >= W/total, so it has at
    # most w_max * total / W extras: bound the candidate table's width with that.
    width = int(min(extra, max(1, math.ceil(float((w.max(1) * total / w.sum(1)).max())))))
    if max_count is not None:
        if max_count * E < total:
            raise PlacementError(
                f"{total} copies of {E} experts need more than {max_count} copies of some expert"
            )
        uncapped = optimal_counts(w, total)
        if (uncapped <= max_count).all():
            return uncapped  # the cap binds nowhere: the same greedy
        width = min(extra, max_count - 1)  # capped experts push copies elsewhere: no tighter bound
    candidates = (w[:, :, None] / np.arange(1, width + 1)).reshape(
        L, E * width
    )  # (L, E * width), expert-major
    # The extra-th largest value per layer; take everything above it, then the lowest-index
    # (lowest expert id) entries equal to it, as the greedy's first-on-ties rule does.
    kth = -np.partition(-candidates, extra - 1, axis=1)[:, extra - 1 : extra]  # (L, 1)
    above = candidates > kth
    tie = candidates == kth
    take = above | (tie & (np.cumsum(tie, axis=1) <= extra - above.sum(1, keepdims=True)))
    copies += take.reshape(L, E, width).sum(2)
    return copies


def _take_smallest(vals: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(rows, n) bool: the ``k[row]`` smallest finite entries of each row, lower index first on ties."""
    order = np.argsort(vals, axis=1, kind="stable")
    take = np.zeros(vals.shape, dtype=bool)
    np.put_along_axis(take, order, np.arange(vals.shape[1])[None, :] < k[:, None], axis=1)
    return take & np.isfinite(vals)


def rebalanced_counts(
    w: np.ndarray, total: int, start: np.ndarray, tolerance: float, max_count: int | None = None
) -> np.ndarray:
    """(L, E) copies close to ``start`` (the previous plan's counts) whose largest load per copy is
    within ``tolerance`` of the optimum: fewest changed copies instead of the optimal layout.

    With ``T`` = (1 + tolerance) x the optimum, expert e needs at least ``ceil(w_e / T)`` copies:
    experts below that get exactly the copies they lack (no fewer moves can reach ``T``); the
    total is then restored by taking copies from experts above their need, where losing one
    raises the load per copy least (``w/(c-1)`` smallest), or, when copies are missing (more
    GPUs), by EPLB's greedy from ``start``. Both are one selection over a small table.
    """
    L, E = w.shape
    cap = total if max_count is None else max_count
    copies = np.minimum(np.maximum(np.asarray(start, dtype=np.int64), 0), cap)
    target = (w / optimal_counts(w, total, max_count)).max(1) * (1.0 + tolerance)  # (L,)
    need = np.clip(np.ceil(w / target[:, None] * (1.0 - 1e-12)), 1, cap).astype(np.int64)
    copies = np.maximum(copies, need)
    excess = copies.sum(1) - total  # (L,)
    if (excess > 0).any():
        width = int((copies - need).max())
        j = np.arange(1, width + 1)
        # Removing the j-th copy leaves w/(copies-j) per copy; rising in j, so smallest-first is greedy.
        candidates = np.where(
            j <= (copies - need)[:, :, None], w[:, :, None] / np.maximum(copies[:, :, None] - j, 1), np.inf
        )
        copies -= (
            _take_smallest(candidates.reshape(L, E * width), np.maximum(excess, 0))
            .reshape(L, E, width)
            .sum(2)
        )
    short = total - copies.sum(1)
    if (short > 0).any():
        width = int(short.max())
        j = np.arange(1, width + 1)
        # Adding the j-th more copy: w/(copies+j-1) per copy before it; falling in j: largest first.
        candidates = np.where(
            copies[:, :, None] + j <= cap, -w[:, :, None] / (copies[:, :, None] + j - 1), np.inf
        )
        copies += (
            _take_smallest(candidates.reshape(L, E * width), np.maximum(short, 0)).reshape(L, E, width).sum(2)
        )
    return copies


# ----------------------------------------------------------------------------------------------
# The planner


def plan(
    shape: MoEShape,
    topology: Topology,
    load: Any = None,
    previous: Plan | None = None,
    redundant: int | None = None,
    max_experts_per_gpu: int = 1,
    *,
    balance_tolerance: float = DEFAULT_BALANCE_TOLERANCE,
    node_tolerance: float = DEFAULT_NODE_TOLERANCE,
    group_affinity: float = DEFAULT_GROUP_AFFINITY,
    max_swaps: int = DEFAULT_MAX_SWAPS,
    max_pack_swaps: int | None = None,
    attention_tp: int = 1,
) -> Plan:
    """Place ``shape``'s experts on ``topology``'s GPU slots for the measured ``load``.

    - ``load``: see ``expert_load`` (None: uniform).
    - ``previous``: the plan in force; the new one moves as few experts as it can. Cells are
      matched by (node, gpu), not by rank number, so ranks may be renumbered.
    - ``redundant``: replicas per layer (None: fill every free slot).
    - ``max_experts_per_gpu`` > 1 allows packing when there are fewer GPUs than experts.
    - ``attention_tp``: ranks [g*N, (g+1)*N) form attention TP group g and share a node
      (``select_ranks``); PlacementError when the free GPUs do not hold enough whole groups.

    Re-planning trade-offs (only with ``previous``):
    - ``balance_tolerance``: how far above the best busiest-GPU load the plan may stay rather
      than move a copy (0.005: half a percent).
    - ``node_tolerance``: how far above a fresh plan's busiest node a node may stay before up to
      ``max_swaps`` swaps per layer (two moves each) rebalance nodes.
    - ``max_pack_swaps``: swaps per layer allowed to rebalance ranks when packing (None: P/8).

    ``group_affinity``: copies whose loads differ by less than this fraction of a cell's mean
    load are interchangeable for balance and are paired with nodes by their group's place along
    the node line instead (when packing, at most ``_PACK_BAND``); also the cost of a swap across
    groups in the opt-in swaps.
    """
    _check_plan_args(
        shape, topology, balance_tolerance, node_tolerance, group_affinity, max_swaps, max_pack_swaps
    )
    w = expert_load(shape, load)  # (L, E)
    if previous is not None:
        _check_previous(previous, shape)
    ranks, caps = select_ranks(shape, topology, redundant, max_experts_per_gpu, previous, attention_tp)
    G, P, L, E = len(ranks), int(caps.sum()), shape.moe_layers, shape.n_routed_experts
    rank_of_cell, node_of_cell = _cell_layout(ranks, caps)  # (P,) each

    # 1. Replica counts.
    prev_cells = None if previous is None else _previous_cells(previous, ranks, caps)  # (L, P) or None
    max_count = G if P > G else None  # packing: never two copies of an expert on one GPU
    if prev_cells is None:
        counts = optimal_counts(w, P, max_count)  # (L, E)
    else:
        counts = rebalanced_counts(w, P, counts_of(prev_cells, E), balance_tolerance, max_count)
    # 2. Cells kept from the previous plan; 3-4. the other copies placed.
    if prev_cells is None:
        kept = np.full((L, P), -1, dtype=np.int64)
    else:
        kept = _keep(prev_cells, counts, w, node_of_cell)  # (L, P)
    cells = _place(w, counts, kept, rank_of_cell, node_of_cell, caps, shape.n_group, group_affinity)  # (L, P)
    # 5. Re-plans: bounded swaps.
    pack_swaps = math.ceil(P / 8) if max_pack_swaps is None else max_pack_swaps
    packing = bool((caps > 1).any())
    if prev_cells is not None and (max_swaps or (packing and pack_swaps)):
        cells = _replan_swaps(
            cells,
            w,
            counts,
            rank_of_cell,
            node_of_cell,
            caps,
            shape,
            group_affinity,
            tolerances=(node_tolerance, balance_tolerance),
            budgets=(max_swaps, pack_swaps if packing else 0),
        )

    expert_map = _expert_map(cells, rank_of_cell, caps)  # (L, G, max caps)
    out = Plan(ranks=ranks, expert_map=expert_map, shape=shape)
    metrics = plan_metrics(out, w)
    metrics["redundant"] = P - E
    if previous is not None:
        metrics["moved_experts"] = moved_experts(previous, out)
    problem = tp_group_problem(out, attention_tp)
    if problem:  # select_ranks places whole TP groups; this would be a bug
        raise PlacementError(problem)
    return Plan(ranks=ranks, expert_map=expert_map, shape=shape, metrics=metrics)


def keep_rank_numbers(new: Plan, previous: Plan | None, attention_tp: int = 1) -> Plan:
    """Renumber ``new``'s ranks so that a node that hosted rank r before still hosts rank r.

    Pods are named by rank and pinned to a node, so a rank that changes node means a new pod.
    The planner numbers ranks in topology order; after a node loss that would shift every later
    rank. Matching by node keeps every surviving pod where it is. When the group grows, the old
    ranks keep their numbers and the new ones come after them; when it shrinks, the numbers that
    remain are the lowest (the ranks beyond the new size are the ones that leave).

    With ``attention_tp`` N > 1 whole TP groups (ranks [g*N, (g+1)*N), on one node in ``new``,
    as ``select_ranks`` places them) are renumbered as units: a node keeps the group numbers it
    had, and the groups placed anew (a lost node's) take the free numbers, so no TP group is ever
    split between a surviving node and a new one. PlacementError if the result breaks the rule.
    """
    if previous is None:
        return new
    tp = int(attention_tp)
    if new.num_ranks % tp:
        raise PlacementError(f"{new.num_ranks} ranks do not form whole attention TP groups of {tp}")
    groups = new.num_ranks // tp
    prev_by_node: dict[str, list[int]] = {}  # node -> previous TP groups wholly on it (number < groups)
    for g in range(min(previous.num_ranks // tp, groups)):
        nodes = {r.node for r in previous.ranks[g * tp : (g + 1) * tp]}
        if len(nodes) == 1:
            prev_by_node.setdefault(nodes.pop(), []).append(g)
    order = [-1] * groups  # order[new group] = final group number
    taken: set[int] = set()
    for g in range(groups):
        olds = prev_by_node.get(new.ranks[g * tp].node)
        if olds:
            order[g] = olds.pop(0)
            taken.add(order[g])
    free = iter(i for i in range(groups) if i not in taken)
    for g in range(groups):
        if order[g] < 0:
            order[g] = next(free)
    final = np.array([order[k // tp] * tp + k % tp for k in range(new.num_ranks)])  # final rank of new rank k
    inv = np.argsort(final)  # inv[final rank] = new rank
    ranks = tuple(RankSlot(rank=k, node=new.ranks[int(j)].node, gpu=new.ranks[int(j)].gpu) for k, j in enumerate(inv))
    out = Plan(ranks=ranks, expert_map=new.expert_map[:, inv, :], metrics=new.metrics, shape=new.shape)
    problem = tp_group_problem(out, tp)
    if problem:
        raise PlacementError(problem)
    return out


def _check_plan_args(
    shape: Any,
    topology: Any,
    balance_tolerance: float,
    node_tolerance: float,
    group_affinity: float,
    max_swaps: int,
    max_pack_swaps: int | None,
) -> None:
    if not isinstance(shape, MoEShape):
        raise PlacementError(f"shape must be a MoEShape, got {type(shape).__name__}")
    if not isinstance(topology, Topology):
        raise PlacementError(f"topology must be a Topology, got {type(topology).__name__}")
    if not (balance_tolerance >= 0 and node_tolerance >= 0 and group_affinity >= 0):
        raise PlacementError("balance_tolerance, node_tolerance and group_affinity must be >= 0")
    if max_swaps < 0 or (max_pack_swaps is not None and max_pack_swaps < 0):
        raise PlacementError("max_swaps and max_pack_swaps must be >= 0")


def _cell_layout(ranks: Sequence[RankSlot], caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells are rank-major: cell j belongs to rank ``rank_of_cell[j]`` on node
    ``node_of_cell[j]`` (nodes numbered in the ranks' order). Returns both, (P,) each."""
    rank_of_cell = np.repeat(np.arange(len(ranks)), caps)  # (P,)
    node_names = list(dict.fromkeys(r.node for r in ranks))
    node_index = {n: i for i, n in enumerate(node_names)}
    node_of_rank = np.array([node_index[r.node] for r in ranks], dtype=np.int64)  # (G,)
    return rank_of_cell, node_of_rank[rank_of_cell]


def _replan_swaps(
    cells: np.ndarray,
    w: np.ndarray,
    counts: np.ndarray,
    rank_of_cell: np.ndarray,
    node_of_cell: np.ndarray,
    caps: np.ndarray,
    shape: MoEShape,
    group_affinity: float,
    tolerances: tuple[float, float],
    budgets: tuple[int, int],
) -> np.ndarray:
    """(L, P) a re-plan's cells after swaps that bring a node (opt-in: ``max_swaps``) or, packing,
    a rank (kept copies carry the new load, so GPUs drift apart) back near a fresh plan's busiest
    for these counts; each swap moves two experts. ``tolerances``: (node, balance); ``budgets``:
    swaps per layer (for nodes, for ranks)."""
    node_tolerance, balance_tolerance = tolerances
    max_swaps, pack_swaps = budgets
    L, P = cells.shape
    N = int(node_of_cell.max()) + 1
    per_copy = w / counts  # (L, E)
    # Swapping two experts of different groups between nodes costs this much (load units).
    cross_group = group_affinity * w.sum(1) / N  # (L,)
    empty = np.full((L, P), -1, dtype=np.int64)
    fresh = _place(w, counts, empty, rank_of_cell, node_of_cell, caps, shape.n_group, group_affinity)
    node_cap = _busiest_bin_load(fresh, per_copy, node_of_cell) * (1.0 + node_tolerance)  # (L,)
    cells, _ = _refine(
        cells, per_copy, node_of_cell, node_of_cell, node_cap, max_swaps, None, shape.group_size, cross_group
    )
    if pack_swaps:
        rank_cap = _busiest_bin_load(fresh, per_copy, rank_of_cell) * (1.0 + balance_tolerance)  # (L,)
        cells, _ = _refine(
            cells,
            per_copy,
            rank_of_cell,
            node_of_cell,
            rank_cap,
            pack_swaps,
            node_cap,
            shape.group_size,
            cross_group,
        )
    return cells


def _expert_map(cells: np.ndarray, rank_of_cell: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """(L, P) cells -> (L, G, max caps) int32 expert map, -1 padded."""
    L, P = cells.shape
    slot_in_rank = np.arange(P) - np.repeat(np.cumsum(caps) - caps, caps)  # (P,)
    expert_map = np.full((L, caps.size, int(caps.max())), -1, dtype=np.int32)
    expert_map[:, rank_of_cell, slot_in_rank] = cells
    return expert_map


def _check_previous(previous: Plan, shape: MoEShape) -> None:
    if not isinstance(previous, Plan):
        raise PlacementError(f"previous must be a Plan, got {type(previous).__name__}")
    if previous.num_layers != shape.moe_layers:
        raise PlacementError(
            f"previous plan has {previous.num_layers} layers, the model {shape.moe_layers} MoE layers"
        )
    if previous.expert_map.max(initial=-1) >= shape.n_routed_experts:
        raise PlacementError(
            f"previous plan hosts expert {int(previous.expert_map.max())}, the model has {shape.n_routed_experts} experts"
        )


def _previous_cells(previous: Plan, ranks: Sequence[RankSlot], caps: np.ndarray) -> np.ndarray:
    """(L, P) the previous plan's experts on the new cells (matched by node and gpu), -1 if none.
    A rank that now holds fewer experts keeps its first ones."""
    where = {(r.node, r.gpu): i for i, r in enumerate(previous.ranks)}
    L = previous.num_layers
    width = previous.expert_map.shape[2]
    out = []
    for r, cap in zip(ranks, caps.tolist(), strict=True):
        i = where.get((r.node, r.gpu))
        block = np.full((L, cap), -1, dtype=np.int64)
        if i is not None:
            old = previous.expert_map[:, i, :]  # (L, width)
            # Hosted experts first (stable), then truncate to the new capacity.
            old = np.take_along_axis(old, np.argsort(old < 0, axis=1, kind="stable"), axis=1)
            n = min(cap, width)
            block[:, :n] = old[:, :n]
        out.append(block)
    return np.concatenate(out, axis=1)


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """For rows already sorted by ``keys`` (n,), the index of each row within its run of equal keys."""
    n = keys.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.r_[True, keys[1:] != keys[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    return np.arange(n) - first


def _keep(prev: np.ndarray, counts: np.ndarray, w: np.ndarray, node_of_cell: np.ndarray) -> np.ndarray:
    """(L, P) previous experts that stay where they are: per expert at most its new count; the
    ones dropped are second copies on one node first, then copies on the busiest nodes."""
    L, P = prev.shape
    E = counts.shape[1]
    N = int(node_of_cell.max()) + 1
    per_copy = w / counts  # (L, E)
    layer, cell = np.nonzero(prev >= 0)  # (copies,) hosted previous cells, layer-major
    expert = prev[layer, cell]
    node = node_of_cell[cell]
    # Node load if every previous copy stayed: drop copies on the busiest nodes first.
    node_load = np.zeros(L * N)  # (L * N,) flat (layer, node)
    np.add.at(node_load, layer * N + node, per_copy[layer, expert])
    # Index of each copy among the copies of its expert on its node (duplicates rank last).
    order = np.lexsort((cell, node, expert, layer))
    nth_on_node = np.empty_like(order)
    nth_on_node[order] = _occurrence((layer[order] * E + expert[order]) * N + node[order])
    # Each copy's rank among its expert's copies: first copies on a node first, lightest node first.
    order = np.lexsort((cell, node_load[layer * N + node], nth_on_node, expert, layer))
    rank = np.empty_like(order)
    rank[order] = _occurrence(layer[order] * E + expert[order])
    stay = rank < counts[layer, expert]
    kept = np.full((L, P), -1, dtype=np.int64)
    kept[layer[stay], cell[stay]] = expert[stay]
    return kept


def _busiest_bin_load(cells: np.ndarray, per_copy: np.ndarray, bin_of_cell: np.ndarray) -> np.ndarray:
    """(L,) largest load of a bin (a node, or a rank) when cells are binned by ``bin_of_cell``."""
    L = cells.shape[0]
    K = int(bin_of_cell.max()) + 1
    load = np.where(cells >= 0, per_copy[np.arange(L)[:, None], np.maximum(cells, 0)], 0.0)  # (L, P)
    return (load @ (bin_of_cell[:, None] == np.arange(K))).max(1)


def _refine(
    cells: np.ndarray,
    per_copy: np.ndarray,
    bin_of_cell: np.ndarray,
    node_of_cell: np.ndarray,
    cap: np.ndarray,
    max_swaps: int,
    node_cap: np.ndarray | None = None,
    group_size: int = 0,
    cross_group_penalty: np.ndarray | None = None,
    partners: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Swap pairs of copies until the busiest bin (a node, or a rank: ``bin_of_cell``) of every
    layer is at most ``cap`` (L,), or no swap lowers it, or a layer has made ``max_swaps`` swaps.

    Each step, per layer: the busiest bin trades one of its copies for one in one of the
    ``partners`` least-loaded bins, choosing the pair that leaves the larger of the two new
    loads the smallest. A swap never puts two copies
    of an expert on one node (or rank). With ``node_cap`` (L,) (balancing ranks), a swap between
    two nodes may not leave either above ``node_cap`` or above its load before the swap.
    ``cross_group_penalty`` (L,) is added to the score of a swap between experts of two groups
    (of ``group_size`` experts), which would take each away from its group's nodes.
    Returns the cells and the swaps made per layer (L,).
    """
    L, P = cells.shape
    rows = np.arange(L)
    state = _SwapState(cells, per_copy, bin_of_cell, node_of_cell)
    swaps = np.zeros(L, dtype=np.int64)  # (L,) made so far
    eps = 1e-9 * per_copy.sum(1) / P  # (L,) a swap must gain at least this much
    for _ in range(max_swaps * L if max_swaps else 0):
        busiest = state.bin_load.argmax(1)  # (L,)
        busiest_load = state.bin_load[rows, busiest]  # (L,)
        active = (busiest_load > cap * (1.0 + 1e-12)) & (swaps < max_swaps)
        if not active.any():
            break
        r = rows[active]
        busy_cells = state.members[busiest[r]]  # (l, cmax) cells of the busiest bin
        partner_cells = state.partner_cells(r, partners)  # (l, Y)
        score = state.swap_scores(
            r,
            busiest,
            busiest_load,
            busy_cells,
            partner_cells,
            eps,
            node_cap,
            group_size,
            cross_group_penalty,
        )  # (l, cmax * Y)
        best = score.argmin(1)
        do = np.isfinite(score[np.arange(r.size), best])
        if not do.any():
            break
        r, best, partner_cells = r[do], best[do], partner_cells[do]
        i, jj = np.divmod(best, partner_cells.shape[1])
        state.swap(r, state.members[busiest[r], i], partner_cells[np.arange(r.size), jj])
        swaps[r] += 1
    return state.cells, swaps


class _SwapState:
    """What ``_refine`` tracks while it swaps: cells, their loads, bin and node loads, and which
    bins and nodes hold each expert."""

    def __init__(
        self, cells: np.ndarray, per_copy: np.ndarray, bin_of_cell: np.ndarray, node_of_cell: np.ndarray
    ) -> None:
        L, P = cells.shape
        E = per_copy.shape[1]
        K = int(bin_of_cell.max()) + 1
        N = int(node_of_cell.max()) + 1
        rows = np.arange(L)
        self.bin_of_cell, self.node_of_cell = bin_of_cell, node_of_cell  # (P,) each
        self.cells = cells.copy()  # (L, P)
        self.cell_load = np.where(cells >= 0, per_copy[rows[:, None], np.maximum(cells, 0)], 0.0)  # (L, P)
        self.bin_load = self.cell_load @ (bin_of_cell[:, None] == np.arange(K))  # (L, K)
        self.node_load = self.cell_load @ (node_of_cell[:, None] == np.arange(N))  # (L, N)
        # (K, cmax) cells of each bin, -1 padded.
        sizes = np.bincount(bin_of_cell, minlength=K)
        self.members = np.full((K, int(sizes.max())), -1, dtype=np.int64)
        order = np.argsort(bin_of_cell, kind="stable")
        self.members[bin_of_cell[order], _occurrence(bin_of_cell[order])] = order
        li, cj = np.nonzero(cells >= 0)
        self.on_bin = np.zeros((L, E, K), dtype=bool)  # the bin holds a copy of the expert
        self.on_bin[li, cells[li, cj], bin_of_cell[cj]] = True
        self.on_node = np.zeros((L, E, N), dtype=bool)  # the node holds a copy of the expert
        self.on_node[li, cells[li, cj], node_of_cell[cj]] = True

    def partner_cells(self, r: np.ndarray, partners: int) -> np.ndarray:
        """(l, partners * cmax) cells of the ``partners`` least-loaded bins of layers ``r`` (the
        busiest is never one), -1 padded."""
        K = self.members.shape[0]
        light = np.argpartition(self.bin_load[r], min(partners, K) - 1, axis=1)[:, : min(partners, K)]
        return self.members[light].reshape(r.size, -1)

    def swap_scores(
        self,
        r: np.ndarray,
        busiest: np.ndarray,
        busiest_load: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        eps: np.ndarray,
        node_cap: np.ndarray | None,
        group_size: int,
        cross_group_penalty: np.ndarray | None,
    ) -> np.ndarray:
        """(l, cmax * Y) score of swapping cell ``x`` (l, cmax) of the busiest bin with cell ``y``
        (l, Y) of a partner in layers ``r``: the larger of the two bins' new loads (plus the
        cross-group penalty); inf where the swap is not allowed or gains nothing."""
        x_expert = np.where(x >= 0, self.cells[r[:, None], np.maximum(x, 0)], -1)  # (l, cmax)
        x_load = np.where(x >= 0, self.cell_load[r[:, None], np.maximum(x, 0)], 0.0)  # pads are masked below
        y_expert = np.where(y >= 0, self.cells[r[:, None], np.maximum(y, 0)], -1)  # (l, Y)
        y_load = np.where(y >= 0, self.cell_load[r[:, None], np.maximum(y, 0)], 0.0)
        y_bin = self.bin_of_cell[np.maximum(y, 0)]  # (l, Y)
        new_busiest = busiest_load[r, None, None] - x_load[:, :, None] + y_load[:, None, :]  # (l, cmax, Y)
        new_partner = self.bin_load[r[:, None], y_bin][:, None, :] - y_load[:, None, :] + x_load[:, :, None]
        score = np.maximum(new_busiest, new_partner)
        ok = self._keeps_copies_apart(r, busiest[r], x, y, x_expert, y_expert, y_bin) & (
            score < busiest_load[r, None, None] - eps[r, None, None]
        )  # (l, cmax, Y)
        if node_cap is not None:
            ok &= self._within_node_cap(r, x, y, x_load, y_load, node_cap)
        if cross_group_penalty is not None:
            xe, ye = np.maximum(x_expert, 0), np.maximum(y_expert, 0)
            cross = xe[:, :, None] // group_size != ye[:, None, :] // group_size
            score = score + np.where(cross, cross_group_penalty[r, None, None], 0.0)
        return np.where(ok, score, np.inf).reshape(r.size, -1)

    def _keeps_copies_apart(
        self,
        r: np.ndarray,
        busiest: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        x_expert: np.ndarray,
        y_expert: np.ndarray,
        y_bin: np.ndarray,
    ) -> np.ndarray:
        """(l, cmax, Y) the swap exchanges two real copies of different experts between the
        busiest bin (``busiest`` (l,)) and another, and puts neither where its expert already is:
        y's bin must not hold x and the busiest bin must not hold y; across nodes, the same for
        the two nodes, so copies stay on distinct nodes."""
        xe, ye = np.maximum(x_expert, 0), np.maximum(y_expert, 0)
        x_node = self.node_of_cell[np.maximum(x, 0)]  # (l, cmax)
        y_node = self.node_of_cell[np.maximum(y, 0)]  # (l, Y)
        rr = r[:, None, None]
        return (
            (x_expert >= 0)[:, :, None]
            & (y_expert >= 0)[:, None, :]
            & (y_bin != busiest[:, None])[:, None, :]
            & (x_expert[:, :, None] != y_expert[:, None, :])
            & ~self.on_bin[rr, xe[:, :, None], y_bin[:, None, :]]
            & ~self.on_bin[r[:, None], ye, busiest[:, None]][:, None, :]
            & (
                (x_node[:, :, None] == y_node[:, None, :])
                | (
                    ~self.on_node[rr, xe[:, :, None], y_node[:, None, :]]
                    & ~self.on_node[rr, ye[:, None, :], x_node[:, :, None]]
                )
            )
        )

    def _within_node_cap(
        self,
        r: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        x_load: np.ndarray,
        y_load: np.ndarray,
        node_cap: np.ndarray,
    ) -> np.ndarray:
        """(l, cmax, Y) a swap between two nodes leaves neither above ``node_cap`` (L,) or above
        its load before the swap."""
        x_node = self.node_of_cell[np.maximum(x, 0)]  # (l, cmax)
        y_node = self.node_of_cell[np.maximum(y, 0)]  # (l, Y)
        # Node loads after the swap: x's node loses x and gains y, y's node the reverse.
        d = y_load[:, None, :] - x_load[:, :, None]  # (l, cmax, Y) change at x's node
        nx = self.node_load[r[:, None], x_node][:, :, None]
        ny = self.node_load[r[:, None], y_node][:, None, :]
        same = x_node[:, :, None] == y_node[:, None, :]
        cap_n = node_cap[r, None, None]
        return same | ((nx + d <= np.maximum(nx, cap_n)) & (ny - d <= np.maximum(ny, cap_n)))

    def swap(self, r: np.ndarray, ci: np.ndarray, j: np.ndarray) -> None:
        """Swap the copies of cells ``ci`` and ``j`` (l,) in layers ``r`` (l,)."""
        ex, ey = self.cells[r, ci], self.cells[r, j]
        ga, gb = self.bin_of_cell[ci], self.bin_of_cell[j]
        na, nb = self.node_of_cell[ci], self.node_of_cell[j]
        lxa, lyb = self.cell_load[r, ci], self.cell_load[r, j]
        self.cells[r, ci], self.cells[r, j] = ey, ex
        self.cell_load[r, ci], self.cell_load[r, j] = lyb, lxa
        self.bin_load[r, ga] += lyb - lxa
        self.bin_load[r, gb] += lxa - lyb
        self.node_load[r, na] += lyb - lxa
        self.node_load[r, nb] += lxa - lyb
        self.on_bin[r, ex, ga] = False
        self.on_bin[r, ey, gb] = False
        self.on_bin[r, ex, gb] = True
        self.on_bin[r, ey, ga] = True
        self.on_node[r, ex, na] = False
        self.on_node[r, ey, nb] = False
        self.on_node[r, ex, nb] = True
        self.on_node[r, ey, na] = True


def _items(per_copy: np.ndarray, need: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """(L, W) experts of the copies still to place, heaviest copy first, -1 padded; equal loads
    in ``tiebreak`` (L, E) order."""
    L, E = per_copy.shape
    by_tiebreak = np.argsort(tiebreak, axis=1, kind="stable")  # (L, E)
    by_load = np.argsort(-np.take_along_axis(per_copy, by_tiebreak, axis=1), axis=1, kind="stable")
    order = np.take_along_axis(by_tiebreak, by_load, axis=1)  # (L, E) heaviest first, then tiebreak
    copies = np.take_along_axis(need, order, axis=1)  # (L, E) copies of each, in that order
    n_copies = copies.sum(1)  # (L,)
    W = int(n_copies.max(initial=0))
    out = np.full((L, W), -1, dtype=np.int64)
    if W:
        expert = np.repeat(order.ravel(), copies.ravel())
        layer = np.repeat(np.arange(L), n_copies)
        pos = np.arange(expert.size) - np.repeat(np.cumsum(n_copies) - n_copies, n_copies)
        out[layer, pos] = expert
    return out


def _place(
    w: np.ndarray,
    counts: np.ndarray,
    kept: np.ndarray,
    rank_of_cell: np.ndarray,
    node_of_cell: np.ndarray,
    caps: np.ndarray,
    n_group: int,
    affinity: float,
    deal: bool = True,
) -> np.ndarray:
    """(L, P) expert of every cell: ``kept`` cells stay, the other copies fill the free cells.

    Rows of longest-processing-time-first, vectorised across layers: each round, the next f
    heaviest copies (f = bins with a free cell; a bin is a node, or a rank when packing) are
    paired with the f bins in order of load per cell, heaviest copy to the lightest bin. A copy
    never goes to a bin (or, while avoidable, a node) that holds its expert already: it waits a
    round. Group alignment: within a round, copies of nearly the same load (within ``affinity`` x
    the mean load of a cell) are re-paired with their bins by place along the node line: groups
    laid out in order, each as long as its share of the load, against the bins' node order.

    ``deal``: a fresh plan with one expert per GPU first deals copies per group
    (``_deal_groups``), these rounds place only what the runs could not take, and a few swaps
    trim the busiest node.
    """
    L, E = w.shape
    per_copy = w / counts  # (L, E)
    packing = bool((caps > 1).any())
    if deal and not packing and affinity > 0 and n_group > 1 and (kept < 0).all():
        return _place_grouped(w, counts, rank_of_cell, node_of_cell, caps, n_group, affinity)
    if packing:
        # Bins are GPUs there, whose balance is the point: pair by place only within narrow bands.
        affinity = min(affinity, _PACK_BAND)
    bin_of_cell = rank_of_cell if packing else node_of_cell  # (P,)
    B = int(bin_of_cell.max()) + 1
    node_of_bin = np.zeros(B, dtype=np.int64)
    node_of_bin[bin_of_cell] = node_of_cell  # (B,)
    expert_pos, bin_pos = _line_positions(w, n_group, node_of_cell, node_of_bin)

    gsize = E // n_group
    need = counts - counts_of(kept, E)  # (L, E) copies still to place
    # Equal loads: interleave the groups (i-th expert of every group, then the (i+1)-th ...),
    # so a round of equal copies holds every group and alignment can sort them onto their nodes.
    interleaved = np.broadcast_to((np.arange(E) % gsize) * n_group + np.arange(E) // gsize, (L, E))
    item_e = _items(per_copy, need, interleaved)  # (L, W) heaviest first, -1 padded
    cells = kept.copy()
    if item_e.shape[1] == 0:
        return cells
    rounds = _BinRounds(w, per_copy, kept, item_e, bin_of_cell, node_of_bin, node_of_cell, packing, affinity)
    item_bin = rounds.run(expert_pos, bin_pos)  # (L, W)

    # Each bin's free cells take the bin's copies, heaviest first. Cells are bin-major within a
    # layer, so free cells in (layer, cell) order are already grouped by bin; a stable sort of
    # the copies by (layer, bin) lines them up (small integer keys: a radix sort).
    free_layer, free_cell = np.nonzero(kept < 0)
    item_layer, item_col = np.nonzero(item_e >= 0)
    key = item_layer * B + item_bin[item_layer, item_col]
    order = np.argsort(key.astype(np.int32 if L * B < 2**31 else np.int64), kind="stable")
    cells[free_layer, free_cell] = item_e[item_layer[order], item_col[order]]
    if rounds.gpu_dups:
        cells = _repair_duplicates(cells, per_copy, rank_of_cell, strict=True)
    if rounds.node_dups:
        cells = _repair_duplicates(cells, per_copy, node_of_cell, strict=False, movable=kept < 0)
    return cells


def _place_grouped(
    w: np.ndarray,
    counts: np.ndarray,
    rank_of_cell: np.ndarray,
    node_of_cell: np.ndarray,
    caps: np.ndarray,
    n_group: int,
    affinity: float,
) -> np.ndarray:
    """(L, P) a fresh plan, one expert per GPU: copies dealt per group (``_deal_groups``), the
    global rounds for what the runs could not take, then a few swaps trim the busiest node."""
    L, E = w.shape
    N = int(node_of_cell.max()) + 1
    per_copy = w / counts  # (L, E)
    dealt = _deal_groups(w, counts, node_of_cell, n_group)
    cells = dealt
    if (dealt < 0).any():
        cells = _place(w, counts, dealt, rank_of_cell, node_of_cell, caps, n_group, affinity, deal=False)
        # A copy its run could not take may find free cells only on nodes holding its expert.
        cells = _repair_duplicates(cells, per_copy, node_of_cell, strict=False)
    if _BALANCE_SWAPS:
        mean_node_load = w.sum(1) / N  # (L,)
        cells, _ = _refine(
            cells,
            per_copy,
            node_of_cell,
            node_of_cell,
            mean_node_load * (1.0 + _BALANCE_TOL),
            _BALANCE_SWAPS,
            group_size=E // n_group,
            cross_group_penalty=_BALANCE_PEN * mean_node_load,
            partners=_BALANCE_PARTNERS,
        )
    return cells


def _line_positions(
    w: np.ndarray, n_group: int, node_of_cell: np.ndarray, node_of_bin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Places along the node line (in nodes, node n ending where its share of the cells does):
    each expert's (L, E), its group laid out in order as long as its share of the load and its
    copies spread over the group's stretch in id order, and each bin's node's middle (B,)."""
    L, E = w.shape
    N = int(node_of_cell.max()) + 1
    gsize = E // n_group
    node_cells = np.bincount(node_of_cell, minlength=N).astype(np.float64)  # (N,)
    share = w.reshape(L, n_group, gsize).sum(2) / w.sum(1, keepdims=True)  # (L, n_group)
    line = np.cumsum(node_cells) / node_cells.sum() * N  # node n ends at line[n]
    group_mid = (np.cumsum(share, 1) - share / 2) * N  # (L, n_group)
    bin_pos = (line - node_cells / node_cells.sum() * N / 2)[node_of_bin]  # (B,)
    expert_pos = np.repeat(group_mid, gsize, axis=1) + (
        (np.arange(E) % gsize + 0.5) / gsize - 0.5
    ) * np.repeat(share * N, gsize, axis=1)  # (L, E)
    return expert_pos, bin_pos


class _BinRounds:
    """The longest-processing-time-first rounds of ``_place``: state per (layer, bin) updated in
    place round by round; a bin is a node, or a rank (GPU) when packing."""

    def __init__(
        self,
        w: np.ndarray,
        per_copy: np.ndarray,
        kept: np.ndarray,
        item_e: np.ndarray,
        bin_of_cell: np.ndarray,
        node_of_bin: np.ndarray,
        node_of_cell: np.ndarray,
        packing: bool,
        affinity: float,
    ) -> None:
        L, E = w.shape
        P = kept.shape[1]
        B, N = node_of_bin.size, int(node_of_cell.max()) + 1
        self.item_e = item_e  # (L, W) experts of the copies to place, heaviest first, -1 padded
        self.item_load = per_copy[np.arange(L)[:, None], np.maximum(item_e, 0)]  # (L, W)
        self.node_of_bin = node_of_bin  # (B,)
        self.packing = packing
        self.affinity = affinity
        # Load bands: copies whose loads differ by less than ``affinity`` x the mean load of a cell
        # are interchangeable for balance, so they may be paired by place along the line instead.
        self.unit = w.sum(1, keepdims=True) / P  # (L, 1) mean load of a cell
        self.band = (
            np.floor(self.item_load / np.maximum(affinity * self.unit, 1e-300)).astype(np.int64)
            if affinity > 0
            else None
        )  # (L, W)
        cells_per_bin = np.bincount(bin_of_cell, minlength=B).astype(np.float64)  # (B,)
        self.inv_cells = 1.0 / cells_per_bin  # (B,)
        li, cj = np.nonzero(kept >= 0)
        ke = kept[li, cj]
        self.load = np.zeros((L, B))  # load of each bin's copies
        np.add.at(self.load, (li, bin_of_cell[cj]), per_copy[li, ke])
        self.free = cells_per_bin[None, :] - counts_of(np.where(kept >= 0, bin_of_cell, -1), B)  # (L, B)
        self.on_node = np.zeros((L, E, N), dtype=bool)  # the node holds a copy of the expert
        self.on_node[li, ke, node_of_cell[cj]] = True
        self.on_bin = self.on_node  # (L, E, B); the same array when bins are nodes
        if packing:
            self.on_bin = np.zeros((L, E, B), dtype=bool)
            self.on_bin[li, ke, bin_of_cell[cj]] = True
        # (B,) bins numbered GPU index within node first, node second: neighbours are on distinct nodes.
        spread = np.lexsort((node_of_bin, np.arange(B) - np.searchsorted(node_of_bin, node_of_bin)))
        self.spread = np.argsort(spread)
        self.item_bin = np.full(item_e.shape, -1, dtype=np.int64)  # (L, W) bin each copy went to
        self.done = item_e < 0  # (L, W)
        # Copies forced onto a node (GPU) that holds their expert: the caller repairs them.
        self.node_dups = self.gpu_dups = False

    def run(self, expert_pos: np.ndarray, bin_pos: np.ndarray) -> np.ndarray:
        """(L, W) the bin of every copy, after rounds until every copy is placed."""
        while not self.done.all():
            has_room = self.free > 0  # (L, B)
            layer, item, b = self._pairs(has_room)
            if self.affinity > 0:
                layer, item, b = _align(
                    layer,
                    item,
                    b,
                    self.band[layer, item],
                    expert_pos[layer, self.item_e[layer, item]],
                    bin_pos[b],
                )
            layer, item, b = self._avoid_clashes(layer, item, b, has_room)
            self._commit(layer, item, b)
        return self.item_bin

    def _pairs(self, has_room: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The round's (layer, copy, bin) pairs: the next f waiting copies of each layer (f bins
        with room), heaviest to the lightest bin."""
        L, B = self.load.shape
        n_bins = has_room.sum(1)  # (L,)
        load_per_cell = np.where(has_room, self.load * self.inv_cells, np.inf)  # (L, B)
        if self.packing and self.affinity > 0:
            # Ranks of nearly equal load (one band) interleaved across nodes, so that a hot
            # expert's adjacent copies land on distinct nodes.
            banded = np.where(
                has_room, np.floor(load_per_cell / np.maximum(self.affinity * self.unit, 1e-300)), np.inf
            )
            order = np.lexsort((np.broadcast_to(self.spread, (L, B)), banded), axis=1)
        else:
            order = np.argsort(load_per_cell, axis=1, kind="stable")  # lightest first
        todo = ~self.done
        pos = np.cumsum(todo, axis=1) - 1  # index among the copies still waiting
        layer, item = np.nonzero(todo & (pos < n_bins[:, None]))
        return layer, item, order[layer, pos[layer, item]]

    def _avoid_clashes(
        self, layer: np.ndarray, item: np.ndarray, b: np.ndarray, has_room: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pairs without a copy going where its expert is: such a copy takes the lightest bin
        of its layer that no copy took this round and that does not hold its expert (one copy per
        (layer, bin)), or waits a round; when no layer can move at all, duplicates are forced."""
        e = self.item_e[layer, item]
        gpu_clash = self.on_bin[layer, e, b] if self.packing else np.zeros(layer.size, dtype=bool)
        # Packing balances GPUs first: a second copy on a node is allowed there, since making
        # copies wait for another node costs more GPU balance than the locality it buys.
        clash = gpu_clash if self.packing else self.on_node[layer, e, self.node_of_bin[b]]
        if not clash.any():
            return layer, item, b
        used = np.zeros(self.load.shape, dtype=bool)
        used[layer[~clash], b[~clash]] = True
        cl, ce, ci = layer[clash], e[clash], item[clash]
        holds = self.on_bin[cl, ce] if self.packing else self.on_node[cl, ce][:, self.node_of_bin]
        blocked = used[cl] | ~has_room[cl] | holds
        alt = np.where(blocked, np.inf, self.load[cl] * self.inv_cells).argmin(1)
        ok_alt = ~blocked[np.arange(cl.size), alt]
        _, first = np.unique(np.where(ok_alt, cl * self.load.shape[1] + alt, -1), return_index=True)
        ok_alt &= np.isin(np.arange(cl.size), first)
        if (~clash).any() or ok_alt.any():
            return (
                np.concatenate([layer[~clash], cl[ok_alt]]),
                np.concatenate([item[~clash], ci[ok_alt]]),
                np.concatenate([b[~clash], alt[ok_alt]]),
            )
        # No layer can move: every free bin holds the waiting copy's expert. Place them anyway, a
        # second copy on a node before (packing) one on a GPU; the caller's repair swaps those away.
        force = ~gpu_clash if (~gpu_clash).any() else np.ones(layer.size, dtype=bool)
        self.node_dups = not self.packing
        self.gpu_dups |= bool(gpu_clash[force].any())
        return layer[force], item[force], b[force]

    def _commit(self, layer: np.ndarray, item: np.ndarray, b: np.ndarray) -> None:
        e = self.item_e[layer, item]
        self.load[layer, b] += self.item_load[layer, item]
        self.free[layer, b] -= 1  # one copy per (layer, bin) per round
        self.on_node[layer, e, self.node_of_bin[b]] = True
        if self.packing:
            self.on_bin[layer, e, b] = True
        self.item_bin[layer, item] = b
        self.done[layer, item] = True


def _deal_groups(w: np.ndarray, counts: np.ndarray, node_of_cell: np.ndarray, n_group: int) -> np.ndarray:
    """(L, P) a fresh plan's cells with the copies dealt inside their expert group's run of nodes
    (one expert per GPU: bins are nodes); -1 where a copy is left to ``_place``'s global rounds.

    Layout. The groups lie along the cell line in order, group g's run ``Q_g`` cells long; a
    node's cells go to the runs they overlap (integer quotas per (group, node)). Every run should
    end near the mean load of a cell ``m``:
    - a run keeps at most one copy of an expert per node (first pass: runs sized by load share);
      further copies go to a run half the line away;
    - a group whose copies average less than ``m`` keeps its heaviest, as many as still average
      ``m``; its lightest copies are filler;
    - a group above ``m`` gets its copies plus filler, in line order, as many filler copies as
      bring its load per cell down to ``m`` (the runs share the filler in proportion to their
      load above ``m``).
    So the load that leaves a group is that of its lightest copies.

    Dealing. Rounds of longest-processing-time-first per (layer, run), vectorised over both: a
    round pairs the run's next heaviest copies with its nodes in order of the load per quota cell
    they would reach with the heaviest copy left (a node more than a copy ahead sits the round
    out). A copy never joins a node that holds its expert, nor one that another run gives a copy
    of its expert in the same round: it takes another node of its run that no copy took this
    round, or waits; if no node of its run with room lacks the expert, the
    earliest-finishing free cell of another run of its layer, else the global rounds.

    Arrays are per run: one row per (layer, group), ``runs = L * n_group``, layer-major.
    """
    L, E = w.shape
    P = int(counts[0].sum())
    N = int(node_of_cell.max()) + 1
    gsize = E // n_group
    runs = L * n_group
    layer_of_run = np.repeat(np.arange(L), n_group)  # (runs,)
    per_copy_in_group = (w / counts).reshape(runs, gsize)  # (runs, gsize)
    # Each group's copies, heaviest first: expert index within the group, -1 padded.
    own_expert = _items(
        per_copy_in_group, counts.reshape(runs, gsize), np.broadcast_to(np.arange(gsize), (runs, gsize))
    )  # (runs, max_copies)
    is_copy = own_expert >= 0
    own_load = np.where(
        is_copy, per_copy_in_group[np.arange(runs)[:, None], np.maximum(own_expert, 0)], 0.0
    )  # (runs, max_copies), heaviest first
    mean_cell_load = (w.sum(1) / P)[layer_of_run]  # (runs,) mean load of a cell of the run's layer
    cells_per_node = np.bincount(node_of_cell, minlength=N)  # (N,)
    node_bounds = np.concatenate([[0], np.cumsum(cells_per_node)])  # (N + 1,) node n is cells [b[n], b[n+1])

    # Layout: the copies each run keeps (at most one of an expert per node of its run, as many
    # as average the mean) and the filler (the rest), shared among the hot runs in line order.
    one_per_node = _one_copy_per_node(own_expert, own_load, mean_cell_load, node_bounds, n_group, P)
    keep, hot, load_above_mean = _copies_kept(own_load, one_per_node, mean_cell_load)
    filler_run, filler_col = _filler_in_line_order(is_copy & ~keep, one_per_node, layer_of_run, n_group)
    filler_lack = np.maximum(mean_cell_load[filler_run] - own_load[filler_run, filler_col], 0.0)  # (F,)
    filler_taken, receiving_group = _share_filler(
        layer_of_run[filler_run], filler_lack, hot.reshape(L, n_group), load_above_mean.reshape(L, n_group)
    )

    # Each run's nodes, in line order, and its cells on each (its quota).
    run_cells = keep.sum(1) + filler_taken.ravel()  # (runs,)
    quota = _run_quotas(run_cells, node_bounds, n_group)  # (runs, N)
    max_run_nodes = int((quota > 0).sum(1).max(initial=0))
    run_nodes = np.argsort(quota <= 0, axis=1, kind="stable")[:, :max_run_nodes]  # (runs, H) node ids
    free = np.take_along_axis(quota, run_nodes, axis=1)  # (runs, H) cells left; 0 on padding

    # What each run deals: the copies it keeps and the filler it receives, heaviest first.
    kept_run, kept_col = np.nonzero(keep)
    item_run = np.concatenate([kept_run, layer_of_run[filler_run] * n_group + receiving_group])
    item_expert = np.concatenate(
        [
            (kept_run % n_group) * gsize + own_expert[kept_run, kept_col],
            (filler_run % n_group) * gsize + own_expert[filler_run, filler_col],
        ]
    )
    item_weight = np.concatenate([own_load[kept_run, kept_col], own_load[filler_run, filler_col]])
    items = _run_items(item_run, item_expert, item_weight, runs)
    if items is None:
        return np.full((L, P), -1, dtype=np.int64)
    item_e, item_load = items  # (runs, M) each

    # Dealing: rounds of longest-processing-time-first per run.
    dealer = _RunDealer(item_e, item_load, run_nodes, free, layer_of_run * E, E, N, n_group)
    item_node = dealer.deal()  # (runs, M)
    return _cells_from_item_nodes(item_node, item_e, layer_of_run, node_of_cell, L, P)


def _run_quotas(run_cells: np.ndarray, node_bounds: np.ndarray, n_group: int) -> np.ndarray:
    """(runs, N) cells of each node in each run, for runs of ``run_cells`` (runs,) cells laid out
    in group order along each layer's cell line; ``node_bounds`` (N + 1,) the nodes' boundaries."""
    L = run_cells.size // n_group
    run_bounds = np.concatenate(
        [np.zeros((L, 1), dtype=np.int64), np.cumsum(run_cells.reshape(L, n_group), 1)], 1
    )  # (L, n_group + 1)
    return np.maximum(
        np.minimum(run_bounds[:, 1:, None], node_bounds[None, None, 1:])
        - np.maximum(run_bounds[:, :-1, None], node_bounds[None, None, :-1]),
        0,
    ).reshape(L * n_group, len(node_bounds) - 1)


def _one_copy_per_node(
    own_expert: np.ndarray,
    own_load: np.ndarray,
    mean_cell_load: np.ndarray,
    node_bounds: np.ndarray,
    n_group: int,
    P: int,
) -> np.ndarray:
    """(runs, max_copies) bool: the copies a run may keep, at most one of an expert per node of
    its run. First pass, to know the nodes of each run: every run sized by its load share."""
    runs, max_copies = own_expert.shape
    L = runs // n_group
    gsize = int(own_expert.max(initial=0)) + 1
    is_copy = own_expert >= 0
    share = own_load.sum(1).reshape(L, n_group) / (mean_cell_load.reshape(L, n_group)[:, :1] * P)
    bounds = np.rint(np.concatenate([np.zeros((L, 1)), np.cumsum(share, 1)], 1) * P).astype(np.int64)
    bounds[:, -1] = P  # (L, n_group + 1) runs' boundaries on the cell line
    nodes_per_run = (_run_quotas(np.diff(bounds, axis=1).ravel(), node_bounds, n_group) > 0).sum(1)  # (runs,)
    # Copies of an expert are adjacent: which copy of its expert each one is.
    nth_copy = np.zeros((runs, max_copies), dtype=np.int64)
    cr, ci = np.nonzero(is_copy)
    nth_copy[cr, ci] = _occurrence(cr * gsize + own_expert[cr, ci])
    return is_copy & (nth_copy < nodes_per_run[:, None])


def _copies_kept(
    own_load: np.ndarray, one_per_node: np.ndarray, mean_cell_load: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Second pass: which copies each run keeps. A run whose copies average less than the mean
    cell load ``m`` keeps its heaviest, as many as still average ``m`` (to the nearest copy); the
    rest joins the filler. A "hot" run (all its copies average at least ``m``) keeps them all.

    Returns keep (runs, max_copies) bool, hot (runs,) bool, and each hot run's load above ``m``
    per cell (runs,), 0 for the others."""
    runs = own_load.shape[0]
    m = mean_cell_load  # (runs,)
    mine_load = np.where(one_per_node, own_load, 0.0)  # (runs, max_copies)
    cum_load = np.cumsum(mine_load, 1)
    cum_copies = np.cumsum(one_per_node, 1)  # copies of the run up to here
    n_at_mean = (one_per_node & (cum_load >= cum_copies * m[:, None])).sum(1)  # (runs,)
    n_mine = one_per_node.sum(1)
    at_next = one_per_node & (cum_copies == (n_at_mean + 1)[:, None])
    next_load = np.where(at_next.any(1), own_load[np.arange(runs), at_next.argmax(1)], 0.0)  # (runs,)
    load_at_mean = np.where(n_at_mean > 0, (mine_load * (cum_copies <= n_at_mean[:, None])).sum(1), 0.0)
    hot = n_at_mean >= n_mine
    n_keep = np.where(hot, n_mine, n_at_mean + (load_at_mean - n_at_mean * m > (m - next_load) / 2))
    keep = one_per_node & (cum_copies <= n_keep[:, None])
    load_above_mean = np.where(hot, cum_load[:, -1] - n_mine * m, 0.0)
    return keep, hot, load_above_mean


def _filler_in_line_order(
    filler: np.ndarray, one_per_node: np.ndarray, layer_of_run: np.ndarray, n_group: int
) -> tuple[np.ndarray, np.ndarray]:
    """(F,) run and column of each filler copy (``filler`` (runs, max_copies) bool), in line
    order per layer: by the group's place, a run's copies beyond one per node (heavy) counted
    half the line away, then heaviest first."""
    filler_run, filler_col = np.nonzero(filler)
    far = ~one_per_node[filler_run, filler_col]
    place = np.where(far, (filler_run + n_group // 2) % n_group, filler_run % n_group)
    order = np.lexsort((filler_col, place, layer_of_run[filler_run]))
    return filler_run[order], filler_col[order]


def _share_filler(
    filler_layer: np.ndarray, filler_lack: np.ndarray, hot: np.ndarray, load_above_mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hot runs take the filler in line order, each as many copies as bring it down to the mean
    (the runs share it in proportion to their load above the mean).

    ``filler_layer`` (F,) layer of each filler copy (grouped by layer, in line order),
    ``filler_lack`` (F,) the load it lacks to reach the mean, ``hot`` and ``load_above_mean``
    (L, n_group). Returns filler copies each run takes (L, n_group) and each copy's receiving
    group (F,)."""
    L, n_group = hot.shape
    index_in_layer = _occurrence(filler_layer)  # (F,)
    n_fill = np.bincount(filler_layer, minlength=L)  # (L,)
    lack = np.zeros((L, int(n_fill.max(initial=0)) + 1))
    lack[filler_layer, index_in_layer + 1] = filler_lack
    lack = np.cumsum(lack, 1)  # (L, F + 1): load the first f filler copies lack to reach m each
    total_above = load_above_mean.sum(1, keepdims=True)  # (L, 1)
    want = (
        np.cumsum(load_above_mean, 1)
        / np.where(total_above > 0, total_above, 1.0)
        * lack[np.arange(L), n_fill][:, None]
    )  # (L, n_group)
    # Where each run's filler ends: the count whose lack is nearest the runs' load above m so far.
    hi = np.minimum((lack[:, None, :] < want[:, :, None]).sum(2), n_fill[:, None])  # (L, n_group)
    lo = np.maximum(hi - 1, 0)
    d_hi = np.take_along_axis(lack, hi, 1) - want
    d_lo = want - np.take_along_axis(lack, lo, 1)
    ends = np.where(d_lo < d_hi, lo, hi)
    last_hot = n_group - 1 - np.argmax(hot[:, ::-1], 1)  # (L,)
    ends = np.where(np.arange(n_group)[None, :] >= last_hot[:, None], n_fill[:, None], ends)
    ends = np.maximum.accumulate(ends, axis=1)
    taken = np.diff(np.concatenate([np.zeros((L, 1), dtype=np.int64), ends], 1), axis=1)  # (L, n_group)
    receiving_group = (np.cumsum(taken, 1)[filler_layer] > index_in_layer[:, None]).argmax(1)  # (F,)
    return taken, receiving_group


def _run_items(
    item_run: np.ndarray, item_expert: np.ndarray, item_weight: np.ndarray, runs: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(runs, M) expert ids and loads of each run's copies, heaviest first (-1 / 0 padded), from
    flat (copies,) arrays; None when there is nothing to deal."""
    # Heaviest first within each run: one sort on run, then load (loads lie in [0, span)).
    span = float(item_weight.max(initial=0.0)) + 1.0
    order = np.argsort(item_run * span - item_weight, kind="stable")
    item_run, item_expert, item_weight = item_run[order], item_expert[order], item_weight[order]
    col = _occurrence(item_run)
    M = int(col.max(initial=-1)) + 1
    if M == 0:
        return None
    item_e = np.full((runs, M), -1, dtype=np.int64)
    item_e[item_run, col] = item_expert
    item_load = np.zeros((runs, M))
    item_load[item_run, col] = item_weight
    return item_e, item_load


class _RunDealer:
    """The dealing rounds of ``_deal_groups``: state per run (row) and per node of its run
    (column h of ``run_nodes`` (runs, H)), updated in place round by round."""

    def __init__(
        self,
        item_e: np.ndarray,
        item_load: np.ndarray,
        run_nodes: np.ndarray,
        free: np.ndarray,
        first_expert: np.ndarray,
        n_experts: int,
        n_nodes: int,
        n_group: int,
    ) -> None:
        runs, M = item_e.shape
        self.item_e = item_e  # (runs, M) expert ids, heaviest first, -1 padded
        self.item_load = item_load  # (runs, M)
        self.run_nodes = run_nodes  # (runs, H) node ids of each run
        self.free = free  # (runs, H) free cells of the run on each of its nodes
        self.inv_quota = 1.0 / np.maximum(free, 1)  # (runs, H)
        self.node_load = np.zeros(run_nodes.shape)  # (runs, H) load the run put on each node
        # (layer, expert, node) flattened: the node holds a copy of the expert in that layer.
        self.holds = np.zeros(first_expert.size // n_group * n_experts * n_nodes, dtype=bool)
        self.first_expert = first_expert  # (runs,) layer * E: flat (layer, expert) of expert 0
        self.n_nodes = n_nodes
        self.n_group = n_group
        self.group_size = n_experts // n_group
        self.item_node = np.full((runs, M), -1, dtype=np.int64)  # (runs, M) node dealt to, -1
        self.done = item_e < 0  # (runs, M)
        self.n_items = (~self.done).sum(1)  # (runs,) items are a prefix of each row
        self.run_ids = np.arange(runs)

    def _holds_at(self, first_expert: np.ndarray, expert: Any, node: np.ndarray) -> np.ndarray:
        """Flat index into ``holds`` of (layer, expert, node) (broadcasting)."""
        return (first_expert + expert) * self.n_nodes + node

    def deal(self) -> np.ndarray:
        """(runs, M) the node each copy was dealt to, -1 for those left to the global rounds.

        Each round looks at a window of each row's items from its first one not done: the copies
        it deals (one per node at most) and those waiting for a node."""
        M = self.item_e.shape[1]
        H = self.run_nodes.shape[1]
        window = min(M, 2 * H + 2)
        cols = np.arange(window)
        first_todo = np.zeros(self.run_ids.size, dtype=np.int64)  # (runs,) first item not done
        for _ in range(4 * M + 8):  # each round deals a copy of every unfinished row but rare waits
            if not (first_todo < self.n_items).any():
                break
            at = first_todo[:, None] + cols
            in_window = at < self.n_items[:, None]
            window_items = np.minimum(at, M - 1)  # (runs, window) item index
            todo = in_window & ~self.done[self.run_ids[:, None], window_items]
            self._round(first_todo, todo, window_items)
            first_todo = self._advance(first_todo, in_window, window_items, window)
        return self.item_node

    def _round(self, first_todo: np.ndarray, todo: np.ndarray, window_items: np.ndarray) -> None:
        """One round: pair each row's waiting copies with its nodes, earliest finish first."""
        M = self.item_e.shape[1]
        has_room = self.free > 0  # (runs, H)
        heaviest_left = self.item_load[self.run_ids, np.minimum(first_todo, M - 1)]  # (runs,)
        finish = np.where(has_room, (self.node_load + heaviest_left[:, None]) * self.inv_quota, np.inf)
        # A node sits a round out while it would finish later than another node taking two copies.
        threshold = np.where(
            has_room, (self.node_load + 2.0 * heaviest_left[:, None]) * self.inv_quota, np.inf
        ).min(1)
        in_round = has_room & (finish <= threshold[:, None] * (1.0 + 1e-12))
        n_in_round = in_round.sum(1)  # (runs,)
        order = np.argsort(np.where(in_round, finish, np.inf), axis=1, kind="stable")  # earliest finish first
        pos = np.cumsum(todo, axis=1) - 1
        run, slot = np.nonzero(todo & (pos < n_in_round[:, None]))
        h = order[run, pos[run, slot]]  # (deals,) column of the run's node
        item = window_items[run, slot]
        e = self.item_e[run, item]
        clash = self.holds[self._holds_at(self.first_expert[run], e, self.run_nodes[run, h])]
        stranded = (run[:0], item[:0])
        if clash.any():
            run, item, h, stranded = self._reroute(run, item, h, e, clash, has_room, finish)
            e = self.item_e[run, item]
        go = self._one_copy_per_node(run, h, e)
        self._commit(run[go], item[go], h[go], e[go])
        for r0, i0 in zip(stranded[0].tolist(), stranded[1].tolist(), strict=True):
            self._place_stranded(r0, i0)

    def _one_copy_per_node(self, run: np.ndarray, h: np.ndarray, e: np.ndarray) -> np.ndarray:
        """(deals,) bool: the round's deals that go ahead. The runs of a layer share nodes, and a
        group's copies beyond one per node are other runs' filler, so two runs can send copies of
        one expert to one node in the same round (``holds`` shows neither yet): the copy of the
        run's own group goes first, the others wait a round and then avoid that node."""
        key = self._holds_at(self.first_expert[run], e, self.run_nodes[run, h])  # (deals,)
        filler = e // self.group_size != run % self.n_group
        order = np.lexsort((np.arange(key.size), filler, key))  # by key, own group first
        first = np.ones(key.size, dtype=bool)
        first[1:] = key[order][1:] != key[order][:-1]
        go = np.zeros(key.size, dtype=bool)
        go[order[first]] = True
        return go

    def _reroute(
        self,
        run: np.ndarray,
        item: np.ndarray,
        h: np.ndarray,
        e: np.ndarray,
        clash: np.ndarray,
        has_room: np.ndarray,
        finish: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """A copy paired with a node holding its expert takes the earliest-finishing node with
        room that no copy took this round and lacks the expert; none free now: it waits a round;
        none at all in the run: stranded (``_place_stranded``). Returns the round's (run, item,
        h) pairs and the stranded (run, item)."""
        used = np.zeros(self.free.shape, dtype=bool)
        used[run[~clash], h[~clash]] = True
        cr, ce, ci = run[clash], e[clash], item[clash]
        never = (
            ~has_room[cr]
            | self.holds[self._holds_at(self.first_expert[cr][:, None], ce[:, None], self.run_nodes[cr])]
        )
        blocked = never | used[cr]
        alt = np.where(blocked, np.inf, finish[cr]).argmin(1)
        ok = ~blocked[np.arange(cr.size), alt]
        H = self.free.shape[1]
        _, first = np.unique(np.where(ok, cr * H + alt, -1), return_index=True)
        ok &= np.isin(np.arange(cr.size), first)  # one copy per (run, node)
        stranded = (cr[never.all(1)], ci[never.all(1)])
        run = np.concatenate([run[~clash], cr[ok]])
        item = np.concatenate([item[~clash], ci[ok]])
        h = np.concatenate([h[~clash], alt[ok]])
        return run, item, h, stranded

    def _commit(self, run: np.ndarray, item: np.ndarray, h: np.ndarray, e: np.ndarray) -> None:
        node = self.run_nodes[run, h]
        self.node_load[run, h] += self.item_load[run, item]  # one copy per (run, node) per round
        self.free[run, h] -= 1
        self.holds[self._holds_at(self.first_expert[run], e, node)] = True
        self.item_node[run, item] = node
        self.done[run, item] = True

    def _place_stranded(self, r0: int, i0: int) -> None:
        """Rare: every node of its run with room holds the expert. The earliest-finishing free
        cell of another run of its layer that lacks it, else the global rounds."""
        self.done[r0, i0] = True
        first_run = r0 - r0 % self.n_group
        layer_runs = slice(first_run, first_run + self.n_group)
        e0, x0 = int(self.item_e[r0, i0]), float(self.item_load[r0, i0])
        cost = np.where(
            (self.free[layer_runs] > 0)
            & ~self.holds[
                self._holds_at(self.first_expert[layer_runs][:, None], e0, self.run_nodes[layer_runs])
            ],
            (self.node_load[layer_runs] + x0) * self.inv_quota[layer_runs],
            np.inf,
        )  # (n_group, H)
        g, h0 = np.unravel_index(int(cost.argmin()), cost.shape)
        if np.isfinite(cost[g, h0]):
            r1 = first_run + int(g)
            self.node_load[r1, h0] += x0
            self.free[r1, h0] -= 1
            self.holds[self._holds_at(self.first_expert[r1], e0, self.run_nodes[r1, h0])] = True
            self.item_node[r0, i0] = self.run_nodes[r1, h0]

    def _advance(
        self, first_todo: np.ndarray, in_window: np.ndarray, window_items: np.ndarray, window: int
    ) -> np.ndarray:
        """Move each row's window on; a row with no free cell left is finished (a copy of another
        run took one of its cells: its lightest copies go to the global rounds)."""
        left = in_window & ~self.done[self.run_ids[:, None], window_items]
        first_todo = np.where(left.any(1), first_todo + left.argmax(1), first_todo + window)
        return np.where((self.free > 0).any(1), first_todo, self.n_items)


def _cells_from_item_nodes(
    item_node: np.ndarray,
    item_e: np.ndarray,
    layer_of_run: np.ndarray,
    node_of_cell: np.ndarray,
    L: int,
    P: int,
) -> np.ndarray:
    """(L, P) dealt copies on their nodes' cells: the j-th copy on (layer, node) its j-th cell."""
    N = int(node_of_cell.max()) + 1
    out = np.full((L, P), -1, dtype=np.int64)
    pr, pi = np.nonzero(item_node >= 0)
    layer, node, expert = layer_of_run[pr], item_node[pr, pi], item_e[pr, pi]
    order = np.argsort(layer * N + node, kind="stable")
    layer, node, expert = layer[order], node[order], expert[order]
    first_cell = np.searchsorted(node_of_cell, np.arange(N))  # cells of a node are contiguous
    out[layer, first_cell[node] + _occurrence(layer * N + node)] = expert
    return out


def _align(
    layer: np.ndarray,
    item: np.ndarray,
    b: np.ndarray,
    band: np.ndarray,
    item_key: np.ndarray,
    bin_key: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-pair one round's pairs (``layer``, copy ``item``, bin ``b``; (pairs,) each): within each
    layer and load ``band`` (copies of nearly equal load), copies in ``item_key`` order take the
    band's bins in ``bin_key`` order. Pairs come in (layer, position) order, so a band's pairs are
    contiguous."""
    segment = layer * (int(band.max()) + 1) + band
    item_order = np.lexsort((item_key, segment))
    bin_order = np.lexsort((bin_key, segment))
    return layer, item[item_order], b[bin_order]


def _repair_duplicates(
    cells: np.ndarray,
    per_copy: np.ndarray,
    bin_of_cell: np.ndarray,
    strict: bool = True,
    movable: np.ndarray | None = None,
) -> np.ndarray:
    """Swap away a second copy of an expert in one bin of cells (a rank, or a node).

    Greedy packing can leave one when the last free cells are all on ranks (nodes) that already
    hold the expert. Each duplicate is swapped with the copy elsewhere whose load is closest,
    among those that create no new duplicate. ``strict``: raise if that is impossible (two
    copies on one GPU are useless); otherwise leave it (two copies on one node only cost
    locality). Rare, so a plain loop over the cases. ``movable`` (L, P): only these cells may
    take part (a re-plan swaps only copies it places anyway, so the repair moves nothing more).
    """
    L, P = cells.shape
    K = int(bin_of_cell.max()) + 1
    E = per_copy.shape[1]
    cells = cells.copy()
    keys = np.sort(cells * K + bin_of_cell, axis=1)  # (L, P) same expert in the same bin -> same key
    for layer in np.nonzero((keys[:, 1:] == keys[:, :-1]).any(1))[0]:
        row = cells[layer]
        hosts = np.zeros((K, E), dtype=np.int64)  # (K, E) copies of each expert in each bin
        np.add.at(hosts, (bin_of_cell, row), 1)
        can = np.ones(P, dtype=bool) if movable is None else movable[layer]
        for j in np.nonzero((hosts[bin_of_cell, row] >= 2) & can)[0].tolist():
            e, g = int(row[j]), int(bin_of_cell[j])
            if hosts[g, e] < 2:
                continue
            # Partner cells elsewhere whose expert g lacks, in a bin that lacks e.
            ok = can & (bin_of_cell != g) & (hosts[g, row] == 0) & (hosts[bin_of_cell, e] == 0)
            if not ok.any():
                if strict:
                    raise PlacementError(f"layer {layer}: cannot avoid two copies of expert {e} on one GPU")
                continue
            gap = np.where(ok, np.abs(per_copy[layer, row] - per_copy[layer, e]), np.inf)
            i = int(gap.argmin())
            e2, g2 = int(row[i]), int(bin_of_cell[i])
            row[j], row[i] = e2, e
            hosts[g, e] -= 1
            hosts[g, e2] += 1
            hosts[g2, e2] -= 1
            hosts[g2, e] += 1
    return cells


# ----------------------------------------------------------------------------------------------
# Baseline and measurements


def round_robin_plan(
    shape: MoEShape, topology: Topology, redundant: int | None = None, max_experts_per_gpu: int = 1
) -> Plan:
    """Load-blind baseline: physical expert q (cells taken slot-major, rank-minor) hosts logical
    expert (q + q // E) % E, the same in every layer; copies go to the lowest ids."""
    E, L = shape.n_routed_experts, shape.moe_layers
    ranks, caps = select_ranks(shape, topology, redundant, max_experts_per_gpu)
    G, width = len(ranks), int(caps.max())
    rank, slot = np.nonzero(np.arange(width)[None, :] < caps[:, None])  # (P,) cells, rank-major
    order = np.lexsort((rank, slot))  # slot-major: q walks across ranks first
    q = np.arange(order.size)
    layer_map = np.full((G, width), -1, dtype=np.int32)  # (G, width)
    layer_map[rank[order], slot[order]] = (q + q // E) % E
    return Plan(ranks=ranks, expert_map=np.broadcast_to(layer_map, (L, G, width)).copy(), shape=shape)


def plan_metrics(p: Plan, w: np.ndarray) -> dict[str, Any]:
    """Planner-side estimates (load split evenly over copies), averaged over layers."""
    L, G, _ = p.expert_map.shape
    E = w.shape[1]
    counts = p.replica_counts(E)
    per_copy = w / np.maximum(counts, 1)  # (L, E)
    em = p.expert_map
    cell_load = np.where(em >= 0, per_copy[np.arange(L)[:, None, None], np.maximum(em, 0)], 0.0)  # (L, G, m)
    rank_load = cell_load.sum(2)  # (L, G)
    node = p.node_of_rank()
    N = int(node.max()) + 1
    node_load = rank_load @ (node[:, None] == np.arange(N))  # (L, N)
    gpu_ratio = rank_load.max(1) / rank_load.mean(1)
    node_ratio = node_load.max(1) / node_load.mean(1)
    n_group = p.shape.n_group if p.shape else 1
    # Nodes that hold some expert of a group, averaged over groups and layers: alignment.
    gsize = E // n_group
    held = np.zeros((L, n_group, N), dtype=bool)
    li, ri, _ = np.nonzero(em >= 0)
    held[li, em[em >= 0] // gsize, node[ri]] = True
    return {
        "layers": int(L),
        "ranks": int(G),
        "nodes": int(N),
        "experts_per_gpu": int((em >= 0).sum(2).max()),
        "gpu_load_max_mean": round(float(gpu_ratio.mean()), _ROUND),
        "gpu_load_max_mean_worst_layer": round(float(gpu_ratio.max()), _ROUND),
        "node_load_max_mean": round(float(node_ratio.mean()), _ROUND),
        "nodes_per_group": round(float(held.sum(2).mean()), _ROUND),
    }


def moved_experts(previous: Plan, new: Plan, per_layer: bool = False) -> Any:
    """Experts that must be loaded onto a GPU: hosted by a (node, gpu) in ``new`` but not by the
    same (node, gpu) in ``previous`` (all of a new GPU's experts count). Int, or (L,) if per_layer."""
    if previous.num_layers != new.num_layers:
        raise PlacementError(f"plans have {previous.num_layers} and {new.num_layers} layers")
    where = {(r.node, r.gpu): i for i, r in enumerate(previous.ranks)}
    L, G, m = new.expert_map.shape
    old = np.full((L, G, previous.expert_map.shape[2]), -1, dtype=np.int32)
    for k, r in enumerate(new.ranks):
        i = where.get((r.node, r.gpu))
        if i is not None:
            old[:, k, :] = previous.expert_map[:, i, :]
    present = (new.expert_map[..., :, None] == old[..., None, :]).any(-1)  # (L, G, m)
    moved = ((new.expert_map >= 0) & ~present).sum((1, 2))
    return moved if per_layer else int(moved.sum())


@dataclass(frozen=True)
class Evaluation:
    """Traffic and load of a plan on a routing trace, under one fixed replica-choice rule:
    tokens sit on ranks round-robin (token t on rank t mod G, as with data-parallel attention on
    every rank); a (token, expert) pair uses the expert's copies on the token's own node if there
    are any (split evenly among them), else is split evenly over all the expert's copies."""

    gpu_load_max_mean: float
    """Tokens per GPU, busiest / mean, averaged over layers."""
    node_ingress_max_mean: float
    """Tokens arriving at a node from other nodes (a token counted once per node it reaches, as
    dispatch sends it once per node), busiest / mean, averaged over layers."""
    node_ingress_mean: float
    """Those tokens per node per layer, mean."""
    cross_node_fraction: float
    """(token, expert) pairs served on another node than the token's."""
    distinct_nodes_per_token: float
    """Nodes a token's experts are served on (its own included when used), per layer, mean."""
    per_layer: dict[str, np.ndarray] = field(default_factory=dict, compare=False)


def local_first_load(
    cells: np.ndarray, node_of_rank: np.ndarray, pairs: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Load of one layer under the replica-choice rule the runtime uses: a (token, expert) pair goes
    to the expert's copies on the token's own node if there are any (split evenly among them), else
    is split evenly over all of its copies.

    cells (G, m) expert ids per rank (-1: empty), node_of_rank (G,), pairs (E, N) pairs per expert by
    source node -> (rank load (G,), copies per expert and node (E, N), pairs from nodes without a
    copy (E,)).
    """
    G = cells.shape[0]
    E, N = pairs.shape
    copy_rank, copy_slot = np.nonzero(cells >= 0)  # (copies,)
    copy_expert = cells[copy_rank, copy_slot]
    copy_node = node_of_rank[copy_rank]
    copies = np.zeros((E, N))  # copies of each expert on each node
    np.add.at(copies, (copy_expert, copy_node), 1)
    total = copies.sum(1)  # (E,)
    local = copies > 0
    remote = (pairs * ~local).sum(1)  # (E,)
    # One copy of e on node n: its node's own pairs over the local copies, plus an even share of
    # the pairs from nodes without a copy.
    copy_load = np.where(local, pairs / np.maximum(copies, 1), 0.0) + (remote / np.maximum(total, 1))[:, None]
    rank_load = np.zeros(G)
    np.add.at(rank_load, copy_rank, copy_load[copy_expert, copy_node])
    return rank_load, copies, remote


def _evaluate_layer(
    cells: np.ndarray, top: np.ndarray, src: np.ndarray, node_of_rank: np.ndarray, E: int, token_chunk: int
) -> tuple[float, float, float, float, float]:
    """One layer of ``evaluate``: ``cells`` (G, m) its expert map, ``top`` (T, k) its routed ids,
    ``src`` (T,) each token's node. Returns GPU load busiest/mean, node ingress busiest/mean and
    mean, cross-node share, and distinct nodes per token."""
    T, k = top.shape
    N = int(node_of_rank.max()) + 1
    pairs = (
        np.bincount((src[:, None] * E + top).ravel(), minlength=N * E).reshape(N, E).T
    )  # (E, N) by source node
    rank_load, copies, remote_pairs = local_first_load(cells, node_of_rank, pairs)
    total = copies.sum(1)  # (E,)
    local = copies > 0  # (E, N): expert e has a copy on node n
    # Per token and node: probability the token reaches the node = 1 - prod over its remote
    # experts of (1 - share of that expert's copies on the node). Local experts stay home.
    with np.errstate(divide="ignore"):
        log_stay = np.log(np.clip(1.0 - copies / np.maximum(total, 1)[:, None], 0.0, 1.0))  # (E, N)
    ingress = np.zeros(N)  # (N,) tokens arriving at each node
    reached = 0.0  # nodes reached, summed over tokens
    for t0 in range(0, T, token_chunk):
        tk = top[t0 : t0 + token_chunk]  # (t, k)
        s = src[t0 : t0 + token_chunk]
        is_local = local[tk, s[:, None]]  # (t, k)
        lg = np.where(is_local[..., None], 0.0, log_stay[tk])  # (t, k, N)
        reach = 1.0 - np.exp(lg.sum(1))  # (t, N); 0 on the token's own node (no copy there)
        ingress += reach.sum(0)
        reached += reach.sum() + is_local.any(1).sum()
    return (
        rank_load.max() / rank_load.mean(),
        ingress.max() / ingress.mean() if ingress.mean() > 0 else 1.0,
        ingress.mean(),
        remote_pairs.sum() / (T * k),
        reached / T,
    )


def evaluate(p: Plan, topk_ids: Any, *, token_chunk: int = 4096) -> Evaluation:
    """Measure ``p`` on a trace ``topk_ids`` (L, tokens, k) (or an object with ``topk_ids``)."""
    ids = np.asarray(getattr(topk_ids, "topk_ids", topk_ids))
    L, T, k = ids.shape
    if L != p.num_layers:
        raise PlacementError(f"trace has {L} layers, the plan {p.num_layers}")
    em = p.expert_map
    G = p.num_ranks
    E = max(int(em.max()) + 1, int(ids.max()) + 1, p.shape.n_routed_experts if p.shape else 0)
    node_of_rank = p.node_of_rank()
    src = node_of_rank[np.arange(T) % G]  # (T,) node of each token
    per_layer = np.array(
        [_evaluate_layer(em[layer], ids[layer], src, node_of_rank, E, token_chunk) for layer in range(L)]
    ).reshape(L, 5)  # (L, 5) columns as _evaluate_layer returns them
    gpu_ratio, ingress_ratio, ingress_mean, cross_share, nodes_per_token = per_layer.T.copy()
    return Evaluation(
        gpu_load_max_mean=float(gpu_ratio.mean()),
        node_ingress_max_mean=float(ingress_ratio.mean()),
        node_ingress_mean=float(ingress_mean.mean()),
        cross_node_fraction=float(cross_share.mean()),
        distinct_nodes_per_token=float(nodes_per_token.mean()),
        per_layer={
            "gpu_load_max_mean": gpu_ratio,
            "node_ingress_max_mean": ingress_ratio,
            "cross_node_fraction": cross_share,
        },
    )
