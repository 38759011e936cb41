"""The MoEDeployment API: pydantic models are the one source of truth.

`moe crd` turns these models into the CRD's OpenAPI schema (see `crd.py`); the same models parse
a spec inside the operator and in `moe plan`. Rules the API server can check are written twice,
once as CEL for `kubectl apply` and once as a pydantic validator for offline use, and a test
feeds the same invalid specs to both.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from moe_common.model_args import ConfigError, ModelArgs
from moe_common.routing import CEL_RULES as ROUTING_CEL
from moe_operator import names

GROUP = "serving.moe.dev"
VERSION = "v1alpha1"
KIND = "MoEDeployment"
PLURAL = "moedeployments"
SINGULAR = "moedeployment"
SHORT_NAMES = ["moed"]

Pos = Annotated[int, Field(ge=1)]
NonNeg = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(ge=1, le=65535)]

# A Kubernetes resource quantity such as 16Gi or 500m.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"


class SpecError(ValueError):
    """A spec that breaks a rule; `field` is the dotted path users write in YAML."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )
    # CEL rules for the CRD: dicts with `rule`, `message` and optionally `fieldPath`, `reason`.
    cel: ClassVar[list[dict[str, str]]] = []


class Architecture(_Model):
    """Model architecture in Hugging Face DeepSeek-V3 `config.json` terms; defaults are DeepSeek-V3."""

    cel: ClassVar[list[dict[str, str]]] = [
        # group-limited routing: the rules every half checks (moe_common.routing)
        *({"rule": rule, "message": message, "fieldPath": f".{field}"} for rule, message, field in ROUTING_CEL),
        {"rule": "self.numExpertsPerTok <= self.nRoutedExperts",
         "message": "numExpertsPerTok must be <= nRoutedExperts", "fieldPath": ".numExpertsPerTok"},
        {"rule": "self.firstKDenseReplace < self.numHiddenLayers",
         "message": "firstKDenseReplace must be < numHiddenLayers (at least one MoE layer)",
         "fieldPath": ".firstKDenseReplace"},
        {"rule": "self == oldSelf",
         "message": "model.architecture is immutable; create a new MoEDeployment instead"},
    ]

    vocab_size: Pos = Field(129280, description="Vocabulary size (vocab_size).")
    hidden_size: Pos = Field(7168, description="Hidden size (hidden_size).")
    intermediate_size: Pos = Field(18432, description="Dense MLP width of the first layers (intermediate_size).")
    moe_intermediate_size: Pos = Field(2048, description="Width of one routed or shared expert (moe_intermediate_size).")
    num_hidden_layers: Pos = Field(61, description="Transformer layers (num_hidden_layers).")
    first_k_dense_replace: NonNeg = Field(3, description="Leading layers with a dense MLP instead of MoE (first_k_dense_replace).")
    num_attention_heads: Pos = Field(128, description="MLA attention heads (num_attention_heads).")
    q_lora_rank: NonNeg = Field(1536, description="MLA query low-rank dimension; 0 means no query compression (q_lora_rank).")
    kv_lora_rank: Pos = Field(512, description="MLA latent KV dimension, cached per token per layer (kv_lora_rank).")
    qk_nope_head_dim: Pos = Field(128, description="Per-head query/key dimension without rotary embedding (qk_nope_head_dim).")
    qk_rope_head_dim: Pos = Field(64, description="Per-head query/key rotary dimension, shared key part cached (qk_rope_head_dim).")
    v_head_dim: Pos = Field(128, description="Per-head value dimension (v_head_dim).")
    n_routed_experts: Pos = Field(256, description="Routed experts per MoE layer (n_routed_experts).")
    n_shared_experts: NonNeg = Field(1, description="Shared experts per MoE layer, run on every rank (n_shared_experts).")
    num_experts_per_tok: Pos = Field(8, description="Routed experts each token selects (num_experts_per_tok).")
    n_group: Pos = Field(8, description="Expert groups for group-limited routing (n_group).")
    topk_group: Pos = Field(4, description="Groups each token may route into (topk_group).")
    routed_scaling_factor: float = Field(2.5, gt=0, description="Scale applied to the normalised routing weights (routed_scaling_factor).")
    max_position_embeddings: Pos = Field(163840, description="Longest context the rotary embedding is configured for (max_position_embeddings).")

    @property
    def moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def hf_config(self, **overrides: Any) -> dict[str, Any]:
        """A Hugging Face DeepSeek-V3 `config.json` for this architecture (fields we do not model
        take DeepSeek-V3's values), e.g. to generate a random checkpoint of this shape."""
        cfg: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "moe_layer_freq": 1,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "rms_norm_eps": 1e-6,
            "rope_theta": 10000, "hidden_act": "silu", "tie_word_embeddings": False, "num_nextn_predict_layers": 0,
            "torch_dtype": "bfloat16",
        }
        cfg.update(self.model_dump())
        cfg["num_key_value_heads"] = self.num_attention_heads
        cfg.update(overrides)
        return cfg

    def model_args(self) -> ModelArgs:
        """This architecture as the worker will read it (`moe_common.model_args`, the one definition
        of the model shape); ConfigError for one the worker would refuse."""
        cfg = self.hf_config()
        if not cfg["q_lora_rank"]:
            cfg["q_lora_rank"] = None  # 0 here: no query compression
        return ModelArgs.from_hf_config(cfg)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> Architecture:
        """Take the fields we model from a Hugging Face `config.json`; ignore the rest."""
        names = set(cls.model_fields)
        return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})

    @model_validator(mode="after")
    def _check(self) -> Architecture:
        f = "spec.model.architecture"
        if self.first_k_dense_replace >= self.num_hidden_layers:
            raise SpecError(f"{f}.firstKDenseReplace", "firstKDenseReplace must be < numHiddenLayers")
        try:  # everything else the worker checks, so that a spec it would refuse is refused here
            self.model_args()
        except ConfigError as e:
            named = [to_camel(n) for n in re.findall(r"'([a-z_]+)'", str(e)) if n in type(self).model_fields]
            raise SpecError(f"{f}.{named[0]}" if named else f, f"the worker would refuse this model: {e}") from None
        return self


class Checkpoint(_Model):
    """Where the safetensors checkpoint lives: a PersistentVolumeClaim or a host path, plus a sub-path."""

    cel: ClassVar[list[dict[str, str]]] = [
        {"rule": "has(self.pvcName) != has(self.hostPath)",
         "message": "set exactly one of checkpoint.pvcName and checkpoint.hostPath"},
    ]

    pvc_name: str | None = Field(None, min_length=1, max_length=253, description="PersistentVolumeClaim holding the checkpoint (mounted read-only).")
    host_path: str | None = Field(None, pattern=r"^/", max_length=4096, description="Absolute host path of the checkpoint directory (single-node and local clusters).")
    sub_path: str = Field("", max_length=4096, description="Directory inside the volume that holds config.json and *.safetensors.")

    @model_validator(mode="after")
    def _one_source(self) -> Checkpoint:
        if (self.pvc_name is None) == (self.host_path is None):
            raise SpecError("spec.model.checkpoint", "set exactly one of checkpoint.pvcName and checkpoint.hostPath")
        return self


class ModelSource(_Model):
    """The model to serve: checkpoint, architecture and precision."""

    checkpoint: Checkpoint = Field(description="Checkpoint location.")
    architecture: Architecture = Field(default_factory=Architecture, description="Architecture; immutable after creation.")
    precision: Literal["fp8", "bf16"] = Field("fp8", description="Routed expert weight precision: fp8 (128x128 block scales) or bf16.")


class Parallelism(_Model):
    """How one EP group is split over GPUs, and how many groups run."""

    cel: ClassVar[list[dict[str, str]]] = [
        {"rule": "self.expertParallelSize >= 16 || self.allowSmallExpertParallel",
         "message": "expertParallelSize must be >= 16 (large expert parallelism); set allowSmallExpertParallel for smaller groups",
         "fieldPath": ".expertParallelSize"},
        {"rule": "!has(self.attentionDataParallel) || self.attentionDataParallel * self.attentionTensorParallel == self.expertParallelSize",
         "message": "attentionDataParallel * attentionTensorParallel must equal expertParallelSize",
         "fieldPath": ".attentionDataParallel"},
        {"rule": "self.expertParallelSize % self.attentionTensorParallel == 0",
         "message": "attentionTensorParallel must divide expertParallelSize",
         "fieldPath": ".attentionTensorParallel"},
    ]

    expert_parallel_size: Pos = Field(288, le=names.MAX_EXPERT_PARALLEL, description="GPUs in one expert-parallel group (one pod per GPU). With one expert per GPU it must equal routed + redundant experts.")
    max_experts_per_gpu: Pos = Field(1, description="Most experts one GPU hosts per MoE layer; 1 is the large-EP layout.")
    redundant_experts: NonNeg = Field(32, description="Extra physical expert slots per layer that hold replicas of hot experts.")
    attention_data_parallel: Pos | None = Field(None, description="Attention data-parallel degree; default expertParallelSize / attentionTensorParallel.")
    attention_tensor_parallel: Pos = Field(1, description="Attention tensor-parallel degree: ranks [g*N, (g+1)*N) form TP group g, split the attention heads and serve the same sequences (each keeps the group's whole latent KV cache). Must divide expertParallelSize, model.architecture.numAttentionHeads and placement.gpusPerNode: a TP group's ranks share one node.")
    replicas: Pos = Field(1, le=names.MAX_REPLICAS, description="Independent EP groups serving the same model.")
    allow_small_expert_parallel: bool = Field(False, description="Allow expertParallelSize below 16 (tests and tiny demos).")

    @property
    def attention_dp(self) -> int:
        return self.attention_data_parallel or self.expert_parallel_size // self.attention_tensor_parallel

    @model_validator(mode="after")
    def _check(self) -> Parallelism:
        f = "spec.parallelism"
        if self.expert_parallel_size < 16 and not self.allow_small_expert_parallel:
            raise SpecError(f"{f}.expertParallelSize", "expertParallelSize must be >= 16 (large expert parallelism); set allowSmallExpertParallel for smaller groups")
        if (self.attention_data_parallel is not None
                and self.attention_data_parallel * self.attention_tensor_parallel != self.expert_parallel_size):
            raise SpecError(f"{f}.attentionDataParallel", "attentionDataParallel * attentionTensorParallel must equal expertParallelSize")
        if self.expert_parallel_size % self.attention_tensor_parallel:
            raise SpecError(f"{f}.attentionTensorParallel", "attentionTensorParallel must divide expertParallelSize")
        return self


class TopologyKeys(_Model):
    """Node label keys that name each topology level; a node without the label is its own domain."""

    nvlink_domain: str = Field("moe.dev/nvlink-domain", min_length=1, max_length=317, description="Label naming the NVLink domain; default: each node is its own domain.")
    rack: str = Field("moe.dev/rack", min_length=1, max_length=317, description="Label naming the rack.")
    zone: str = Field("topology.kubernetes.io/zone", min_length=1, max_length=317, description="Label naming the zone.")


class Toleration(_Model):
    """A pod toleration, as in core/v1."""

    key: str | None = Field(None, description="Taint key; empty with operator Exists matches all taints.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect; empty matches all.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class Placement(_Model):
    """Where rank pods may go and how the planner spreads them."""

    gpu_resource: str = Field("nvidia.com/gpu", min_length=1, max_length=253, description="Extended resource name of a GPU; each rank pod requests one.")
    gpus_per_node: Pos = Field(8, description="GPUs per node the planner assumes when a node does not report allocatable GPUs.")
    topology_keys: TopologyKeys = Field(default_factory=TopologyKeys, description="Label keys for NVLink domain, rack and zone.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Only nodes with all these labels are used.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Tolerations for rank pods; tainted nodes are used only when tolerated.")
    hardware_profile: Literal["brief", "h100", "h200", "h800"] | None = Field(None, description="Hardware profile for the memory admission check and the performance prediction; default: from the nodes' nvidia.com/gpu.product label (no check when unknown).")
    strategy: Literal["TopologyAware", "RoundRobin"] = Field("TopologyAware", description="TopologyAware aligns expert groups with nodes and balances per-node ingress; RoundRobin is the naive baseline.")


class LoadBalancing(_Model):
    """Load-driven expert replication."""

    cel: ClassVar[list[dict[str, str]]] = [
        {"rule": "self.cooldownSeconds >= self.intervalSeconds",
         "message": "cooldownSeconds must be >= intervalSeconds", "fieldPath": ".cooldownSeconds"},
        {"rule": "self.windowSeconds >= self.intervalSeconds",
         "message": "windowSeconds must be >= intervalSeconds", "fieldPath": ".windowSeconds"},
    ]

    enabled: bool = Field(False, description="Rebalance expert replicas from measured per-expert load.")
    prometheus_url: str | None = Field(None, pattern=r"^https?://", max_length=2048, description="Prometheus HTTP API base URL; when unset the operator scrapes the ranks' /metrics directly.")
    window_seconds: Pos = Field(60, description="Window over which per-expert load is measured.")
    interval_seconds: Pos = Field(15, description="How often load is evaluated.")
    imbalance_threshold: float = Field(1.3, gt=1.0, description="Rebalance when max rank load / mean rank load stays above this for a window.")
    cooldown_seconds: Pos = Field(300, description="Minimum time between rebalances, and before extra GPUs are released.")
    max_replicas_per_expert: Pos = Field(4, description="Most physical copies of one logical expert.")
    max_extra_gpus: NonNeg = Field(0, le=names.MAX_EXTRA_GPUS, description="GPUs scale-out may add beyond expertParallelSize.")

    @model_validator(mode="after")
    def _check(self) -> LoadBalancing:
        f = "spec.loadBalancing"
        if self.cooldown_seconds < self.interval_seconds:
            raise SpecError(f"{f}.cooldownSeconds", "cooldownSeconds must be >= intervalSeconds")
        if self.window_seconds < self.interval_seconds:
            raise SpecError(f"{f}.windowSeconds", "windowSeconds must be >= intervalSeconds")
        return self


class EnvVar(_Model):
    """An environment variable for the worker container."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", description="Variable name.")
    value: str = Field("", max_length=32768, description="Value.")


class Resources(_Model):
    """Worker container resources besides the GPU (quantities as strings)."""

    requests: dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN)]] = Field(default_factory=dict, description="Requests, e.g. cpu: '16', memory: 200Gi.")
    limits: dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN)]] = Field(default_factory=dict, description="Limits.")


class Worker(_Model):
    """The rank container."""

    image: str = Field("ghcr.io/moe-operator/worker:0.1.0", min_length=1, max_length=1024, description="Worker image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Image pull policy.")
    resources: Resources = Field(default_factory=Resources, description="CPU and memory for each rank pod.")
    env: list[EnvVar] = Field(default_factory=list, max_length=128, description="Extra environment variables.")
    shm_size: str = Field("16Gi", pattern=QUANTITY_PATTERN, description="Size of the /dev/shm memory volume.")


LABEL_KEY = Annotated[str, Field(min_length=1, max_length=317, pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")]
LABEL_VALUE = Annotated[str, Field(max_length=63, pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")]
DNS_LABEL = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
DNS_SUBDOMAIN = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")]
CIDR = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")]


class LabelSelectorRequirement(_Model):
    """One term of a label selector, as in meta/v1."""

    key: LABEL_KEY = Field(description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[LABEL_VALUE] = Field(default_factory=list, max_length=256, description="Values for In and NotIn.")


class LabelSelector(_Model):
    """A label selector, as in meta/v1; empty selects everything."""

    match_labels: dict[str, LABEL_VALUE] = Field(default_factory=dict, description="Labels that must all be present with these values.")
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=64, description="Terms that must all hold.")


class IPBlock(_Model):
    """A range of addresses, as in networking/v1 (for clients outside the cluster)."""

    cidr: CIDR = Field(description="The range, e.g. 10.0.0.0/8 or 2001:db8::/32.")
    except_cidrs: list[CIDR] = Field(default_factory=list, alias="except", max_length=64, description="Ranges inside cidr to leave out.")


class NetworkPeer(_Model):
    """A source allowed in, as a networking/v1 NetworkPolicyPeer: pods picked by namespaceSelector
    and/or podSelector (podSelector alone: this namespace), or addresses in ipBlock."""

    cel: ClassVar[list[dict[str, str]]] = [
        {"rule": "has(self.ipBlock) != (has(self.namespaceSelector) || has(self.podSelector))",
         "message": "set either ipBlock or namespaceSelector/podSelector"},
    ]

    namespace_selector: LabelSelector | None = Field(None, description="Namespaces whose pods may connect; {} means every namespace.")
    pod_selector: LabelSelector | None = Field(None, description="Pods that may connect (in the namespaces namespaceSelector picks, else in this one).")
    ip_block: IPBlock | None = Field(None, description="Addresses that may connect.")

    @model_validator(mode="after")
    def _check(self) -> NetworkPeer:
        if (self.ip_block is None) == (self.namespace_selector is None and self.pod_selector is None):
            raise ValueError("set either ipBlock or namespaceSelector/podSelector")  # pydantic names the entry
        return self


class SecretKeyRef(_Model):
    """One key of a Secret in the deployment's namespace."""

    name: DNS_SUBDOMAIN = Field(description="Secret name.")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key inside the Secret.")


OPENAI_PORT_CLASH = "openaiPort must differ from grpcPort and metricsPort"


class Serving(_Model):
    """Ports the front rank serves on (KServe v2 HTTP and gRPC; the OpenAI API on the HTTP port, which
    the client Service also exposes as `openaiPort`) and every rank's metrics port, who may reach
    them, the optional API key, and the routers in front of the front ranks."""

    cel: ClassVar[list[dict[str, str]]] = [
        {"rule": "self.httpPort != self.grpcPort && self.httpPort != self.metricsPort && self.grpcPort != self.metricsPort",
         "message": "httpPort, grpcPort and metricsPort must differ"},
        {"rule": "self.openaiPort != self.grpcPort && self.openaiPort != self.metricsPort",
         "message": OPENAI_PORT_CLASH, "fieldPath": ".openaiPort"},
    ]
    # The fields that only shape the NetworkPolicies: changing them restarts no rank.
    NETWORK_FIELDS: ClassVar[tuple[str, ...]] = ("allowed_sources", "metrics_namespaces")
    # The fields that only shape the routers in front of the ranks: changing them restarts no rank either.
    ROUTER_FIELDS: ClassVar[tuple[str, ...]] = ("router_replicas", "router_node_selector")
    # The fields that only shape the client Service: changing them restarts no rank and no router.
    SERVICE_FIELDS: ClassVar[tuple[str, ...]] = ("openai_port",)

    http_port: Port = Field(8080, description="KServe v2 HTTP port.")
    grpc_port: Port = Field(8081, description="KServe v2 gRPC port.")
    openai_port: Port = Field(
        8000,
        description="The client Service's port named `openai`, for the OpenAI-compatible API "
                    "(`http://NAME.NAMESPACE:8000/v1`, where vLLM-style clients and gateways expect it). It "
                    "targets the HTTP port, which serves the OpenAI API beside KServe v2: no pod listens on "
                    "it, and changing it restarts nothing. Equal to httpPort: the Service's `http` port "
                    "serves it and there is no `openai` port (a Service cannot have two ports of one number), "
                    "so a deployment with httpPort 8000 stays valid. Must differ from grpcPort and metricsPort.")
    metrics_port: Port = Field(9400, description="Prometheus /metrics port on every rank.")
    model_name: str = Field("moe", min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Model name in KServe v2 URLs.")
    allowed_sources: list[NetworkPeer] = Field(
        default_factory=lambda: [NetworkPeer(namespace_selector=LabelSelector())], min_length=1, max_length=64,
        description="Who may reach the HTTP and gRPC ports (the deployment's NetworkPolicy): NetworkPolicyPeers. "
                    "Default: any pod in the cluster ([{namespaceSelector: {}}]); clients outside it need an ipBlock. "
                    "Enforced only by a network plugin that implements NetworkPolicy.")
    metrics_namespaces: list[DNS_LABEL] = Field(
        default_factory=list, max_length=64,
        description="Namespaces whose pods may reach the metrics port (e.g. the monitoring namespace); the "
                    "operator's own namespace is added. Empty: any namespace. The ranks' own probes come from "
                    "their node.")
    api_key_secret: SecretKeyRef | None = Field(
        None, description="A Secret key holding the API key: requests on the HTTP and gRPC ports must then carry "
                          "`Authorization: Bearer <key>` (401 / UNAUTHENTICATED otherwise); health (/v2/health/*, "
                          "model ready) and /metrics stay open. Mounted into the front rank only; a new value in "
                          "the Secret takes effect within seconds, without a restart. Unset: no key.")
    router_replicas: NonNeg = Field(
        2, le=16,
        description="Router pods in front of the EP groups' front ranks (a Deployment `NAME-router`): the client "
                    "Service selects them; they retry a request whose front rank died on the replacement or on "
                    "another group's front, or answer 503 with Retry-After. 0: the Service selects the front "
                    "ranks directly.")
    router_node_selector: dict[str, LABEL_VALUE] | None = Field(
        None,
        description="Where the routers run: only nodes with all these labels. Unset: placement.nodeSelector, "
                    "the ranks' nodes. Set it to put the routers on CPU nodes apart from the GPU nodes, so that "
                    "a GPU node's death takes no router with it; {} lets them run on any node. The routers keep "
                    "placement.tolerations either way, and prefer nodes without this deployment's ranks.")

    @model_validator(mode="after")
    def _check(self) -> Serving:
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise SpecError("spec.serving", "httpPort, grpcPort and metricsPort must differ")
        if self.openai_port in (self.grpc_port, self.metrics_port):
            raise SpecError("spec.serving.openaiPort", OPENAI_PORT_CLASH)
        return self


# Attention TP rules that need two parts of the spec (CEL on the spec, and `MoEDeploymentSpec._check`).
ATTENTION_TP_HEADS = ("parallelism.attentionTensorParallel must divide model.architecture.numAttentionHeads "
                      "(each rank of a TP group computes numAttentionHeads / attentionTensorParallel heads)")
ATTENTION_TP_NODE = ("parallelism.attentionTensorParallel must divide placement.gpusPerNode (a TP group's "
                     "ranks share one node, and its NVLink)")


class MoEDeploymentSpec(_Model):
    """Desired state of one MoE model deployment."""

    cel: ClassVar[list[dict[str, str]]] = [
        {"rule": "self.parallelism.maxExpertsPerGpu != 1 || self.parallelism.expertParallelSize == "
                 "self.model.architecture.nRoutedExperts + self.parallelism.redundantExperts",
         "message": "with maxExpertsPerGpu 1, parallelism.expertParallelSize must equal "
                    "model.architecture.nRoutedExperts + parallelism.redundantExperts",
         "fieldPath": ".parallelism.expertParallelSize"},
        {"rule": "self.parallelism.expertParallelSize * self.parallelism.maxExpertsPerGpu >= "
                 "self.model.architecture.nRoutedExperts + self.parallelism.redundantExperts",
         "message": "parallelism.expertParallelSize * maxExpertsPerGpu must hold nRoutedExperts + redundantExperts",
         "fieldPath": ".parallelism.maxExpertsPerGpu"},
        {"rule": "self.loadBalancing.maxReplicasPerExpert <= self.parallelism.expertParallelSize",
         "message": "loadBalancing.maxReplicasPerExpert must be <= parallelism.expertParallelSize",
         "fieldPath": ".loadBalancing.maxReplicasPerExpert"},
        {"rule": "self.model.architecture.numAttentionHeads % self.parallelism.attentionTensorParallel == 0",
         "message": ATTENTION_TP_HEADS, "fieldPath": ".parallelism.attentionTensorParallel"},
        {"rule": "self.placement.gpusPerNode % self.parallelism.attentionTensorParallel == 0",
         "message": ATTENTION_TP_NODE, "fieldPath": ".parallelism.attentionTensorParallel"},
    ]

    model: ModelSource = Field(description="The model: checkpoint, architecture, precision.")
    parallelism: Parallelism = Field(default_factory=Parallelism, description="Expert, attention and replica parallelism.")
    placement: Placement = Field(default_factory=Placement, description="Node selection and topology-aware placement.")
    load_balancing: LoadBalancing = Field(default_factory=LoadBalancing, description="Load-driven expert replication.")
    worker: Worker = Field(default_factory=Worker, description="The rank container.")
    serving: Serving = Field(default_factory=Serving, description="Serving and metrics ports.")

    @property
    def physical_experts(self) -> int:
        return self.model.architecture.n_routed_experts + self.parallelism.redundant_experts

    @model_validator(mode="after")
    def _check(self) -> MoEDeploymentSpec:
        p, a = self.parallelism, self.model.architecture
        if p.max_experts_per_gpu == 1 and p.expert_parallel_size != self.physical_experts:
            raise SpecError("spec.parallelism.expertParallelSize",
                            f"with maxExpertsPerGpu 1, parallelism.expertParallelSize must equal "
                            f"model.architecture.nRoutedExperts + parallelism.redundantExperts "
                            f"({a.n_routed_experts} + {p.redundant_experts} = {self.physical_experts}), "
                            f"got {p.expert_parallel_size}")
        if p.expert_parallel_size * p.max_experts_per_gpu < self.physical_experts:
            raise SpecError("spec.parallelism.maxExpertsPerGpu",
                            "parallelism.expertParallelSize * maxExpertsPerGpu must hold nRoutedExperts + redundantExperts")
        if self.load_balancing.max_replicas_per_expert > p.expert_parallel_size:
            raise SpecError("spec.loadBalancing.maxReplicasPerExpert",
                            "loadBalancing.maxReplicasPerExpert must be <= parallelism.expertParallelSize")
        if a.num_attention_heads % p.attention_tensor_parallel:
            raise SpecError("spec.parallelism.attentionTensorParallel", f"{ATTENTION_TP_HEADS} "
                            f"({a.num_attention_heads} heads, attentionTensorParallel {p.attention_tensor_parallel})")
        if self.placement.gpus_per_node % p.attention_tensor_parallel:
            raise SpecError("spec.parallelism.attentionTensorParallel", f"{ATTENTION_TP_NODE} "
                            f"({self.placement.gpus_per_node} GPUs per node, attentionTensorParallel "
                            f"{p.attention_tensor_parallel})")
        return self


# --- status -------------------------------------------------------------------------------------


class Condition(_Model):
    """A standard Kubernetes condition."""

    type: str = Field(description="Condition type: Placed, Ready, Progressing, Degraded, MetricsAvailable.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field("", description="RFC 3339 time of the last status change.")
    observed_generation: int = Field(0, description="The .metadata.generation this condition was computed for.")


class HotExpert(_Model):
    """A logical expert that has replicas."""

    layer: int = Field(description="MoE layer index (0-based among MoE layers).")
    expert: int = Field(description="Logical expert id.")
    replicas: int = Field(description="Physical copies.")


class Prediction(_Model):
    """The performance model's estimate for this deployment (see `moe plan`)."""

    hardware: str = Field("", description="Hardware profile used.")
    memory_per_gpu_gib: float = Field(0.0, description="Predicted memory use per GPU, GiB.")
    decode_tokens_per_second_per_gpu: float = Field(0.0, description="Predicted decode output tokens/s per GPU.")
    time_per_output_token_ms: float = Field(0.0, description="Predicted time per output token, ms.")
    kv_cache_tokens_per_rank: int = Field(0, description="KV cache positions one rank may hold over all its sequences: GPU memory after weights, buffers and activations, per latent-cache token (rank pods' MOE_KV_CACHE_TOKENS). With attention TP, over its TP group's sequences, whose whole cache every rank of the group holds.")
    max_context: int = Field(0, description="Prompt + generated tokens one request may have: the model's context, clamped to kvCacheTokensPerRank when that is smaller (MOE_MAX_CONTEXT).")
    max_sequences_per_rank: int = Field(0, description="Sequences one rank serves at once (MOE_MAX_SEQS_PER_RANK); with attention TP, one TP group.")


class MissingRank(_Model):
    """A rank of a degraded EP group that is not serving."""

    rank: int = Field(description="Rank number in its group.")
    since: str = Field(description="RFC 3339 time since which it has been missing.")
    reason: str = Field("", description="Why, as last seen: pod gone, pod Failed (exit code), not Ready, ...")


class DegradedGroup(_Model):
    """An EP group that serves, or tries to, without some of its ranks."""

    group: int = Field(description="EP group index.")
    since: str = Field(description="RFC 3339 time since which the group has been missing a rank (kept while any is missing).")
    ready_ranks: int = Field(description="Ranks of the group Ready now.")
    ranks: int = Field(description="Ranks the group has when whole (expertParallelSize; scale-out ranks not counted).")
    missing_ranks: list[MissingRank] = Field(default_factory=list, description="The ranks missing, lowest first.")


class MoEDeploymentStatus(_Model):
    """Observed state, written only by the operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")

    phase: Literal["Pending", "Starting", "Ready", "Degraded", "Failed"] | None = Field(None, description="Pending, Starting, Ready, Degraded or Failed.")
    observed_generation: int | None = Field(None, description="The .metadata.generation the status describes.")
    conditions: list[Condition] = Field(default_factory=list, description="Placed, Ready, Progressing, Degraded.")
    ready_ranks: int | None = Field(None, description="Rank pods Ready.")
    total_ranks: int | None = Field(None, description="Rank pods wanted (all EP groups).")
    ready: str | None = Field(None, description="readyRanks/totalRanks, for kubectl get.")
    nodes_used: int | None = Field(None, description="Distinct nodes hosting rank pods.")
    extra_ranks: int | None = Field(None, description="Ranks added beyond expertParallelSize by load-driven scale-out.")
    expert_map_generation: int | None = Field(None, description="Generation of the expert map the ranks serve.")
    published_generation: int | None = Field(None, description="Highest expert-map generation ever published for this deployment (any group); a plan ConfigMap written again continues above it, so generations never go back.")
    imbalance: float | None = Field(None, description="Max rank load / mean rank load over the last window (1.0 is perfect).")
    hot_experts: list[HotExpert] = Field(default_factory=list, description="Experts that currently have replicas, hottest first (at most 32 listed).")
    last_rebalance_time: str | None = Field(None, description="When the expert map last changed because of load.")
    last_rebalance_reason: str | None = Field(None, description="Why it changed.")
    reason: str | None = Field(None, description="Why the deployment is not Ready, in words.")
    degraded_since: str | None = Field(None, description="RFC 3339 time since which some EP group has been missing a rank (phase Degraded); removed when every group is whole.")
    degraded_groups: list[DegradedGroup] | None = Field(None, description="The EP groups missing ranks: which, why, since when; removed when every group is whole.")
    prediction: Prediction | None = Field(None, description="Performance model estimate.")


# CEL rules on the whole object (the CRD's root schema): the deployment's name, which every object
# it owns is named after (see `names`), and the one rule that needs both the name and the spec.
NAME_CEL: list[dict[str, str]] = [{"rule": rule, "message": message} for rule, _, message in names.NAME_RULES]
API_KEY_IS_NOT_RANK_KEY = ("serving.apiKeySecret must not name the deployment's rank key Secret "
                           f"(NAME{names.RANK_KEY_SUFFIX}): clients would then hold the key ranks trust each other with")
ROOT_CEL: list[dict[str, str]] = [*NAME_CEL, {
    "rule": "!has(self.spec.serving) || !has(self.spec.serving.apiKeySecret) || "
            f"self.spec.serving.apiKeySecret.name != self.metadata.name + '{names.RANK_KEY_SUFFIX}'",
    "message": API_KEY_IS_NOT_RANK_KEY, "fieldPath": ".spec.serving.apiKeySecret.name"}]


def check_api_key_secret(name: str, spec: MoEDeploymentSpec) -> None:
    """Raise SpecError when the spec's API key Secret is the deployment's rank key Secret (ROOT_CEL's
    last rule, in Python)."""
    ref = spec.serving.api_key_secret
    if ref is not None and ref.name == names.rank_key_secret(name):
        raise SpecError("spec.serving.apiKeySecret.name", API_KEY_IS_NOT_RANK_KEY)


def check_name(name: str) -> None:
    """Raise SpecError when `name` cannot name a MoEDeployment (the CRD's NAME_CEL, in Python)."""
    problem = names.name_problem(name)
    if problem:
        raise SpecError("metadata.name", problem.removeprefix("metadata.name "))


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = ""
    namespace: str | None = None
    generation: int | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if v:  # a manifest without a name (generateName, or an offline `moe plan` input)
            check_name(v)
        return v


class MoEDeployment(BaseModel):
    """A whole MoEDeployment object as written in YAML."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    api_version: str = Field(f"{GROUP}/{VERSION}", alias="apiVersion")
    kind: Literal["MoEDeployment"] = "MoEDeployment"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: MoEDeploymentSpec

    @model_validator(mode="after")
    def _check(self) -> MoEDeployment:
        check_api_key_secret(self.metadata.name, self.spec)
        return self


def parse_spec(spec: dict[str, Any]) -> MoEDeploymentSpec:
    """Parse a spec dict; raise SpecError naming the field for the first problem."""
    try:
        return MoEDeploymentSpec.model_validate(spec)
    except ValidationError as e:
        raise spec_error_from(e, prefix="spec") from None


def parse_deployment(obj: dict[str, Any]) -> MoEDeployment:
    try:
        return MoEDeployment.model_validate(obj)
    except ValidationError as e:
        raise spec_error_from(e, prefix="") from None


def spec_error_from(e: ValidationError, prefix: str) -> SpecError:
    err = e.errors()[0]
    ctx = err.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, SpecError):
        return inner
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    return SpecError(field, err["msg"])
