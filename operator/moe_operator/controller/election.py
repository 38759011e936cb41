"""Leader election on a coordination.k8s.io/v1 Lease, so that two operator replicas never act at once.

Every replica watches; only the Lease holder reconciles. The holder renews every `renew_s`; a
replica takes the Lease over once it has not been renewed for `duration_s` (the old holder is
dead or cut off). Updates use the Lease's resourceVersion, so two candidates cannot both win.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import uuid

from moe_operator.controller.kube import Kube, KubeError

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _fmt(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(s: str | None) -> datetime.datetime | None:
    if not s:
        return None
    for f in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.datetime.strptime(s, f).replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            continue
    return None


class LeaderElector:
    def __init__(self, kube: Kube, name: str = "moe-operator", namespace: str | None = None,
                 identity: str | None = None, duration_s: int = 15, renew_s: float = 5.0):
        self.kube, self.name = kube, name
        self.namespace = namespace or os.environ.get("MOE_OPERATOR_NAMESPACE") or "default"
        self.identity = identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.duration_s, self.renew_s = duration_s, renew_s
        self._leader_until = 0.0  # monotonic deadline of our own lease
        self.last_contact: float | None = None  # monotonic time of the last round the API server answered

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"

    def is_leader(self) -> bool:
        return time.monotonic() < self._leader_until

    def try_acquire_or_renew(self) -> bool:
        """One round: True when we hold the Lease afterwards."""
        started = time.monotonic()
        now = _now()
        try:
            lease = self.kube.request("GET", f"{self.path}/{self.name}")
        except KubeError as e:
            if e.status != 404:
                log.warning("leader election: %s", e)
                return self.is_leader()
            lease = None
        self.last_contact = started
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration_s,
                "acquireTime": _fmt(now), "renewTime": _fmt(now), "leaseTransitions": 0}
        try:
            if lease is None:
                self.kube.request("POST", self.path, body={
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec})
            else:
                cur = lease.get("spec") or {}
                holder = cur.get("holderIdentity")
                renewed = _parse(cur.get("renewTime")) or _parse(cur.get("acquireTime"))
                duration = int(cur.get("leaseDurationSeconds") or self.duration_s)
                expired = renewed is None or (now - renewed).total_seconds() > duration
                if holder != self.identity and holder and not expired:
                    self._leader_until = 0.0
                    return False
                if holder == self.identity:
                    spec["acquireTime"] = cur.get("acquireTime") or spec["acquireTime"]
                    spec["leaseTransitions"] = int(cur.get("leaseTransitions") or 0)
                else:
                    spec["leaseTransitions"] = int(cur.get("leaseTransitions") or 0) + 1
                    log.info("leader election: taking over the lease from %s", holder or "nobody")
                # PUT with the resourceVersion we read: a concurrent winner makes this a 409.
                # The fetched metadata (labels, annotations, resourceVersion) goes back unchanged.
                self.kube.request("PUT", f"{self.path}/{self.name}", body={
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": lease["metadata"], "spec": spec})
        except KubeError as e:
            if e.status not in (409, 0):
                log.warning("leader election: %s", e)
            self._leader_until = 0.0 if e.status == 409 else self._leader_until
            return self.is_leader()
        # Act only for a little less than the lease lasts, counted from before the request.
        self._leader_until = started + self.duration_s - self.renew_s
        return True

    def unready_reason(self) -> str | None:
        """Why this replica could not lead or take over now, or None: the API server has answered a
        Lease round within the Lease's duration."""
        if self.last_contact is None:
            return "the API server has not answered a leader-election round yet"
        silent = time.monotonic() - self.last_contact
        if silent > self.duration_s:
            return f"the API server has not answered a leader-election round for {silent:.0f} s"
        return None

    def release(self) -> None:
        if not self.is_leader():
            return
        self._leader_until = 0.0
        try:
            lease = self.kube.request("GET", f"{self.path}/{self.name}")
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["renewTime"] = _fmt(_now() - datetime.timedelta(seconds=self.duration_s + 1))
                lease["spec"]["holderIdentity"] = ""
                self.kube.request("PUT", f"{self.path}/{self.name}", body=lease)
        except KubeError as e:
            log.warning("leader election: release failed: %s", e)
