"""Cluster topology as the placement planner sees it: GPU slots grouped by node, NVLink domain,
rack and zone.

Input is plain data: a Kubernetes ``NodeList`` as ``kubectl get nodes -o json`` prints it (a dict),
optionally a ``PodList`` or a ``{node: used GPUs}`` map for GPUs that are already taken. No
Kubernetes client is imported here; the operator reads the objects and passes them in.

A node contributes ``allocatable[gpu_resource] - used`` slots when it is schedulable:
not cordoned (``spec.unschedulable``), no ``NoSchedule`` / ``NoExecute`` taint that the given
tolerations do not tolerate, and not reported ``Ready=False/Unknown``. Every node that
contributes nothing is listed in ``Topology.skipped`` with the reason, so that an error message
can say why a cluster is too small.

Nodes are kept in *topology order*: (zone, rack, NVLink domain, name), names compared with
numbers as numbers (``node-2`` before ``node-10``). The planner lays expert groups out along this
order, so that consecutive ranks are physically close.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

# Effects that keep a pod off a node. PreferNoSchedule is only a preference of the scheduler.
BLOCKING_TAINT_EFFECTS = ("NoSchedule", "NoExecute")

# Pods in these phases no longer hold their devices.
_TERMINAL_POD_PHASES = ("Succeeded", "Failed")


class TopologyError(ValueError):
    """The node list (or pod list) is not something we can read."""


@dataclass(frozen=True)
class TopologyLabels:
    """Node label keys that name the locality of a node. All are configurable per cluster."""

    nvlink_domain: str = "moe.dev/nvlink-domain"
    """GPUs in one NVLink domain talk over NVLink; missing label: the node is its own domain."""
    rack: str = "moe.dev/rack"
    """Rack (or top-of-rack switch); missing label: empty string."""
    zone: str = "topology.kubernetes.io/zone"
    """Availability zone; missing label: empty string."""


@dataclass(frozen=True)
class Toleration:
    """A pod toleration with Kubernetes matching semantics (the fields of ``core/v1.Toleration``)."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Toleration:
        op = d.get("operator") or "Equal"
        if op not in ("Equal", "Exists"):
            raise TopologyError(f"toleration operator must be Equal or Exists, got {op!r}")
        return cls(
            key=d.get("key") or "", operator=op, value=d.get("value") or "", effect=d.get("effect") or ""
        )

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """Parse the CLI form ``key[=value][:Effect]``; ``key`` alone means Exists, ``*`` tolerates all."""
        spec, _, effect = text.partition(":")
        if effect and effect not in (*BLOCKING_TAINT_EFFECTS, "PreferNoSchedule"):
            raise TopologyError(
                f"toleration {text!r}: effect must be NoSchedule, NoExecute or PreferNoSchedule"
            )
        if spec == "*":
            return cls(operator="Exists", effect=effect)
        key, eq, value = spec.partition("=")
        if not key:
            raise TopologyError(f"toleration {text!r}: empty key (use '*' to tolerate every taint)")
        return cls(key=key, operator="Equal" if eq else "Exists", value=value, effect=effect)

    def tolerates(self, taint: Mapping[str, Any]) -> bool:
        """True when this toleration matches ``taint`` (a ``core/v1.Taint`` dict)."""
        if self.effect and self.effect != taint.get("effect", ""):
            return False
        if self.operator == "Exists":
            return not self.key or self.key == taint.get("key", "")
        return self.key == taint.get("key", "") and self.value == (taint.get("value") or "")


@dataclass(frozen=True)
class NodeSlots:
    """One schedulable node with at least one free GPU."""

    name: str
    gpus: int
    """Free GPU slots (allocatable minus used); the planner numbers them 0..gpus-1."""
    domain: str
    rack: str = ""
    zone: str = ""
    allocatable: int = 0
    used: int = 0


@dataclass(frozen=True)
class GpuSlot:
    """One free GPU: (node, index within the node's free GPUs) plus the node's locality."""

    node: str
    gpu: int
    domain: str
    rack: str = ""
    zone: str = ""


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that compares runs of digits as numbers: node-2 < node-10."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part
    )


def topology_order_key(node: NodeSlots) -> tuple[Any, ...]:
    return (natural_key(node.zone), natural_key(node.rack), natural_key(node.domain), natural_key(node.name))


@dataclass(frozen=True)
class Topology:
    """Schedulable nodes in topology order, and the nodes that were left out with a reason."""

    nodes: tuple[NodeSlots, ...]
    skipped: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise TopologyError("duplicate node names in topology")
        for n in self.nodes:
            if n.gpus < 1:
                raise TopologyError(f"node {n.name!r} has {n.gpus} free GPUs; list it in skipped instead")
        object.__setattr__(self, "nodes", tuple(sorted(self.nodes, key=topology_order_key)))

    @property
    def num_slots(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def slots(self) -> tuple[GpuSlot, ...]:
        """Every free GPU, node by node in topology order."""
        return tuple(
            GpuSlot(node=n.name, gpu=i, domain=n.domain, rack=n.rack, zone=n.zone)
            for n in self.nodes
            for i in range(n.gpus)
        )

    def node(self, name: str) -> NodeSlots:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def without_nodes(self, names: Iterable[str], reason: str = "removed") -> Topology:
        """The same topology with some nodes taken out (a node loss, a drain)."""
        drop = set(names)
        return Topology(
            nodes=tuple(n for n in self.nodes if n.name not in drop),
            skipped=self.skipped + tuple((n.name, reason) for n in self.nodes if n.name in drop),
        )

    def describe_skipped(self, limit: int = 5) -> str:
        """'3 nodes skipped (a: cordoned, b: ...)' for error messages; empty when none."""
        if not self.skipped:
            return ""
        shown = ", ".join(f"{name}: {why}" for name, why in self.skipped[:limit])
        more = f", and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"{len(self.skipped)} node(s) skipped ({shown}{more})"

    @classmethod
    def synthetic(
        cls,
        nodes: int,
        gpus_per_node: int | Sequence[int] = 8,
        *,
        nodes_per_domain: int = 1,
        nodes_per_rack: int = 0,
        prefix: str = "node",
    ) -> Topology:
        """A regular cluster for tests and benchmarks: ``nodes`` nodes named prefix-0.., NVLink
        domains of ``nodes_per_domain`` nodes, racks of ``nodes_per_rack`` nodes (0: one rack)."""
        if nodes < 0 or nodes_per_domain < 1 or nodes_per_rack < 0:
            raise TopologyError(
                "synthetic topology needs nodes >= 0, nodes_per_domain >= 1, nodes_per_rack >= 0"
            )
        counts = [gpus_per_node] * nodes if isinstance(gpus_per_node, int) else list(gpus_per_node)
        if len(counts) != nodes:
            raise TopologyError(f"gpus_per_node has {len(counts)} entries for {nodes} nodes")
        out = []
        for i, g in enumerate(counts):
            domain = f"{prefix}-{i}" if nodes_per_domain == 1 else f"nvl-{i // nodes_per_domain}"
            rack = f"rack-{i // nodes_per_rack}" if nodes_per_rack else ""
            out.append(NodeSlots(name=f"{prefix}-{i}", gpus=g, domain=domain, rack=rack, allocatable=g))
        return cls(
            nodes=tuple(n for n in out if n.gpus > 0),
            skipped=tuple((n.name, "no free GPUs") for n in out if n.gpus <= 0),
        )

    @classmethod
    def from_nodelist(
        cls,
        nodelist: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        labels: TopologyLabels = TopologyLabels(),
        gpu_resource: str = DEFAULT_GPU_RESOURCE,
        tolerations: Iterable[Toleration | Mapping[str, Any]] = (),
        pods: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        used: Mapping[str, int] | None = None,
        require_ready: bool = True,
    ) -> Topology:
        """Build the topology from a NodeList (or a plain list of Node dicts).

        ``pods``: a PodList (or list of Pods) whose GPU requests on their nodes are subtracted; pass
        only pods that are *not* part of the deployment being planned, or re-planning would see its
        own GPUs as taken. ``used``: ``{node name: GPUs already used}``, added to what the pods use.
        """
        items = _items(nodelist, "NodeList")
        tols = tuple(t if isinstance(t, Toleration) else Toleration.from_dict(t) for t in tolerations)
        used_by_node: dict[str, int] = {}
        if pods is not None:
            used_by_node = gpus_used_by_pods(pods, gpu_resource)
        for name, n in (used or {}).items():
            if int(n) < 0:
                raise TopologyError(f"used GPUs for node {name!r} is negative ({n})")
            used_by_node[name] = used_by_node.get(name, 0) + int(n)

        nodes: list[NodeSlots] = []
        skipped: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i, node in enumerate(items):
            meta = node.get("metadata") or {}
            name = meta.get("name")
            if not name or not isinstance(name, str):
                raise TopologyError(f"node #{i} has no metadata.name")
            if name in seen:
                raise TopologyError(f"node {name!r} appears twice in the node list")
            seen.add(name)
            why = _unschedulable_reason(node, tols, require_ready)
            if why:
                skipped.append((name, why))
                continue
            alloc_raw = ((node.get("status") or {}).get("allocatable") or {}).get(gpu_resource)
            try:
                alloc = 0 if alloc_raw is None else parse_quantity(alloc_raw)
            except TopologyError as exc:
                raise TopologyError(f"node {name!r}: allocatable {gpu_resource}: {exc}") from None
            taken = used_by_node.get(name, 0)
            free = alloc - taken
            if alloc <= 0:
                skipped.append((name, f"no allocatable {gpu_resource}"))
                continue
            if free <= 0:
                skipped.append((name, f"all {alloc} {gpu_resource} in use"))
                continue
            node_labels = meta.get("labels") or {}
            nodes.append(
                NodeSlots(
                    name=name,
                    gpus=free,
                    domain=node_labels.get(labels.nvlink_domain) or name,
                    rack=node_labels.get(labels.rack, ""),
                    zone=node_labels.get(labels.zone, ""),
                    allocatable=alloc,
                    used=taken,
                )
            )
        return cls(nodes=tuple(nodes), skipped=tuple(skipped))


def _items(obj: Mapping[str, Any] | Sequence[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    if isinstance(obj, Mapping):
        if "items" not in obj:
            raise TopologyError(f"expected a {kind} (an object with 'items'), got keys {sorted(obj)[:5]}")
        items = obj["items"] or []
    else:
        items = obj
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise TopologyError(f"{kind} items must be a list")
    for i, it in enumerate(items):
        if not isinstance(it, Mapping):
            raise TopologyError(f"{kind} item #{i} is not an object")
    return list(items)


def _unschedulable_reason(node: Mapping[str, Any], tols: tuple[Toleration, ...], require_ready: bool) -> str:
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return "unschedulable (cordoned)"
    for taint in spec.get("taints") or []:
        if taint.get("effect") in BLOCKING_TAINT_EFFECTS and not any(t.tolerates(taint) for t in tols):
            value = f"={taint['value']}" if taint.get("value") else ""
            return f"taint {taint.get('key', '')}{value}:{taint['effect']} not tolerated"
    if require_ready:
        for cond in (node.get("status") or {}).get("conditions") or []:
            # Only an explicit Ready=False/Unknown counts: node lists written by hand often carry no conditions.
            if cond.get("type") == "Ready" and cond.get("status") != "True":
                return f"not Ready ({cond.get('status')})"
    return ""


def gpus_used_by_pods(
    pods: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    gpu_resource: str = DEFAULT_GPU_RESOURCE,
    ignore: Callable[[Mapping[str, Any]], bool] | None = None,
) -> dict[str, int]:
    """``{node: GPUs requested by non-terminated pods bound or pinned to it}``.

    A pod not bound yet counts against the node its required node affinity pins it to (see
    `pinned_node`): the scheduler can put it nowhere else, so its GPUs are as good as taken (another
    MoEDeployment's rank pods, just created, are such pods). A pending pod free to go anywhere
    takes nothing yet. A pod's request is the larger of the sum over its containers and the
    largest init container (the scheduler's rule). Extended resources must have requests ==
    limits, so either is read.
    """
    used: dict[str, int] = {}
    for pod in _items(pods, "PodList"):
        spec = pod.get("spec") or {}
        node = spec.get("nodeName") or pinned_node(pod)
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase in _TERMINAL_POD_PHASES or (ignore is not None and ignore(pod)):
            continue
        main = sum(_container_gpus(c, gpu_resource) for c in spec.get("containers") or [])
        init = max((_container_gpus(c, gpu_resource) for c in spec.get("initContainers") or []), default=0)
        n = max(main, init)
        if n:
            used[node] = used.get(node, 0) + n
    return used


def pinned_node(pod: Mapping[str, Any]) -> str | None:
    """The one node a pod's required node affinity allows, or None.

    Only the form that names a node outright is read: every node selector term (terms are ORed)
    holds ``matchFields: [{key: metadata.name, operator: In, values: [NODE]}]`` with the same NODE,
    as the operator's rank pods and DaemonSet pods have.
    """
    try:
        terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
    except (KeyError, TypeError):
        return None
    found: set[str] = set()
    for term in terms or []:
        names = [f["values"][0] for f in (term or {}).get("matchFields") or []
                 if f.get("key") == "metadata.name" and f.get("operator") == "In" and len(f.get("values") or []) == 1]
        if len(names) != 1:
            return None
        found.add(names[0])
    return found.pop() if len(found) == 1 else None


def _container_gpus(container: Mapping[str, Any], gpu_resource: str) -> int:
    res = container.get("resources") or {}
    raw = (res.get("requests") or {}).get(gpu_resource)
    if raw is None:
        raw = (res.get("limits") or {}).get(gpu_resource)
    return 0 if raw is None else parse_quantity(raw)


_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def parse_quantity(q: Any) -> int:
    """A Kubernetes resource quantity as a whole number of units, rounded down ("8", "2k", "500m" -> 0)."""
    if isinstance(q, bool):
        raise TopologyError(f"not a quantity: {q!r}")
    if isinstance(q, int):
        return q
    if isinstance(q, float):
        return int(q // 1)
    m = _QUANTITY.match(str(q).strip())
    if not m:
        raise TopologyError(f"not a quantity: {q!r}")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        raise TopologyError(f"not a quantity: {q!r}") from None
    suffix = m.group(2) or ""
    value = number / 1000 if suffix == "m" else number * _SUFFIX[suffix]
    return int(value // 1)


__all__ = [
    "BLOCKING_TAINT_EFFECTS",
    "DEFAULT_GPU_RESOURCE",
    "GpuSlot",
    "NodeSlots",
    "Toleration",
    "Topology",
    "TopologyError",
    "TopologyLabels",
    "gpus_used_by_pods",
    "natural_key",
    "parse_quantity",
    "pinned_node",
]
