"""The worker's Prometheus metrics: one registry per rank process, names with units, `moe_` prefix.

This module is the contract between the worker, the operator's load balancer (`moe_operator.controller.scaling`
reads `moe_expert_tokens_total`) and the Grafana dashboards. Cardinality is bounded for DeepSeek-V3
at EP320: a rank exports per-(layer, expert) series only for the experts it hosts (about 58 x 1),
not for every logical expert.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets: dispatch/combine run in tens of microseconds on GPUs and milliseconds on CPU.
_COMM_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 1.0)
_STEP_BUCKETS = (1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_REQ_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

EXPERT_TOKENS = "moe_expert_tokens_total"


class WorkerMetrics:
    """All metrics of one rank. Labels `rank` and `group` are constant per process."""

    def __init__(self, rank: int = 0, group: int = 0, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rank, self.group = str(rank), str(group)
        self.expert_tokens = Counter(
            "moe_expert_tokens", "Routed (token, expert) pairs computed by this rank, per MoE layer (0-based index "
            "among MoE layers, as in the plan's expert_map) and logical "
            "expert it hosts; source is 'node' when the token came from a rank on the same node, else 'remote'.",
            ["rank", "group", "layer", "expert", "source"], registry=r)
        self.rank_tokens = Counter(
            "moe_rank_tokens", "Routed (token, expert) pairs this physical rank computed, per MoE layer (0-based).",
            ["rank", "group", "layer"], registry=r)
        self.dispatch_seconds = Histogram(
            "moe_dispatch_seconds", "Time of one dispatch all-to-all (counts + payload) for one MoE layer.",
            ["rank", "group"], buckets=_COMM_BUCKETS, registry=r)
        self.combine_seconds = Histogram(
            "moe_combine_seconds", "Time of one combine all-to-all for one MoE layer.",
            ["rank", "group"], buckets=_COMM_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "moe_step_seconds", "Time of one forward step of the EP group on this rank.",
            ["rank", "group", "phase"], buckets=_STEP_BUCKETS, registry=r)
        self.input_tokens = Counter("moe_input_tokens", "Prompt tokens processed.", ["rank", "group"], registry=r)
        self.output_tokens = Counter("moe_output_tokens", "Tokens generated.", ["rank", "group"], registry=r)
        self.requests = Counter("moe_requests", "Inference requests finished, by outcome.",
                                ["rank", "group", "outcome"], registry=r)
        self.request_seconds = Histogram("moe_request_duration_seconds", "End-to-end request latency.",
                                         ["rank", "group"], buckets=_REQ_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("moe_time_to_first_token_seconds", "Time from request arrival to its first token.",
                                      ["rank", "group"], buckets=_REQ_BUCKETS, registry=r)
        self.itl_seconds = Histogram("moe_inter_token_seconds", "Time between consecutive output tokens of a request.",
                                     ["rank", "group"], buckets=_STEP_BUCKETS, registry=r)
        self.queue_seconds = Histogram("moe_queue_seconds", "Time a request waited before it was scheduled "
                                       "(admitted to a rank's batch).", ["rank", "group"], buckets=_REQ_BUCKETS,
                                       registry=r)
        self.queue_depth = Gauge("moe_queue_depth_requests", "Requests waiting to be scheduled.",
                                 ["rank", "group"], registry=r)
        self.running = Gauge("moe_running_requests", "Requests in the running batch.", ["rank", "group"], registry=r)
        self.kv_cache_usage = Gauge("moe_kv_cache_usage_ratio", "Fraction of the latent KV cache in use.",
                                    ["rank", "group"], registry=r)
        self.expert_map_generation = Gauge("moe_expert_map_generation", "Expert-map generation this rank serves.",
                                           ["rank", "group"], registry=r)
        self.expert_map_errors = Counter("moe_expert_map_errors", "Expert-map switches this rank could not take "
                                         "(it keeps serving the previous map).", ["rank", "group"], registry=r)
        self.group_ready = Gauge("moe_group_ready", "1 when every rank of the EP group is up and joined.",
                                 ["rank", "group"], registry=r)

    # Short helpers so the hot path stays readable.
    def lbl(self) -> dict[str, str]:
        return {"rank": self.rank, "group": self.group}

    def count_expert_tokens(self, layer: int, expert: int, same_node: int, remote: int) -> None:
        base = {"rank": self.rank, "group": self.group, "layer": str(layer), "expert": str(expert)}
        if same_node:
            self.expert_tokens.labels(**base, source="node").inc(same_node)
        if remote:
            self.expert_tokens.labels(**base, source="remote").inc(remote)
        if same_node + remote:
            self.rank_tokens.labels(rank=self.rank, group=self.group, layer=str(layer)).inc(same_node + remote)
