"""MoE / Serving: is the model answering, how fast, and where a step spends its time.

Rank series (moe_worker.metrics) match WORKER; router series (moe_worker.router.RouterMetrics) have no
`group` label, so the router row matches DEPLOY and keeps working when one EP group is selected.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from .common import DEPLOY, RATE, WORKER, G, dashboard, q, quantile, single, ts, worker_variables

UID = "moe-serving"
# One router Deployment (all its pods) of one MoEDeployment, and one router pod of it.
ROUTERS = "namespace, deployment"
ROUTER_POD = "namespace, deployment, instance"
# moe_requests_total outcomes of requests that did not finish: the client left; the queue was full (429).
CANCELLED = 'outcome="cancelled"'
REJECTED = 'outcome="overloaded"'


def _rate(metric: str, extra: str = "") -> str:
    sel = f"{WORKER}, {extra}" if extra else WORKER
    return f"rate({metric}{{{sel}}}[{RATE}])"


def _router_rate(metric: str) -> str:
    return f"rate({metric}{{{DEPLOY}}}[{RATE}])"


def _p50_p99(metric: str, by: str, legend: str, selector: str = WORKER) -> tuple:
    """Median and 99th percentile of histogram `metric` by `by`, as queries A and B."""
    return (q(quantile(0.5, metric, by, selector), f"p50 {legend}", "A"),
            q(quantile(0.99, metric, by, selector), f"p99 {legend}", "B"))


def build() -> db.Dashboard:
    d = dashboard(UID, "MoE / Serving",
                  "Requests, tokens and latency of MoEDeployments, their routers, and the expert-parallel "
                  "all-to-all (dispatch and combine) per rank.")
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
        "Time to first token p99", "From request arrival to its first token, every protocol, streamed or not.", "s",
        q(f"histogram_quantile(0.99, sum by (le) ({_rate('moe_time_to_first_token_seconds_bucket')}))"),
        steps=[(None, "green"), (1, "orange"), (5, "red")]))
    d = d.with_panel(single(
        "Queued requests", "Requests waiting to be scheduled.", "short",
        q(f"sum(moe_queue_depth_requests{{{WORKER}}})"), steps=[(None, "green"), (32, "orange"), (256, "red")]))

    d = d.with_row(db.Row("Throughput and latency"))
    d = d.with_panel(ts(
        "Tokens/s", "Prompt tokens processed and tokens generated per second.", "short",
        q(f"sum by ({G}) ({_rate('moe_input_tokens_total')})", "input {{deployment}} g{{group}}", "A"),
        q(f"sum by ({G}) ({_rate('moe_output_tokens_total')})", "output {{deployment}} g{{group}}", "B"), w=8))
    d = d.with_panel(ts(
        "Requests/s by outcome",
        "Finished inference requests: ok, cancelled (the client left), overloaded (queue full: 429 / "
        "RESOURCE_EXHAUSTED), timeout, invalid, not_found, unavailable, error.", "reqps",
        q(f"sum by (outcome) ({_rate('moe_requests_total')})", "{{outcome}}"), w=8))
    d = d.with_panel(ts(
        "Cancelled and rejected requests/s",
        "Requests the client gave up on (cancelled), and requests refused because the queue was full "
        "(overloaded: 429 with Retry-After). Rejections mean the group needs more capacity or clients "
        "that back off.", "reqps",
        q(f"sum by ({G}) ({_rate('moe_requests_total', CANCELLED)})", "cancelled {{deployment}} g{{group}}", "A"),
        q(f"sum by ({G}) ({_rate('moe_requests_total', REJECTED)})", "rejected {{deployment}} g{{group}}", "B"),
        w=8))
    d = d.with_panel(ts(
        "Time to first token", "From request arrival to its first token, every protocol, streamed or not.", "s",
        *_p50_p99("moe_time_to_first_token_seconds", G, "{{deployment}} g{{group}}"), w=8))
    d = d.with_panel(ts(
        "Inter-token latency", "Time between consecutive output tokens of a request.", "s",
        *_p50_p99("moe_inter_token_seconds", G, "{{deployment}} g{{group}}"), w=8))
    d = d.with_panel(ts(
        "Queue time", "Time a request waited before it was first scheduled (admitted to a rank's batch); "
        "part of its time to first token.", "s",
        *_p50_p99("moe_queue_seconds", G, "{{deployment}} g{{group}}"), w=8))
    d = d.with_panel(ts(
        "Request duration", "End-to-end request latency.", "s",
        *_p50_p99("moe_request_duration_seconds", G, "{{deployment}} g{{group}}"), w=8))
    d = d.with_panel(ts(
        "Queue depth and running batch", "Requests waiting, and requests in the running batch.", "short",
        q(f"sum by ({G}) (moe_queue_depth_requests{{{WORKER}}})", "queued {{deployment}} g{{group}}", "A"),
        q(f"sum by ({G}) (moe_running_requests{{{WORKER}}})", "running {{deployment}} g{{group}}", "B"), w=8))
    d = d.with_panel(ts(
        "KV cache usage", "Fraction of the latent (MLA) KV cache in use; the fullest rank of each group.",
        "percentunit",
        q(f"max by ({G}) (moe_kv_cache_usage_ratio{{{WORKER}}})", "{{deployment}} g{{group}}"), w=8).max(1))

    d = d.with_row(db.Row("Router"))
    d = d.with_panel(ts(
        "Router requests/s by outcome",
        "Requests the routers answered: ok (the front's answer, whatever its status), unavailable (no front "
        "answered within the retry budget), broken (the front failed after part of the answer was sent), "
        "cancelled (the client left).", "reqps",
        q(f"sum by ({ROUTERS}, protocol, outcome) ({_router_rate('moe_router_requests_total')})",
          "{{outcome}} {{protocol}} {{deployment}}"), w=8))
    d = d.with_panel(ts(
        "Router retries/s by reason",
        "Requests sent again to another front: connect (no connection), broken (the connection failed "
        "before an answer), unavailable (503 / UNAVAILABLE: the front's engine is not ready).", "reqps",
        q(f"sum by ({ROUTERS}, protocol, reason) ({_router_rate('moe_router_retries_total')})",
          "{{reason}} {{protocol}} {{deployment}}"), w=8))
    d = d.with_panel(ts(
        "Fronts ready per router",
        "Front ranks each router pod sees answering ready, and the fronts it knows. A router below the "
        "others cannot reach some fronts.", "short",
        q(f"sum by ({ROUTER_POD}) (moe_router_front_ready{{{DEPLOY}}})", "ready {{deployment}} {{instance}}", "A"),
        q(f"max by ({ROUTERS}) (count by ({ROUTER_POD}) (moe_router_front_ready{{{DEPLOY}}}))",
          "fronts {{deployment}}", "B"), w=8).decimals(0))
    d = d.with_panel(ts(
        "Router request duration", "From a request's arrival at the router to its last byte forwarded "
        "(a stream lasts until its last token).", "s",
        *_p50_p99("moe_router_request_seconds", f"{ROUTERS}, protocol", "{{protocol}} {{deployment}}", DEPLOY)))
    d = d.with_panel(ts(
        "Router requests in flight per front", "Requests being forwarded to each front, all router pods; "
        "the routers send each request to the ready front with the fewest.", "short",
        q(f"sum by ({ROUTERS}, front) (moe_router_in_flight{{{DEPLOY}}})", "{{front}} {{deployment}}")))

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
