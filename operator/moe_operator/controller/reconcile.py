"""Reconcile one MoEDeployment: read the world, plan, apply, observe, write status.

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
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_operator import api, perfmodel
from moe_operator.controller import metrics, resources, scaling
from moe_operator.controller.kube import Kube, KubeError, LeaderOnly
from moe_operator.controller.resources import Owner
from moe_operator.placement import MoEShape, PlacementError, Plan, RankSlot
from moe_operator.placement import plan as make_plan
from moe_operator.topology import Topology, TopologyLabels, gpus_used_by_pods, pinned_node

log = logging.getLogger(__name__)

# Condition types (each True when ...)
PLACED = "Placed"            # every EP group has a plan that fits the schedulable GPUs
READY = "Ready"              # every rank pod of every group is Ready
PROGRESSING = "Progressing"  # rank pods are being created, replaced or rolled out
DEGRADED = "Degraded"        # the deployment was Ready and some ranks are not (node loss, failed rank)

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


def keep_rank_numbers(new: Plan, previous: Plan | None) -> Plan:
    """Renumber `new`'s ranks so that a node that hosted rank r before still hosts rank r.

    Pods are named by rank and pinned to a node, so a rank that changes node means a new pod.
    The planner numbers ranks in topology order; after a node loss that would shift every later
    rank. Matching by node keeps every surviving pod where it is. When the group grows, the old
    ranks keep their numbers and the new ones come after them; when it shrinks, the numbers that
    remain are the lowest (the ranks beyond the new size are the ones that leave).
    """
    if previous is None:
        return new
    prev_by_node: dict[str, list[int]] = {}
    for r in previous.ranks:
        if r.rank < new.num_ranks:
            prev_by_node.setdefault(r.node, []).append(r.rank)
    order = [-1] * new.num_ranks  # order[new rank] = final rank number
    taken: set[int] = set()
    for r in new.ranks:
        olds = prev_by_node.get(r.node)
        if olds:
            order[r.rank] = olds.pop(0)
            taken.add(order[r.rank])
    free = iter(i for i in range(new.num_ranks) if i not in taken)
    for i in range(new.num_ranks):
        if order[i] < 0:
            order[i] = next(free)
    inv = np.argsort(order)  # inv[final rank] = new rank
    ranks = tuple(RankSlot(rank=k, node=new.ranks[int(j)].node, gpu=new.ranks[int(j)].gpu) for k, j in enumerate(inv))
    return Plan(ranks=ranks, expert_map=new.expert_map[:, inv, :], metrics=new.metrics, shape=new.shape)


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


@dataclass
class Outcome:
    """What one pass decided: the status to write and the events to post."""

    status: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float = 5.0


class Reconciler:
    def __init__(self, kube: Kube | LeaderOnly, workers: int = 32):
        self.kube = kube
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
        new = {**out.status}
        if any(old.get(k) != v for k, v in new.items()):
            self.kube.patch_status("MoEDeployment", meta["name"], meta["namespace"], new)
        for type_, reason, message in out.events:
            self.kube.event(obj, type_, reason, message)

    # ------------------------------------------------------------------------------------
    def _reconcile(self, obj: dict) -> Outcome:
        meta = obj["metadata"]
        gen = int(meta.get("generation") or 0)
        if not isinstance(obj.get("status"), dict):
            obj["status"] = {}
        old_status = obj["status"]
        conds = list(old_status.get("conditions") or [])
        owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])

        try:
            api.check_name(owner.name)  # the CRD checks it too; an object admitted before it did is refused here
            spec = api.parse_spec(obj.get("spec") or {})
        except api.SpecError as e:
            conds = set_condition(conds, PLACED, False, "InvalidSpec", str(e), gen)
            conds = set_condition(conds, READY, False, "InvalidSpec", str(e), gen)
            return Outcome({"phase": "Failed", "observedGeneration": gen, "conditions": conds, "reason": str(e)},
                           events=[("Warning", "InvalidSpec", str(e))] if old_status.get("reason") != str(e) else [],
                           requeue_after=60)

        ep, groups = spec.parallelism.expert_parallel_size, spec.parallelism.replicas
        total = ep * groups
        sel = f"{resources.L_DEPLOYMENT}={owner.name}"
        own_pods = {p["metadata"]["name"]: p for p in self.kube.list("Pod", owner.namespace, labels=sel)}
        own_uids = {p["metadata"]["uid"] for p in own_pods.values()}
        node_sel = ",".join(f"{k}={v}" for k, v in spec.placement.node_selector.items()) or None
        nodes = self.kube.list("Node", labels=node_sel)
        tk = spec.placement.topology_keys
        topo_args = dict(labels=TopologyLabels(nvlink_domain=tk.nvlink_domain, rack=tk.rack, zone=tk.zone),
                         gpu_resource=spec.placement.gpu_resource,
                         tolerations=[t.model_dump(by_alias=True, exclude_none=True) for t in spec.placement.tolerations])
        # Schedulable nodes only: enough to tell whether the stored plan still stands. GPUs used by
        # other pods matter only when planning, and listing every pod in the cluster is the most
        # expensive read there is, so it is done then and only then.
        topo = Topology.from_nodelist({"items": nodes}, **topo_args)
        full_topo: list[Topology] = []

        def with_other_pods() -> Topology:
            """Free GPUs: what other pods and other deployments' plans hold taken out (see claimed_gpus)."""
            if not full_topo:
                self._plan_alone()
                busy = [p for p in self.kube.list("Pod", fields="status.phase!=Succeeded,status.phase!=Failed")
                        if p["metadata"]["uid"] not in own_uids]
                taken = claimed_gpus(busy, self._claims_of_others(owner), spec.placement.gpu_resource)
                full_topo.append(Topology.from_nodelist({"items": nodes}, used=taken, **topo_args))
            return full_topo[0]

        events: list[tuple[str, str, str]] = []
        # Admission: refuse a deployment whose ranks cannot fit in GPU memory, before any pod exists.
        hw = self._hardware(spec, nodes)
        prediction, kv = None, None
        if hw is not None:
            fits, breakdown = perfmodel.check_fits(spec, hw)
            if not fits:
                msg = f"does not fit in GPU memory: {breakdown}"
                conds = set_condition(conds, PLACED, False, "InsufficientMemory", msg, gen)
                conds = set_condition(conds, READY, False, "InsufficientMemory", msg, gen)
                return Outcome({"phase": "Failed", "observedGeneration": gen, "conditions": conds, "reason": msg},
                               events=[("Warning", "InsufficientMemory", msg)] if old_status.get("reason") != msg else [],
                               requeue_after=60)
            try:
                kv = self._kv_admission(spec, hw)
            except perfmodel.PerfModelError as e:
                msg = f"does not fit in GPU memory: {e}"
                conds = set_condition(conds, PLACED, False, "InsufficientMemory", msg, gen)
                conds = set_condition(conds, READY, False, "InsufficientMemory", msg, gen)
                return Outcome({"phase": "Failed", "observedGeneration": gen, "conditions": conds, "reason": msg},
                               events=[("Warning", "InsufficientMemory", msg)] if old_status.get("reason") != msg else [],
                               requeue_after=60)
            prediction = perfmodel.plan(spec, hw).prediction().model_copy(update={
                "kv_cache_tokens_per_rank": kv.cache_tokens, "max_context": kv.max_context,
                "max_sequences_per_rank": kv.max_seqs}).model_dump(by_alias=True)
            if kv.clamped and (old_status.get("prediction") or {}).get("maxContext") != kv.max_context:
                # Documented choice: serve shorter requests rather than refuse the deployment.
                events.append(("Warning", "ContextClamped",
                               f"requests limited to {kv.max_context} tokens (MOE_MAX_CONTEXT): one rank's KV cache "
                               f"holds {kv.cache_tokens} tokens on {hw.name}, less than the context of "
                               f"{kv.model_context}"))
        shape = shape_of(spec)
        plans: list[Plan] = []
        generations: list[int] = []
        used_by_other_groups: dict[str, int] = {}
        replanned_reasons: list[str] = []
        for g in range(groups):
            cm = self.kube.get("ConfigMap", resources.plan_configmap_name(owner, g), owner.namespace)
            prev, prev_gen, bad = stored_plan(cm)
            if bad:
                events.append(("Warning", "BadPlan", f"group {g}: stored plan unreadable ({bad}); "
                                                     + ("re-planning" if prev is None else "publishing it again")))
            group_topo = _minus(topo, used_by_other_groups)
            why = self._replan_reason(prev, spec, shape, group_topo, own_pods, owner, g)
            full = self._unschedulable_nodes(prev, spec, own_pods, owner, g) if why is None else []
            if full:
                why = f"unschedulable: no free {spec.placement.gpu_resource} on {', '.join(full[:5])}"
                group_topo = group_topo.without_nodes(full, "rank pods unschedulable (GPUs taken)")
            if why is None:
                new = prev
            else:
                group_topo = _minus(with_other_pods(), used_by_other_groups)
                if full:
                    group_topo = group_topo.without_nodes(full, "rank pods unschedulable (GPUs taken)")
                t1 = time.perf_counter()
                try:
                    # Re-plans for placement reasons assume uniform load; measured load enters
                    # through `_load_balance`, which re-plans with it.
                    new = make_plan(shape, group_topo, load=None,
                                    previous=prev if prev is not None and prev.num_layers == shape.moe_layers else None,
                                    redundant=spec.parallelism.expert_parallel_size * spec.parallelism.max_experts_per_gpu
                                    - shape.n_routed_experts if spec.parallelism.max_experts_per_gpu > 1
                                    else spec.parallelism.redundant_experts,
                                    max_experts_per_gpu=spec.parallelism.max_experts_per_gpu)
                except PlacementError as e:
                    return self._pending(owner, old_status, conds, gen, total, with_other_pods(), g, ep, str(e), events)
                metrics.PLAN_SECONDS.observe(time.perf_counter() - t1)
                if new.num_ranks != ep:
                    return self._pending(owner, old_status, conds, gen, total, with_other_pods(), g, ep,
                                         f"planner used {new.num_ranks} ranks, expected {ep}", events)
                new = keep_rank_numbers(new, prev)
                if same_plan(prev, new):
                    new, why = prev, None
            if why is None and bad:
                why = f"stored plan repaired: {bad}"
            if why is not None:
                if prev is not None and not bad:
                    metrics.REPLANS.labels(reason=why.split(":")[0]).inc()
                    replanned_reasons.append(f"group {g}: {why}")
                prev_gen = self._publish(owner, old_status, g, new, prev_gen)
                moved = new.metrics.get("moved_experts") if new is not prev else 0
                msg = f"group {g}: expert map generation {prev_gen} ({why})" + (
                    f", {moved} expert copies moved" if moved is not None else "")
                events.append(("Normal", "Planned", msg))
            for r in new.ranks:
                used_by_other_groups[r.node] = used_by_other_groups.get(r.node, 0) + 1
            self._claim(owner, g, new)
            plans.append(new)
            generations.append(prev_gen)

        # Shared objects (idempotent server-side apply).
        for o in (resources.headless_service(owner, spec), resources.client_service(owner, spec),
                  resources.pod_disruption_budget(owner)):
            self.kube.apply(o)

        spec_hash = resources.pod_spec_hash(spec, kv)
        progressing = self._sync_pods(owner, spec, spec_hash, kv, plans, own_pods, events)

        # Observe. Ranks beyond the spec's size (scale-out) that are still joining do not make the
        # deployment Degraded: the group serves on its other ranks meanwhile.
        not_ready = [(g, r) for g, p in enumerate(plans) for r in range(p.num_ranks)
                     if not ((pod := own_pods.get(resources.pod_name(owner, g, r))) is not None and pod_ready(pod)
                             and pod["spec"].get("nodeName") == p.ranks[r].node
                             and (pod["metadata"].get("annotations") or {}).get(resources.A_SPEC_HASH) == spec_hash)]
        total = sum(p.num_ranks for p in plans)
        ready = total - len(not_ready)
        joining = [gr for gr in not_ready if gr[1] >= ep]
        only_joining = bool(joining) and len(joining) == len(not_ready)
        if only_joining:
            progressing = "; ".join(x for x in (progressing, f"{len(joining)} scale-out rank(s) joining") if x)
        nodes_used = len({r.node for p in plans for r in p.ranks})
        conds = set_condition(conds, PLACED, True, "Planned",
                              f"{groups} group(s) x EP{ep} on {nodes_used} nodes", gen)
        was_ready = old_status.get("phase") in ("Ready", "Degraded")
        blocked = next(((n, u[1]) for n, p in sorted(own_pods.items()) if (u := pod_unschedulable(p))), None)
        if ready == total or only_joining:
            phase, reason = "Ready", None
        elif was_ready:
            phase = "Degraded"
            reason = "; ".join(replanned_reasons) or f"{total - ready} of {total} ranks not ready"
        else:
            phase, reason = "Starting", f"{ready}/{total} ranks ready"
        if blocked and ready < total:
            reason = f"{reason}; {blocked[0]} unschedulable: {blocked[1]}"
        conds = set_condition(conds, READY, phase == "Ready", "AllRanksReady" if phase == "Ready" else "RanksNotReady",
                              f"{ready}/{total} ranks ready", gen)
        conds = set_condition(conds, PROGRESSING, bool(progressing), "Reconciling" if progressing else "Stable",
                              progressing or "all rank pods match the plan", gen)
        conds = set_condition(conds, DEGRADED, phase == "Degraded",
                              "RanksLost" if phase == "Degraded" else "AsExpected", reason or "", gen)
        if old_status.get("phase") != phase:
            events.append(("Normal" if phase in ("Ready", "Starting") else "Warning", phase,
                           reason or f"{ready}/{total} ranks ready"))
        status = {
            "phase": phase, "observedGeneration": gen, "conditions": conds, "readyRanks": ready,
            "totalRanks": total, "ready": f"{ready}/{total}", "nodesUsed": nodes_used,
            "expertMapGeneration": max(generations), "reason": reason,
            "extraRanks": total - ep * groups,
        }
        if prediction is not None:
            status["prediction"] = prediction
        requeue = 1.0 if progressing else 10.0
        if spec.load_balancing.enabled:
            def grow_topo(g: int) -> Topology | None:
                """Free GPUs for group `g` (listing every pod: only called when a scale-out is weighed)."""
                used: dict[str, int] = {}
                for k, p in enumerate(plans):
                    if k != g:
                        for r in p.ranks:
                            used[r.node] = used.get(r.node, 0) + 1
                try:
                    return _minus(with_other_pods(), used)
                except KubeError as err:  # listing pods failed: no scale-out this time
                    log.warning("free GPUs unknown, no scale-out this pass: %s", err)
                    return None

            lb = self._load_balance(owner, spec, shape, plans, generations, own_pods, topo, grow_topo,
                                    ready == total and not progressing, old_status, conds, gen, events)
            status.update(lb)
            conds = status["conditions"]
            requeue = min(requeue, float(spec.load_balancing.interval_seconds))
        return Outcome(status, events, requeue_after=requeue)

    # ------------------------------------------------------------------------------------
    def _load_balance(self, owner: Owner, spec: api.MoEDeploymentSpec, shape: MoEShape, plans: list[Plan],
                      generations: list[int], own_pods: dict[str, dict], topo: Topology,
                      grow_topo: Any, serving: bool, old_status: dict, conds: list[dict], gen: int,
                      events: list) -> dict:
        """Measure per-expert load and publish a rebalanced expert map when it stays skewed."""
        lb = spec.load_balancing
        key = (owner.namespace, owner.name)
        now = time.time()
        out: dict[str, Any] = {k: old_status[k] for k in ("imbalance", "hotExperts", "lastRebalanceTime",
                                                          "lastRebalanceReason") if k in old_status}
        out["conditions"] = conds
        if not serving:
            return out
        if now - self.last_eval.get(key, 0.0) < lb.interval_seconds * 0.9:
            return out
        self.last_eval[key] = now
        cfg = scaling.Config(threshold=lb.imbalance_threshold, window_s=lb.window_seconds,
                             cooldown_s=lb.cooldown_seconds, max_replicas_per_expert=lb.max_replicas_per_expert,
                             min_tokens=float(os.environ.get("MOE_REBALANCE_MIN_TOKENS", "1000")),
                             base_ranks=spec.parallelism.expert_parallel_size, max_extra_gpus=lb.max_extra_gpus)
        imbalances, hot = [], []
        try:
            for g, p in enumerate(plans):
                st = self.balance.setdefault((owner.namespace, owner.name, g), scaling.State())
                counts = self._measure(owner, spec, g, p, own_pods)
                st.samples.append(scaling.Sample(now, counts))
                st.samples = [x for x in st.samples if x.t >= now - 3 * lb.window_seconds]
                d = scaling.decide(st, cfg, now, shape, p, topo, redundant=p.num_ranks - shape.n_routed_experts,
                                   grow_topo=functools.partial(grow_topo, g) if cfg.max_extra_gpus > 0 else None)
                if d.imbalance is not None:
                    imbalances.append(d.imbalance)
                hot += [{"layer": la, "expert": e, "replicas": c} for la, e, c in d.hot]
                metrics.IMBALANCE_THRESHOLD.labels(owner.namespace, owner.name).set(lb.imbalance_threshold)
                metrics.RANKS.labels(owner.namespace, owner.name, str(g)).set(p.num_ranks)
                if d.action != "none" and d.plan is not None:
                    new = keep_rank_numbers(d.plan, p)
                    generations[g] = self._publish(owner, old_status, g, new, generations[g])
                    metrics.REBALANCES.labels(deployment=f"{owner.namespace}/{owner.name}").inc()
                    metrics.DECISIONS.labels(owner.namespace, owner.name, d.action).inc()
                    metrics.EXPERT_MAP_GENERATION.labels(owner.namespace, owner.name).set(generations[g])
                    metrics.RANKS.labels(owner.namespace, owner.name, str(g)).set(new.num_ranks)
                    moved = scaling_moves(p, new)
                    size = f"; {p.num_ranks} -> {new.num_ranks} ranks" if new.num_ranks != p.num_ranks else ""
                    msg = (f"group {g}: expert map generation {generations[g]} ({d.action}): {d.reason}{size}; "
                           f"{moved} expert copies moved")
                    reason = {"scale-out": "ScaledOut", "scale-in": "ScaledIn", "restore": "Restored"}.get(d.action,
                                                                                                         "Rebalanced")
                    events.append(("Normal", reason, msg))
                    out["lastRebalanceTime"] = now_iso()
                    out["lastRebalanceReason"] = msg
                    out["expertMapGeneration"] = max(generations)
        except scaling.MetricsError as e:
            msg = f"load not measured, no rebalancing: {e}"
            out["conditions"] = set_condition(conds, "MetricsAvailable", False, "MetricsUnavailable", msg, gen)
            if not any(c.get("type") == "MetricsAvailable" and c.get("status") == "False" for c in conds):
                events.append(("Warning", "MetricsUnavailable", msg))
            return out
        out["conditions"] = set_condition(conds, "MetricsAvailable", True, "Measured",
                                          f"per-expert load from {'Prometheus' if lb.prometheus_url else 'rank /metrics'}",
                                          gen)
        if imbalances:
            out["imbalance"] = round(max(imbalances), 3)
            metrics.IMBALANCE.labels(owner.namespace, owner.name).set(max(imbalances))
        out["hotExperts"] = hot[:32]
        return out

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
    def _replan_reason(self, prev: Plan | None, spec: api.MoEDeploymentSpec, shape: MoEShape, topo: Topology,
                       own_pods: dict[str, dict], owner: Owner, group: int) -> str | None:
        """Why the stored plan cannot stay, or None when it can."""
        if prev is None:
            return "initial placement"
        ep = spec.parallelism.expert_parallel_size
        extra = spec.load_balancing.max_extra_gpus if spec.load_balancing.enabled else 0
        if not ep <= prev.num_ranks <= ep + extra or prev.num_layers != shape.moe_layers:
            return "size changed"
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

    def _pending(self, owner: Owner, old_status: dict, conds: list[dict], gen: int, total: int, topo: Topology,
                 group: int, ep: int, err: str, events: list) -> Outcome:
        have = topo.num_slots
        why = f"needs {total} GPUs, {have} schedulable"
        skipped = topo.describe_skipped()
        if skipped:
            why += f": {skipped}"
        if "needs" not in err:
            why += f" (group {group}: {err})"
        conds = set_condition(conds, PLACED, False, "InsufficientGPUs", why, gen)
        conds = set_condition(conds, READY, False, "NotPlaced", why, gen)
        if old_status.get("reason") != why:
            events.append(("Warning", "InsufficientGPUs", why))
        return Outcome({"phase": "Pending", "observedGeneration": gen, "conditions": conds, "reason": why,
                        "totalRanks": total, "readyRanks": 0, "ready": f"0/{total}"}, events, requeue_after=10)

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

    def _sync_pods(self, owner: Owner, spec: api.MoEDeploymentSpec, h: str, kv: perfmodel.KvAdmission | None,
                   plans: list[Plan],
                   own_pods: dict[str, dict], events: list) -> str:
        """Create missing pods, replace moved/failed ones, roll out spec changes group by group.

        Returns a description of what is in progress ('' when every pod matches the plan).
        `h` is the spec hash the rank pods must carry.
        """
        wanted: dict[str, tuple[int, int]] = {}
        for g, p in enumerate(plans):
            for r in range(p.num_ranks):
                wanted[resources.pod_name(owner, g, r)] = (g, r)
        to_delete: list[dict] = []
        to_create: list[dict] = []
        notes: list[str] = []
        stale_groups = set()
        now = time.monotonic()
        for name, pod in own_pods.items():
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
            pod = own_pods.get(name)
            node = plans[g].ranks[r].node
            if pod is None:
                if g in stale_groups:
                    continue  # the group restarts as a whole: create after every old rank is gone
                to_create.append(resources.rank_pod(owner, spec, plans[g], g, r, h, kv))
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
            gone = {n for n in {p["spec"].get("nodeName") for p in to_delete} - {None}
                    if self.kube.get("Node", n) is None}
            list(self.pool.map(lambda p: self.kube.delete(
                "Pod", p["metadata"]["name"], owner.namespace, uid=p["metadata"]["uid"],
                grace_seconds=0 if p["spec"].get("nodeName") in gone else None), to_delete))
            notes.append(f"{len(to_delete)} rank pod(s) replaced")
        if to_create:
            list(self.pool.map(self.kube.create, to_create))
            notes.append(f"{len(to_create)} rank pod(s) created")
        return "; ".join(notes)


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
