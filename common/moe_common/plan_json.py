"""PLAN.json: the document the operator writes into each EP group's plan ConfigMap and every rank
reads. The one definition of its structure (`loads`, errors that say where) and of its text
(`dumps`); what makes a plan valid for a model or a group is checked on top, by the planner
(`moe_operator.placement`) and by the ranks (`moe_worker.expertmap`).

    {"ranks": [{"rank": 0, "node": "n0", "gpu": 0}, ...],      # rank r on GPU slot `gpu` of `node`
     "expert_map": [[[3, 7], [0], ...], ...],                    # MoE layer -> rank -> logical expert ids
     "metrics": {...}, "model": {...}, "generation": 4}          # optional
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class PlanFormatError(ValueError):
    """A document that is not PLAN.json; the message says where."""


@dataclass(frozen=True)
class PlanRank:
    rank: int
    node: str
    gpu: int


@dataclass(frozen=True)
class PlanDoc:
    ranks: tuple[PlanRank, ...]
    expert_map: tuple[tuple[tuple[int, ...], ...], ...]
    """[MoE layer][rank]: the logical expert ids as written (order and duplicates kept)."""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] | None = None
    generation: int | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def loads(doc: Mapping[str, Any] | str | bytes) -> PlanDoc:
    """Read a PLAN.json document (its text, or the parsed object); PlanFormatError unless it has
    the structure above: ranks numbered 0.. in order, at most one rank per (node, gpu), every
    layer listing every rank, expert ids integers."""
    if isinstance(doc, (str, bytes)):
        try:
            doc = json.loads(doc)
        except json.JSONDecodeError as e:
            raise PlanFormatError(f"plan is not valid JSON: {e}") from None
    if not isinstance(doc, Mapping) or "ranks" not in doc or "expert_map" not in doc:
        raise PlanFormatError("plan must be an object with 'ranks' and 'expert_map'")
    ranks = _ranks(doc["ranks"])
    layers = doc["expert_map"]
    if not isinstance(layers, list):
        raise PlanFormatError("plan expert_map must be a list of MoE layers")
    expert_map = tuple(_layer(li, layer, len(ranks)) for li, layer in enumerate(layers))
    generation = doc.get("generation")
    if generation is not None and not _is_int(generation):
        raise PlanFormatError(f"plan generation must be an integer, got {generation!r}")
    model = doc.get("model")
    if model is not None and not isinstance(model, Mapping):
        raise PlanFormatError(f"plan model must be an object, got {model!r}")
    metrics = doc.get("metrics") or {}
    if not isinstance(metrics, Mapping):
        raise PlanFormatError(f"plan metrics must be an object, got {metrics!r}")
    return PlanDoc(ranks, expert_map, dict(metrics), None if model is None else dict(model), generation)


def _ranks(items: Any) -> tuple[PlanRank, ...]:
    if not isinstance(items, list):
        raise PlanFormatError("plan ranks must be a list")
    ranks = []
    for i, r in enumerate(items):
        if not (isinstance(r, Mapping) and _is_int(r.get("rank")) and isinstance(r.get("node"), str)
                and _is_int(r.get("gpu")) and r["gpu"] >= 0):
            raise PlanFormatError(f"plan rank #{i} must have integer 'rank', string 'node' and integer 'gpu' >= 0, "
                                  f"got {r!r}")
        if r["rank"] != i:
            raise PlanFormatError(f"plan ranks must be numbered 0..G-1 in order; entry #{i} is rank {r['rank']}")
        ranks.append(PlanRank(r["rank"], r["node"], r["gpu"]))
    slots = [(r.node, r.gpu) for r in ranks]
    if len(set(slots)) != len(slots):
        twice = sorted({s for s in slots if slots.count(s) > 1})
        raise PlanFormatError(f"plan has two ranks on the same (node, gpu): {twice[:4]}")
    return tuple(ranks)


def _layer(li: int, layer: Any, world: int) -> tuple[tuple[int, ...], ...]:
    if not isinstance(layer, list) or len(layer) != world:
        raise PlanFormatError(f"plan expert_map layer {li} must list {world} ranks")
    cells = []
    for r, cell in enumerate(layer):
        if not isinstance(cell, list) or not all(_is_int(e) for e in cell):
            raise PlanFormatError(f"plan expert_map layer {li} rank {r}: expected a list of integer expert ids")
        cells.append(tuple(cell))
    return tuple(cells)


def dumps(doc: Mapping[str, Any]) -> str:
    """PLAN.json text of a document: one line per rank and per layer of the expert map, so diffs
    stay readable; `loads` reads it back."""

    def block(key: str, items: list[Any]) -> str:
        body = ",\n    ".join(json.dumps(it, separators=(", ", ": ")) for it in items)
        return f'  "{key}": [\n    {body}\n  ]'

    parts = [block("ranks", list(doc["ranks"])), block("expert_map", list(doc["expert_map"]))]
    parts.append('  "metrics": ' + json.dumps(dict(doc.get("metrics") or {}), sort_keys=True))
    if doc.get("model") is not None:
        parts.append('  "model": ' + json.dumps(doc["model"]))
    if doc.get("generation") is not None:
        parts.append('  "generation": ' + json.dumps(doc["generation"]))
    return "{\n" + ",\n".join(parts) + "\n}\n"
