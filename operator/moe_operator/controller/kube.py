"""A thin, dict-in dict-out Kubernetes client for the reconciler.

It rides on the official client's configuration and authentication, but sends and returns plain
JSON: the builders in `resources` produce dicts, server-side apply takes them as they are, and
large lists (hundreds of rank pods) skip model deserialisation.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes import client, config

from moe_operator.controller.resources import MANAGER

# kind -> (api prefix, plural, namespaced)
KINDS: dict[str, tuple[str, str, bool]] = {
    "Pod": ("/api/v1", "pods", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Event": ("/api/v1", "events", True),
    "Node": ("/api/v1", "nodes", False),
    "Secret": ("/api/v1", "secrets", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "MoEDeployment": ("/apis/serving.moe.dev/v1alpha1", "moedeployments", True),
}


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str, reason: str = ""):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotLeader(KubeError):
    """A write refused because this operator replica no longer holds the Lease."""

    def __init__(self, verb: str, kind: str, name: str):
        super().__init__(0, f"not the leader any more: {verb} {kind} {name} not sent", "NotLeader")


class LeaderOnly:
    """The reconciler's client: reads pass through, and every write first checks that this replica
    still leads (`is_leader`), so a pass that outlives its Lease stops at its next write instead
    of acting next to a new leader. The Lease itself is renewed through another client."""

    def __init__(self, kube: Any, is_leader: Any):
        self.kube, self.is_leader = kube, is_leader

    def _check(self, verb: str, kind: str, name: str) -> None:
        if not self.is_leader():
            raise NotLeader(verb, kind, name)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        return self.kube.get(kind, name, namespace)

    def list(self, kind: str, namespace: str | None = None, labels: str | None = None,
             fields: str | None = None) -> list[dict]:
        return self.kube.list(kind, namespace, labels=labels, fields=fields)

    def apply(self, obj: dict, force: bool = True) -> dict:
        self._check("apply", obj["kind"], obj["metadata"]["name"])
        return self.kube.apply(obj, force=force)

    def create(self, obj: dict) -> dict | None:
        self._check("create", obj["kind"], obj["metadata"]["name"])
        return self.kube.create(obj)

    def delete(self, kind: str, name: str, namespace: str | None = None, uid: str | None = None,
               grace_seconds: int | None = None) -> bool:
        self._check("delete", kind, name)
        return self.kube.delete(kind, name, namespace, uid=uid, grace_seconds=grace_seconds)

    def patch_status(self, kind: str, name: str, namespace: str, status: dict) -> dict:
        self._check("patch status of", kind, name)
        return self.kube.patch_status(kind, name, namespace, status)

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        if self.is_leader():  # best effort, like every Event
            self.kube.event(involved, type_, reason, message)


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None, kubeconfig: str | None = None,
                 timeout: float = 30.0):
        if api_client is None:
            cfg = client.Configuration()
            if kubeconfig:
                config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
            else:
                try:
                    config.load_incluster_config(client_configuration=cfg)
                except config.ConfigException:
                    config.load_kube_config(client_configuration=cfg)
            # Bulk pod creation for large EP groups: as many connections as apply threads.
            cfg.connection_pool_maxsize = 64
            api_client = client.ApiClient(cfg)
        self.api = api_client
        self.timeout = timeout

    @staticmethod
    def path(kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        prefix, plural, namespaced = KINDS[kind]
        p = prefix
        if namespaced and namespace:
            p += f"/namespaces/{quote(namespace)}"
        p += f"/{plural}"
        if name:
            p += f"/{quote(name)}"
        if sub:
            p += f"/{sub}"
        return p

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
                content_type: str = "application/json") -> Any:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        url_path = path + (("?" + urlencode(q)) if q else "")
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, _, _ = self.api.param_serialize(method, url_path, header_params=headers,
                                                         auth_settings=["BearerToken"])
        # The REST layer JSON-encodes bodies of JSON content types itself; apply-patch+yaml goes as
        # text (JSON is valid YAML).
        data = body if body is None or "json" in content_type else json.dumps(body)
        try:
            resp = self.api.call_api(method, url, header_params=headers, body=data, _request_timeout=self.timeout)
        except Exception as e:  # connection refused, timeouts: the API server went away
            raise KubeError(0, f"{method} {path}: {e}") from e
        raw = resp.read() if hasattr(resp, "read") else resp.data
        text = raw.decode() if isinstance(raw, bytes) else (raw or "")
        if resp.status >= 400:
            try:
                doc = json.loads(text)
                raise KubeError(resp.status, doc.get("message", text), doc.get("reason", ""))
            except json.JSONDecodeError:
                raise KubeError(resp.status, text) from None
        return json.loads(text) if text else None

    # --- verbs -----------------------------------------------------------------------------

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None = None, labels: str | None = None,
             fields: str | None = None) -> list[dict]:
        doc = self.request("GET", self.path(kind, namespace),
                           query={"labelSelector": labels, "fieldSelector": fields})
        return doc.get("items") or []

    def apply(self, obj: dict, force: bool = True) -> dict:
        """Server-side apply under the operator's one field manager."""
        meta = obj["metadata"]
        return self.request("PATCH", self.path(obj["kind"], meta.get("namespace"), meta["name"]), body=obj,
                            query={"fieldManager": MANAGER, "force": "true" if force else None},
                            content_type="application/apply-patch+yaml")

    def create(self, obj: dict) -> dict | None:
        """Create; None when it already exists (another pass or operator got there first)."""
        meta = obj["metadata"]
        try:
            return self.request("POST", self.path(obj["kind"], meta.get("namespace")), body=obj,
                                query={"fieldManager": MANAGER})
        except KubeError as e:
            if e.status == 409:
                return None
            raise

    def delete(self, kind: str, name: str, namespace: str | None = None, uid: str | None = None,
               grace_seconds: int | None = None) -> bool:
        """Delete (only that incarnation when `uid` is given); False when already gone."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.request("DELETE", self.path(kind, namespace, name), body=body)
            return True
        except KubeError as e:
            if e.status in (404, 409):
                return False
            raise

    def patch_status(self, kind: str, name: str, namespace: str, status: dict) -> dict:
        return self.request("PATCH", self.path(kind, namespace, name, "status"), body={"status": status},
                            content_type="application/merge-patch+json")

    def event(self, involved: dict, type_: str, reason: str, message: str, component: str = MANAGER) -> None:
        """Post a core/v1 Event about `involved` from `component` (best effort: events must never
        break a reconcile)."""
        import datetime
        import uuid

        meta = involved["metadata"]
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        ev = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": involved["apiVersion"], "kind": involved["kind"],
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": component}, "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": component,
        }
        try:
            self.request("POST", self.path("Event", meta["namespace"]), body=ev)
        except KubeError:
            pass
