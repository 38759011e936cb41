"""The local control plane schedules GPU pods like a real cluster (real scheduler, KWOK nodes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import REPO, wait_for

pytestmark = pytest.mark.cluster


def gpu_pod(name: str, node: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]}}},
            "containers": [{"name": "rank", "image": "example.invalid/worker:0",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }


def test_32_gpu_pods_land_on_their_nodes_and_the_33rd_stays_pending(core, namespace, gpu_pool):
    pool, nodes = gpu_pool(nodes=4, gpus=8, racks=2)
    wanted = {f"rank-{i}": nodes[i // 8] for i in range(32)}
    for name, node in wanted.items():
        core.create_namespaced_pod(namespace, gpu_pod(name, node))

    def all_running():
        pods = core.list_namespaced_pod(namespace).items
        return len(pods) == 32 and all(p.status.phase == "Running" for p in pods) and pods

    pods = wait_for(all_running, 120, "32 pods Running")
    assert {p.metadata.name: p.spec.node_name for p in pods} == wanted

    core.create_namespaced_pod(namespace, gpu_pod("rank-32", nodes[0]))

    def unschedulable():
        p = core.read_namespaced_pod("rank-32", namespace)
        conds = [c for c in (p.status.conditions or []) if c.type == "PodScheduled"]
        return conds and conds[0].status == "False" and conds[0]

    cond = wait_for(unschedulable, 60, "PodScheduled=False on the 33rd pod")
    assert cond.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond.message
    p = core.read_namespaced_pod("rank-32", namespace)
    assert p.status.phase == "Pending" and not p.spec.node_name


def test_nodes_carry_topology_labels_and_gpu_capacity(core, gpu_pool):
    pool, nodes = gpu_pool(nodes=6, gpus=4, racks=3, zones=1, nodes_per_nvlink_domain=2)
    got = [core.read_node(n) for n in nodes]
    assert [n.status.allocatable["nvidia.com/gpu"] for n in got] == ["4"] * 6
    racks = [n.metadata.labels["moe.dev/rack"] for n in got]
    assert racks == ["rack-0", "rack-0", "rack-1", "rack-1", "rack-2", "rack-2"]
    domains = [n.metadata.labels["moe.dev/nvlink-domain"] for n in got]
    assert domains[0] == domains[1] != domains[2] == domains[3]


def test_cluster_cli_up_is_idempotent_and_env_points_at_it(kubeconfig):
    import os

    if os.environ.get("KUBECONFIG"):
        pytest.skip("using an external cluster")
    out = subprocess.run([sys.executable, "-m", "moe_operator.cli", "cluster", "up"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "already running" in out.stderr
    assert out.stdout.strip() == f"export KUBECONFIG={kubeconfig}"
    env = subprocess.run([sys.executable, "-m", "moe_operator.cli", "cluster", "env"], capture_output=True,
                         text=True, cwd=REPO, check=True)
    assert env.stdout.strip() == f"export KUBECONFIG={kubeconfig}"
