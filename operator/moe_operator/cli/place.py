"""``moe place``: run the expert-placement planner offline.

    moe place --nodes NODES.json --trace TRACE.npz [--model CONFIG.json] [--redundant R]
              [--previous PLAN.json] --out PLAN.json

- NODES.json: a NodeList, as ``kubectl get nodes -o json`` prints it.
- TRACE.npz: ``topk_ids`` int (moe_layers, tokens, experts_per_token), optional ``weights``.
- CONFIG.json: a Hugging Face DeepSeek-V3 ``config.json`` (default: DeepSeek-V3's values).
- PLAN.json: ``{"ranks": [...], "expert_map": [...], "metrics": {...}, "model": {...}}``.

Errors (unreadable inputs, impossible placements) print one line on stderr and exit 1.
``add_parser`` registers the subcommand on the ``moe`` console script; ``main`` runs it alone
(``python -m moe_operator.cli.place --nodes ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from moe_operator.placement import MoEShape, PlacementError, Plan, plan
from moe_operator.placement.traces import Trace, TraceError
from moe_operator.topology import DEFAULT_GPU_RESOURCE, Toleration, Topology, TopologyError, TopologyLabels

PROG = "moe place"
HELP = "plan which experts each GPU hosts, from a node list and a routing trace"


class CliError(Exception):
    """An input problem worth one line on stderr."""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    labels = TopologyLabels()
    p.add_argument(
        "--nodes", required=True, metavar="NODES.json", help="NodeList (kubectl get nodes -o json)"
    )
    p.add_argument(
        "--trace", required=True, metavar="TRACE.npz", help="routing trace with topk_ids (layers, tokens, k)"
    )
    p.add_argument("--model", metavar="CONFIG.json", help="Hugging Face config.json (default: DeepSeek-V3)")
    p.add_argument(
        "--redundant",
        type=int,
        metavar="R",
        help="redundant experts per layer (default: fill every free GPU)",
    )
    p.add_argument("--previous", metavar="PLAN.json", help="plan in force: move as few experts as possible")
    p.add_argument("--out", required=True, metavar="PLAN.json", help="where to write the plan")
    p.add_argument(
        "--max-experts-per-gpu",
        type=int,
        default=1,
        metavar="M",
        help="allow packing up to M experts per GPU when there are fewer GPUs than experts (default 1)",
    )
    p.add_argument("--pods", metavar="PODS.json", help="PodList whose GPU requests are already taken")
    p.add_argument(
        "--tolerate",
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        help="tolerate a node taint (repeatable; '*' tolerates every taint)",
    )
    p.add_argument("--gpu-resource", default=DEFAULT_GPU_RESOURCE, help=f"default {DEFAULT_GPU_RESOURCE}")
    p.add_argument(
        "--domain-label",
        default=labels.nvlink_domain,
        help=f"NVLink domain label (default {labels.nvlink_domain})",
    )
    p.add_argument("--rack-label", default=labels.rack, help=f"default {labels.rack}")
    p.add_argument("--zone-label", default=labels.zone, help=f"default {labels.zone}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``place`` on an ``argparse`` subparsers object; the handler is ``args.func``."""
    p = subparsers.add_parser("place", help=HELP, description=HELP)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CliError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{what} {path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} {path}: not valid JSON ({exc})") from None


def _write_atomic(path: str, text: str) -> None:
    """Write next to the target and rename, so a failed run never leaves half a plan."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    """Run ``moe place`` with parsed arguments; 0 on success, 1 with one line on stderr otherwise."""
    try:
        shape = (
            MoEShape.from_hf_config(_read_json(args.model, "model config"))
            if args.model
            else MoEShape.deepseek_v3()
        )
        topology = Topology.from_nodelist(
            _read_json(args.nodes, "node list"),
            labels=TopologyLabels(
                nvlink_domain=args.domain_label, rack=args.rack_label, zone=args.zone_label
            ),
            gpu_resource=args.gpu_resource,
            tolerations=[Toleration.parse(t) for t in args.tolerate],
            pods=_read_json(args.pods, "pod list") if args.pods else None,
        )
        if not Path(args.trace).is_file():
            raise CliError(f"trace {args.trace}: no such file")
        trace = Trace.load(args.trace)
        previous = None
        if args.previous:
            try:
                previous = Plan.from_json(_read_json(args.previous, "previous plan"))
            except PlacementError as exc:
                raise CliError(f"previous plan {args.previous}: {exc}") from None
        result = plan(
            shape,
            topology,
            trace,
            previous=previous,
            redundant=args.redundant,
            max_experts_per_gpu=args.max_experts_per_gpu,
        )
        _write_atomic(args.out, result.dumps())
    except (CliError, PlacementError, TopologyError, TraceError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    m = result.metrics
    moved = f", moved {m['moved_experts']} experts" if "moved_experts" in m else ""
    print(
        f"wrote {args.out}: {m['ranks']} ranks on {m['nodes']} nodes, {m['layers']} layers, "
        f"{m['redundant']} redundant; busiest GPU {m['gpu_load_max_mean']:.3f}x mean, "
        f"busiest node {m['node_load_max_mean']:.3f}x mean{moved}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=HELP)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
