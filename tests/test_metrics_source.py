"""The load balancer's Prometheus source: measured when Prometheus answers, a condition and an Event
(and no action) when it goes away, measured again when it is back (issue 9)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from support import REPO, wait_for

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "serving.moe.dev", "v1alpha1", "moedeployments"


class FakeRanks:
    """Serves moe_expert_tokens_total like 16 ranks would (one series per rank, growing)."""

    def __init__(self):
        self.n = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.n += 10
                lines = [f'moe_expert_tokens_total{{rank="{r}",group="0",layer="{li}",expert="{r % 12}",'
                         f'source="node"}} {outer.n * (1 + r)}' for r in range(16) for li in range(3)]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()


def test_prometheus_down_means_no_action_and_says_why(api_client, core, namespace, gpu_pool, operator, tmp_path):
    from kubernetes import client

    from moe_operator.localdev.devprom import Prometheus

    custom = client.CustomObjectsApi(api_client)
    fake = FakeRanks()
    prom = Prometheus(tmp_path / "prom").start()
    try:
        prom.targets_file.write_text(json.dumps([{"targets": [fake.target],
                                                  "labels": {"namespace": namespace, "deployment": "ms"}}]))
        pool, _ = gpu_pool(nodes=2, gpus=8)
        obj = yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text())
        obj["metadata"] = {"name": "ms"}
        obj["spec"]["placement"]["nodeSelector"] = {"moe.dev/pool": pool}
        obj["spec"]["loadBalancing"].update({"prometheusUrl": prom.url, "intervalSeconds": 1, "windowSeconds": 5,
                                             "cooldownSeconds": 600})
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)

        def metrics_condition(want: str):
            def check():
                st = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "ms").get("status") or {}
                c = next((c for c in st.get("conditions") or [] if c["type"] == "MetricsAvailable"), None)
                return (c, st) if c and c["status"] == want else None
            return check

        cond, st = wait_for(metrics_condition("True"), 90, "MetricsAvailable=True from Prometheus")
        assert "Prometheus" in cond["message"]
        gen = st["expertMapGeneration"]

        port = prom.port
        prom.stop()
        cond, st = wait_for(metrics_condition("False"), 60, "MetricsAvailable=False with Prometheus down")
        assert "unreachable" in cond["message"] and "no rebalancing" in cond["message"], cond
        assert st["expertMapGeneration"] == gen  # no action without measurements
        events = core.list_namespaced_event(namespace).items
        assert any(e.reason == "MetricsUnavailable" and e.involved_object.name == "ms" for e in events)

        prom = Prometheus(tmp_path / "prom", port=port).start()  # back, same address and data
        wait_for(metrics_condition("True"), 90, "MetricsAvailable=True again")
    finally:
        prom.stop()
        fake.close()
