"""The placement data model: the MoE shape the planner reads and the plan it writes (PLAN.json).

Pure: numpy and json, no Kubernetes. ``planner`` makes plans; the operator publishes ``Plan.to_json``
as PLAN.json and the worker reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_common import plan_json
from moe_common.routing import routing_errors


class PlacementError(ValueError):
    """The requested placement is impossible or its inputs are inconsistent; the message says why."""


# ----------------------------------------------------------------------------------------------
# Model shape


@dataclass(frozen=True)
class MoEShape:
    """The parts of a DeepSeek-V3-class config that placement depends on."""

    moe_layers: int = 58
    """MoE layers (DeepSeek-V3: 61 hidden layers minus 3 dense)."""
    n_routed_experts: int = 256
    """Routed experts per MoE layer (the shared expert is not placed: every rank has it)."""
    n_group: int = 8
    """Expert groups; group g is experts [g*E/n_group, (g+1)*E/n_group)."""
    topk_group: int = 4
    """Groups a token may route to."""
    num_experts_per_tok: int = 8
    """Routed experts per token."""

    def __post_init__(self) -> None:
        for name in ("moe_layers", "n_routed_experts", "n_group", "topk_group", "num_experts_per_tok"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise PlacementError(f"model {name} must be a positive integer, got {v!r}")
        routing = routing_errors(int(self.n_routed_experts), int(self.n_group), int(self.topk_group),
                                 int(self.num_experts_per_tok))
        if routing:
            raise PlacementError(f"model {routing[0][1]}")

    @property
    def group_size(self) -> int:
        return self.n_routed_experts // self.n_group

    @classmethod
    def deepseek_v3(cls) -> MoEShape:
        return cls()

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> MoEShape:
        """From a Hugging Face ``config.json`` dict; missing keys take DeepSeek-V3's values.

        MoE layers are the layers from ``first_k_dense_replace`` on (``moe_layer_freq`` 1, the
        only value the worker runs), i.e. 61 - 3 = 58 for V3.
        """
        if not isinstance(d, Mapping):
            raise PlacementError("model config must be a JSON object")

        def get(key: str, default: int) -> int:
            v = d.get(key, default)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, int):
                raise PlacementError(f"model config {key} must be an integer, got {v!r}")
            return v

        layers = get("num_hidden_layers", 61)
        first_dense = get("first_k_dense_replace", 3)
        if get("moe_layer_freq", 1) != 1 or first_dense < 0:
            raise PlacementError("model config: moe_layer_freq must be 1 (every layer after first_k_dense_replace "
                                 "is MoE, as the worker requires) and first_k_dense_replace >= 0")
        moe_layers = layers - first_dense
        if moe_layers < 1:
            raise PlacementError(
                f"model config has no MoE layers (num_hidden_layers={layers}, first_k_dense_replace={first_dense})"
            )
        return cls(
            moe_layers=moe_layers,
            n_routed_experts=get("n_routed_experts", 256),
            n_group=get("n_group", 8),
            topk_group=get("topk_group", 4),
            num_experts_per_tok=get("num_experts_per_tok", 8),
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "moe_layers": int(self.moe_layers),
            "n_routed_experts": int(self.n_routed_experts),
            "n_group": int(self.n_group),
            "topk_group": int(self.topk_group),
            "num_experts_per_tok": int(self.num_experts_per_tok),
        }


# ----------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class RankSlot:
    """Rank ``rank`` of the EP group runs on GPU slot ``gpu`` (0..free GPUs-1) of node ``node``."""

    rank: int
    node: str
    gpu: int


@dataclass(frozen=True, eq=False)
class Plan:
    """Ranks and, for every MoE layer, the logical experts each rank hosts."""

    ranks: tuple[RankSlot, ...]
    expert_map: np.ndarray
    """(moe_layers, ranks, max experts per rank) int32; -1 pads ranks that hold fewer."""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    shape: MoEShape | None = None

    def __post_init__(self) -> None:
        em = np.asarray(self.expert_map)
        if em.ndim == 2:  # (layers, ranks): one expert per rank
            em = em[:, :, None]
        if em.ndim != 3 or em.shape[1] != len(self.ranks):
            raise PlacementError(
                f"expert_map has shape {em.shape}, expected (layers, {len(self.ranks)}, experts per rank)"
            )
        object.__setattr__(self, "expert_map", em.astype(np.int32, copy=False))
        object.__setattr__(self, "ranks", tuple(self.ranks))

    @property
    def num_layers(self) -> int:
        return int(self.expert_map.shape[0])

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names in rank order, each once."""
        return tuple(dict.fromkeys(r.node for r in self.ranks))

    def node_of_rank(self) -> np.ndarray:
        """(ranks,) int: index into ``nodes`` of each rank's node."""
        index = {n: i for i, n in enumerate(self.nodes)}
        return np.array([index[r.node] for r in self.ranks], dtype=np.int64)

    def experts_on(self, layer: int, rank: int) -> list[int]:
        return [int(e) for e in self.expert_map[layer, rank] if e >= 0]

    def replica_counts(self, n_experts: int | None = None) -> np.ndarray:
        """(layers, experts) int64: copies of each logical expert."""
        E = n_experts or (self.shape.n_routed_experts if self.shape else int(self.expert_map.max()) + 1)
        return counts_of(self.expert_map.reshape(self.num_layers, -1), E)

    def to_json(self) -> dict[str, Any]:
        """The PLAN.json document: ranks, expert_map (layer -> rank -> [logical ids]), metrics, model."""
        doc: dict[str, Any] = {
            "ranks": [{"rank": r.rank, "node": r.node, "gpu": r.gpu} for r in self.ranks],
            "expert_map": [
                [[int(e) for e in cell if e >= 0] for cell in layer] for layer in self.expert_map.tolist()
            ],
            "metrics": dict(self.metrics),
        }
        if self.shape is not None:
            doc["model"] = self.shape.to_dict()
        return doc

    def dumps(self) -> str:
        """PLAN.json text (`moe_common.plan_json.dumps`: one line per rank and per layer)."""
        return plan_json.dumps(self.to_json())

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | str) -> Plan:
        """Read a PLAN.json document (a dict, or its text). Checks structure, not validity."""
        try:
            d = plan_json.loads(doc)
        except plan_json.PlanFormatError as e:
            raise PlacementError(str(e)) from None
        if not d.expert_map:
            raise PlacementError("plan expert_map must be a non-empty list of layers")
        width = max((len(cell) for layer in d.expert_map for cell in layer), default=1) or 1
        em = np.full((len(d.expert_map), len(d.ranks), width), -1, dtype=np.int32)
        for li, layer in enumerate(d.expert_map):
            for r, cell in enumerate(layer):
                em[li, r, : len(cell)] = cell
        shape = None
        if d.model is not None:
            try:
                shape = MoEShape(**{k: int(v) for k, v in d.model.items()})
            except TypeError:
                raise PlacementError(f"plan model has unknown keys: {sorted(d.model)}") from None
        ranks = tuple(RankSlot(r.rank, r.node, r.gpu) for r in d.ranks)
        return cls(ranks=ranks, expert_map=em, metrics=dict(d.metrics), shape=shape)


def validate_plan(
    p: Plan,
    shape: MoEShape | None = None,
    max_experts_per_gpu: int | None = None,
    *,
    allow_duplicates: bool = False,
) -> None:
    """Raise PlacementError unless every layer hosts every expert at least once, every rank hosts
    at least one expert, no rank hosts an expert twice (EPLB's packing can do that: pass
    ``allow_duplicates``), and (if given) at most ``max_experts_per_gpu`` per rank."""
    shape = shape or p.shape
    if shape is None:
        raise PlacementError("cannot validate a plan without the model shape")
    em = p.expert_map
    L, G, _ = em.shape
    E = shape.n_routed_experts
    if L != shape.moe_layers:
        raise PlacementError(f"plan has {L} layers, the model {shape.moe_layers} MoE layers")
    if em.max(initial=-1) >= E or (em < -1).any():
        raise PlacementError(f"plan has expert ids outside 0..{E - 1}")
    per_rank = (em >= 0).sum(-1)  # (L, G)
    if (per_rank == 0).any():
        layer, rank = map(int, np.argwhere(per_rank == 0)[0])
        raise PlacementError(f"layer {layer}: rank {rank} hosts no expert")
    if max_experts_per_gpu is not None and per_rank.max() > max_experts_per_gpu:
        raise PlacementError(f"a rank hosts {int(per_rank.max())} experts, more than {max_experts_per_gpu}")
    srt = np.sort(em, axis=-1)
    if not allow_duplicates and ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any():
        raise PlacementError("a rank hosts the same expert twice in one layer")
    counts = counts_of(em.reshape(L, -1), E)
    if (counts == 0).any():
        layer, e = map(int, np.argwhere(counts == 0)[0])
        raise PlacementError(f"layer {layer}: expert {e} is not hosted by any rank")




def tp_group_problem(p: Plan, attention_tp: int) -> str | None:
    """Why ``p`` cannot run attention tensor parallelism ``attention_tp``, or None when it can.

    TP group g is ranks [g * tp, (g + 1) * tp) (the worker's ``MOE_ATTENTION_TP``): its ranks
    exchange a reduce-scatter and an all-gather in every attention layer, so they must share a node
    (and its NVLink), and the ranks must come in whole groups."""
    tp = int(attention_tp)
    if tp < 1:
        return f"attention TP must be >= 1, got {tp}"
    if p.num_ranks % tp:
        return f"{p.num_ranks} ranks do not form whole attention TP groups of {tp}"
    for g in range(p.num_ranks // tp):
        nodes = list(dict.fromkeys(r.node for r in p.ranks[g * tp : (g + 1) * tp]))
        if len(nodes) > 1:
            return (f"attention TP group {g} (ranks {g * tp}-{(g + 1) * tp - 1}) spans nodes {', '.join(nodes)}; "
                    f"a TP group's ranks must share one node")
    return None


def counts_of(ids: np.ndarray, n: int) -> np.ndarray:
    """(rows, n) int64 occurrences of each id 0..n-1 per row of ``ids`` (rows, k); -1 ignored."""
    rows = ids.shape[0]
    ok = ids >= 0
    flat = (ids + (np.arange(rows, dtype=np.int64) * n)[:, None])[ok]
    return np.bincount(flat, minlength=rows * n).reshape(rows, n)
