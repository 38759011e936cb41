"""The Grafana dashboards: built from code, committed as the chart ships them, and every query sound.

The query test against a real Prometheus scraping a running demo lives elsewhere; it uses
`dashboards.promql.committed_queries()` like the tests here do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from support import REPO

sys.path.insert(0, str(REPO))  # dashboards/ is a top-level folder of the repository, not an installed package
import dashboards  # noqa: E402
from dashboards import promql  # noqa: E402

FILES = sorted((REPO / "charts" / "moe-operator" / "dashboards").glob("*.json"))


def _exported_series() -> dict[str, str]:
    """Series name -> metric type, for every metric the operator and the workers define in code."""
    from prometheus_client.metrics import MetricWrapperBase

    from moe_operator.controller import metrics as op_metrics
    from moe_worker.metrics import WorkerMetrics

    families = list(WorkerMetrics().registry.collect())
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
    assert {"moe_expert_tokens_total", "moe_dispatch_seconds_bucket", "moe_operator_reconciles_total"} <= set(exported)
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
              "moe_operator_reconciles_total", "moe_operator_rebalances_total", "moe_operator_replans_total"}
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
