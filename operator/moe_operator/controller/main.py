"""kopf handlers: thin. Run with `kopf run -m moe_operator.controller.main --standalone` (any number of replicas).

Each MoEDeployment gets a control loop (an asyncio task) that runs the level-triggered reconcile
in a thread; watch events only start, wake or stop loops. No finalizers: everything the operator
creates carries an owner reference, so deletion is the garbage collector's job and never waits
for the operator. Only the holder of the `moe-operator` Lease reconciles (see `election`), and
every write checks that it still holds it (`kube.LeaderOnly`), so two replicas never act at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import kopf

from moe_operator import api
from moe_operator.controller import metrics, reconcile
from moe_operator.controller.election import LeaderElector
from moe_operator.controller.kube import Kube, LeaderOnly, NotLeader
from moe_operator.controller.resources import L_DEPLOYMENT

log = logging.getLogger(__name__)


class _State:
    reconciler: reconcile.Reconciler | None = None
    elector: LeaderElector | None = None
    loops: dict[tuple[str, str], asyncio.Task] = {}
    wakeups: dict[tuple[str, str], asyncio.Event] = {}
    gone: set[tuple[str, str]] = set()  # deployments whose DELETED event came: their loop ends after its pass
    elect_task: asyncio.Task | None = None
    # Lease renewals run here, never behind reconcile passes in the default executor: a renewal
    # that waits for a thread would let the Lease lapse while this replica still acts.
    lease_pool: ThreadPoolExecutor | None = None


S = _State()


def _wake(namespace: str | None, name: str | None) -> None:
    ev = S.wakeups.get((namespace or "", name or ""))
    if ev is not None:
        ev.set()


async def _control_loop(namespace: str, name: str) -> None:
    key = (namespace, name)
    wake = S.wakeups[key]
    while key not in S.gone:
        wake.clear()
        if not S.elector.is_leader():
            delay = 1.0
        else:
            try:
                out = await asyncio.to_thread(S.reconciler.reconcile, namespace, name)
                if out is None:  # deleted (the reconciler has forgotten it)
                    break
                delay = out.requeue_after
            except NotLeader as e:  # the Lease lapsed during the pass: it stopped at its next write
                log.warning("reconcile %s/%s stopped: %s", namespace, name, e)
                delay = 1.0
            except Exception as e:  # the API server may go away; keep the loop alive
                log.warning("reconcile %s/%s failed, retrying: %s", namespace, name, e)
                delay = 3.0
        try:
            await asyncio.wait_for(wake.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass
    # Forgotten here, after the last pass, so that a pass still running when the DELETED event
    # came cannot bring a series back after it was removed.
    S.reconciler.forget(namespace, name)
    S.loops.pop(key, None)
    S.wakeups.pop(key, None)
    S.gone.discard(key)


async def _elect() -> None:
    loop = asyncio.get_running_loop()
    while True:
        was = S.elector.is_leader()
        now = await loop.run_in_executor(S.lease_pool, S.elector.try_acquire_or_renew)
        if now and not was:
            log.info("leader election: %s is the leader", S.elector.identity)
            for ev in S.wakeups.values():
                ev.set()
        elif was and not now:
            log.warning("leader election: %s lost the lease; standing by", S.elector.identity)
        await asyncio.sleep(S.elector.renew_s if now else 2.0)


@kopf.on.startup(id="configure")
async def configure(settings: kopf.OperatorSettings, **_):
    settings.posting.level = logging.WARNING  # our own Events carry the story
    settings.watching.server_timeout = 270
    settings.networking.error_backoffs = [1, 2, 5, 10]
    settings.persistence.finalizer = "serving.moe.dev/unused"  # no handler here needs one
    kubeconfig = os.environ.get("KUBECONFIG")
    # The Lease has a client (connections) and a thread of its own; the reconciler's client
    # refuses writes once the Lease is no longer ours.
    S.elector = LeaderElector(Kube(kubeconfig=kubeconfig), name=os.environ.get("MOE_LEASE_NAME", "moe-operator"),
                              duration_s=int(os.environ.get("MOE_LEASE_SECONDS", "15")),
                              renew_s=float(os.environ.get("MOE_LEASE_RENEW_SECONDS", "5")))
    S.lease_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-lease")
    S.reconciler = reconcile.Reconciler(LeaderOnly(Kube(kubeconfig=kubeconfig), S.elector.is_leader),
                                        operator_namespace=os.environ.get("MOE_OPERATOR_NAMESPACE"))
    S.elect_task = asyncio.get_running_loop().create_task(_elect())
    port = int(os.environ.get("MOE_OPERATOR_METRICS_PORT", "8080"))
    if port:  # /metrics and /readyz (the pod's readiness probe)
        metrics.serve(os.environ.get("MOE_OPERATOR_METRICS_ADDR", "0.0.0.0"), port, S.elector.unready_reason)


@kopf.on.cleanup(id="release-lease")
async def cleanup(**_):
    for t in list(S.loops.values()):
        t.cancel()
    if S.elect_task is not None:  # stop renewing before letting go, or we would take it right back
        S.elect_task.cancel()
    if S.elector is not None:
        await asyncio.get_running_loop().run_in_executor(S.lease_pool, S.elector.release)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, id="moedeployment-event")
async def moedeployment_event(type: str, name: str, namespace: str, **_):
    key = (namespace, name)
    if type == "DELETED":
        # Not cancelled: the loop finishes the pass it may be in, then forgets the deployment's
        # state and metric series. A watch event is enough here (no finalizer, no on.delete
        # handler): the state is in this process's memory only, and a DELETED event this process
        # missed (watch gap) ends the loop anyway, when its next pass finds the object gone.
        S.gone.add(key)
        _wake(namespace, name)
        return
    S.gone.discard(key)  # re-created before its old loop ended: the loop goes on (the uid tells it apart)
    if key not in S.loops:
        S.wakeups[key] = asyncio.Event()
        S.loops[key] = asyncio.get_running_loop().create_task(_control_loop(namespace, name))
    _wake(namespace, name)


@kopf.on.event("pods", labels={L_DEPLOYMENT: kopf.PRESENT}, id="rank-pod-event")
async def rank_pod_event(labels: dict, namespace: str, **_):
    _wake(namespace, labels.get(L_DEPLOYMENT))


@kopf.on.event("nodes", id="node-event")
async def node_event(type: str, body: kopf.Body, **_):
    # Heartbeats modify nodes all the time; wake only for what can change a plan. The loops'
    # periodic pass catches the rest.
    spec, status = body.get("spec") or {}, body.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if type in ("DELETED", "ADDED") or spec.get("unschedulable") or spec.get("taints") or not ready:
        for ev in S.wakeups.values():
            ev.set()
