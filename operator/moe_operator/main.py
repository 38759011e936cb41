"""kopf handlers: thin. Run with `kopf run -m moe_operator.main` (add --standalone for one replica).

Each MoEDeployment gets a daemon that runs the level-triggered reconcile loop in a thread; Pod
and Node events only wake the loops up early. Two operator replicas never act at once: kopf
peering (the ClusterKopfPeering/KopfPeering CRDs in crds/) pauses the lower-priority one.
"""

from __future__ import annotations

import asyncio
import os

import kopf
from prometheus_client import start_http_server

from . import api, reconcile
from .kube import Kube
from .resources import L_DEPLOYMENT

_wakeups: dict[tuple[str, str], asyncio.Event] = {}
_reconciler: reconcile.Reconciler | None = None


def _wake(namespace: str | None, name: str | None) -> None:
    ev = _wakeups.get((namespace or "", name or ""))
    if ev is not None:
        ev.set()


@kopf.on.startup(id="configure")
def configure(settings: kopf.OperatorSettings, **_):
    global _reconciler
    settings.persistence.finalizer = "serving.moe.dev/operator"
    settings.posting.level = 20  # INFO and above become Events
    settings.watching.server_timeout = 270
    settings.networking.error_backoffs = [1, 2, 5, 10]
    _reconciler = reconcile.Reconciler(Kube(kubeconfig=os.environ.get("KUBECONFIG")))
    port = int(os.environ.get("MOE_OPERATOR_METRICS_PORT", "8080"))
    if port:
        start_http_server(port, addr=os.environ.get("MOE_OPERATOR_METRICS_ADDR", "0.0.0.0"))


@kopf.daemon(api.GROUP, api.VERSION, api.PLURAL, id="control-loop", cancellation_timeout=10)
async def control_loop(name: str, namespace: str, stopped: kopf.DaemonStopped, logger, **_):
    key = (namespace, name)
    wake = _wakeups.setdefault(key, asyncio.Event())
    try:
        while not stopped:
            wake.clear()
            try:
                out = await asyncio.to_thread(_reconciler.reconcile, namespace, name)
                delay = out.requeue_after if out else 30.0
            except Exception as e:  # the API server may go away; keep the loop alive
                logger.warning(f"reconcile failed, retrying: {e}")
                delay = 3.0
            try:
                await asyncio.wait_for(wake.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
    finally:
        _wakeups.pop(key, None)


@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, id="spec-changed", field="spec")
def spec_changed(name: str, namespace: str, **_):
    _wake(namespace, name)


@kopf.on.event("pods", labels={L_DEPLOYMENT: kopf.PRESENT}, id="rank-pod-event")
def rank_pod_event(labels: dict, namespace: str, **_):
    _wake(namespace, labels.get(L_DEPLOYMENT))


@kopf.on.event("nodes", id="node-event")
def node_event(type: str, body: kopf.Body, **_):
    # Heartbeats modify nodes all the time; wake only for what can change a plan. The loops'
    # periodic pass catches the rest.
    spec, status = body.get("spec") or {}, body.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if type in ("DELETED", "ADDED") or spec.get("unschedulable") or spec.get("taints") or not ready:
        for ev in _wakeups.values():
            ev.set()
