"""Node lists -> GPU slots: allocatable minus used, locality labels, cordons, taints, readiness."""

from __future__ import annotations

from typing import Any

import pytest

from moe_operator.topology import (
    Toleration,
    Topology,
    TopologyError,
    TopologyLabels,
    gpus_used_by_pods,
    natural_key,
    parse_quantity,
    pinned_node,
)


def node(
    name: str,
    gpus: Any = "8",
    *,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    unschedulable: bool = False,
    ready: str | None = None,
    resource: str = "nvidia.com/gpu",
) -> dict[str, Any]:
    n: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {},
        "status": {"allocatable": {"cpu": "64", "memory": "512Gi"}},
    }
    if gpus is not None:
        n["status"]["allocatable"][resource] = gpus
    if taints:
        n["spec"]["taints"] = taints
    if unschedulable:
        n["spec"]["unschedulable"] = True
    if ready is not None:
        n["status"]["conditions"] = [
            {"type": "MemoryPressure", "status": "False"},
            {"type": "Ready", "status": ready},
        ]
    return n


def nodelist(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": list(nodes)}


def pod(
    node_name: str | None, gpus: int, phase: str = "Running", init: int = 0, where: str = "limits"
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{"name": "c", "resources": {where: {"nvidia.com/gpu": str(gpus)}}}]
    }
    if init:
        spec["initContainers"] = [{"name": "i", "resources": {"limits": {"nvidia.com/gpu": str(init)}}}]
    if node_name:
        spec["nodeName"] = node_name
    return {"metadata": {"name": f"p-{node_name}-{gpus}"}, "spec": spec, "status": {"phase": phase}}


def test_slots_labels_and_topology_order() -> None:
    nl = nodelist(
        node(
            "gpu-10",
            labels={
                "moe.dev/nvlink-domain": "nvl-b",
                "moe.dev/rack": "r1",
                "topology.kubernetes.io/zone": "z1",
            },
        ),
        node(
            "gpu-2",
            "4",
            labels={
                "moe.dev/nvlink-domain": "nvl-a",
                "moe.dev/rack": "r1",
                "topology.kubernetes.io/zone": "z1",
            },
        ),
        node("gpu-9", labels={"topology.kubernetes.io/zone": "z0"}),
    )
    topo = Topology.from_nodelist(nl)
    # zone z0 first; then in z1 / r1 the NVLink domain decides: nvl-a before nvl-b.
    assert [n.name for n in topo.nodes] == ["gpu-9", "gpu-2", "gpu-10"]
    assert [n.gpus for n in topo.nodes] == [8, 4, 8]
    assert topo.num_slots == 20
    assert topo.node("gpu-9").domain == "gpu-9"  # no label: the node is its own domain
    assert topo.node("gpu-9").rack == ""
    assert topo.node("gpu-2").domain == "nvl-a" and topo.node("gpu-2").zone == "z1"
    slots = topo.slots
    assert len(slots) == 20
    assert [(s.node, s.gpu) for s in slots[:2]] == [("gpu-9", 0), ("gpu-9", 1)]
    assert (slots[8].node, slots[8].gpu, slots[8].domain) == ("gpu-2", 0, "nvl-a")
    assert topo.skipped == ()


def test_natural_order_of_names() -> None:
    names = ["node-10", "node-2", "node-1", "node-1b"]
    assert sorted(names, key=natural_key) == ["node-1", "node-1b", "node-2", "node-10"]
    topo = Topology.from_nodelist(nodelist(*(node(n) for n in names)))
    assert [n.name for n in topo.nodes] == ["node-1", "node-1b", "node-2", "node-10"]


def test_custom_label_keys_and_resource() -> None:
    nl = nodelist(
        node("a", "2", labels={"example.com/nvl": "dom", "example.com/rack": "r7"}, resource="amd.com/gpu")
    )
    labels = TopologyLabels(nvlink_domain="example.com/nvl", rack="example.com/rack", zone="example.com/zone")
    topo = Topology.from_nodelist(nl, labels=labels, gpu_resource="amd.com/gpu")
    assert (topo.nodes[0].domain, topo.nodes[0].rack, topo.nodes[0].gpus) == ("dom", "r7", 2)
    # The same node has no nvidia.com/gpu at all.
    assert Topology.from_nodelist(nl).skipped == (("a", "no allocatable nvidia.com/gpu"),)


def test_cordoned_tainted_and_not_ready_nodes_are_skipped() -> None:
    nl = nodelist(
        node("ok"),
        node("cordoned", unschedulable=True),
        node("tainted", taints=[{"key": "dedicated", "value": "infer", "effect": "NoSchedule"}]),
        node("evicting", taints=[{"key": "maintenance", "effect": "NoExecute"}]),
        node("prefer", taints=[{"key": "soft", "effect": "PreferNoSchedule"}]),
        node("notready", ready="False"),
        node("unknown", ready="Unknown"),
        node("ready", ready="True"),
        node("cpu-only", gpus=None),
        node("zero", gpus="0"),
    )
    topo = Topology.from_nodelist(nl)
    assert [n.name for n in topo.nodes] == ["ok", "prefer", "ready"]
    reasons = dict(topo.skipped)
    assert reasons["cordoned"] == "unschedulable (cordoned)"
    assert reasons["tainted"] == "taint dedicated=infer:NoSchedule not tolerated"
    assert reasons["evicting"] == "taint maintenance:NoExecute not tolerated"
    assert reasons["notready"] == "not Ready (False)"
    assert reasons["unknown"] == "not Ready (Unknown)"
    assert reasons["cpu-only"] == reasons["zero"] == "no allocatable nvidia.com/gpu"
    assert "7 node(s) skipped (cordoned: unschedulable (cordoned)" in topo.describe_skipped()
    assert topo.describe_skipped().endswith("and 2 more)")
    # require_ready=False keeps NotReady nodes (a KWOK cluster that reports no conditions, say).
    relaxed = Topology.from_nodelist(nl, require_ready=False)
    assert {"notready", "unknown"} <= {n.name for n in relaxed.nodes}


@pytest.mark.parametrize(
    ("toleration", "tolerated"),
    [
        (Toleration(key="dedicated", operator="Equal", value="infer", effect="NoSchedule"), True),
        (Toleration(key="dedicated", operator="Equal", value="infer"), True),  # any effect
        (Toleration(key="dedicated", operator="Exists"), True),
        (Toleration(operator="Exists"), True),  # tolerates everything
        (Toleration(key="dedicated", operator="Equal", value="train"), False),
        (Toleration(key="dedicated", operator="Exists", effect="NoExecute"), False),
        (Toleration(key="other", operator="Exists"), False),
    ],
)
def test_taint_toleration_matching(toleration: Toleration, tolerated: bool) -> None:
    nl = nodelist(node("t", taints=[{"key": "dedicated", "value": "infer", "effect": "NoSchedule"}]))
    topo = Topology.from_nodelist(nl, tolerations=[toleration])
    assert (topo.num_slots == 8) is tolerated


def test_toleration_dicts_and_cli_form() -> None:
    assert Toleration.from_dict({"key": "a", "operator": "Exists"}) == Toleration(key="a", operator="Exists")
    assert Toleration.parse("a=b:NoSchedule") == Toleration(
        key="a", operator="Equal", value="b", effect="NoSchedule"
    )
    assert Toleration.parse("a") == Toleration(key="a", operator="Exists")
    assert Toleration.parse("*") == Toleration(operator="Exists")
    with pytest.raises(TopologyError, match="effect"):
        Toleration.parse("a:Sometimes")
    with pytest.raises(TopologyError, match="empty key"):
        Toleration.parse("=b")
    with pytest.raises(TopologyError, match="operator"):
        Toleration.from_dict({"key": "a", "operator": "In"})
    nl = nodelist(node("t", taints=[{"key": "gpu", "effect": "NoSchedule"}]))
    assert Topology.from_nodelist(nl, tolerations=[{"key": "gpu", "operator": "Exists"}]).num_slots == 8


def _pinned(p: dict, *nodes: str, values: int = 1) -> dict:
    terms = [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [n] * values}]} for n in nodes]
    p["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": terms}}}
    return p


def test_pending_pods_pinned_to_a_node_hold_its_gpus() -> None:
    pods = [
        _pinned(pod(None, 2), "a"),  # not bound yet, but the scheduler can only put it on a
        _pinned(pod(None, 1), "b", "b"),  # two terms naming the same node
        _pinned(pod(None, 4), "b", "c"),  # may go to b or c: pins neither
        _pinned(pod(None, 4), "c", values=2),  # In [c, c]: not the one-node form, not read
        _pinned(pod(None, 8, phase="Failed"), "d"),
        pod(None, 8),  # free to go anywhere
    ]
    assert [pinned_node(p) for p in pods] == ["a", "b", None, None, "d", None]
    assert gpus_used_by_pods(pods) == {"a": 2, "b": 1}


def test_gpus_used_by_pods_are_subtracted() -> None:
    pods = {
        "items": [
            pod("a", 2),
            pod("a", 1, where="requests"),
            pod("a", 4, phase="Succeeded"),  # finished: its GPUs are free again
            pod("b", 1, init=3),  # init container needs 3 > 1: the node reserves 3
            pod(None, 8),  # not bound yet
            pod("c", 8, phase="Pending"),  # bound, pending: holds its GPUs
        ]
    }
    assert gpus_used_by_pods(pods) == {"a": 3, "b": 3, "c": 8}
    assert gpus_used_by_pods(pods, ignore=lambda p: p["spec"].get("nodeName") == "a") == {"b": 3, "c": 8}
    topo = Topology.from_nodelist(
        nodelist(node("a"), node("b"), node("c"), node("d")), pods=pods, used={"d": 6}
    )
    assert {n.name: n.gpus for n in topo.nodes} == {"a": 5, "b": 5, "d": 2}
    assert topo.node("a").used == 3 and topo.node("a").allocatable == 8
    assert dict(topo.skipped) == {"c": "all 8 nvidia.com/gpu in use"}
    with pytest.raises(TopologyError, match="negative"):
        Topology.from_nodelist(nodelist(node("a")), used={"a": -1})


@pytest.mark.parametrize(
    ("q", "n"),
    [("8", 8), (8, 8), ("1k", 1000), ("2Ki", 2048), ("500m", 0), ("1500m", 1), ("1e3", 1000), (7.9, 7)],
)
def test_parse_quantity(q: Any, n: int) -> None:
    assert parse_quantity(q) == n


@pytest.mark.parametrize("q", ["eight", "8 GPUs", "", True, "1Zi"])
def test_parse_quantity_rejects_garbage(q: Any) -> None:
    with pytest.raises(TopologyError, match="not a quantity"):
        parse_quantity(q)


def test_bad_node_lists() -> None:
    with pytest.raises(TopologyError, match="NodeList"):
        Topology.from_nodelist({"kind": "Node", "metadata": {"name": "a"}})
    with pytest.raises(TopologyError, match="twice"):
        Topology.from_nodelist(nodelist(node("a"), node("a")))
    with pytest.raises(TopologyError, match="metadata.name"):
        Topology.from_nodelist(nodelist({"metadata": {}}))
    with pytest.raises(TopologyError, match="allocatable nvidia.com/gpu"):
        Topology.from_nodelist(nodelist(node("a", "lots")))
    with pytest.raises(TopologyError, match="not an object"):
        Topology.from_nodelist(["node"])  # type: ignore[list-item]
    # A plain list of Node objects is accepted too.
    assert Topology.from_nodelist([node("a", "2")]).num_slots == 2


def test_synthetic_and_without_nodes() -> None:
    topo = Topology.synthetic(4, 8, nodes_per_domain=2, nodes_per_rack=4)
    assert topo.num_slots == 32
    assert [n.domain for n in topo.nodes] == ["nvl-0", "nvl-0", "nvl-1", "nvl-1"]
    assert {n.rack for n in topo.nodes} == {"rack-0"}
    smaller = topo.without_nodes(["node-1"], "lost")
    assert [n.name for n in smaller.nodes] == ["node-0", "node-2", "node-3"]
    assert smaller.skipped == (("node-1", "lost"),)
    mixed = Topology.synthetic(3, [8, 0, 4])
    assert [n.gpus for n in mixed.nodes] == [8, 4] and mixed.skipped == (("node-1", "no free GPUs"),)
    with pytest.raises(TopologyError):
        Topology.synthetic(2, [8])
