"""MoE / Operator: reconcile and rebalance activity of the operator (moe_operator.controller.metrics)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import common as cm

from .common import DEPLOY, RATE, dashboard, datasource_variable, q, query_variable, single, ts

UID = "moe-operator"
# Operator-wide series have no deployment label; `instance` tells the two replicas apart.
OP = "moe_operator"


def _q(metric: str, qv: float) -> str:
    return f"histogram_quantile({qv}, sum by (le) (rate({metric}_bucket[{RATE}])))"


def build() -> db.Dashboard:
    d = dashboard(UID, "MoE / Operator",
                  "What the moe-operator does: reconcile passes, errors, planner runs, re-plans and load-driven "
                  "rebalances. Two replicas run; only the holder of the `moe-operator` Lease reconciles.")
    d = (d.with_variable(datasource_variable())
         .with_variable(query_variable("namespace", "Namespace", f"{OP}_expert_map_generation"))
         .with_variable(query_variable("deployment", "MoEDeployment", f"{OP}_expert_map_generation",
                                       'namespace=~"$namespace"')))

    d = d.with_row(db.Row("Reconcile"))
    d = d.with_panel(single(
        "Reconciles/s", "Reconcile passes per second, all replicas.", "ops",
        q(f"sum(rate({OP}_reconciles_total[{RATE}]))")))
    d = d.with_panel(single(
        "Reconcile errors (range)", "Failed reconcile passes in the selected range.", "short",
        q(f"sum(increase({OP}_reconcile_errors_total[$__range]))", instant=True),
        steps=[(None, "green"), (1, "orange"), (10, "red")]))
    d = d.with_panel(single(
        "Re-plans (range)", "Plans replaced while running (node loss, unschedulable ranks, load).", "short",
        q(f"sum(increase({OP}_replans_total[$__range]))", instant=True)))
    d = d.with_panel(single(
        "Rebalances (range)", "Load-driven expert-map changes in the selected range.", "short",
        q(f'sum(increase({OP}_rebalances_total{{deployment=~"$deployment"}}[$__range]))', instant=True)))
    d = d.with_panel(ts(
        "Reconcile passes per replica",
        "Only the replica holding the `moe-operator` Lease reconciles; the other one stays at zero until "
        "it takes the Lease over.", "ops",
        q(f"sum by (instance) (rate({OP}_reconciles_total[{RATE}]))", "passes {{instance}}", "A"),
        q(f"sum by (instance) (rate({OP}_reconcile_errors_total[{RATE}]))", "errors {{instance}}", "B")))
    d = d.with_panel(ts(
        "Reconcile and plan duration", "One reconcile pass, and one run of the placement planner.", "s",
        q(_q(f"{OP}_reconcile_duration_seconds", 0.5), "reconcile p50", "A"),
        q(_q(f"{OP}_reconcile_duration_seconds", 0.99), "reconcile p99", "B"),
        q(_q(f"{OP}_plan_duration_seconds", 0.5), "plan p50", "C"),
        q(_q(f"{OP}_plan_duration_seconds", 0.99), "plan p99", "D")))

    d = d.with_row(db.Row("Re-plans and rebalances"))
    d = d.with_panel(ts(
        "Re-plans by reason", "Plans replaced while running, per reason.", "short",
        q(f"sum by (reason) (increase({OP}_replans_total[{RATE}]))", "{{reason}}"))
        .draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60))
    d = d.with_panel(ts(
        "Rebalances by deployment", "Load-driven expert-map changes.", "short",
        q(f'sum by (deployment) (increase({OP}_rebalances_total{{deployment=~"$deployment"}}[{RATE}]))',
          "{{deployment}}"))
        .draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60))
    d = d.with_panel(ts(
        "Imbalance the operator measured", "max/mean rank load per deployment, as the load balancer sees it, "
        "and the spec's imbalanceThreshold it acts on.",
        "x", q(f"{OP}_imbalance_ratio{{{DEPLOY}}}", "{{namespace}}/{{deployment}}"),
        q(f"{OP}_imbalance_threshold{{{DEPLOY}}}", "threshold {{namespace}}/{{deployment}}", "B"), min_zero=False))
    d = d.with_panel(ts(
        "Scaling decisions by action", "Expert-map changes from measured load: rebalance (same ranks), "
        "scale-out (extra GPUs), scale-in (back to expertParallelSize), restore (no load: resting map).", "short",
        q(f'sum by (action) (increase({OP}_scaling_decisions_total{{{DEPLOY}}}[{RATE}]))', "{{action}}"))
        .draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60))
    d = d.with_panel(ts(
        "Ranks per EP group", "Ranks in each group's expert map: expertParallelSize plus scale-out ranks.",
        "none", q(f"{OP}_group_ranks{{{DEPLOY}}}", "{{namespace}}/{{deployment}} g{{group}}")).decimals(0))
    d = d.with_panel(ts(
        "Expert-map generation published", "Generation of the plan ConfigMap per deployment.", "none",
        q(f"{OP}_expert_map_generation{{{DEPLOY}}}", "{{namespace}}/{{deployment}}")).decimals(0))
    return d
