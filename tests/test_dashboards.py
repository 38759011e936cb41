"""The Grafana dashboards: built from code, committed as the chart ships them, and every query sound.

The serving panels' numbers are checked here against a real Prometheus scraping the worker's and the
router's own metric classes; the query test against a running demo lives in test_e2e. Both use
`dashboards.promql.committed_queries()` like the other tests here do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from support import REPO, wait_for

sys.path.insert(0, str(REPO))  # dashboards/ is a top-level folder of the repository, not an installed package
import dashboards  # noqa: E402
from dashboards import promql  # noqa: E402

FILES = sorted((REPO / "charts" / "moe-operator" / "dashboards").glob("*.json"))


def _exported_series() -> dict[str, str]:
    """Series name -> metric type, for every metric the operator and the workers define in code."""
    from prometheus_client.metrics import MetricWrapperBase

    from moe_operator.controller import metrics as op_metrics
    from moe_worker.metrics import WorkerMetrics
    from moe_worker.router import RouterMetrics

    families = list(WorkerMetrics().registry.collect()) + list(RouterMetrics().registry.collect())
    for obj in vars(op_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            families.extend(obj.describe())
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["", "_sum", "_count"], "info": ["_info"]}
    out = {}
    for f in families:
        for s in suffixes[f.type]:
            out[f.name + s] = f.type
    return out


def test_the_committed_json_is_a_fresh_build():
    assert [p.name for p in FILES] == ["moe-experts.json", "moe-operator.json", "moe-serving.json"]
    assert dashboards.stale() == [], "charts/moe-operator/dashboards is stale: run `python -m dashboards`"


def test_the_check_command_fails_on_a_hand_edited_file(tmp_path):
    for p in FILES:
        (tmp_path / p.name).write_text(p.read_text())
    assert dashboards.stale(tmp_path) == []
    doc = json.loads((tmp_path / "moe-serving.json").read_text())
    doc["title"] = "edited by hand"
    (tmp_path / "moe-serving.json").write_text(json.dumps(doc))
    (tmp_path / "extra.json").write_text("{}")
    assert dashboards.stale(tmp_path) == ["extra.json", "moe-serving.json"]


def test_every_metric_a_query_names_is_one_the_code_exports():
    exported = _exported_series()
    assert {"moe_expert_tokens_total", "moe_dispatch_seconds_bucket", "moe_operator_reconciles_total",
            "moe_router_requests_total", "moe_router_front_ready"} <= set(exported)
    queries = promql.committed_queries()
    assert len(queries) > 50
    unknown = {}
    for q in queries:
        names = promql.metric_names(q.expr)
        if not names:
            assert q.expr.startswith("vector("), f"{q} names no metric"
        for n in names - set(exported):
            unknown.setdefault(n, []).append(f"{q.dashboard} / {q.panel}")
        # Histogram quantiles need the buckets, rates need counters: catch a gauge rated or a bare histogram.
        for n in names:
            if f"rate({n}" in q.expr.replace(" ", "") and exported.get(n) == "gauge":
                raise AssertionError(f"rate() of gauge {n} in {q}")
    assert not unknown, f"metrics the code does not define: {unknown}"


def test_the_dashboards_cover_what_the_issue_asks_for():
    used = set()
    for q in promql.committed_queries():
        used |= promql.metric_names(q.expr)
    # Everything a user watches: load per expert, imbalance, replicas and map generation, all-to-all
    # latency, throughput, TTFT, queue depth, operator activity.
    needed = {"moe_expert_tokens_total", "moe_rank_tokens_total", "moe_operator_imbalance_ratio",
              "moe_expert_map_generation", "moe_operator_expert_map_generation", "moe_dispatch_seconds_bucket",
              "moe_combine_seconds_bucket", "moe_output_tokens_total", "moe_input_tokens_total",
              "moe_time_to_first_token_seconds_bucket", "moe_queue_depth_requests",
              "moe_operator_reconciles_total", "moe_operator_rebalances_total", "moe_operator_replans_total",
              "moe_inter_token_seconds_bucket", "moe_queue_seconds_bucket", "moe_requests_total",
              "moe_router_requests_total", "moe_router_retries_total", "moe_router_front_ready",
              "moe_router_in_flight", "moe_router_request_seconds_bucket"}
    assert needed <= used, needed - used
    panels = {(f.name, p["title"]): p for f in FILES for p in promql._panels(json.loads(f.read_text()))}
    matrix = panels[("moe-experts.json", "Load share by layer x expert (selected range)")]
    assert matrix["transformations"][0]["options"] | {"rowField": "layer", "columnField": "expert"} \
        == matrix["transformations"][0]["options"]
    imbalance = panels[("moe-experts.json", "Load imbalance vs threshold")]
    assert any(t["expr"] == "vector($threshold)" for t in imbalance["targets"])
    dispatch = panels[("moe-serving.json", "Dispatch all-to-all latency per rank")]
    assert [t["expr"].split(",")[0] for t in dispatch["targets"]] == ["histogram_quantile(0.5", "histogram_quantile(0.99"]
    assert all("rank, le)" in t["expr"] for t in dispatch["targets"])
    # p50 and p99 of TTFT, inter-token latency and queue time per EP group.
    for title, metric in SERVING_QUANTILES.items():
        targets = panels[("moe-serving.json", title)]["targets"]
        assert [t["expr"].split(",")[0] for t in targets] == ["histogram_quantile(0.5", "histogram_quantile(0.99"]
        assert all(f"{metric}_bucket{{" in t["expr"] and "group, le)" in t["expr"] for t in targets), title
    # Router series have no `group` label: a router query that matched on it would go blank as soon as
    # someone picks one EP group.
    router = [q for q in promql.committed_queries() if any(n.startswith("moe_router_") for n in promql.metric_names(q.expr))]
    assert {q.panel for q in router} == set(ROUTER_PANELS)
    assert all("$group" not in q.expr and 'deployment=~"$deployment"' in q.expr for q in router), router


SERVING_QUANTILES = {"Time to first token": "moe_time_to_first_token_seconds",
                     "Inter-token latency": "moe_inter_token_seconds", "Queue time": "moe_queue_seconds"}
ROUTER_PANELS = ["Router requests/s by outcome", "Router retries/s by reason", "Fronts ready per router",
                 "Router request duration", "Router requests in flight per front"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path):
    doc = json.loads(path.read_text())
    assert doc["uid"] == path.stem and doc["title"].startswith("MoE / ")
    assert "moe-operator" in doc["tags"]
    ids, refs = [], []
    for p in promql._panels(doc):
        ids.append(p["id"])
        x, w = p["gridPos"]["x"], p["gridPos"]["w"]
        assert 0 <= x and x + w <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description") is not None, p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    assert len(ids) == len(set(ids))
    names = [v["name"] for v in doc["templating"]["list"]]
    assert names[0] == "datasource" and len(names) == len(set(names))
    # Every $variable a query uses is defined (or built in): substitution raises otherwise.
    for q in promql.dashboard_queries(doc, path.name):
        expr = q.promql()
        assert "$" not in expr, expr


def test_query_extraction_finds_every_target_and_substitutes_defaults():
    doc = json.loads((REPO / "charts" / "moe-operator" / "dashboards" / "moe-serving.json").read_text())
    targets = sum(len(p.get("targets") or []) for p in promql._panels(doc))
    queries = promql.dashboard_queries(doc, "moe-serving.json")
    assert len([q for q in queries if not q.panel.startswith("variable:")]) == targets
    q = next(q for q in queries if q.panel == "Output tokens/s")
    assert q.promql() == ('sum(rate(moe_output_tokens_total{namespace=~".*", deployment=~".*", '
                          'group=~".*"}[2m]))')
    assert q.promql({"deployment": "tiny-ep16", "__rate_interval": "1m"}) == (
        'sum(rate(moe_output_tokens_total{namespace=~".*", deployment=~"tiny-ep16", group=~".*"}[1m]))')
    with pytest.raises(KeyError, match="nope"):
        promql.substitute("rate(x[$nope])", {})


def test_metric_name_extraction():
    e = ('histogram_quantile(0.99, sum by (rank, le) (rate(moe_dispatch_seconds_bucket{rank=~"1|2", '
         'a="}"}[$__rate_interval]))) / on (group) group_left(layer) max without (x) (moe_b) > bool 1e-3 '
         'or vector(0) unless count(moe_c offset 5m) and topk(10, moe_d:ratio[5m:1m])')
    assert promql.metric_names(e) == {"moe_dispatch_seconds_bucket", "moe_b", "moe_c", "moe_d:ratio"}
    assert promql.metric_names("sum(rate(moe_typo_total[5m]))") == {"moe_typo_total"}


def _promtool_check(exprs: list[str], tmp_path) -> subprocess.CompletedProcess:
    rules = {"groups": [{"name": "dashboards", "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_every_query_parses_as_promql(tmp_path):
    queries = promql.committed_queries()
    out = _promtool_check([q.promql() for q in queries], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(queries)} rules found" in out.stdout
    bad = _promtool_check(["sum by (rank (rate(moe_rank_tokens_total[5m]))"], tmp_path)
    assert bad.returncode != 0  # the check can fail


# --- the serving panels against a real Prometheus ---------------------------------------------------


class _Exporter:
    """Serves one prometheus_client registry on loopback, as a rank's or a router's metrics port does."""

    def __init__(self, registry):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.target = f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _quantile_in_bucket(lo: float, hi: float, qv: float) -> float:
    """histogram_quantile when every observation fell in bucket (lo, hi]: linear within the bucket."""
    return lo + (hi - lo) * qv


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus (Debian package) not installed")
def test_serving_panels_show_what_the_worker_and_the_router_export(tmp_path):
    """Series made by WorkerMetrics and RouterMetrics themselves, scraped with the PodMonitors' labels
    (`namespace`, `deployment`); the committed panels' queries give back the numbers put in."""
    from moe_operator.localdev.devprom import Prometheus
    from moe_worker.metrics import WorkerMetrics
    from moe_worker.router import RouterMetrics

    rank, router, other = WorkerMetrics(rank=0, group=0), RouterMetrics(), WorkerMetrics(rank=0, group=0)
    lbl = rank.lbl()
    outcomes = {"ok": 30, "cancelled": 3, "overloaded": 6, "timeout": 1}
    routed = {("http", "ok"): 8, ("http", "unavailable"): 2, ("grpc", "cancelled"): 1, ("grpc", "broken"): 1}
    retries = {"connect": 1, "broken": 2, "unavailable": 4}
    fronts = {"10.0.0.1": (1, 2), "10.0.0.2": (1, 1), "10.0.0.3": (0, 0)}  # host: (ready, in flight)
    # Every series exists (at zero) before the first scrape, so rate() sees the increase that follows.
    for m in (rank, other):
        for h in (m.ttft_seconds, m.itl_seconds, m.queue_seconds):
            h.labels(**lbl)
        for o in outcomes:
            m.requests.labels(**lbl, outcome=o)
    for k in routed:
        router.requests.labels(*k)
        router.seconds.labels(k[0])
    for reason in retries:
        router.retries.labels("http", reason)
    for host, (ready, n) in fronts.items():
        router.front_ready.labels(host).set(ready)
        router.in_flight.labels(host).set(n)

    exporters = {"rank": _Exporter(rank.registry), "router": _Exporter(router.registry),
                 "other": _Exporter(other.registry)}
    labels = {"rank": "d", "router": "d", "other": "other"}
    prom = Prometheus(tmp_path / "prom").start()
    try:
        prom.targets_file.write_text(json.dumps([
            {"targets": [e.target], "labels": {"namespace": "ns", "deployment": labels[k]}}
            for k, e in exporters.items()]))

        def scraped(counts: dict[str, float]):
            def check():
                got = {q: prom.query(q) for q in counts}
                return all(len(r) == 1 and float(r[0]["value"][1]) == counts[q] for q, r in got.items())
            return check

        before = {'moe_queue_seconds_count{deployment="d"}': 0, 'moe_queue_seconds_count{deployment="other"}': 0,
                  'moe_router_retries_total{reason="unavailable"}': 0}
        wait_for(scraped(before), 60, "the zero series scraped from the rank, the router and the other deployment")

        for m, scale in ((rank, 1), (other, 100)):
            for _ in range(10):
                # each in one bucket: TTFT (0.1, 0.25], ITL (0.01, 0.025], queue (0.5, 1]; the other
                # deployment's in (10, 30] and (2.5, 5]: wrong numbers if the deployment matcher is lost
                m.ttft_seconds.labels(**lbl).observe(0.2 * scale)
                m.itl_seconds.labels(**lbl).observe(0.02 * scale)
                m.queue_seconds.labels(**lbl).observe(0.7 * scale)
            for o, n in outcomes.items():
                m.requests.labels(**lbl, outcome=o).inc(n * scale)
        for (proto, outcome), n in routed.items():
            router.requests.labels(proto, outcome).inc(n)
            for _ in range(n):
                router.seconds.labels(proto).observe(2.0)  # (1, 2.5]
        for reason, n in retries.items():
            router.retries.labels("http", reason).inc(n)

        done = time.time()

        def scraped_since() -> bool:  # a scrape that began after the last observation has them all
            starts = [float(r["value"][1]) for r in prom.query('timestamp(up{job="moe-ranks"})')]
            return len(starts) == 3 and min(starts) > done and prom.up_targets() == 3

        wait_for(scraped_since, 60, "a scrape of every target after the observations")
        after = {'moe_queue_seconds_count{deployment="d"}': 10, 'moe_queue_seconds_count{deployment="other"}': 10,
                 'moe_router_retries_total{reason="unavailable"}': 4}
        assert scraped(after)()

        panels = {(q.panel, q.ref): q for q in promql.committed_queries() if q.dashboard == "moe-serving.json"}
        at = time.time()  # one evaluation time: rate() extrapolates to it, and two rates are compared

        def run(panel: str, ref: str = "A", by: tuple[str, ...] = (), **variables: str) -> dict:
            query = panels[(panel, ref)].promql({"namespace": "ns", "deployment": "d", **variables})
            return {tuple(r["metric"].get(k, "") for k in by): float(r["value"][1]) for r in prom.query(query, at)}

        # TTFT, inter-token latency and queue time: p50 and p99 per group, from this deployment's buckets only.
        buckets = {"Time to first token": (0.1, 0.25), "Inter-token latency": (0.01, 0.025), "Queue time": (0.5, 1.0)}
        for title, (lo, hi) in buckets.items():
            for ref, qv in (("A", 0.5), ("B", 0.99)):
                got = run(title, ref, ("deployment", "group"))
                assert got == {("d", "0"): pytest.approx(_quantile_in_bucket(lo, hi, qv))}, (title, ref, got)
            assert run(title, group="7") == {}  # the group variable applies
        p99 = run("Time to first token p99")
        assert p99 == {(): pytest.approx(_quantile_in_bucket(0.1, 0.25, 0.99))}

        # Cancelled and rejected (overloaded, 429) per second: 3 and 6 in the same scrapes, so 1:2.
        cancelled = run("Cancelled and rejected requests/s", "A", ("group",))
        rejected = run("Cancelled and rejected requests/s", "B", ("group",))
        assert set(cancelled) == set(rejected) == {("0",)}
        assert cancelled[("0",)] > 0 and rejected[("0",)] == pytest.approx(2 * cancelled[("0",)])
        by_outcome = run("Requests/s by outcome", by=("outcome",))
        assert set(by_outcome) == {(o,) for o in outcomes}
        assert by_outcome[("ok",)] == pytest.approx(10 * by_outcome[("cancelled",)])

        # The router row, also with one EP group picked: router series have no group label.
        for group in (".*", "7"):
            reqs = run("Router requests/s by outcome", by=("protocol", "outcome"), group=group)
            assert set(reqs) == set(routed)
            unit = reqs[("grpc", "cancelled")]
            assert unit > 0 and {k: v / unit for k, v in reqs.items()} == pytest.approx(routed)
            tries = run("Router retries/s by reason", by=("reason",), group=group)
            assert {k: v / tries[("connect",)] for k, v in tries.items()} == pytest.approx(
                {(r,): n for r, n in retries.items()})
            ready = run("Fronts ready per router", "A", ("deployment", "instance"), group=group)
            assert ready == {("d", exporters["router"].target): 2}
            assert run("Fronts ready per router", "B", ("deployment",), group=group) == {("d",): 3}
            assert run("Router requests in flight per front", by=("front",), group=group) == {
                (h,): n for h, (_, n) in fronts.items()}
            for ref, qv in (("A", 0.5), ("B", 0.99)):
                assert run("Router request duration", ref, ("protocol",), group=group) == {
                    ("http",): pytest.approx(_quantile_in_bucket(1, 2.5, qv)),
                    ("grpc",): pytest.approx(_quantile_in_bucket(1, 2.5, qv))}
        assert run("Router requests/s by outcome", deployment="other") == {}

        # Every query of every dashboard runs here without an error (prom.query raises on one); many
        # find no series (no operator, no expert counts), which is fine.
        for q in promql.committed_queries():
            prom.query(q.promql({"namespace": "ns"}))
    finally:
        prom.stop()
        for e in exporters.values():
            e.close()
