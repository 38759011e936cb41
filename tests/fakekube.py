"""An in-memory stand-in for `moe_operator.kube.Kube`: the verbs the reconciler uses, on dicts.

Enough API-server behaviour for the reconciler's decisions (uids, generation, label and field
selectors, "already exists", merge-patched status); no scheduler and no kubelet: a test binds and
readies pods itself with `bind_all`.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from moe_operator.controller.kube import KubeError
from moe_operator.localdev import devcluster

_uids = itertools.count(1)


def _path(obj: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = (obj or {}).get(part) if isinstance(obj, dict) else None
    return obj


def _matches(obj: dict, labels: str | None, fields: str | None) -> bool:
    have = obj["metadata"].get("labels") or {}
    for term in filter(None, (labels or "").split(",")):
        k, _, v = term.partition("=")
        if have.get(k) != v:
            return False
    for term in filter(None, (fields or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if (_path(obj, k) or "") == v:
                return False
        else:
            k, v = term.split("=", 1)
            if (_path(obj, k) or "") != v:
                return False
    return True


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) -> object
        self.events: list[tuple[str, str, str, str]] = []  # (object name, type, reason, message)
        self.writes: list[tuple[str, str, str]] = []  # (verb, kind, name), in order

    # --- the verbs of moe_operator.kube.Kube -------------------------------------------------
    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        o = self.objects.get((kind, namespace or "", name))
        return copy.deepcopy(o) if o is not None else None

    def list(self, kind: str, namespace: str | None = None, labels: str | None = None,
             fields: str | None = None) -> list[dict]:
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and (namespace is None or ns == namespace) and _matches(o, labels, fields)]

    def apply(self, obj: dict, force: bool = True) -> dict:
        self.writes.append(("apply", obj["kind"], obj["metadata"]["name"]))
        key = self._key(obj)
        old = self.objects.get(key)
        new = copy.deepcopy(obj)
        meta = new["metadata"]
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            if "status" in old and "status" not in new:
                new["status"] = old["status"]
        else:
            meta["uid"] = f"uid-{next(_uids)}"
        self.objects[key] = new
        return copy.deepcopy(new)

    def create(self, obj: dict) -> dict | None:
        key = self._key(obj)
        if key in self.objects:
            return None
        self.writes.append(("create", obj["kind"], obj["metadata"]["name"]))
        new = copy.deepcopy(obj)
        new["metadata"]["uid"] = f"uid-{next(_uids)}"
        new["metadata"].setdefault("generation", 1)
        new.setdefault("status", {})
        self.objects[key] = new
        return copy.deepcopy(new)

    def delete(self, kind: str, name: str, namespace: str | None = None, uid: str | None = None,
               grace_seconds: int | None = None) -> bool:
        key = (kind, namespace or "", name)
        o = self.objects.get(key)
        if o is None or (uid and o["metadata"]["uid"] != uid):
            return False
        self.writes.append(("delete", kind, name))
        del self.objects[key]
        return True

    def patch_status(self, kind: str, name: str, namespace: str, status: dict) -> dict:
        o = self.objects.get((kind, namespace, name))
        if o is None:
            raise KubeError(404, f"{kind} {name} not found", "NotFound")
        self.writes.append(("patch_status", kind, name))
        st = o.setdefault("status", {})
        for k, v in status.items():
            if v is None:
                st.pop(k, None)
            else:
                st[k] = copy.deepcopy(v)
        return copy.deepcopy(o)

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        self.events.append((involved["metadata"]["name"], type_, reason, message))

    # --- test helpers -----------------------------------------------------------------------
    @staticmethod
    def _key(obj: dict) -> tuple[str, str, str]:
        meta = obj["metadata"]
        return obj["kind"], meta.get("namespace") or "", meta["name"]

    def add_gpu_nodes(self, nodes: int, gpus: int = 8, prefix: str = "node") -> list[str]:
        """Ready GPU nodes like `moe cluster add-nodes` makes (devcluster.gpu_nodes)."""
        out = []
        for m in devcluster.gpu_nodes(nodes, gpus=gpus, racks=1, zones=1, prefix=prefix):
            m = copy.deepcopy(m)
            m.setdefault("status", {}).setdefault("conditions", [{"type": "Ready", "status": "True"}])
            self.create(m)
            out.append(m["metadata"]["name"])
        return out

    def add_deployment(self, obj: dict, namespace: str = "ns") -> dict:
        obj = copy.deepcopy(obj)
        obj["metadata"] = {**obj.get("metadata", {}), "namespace": namespace}
        return self.create(obj)

    def bind_all(self, namespace: str = "ns") -> None:
        """What the scheduler and kubelets would do: every pending rank pod runs, Ready, on its node
        (pods not pinned to a node, such as routers a test made, are left as they are)."""
        for (kind, ns, _), o in self.objects.items():
            pinned = (o.get("spec", {}).get("affinity") or {}).get("nodeAffinity")
            if kind != "Pod" or ns != namespace or pinned is None:
                continue
            node = pinned["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"][0]["matchFields"][0]["values"][0]
            o["spec"]["nodeName"] = node
            o["status"] = {"phase": "Running", "podIP": "127.0.0.1",
                           "conditions": [{"type": "Ready", "status": "True"}]}
