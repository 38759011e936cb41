"""MoE / Experts: where routed tokens go, how uneven that is, and what the operator did about it."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, table
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm

from .common import (
    DATASOURCE,
    DEPLOY,
    RATE,
    WORKER,
    G,
    dashboard,
    q,
    query_variable,
    single,
    ts,
    worker_variables,
)

UID = "moe-experts"

# Routed (token, expert) pairs per logical expert, summed over its replicas.
_EXPERT = 'layer=~"$layer"'


def _expert_rate(window: str) -> str:
    return (f"sum by ({G}, layer, expert) "
            f"(rate(moe_expert_tokens_total{{{WORKER}, {_EXPERT}}}[{window}]))")


def load_share(window: str) -> str:
    """Each logical expert's load over its layer's mean expert load: 1 = even, 2 = twice the mean."""
    e = _expert_rate(window)
    return f"{e}\n/ on ({G}, layer) group_left\navg by ({G}, layer) ({e})"


def _rank_rate(by: str) -> str:
    return (f"sum by ({G}, {by}) "
            f"(rate(moe_rank_tokens_total{{{WORKER}}}[{RATE}]))")


def _max_over_mean(inner: str, keep: str) -> str:
    return f"max by ({keep}) ({inner})\n/\navg by ({keep}) ({inner})"


def imbalance_worst_layer() -> str:
    """Max over MoE layers of (busiest rank / mean rank) in that layer: the all-to-all waits for the busiest."""
    return f"max by ({G}) (\n{_max_over_mean(_rank_rate('layer, rank'), G + ', layer')}\n)"


def imbalance_total() -> str:
    """Busiest rank / mean rank, tokens summed over all MoE layers."""
    return _max_over_mean(_rank_rate("rank"), G)


def _copies(window: str) -> str:
    """One series per (expert, rank) that computed tokens for that expert in the window."""
    return (f"sum by ({G}, layer, expert, rank) "
            f"(increase(moe_expert_tokens_total{{{WORKER}, {_EXPERT}}}[{window}])) > 0")


def build() -> db.Dashboard:
    d = dashboard(UID, "MoE / Experts",
                  "Per-expert load (layer x expert), load imbalance against the rebalance threshold, "
                  "replicas per expert and the expert-map generation. Load is routed (token, expert) "
                  "pairs counted by the ranks that computed them (moe_expert_tokens_total).")
    for v in worker_variables("moe_rank_tokens_total"):
        d = d.with_variable(v)
    d = (d.with_variable(query_variable("layer", "MoE layer", "moe_rank_tokens_total", WORKER))
         .with_variable(db.TextBoxVariable("threshold").label("Imbalance threshold").default_value("1.3")
                        .description("spec.loadBalancing.imbalanceThreshold of the deployment (default 1.3)")))
    d = d.annotation(db.AnnotationQuery().name("Expert-map changes").datasource(DATASOURCE).enable(True)
                     .icon_color("orange")
                     .expr(f"changes(moe_operator_expert_map_generation{{{DEPLOY}}}[2m]) > 0"))

    d = d.with_row(db.Row("Load"))
    d = d.with_panel(
        table.Panel().title("Load share by layer x expert (selected range)").span(24).height(10)
        .description("Each cell: the expert's routed tokens over the mean of its layer in the selected time "
                     "range (1 = even). Rows are MoE layers, columns logical experts; replicas are summed. "
                     "Red cells are the experts the load balancer replicates first.")
        .datasource(DATASOURCE)
        .with_target(q(load_share("$__range"), instant=True, table=True))
        .with_transformation(dm.DataTransformerConfig(id_val="groupingToMatrix", options={
            "columnField": "expert", "rowField": "layer", "valueField": "Value", "emptyValue": "null"}))
        .cell_options(cm.TableColoredBackgroundCellOptions(mode=cm.TableCellBackgroundDisplayMode.GRADIENT))
        .decimals(2).min(0).max(2)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.CONTINUOUS_GR_YL_RD))
    )
    d = d.with_panel(
        heatmap.Panel().title("Expert load share over time").span(16).height(10)
        .description("One row per (layer, expert), coloured by its share of the layer's mean load "
                     "(1 = even). Narrow the `MoE layer` variable on large models.")
        .datasource(DATASOURCE)
        .with_target(q(load_share(RATE), legend="L{{layer}} E{{expert}}"))
        .calculate(False)
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("RdYlGn").reverse(True)
               .scale(hm.HeatmapColorScale.LINEAR).min(0).max(2).steps(64))
        .rows_frame(heatmap.RowsHeatmapOptions().layout(cm.HeatmapCellLayout.AUTO).value("load share"))
        .filter_values(heatmap.FilterValueRange().le(-1))  # show idle experts (0) too, not only hot ones
        .y_axis(heatmap.YAxisConfig().axis_label("layer, expert"))
        .mode(cm.TooltipDisplayMode.SINGLE).show_legend()
        .cell_gap(1)
    )
    d = d.with_panel(
        table.Panel().title("Hottest experts (selected range)").span(8).height(10)
        .description("The ten logical experts with the highest share of their layer's mean load in the selected range.")
        .datasource(DATASOURCE)
        .with_target(q(f"topk(10, {load_share('$__range')})", instant=True, table=True))
        .decimals(2)
        .sort_by([cb.TableSortByFieldState().display_name("Value").desc(True)])
    )

    d = d.with_row(db.Row("Imbalance"))
    d = d.with_panel(
        ts("Load imbalance vs threshold",
           "max/mean rank load. `operator` is what the load balancer acts on; `worst layer` and "
           "`all layers` are computed here from the workers' counters. Above the threshold for a whole "
           "window, the operator adds replicas of the hottest experts (after its cooldown).",
           "x",
           q(f"moe_operator_imbalance_ratio{{{DEPLOY}}}", "operator {{namespace}}/{{deployment}}", "A"),
           q(imbalance_worst_layer(), "worst layer {{deployment}} g{{group}}", "B"),
           q(imbalance_total(), "all layers {{deployment}} g{{group}}", "C"),
           q("vector($threshold)", "threshold", "D"),
           w=16, min_zero=False)
        .min(1)
        .override_by_name("threshold", [
            dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
            dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
            dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0)])
    )
    d = d.with_panel(
        ts("Rank load: busiest, mean, idlest",
           "Routed (token, expert) pairs per second computed by one rank, over all MoE layers.",
           "ops",
           q(f"max by ({G}) ({_rank_rate('rank')})", "max {{deployment}} g{{group}}", "A"),
           q(f"avg by ({G}) ({_rank_rate('rank')})", "mean {{deployment}} g{{group}}", "B"),
           q(f"min by ({G}) ({_rank_rate('rank')})", "min {{deployment}} g{{group}}", "C"),
           w=8)
    )

    d = d.with_row(db.Row("Replicas and expert map"))
    d = d.with_panel(
        table.Panel().title("Replicated experts (selected range)").span(8).height(9)
        .description("Logical experts that more than one rank computed tokens for in the selected range: "
                     "the redundant slots the operator filled. Value = number of ranks (replicas).")
        .datasource(DATASOURCE)
        .with_target(q(f"count by ({G}, layer, expert) ({_copies('$__range')}) > 1",
                       instant=True, table=True))
        .sort_by([cb.TableSortByFieldState().display_name("Value").desc(True)])
    )
    d = d.with_panel(
        ts("Redundant expert copies in service",
           "Expert copies that computed tokens minus logical experts that did, per EP group: how many "
           "redundant slots are serving a replica right now (summed over layers).",
           "short",
           q(f"count by ({G}) ({_copies(RATE)})\n-\n"
             f"count by ({G}) (sum by ({G}, layer, expert) ({_copies(RATE)}))", "{{deployment}} g{{group}}"),
           w=8, h=9)
    )
    d = d.with_panel(
        ts("Expert-map generation: published vs served",
           "`published` is the generation in the plan ConfigMap (operator); `served` the oldest and newest "
           "generation among the group's ranks. They differ only during a switch, which happens at a step "
           "boundary on every rank of the group.",
           "none",
           q(f"max by (namespace, deployment) (moe_operator_expert_map_generation{{{DEPLOY}}})",
             "published {{deployment}}", "A"),
           q(f"min by ({G}) (moe_expert_map_generation{{{WORKER}}})", "served, oldest rank {{deployment}} g{{group}}",
             "B"),
           q(f"max by ({G}) (moe_expert_map_generation{{{WORKER}}})", "served, newest rank {{deployment}} g{{group}}",
             "C"),
           w=8, h=9)
        .decimals(0)
    )
    d = d.with_panel(
        single("Expert-map switches refused", "Expert-map switches ranks could not take in the selected "
               "range (they keep serving the previous map).", "short",
               q(f"sum(increase(moe_expert_map_errors_total{{{WORKER}}}[$__range]))", instant=True),
               w=8, h=5, steps=[(None, "green"), (1, "red")])
    )
    d = d.with_panel(
        ts("Routed tokens by source",
           "Where the tokens an expert computed came from: a rank on the same node (NVLink) or another node "
           "(RDMA). The planner aligns expert groups with nodes to keep `remote` low.",
           "ops",
           q(f"sum by (source) (rate(moe_expert_tokens_total{{{WORKER}}}[{RATE}]))", "{{source}}"),
           w=16, h=5)
        .stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL)).fill_opacity(30)
    )
    return d
