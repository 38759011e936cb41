"""MoE / Serving: is the model answering, how fast, and where a step spends its time."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from .common import RATE, WORKER, G, dashboard, q, quantile, single, ts, worker_variables

UID = "moe-serving"


def _rate(metric: str, extra: str = "") -> str:
    sel = f"{WORKER}, {extra}" if extra else WORKER
    return f"rate({metric}{{{sel}}}[{RATE}])"


def _p50_p99(metric: str, by: str, legend: str) -> tuple:
    """Median and 99th percentile of histogram `metric` by `by`, as queries A and B."""
    return (q(quantile(0.5, metric, by), f"p50 {legend}", "A"), q(quantile(0.99, metric, by), f"p99 {legend}", "B"))


def build() -> db.Dashboard:
    d = dashboard(UID, "MoE / Serving",
                  "Requests, tokens and latency of MoEDeployments, and the expert-parallel all-to-all "
                  "(dispatch and combine) per rank.")
    for v in worker_variables():
        d = d.with_variable(v)

    d = d.with_row(db.Row("Overview"))
    d = d.with_panel(single(
        "EP groups ready", "EP groups whose every rank is up and joined (moe_group_ready on all ranks).", "short",
        q(f"count(min by ({G}) (moe_group_ready{{{WORKER}}}) == 1) or vector(0)", instant=True),
        steps=[(None, "red"), (1, "green")]))
    d = d.with_panel(single(
        "Output tokens/s", "Generated tokens per second, all selected groups.", "short",
        q(f"sum({_rate('moe_output_tokens_total')})")))
    d = d.with_panel(single(
        "Time to first token p99", "", "s",
        q(f"histogram_quantile(0.99, sum by (le) ({_rate('moe_time_to_first_token_seconds_bucket')}))"),
        steps=[(None, "green"), (1, "orange"), (5, "red")]))
    d = d.with_panel(single(
        "Queued requests", "Requests waiting to be scheduled.", "short",
        q(f"sum(moe_queue_depth_requests{{{WORKER}}})"), steps=[(None, "green"), (32, "orange"), (256, "red")]))

    d = d.with_row(db.Row("Throughput and latency"))
    d = d.with_panel(ts(
        "Tokens/s", "Prompt tokens processed and tokens generated per second.", "short",
        q(f"sum by ({G}) ({_rate('moe_input_tokens_total')})", "input {{deployment}} g{{group}}", "A"),
        q(f"sum by ({G}) ({_rate('moe_output_tokens_total')})", "output {{deployment}} g{{group}}", "B")))
    d = d.with_panel(ts(
        "Requests/s by outcome", "Finished inference requests.", "reqps",
        q(f"sum by (outcome) ({_rate('moe_requests_total')})", "{{outcome}}")))
    d = d.with_panel(ts(
        "Time to first token", "From request arrival to its first token.", "s",
        *_p50_p99("moe_time_to_first_token_seconds", G, "{{deployment}} g{{group}}"), w=8))
    d = d.with_panel(ts(
        "Inter-token latency", "Time between consecutive output tokens of a request.", "s",
        *_p50_p99("moe_inter_token_seconds", G, "{{deployment}} g{{group}}"), w=8))
    d = d.with_panel(ts(
        "Request duration", "End-to-end request latency.", "s",
        *_p50_p99("moe_request_duration_seconds", G, "{{deployment}} g{{group}}"), w=8))
    d = d.with_panel(ts(
        "Queue depth and running batch", "Requests waiting, and requests in the running batch.", "short",
        q(f"sum by ({G}) (moe_queue_depth_requests{{{WORKER}}})", "queued {{deployment}} g{{group}}", "A"),
        q(f"sum by ({G}) (moe_running_requests{{{WORKER}}})", "running {{deployment}} g{{group}}", "B")))
    d = d.with_panel(ts(
        "KV cache usage", "Fraction of the latent (MLA) KV cache in use; the fullest rank of each group.",
        "percentunit",
        q(f"max by ({G}) (moe_kv_cache_usage_ratio{{{WORKER}}})", "{{deployment}} g{{group}}")).max(1))

    d = d.with_row(db.Row("Expert parallelism"))
    d = d.with_panel(ts(
        "Dispatch all-to-all latency per rank",
        "One dispatch (rows out, their counts in a header; an extra round only when a bucket overflows) for one MoE layer. A rank far above the others is the straggler "
        "every other rank waits for.", "s",
        *_p50_p99("moe_dispatch_seconds", f"{G}, rank", "g{{group}} r{{rank}}")))
    d = d.with_panel(ts(
        "Combine all-to-all latency per rank", "One combine for one MoE layer.", "s",
        *_p50_p99("moe_combine_seconds", f"{G}, rank", "g{{group}} r{{rank}}")))
    d = d.with_panel(ts(
        "Step time by phase", "One forward step of the EP group (prefill and decode steps apart).", "s",
        *_p50_p99("moe_step_seconds", "phase", "{{phase}}")))
    d = d.with_panel(ts(
        "Ranks up per group", "Ranks exporting metrics, and of those the ones reporting the group joined.",
        "short",
        q(f"count by ({G}) (moe_group_ready{{{WORKER}}})", "up {{deployment}} g{{group}}", "A"),
        q(f"sum by ({G}) (moe_group_ready{{{WORKER}}})", "joined {{deployment}} g{{group}}", "B")))
    return d
