"""Reconcile one MoEDeployment. One pass is a chain of steps (`Reconciler._reconcile`), each of
which may end it: read the spec and the world, make sure the rank key exists, admit (GPU memory),
decide every group's plan (placement, then measured load), publish the changed plans, apply the
shared objects (Services, PodDisruptionBudgets, NetworkPolicies, the router Deployment), sync the
rank pods, observe and write status.

Level-triggered and idempotent: every pass starts from what the API server says (the plan lives in
a ConfigMap, never only in memory), so the operator can be killed anywhere and a restarted one
continues where the old one stopped without duplicates: pod names are deterministic and creation
tolerates "already exists".
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import secrets
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_operator import api, names, perfmodel
from moe_operator.controller import metrics, resources, scaling
from moe_operator.controller.kube import Kube, KubeError, LeaderOnly
from moe_operator.controller.resources import Owner
from moe_operator.placement import MoEShape, PlacementError, Plan, keep_rank_numbers, tp_group_problem
from moe_operator.placement import plan as make_plan
from moe_operator.topology import Topology, TopologyLabels, gpus_used_by_pods, pinned_node

log = logging.getLogger(__name__)

# Condition types (each True when ...)
PLACED = "Placed"            # every EP group has a plan that fits the schedulable GPUs
READY = "Ready"              # every rank pod of every group is Ready
PROGRESSING = "Progressing"  # rank pods are being created, replaced or rolled out
DEGRADED = "Degraded"        # the deployment was Ready and some ranks are not (node loss, failed rank);
                             # status.degradedGroups says which, why and since when

# A pod the scheduler cannot place for this long makes its node count as unusable for a re-plan.
UNSCHEDULABLE_GRACE_S = 10.0
# After a scale-in, a rank beyond the new size finishes its sequences and leaves the group, then
# exits; its pod is deleted then, or after this long at the latest.
RETIRE_GRACE_S = 600.0


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def shape_of(spec: api.MoEDeploymentSpec) -> MoEShape:
    a = spec.model.architecture
    return MoEShape(moe_layers=a.moe_layers, n_routed_experts=a.n_routed_experts, n_group=a.n_group,
                    topk_group=a.topk_group, num_experts_per_tok=a.num_experts_per_tok)


def set_condition(conditions: list[dict], type_: str, status: bool | str, reason: str, message: str,
                  generation: int) -> list[dict]:
    """Return conditions with `type_` set; lastTransitionTime changes only when status changes."""
    st = status if isinstance(status, str) else ("True" if status else "False")
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    ltt = old["lastTransitionTime"] if old and old.get("status") == st and old.get("lastTransitionTime") else now_iso()
    out.append({"type": type_, "status": st, "reason": reason, "message": message,
                "lastTransitionTime": ltt, "observedGeneration": generation})
    order = {PLACED: 0, READY: 1, PROGRESSING: 2, DEGRADED: 3}
    return sorted(out, key=lambda c: order.get(c["type"], 9))


def pod_ready(pod: dict) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def pod_unschedulable(pod: dict) -> tuple[float, str] | None:
    """(since when, scheduler message) for a pod the scheduler could not place, else None."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            ts = c.get("lastTransitionTime")
            since = (datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
                     .timestamp() if ts else time.time())
            return since, c.get("message") or ""
    return None


def same_plan(a: Plan | None, b: Plan) -> bool:
    return a is not None and a.ranks == b.ranks and np.array_equal(a.expert_map, b.expert_map)


def claimed_gpus(pods: list[dict], plans: dict[tuple[str, str], dict[str, int]],
                 gpu_resource: str) -> dict[str, int]:
    """GPUs on each node that are not free for the deployment being planned.

    `pods`: every live pod but that deployment's; a pod bound to a node, or pinned to it by
    required node affinity though not bound yet (another MoEDeployment's rank pods just created),
    holds its GPUs there. `plans`: (namespace, name) -> {node: ranks} of the other MoEDeployments'
    current plans. A MoEDeployment holds on each node the larger of what its pods and its plans
    hold there: the rank pods of a plan just published may not exist yet, and a retiring rank's
    pod outlives its place in the plan.
    """
    mine: dict[tuple[str, str] | None, list[dict]] = {}
    for p in pods:
        meta = p.get("metadata") or {}
        dep = (meta.get("labels") or {}).get(resources.L_DEPLOYMENT)
        mine.setdefault((meta.get("namespace") or "", dep) if dep else None, []).append(p)
    out = gpus_used_by_pods(mine.pop(None, []), gpu_resource)
    for key in set(mine) | set(plans):
        by_pods, by_plan = gpus_used_by_pods(mine.get(key, []), gpu_resource), plans.get(key, {})
        for node in set(by_pods) | set(by_plan):
            out[node] = out.get(node, 0) + max(by_pods.get(node, 0), by_plan.get(node, 0))
    return out


def _int_or_zero(v: Any) -> int:
    try:
        return max(0, int(v))
    except (TypeError, ValueError):
        return 0


def stored_plan(cm: dict | None) -> tuple[Plan | None, int, str | None]:
    """(plan, generation, problem) of a plan ConfigMap. A plan that cannot be read is None and a
    generation that cannot be read is the annotation's, else 0; `problem` says what was wrong (the
    ConfigMap must then be written again, whole)."""
    if cm is None:
        return None, 0, None
    data = cm.get("data") or {}
    annotated = _int_or_zero(((cm.get("metadata") or {}).get("annotations") or {}).get(resources.A_GENERATION))
    problems = []
    try:
        plan = Plan.from_json(data["plan.json"])
    except (PlacementError, KeyError, ValueError, TypeError) as e:
        plan = None
        problems.append(f"plan.json: {e}")
    raw = data.get("generation")
    try:
        gen = int(raw)
        if gen < 1:
            raise ValueError
    except (TypeError, ValueError):
        gen = annotated
        problems.append(f"generation {raw!r} is not a positive integer")
    return plan, max(gen, 0), "; ".join(problems) or None


def published_generation(status: dict) -> int:
    """The highest expert-map generation this deployment is known to have published."""
    return max(_int_or_zero(status.get("publishedGeneration")), _int_or_zero(status.get("expertMapGeneration")))


def rank_problem(pod: dict | None, node: str, spec_hash: str) -> str | None:
    """Why a rank's pod does not serve its rank, in words; None when it is Ready on the rank's node
    with the current spec."""
    if pod is None:
        return "pod gone"
    if pod["metadata"].get("deletionTimestamp"):
        return "pod terminating"
    status = pod.get("status") or {}
    if status.get("phase") in ("Failed", "Succeeded"):
        ended = next((c["state"]["terminated"] for c in status.get("containerStatuses") or []
                      if (c.get("state") or {}).get("terminated")), None)
        detail = f", exit code {ended.get('exitCode')}" if ended else ""
        return f"pod {status['phase']}{detail}"
    if (pod["metadata"].get("annotations") or {}).get(resources.A_SPEC_HASH) != spec_hash:
        return "restarting with the new spec"
    bound = pod["spec"].get("nodeName")
    if bound != node:
        return f"moving to {node}" if bound else "pod not scheduled yet"
    return None if pod_ready(pod) else "not Ready"


def rank_pod_current(pod: dict | None, node: str, spec_hash: str) -> bool:
    """A rank's pod exists, is Ready, runs on the rank's node and carries the current spec."""
    return rank_problem(pod, node, spec_hash) is None


def stored_degraded(old: Any) -> dict[int, tuple[dict, dict[int, dict]]]:
    """A status's `degradedGroups` as group -> (its entry, rank -> the rank's entry); whatever is
    malformed (the status is only as good as its last writer) is left out."""
    out: dict[int, tuple[dict, dict[int, dict]]] = {}
    for g in old if isinstance(old, list) else []:
        if isinstance(g, dict) and isinstance(g.get("group"), int):
            ranks = g.get("missingRanks") if isinstance(g.get("missingRanks"), list) else []
            out[g["group"]] = (g, {m["rank"]: m for m in ranks if isinstance(m, dict) and isinstance(m.get("rank"), int)})
    return out


def degraded_groups(missing: list[dict[int, str]], ep: int, old: Any, now: str) -> list[api.DegradedGroup]:
    """The groups with missing ranks (`missing[g]`: rank -> why). A rank's `since`, and a group's,
    are kept from the previous status's `degradedGroups` (`old`) while they stay missing, so they
    say when the loss began, across passes and operator restarts."""
    before = stored_degraded(old)
    out = []
    for g, ranks in enumerate(missing):
        if not ranks:
            continue
        entry, prev = before.get(g, ({}, {}))
        out.append(api.DegradedGroup(
            group=g, since=str(entry.get("since") or now), ready_ranks=ep - len(ranks), ranks=ep,
            missing_ranks=[api.MissingRank(rank=r, since=str((prev.get(r) or {}).get("since") or now), reason=why)
                           for r, why in sorted(ranks.items())]))
    return out


def degraded_message(groups: list[api.DegradedGroup], listed: int = 8) -> str:
    """'group 0: rank 5 missing since T (pod Failed, exit code 137); serving with 15/16' per group."""
    parts = []
    for d in groups:
        ranks = ", ".join(f"rank {m.rank} missing since {m.since} ({m.reason})" for m in d.missing_ranks[:listed])
        if len(d.missing_ranks) > listed:
            ranks += f", {len(d.missing_ranks) - listed} more"
        front_lost = any(m.rank == 0 for m in d.missing_ranks)
        serving = (f"front rank 0 lost, {d.ready_ranks}/{d.ranks} ranks ready" if front_lost
                   else f"serving with {d.ready_ranks}/{d.ranks}")
        parts.append(f"group {d.group}: {ranks}; {serving}")
    return "; ".join(parts)


def degradation_events(old: Any, new: list[api.DegradedGroup], pod_name: Callable[[int, int], str]) -> list[tuple[str, str, str]]:
    """Events from the previous status's `degradedGroups` (`old`) to this pass's (`new`): RankLost
    for each rank newly missing (not for ranks a spec rollout restarts: RollingOut says that),
    RankRejoined for each rank back while its group still misses others, GroupWhole when a group
    misses none any more. `pod_name(group, rank)` names the rank's pod."""
    before = {g: set(ranks) for g, (_, ranks) in stored_degraded(old).items()}
    after = {d.group: {m.rank: m.reason for m in d.missing_ranks} for d in new}
    counts = {d.group: f"{d.ready_ranks}/{d.ranks} ranks ready" for d in new}
    events = []
    for g in sorted(set(before) | set(after)):
        was, missing = before.get(g, set()), after.get(g, {})
        if g not in after:
            back = ", ".join(map(str, sorted(was))) or "?"
            events.append(("Normal", "GroupWhole", f"group {g} whole again: rank(s) {back} back, every rank Ready"))
            continue
        for r in sorted(set(missing) - set(was)):
            if missing[r] != "restarting with the new spec":
                events.append(("Warning", "RankLost", f"group {g} rank {r} ({pod_name(g, r)}): {missing[r]}; {counts[g]}"))
        for r in sorted(set(was) - set(missing)):
            events.append(("Normal", "RankRejoined", f"group {g} rank {r} ({pod_name(g, r)}) Ready again; {counts[g]}"))
    return events


@dataclass
class Outcome:
    """What one pass decided: the status to write and the events to post."""

    status: api.MoEDeploymentStatus
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float = 5.0

    @property
    def patch(self) -> dict[str, Any]:
        """The status as a merge patch: the fields the pass set (None removes one), no others."""
        full = self.status.model_dump(by_alias=True)
        fields = api.MoEDeploymentStatus.model_fields
        return {fields[f].alias: full[fields[f].alias] for f in self.status.model_fields_set}


@dataclass
class _Change:
    """A new plan for one EP group, to publish; `detail` follows "expert map generation N" in its event."""

    group: int
    plan: Plan
    reason: str  # the event's reason: Planned, Rebalanced, ScaledOut, ScaledIn, Restored
    detail: str
    action: str | None = None  # the load-driven decision (scaling.Decision.action); None for placement


@dataclass
class _Pass:
    """One reconcile pass of one deployment: what it has read and decided so far. Each step of
    `Reconciler._reconcile` reads it and adds to it."""

    obj: dict
    owner: Owner
    gen: int  # metadata.generation
    old_status: dict  # as read; `_publish` records publishedGeneration in it
    conds: list[dict]
    events: list[tuple[str, str, str]] = field(default_factory=list)
    # _read_spec, _read_world
    spec: api.MoEDeploymentSpec = None  # type: ignore[assignment]
    shape: MoEShape = None  # type: ignore[assignment]
    own_pods: dict[str, dict] = field(default_factory=dict)  # name -> pod, this deployment's
    nodes: list[dict] = field(default_factory=list)  # matching spec.placement.nodeSelector
    topo_args: dict[str, Any] = field(default_factory=dict)
    topo: Topology = None  # type: ignore[assignment]  # schedulable GPUs; other pods not taken out
    free: Topology | None = None  # free GPUs (`Reconciler._free_gpus`), once known
    # _admit
    kv: perfmodel.KvAdmission | None = None
    prediction: dict[str, Any] | None = None
    spec_hash: str = ""
    # _ensure_rank_key
    rank_key_uid: str = ""
    # _plan_placement, _plan_load
    plans: list[Plan] = field(default_factory=list)  # per group, as they will be published
    generations: list[int] = field(default_factory=list)  # per group, the stored generation until published
    changes: list[_Change] = field(default_factory=list)
    replanned: list[str] = field(default_factory=list)  # "group g: why" for standing plans replaced
    balance: dict[str, Any] = field(default_factory=dict)  # status fields of load balancing
    # _sync
    progressing: str = ""  # what is in progress ('' when every pod matches the plan)

    @classmethod
    def of(cls, obj: dict) -> _Pass:
        meta = obj["metadata"]
        if not isinstance(obj.get("status"), dict):
            obj["status"] = {}
        return cls(obj=obj, owner=Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
                   gen=int(meta.get("generation") or 0), old_status=obj["status"],
                   conds=list(obj["status"].get("conditions") or []))

    @property
    def ep(self) -> int:
        return self.spec.parallelism.expert_parallel_size

    @property
    def groups(self) -> int:
        return self.spec.parallelism.replicas

    def failed(self, reason: str, msg: str) -> Outcome:
        """Phase Failed: the spec cannot be served as written; posted once per distinct reason."""
        conds = set_condition(self.conds, PLACED, False, reason, msg, self.gen)
        conds = set_condition(conds, READY, False, reason, msg, self.gen)
        return Outcome(api.MoEDeploymentStatus(phase="Failed", observed_generation=self.gen, conditions=conds,
                                               reason=msg),
                       events=[("Warning", reason, msg)] if self.old_status.get("reason") != msg else [],
                       requeue_after=60)


class Reconciler:
    def __init__(self, kube: Kube | LeaderOnly, workers: int = 32, operator_namespace: str | None = None):
        self.kube = kube
        # Where the operator runs: its pods scrape rank metrics, so the NetworkPolicies let it in.
        self.operator_namespace = operator_namespace
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moe-apply")
        # Autoscaler memory per (namespace, name, group); rebuilt within a window after a restart.
        # All per-deployment state is dropped by `forget` when the deployment goes, and when one of
        # the same name but another uid turns up (deleted and re-created while we were not looking).
        self.balance: dict[tuple[str, str, int], scaling.State] = {}
        self.last_eval: dict[tuple[str, str], float] = {}
        # (namespace, name, pod uid) -> when that pod was first seen leaving (scale-in)
        self.retiring: dict[tuple[str, str, str], float] = {}
        self.uids: dict[tuple[str, str], str] = {}
        # GPUs each EP group's current plan holds: (namespace, name, group) -> {node: ranks}. Another
        # deployment's planner counts them, as the plan's pods may not exist yet.
        self.claims: dict[tuple[str, str, int], dict[str, int]] = {}
        # One pass at a time, from reading what other deployments hold to the end of the pass (its
        # plans recorded, its pods created): two deployments planned together would otherwise both
        # take the same free GPUs. Passes that do not plan never take it.
        self.planning = threading.Lock()
        self._held = threading.local()

    def forget(self, namespace: str, name: str) -> None:
        """Drop everything remembered about a deployment, and its operator metric series."""
        for d in (self.balance, self.retiring, self.claims):
            for k in [k for k in list(d) if k[:2] == (namespace, name)]:
                del d[k]
        self.last_eval.pop((namespace, name), None)
        self.uids.pop((namespace, name), None)
        metrics.forget_deployment(namespace, name)

    # ------------------------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> Outcome | None:
        """One full pass. Returns None when the deployment no longer exists."""
        t0 = time.perf_counter()
        obj = self.kube.get("MoEDeployment", name, namespace)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return None
        if self.uids.setdefault((namespace, name), obj["metadata"]["uid"]) != obj["metadata"]["uid"]:
            self.forget(namespace, name)  # a new deployment of the same name: no inherited cooldown
            self.uids[(namespace, name)] = obj["metadata"]["uid"]
        try:
            out = self._reconcile(obj)
        except KubeError as e:
            metrics.RECONCILE_ERRORS.inc()
            log.warning("reconcile %s/%s: %s", namespace, name, e)
            raise
        finally:
            if getattr(self._held, "planning", False):
                self._held.planning = False
                self.planning.release()
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - t0)
            metrics.RECONCILES.inc()
        self._write_status(obj, out)
        return out

    def _write_status(self, obj: dict, out: Outcome) -> None:
        meta = obj["metadata"]
        old = obj.get("status") or {}
        new = out.patch
        if any(old.get(k) != v for k, v in new.items()):
            self.kube.patch_status("MoEDeployment", meta["name"], meta["namespace"], new)
        for type_, reason, message in out.events:
            self.kube.event(obj, type_, reason, message)

    # ------------------------------------------------------------------------------------
    def _reconcile(self, obj: dict) -> Outcome:
        """One pass as a chain of steps; a step that returns an Outcome ends the pass with it."""
        p = _Pass.of(obj)
        for step in (self._read_spec, self._read_world, self._ensure_rank_key, self._admit, self._plan_placement,
                     self._plan_load, self._publish_plans, self._apply_shared, self._sync_pods):
            out = step(p)
            if out is not None:
                return out
        return self._observe(p)

    def _read_spec(self, p: _Pass) -> Outcome | None:
        """Parse the spec once; an invalid one fails the deployment."""
        try:
            api.check_name(p.owner.name)  # the CRD checks it too; an object admitted before it did is refused here
            p.spec = api.parse_spec(p.obj.get("spec") or {})
            api.check_api_key_secret(p.owner.name, p.spec)
        except api.SpecError as e:
            return p.failed("InvalidSpec", str(e))
        p.shape = shape_of(p.spec)
        return None

    def _read_world(self, p: _Pass) -> None:
        """The deployment's own pods and the schedulable nodes.

        GPUs used by other pods matter only when planning, and listing every pod in the cluster is
        the most expensive read there is, so `_free_gpus` does it then and only then.
        """
        spec = p.spec
        sel = f"{resources.L_DEPLOYMENT}={p.owner.name}"
        p.own_pods = {pod["metadata"]["name"]: pod for pod in self.kube.list("Pod", p.owner.namespace, labels=sel)}
        node_sel = ",".join(f"{k}={v}" for k, v in spec.placement.node_selector.items()) or None
        p.nodes = self.kube.list("Node", labels=node_sel)
        tk = spec.placement.topology_keys
        p.topo_args = dict(labels=TopologyLabels(nvlink_domain=tk.nvlink_domain, rack=tk.rack, zone=tk.zone),
                           gpu_resource=spec.placement.gpu_resource,
                           tolerations=[t.model_dump(by_alias=True, exclude_none=True)
                                        for t in spec.placement.tolerations])
        p.topo = Topology.from_nodelist({"items": p.nodes}, **p.topo_args)

    def _ensure_rank_key(self, p: _Pass) -> None:
        """Create the deployment's rank key Secret when it does not exist, with fresh random bytes;
        never change one that does. Its uid enters the pods' spec hash (see `pod_spec_hash`)."""
        name = names.rank_key_secret(p.owner.name)
        found = self.kube.get("Secret", name, p.owner.namespace)
        if found is None:
            found = self.kube.create(resources.rank_key_secret(p.owner, secrets.token_bytes(resources.RANK_KEY_BYTES)))
            if found is None:  # another pass created it first
                found = self.kube.get("Secret", name, p.owner.namespace)
        p.rank_key_uid = ((found or {}).get("metadata") or {}).get("uid", "")

    def _admit(self, p: _Pass) -> Outcome | None:
        """Refuse a deployment whose ranks cannot fit in GPU memory, before any pod exists; else the
        rank pods' KV admission limits and the performance model's prediction."""
        spec = p.spec
        hw = self._hardware(spec, p.nodes)
        if hw is not None:
            fits, breakdown = perfmodel.check_fits(spec, hw)
            if not fits:
                return p.failed("InsufficientMemory", f"does not fit in GPU memory: {breakdown}")
            try:
                kv = self._kv_admission(spec, hw)
            except perfmodel.PerfModelError as e:
                return p.failed("InsufficientMemory", f"does not fit in GPU memory: {e}")
            p.kv = kv
            p.prediction = perfmodel.plan(spec, hw).prediction().model_copy(update={
                "kv_cache_tokens_per_rank": kv.cache_tokens, "max_context": kv.max_context,
                "max_sequences_per_rank": kv.max_seqs}).model_dump(by_alias=True)
            if kv.clamped and (p.old_status.get("prediction") or {}).get("maxContext") != kv.max_context:
                # Documented choice: serve shorter requests rather than refuse the deployment.
                p.events.append(("Warning", "ContextClamped",
                                 f"requests limited to {kv.max_context} tokens (MOE_MAX_CONTEXT): one rank's KV cache "
                                 f"holds {kv.cache_tokens} tokens on {hw.name}, less than the context of "
                                 f"{kv.model_context}"))
        p.spec_hash = resources.pod_spec_hash(spec, p.kv, p.rank_key_uid)
        return None

    def _plan_placement(self, p: _Pass) -> Outcome | None:
        """Each group's plan: the stored one while it still fits the cluster, else a new one for
        uniform load (measured load enters through `_plan_load`). Pending when a group cannot be placed."""
        used_by_other_groups: dict[str, int] = {}
        for g in range(p.groups):
            cm = self.kube.get("ConfigMap", resources.plan_configmap_name(p.owner, g), p.owner.namespace)
            prev, prev_gen, bad = stored_plan(cm)
            if bad:
                p.events.append(("Warning", "BadPlan", f"group {g}: stored plan unreadable ({bad}); "
                                                       + ("re-planning" if prev is None else "publishing it again")))
            new, why = prev, self._replan_reason(prev, p.spec, p.shape, _minus(p.topo, used_by_other_groups))
            full = self._unschedulable_nodes(prev, p.spec, p.own_pods, p.owner, g) if why is None else []
            if full:
                why = f"unschedulable: no free {p.spec.placement.gpu_resource} on {', '.join(full[:5])}"
            if why is not None:
                planned = self._plan_group(p, g, prev, used_by_other_groups, full)
                if isinstance(planned, Outcome):
                    return planned
                new = planned
                if same_plan(prev, new):
                    new, why = prev, None
            if why is None and bad:
                why = f"stored plan repaired: {bad}"
            if why is not None:
                if prev is not None and not bad:
                    metrics.REPLANS.labels(reason=why.split(":")[0]).inc()
                    p.replanned.append(f"group {g}: {why}")
                moved = new.metrics.get("moved_experts") if new is not prev else 0
                p.changes.append(_Change(g, new, "Planned", f"({why})" + (
                    f", {moved} expert copies moved" if moved is not None else "")))
            for r in new.ranks:
                used_by_other_groups[r.node] = used_by_other_groups.get(r.node, 0) + 1
            p.plans.append(new)
            p.generations.append(prev_gen)
        return None

    def _plan_group(self, p: _Pass, group: int, prev: Plan | None, used_by_other_groups: dict[str, int],
                    unschedulable: list[str]) -> Plan | Outcome:
        """A new plan for one group on the free GPUs, rank numbers kept where nodes stay; Pending
        when the planner cannot place it."""
        spec, shape = p.spec, p.shape
        topo = _minus(self._free_gpus(p), used_by_other_groups)
        if unschedulable:
            topo = topo.without_nodes(unschedulable, "rank pods unschedulable (GPUs taken)")
        par = spec.parallelism
        t1 = time.perf_counter()
        try:
            new = make_plan(shape, topo, load=None,
                            previous=prev if prev is not None and prev.num_layers == shape.moe_layers else None,
                            redundant=par.expert_parallel_size * par.max_experts_per_gpu - shape.n_routed_experts
                            if par.max_experts_per_gpu > 1 else par.redundant_experts,
                            max_experts_per_gpu=par.max_experts_per_gpu,
                            attention_tp=par.attention_tensor_parallel)
        except PlacementError as e:
            return self._pending(p, group, str(e))
        metrics.PLAN_SECONDS.observe(time.perf_counter() - t1)
        if new.num_ranks != p.ep:
            return self._pending(p, group, f"planner used {new.num_ranks} ranks, expected {p.ep}")
        return keep_rank_numbers(new, prev, par.attention_tensor_parallel)

    def _plan_load(self, p: _Pass) -> None:
        """Load-driven changes (rebalance, scale-out, scale-in, restore) from measured per-expert
        load, decided before pods are synced so that scale-out ranks are created in the same pass."""
        lb = p.spec.load_balancing
        if not lb.enabled:
            return
        owner, now = p.owner, time.time()
        key = (owner.namespace, owner.name)
        p.balance = {k: p.old_status[k] for k in ("imbalance", "hotExperts", "lastRebalanceTime",
                                                  "lastRebalanceReason") if k in p.old_status}
        if not self._serving(p) or now - self.last_eval.get(key, 0.0) < lb.interval_seconds * 0.9:
            return
        self.last_eval[key] = now
        cfg = scaling.Config(threshold=lb.imbalance_threshold, window_s=lb.window_seconds,
                             cooldown_s=lb.cooldown_seconds, max_replicas_per_expert=lb.max_replicas_per_expert,
                             min_tokens=float(os.environ.get("MOE_REBALANCE_MIN_TOKENS", "1000")),
                             base_ranks=p.ep, max_extra_gpus=lb.max_extra_gpus,
                             attention_tp=p.spec.parallelism.attention_tensor_parallel)
        imbalances, hot = [], []
        try:
            for g, plan in enumerate(p.plans):
                st = self.balance.setdefault((owner.namespace, owner.name, g), scaling.State())
                counts = self._measure(owner, p.spec, g, plan, p.own_pods)
                st.samples.append(scaling.Sample(now, counts))
                st.samples = [x for x in st.samples if x.t >= now - 3 * lb.window_seconds]
                d = scaling.decide(st, cfg, now, p.shape, plan, p.topo,
                                   redundant=plan.num_ranks - p.shape.n_routed_experts,
                                   grow_topo=functools.partial(self._grow_topo, p, g) if cfg.max_extra_gpus > 0 else None)
                if d.imbalance is not None:
                    imbalances.append(d.imbalance)
                hot += [{"layer": la, "expert": e, "replicas": c} for la, e, c in d.hot]
                metrics.IMBALANCE_THRESHOLD.labels(owner.namespace, owner.name).set(lb.imbalance_threshold)
                metrics.RANKS.labels(owner.namespace, owner.name, str(g)).set(plan.num_ranks)
                if d.action != "none" and d.plan is not None:
                    new = keep_rank_numbers(d.plan, plan, cfg.attention_tp)
                    size = f"; {plan.num_ranks} -> {new.num_ranks} ranks" if new.num_ranks != plan.num_ranks else ""
                    reason = {"scale-out": "ScaledOut", "scale-in": "ScaledIn", "restore": "Restored"}.get(
                        d.action, "Rebalanced")
                    p.changes.append(_Change(g, new, reason, f"({d.action}): {d.reason}{size}; "
                                                             f"{scaling_moves(plan, new)} expert copies moved",
                                             action=d.action))
                    p.plans[g] = new
        except scaling.MetricsError as e:
            msg = f"load not measured, no rebalancing: {e}"
            if not any(c.get("type") == "MetricsAvailable" and c.get("status") == "False" for c in p.conds):
                p.events.append(("Warning", "MetricsUnavailable", msg))
            p.conds = set_condition(p.conds, "MetricsAvailable", False, "MetricsUnavailable", msg, p.gen)
            return
        p.conds = set_condition(p.conds, "MetricsAvailable", True, "Measured",
                                f"per-expert load from {'Prometheus' if lb.prometheus_url else 'rank /metrics'}",
                                p.gen)
        if imbalances:
            p.balance["imbalance"] = round(max(imbalances), 3)
            metrics.IMBALANCE.labels(owner.namespace, owner.name).set(max(imbalances))
        p.balance["hotExperts"] = hot[:32]

    def _publish_plans(self, p: _Pass) -> None:
        """Publish every plan this pass changed, in the order decided, and record what each group holds."""
        owner = p.owner
        for c in p.changes:
            p.generations[c.group] = self._publish(owner, p.old_status, c.group, c.plan, p.generations[c.group])
            msg = f"group {c.group}: expert map generation {p.generations[c.group]} {c.detail}"
            p.events.append(("Normal", c.reason, msg))
            if c.action is not None:  # load-driven
                metrics.REBALANCES.labels(deployment=f"{owner.namespace}/{owner.name}").inc()
                metrics.DECISIONS.labels(owner.namespace, owner.name, c.action).inc()
                metrics.EXPERT_MAP_GENERATION.labels(owner.namespace, owner.name).set(p.generations[c.group])
                metrics.RANKS.labels(owner.namespace, owner.name, str(c.group)).set(c.plan.num_ranks)
                p.balance["lastRebalanceTime"] = now_iso()
                p.balance["lastRebalanceReason"] = msg
        for g, plan in enumerate(p.plans):
            self._claim(owner, g, plan)

    def _apply_shared(self, p: _Pass) -> None:
        """The objects shared by all groups, the routers among them (idempotent server-side apply;
        the Deployment controller runs the router pods)."""
        for o in resources.shared_objects(p.owner, p.spec, self.operator_namespace):
            self.kube.apply(o)

    def _observe(self, p: _Pass) -> Outcome:
        """Status from the pods as this pass read them, against the plans it published. Ranks beyond
        the spec's size (scale-out) that are still joining do not make the deployment Degraded: the
        group serves on its other ranks meanwhile. Degraded says which ranks each group misses and
        since when (`degradedGroups`, `degradedSince`), with RankLost, RankRejoined and GroupWhole
        Events as that changes."""
        ep, gen, old_status, progressing = p.ep, p.gen, p.old_status, p.progressing
        not_ready = [(g, r) for g, plan in enumerate(p.plans) for r in range(plan.num_ranks)
                     if not rank_pod_current(p.own_pods.get(resources.pod_name(p.owner, g, r)), plan.ranks[r].node,
                                             p.spec_hash)]
        total = sum(plan.num_ranks for plan in p.plans)
        ready = total - len(not_ready)
        joining = [gr for gr in not_ready if gr[1] >= ep]
        only_joining = bool(joining) and len(joining) == len(not_ready)
        if only_joining:
            progressing = "; ".join(x for x in (progressing, f"{len(joining)} scale-out rank(s) joining") if x)
        nodes_used = len({r.node for plan in p.plans for r in plan.ranks})
        conds = set_condition(p.conds, PLACED, True, "Planned",
                              f"{p.groups} group(s) x EP{ep} on {nodes_used} nodes", gen)
        was_ready = old_status.get("phase") in ("Ready", "Degraded")
        blocked = next(((n, u[1]) for n, pod in sorted(p.own_pods.items()) if (u := pod_unschedulable(pod))), None)
        groups: list[api.DegradedGroup] = []
        if ready == total or only_joining:
            phase, reason = "Ready", None
        elif was_ready:
            phase, groups = "Degraded", self._degradation(p)
            reason = "; ".join([*p.replanned, degraded_message(groups)] if groups else p.replanned) or (
                f"{total - ready} of {total} ranks not ready")
        else:
            phase, reason = "Starting", f"{ready}/{total} ranks ready"
        p.events.extend(degradation_events(old_status.get("degradedGroups"), groups,
                                           functools.partial(resources.pod_name, p.owner)))
        if blocked and ready < total:
            reason = f"{reason}; {blocked[0]} unschedulable: {blocked[1]}"
        conds = set_condition(conds, READY, phase == "Ready", "AllRanksReady" if phase == "Ready" else "RanksNotReady",
                              f"{ready}/{total} ranks ready", gen)
        conds = set_condition(conds, PROGRESSING, bool(progressing), "Reconciling" if progressing else "Stable",
                              progressing or "all rank pods match the plan", gen)
        conds = set_condition(conds, DEGRADED, phase == "Degraded",
                              "RanksLost" if phase == "Degraded" else "AsExpected", reason or "", gen)
        if old_status.get("phase") != phase:
            p.events.append(("Normal" if phase in ("Ready", "Starting") else "Warning", phase,
                             reason or f"{ready}/{total} ranks ready"))
        extra = {"prediction": p.prediction} if p.prediction is not None else {}
        status = api.MoEDeploymentStatus(
            phase=phase, observed_generation=gen, conditions=conds, ready_ranks=ready, total_ranks=total,
            ready=f"{ready}/{total}", nodes_used=nodes_used, expert_map_generation=max(p.generations),
            reason=reason, extra_ranks=total - ep * p.groups, degraded_groups=groups or None,
            degraded_since=min((d.since for d in groups), default=None), **extra, **p.balance)
        requeue = 1.0 if progressing else 10.0
        if p.spec.load_balancing.enabled:
            requeue = min(requeue, float(p.spec.load_balancing.interval_seconds))
        return Outcome(status, p.events, requeue_after=requeue)

    @staticmethod
    def _degradation(p: _Pass) -> list[api.DegradedGroup]:
        """Each group's missing ranks (not Ready, pod Failed or gone, ...: `rank_problem`), with
        since when. Scale-out ranks beyond the spec's size are left out, as in the phase."""
        missing = [{r: why for r in range(min(p.ep, plan.num_ranks))
                    if (why := rank_problem(p.own_pods.get(resources.pod_name(p.owner, g, r)), plan.ranks[r].node,
                                            p.spec_hash))}
                   for g, plan in enumerate(p.plans)]
        return degraded_groups(missing, p.ep, p.old_status.get("degradedGroups"), now_iso())

    # ------------------------------------------------------------------------------------
    def _free_gpus(self, p: _Pass) -> Topology:
        """Free GPUs: what other pods and other deployments' plans hold taken out (see claimed_gpus).
        Lists every pod in the cluster, once per pass, and takes `planning` for the rest of it."""
        if p.free is None:
            self._plan_alone()
            own_uids = {pod["metadata"]["uid"] for pod in p.own_pods.values()}
            busy = [pod for pod in self.kube.list("Pod", fields="status.phase!=Succeeded,status.phase!=Failed")
                    if pod["metadata"]["uid"] not in own_uids]
            taken = claimed_gpus(busy, self._claims_of_others(p.owner), p.spec.placement.gpu_resource)
            p.free = Topology.from_nodelist({"items": p.nodes}, used=taken, **p.topo_args)
        return p.free

    def _grow_topo(self, p: _Pass, group: int) -> Topology | None:
        """Free GPUs for `group` to grow onto (only called when a scale-out is weighed)."""
        used: dict[str, int] = {}
        for k, plan in enumerate(p.plans):
            if k != group:
                for r in plan.ranks:
                    used[r.node] = used.get(r.node, 0) + 1
        try:
            return _minus(self._free_gpus(p), used)
        except KubeError as err:  # listing pods failed: no scale-out this time
            log.warning("free GPUs unknown, no scale-out this pass: %s", err)
            return None

    def _serving(self, p: _Pass) -> bool:
        """Every planned rank's pod is Ready on its node with the current spec, and the deployment
        has no other pod: nothing to create, replace, roll out or retire."""
        wanted = {resources.pod_name(p.owner, g, r): plan.ranks[r].node
                  for g, plan in enumerate(p.plans) for r in range(plan.num_ranks)}
        return set(p.own_pods) == set(wanted) and all(
            rank_pod_current(p.own_pods[name], node, p.spec_hash) for name, node in wanted.items())

    def _publish(self, owner: Owner, status: dict, group: int, plan: Plan, known: int) -> int:
        """Write `plan` as the next generation of the group's plan ConfigMap and return it.

        Ranks ignore a generation at or below the one they serve, so it never goes back: it is
        above `known` (the ConfigMap's) and above every generation this deployment published
        (status.publishedGeneration, written before the ConfigMap, so a ConfigMap deleted or
        garbled later, even after an operator crash between the two writes, continues above it).
        """
        gen = max(known, published_generation(status)) + 1
        self.kube.patch_status("MoEDeployment", owner.name, owner.namespace, {"publishedGeneration": gen})
        status["publishedGeneration"] = gen  # `status` is the object's as this pass read it
        self.kube.apply(resources.plan_configmap(owner, group, plan, gen))
        self._claim(owner, group, plan)
        return gen

    def _claim(self, owner: Owner, group: int, plan: Plan) -> None:
        per_node: dict[str, int] = {}
        for r in plan.ranks:
            per_node[r.node] = per_node.get(r.node, 0) + 1
        self.claims[(owner.namespace, owner.name, group)] = per_node

    def _claims_of_others(self, owner: Owner) -> dict[tuple[str, str], dict[str, int]]:
        out: dict[tuple[str, str], dict[str, int]] = {}
        for (ns, name, _), per_node in list(self.claims.items()):
            if (ns, name) != (owner.namespace, owner.name):
                d = out.setdefault((ns, name), {})
                for node, n in per_node.items():
                    d[node] = d.get(node, 0) + n
        return out

    def _plan_alone(self) -> None:
        """Take `planning` for the rest of this pass (released by `reconcile`)."""
        if not getattr(self._held, "planning", False):
            self.planning.acquire()
            self._held.planning = True

    def _measure(self, owner: Owner, spec: api.MoEDeploymentSpec, group: int, p: Plan,
                 own_pods: dict[str, dict]) -> dict[tuple[int, int, int], float]:
        """Cumulative per-(rank, layer, expert) token counters of one EP group."""
        lb = spec.load_balancing
        if lb.prometheus_url:
            q = (f'sum by (rank, layer, expert) ({scaling.EXPERT_TOKENS}{{namespace="{owner.namespace}",'
                 f'deployment="{owner.name}",group="{group}"}})')
            url = lb.prometheus_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    doc = json.loads(r.read())
            except (OSError, ValueError) as e:
                raise scaling.MetricsError(f"Prometheus at {lb.prometheus_url} unreachable: {e}") from None
            if doc.get("status") != "success":
                raise scaling.MetricsError(f"Prometheus query failed: {doc.get('error')}")
            out = {}
            for item in doc["data"]["result"]:
                m = item["metric"]
                out[(int(m["rank"]), int(m["layer"]), int(m["expert"]))] = float(item["value"][1])
            if not out:
                raise scaling.MetricsError(f"Prometheus has no {scaling.EXPERT_TOKENS} for this deployment")
            return out

        def scrape(r: int) -> str:
            pod = own_pods.get(resources.pod_name(owner, group, r))
            if r >= spec.parallelism.expert_parallel_size and not (pod and pod_ready(pod)):
                return ""  # a scale-out rank still joining has routed nothing yet
            ip = (pod or {}).get("status", {}).get("podIP")
            if not ip:
                raise scaling.MetricsError(f"rank {r} has no pod IP")
            try:
                with urllib.request.urlopen(f"http://{ip}:{spec.serving.metrics_port}/metrics", timeout=3) as resp:
                    return resp.read().decode()
            except OSError as e:
                raise scaling.MetricsError(f"rank {r} /metrics unreachable: {e}") from None

        texts = list(self.pool.map(scrape, range(p.num_ranks)))
        out: dict[tuple[int, int, int], float] = {}
        for t in texts:
            out.update(scaling.parse_expert_tokens(t))
        return out

    @staticmethod
    def _kv_admission(spec: api.MoEDeploymentSpec, hw: perfmodel.Hardware) -> perfmodel.KvAdmission:
        """The rank pods' admission limits; a sequence count or context the spec's worker.env sets is kept."""
        return perfmodel.kv_admission(spec, hw, max_seqs=resources.spec_env_int(spec, resources.ENV_MAX_SEQS),
                                      max_context=resources.spec_env_int(spec, resources.ENV_MAX_CONTEXT))

    @staticmethod
    def _hardware(spec: api.MoEDeploymentSpec, nodes: list[dict]) -> perfmodel.Hardware | None:
        if spec.placement.hardware_profile:
            return perfmodel.hardware(spec.placement.hardware_profile)
        for n in nodes:
            product = ((n.get("metadata") or {}).get("labels") or {}).get("nvidia.com/gpu.product")
            if product:
                return perfmodel.hardware_for_gpu_product(product)
        return None

    # ------------------------------------------------------------------------------------
    def _replan_reason(self, prev: Plan | None, spec: api.MoEDeploymentSpec, shape: MoEShape,
                       topo: Topology) -> str | None:
        """Why the stored plan cannot stay, or None when it can."""
        if prev is None:
            return "initial placement"
        ep = spec.parallelism.expert_parallel_size
        extra = spec.load_balancing.max_extra_gpus if spec.load_balancing.enabled else 0
        if not ep <= prev.num_ranks <= ep + extra or prev.num_layers != shape.moe_layers:
            return "size changed"
        split = tp_group_problem(prev, spec.parallelism.attention_tensor_parallel)
        if split:
            return f"attention TP changed: {split}"
        free = {n.name: n.gpus for n in topo.nodes}
        per_node: dict[str, int] = {}
        for r in prev.ranks:
            per_node[r.node] = per_node.get(r.node, 0) + 1
        lost = sorted(n for n in per_node if n not in free)
        if lost:
            skipped = dict(topo.skipped)
            detail = ", ".join(f"{n} ({skipped.get(n, 'gone')})" for n in lost[:5])
            return f"node lost: {detail}"
        short = sorted(n for n, k in per_node.items() if k > free[n])
        if short:
            return f"GPUs taken: {', '.join(short[:5])}"
        return None

    def _unschedulable_nodes(self, prev: Plan | None, spec: api.MoEDeploymentSpec, own_pods: dict[str, dict],
                             owner: Owner, group: int) -> list[str]:
        """Planned nodes whose rank pods the scheduler has refused for lack of GPUs for a while.

        Other reasons (a missing PVC, a taint the pods do not tolerate) are not fixed by moving
        ranks; they are reported in status instead.
        """
        if prev is None:
            return []
        now, out = time.time(), []
        for r in prev.ranks:
            pod = own_pods.get(resources.pod_name(owner, group, r.rank))
            u = pod_unschedulable(pod) if pod else None
            if u and now - u[0] > UNSCHEDULABLE_GRACE_S and f"Insufficient {spec.placement.gpu_resource}" in u[1]:
                out.append(r.node)
        return sorted(set(out))

    def _pending(self, p: _Pass, group: int, err: str) -> Outcome:
        """Phase Pending: `group` cannot be placed on the free GPUs; says how many there are."""
        total = p.ep * p.groups
        topo = self._free_gpus(p)
        why = f"needs {total} GPUs, {topo.num_slots} schedulable"
        skipped = topo.describe_skipped()
        if skipped:
            why += f": {skipped}"
        if "needs" not in err:
            why += f" (group {group}: {err})"
        conds = set_condition(p.conds, PLACED, False, "InsufficientGPUs", why, p.gen)
        conds = set_condition(conds, READY, False, "NotPlaced", why, p.gen)
        if p.old_status.get("reason") != why:
            p.events.append(("Warning", "InsufficientGPUs", why))
        return Outcome(api.MoEDeploymentStatus(phase="Pending", observed_generation=p.gen, conditions=conds,
                                               reason=why, total_ranks=total, ready_ranks=0, ready=f"0/{total}"),
                       p.events, requeue_after=10)

    def _retiring(self, plans: list[Plan], pod: dict, now: float) -> float | None:
        """Since when a running pod of a rank beyond its group's new size has been waiting to leave
        (the group drains it, re-forms without it, then the process exits 0), or None if the pod is
        not such a rank and goes now."""
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        try:
            g, r = int(labels.get(resources.L_GROUP, "-1")), int(labels.get(resources.L_RANK, "-1"))
        except ValueError:
            return None
        running = (pod.get("status") or {}).get("phase") == "Running" and not meta.get("deletionTimestamp")
        key = (meta["namespace"], labels.get(resources.L_DEPLOYMENT, ""), meta["uid"])
        if not (0 <= g < len(plans) and r >= plans[g].num_ranks and running):
            self.retiring.pop(key, None)
            return None
        return self.retiring.setdefault(key, now)

    def _sync_pods(self, p: _Pass) -> None:
        """Create missing pods, replace moved/failed ones, roll out spec changes group by group;
        `p.progressing` says what is in progress ('' when every pod matches the plan)."""
        owner, spec, h, plans, events = p.owner, p.spec, p.spec_hash, p.plans, p.events
        wanted: dict[str, tuple[int, int]] = {}
        for g, plan in enumerate(plans):
            for r in range(plan.num_ranks):
                wanted[resources.pod_name(owner, g, r)] = (g, r)
        to_delete: list[dict] = []
        to_create: list[dict] = []
        notes: list[str] = []
        stale_groups = set()
        now = time.monotonic()
        for name, pod in p.own_pods.items():
            if name not in wanted:
                since = self._retiring(plans, pod, now)
                if since is not None and now - since < RETIRE_GRACE_S:
                    notes.append(f"{name} leaving the group")
                    continue
                to_delete.append(pod)
                continue
            g, _ = wanted[name]
            if (pod["metadata"].get("annotations") or {}).get(resources.A_SPEC_HASH) != h:
                stale_groups.add(g)
        for name, (g, r) in wanted.items():
            pod = p.own_pods.get(name)
            node = plans[g].ranks[r].node
            if pod is None:
                if g in stale_groups:
                    continue  # the group restarts as a whole: create after every old rank is gone
                to_create.append(resources.rank_pod(owner, spec, plans[g], g, r, h, p.kv))
                continue
            if pod["metadata"].get("deletionTimestamp"):
                notes.append(f"{name} terminating")
                if pod["spec"].get("nodeName") and pod["spec"]["nodeName"] != node:
                    to_delete.append(pod)  # re-issued: forced below if its node is gone
                continue
            phase = (pod.get("status") or {}).get("phase")
            assigned = pod["spec"].get("nodeName") or pinned_node(pod)
            if g in stale_groups:
                to_delete.append(pod)
            elif assigned != node:
                to_delete.append(pod)
                events.append(("Normal", "RankMoved", f"{name}: {assigned} -> {node}"))
            elif phase in ("Failed", "Succeeded"):
                to_delete.append(pod)
                events.append(("Warning", "RankFailed", f"{name} on {node} ended ({phase}); recreating it"))
        for g in sorted(stale_groups):
            events.append(("Normal", "RollingOut", f"group {g}: spec changed, restarting its ranks together"))
        if to_delete:
            # A pod bound to a Node object that no longer exists has no kubelet to finish its
            # deletion (the pod GC would, after a quarantine); it is safe to delete it at once.
            # Pods on a NotReady node that still exists are deleted gracefully: the process may live.
            gone = {n for n in {pod["spec"].get("nodeName") for pod in to_delete} - {None}
                    if self.kube.get("Node", n) is None}
            list(self.pool.map(lambda pod: self.kube.delete(
                "Pod", pod["metadata"]["name"], owner.namespace, uid=pod["metadata"]["uid"],
                grace_seconds=0 if pod["spec"].get("nodeName") in gone else None), to_delete))
            notes.append(f"{len(to_delete)} rank pod(s) replaced")
        if to_create:
            list(self.pool.map(self.kube.create, to_create))
            notes.append(f"{len(to_create)} rank pod(s) created")
        p.progressing = "; ".join(notes)


def scaling_moves(old: Plan, new: Plan) -> int:
    """Expert copies that changed rank between two plans (ranks matched by number; a rank that
    is added or removed counts all its copies)."""
    n = min(old.num_ranks, new.num_ranks)
    width = min(old.expert_map.shape[2], new.expert_map.shape[2])
    changed = int((old.expert_map[:, :n, :width] != new.expert_map[:, :n, :width]).sum())
    extra = old if old.num_ranks > n else new
    return changed + int((extra.expert_map[:, n:, :] >= 0).sum())


def _minus(topo: Topology, used: dict[str, int]) -> Topology:
    """The topology with GPUs claimed by other EP groups of the same deployment taken out."""
    if not used:
        return topo
    from dataclasses import replace

    nodes = []
    skipped = list(topo.skipped)
    for n in topo.nodes:
        free = n.gpus - used.get(n.name, 0)
        if free > 0:
            nodes.append(replace(n, gpus=free, used=n.used + used.get(n.name, 0)))
        else:
            skipped.append((n.name, "used by another EP group of this deployment"))
    return Topology(nodes=tuple(nodes), skipped=tuple(skipped))
