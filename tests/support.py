"""Helpers shared by the tests (imported as `support`; `conftest` is ambiguous with two test folders)."""

from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _node_ready(core, name: str) -> bool:
    node = core.read_node(name)
    taints = node.spec.taints or []
    ready = any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))
    return ready and not any(t.key == "node.kubernetes.io/not-ready" for t in taints)


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A meta/v1 LabelSelector's verdict on `labels` (matchLabels and matchExpressions, ANDed), as
    the API server and network plugins match NetworkPolicy and Service selectors."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        have, values = e["key"] in labels, e.get("values") or []
        ok = {"In": have and labels.get(e["key"]) in values, "NotIn": not have or labels[e["key"]] not in values,
              "Exists": have, "DoesNotExist": not have}[e["operator"]]
        if not ok:
            return False
    return True


def wait_for(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class OperatorProcess:
    """`kopf run -m moe_operator.controller.main` as a real subprocess, watching one namespace."""

    def __init__(self, kubeconfig: str, namespace: str, log_path: Path, identity: str = "op-a",
                 metrics_port: int = 0, extra_env: dict[str, str] | None = None):
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.identity, self.metrics_port = identity, metrics_port
        self.extra_env = extra_env or {}
        self.proc = None

    def start(self) -> OperatorProcess:
        import subprocess
        import sys

        env = dict(os.environ, KUBECONFIG=self.kubeconfig, MOE_OPERATOR_METRICS_PORT=str(self.metrics_port),
                   MOE_OPERATOR_NAMESPACE=self.namespace, POD_NAME=self.identity,
                   MOE_LEASE_SECONDS="6", MOE_LEASE_RENEW_SECONDS="2", **self.extra_env)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "-m", "moe_operator.controller.main", "--standalone",
             "--namespace", self.namespace, "--log-format=plain"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a crashed or evicted operator pod."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if getattr(self, "log", None):
            self.log.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


class DictStore:
    """The TCPStore calls the worker's store code makes (set, get, check, delete_key), on a dict."""

    def __init__(self):
        self.kv: dict[str, bytes] = {}

    def set(self, key, value):
        self.kv[key] = value if isinstance(value, bytes) else value.encode()

    def get(self, key):
        return self.kv[key]

    def check(self, keys):
        return all(k in self.kv for k in keys)

    def delete_key(self, key):
        return self.kv.pop(key, None) is not None
