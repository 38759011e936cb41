"""Expert placement: the planner vs our EPLB re-implementation vs round-robin, on one table.

    PYTHONPATH=operator python bench/placement.py                    # full size (a few minutes)
    PYTHONPATH=operator python bench/placement.py --layers 8 --tokens 2048 --configs ep288

Per configuration (DeepSeek-V3 shape: 256 routed experts, 8 groups, top-4 groups, top-8):
- one trace A of synthetic gate decisions (``moe_operator.placement.traces``), and a trace B after a load
  drift (expert popularity moved by N(0, (0.3 * drift)^2) in logit space, fresh tokens);
- each method plans on A's per-expert token counts and is measured on A;
- "moved, drift": experts loaded onto a GPU when re-planning on B (the planner gets the A plan as
  ``previous``; EPLB and round-robin have no such input and re-plan from scratch);
- "moved, node loss": the same after the middle node disappears (redundancy shrinks by its slots).

Replica-choice rule of the evaluation (``placement.evaluate``): token t sits on rank t mod G
(data-parallel attention on every rank); a (token, expert) pair uses the expert's copies on the
token's own node if there are any, split evenly among them, otherwise it is split evenly over all
the expert's copies. Loads and traffic are the exact expectations under that rule.

Columns: busiest/mean tokens per GPU; busiest/mean tokens arriving at a node from other nodes
(a token counted once per node it reaches); share of (token, expert) pairs served off the token's
node; nodes a token's experts are served on; moves; plan time (load array in, plan out; best of
``--repeat``) and its ratio to EPLB's. Ratios "vs EPLB" are method / EPLB.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_operator.placement import (
    MoEShape,
    Plan,
    evaluate,
    expert_load,
    moved_experts,
    optimal_counts,
    plan,
    round_robin_plan,
    validate_plan,
)
from moe_operator.placement.eplb import eplb_plan, is_hierarchical
from moe_operator.placement.traces import drift_popularity, expert_popularity, generate_trace
from moe_operator.topology import Topology


@dataclass(frozen=True)
class Config:
    name: str
    nodes: int
    gpus_per_node: int
    redundant: int
    experts_per_gpu: int


CONFIGS = {
    # EP64 and EP128 hold several experts per GPU (256 experts > GPUs); EPLB needs equal counts.
    "ep64": Config("EP64", 8, 8, 64, 5),
    "ep128": Config("EP128", 16, 8, 128, 3),
    "ep288": Config("EP288", 36, 8, 32, 1),
    "ep1024": Config("EP1024", 128, 8, 768, 1),
}


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    out, best = None, float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run_config(cfg: Config, shape: MoEShape, args: argparse.Namespace) -> list[dict[str, Any]]:
    E = shape.n_routed_experts
    topo = Topology.synthetic(cfg.nodes, cfg.gpus_per_node)
    lost = topo.nodes[cfg.nodes // 2].name
    topo_lost = topo.without_nodes([lost], "lost")
    m = cfg.experts_per_gpu
    r_lost = (cfg.nodes - 1) * cfg.gpus_per_node * m - E  # same experts per GPU on fewer GPUs

    # Enough tokens that every rank holds a few (data-parallel attention): with fewer, the local
    # part of the replica-choice rule is sampling noise at EP1024.
    tokens = max(args.tokens, args.tokens_per_rank * topo.num_slots)
    pop_a = expert_popularity(shape.moe_layers, E, skew=args.skew, seed=args.seed)
    pop_b = drift_popularity(pop_a, args.drift, seed=args.seed + 1)
    trace_a = generate_trace(shape, tokens, coactivation=args.coactivation, popularity=pop_a, seed=args.seed)
    trace_b = generate_trace(
        shape, tokens, coactivation=args.coactivation, popularity=pop_b, seed=args.seed + 2
    )
    w_a, w_b = expert_load(shape, trace_a), expert_load(shape, trace_b)

    def ours(w: np.ndarray, topology: Topology, redundant: int, previous: Plan | None = None) -> Plan:
        return plan(shape, topology, w, previous=previous, redundant=redundant, max_experts_per_gpu=m)

    def theirs(w: np.ndarray, topology: Topology, redundant: int, previous: Plan | None = None) -> Plan:
        return eplb_plan(shape, topology, w, redundant, m)

    def rr(w: np.ndarray, topology: Topology, redundant: int, previous: Plan | None = None) -> Plan:
        return round_robin_plan(shape, topology, redundant, m)

    methods = {"planner": ours, "EPLB": theirs, "round-robin": rr}
    rows = []
    for name, fn in methods.items():
        base, secs = best_time(lambda fn=fn: fn(w_a, topo, cfg.redundant), args.repeat)
        drifted = fn(w_b, topo, cfg.redundant, base)
        after_loss = fn(w_a, topo_lost, r_lost, base)
        for p in (base, drifted, after_loss):
            validate_plan(p, shape, m, allow_duplicates=name == "EPLB")  # EPLB may pack a copy twice on a GPU
        ev = evaluate(base, trace_a)
        ev_drift = evaluate(drifted, trace_b)
        rows.append(
            {
                "config": cfg.name,
                "method": name,
                "policy": ("hier" if is_hierarchical(shape.n_group, cfg.nodes) else "global")
                if name == "EPLB"
                else "",
                "gpu": ev.gpu_load_max_mean,
                "ingress": ev.node_ingress_max_mean,
                "ingress_mean": ev.node_ingress_mean,
                "cross": ev.cross_node_fraction,
                "distinct": ev.distinct_nodes_per_token,
                "moved_drift": moved_experts(base, drifted),
                "gpu_drift": ev_drift.gpu_load_max_mean,
                "ingress_drift": ev_drift.node_ingress_max_mean,
                "tokens": tokens,
                "moved_loss": moved_experts(base, after_loss),
                "lost_cells": shape.moe_layers * cfg.gpus_per_node * m,
                "secs": secs,
            }
        )
    eplb_row = next(r for r in rows if r["method"] == "EPLB")
    if m == 1:
        eplb_row["bounds"] = bounds(w_a, w_b, topo.num_slots if cfg.redundant is None else E + cfg.redundant, cfg.nodes)
    for r in rows:
        for key in ("gpu", "ingress", "cross", "moved_drift", "gpu_drift", "ingress_drift", "secs"):
            r[key + "_vs"] = r[key] / eplb_row[key] if eplb_row[key] else float("nan")
    return rows


def bounds(w_a: np.ndarray, w_b: np.ndarray, P: int, N: int, budget: float = 0.01) -> dict[str, float]:
    """What any one-expert-per-GPU plan can reach while its busiest GPU stays within ``budget`` of
    EPLB's (the optimum for these counts), under the evaluation's replica-choice rule.

    - Cross-node share: tokens start uniformly over the N nodes and use a local copy if any, so
      the share is 1 - sum_e p_e k_e / N, k_e <= min(c_e, N) nodes holding e. The busiest copy
      within budget needs c_e >= ceil(w_e / T), T = (1 + budget) x optimum; the best spends the
      copies left over, one at a time, on the experts with the largest p_e (up to N each).
    - Moves after the drift from A's optimal counts: every expert whose count must rise to meet
      T on B is at least one weight transfer.
    """
    L, E = w_a.shape
    opt_a = optimal_counts(w_a, P)
    t_a = (w_a / opt_a).max(1, keepdims=True) * (1.0 + budget)
    need = np.minimum(np.maximum(np.ceil(w_a / t_a - 1e-9), 1), N)
    p = w_a / w_a.sum(1, keepdims=True)
    local = []
    for layer in range(L):  # small: E experts, slack copies to the hottest
        k = need[layer].copy()
        slack = P - int(k.sum())
        for e in np.argsort(-p[layer], kind="stable"):
            if slack <= 0:
                break
            add = min(slack, N - int(k[e]))
            k[e] += add
            slack -= add
        local.append(float((p[layer] * k).sum()) / N)
    t_b = (w_b / optimal_counts(w_b, P)).max(1, keepdims=True) * (1.0 + budget)
    need_b = np.maximum(np.ceil(w_b / t_b - 1e-9), 1)
    return {
        "cross_min": 1.0 - float(np.mean(local)),
        "moves_min": float(np.maximum(need_b - opt_a, 0).sum()),
    }


COLUMNS = (
    # header, width, formatter of a row
    ("config", 10, lambda r, L: f"{r['config']} {r['tokens'] // 1024}k"),
    ("method", 15, lambda r, L: r["method"] + (f" ({r['policy']})" if r["policy"] else "")),
    ("GPU max/mean", 15, lambda r, L: f"{r['gpu']:.3f} ({r['gpu_vs']:.3f}x)"),
    ("node ingress max/mean", 21, lambda r, L: f"{r['ingress']:.3f} ({r['ingress_vs']:.3f}x)"),
    ("tok/node", 8, lambda r, L: f"{r['ingress_mean']:.0f}"),
    ("cross-node", 15, lambda r, L: f"{r['cross']:.3f} ({r['cross_vs']:.3f}x)"),
    ("nodes/tok", 9, lambda r, L: f"{r['distinct']:.2f}"),
    ("moved: drift /layer", 20, lambda r, L: f"{r['moved_drift'] / L:.1f} ({r['moved_drift_vs']:.2f}x)"),
    (
        "after drift: GPU, ingress",
        26,
        lambda r, L: f"{r['gpu_drift']:.3f} ({r['gpu_drift_vs']:.3f}x), {r['ingress_drift']:.2f}",
    ),
    ("moved: node loss", 16, lambda r, L: f"{r['moved_loss']} / {r['lost_cells']}"),
    ("plan ms", 8, lambda r, L: f"{r['secs'] * 1e3:.1f}"),
    ("vs EPLB", 8, lambda r, L: f"{r['secs_vs']:.1f}x"),
)


def print_table(rows: list[dict[str, Any]], shape: MoEShape, args: argparse.Namespace) -> None:
    print(
        f"# DeepSeek-V3 shape: {shape.moe_layers} MoE layers x {shape.n_routed_experts} experts "
        f"({shape.n_group} groups, top-{shape.topk_group} groups, top-{shape.num_experts_per_tok}); "
        f"skew {args.skew}, co-activation {args.coactivation}, drift {args.drift}, seed {args.seed}; "
        f"config column: EP size and tokens per layer"
    )
    print(
        "# replica choice: token t on rank t mod G; a (token, expert) pair uses the expert's copies on the "
        "token's node if any (split evenly), else is split evenly over all its copies"
    )
    print(
        "# (x): method / EPLB. moved: experts loaded onto a GPU, per layer for the drift and in total "
        "for the loss of the middle node (out of the cells that node held)"
    )
    head = "  ".join(f"{h:>{w}}" if i > 1 else f"{h:<{w}}" for i, (h, w, _) in enumerate(COLUMNS))
    print(head)
    print("-" * len(head))
    L = shape.moe_layers
    bound_lines: list[str] = []
    for r in rows:
        cells = [f(r, L) for _, _, f in COLUMNS]
        print(
            "  ".join(
                f"{c:>{w}}" if i > 1 else f"{c:<{w}}"
                for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS, strict=True))
            )
        )
        if r.get("bounds"):
            b = r["bounds"]
            bound_lines.append(
                f"#   {r['config']}: cross-node >= {b['cross_min']:.3f} ({b['cross_min'] / r['cross']:.3f}x EPLB); "
                f"drift moves >= {b['moves_min'] / L:.1f} per layer ({b['moves_min'] / max(r['moved_drift'], 1):.2f}x EPLB)"
            )
        if r["method"] == "round-robin" and r is not rows[-1]:
            print()
    print_bounds(bound_lines)


def print_bounds(bound_lines: list[str]) -> None:
    if bound_lines:
        print()
        print(
            "# bounds for any plan with one expert per GPU whose busiest GPU is within 1% of EPLB's "
            "(see bounds()): cross-node share, and moves after the drift"
        )
        for line in bound_lines:
            print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--configs", default="ep64,ep128,ep288,ep1024", help="comma-separated: " + ",".join(CONFIGS)
    )
    ap.add_argument("--layers", type=int, default=58, help="MoE layers (58 for DeepSeek-V3)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per layer in each trace (at least)")
    ap.add_argument("--tokens-per-rank", type=int, default=16, help="... and at least this many per GPU")
    ap.add_argument("--skew", type=float, default=1.0)
    ap.add_argument("--coactivation", type=float, default=0.3)
    ap.add_argument("--drift", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="plan-time repeats (best is reported)")
    args = ap.parse_args(argv)
    shape = MoEShape(moe_layers=args.layers)
    rows: list[dict[str, Any]] = []
    for key in args.configs.split(","):
        if key not in CONFIGS:
            ap.error(f"unknown config {key!r}; choose from {', '.join(CONFIGS)}")
        t0 = time.perf_counter()
        rows += run_config(CONFIGS[key], shape, args)
        print(f"# {key}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print_table(rows, shape, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
