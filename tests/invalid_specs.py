"""Invalid MoEDeployment specs, each with the field its error must name.

Used twice: by the unit tests against the pydantic models and by the cluster tests against the
real API server (OpenAPI + CEL in the generated CRD), so the two can never drift apart.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_spec() -> dict:
    """The spec of manifests/tiny-ep16.yaml."""
    return yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text())["spec"]


def _set(d: dict, path: str, value) -> None:
    *head, last = path.split(".")
    for k in head:
        d = d.setdefault(k, {})
    if value is _DELETE:
        d.pop(last, None)
    else:
        d[last] = value


_DELETE = object()

# (case id, {dotted path in spec: value}, field path the error must name)
CASES: list[tuple[str, dict, str]] = [
    ("ep-below-16", {"parallelism.expertParallelSize": 8, "parallelism.redundantExperts": 0,
                     "model.architecture.nRoutedExperts": 8, "model.architecture.nGroup": 4},
     "spec.parallelism.expertParallelSize"),
    ("ep-not-experts-plus-redundant", {"parallelism.expertParallelSize": 20}, "spec.parallelism.expertParallelSize"),
    ("packed-too-small", {"parallelism.maxExpertsPerGpu": 2, "parallelism.expertParallelSize": 4,
                          "parallelism.allowSmallExpertParallel": True}, "spec.parallelism.maxExpertsPerGpu"),
    ("ngroup-not-dividing", {"model.architecture.nGroup": 5}, "spec.model.architecture.nGroup"),
    ("topk-group-above-ngroup", {"model.architecture.topkGroup": 5}, "spec.model.architecture.topkGroup"),
    ("one-expert-per-group", {"model.architecture.nGroup": 12, "model.architecture.numExpertsPerTok": 2},
     "spec.model.architecture.nGroup"),
    ("topk-above-experts", {"model.architecture.numExpertsPerTok": 13}, "spec.model.architecture.numExpertsPerTok"),
    ("topk-above-group-budget", {"model.architecture.numExpertsPerTok": 7, "model.architecture.topkGroup": 2},
     "spec.model.architecture.numExpertsPerTok"),
    ("no-moe-layer", {"model.architecture.firstKDenseReplace": 4}, "spec.model.architecture.firstKDenseReplace"),
    ("attention-dp-tp-mismatch", {"parallelism.attentionDataParallel": 8}, "spec.parallelism.attentionDataParallel"),
    ("attention-tp-not-dividing", {"parallelism.attentionTensorParallel": 3},
     "spec.parallelism.attentionTensorParallel"),
    # divides EP16 and the 8 GPUs per node, not the tiny model's 4 heads
    ("attention-tp-not-dividing-heads", {"parallelism.attentionTensorParallel": 8},
     "spec.parallelism.attentionTensorParallel"),
    # divides EP16 and the 4 heads, but a TP group of 4 cannot fill nodes of 6 GPUs
    ("attention-tp-not-dividing-gpus-per-node", {"parallelism.attentionTensorParallel": 4, "placement.gpusPerNode": 6},
     "spec.parallelism.attentionTensorParallel"),
    ("hidden-zero", {"model.architecture.hiddenSize": 0}, "spec.model.architecture.hiddenSize"),
    ("layers-negative", {"model.architecture.numHiddenLayers": -1}, "spec.model.architecture.numHiddenLayers"),
    ("kv-lora-zero", {"model.architecture.kvLoraRank": 0}, "spec.model.architecture.kvLoraRank"),
    ("scaling-factor-zero", {"model.architecture.routedScalingFactor": 0},
     "spec.model.architecture.routedScalingFactor"),
    ("shared-negative", {"model.architecture.nSharedExperts": -1}, "spec.model.architecture.nSharedExperts"),
    ("precision-unknown", {"model.precision": "int4"}, "spec.model.precision"),
    ("checkpoint-two-sources", {"model.checkpoint.pvcName": "weights"}, "spec.model.checkpoint"),
    ("checkpoint-no-source", {"model.checkpoint.hostPath": _DELETE}, "spec.model.checkpoint"),
    ("checkpoint-relative-path", {"model.checkpoint.hostPath": "relative/dir"}, "spec.model.checkpoint.hostPath"),
    ("redundant-negative", {"parallelism.redundantExperts": -1}, "spec.parallelism.redundantExperts"),
    ("replicas-zero", {"parallelism.replicas": 0}, "spec.parallelism.replicas"),
    ("gpus-per-node-zero", {"placement.gpusPerNode": 0}, "spec.placement.gpusPerNode"),
    ("strategy-unknown", {"placement.strategy": "Random"}, "spec.placement.strategy"),
    ("toleration-operator", {"placement.tolerations": [{"key": "a", "operator": "Maybe"}]},
     "spec.placement.tolerations[0].operator"),
    ("threshold-not-above-one", {"loadBalancing.imbalanceThreshold": 0.9}, "spec.loadBalancing.imbalanceThreshold"),
    ("prometheus-url-scheme", {"loadBalancing.prometheusUrl": "prometheus:9090"},
     "spec.loadBalancing.prometheusUrl"),
    ("cooldown-below-interval", {"loadBalancing.cooldownSeconds": 2}, "spec.loadBalancing.cooldownSeconds"),
    ("window-below-interval", {"loadBalancing.windowSeconds": 2},
     "spec.loadBalancing.windowSeconds"),
    ("replicas-per-expert-above-ep", {"loadBalancing.maxReplicasPerExpert": 17},
     "spec.loadBalancing.maxReplicasPerExpert"),
    ("extra-gpus-negative", {"loadBalancing.maxExtraGpus": -2}, "spec.loadBalancing.maxExtraGpus"),
    ("shm-size-not-quantity", {"worker.shmSize": "lots"}, "spec.worker.shmSize"),
    ("cpu-request-not-quantity", {"worker.resources": {"requests": {"cpu": "many"}}},
     "spec.worker.resources.requests.cpu"),
    ("env-name-invalid", {"worker.env": [{"name": "1BAD", "value": "x"}]}, "spec.worker.env[0].name"),
    ("ports-collide", {"serving.grpcPort": 8080}, "spec.serving"),
    ("port-out-of-range", {"serving.httpPort": 70000}, "spec.serving.httpPort"),
    ("openai-port-is-grpc-port", {"serving.openaiPort": 8081}, "spec.serving.openaiPort"),
    ("openai-port-is-metrics-port", {"serving.openaiPort": 9400}, "spec.serving.openaiPort"),
    # the default openaiPort (8000) is taken too: a spec with grpcPort 8000 must now move one of them
    ("grpc-port-is-default-openai-port", {"serving.grpcPort": 8000}, "spec.serving.openaiPort"),
    ("model-name-invalid", {"serving.modelName": "my model"}, "spec.serving.modelName"),
    ("source-neither-addresses-nor-pods", {"serving.allowedSources": [{}]}, "spec.serving.allowedSources[0]"),
    ("source-addresses-and-pods", {"serving.allowedSources": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]},
     "spec.serving.allowedSources[0]"),
    ("metrics-namespace-invalid", {"serving.metricsNamespaces": ["Bad_NS"]}, "spec.serving.metricsNamespaces[0]"),
    ("api-key-secret-without-key", {"serving.apiKeySecret": {"name": "keys"}}, "spec.serving.apiKeySecret.key"),
    ("router-replicas-negative", {"serving.routerReplicas": -1}, "spec.serving.routerReplicas"),
    ("router-replicas-above-16", {"serving.routerReplicas": 17}, "spec.serving.routerReplicas"),
    ("router-node-selector-value", {"serving.routerNodeSelector": {"pool": "cpu nodes"}},
     "spec.serving.routerNodeSelector.pool"),
    ("unknown-field", {"parallelism.expertParallelism": 16}, "spec.parallelism.expertParallelism"),
]

# Words the error of some cases must also contain, where naming the field does not say enough.
MESSAGES: dict[str, str] = {
    "attention-tp-not-dividing": "attentionTensorParallel must divide expertParallelSize",
    "attention-tp-not-dividing-heads": "attentionTensorParallel must divide model.architecture.numAttentionHeads",
    "attention-tp-not-dividing-gpus-per-node": "attentionTensorParallel must divide placement.gpusPerNode",
}


# (case id, metadata.name) of names the API refuses, each with a valid spec: every error names
# metadata.name. Each passes the API server's own check of object names (a DNS-1123 subdomain), so
# only our rules (CEL on the CRD's root, `api.check_name`) can refuse it.
LONGEST_NAME = "n" * 53  # names.MAX_NAME_LENGTH; tests/test_names.py checks the two agree
INVALID_NAMES: list[tuple[str, str]] = [
    ("name-too-long", LONGEST_NAME + "x"),  # rank pod hostname NAME-g99-r8191 would be 64 characters
    ("name-with-dot", "my.model"),  # Services need DNS-1035 labels
    ("name-starts-with-digit", "9lives"),
    ("name-ends-in-ranks", "tiny-ranks"),  # its client Service would be tiny's headless Service
    ("name-ends-in-router", "tiny-router"),  # its PodDisruptionBudget and NetworkPolicy would be tiny's routers'
]


def invalid_spec(changes: dict) -> dict:
    spec = copy.deepcopy(tiny_spec())
    for path, value in changes.items():
        _set(spec, path, value)
    return spec
