"""Shared pieces of the dashboards: the datasource, template variables, selectors, panel helpers.

Label conventions the queries rely on (see charts/moe-operator/templates/podmonitor.yaml):
- worker series carry `rank` and `group` from the worker itself, and `namespace` and `deployment`
  (the MoEDeployment's name) from the PodMonitor's relabelling;
- router series (pods `NAME-router`) carry `namespace` and `deployment` from their own PodMonitor and
  no `group` or `rank`: router queries match DEPLOY, never WORKER;
- operator series carry their own `namespace` and `deployment` labels where they have them (the
  ServiceMonitor keeps them with honorLabels).
Variables match with `=~` and "All" means `.*`, which also matches a series without that label, so
the same queries work against a Prometheus that scrapes workers without the relabelling (the demo's).
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["moe-operator", "generated"]

# Label matchers for worker series and for the operator's per-deployment series.
WORKER = 'namespace=~"$namespace", deployment=~"$deployment", group=~"$group"'
DEPLOY = 'namespace=~"$namespace", deployment=~"$deployment"'

# One EP group of one deployment: every per-group aggregation keeps these labels apart.
G = "namespace, deployment, group"

# Grafana range vector for rates: at least four scrape intervals.
RATE = "$__rate_interval"


def datasource_variable() -> db.DatasourceVariable:
    return (db.DatasourceVariable("datasource").label("Data source").type("prometheus")
            .current(dm.VariableOption(text="default", value="default", selected=True)))


def query_variable(name: str, label: str, metric: str, selector: str = "") -> db.QueryVariable:
    """A multi-select label variable over `metric`'s `name` label, "All" = `.*`."""
    series = f"{metric}{{{selector}}}" if selector else metric
    return (db.QueryVariable(name).label(label).datasource(DATASOURCE)
            .query(f"label_values({series}, {name})")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.NATURAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(dm.VariableOption(text="All", value="$__all", selected=True)))


def worker_variables(metric: str = "moe_group_ready") -> list[db.QueryVariable | db.DatasourceVariable]:
    return [
        datasource_variable(),
        query_variable("namespace", "Namespace", metric),
        query_variable("deployment", "MoEDeployment", metric, 'namespace=~"$namespace"'),
        query_variable("group", "EP group", metric, DEPLOY),
    ]


def dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    return (db.Dashboard(title).uid(uid).description(description).tags(TAGS)
            .refresh("30s").time("now-1h", "now").timezone("browser")
            .tooltip(dm.DashboardCursorSync.CROSSHAIR).editable())


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False,
      table: bool = False) -> prometheus.Dataquery:
    out = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        out = out.legend_format(legend)
    if instant:
        out = out.instant()
    if table:
        out = out.format(pm.PromQueryFormat.TABLE)
    return out


def quantile(qv: float, metric: str, by: str, selector: str = WORKER) -> str:
    """histogram_quantile over a histogram's buckets, aggregated `by` (plus `le`)."""
    return (f"histogram_quantile({qv}, sum by ({by}, le) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))")


def ts(title: str, description: str, unit: str, *targets: prometheus.Dataquery, w: int = 12, h: int = 8,
       min_zero: bool = True) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).description(description).unit(unit).span(w).height(h)
         .datasource(DATASOURCE).line_width(1).fill_opacity(5)
         .legend(_legend()).tooltip(_tooltip()))
    if min_zero:
        p = p.min(0)
    for t in targets:
        p = p.with_target(t)
    return p


def single(title: str, description: str, unit: str, target: prometheus.Dataquery, w: int = 6, h: int = 4,
           steps: list[tuple[float | None, str]] | None = None) -> stat.Panel:
    p = (stat.Panel().title(title).description(description).unit(unit).span(w).height(h)
         .datasource(DATASOURCE).graph_mode(cm.BigValueGraphMode.AREA).with_target(target))
    if steps:
        p = p.thresholds(thresholds(steps)).color_mode(cm.BigValueColorMode.BACKGROUND)
    return p


def thresholds(steps: list[tuple[float | None, str]]) -> db.ThresholdsConfig:
    return (db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=v, color=c) for v, c in steps]))


def _legend() -> cb.VizLegendOptions:
    return (cb.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.RIGHT).calcs(["mean", "max", "lastNotNull"]))


def _tooltip() -> cb.VizTooltipOptions:
    return cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)
