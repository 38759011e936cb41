"""The operator's own Prometheus metrics, and the HTTP server that serves them (`serve`): /metrics
and /readyz, the operator pod's readiness probe."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

RECONCILES = Counter("moe_operator_reconciles_total", "Reconcile passes run.")
RECONCILE_ERRORS = Counter("moe_operator_reconcile_errors_total", "Reconcile passes that failed.")
RECONCILE_SECONDS = Histogram("moe_operator_reconcile_duration_seconds", "Duration of one reconcile pass.",
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PLAN_SECONDS = Histogram("moe_operator_plan_duration_seconds", "Placement planner run time.",
                         buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
REPLANS = Counter("moe_operator_replans_total", "Plans replaced while running, by reason.", ["reason"])
REBALANCES = Counter("moe_operator_rebalances_total", "Load-driven expert-map changes.", ["deployment"])
IMBALANCE = Gauge("moe_operator_imbalance_ratio", "Measured max/mean rank load per deployment.",
                  ["namespace", "deployment"])
EXPERT_MAP_GENERATION = Gauge("moe_operator_expert_map_generation", "Expert-map generation published.",
                              ["namespace", "deployment"])
IMBALANCE_THRESHOLD = Gauge("moe_operator_imbalance_threshold", "The spec's loadBalancing.imbalanceThreshold.",
                            ["namespace", "deployment"])
RANKS = Gauge("moe_operator_group_ranks", "Ranks in the EP group's current expert map (spec size + scale-out).",
              ["namespace", "deployment", "group"])
DECISIONS = Counter("moe_operator_scaling_decisions_total",
                    "Load-driven expert-map changes by action (rebalance, scale-out, scale-in, restore).",
                    ["namespace", "deployment", "action"])


# Every series labelled with one deployment: (metric, its label names, the labels that name the deployment).
_PER_DEPLOYMENT = (
    (IMBALANCE, ("namespace", "deployment"), lambda ns, name: {"namespace": ns, "deployment": name}),
    (EXPERT_MAP_GENERATION, ("namespace", "deployment"), lambda ns, name: {"namespace": ns, "deployment": name}),
    (IMBALANCE_THRESHOLD, ("namespace", "deployment"), lambda ns, name: {"namespace": ns, "deployment": name}),
    (RANKS, ("namespace", "deployment", "group"), lambda ns, name: {"namespace": ns, "deployment": name}),
    (DECISIONS, ("namespace", "deployment", "action"), lambda ns, name: {"namespace": ns, "deployment": name}),
    (REBALANCES, ("deployment",), lambda ns, name: {"deployment": f"{ns}/{name}"}),
)


def forget_deployment(namespace: str, name: str) -> None:
    """Remove every labelled series of one deployment (it was deleted): a stale imbalance series
    would keep alerts firing, and one re-created under the same name must start from nothing."""
    for metric, label_names, match in _PER_DEPLOYMENT:
        want = match(namespace, name)
        series = {tuple(sample.labels.get(k) for k in label_names)
                  for family in metric.collect() for sample in family.samples
                  if all(sample.labels.get(k) == v for k, v in want.items())}
        for values in series:
            if None not in values:
                metric.remove(*values)


def serve(addr: str, port: int, ready: Callable[[], str | None]) -> ThreadingHTTPServer:
    """Serve /metrics (this process's registry) and /readyz on `addr:port` from a daemon thread.

    /readyz answers 200 when `ready()` returns None and 503 with its words otherwise. Liveness is
    kopf's own /healthz on another port: a replica that cannot reach the API server is not ready
    (it could neither lead nor take over), but restarting it would not help.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                code, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
            elif path == "/readyz":
                why = ready()
                code, ctype, body = (200, "text/plain", b"ok\n") if why is None else (503, "text/plain", f"{why}\n".encode())
            else:
                code, ctype, body = 404, "text/plain", b"not found: /metrics and /readyz only\n"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer((addr, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="moe-operator-metrics", daemon=True).start()
    return httpd
