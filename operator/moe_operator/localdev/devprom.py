"""A real Prometheus (the Debian package) for the local cluster: tests, the demo, the dashboards.

In a real cluster a PodMonitor (see the chart) makes Prometheus scrape every rank pod with the
labels `namespace` and `deployment`. Here the same labels come from a file_sd target list that
`write_targets` builds from the rank pods' IPs, which the local runner serves on loopback.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from moe_operator.controller.kube import Kube
from moe_operator.controller.resources import L_DEPLOYMENT, L_ROUTER

CONFIG = """\
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: moe-ranks
    honor_labels: true
    file_sd_configs:
      - files: ["{targets}"]
        refresh_interval: 1s
"""


class PrometheusError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, workdir: Path, interval: str = "1s", port: int | None = None):
        self.dir = Path(workdir)
        self.port = port or _free_port()
        self.interval = interval
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def targets_file(self) -> Path:
        return self.dir / "targets.json"

    def start(self, timeout: float = 60) -> Prometheus:
        exe = shutil.which("prometheus")
        if exe is None:
            raise PrometheusError("prometheus not found: run hack/system-deps.sh (Debian package 'prometheus')")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.targets_file.write_text("[]")
        (self.dir / "prometheus.yml").write_text(CONFIG.format(interval=self.interval, targets=self.targets_file))
        self.proc = subprocess.Popen(
            [exe, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
             "--storage.tsdb.retention.time=1d"],
            stdout=open(self.dir / "prometheus.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited ({self.proc.returncode}); see {self.dir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise PrometheusError(f"prometheus not ready after {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def write_targets(self, kube: Kube, namespace: str, deployment: str, metrics_port: int,
                      extra: list[str] | None = None) -> int:
        """file_sd targets for every running rank pod and router pod of a deployment, labelled as
        the chart's PodMonitors label them (plus `extra` host:port targets without labels, e.g. the
        operator, whose metrics carry their own); returns the rank count."""
        groups: list[dict] = [{"targets": list(extra), "labels": {}}] if extra else []
        ranks = 0
        for selector in (f"{L_DEPLOYMENT}={deployment}", f"{L_ROUTER}={deployment}"):
            for p in kube.list("Pod", namespace, labels=selector):
                ip = (p.get("status") or {}).get("podIP")
                if not ip or (p.get("status") or {}).get("phase") != "Running":
                    continue
                ranks += selector.startswith(L_DEPLOYMENT)
                groups.append({"targets": [f"{ip}:{metrics_port}"],
                               "labels": {"namespace": namespace, "deployment": deployment,
                                          "pod": p["metadata"]["name"], "node": (p.get("spec") or {}).get("nodeName", "")}})
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.targets_file)
        return ranks

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        params = {"query": promql}
        if at is not None:
            params["time"] = str(at)
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise PrometheusError(f"query {promql!r}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
        if doc.get("status") != "success":
            raise PrometheusError(f"query {promql!r}: {doc.get('error')}")
        return doc["data"]["result"]

    def up_targets(self) -> int:
        return sum(1 for r in self.query('up{job="moe-ranks"}') if r["value"][1] == "1")
