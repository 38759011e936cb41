"""`moe`: the operator's command line (CRD generation, planning, the local cluster)."""

from __future__ import annotations

import argparse
import sys


def _crd(args: argparse.Namespace) -> int:
    from moe_operator.cli.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from moe_operator.localdev import devcluster

    try:
        if args.action == "up":
            c = devcluster.up()
            print(f"export KUBECONFIG={c.kubeconfig}")
        elif args.action == "down":
            devcluster.down()
        elif args.action == "env":
            c = devcluster.load()
            if not c or not c.healthy():
                print("moe cluster env: no running cluster; run `moe cluster up`", file=sys.stderr)
                return 1
            print(f"export KUBECONFIG={c.kubeconfig}")
        elif args.action == "add-nodes":
            c = devcluster.load()
            if not c or not c.healthy():
                print("moe cluster add-nodes: no running cluster; run `moe cluster up`", file=sys.stderr)
                return 1
            nodes = devcluster.gpu_nodes(
                args.nodes, gpus=args.gpus, racks=args.racks, zones=args.zones, prefix=args.prefix,
                nodes_per_nvlink_domain=args.nodes_per_nvlink_domain, pool=args.pool,
                nvlink_label=args.nvlink_label, rack_label=args.rack_label, zone_label=args.zone_label,
                gpu_resource=args.gpu_resource, local_runner=args.local_runner)
            devcluster.apply_nodes(nodes, c.kubeconfig)
            print(f"{len(nodes)} nodes x {args.gpus} {args.gpu_resource}: "
                  f"{nodes[0]['metadata']['name']} .. {nodes[-1]['metadata']['name']}")
    except (devcluster.ClusterError, ValueError) as e:
        print(f"moe cluster {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("crd", help="print the MoEDeployment CRD YAML")
    s.set_defaults(func=_crd)

    from moe_operator.localdev import devcluster

    s = sub.add_parser("cluster", help="the local control plane (etcd, apiserver, scheduler, controller-manager, KWOK)")
    s.add_argument("action", choices=["up", "down", "env", "add-nodes"])
    s.add_argument("--nodes", type=int, default=4, help="add-nodes: how many nodes")
    s.add_argument("--gpus", type=int, default=8, help="add-nodes: GPUs per node")
    s.add_argument("--racks", type=int, default=1, help="add-nodes: racks (consecutive nodes share one)")
    s.add_argument("--zones", type=int, default=1, help="add-nodes: zones (consecutive racks share one)")
    s.add_argument("--nodes-per-nvlink-domain", type=int, default=1,
                   help="add-nodes: nodes sharing one NVLink domain (1: each node is its own)")
    s.add_argument("--prefix", default="gpu-node", help="add-nodes: node name prefix")
    s.add_argument("--pool", default=None, help=f"add-nodes: value of the {devcluster.POOL_LABEL} label")
    s.add_argument("--nvlink-label", default=devcluster.NVLINK_LABEL)
    s.add_argument("--rack-label", default=devcluster.RACK_LABEL)
    s.add_argument("--zone-label", default=devcluster.ZONE_LABEL)
    s.add_argument("--gpu-resource", default="nvidia.com/gpu")
    s.add_argument("--local-runner", action="store_true",
                   help="add-nodes: run these nodes' pods as local processes (the local runner) instead of KWOK")
    s.set_defaults(func=_cluster)

    from moe_operator.cli import place, plan

    place.add_parser(sub)
    plan.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
