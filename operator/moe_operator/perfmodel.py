"""Capacity and performance model: what a MoEDeployment costs and delivers before it runs.

Pure arithmetic on a parsed spec and a hardware profile; no Kubernetes, no torch. Everything is per
GPU and per step. Units inside: bytes, FLOPs, seconds; `GB` is 1e9 bytes.

- Memory: routed experts (FP8 e4m3 + 128x128 FP32 block scales, or BF16), shared experts, MLA
  attention, dense MLPs, router, embeddings and LM head (each in the checkpoint's precision, see
  `weight_precision`), MLA latent KV cache, activations at the peak of a layer, DeepEP buffers, and
  a fixed runtime reserve.
- Time: a roofline per operation (FLOPs at the profile's MFU, HBM bytes at its memory efficiency,
  whichever binds), dispatch/combine bytes as DeepEP counts them (FP8 + scales + 16 B per
  (token, expert) pair in low-latency mode, per destination node in normal mode; BF16 combine),
  NVLink inside a node and the NIC across nodes, and two-micro-batch overlap.

Assumptions are named where they are made; docs/perfmodel.md lists them with the calibration
against DeepSeek's published figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from moe_common.model_args import o_proj_splits
from moe_operator import api

GB = 1e9
GIB = float(2**30)

Phase = Literal["decode", "prefill"]

# DeepEP message sizes (tests/test_low_latency.py, csrc/config.hpp): an FP8 token carries one FP32
# scale per 128 channels; a low-latency dispatch message has a 16-byte header.
FP8_BLOCK = 128
LL_HEADER_BYTES = 16
# DeepEP normal-mode kernels take Buffer.num_sms = 20 SMs while they run (10 channels of 2 SMs).
NORMAL_MODE_COMM_SMS = 20
# Max/mean routed tokens per GPU. TensorRT-LLM measured DeepSeek-R1 on real traffic (tech blog 4):
# (max - mean)/mean = 0.109 with EPLB over 288 slots, 1.564 without EPLB.
IMBALANCE_WITH_EPLB = 1.11
IMBALANCE_WITHOUT_EPLB = 2.56
# Bytes per cached latent value (BF16), per KV-cache token per layer.
KV_BYTES = 2
# DeepSeek's Day-6 production figure: 20-22 output tok/s per user, i.e. ~50 ms per output token.
DEFAULT_TPOT_TARGET_S = 0.050
DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL_TOKENS = 16384  # per GPU per step: DeepSeek profile-data prefill setting
MAX_DECODE_BATCH = 4096
# Most sequences a rank admits by default (kv_admission): DeepSeek-V3 on an 80 GB Hopper fits
# fewer of 4096 tokens; the bound keeps tiny CPU demo models from admitting thousands per rank.
MAX_SEQS_PER_RANK = 256


class PerfModelError(ValueError):
    """A hardware profile or workload the model cannot use."""


# --- hardware -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """One GPU and its links. Rates are peaks; the efficiencies say how much of them is reached."""

    name: str
    memory_gb: float  # HBM capacity per GPU, GB (1e9 B)
    memory_tbs: float  # HBM bandwidth, TB/s
    fp8_tflops: float  # dense FP8 tensor-core peak (no sparsity)
    bf16_tflops: float  # dense BF16 tensor-core peak (MLA core, router, LM head)
    mfu: float = 0.6  # fraction of the tensor peak GEMMs and attention reach
    memory_efficiency: float = 0.8  # fraction of memory_tbs weight and KV reads reach
    nvlink_gbs: float = 200.0  # NVLink per GPU per direction, GB/s
    network_gbs: float = 50.0  # scale-out NIC per GPU per direction, GB/s (CX7 400 Gb/s)
    link_efficiency: float = 0.8  # fraction of link peaks all-to-all reaches
    link_latency_us: float = 20.0  # fixed cost of one dispatch or one combine call
    reserved_gb: float = 3.0  # CUDA context, GEMM/attention workspaces, allocator slack
    sms: int = 132
    gpus_per_node: int | None = None  # None: spec.placement.gpusPerNode
    description: str = ""

    def __post_init__(self) -> None:
        for f in ("memory_gb", "memory_tbs", "fp8_tflops", "bf16_tflops", "nvlink_gbs", "network_gbs", "sms"):
            if not getattr(self, f) > 0:
                raise PerfModelError(f"hardware {self.name!r}: {f} must be > 0, got {getattr(self, f)!r}")
        for f in ("mfu", "memory_efficiency", "link_efficiency"):
            if not 0 < getattr(self, f) <= 1:
                raise PerfModelError(f"hardware {self.name!r}: {f} must be in (0, 1], got {getattr(self, f)!r}")
        for f in ("link_latency_us", "reserved_gb"):
            if getattr(self, f) < 0:
                raise PerfModelError(f"hardware {self.name!r}: {f} must be >= 0, got {getattr(self, f)!r}")
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise PerfModelError(f"hardware {self.name!r}: gpus_per_node must be >= 1")

    @property
    def capacity(self) -> float:
        return self.memory_gb * GB

    @property
    def hbm_rate(self) -> float:
        return self.memory_tbs * 1e12 * self.memory_efficiency

    def flops_rate(self, dtype: str) -> float:
        peak = self.fp8_tflops if dtype == "fp8" else self.bf16_tflops
        return peak * 1e12 * self.mfu

    @property
    def nvlink_rate(self) -> float:
        return self.nvlink_gbs * 1e9 * self.link_efficiency

    @property
    def network_rate(self) -> float:
        return self.network_gbs * 1e9 * self.link_efficiency


# Hopper SXM figures from notes/deepseek-v3.md section 7. H800 NVLink: 400 GB/s bidirectional, 200 per
# direction; at 80% that is DeepSeek's "160 GB/s" (DeepEP measures 153-158). CX7: 50 GB/s; at 80%,
# 40 GB/s, DeepEP low-latency's 39-46 GB/s at EP64-256.
PROFILES: dict[str, Hardware] = {
    "brief": Hardware(
        name="brief", memory_gb=64, memory_tbs=1.8, fp8_tflops=400, bf16_tflops=400,
        description="design brief: 400 TFLOPS at 60% MFU, 64 GB at 1.8 TB/s at 80%; links assumed H800-like"),
    "h100": Hardware(
        name="h100", memory_gb=80, memory_tbs=3.35, fp8_tflops=1979, bf16_tflops=989, nvlink_gbs=450,
        description="H100 SXM 80 GB, NVLink 900 GB/s bidirectional, one CX7 400 Gb/s per GPU"),
    "h200": Hardware(
        name="h200", memory_gb=141, memory_tbs=4.8, fp8_tflops=1979, bf16_tflops=989, nvlink_gbs=450,
        description="H200 SXM 141 GB HBM3e, NVLink 900 GB/s bidirectional, one CX7 400 Gb/s per GPU"),
    "h800": Hardware(
        name="h800", memory_gb=80, memory_tbs=3.35, fp8_tflops=1979, bf16_tflops=989, nvlink_gbs=200,
        description="H800 SXM 80 GB, NVLink 400 GB/s bidirectional, one CX7 400 Gb/s per GPU"),
}

# Substrings of the `nvidia.com/gpu.product` node label (GPU feature discovery) -> profile.
_PRODUCT_HINTS = (("H800", "h800"), ("H200", "h200"), ("H100", "h100"))


def hardware(name: str) -> Hardware:
    """A built-in profile by name (case-insensitive)."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise PerfModelError(f"unknown hardware {name!r}; known: {', '.join(PROFILES)} "
                             f"(or a YAML/JSON profile file)") from None


def hardware_from_dict(d: dict[str, Any]) -> Hardware:
    """A user-defined profile: Hardware fields, optionally `base: h100` to start from a built-in."""
    if not isinstance(d, dict):
        raise PerfModelError("a hardware profile must be a mapping of field: value")
    d = dict(d)
    base = d.pop("base", None)
    names = {f for f in Hardware.__dataclass_fields__}
    unknown = sorted(set(d) - names)
    if unknown:
        raise PerfModelError(f"unknown hardware field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for k, v in d.items():
        if k in ("name", "description"):
            if not isinstance(v, str):
                raise PerfModelError(f"hardware field {k} must be a string")
        elif k == "gpus_per_node":
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise PerfModelError(f"hardware field {k} must be an integer")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PerfModelError(f"hardware field {k} must be a number, got {v!r}")
    if base is not None:
        return replace(hardware(str(base)), **{"name": d.pop("name", f"{base}-custom"), **d})
    missing = [f for f in ("name", "memory_gb", "memory_tbs", "fp8_tflops", "bf16_tflops") if f not in d]
    if missing:
        raise PerfModelError(f"hardware profile lacks {', '.join(missing)} (or give base: NAME)")
    return Hardware(**d)


def hardware_for_gpu_product(product: str) -> Hardware | None:
    """The profile for a `nvidia.com/gpu.product` label value such as NVIDIA-H100-80GB-HBM3."""
    for hint, name in _PRODUCT_HINTS:
        if hint in product.upper():
            return PROFILES[name]
    return None


# --- model sizes --------------------------------------------------------------------------------


def weight_precision(spec: api.MoEDeploymentSpec) -> str:
    """Precision of the linear layers. DeepSeek's FP8 checkpoint quantizes every linear layer
    (attention, dense MLP, shared and routed experts) with 128x128 block scales and keeps the
    embedding, LM head, router and norms in BF16; a BF16 checkpoint has no FP8 layer."""
    return spec.model.precision


def linear_bytes(out_dim: int, in_dim: int, dtype: str) -> int:
    """Bytes of one linear weight: FP8 + FP32 scales per 128x128 block, or BF16."""
    if dtype == "fp8":
        return out_dim * in_dim + 4 * math.ceil(out_dim / FP8_BLOCK) * math.ceil(in_dim / FP8_BLOCK)
    return 2 * out_dim * in_dim


def expert_bytes(hidden: int, inter: int, dtype: str) -> int:
    """One SwiGLU expert: w1, w3 (inter x hidden) and w2 (hidden x inter)."""
    return 2 * linear_bytes(inter, hidden, dtype) + linear_bytes(hidden, inter, dtype)


def _attention_shapes(a: api.Architecture, tp: int = 1,
                      o_split: bool = True) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(out, in) of one rank's MLA projections with attention TP `tp`, as the worker shards them:
    replicated on every rank of a TP group (q_a, kv_a: the latent is shared by all heads), and
    split by heads (rows of q_b and kv_b, columns of o_proj: nh / tp heads each; o_proj whole
    unless `o_split`, see `_o_proj_split`)."""
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    nh = a.num_attention_heads // tp
    replicated = [(a.kv_lora_rank + a.qk_rope_head_dim, a.hidden_size)]  # kv_a_proj_with_mqa
    split = [(nh * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),  # kv_b_proj
             (a.hidden_size, (nh if o_split else a.num_attention_heads) * a.v_head_dim)]  # o_proj
    if a.q_lora_rank:
        replicated.append((a.q_lora_rank, a.hidden_size))  # q_a_proj
        split.append((nh * qk, a.q_lora_rank))  # q_b_proj
    else:
        split.append((nh * qk, a.hidden_size))  # q_proj
    return replicated, split


def _o_proj_split(a: api.Architecture, tp: int, dtype: str) -> bool:
    """Whether the worker splits o_proj's columns over a TP group (`o_proj_splits`); an o_proj
    kept whole on every rank projects that rank's 1/tp of the tokens (the same FLOPs)."""
    return o_proj_splits(a.num_attention_heads, a.v_head_dim, tp, dtype == "fp8")


def attention_params(a: api.Architecture) -> int:
    """Linear parameters of one MLA layer (all heads)."""
    rep, split = _attention_shapes(a)
    return sum(o * i for o, i in rep + split)


def kv_bytes_per_token(a: api.Architecture) -> int:
    """MLA latent cache: kv_lora_rank + qk_rope_head_dim values per layer, BF16."""
    return a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * KV_BYTES


# --- workload -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one step processes on each GPU."""

    phase: Phase = "decode"
    batch: float = 128  # tokens each GPU feeds its MoE layers per step (decode: sequences per GPU)
    context: int = DEFAULT_CONTEXT  # decode: mean KV length per sequence; prefill: prompt length
    cache_hit: float = 0.0  # prefill: fraction of each prompt already in the prefix cache
    micro_batches: int = 2  # 2: two-micro-batch overlap of compute and all-to-all; 1: none
    imbalance: float | None = None  # max/mean routed tokens per GPU; None: default_imbalance(spec)

    def __post_init__(self) -> None:
        if self.phase not in ("decode", "prefill"):
            raise PerfModelError(f"phase must be decode or prefill, got {self.phase!r}")
        if not self.batch > 0:
            raise PerfModelError(f"batch must be > 0, got {self.batch!r}")
        if self.context < 1:
            raise PerfModelError(f"context must be >= 1, got {self.context!r}")
        if not 0 <= self.cache_hit < 1:
            raise PerfModelError(f"cache_hit must be in [0, 1), got {self.cache_hit!r}")
        if self.micro_batches not in (1, 2):
            raise PerfModelError(f"micro_batches must be 1 or 2, got {self.micro_batches!r}")
        if self.imbalance is not None and self.imbalance < 1:
            raise PerfModelError(f"imbalance is max/mean and must be >= 1, got {self.imbalance!r}")


def default_imbalance(spec: api.MoEDeploymentSpec) -> float:
    """Max/mean routed load per GPU: measured values with and without load-driven replication."""
    if spec.load_balancing.enabled and spec.parallelism.redundant_experts > 0:
        return IMBALANCE_WITH_EPLB
    return IMBALANCE_WITHOUT_EPLB


@dataclass(frozen=True)
class _Layout:
    """Numbers derived once from spec + hardware."""

    gpus: int
    gpus_per_node: int
    nodes: int
    tp: int  # attention tensor parallel
    slots_per_gpu: int  # physical routed experts per GPU per MoE layer
    dtype: str
    imbalance: float


def _layout(spec: api.MoEDeploymentSpec, hw: Hardware, w: Workload) -> _Layout:
    p = spec.parallelism
    gpn = hw.gpus_per_node or spec.placement.gpus_per_node
    g = p.expert_parallel_size
    return _Layout(
        gpus=g, gpus_per_node=min(gpn, g), nodes=math.ceil(g / gpn), tp=p.attention_tensor_parallel,
        slots_per_gpu=math.ceil(spec.physical_experts / g), dtype=weight_precision(spec),
        imbalance=w.imbalance if w.imbalance is not None else default_imbalance(spec))


# --- memory -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU."""

    routed_experts: float
    shared_experts: float
    attention: float
    dense_mlp: float
    embeddings: float  # token embedding + LM head
    router_and_norms: float
    kv_cache: float
    activations: float
    comm_buffers: float
    runtime_reserved: float
    capacity: float
    kv_tokens: float = 0.0  # latent-cache tokens held per GPU

    ROWS = ("routed_experts", "shared_experts", "attention", "dense_mlp", "embeddings", "router_and_norms",
            "kv_cache", "activations", "comm_buffers", "runtime_reserved")

    @property
    def weights(self) -> float:
        return (self.routed_experts + self.shared_experts + self.attention + self.dense_mlp
                + self.embeddings + self.router_and_norms)

    @property
    def total(self) -> float:
        return sum(getattr(self, r) for r in self.ROWS)

    @property
    def free(self) -> float:
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def rows(self) -> list[tuple[str, float]]:
        return [(r, getattr(self, r)) for r in self.ROWS]

    def to_dict(self) -> dict[str, float]:
        d = {r: v for r, v in self.rows()}
        d.update(weights=self.weights, total=self.total, capacity=self.capacity, free=self.free,
                 kv_tokens=self.kv_tokens)
        return d


def weight_bytes(spec: api.MoEDeploymentSpec) -> dict[str, float]:
    """Weight bytes per GPU by kind (see MemoryBreakdown for the keys)."""
    a, p = spec.model.architecture, spec.parallelism
    dt = weight_precision(spec)
    tp = p.attention_tensor_parallel
    slots = math.ceil(spec.physical_experts / p.expert_parallel_size)
    h = a.hidden_size
    rep, split = _attention_shapes(a, tp, _o_proj_split(a, tp, dt))
    attn_linear = sum(linear_bytes(o, i, dt) for o, i in rep + split)
    # q_a_layernorm, kv_a_layernorm (BF16)
    attn_norms = 2 * (a.kv_lora_rank + (a.q_lora_rank or 0))
    return {
        "routed_experts": a.moe_layers * slots * expert_bytes(h, a.moe_intermediate_size, dt),
        "shared_experts": a.moe_layers * (expert_bytes(h, a.n_shared_experts * a.moe_intermediate_size, dt)
                                          if a.n_shared_experts else 0),
        "attention": a.num_hidden_layers * (attn_linear + attn_norms),
        # Dense MLPs are replicated (DeepSeek: "dense MLPs in the shallow layers use TP1").
        "dense_mlp": a.first_k_dense_replace * expert_bytes(h, a.intermediate_size, dt),
        # Token embedding and LM head, BF16, whole on every rank (attention TP splits only the heads).
        "embeddings": 2 * 2 * a.vocab_size * h,
        # Router weight BF16 + FP32 correction bias per MoE layer; two RMSNorms per layer + final (BF16).
        "router_and_norms": a.moe_layers * (2 * a.n_routed_experts * h + 4 * a.n_routed_experts)
                            + 2 * (2 * a.num_hidden_layers + 1) * h,
    }


def _kv_tokens(w: Workload, lay: _Layout) -> float:
    """Latent-cache tokens each GPU holds. With attention TP the latent is shared by all heads, so
    every rank of a TP group keeps the whole cache of the group's sequences (tp x batch of them)."""
    if w.phase == "decode":
        return lay.tp * w.batch * w.context
    return lay.tp * w.batch / (1 - w.cache_hit)  # the chunk's prompts, cached prefix included


def _activation_bytes(a: api.Architecture, w: Workload, lay: _Layout) -> float:
    """Peak live activations in one layer for the whole step batch (both micro-batches)."""
    h, b, nh = a.hidden_size, w.batch, a.num_attention_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    # residual stream, normed input, layer output (BF16): attention runs on the TP group's t*b tokens
    residual = lay.tp * b * h * 2 * 3
    if w.phase == "decode":
        # absorbed MLA: per head a latent query and a latent output; t*b tokens x nh/t heads
        attn = b * nh * (2 * a.kv_lora_rank + a.qk_rope_head_dim) * 2
        sequences = b
    else:
        # naive MLA with FlashAttention: q, k, v for the new tokens and k, v expanded for the cached prefix
        attn = b * nh * (2 * qk + a.v_head_dim) * 2 + b / (1 - w.cache_hit) * nh * (qk + a.v_head_dim) * 2
        sequences = b / (w.context * (1 - w.cache_hit))
    i = a.moe_intermediate_size
    pair = (h + 4 * h / FP8_BLOCK) + 2 * i * 2 + (i + 4 * i / FP8_BLOCK) + 2 * h  # recv FP8, gate/up, act, down
    moe = b * a.num_experts_per_tok * lay.imbalance * pair
    di = a.intermediate_size
    dense = b * (2 * di * 2 + di + 2 * h)
    # FP32 logits for sampling; with attention TP the group's first rank samples all t*seq of its sequences
    logits = lay.tp * sequences * a.vocab_size * 4
    return residual + max(attn, moe, dense) + logits


def comm_buffer_bytes(spec: api.MoEDeploymentSpec, hw: Hardware, w: Workload) -> float:
    """DeepEP buffers. Decode: the low-latency layout (csrc/config.hpp LowLatencyLayout) for
    ceil(batch / micro_batches) tokens per rank, two symmetric send/receive buffers sized for every
    expert. Prefill: normal-mode NVLink and RDMA ring buffers (Config.get_*_buffer_size_hint with
    num_sms 20, 288 NVLink and 128 RDMA chunked receive tokens)."""
    a = spec.model.architecture
    h = a.hidden_size
    lay = _layout(spec, hw, w)
    if w.phase == "decode":
        t = math.ceil(w.batch / w.micro_batches)
        e = spec.physical_experts
        dispatch_msg = LL_HEADER_BYTES + max(2 * h, h + 4 * h // FP8_BLOCK)
        combine_msg = 4 * (h // FP8_BLOCK) + 2 * h
        send = max(t * dispatch_msg, e * t * combine_msg)
        recv = e * t * max(dispatch_msg, combine_msg)
        signal = math.ceil(e * 4 / 128) * 128
        return 2 * (send + recv + signal)
    channels = NORMAL_MODE_COMM_SMS // 2
    per_token = 2 * h + 128 * (8 + 4 + 4) + LL_HEADER_BYTES  # BF16 x, top-k idx/weights, scales, meta
    nvl = channels * min(lay.gpus, 8) * 288 * per_token
    rdma = 2 * channels * lay.nodes * 128 * per_token if lay.nodes > 1 else 0
    return nvl + rdma


def memory(spec: api.MoEDeploymentSpec, hw: Hardware, w: Workload | None = None) -> MemoryBreakdown:
    """Memory per GPU for a workload (default: decode, 128 sequences of 4096 tokens)."""
    w = w or Workload()
    a = spec.model.architecture
    lay = _layout(spec, hw, w)
    kv_tokens = _kv_tokens(w, lay)
    return MemoryBreakdown(
        **weight_bytes(spec),
        kv_cache=kv_tokens * kv_bytes_per_token(a),
        activations=_activation_bytes(a, w, lay),
        comm_buffers=comm_buffer_bytes(spec, hw, w),
        runtime_reserved=hw.reserved_gb * GB,
        capacity=hw.capacity,
        kv_tokens=kv_tokens,
    )


# --- time ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operation of one micro-batch on one GPU."""

    name: str
    time: float  # s
    bound: str  # compute | memory | nvlink | network | latency
    flops: float = 0.0
    bytes: float = 0.0  # HBM bytes, or link bytes for all-to-all


def _roofline(name: str, hw: Hardware, flops: float, hbm: float, dtype: str) -> Op:
    tc, tm = flops / hw.flops_rate(dtype), hbm / hw.hbm_rate
    return Op(name, max(tc, tm), "compute" if tc >= tm else "memory", flops, hbm)


def _gemm(name: str, hw: Hardware, tokens: float, shapes: list[tuple[int, int]], dtype: str,
          weight_bytes_: float) -> Op:
    """Linear layers: 2*out*in FLOPs per token; the weights are read once, activations in and out."""
    act_in = 1 + 4 / FP8_BLOCK if dtype == "fp8" else 2
    flops = sum(2 * o * i for o, i in shapes) * tokens
    act = sum(tokens * (i * act_in + o * 2) for o, i in shapes)
    return _roofline(name, hw, flops, weight_bytes_ + act, dtype)


@dataclass(frozen=True)
class LayerCost:
    """One kind of layer (dense or MoE), per micro-batch, and its time within the step."""

    kind: str  # dense | moe
    count: int
    compute_ops: tuple[Op, ...]
    comm_ops: tuple[Op, ...]
    layer_time: float  # s, whole step batch, after overlap

    @property
    def compute(self) -> float:
        return sum(o.time for o in self.compute_ops)

    @property
    def comm(self) -> float:
        return sum(o.time for o in self.comm_ops)

    @property
    def bound(self) -> str:
        """What binds the layer: the all-to-all, or the biggest compute op's resource."""
        if self.comm_ops and self.comm >= self.compute:
            return max(self.comm_ops, key=lambda o: o.time).bound
        return max(self.compute_ops, key=lambda o: o.time).bound

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, "layer_time_s": self.layer_time,
                "compute_s": self.compute, "comm_s": self.comm, "bound": self.bound,
                "ops": [asdict(o) for o in self.compute_ops + self.comm_ops]}


def _node_hit_probability(a: api.Architecture, nodes: int) -> float:
    """Probability that a token routes to at least one expert on a given node. With n_group a
    multiple of the node count, groups align with nodes (the planner's TopologyAware layout) and a
    token picks topk_group groups; otherwise its top-k experts land on uniformly random nodes."""
    if nodes <= 1:
        return 1.0
    if a.n_group % nodes == 0:
        per_node = a.n_group // nodes
        return 1 - math.comb(a.n_group - per_node, a.topk_group) / math.comb(a.n_group, a.topk_group)
    return 1 - (1 - 1 / nodes) ** a.num_experts_per_tok


def _all_to_all(spec: api.MoEDeploymentSpec, hw: Hardware, w: Workload, lay: _Layout, m: float) -> list[Op]:
    """Dispatch (FP8 + scales) and combine (BF16) of one micro-batch of m tokens per GPU. Receive
    load is imbalanced like the experts' load, so bytes are scaled by the imbalance factor."""
    a = spec.model.architecture
    h, k = a.hidden_size, a.num_experts_per_tok
    fp8_token = h + 4 * h / FP8_BLOCK
    bf16_token = 2 * h
    ops = []
    for name, token_bytes, header in (("dispatch", fp8_token, LL_HEADER_BYTES), ("combine", bf16_token, 0)):
        if lay.gpus == 1:
            continue
        if w.phase == "decode":
            # low-latency kernels: one message per (token, expert) pair; pairs bound for this node
            # go over NVLink, the rest over the NIC
            local = lay.gpus_per_node / lay.gpus
            pairs = m * k * lay.imbalance
            nvl = pairs * local * (token_bytes + header)
            net = pairs * (1 - local) * (token_bytes + header)
        else:
            # normal kernels: one RDMA copy per (token, remote node), forwarded inside the node over NVLink
            remote_nodes = (lay.nodes - 1) * _node_hit_probability(a, lay.nodes)
            net = m * lay.imbalance * remote_nodes * token_bytes
            nvl = m * k * lay.imbalance * token_bytes
        t_nvl, t_net = nvl / hw.nvlink_rate, net / hw.network_rate
        latency = hw.link_latency_us * 1e-6
        bound = "network" if t_net >= t_nvl else "nvlink"
        if latency > max(t_nvl, t_net):
            bound = "latency"
        ops.append(Op(name, max(t_nvl, t_net) + latency, bound, 0.0, nvl + net))
    return ops


def _layer_ops(spec: api.MoEDeploymentSpec, hw: Hardware, w: Workload, lay: _Layout, m: float,
               moe: bool) -> tuple[list[Op], list[Op]]:
    """Compute-stream ops and all-to-all ops of one layer for a micro-batch of m tokens per GPU."""
    a = spec.model.architecture
    dt = lay.dtype
    h, nh = a.hidden_size, a.num_attention_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    wb = weight_bytes(spec)
    ops: list[Op] = []

    # MLA projections: with attention TP each rank computes the TP group's t*m tokens, the latent
    # projections whole and its 1/t of the heads, and reads its shard of the weights.
    rep, split = _attention_shapes(a, lay.tp)
    attn_w = wb["attention"] / a.num_hidden_layers
    ops.append(_gemm("attention_proj", hw, lay.tp * m, rep + split, dt, attn_w))
    if w.phase == "decode":
        # Absorbed MLA over the latent cache (BF16): scores over kv_lora+rope, output over kv_lora.
        ctx = w.context
        flops = m * 2 * nh * ctx * (2 * a.kv_lora_rank + a.qk_rope_head_dim)
        hbm = lay.tp * m * ctx * (a.kv_lora_rank + a.qk_rope_head_dim) * KV_BYTES
        ops.append(_roofline("attention_core", hw, flops, hbm, "bf16"))
    else:
        # Naive MLA for prefill: expand the latent of the whole prompt (cached prefix included) to
        # per-head K and V, then causal attention of the new tokens (mean key position (c + S) / 2).
        s = w.context
        c = w.cache_hit * s
        expand = m / (1 - w.cache_hit) * 2 * nh * (a.qk_nope_head_dim + a.v_head_dim) * a.kv_lora_rank
        attn = m * 2 * nh * (c + s) / 2 * (qk + a.v_head_dim)
        hbm = (m / (1 - w.cache_hit)) * (nh * (qk + a.v_head_dim) * 2
                                         + lay.tp * (a.kv_lora_rank + a.qk_rope_head_dim) * KV_BYTES)
        ops.append(_roofline("attention_core", hw, expand + attn, hbm, "bf16"))
    if lay.tp > 1:
        # As the worker does it: a reduce-scatter of o_proj's partial sums (T = t*m tokens x hidden,
        # BF16) leaves each rank its m tokens for the FFN (the MoE sees no token twice), and an
        # all-gather of the FFN's output puts the T rows back for the next attention. Per rank each
        # moves (t - 1)/t x T x hidden x 2 bytes over NVLink (a TP group shares a node): together
        # one all-reduce's worth, 2 (t - 1) m hidden x 2 bytes.
        nbytes = 2 * (lay.tp - 1) * m * h * 2
        ops.append(Op("attention_tp_comm", nbytes / hw.nvlink_rate, "nvlink", 0.0, nbytes))

    comm: list[Op] = []
    if not moe:
        ops.append(_gemm("dense_mlp", hw, m, [(a.intermediate_size, h)] * 2 + [(h, a.intermediate_size)], dt,
                         wb["dense_mlp"] / max(a.first_k_dense_replace, 1)))
        return ops, comm

    router_w = 2 * a.n_routed_experts * h
    ops.append(_roofline("router", hw, m * 2 * h * a.n_routed_experts, router_w + m * h * 2, "bf16"))
    if a.n_shared_experts:
        si = a.n_shared_experts * a.moe_intermediate_size
        ops.append(_gemm("shared_experts", hw, m, [(si, h)] * 2 + [(h, si)], dt, wb["shared_experts"] / a.moe_layers))
    # Routed experts: every GPU receives m * top-k (token, expert) pairs on average, the busiest
    # `imbalance` times that; it reads each of its experts' weights once per micro-batch.
    pairs = m * a.num_experts_per_tok * lay.imbalance
    i = a.moe_intermediate_size
    ops.append(_gemm("routed_experts", hw, pairs, [(i, h)] * 2 + [(h, i)], dt, wb["routed_experts"] / a.moe_layers))
    comm = _all_to_all(spec, hw, w, lay, m)
    return ops, comm


@dataclass(frozen=True)
class StepEstimate:
    """One step on one GPU, and what it delivers."""

    hardware: str
    workload: Workload
    imbalance: float
    layers: tuple[LayerCost, ...]
    head_time: float  # LM head (and sampling logits), s
    step_time: float  # s
    memory: MemoryBreakdown
    gpus: int
    gpus_per_node: int

    @property
    def tokens_per_s_per_gpu(self) -> float:
        """Tokens computed per second per GPU: output tokens (decode) or uncached prompt tokens (prefill)."""
        return self.workload.batch / self.step_time

    @property
    def tokens_per_s_per_node(self) -> float:
        return self.tokens_per_s_per_gpu * self.gpus_per_node

    @property
    def input_tokens_per_s_per_node(self) -> float:
        """Prefill: prompt tokens per second per node counting cache hits, as DeepSeek reports them."""
        return self.tokens_per_s_per_node / (1 - self.workload.cache_hit)

    @property
    def time_per_output_token(self) -> float:
        """Decode: each sequence gets one token per step."""
        return self.step_time

    @property
    def bound(self) -> str:
        return max(self.layers, key=lambda lc: lc.count * lc.layer_time).bound

    def to_dict(self) -> dict[str, Any]:
        w = self.workload
        d: dict[str, Any] = {
            "hardware": self.hardware, "phase": w.phase, "batch_per_gpu": w.batch, "context": w.context,
            "micro_batches": w.micro_batches, "imbalance": self.imbalance, "step_time_s": self.step_time,
            "bound": self.bound, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "tokens_per_s_per_node": self.tokens_per_s_per_node, "gpus": self.gpus,
            "gpus_per_node": self.gpus_per_node, "head_time_s": self.head_time,
            "layers": [lc.to_dict() for lc in self.layers], "memory": self.memory.to_dict(),
            "fits_memory": self.memory.fits,
        }
        if w.phase == "decode":
            d["time_per_output_token_s"] = self.time_per_output_token
        else:
            d["cache_hit"] = w.cache_hit
            d["input_tokens_per_s_per_node"] = self.input_tokens_per_s_per_node
        return d


def step(spec: api.MoEDeploymentSpec, hw: Hardware, w: Workload | None = None) -> StepEstimate:
    """Time of one step with the workload's batch on every GPU.

    Per layer and micro-batch of m = batch / micro_batches tokens: c = sum of the compute-stream ops
    (each its own roofline), x = dispatch + combine. Without overlap a layer takes c + x for the
    whole batch. With two micro-batches one's all-to-all runs while the other computes, so each
    resource serves both: 2 * max(c * s, x), where s = sms / (sms - 20) in prefill for the SMs
    DeepEP's normal kernels take, and 1 in decode (low-latency receives use hooks, no SMs). Weight
    reads are paid once per micro-batch, so overlap costs at small memory-bound batches."""
    w = w or Workload()
    a = spec.model.architecture
    lay = _layout(spec, hw, w)
    m = w.batch / w.micro_batches
    slow = 1.0
    if w.micro_batches > 1 and w.phase == "prefill" and lay.gpus > 1:
        slow = hw.sms / (hw.sms - NORMAL_MODE_COMM_SMS)
    layers = []
    for kind, count in (("dense", a.first_k_dense_replace), ("moe", a.moe_layers)):
        if not count:
            continue
        ops, comm = _layer_ops(spec, hw, w, lay, m, kind == "moe")
        c, x = sum(o.time for o in ops), sum(o.time for o in comm)
        t = c + x if w.micro_batches == 1 else w.micro_batches * max(c * slow, x)
        layers.append(LayerCost(kind, count, tuple(ops), tuple(comm), t))
    # LM head once for the step batch: decode samples every sequence; prefill only each prompt's last token.
    # With attention TP the group's first rank runs it for the group's t x that (the others wait).
    seqs = lay.tp * (w.batch if w.phase == "decode" else w.batch / (w.context * (1 - w.cache_hit)))
    head = _roofline("lm_head", hw, seqs * 2 * a.vocab_size * a.hidden_size,
                     weight_bytes(spec)["embeddings"] / 2, "bf16").time
    total = sum(lc.count * lc.layer_time for lc in layers) + head
    return StepEstimate(hardware=hw.name, workload=w, imbalance=lay.imbalance, layers=tuple(layers),
                        head_time=head, step_time=total, memory=memory(spec, hw, w), gpus=lay.gpus,
                        gpus_per_node=lay.gpus_per_node)


# --- limits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchLimit:
    """The largest batch per GPU under memory and (decode) a time-per-output-token target."""

    batch: int  # 0: not even one fits
    binding: str  # memory | latency | cap
    estimate: StepEstimate | None  # at `batch`; None when batch is 0
    tpot_target: float | None


def max_batch(spec: api.MoEDeploymentSpec, hw: Hardware, phase: Phase = "decode", *,
              context: int = DEFAULT_CONTEXT, tpot_target: float | None = DEFAULT_TPOT_TARGET_S,
              cache_hit: float = 0.0, micro_batches: int = 2, imbalance: float | None = None,
              cap: int | None = None) -> BatchLimit:
    """Binary search: memory use and step time both grow with the batch."""
    cap = cap or (MAX_DECODE_BATCH if phase == "decode" else 1 << 20)

    def est(b: int) -> StepEstimate:
        return step(spec, hw, Workload(phase, b, context, cache_hit, micro_batches, imbalance))

    def why_not(e: StepEstimate) -> str | None:
        if not e.memory.fits:
            return "memory"
        if phase == "decode" and tpot_target is not None and e.step_time > tpot_target:
            return "latency"
        return None

    first = est(1)
    if why_not(first):
        return BatchLimit(0, why_not(first) or "", None, tpot_target)
    top = est(cap)
    if why_not(top) is None:
        return BatchLimit(cap, "cap", top, tpot_target)
    lo, hi = 1, cap  # est(lo) passes, est(hi) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if why_not(est(mid)) is None:
            lo = mid
        else:
            hi = mid
    return BatchLimit(lo, why_not(est(hi)) or "", est(lo), tpot_target)


# --- plan, admission, status --------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What `moe plan` prints: decode at its largest batch, prefill at its batch, and whether it fits."""

    hardware: Hardware
    decode: BatchLimit
    prefill: StepEstimate
    admission: MemoryBreakdown  # weights + buffers + one sequence of `context` tokens

    @property
    def fits(self) -> bool:
        return self.admission.fits

    def prediction(self) -> api.Prediction:
        d = self.decode.estimate
        return api.Prediction(
            hardware=self.hardware.name,
            memory_per_gpu_gib=round((d.memory.total if d else self.admission.total) / GIB, 2),
            decode_tokens_per_second_per_gpu=round(d.tokens_per_s_per_gpu, 1) if d else 0.0,
            time_per_output_token_ms=round(d.time_per_output_token * 1e3, 2) if d else 0.0)

    def to_dict(self) -> dict[str, Any]:
        d = self.decode
        return {
            "hardware": asdict(self.hardware),
            "fits": self.fits,
            "admission_memory": self.admission.to_dict(),
            "decode": {"max_batch_per_gpu": d.batch, "binding": d.binding, "tpot_target_s": d.tpot_target,
                       "estimate": d.estimate.to_dict() if d.estimate else None},
            "prefill": self.prefill.to_dict(),
            "prediction": self.prediction().model_dump(by_alias=True),
        }


def admission_memory(spec: api.MoEDeploymentSpec, hw: Hardware, context: int = DEFAULT_CONTEXT) -> MemoryBreakdown:
    """Memory with the smallest useful load: one decode sequence of `context` tokens per GPU."""
    return memory(spec, hw, Workload("decode", 1, context, micro_batches=1))


def check_fits(spec: api.MoEDeploymentSpec, hw: Hardware, context: int = DEFAULT_CONTEXT) -> tuple[bool, str]:
    """For admission: (fits, one-line message with the breakdown in GB)."""
    m = admission_memory(spec, hw, context)
    parts = ", ".join(f"{name.replace('_', ' ')} {v / GB:.1f}" for name, v in m.rows() if v)
    verdict = "fits" if m.fits else "does not fit"
    return m.fits, (f"{verdict}: {m.total / GB:.1f} GB of {m.capacity / GB:.0f} GB per GPU on {hw.name} "
                    f"with one sequence of {context} tokens ({parts})")


def plan(spec: api.MoEDeploymentSpec, hw: Hardware, *, context: int = DEFAULT_CONTEXT,
         tpot_target: float | None = DEFAULT_TPOT_TARGET_S, decode_batch: int | None = None,
         prefill_tokens: int = DEFAULT_PREFILL_TOKENS, prompt: int = DEFAULT_CONTEXT, cache_hit: float = 0.0,
         micro_batches: int = 2, imbalance: float | None = None) -> Plan:
    if decode_batch is not None:
        e = step(spec, hw, Workload("decode", decode_batch, context, 0.0, micro_batches, imbalance))
        limit = BatchLimit(decode_batch, "given", e, tpot_target)
    else:
        limit = max_batch(spec, hw, "decode", context=context, tpot_target=tpot_target,
                          micro_batches=micro_batches, imbalance=imbalance)
    pre = step(spec, hw, Workload("prefill", prefill_tokens, prompt, cache_hit, micro_batches, imbalance))
    return Plan(hw, limit, pre, admission_memory(spec, hw, context))


# --- KV admission on each rank ------------------------------------------------------------------


@dataclass(frozen=True)
class KvAdmission:
    """What one rank may admit, from the memory model; set on rank pods as MOE_KV_CACHE_TOKENS,
    MOE_MAX_CONTEXT and MOE_MAX_SEQS_PER_RANK (the worker admits a sequence while its rank holds
    fewer than `max_seqs` and the sum of their cache positions stays within `cache_tokens`).

    With attention TP the worker counts a TP group's sequences on its first rank, and every rank of
    the group holds all of their cache: both limits are then the TP group's."""

    cache_tokens: int  # latent-cache positions one rank may hold over all its (its TP group's) sequences
    max_context: int  # prompt + generated tokens of one sequence: the model's, at most `cache_tokens`
    max_seqs: int  # sequences per rank (per TP group): tp x the per-GPU batch activations and buffers are sized for
    model_context: int  # what the model (or the spec's MOE_MAX_CONTEXT) allows, before the budget

    @property
    def clamped(self) -> bool:
        return self.max_context < self.model_context


def kv_admission(spec: api.MoEDeploymentSpec, hw: Hardware, *, max_seqs: int | None = None,
                 max_context: int | None = None, typical_context: int = DEFAULT_CONTEXT) -> KvAdmission:
    """Per-rank KV budget: GPU memory left after weights, buffers and activations for `max_seqs`
    sequences and the runtime reserve, divided by the latent cache's bytes per token
    ((kv_lora_rank + qk_rope_head_dim) x BF16 x layers). With attention TP `tp` every rank of a TP
    group holds the group's whole cache and the group serves `max_seqs` sequences together (tp x
    a DP rank's per-GPU batch, whose tokens the FFN splits over the group's ranks), so the budget
    and the count are the group's, as the worker's scheduler counts them.

    `max_seqs` (the spec's, when it sets one) default: as many sequences of `typical_context`
    tokens as the budget holds (tp x the largest per-GPU decode batch that fits in memory, which
    sizes the activations and buffers too), at least tp and at most tp x MAX_SEQS_PER_RANK. `max_context` (the
    spec's) default: max_position_embeddings; clamped to the budget when the budget is smaller
    (`clamped`). The budget is at most max_seqs x max_context: beyond that the count binds first.
    Raises PerfModelError when it holds not even two positions (`check_fits` refuses such a
    deployment before).
    """
    a = spec.model.architecture
    model_context = min(max_context or a.max_position_embeddings, a.max_position_embeddings)
    typical = max(1, min(typical_context, model_context))
    tp = spec.parallelism.attention_tensor_parallel
    if max_seqs is None:
        lim = max_batch(spec, hw, "decode", context=typical, tpot_target=None, cap=MAX_SEQS_PER_RANK)
        max_seqs = tp * max(1, lim.batch)
    fixed = memory(spec, hw, Workload("decode", max_seqs / tp, 1, micro_batches=2))  # per-GPU batch
    free = fixed.capacity - (fixed.total - fixed.kv_cache)
    tokens = int(free // kv_bytes_per_token(a))
    if tokens < 2:
        raise PerfModelError(f"no GPU memory left for the KV cache on {hw.name}: {free / GB:.1f} GB after weights, "
                             f"buffers and activations for {max_seqs} sequences")
    tokens = min(tokens, max_seqs * model_context)
    return KvAdmission(cache_tokens=tokens, max_context=min(model_context, tokens), max_seqs=max_seqs,
                       model_context=model_context)


# --- EP sweep -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRow:
    gpus: int
    experts_per_gpu: int
    redundant_experts: int
    layout: str  # one-per-gpu | colocated
    limit: BatchLimit | None  # None: the layout is not valid at this size
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        e = self.limit.estimate if self.limit else None
        return {"gpus": self.gpus, "layout": self.layout, "experts_per_gpu": self.experts_per_gpu,
                "redundant_experts": self.redundant_experts, "note": self.note,
                "max_batch_per_gpu": self.limit.batch if self.limit else 0,
                "binding": self.limit.binding if self.limit else None,
                "imbalance": e.imbalance if e else None,
                "tokens_per_s_per_gpu": e.tokens_per_s_per_gpu if e else 0.0,
                "tokens_per_s_per_node": e.tokens_per_s_per_node if e else 0.0,
                "tokens_per_s_total": e.tokens_per_s_per_gpu * self.gpus if e else 0.0,
                "time_per_output_token_s": e.time_per_output_token if e else None,
                "memory_per_gpu": e.memory.total if e else None}


def with_layout(spec: api.MoEDeploymentSpec, gpus: int, experts_per_gpu: int) -> api.MoEDeploymentSpec:
    """The spec on `gpus` GPUs with `experts_per_gpu` routed slots each; spare slots become replicas."""
    d = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    e = spec.model.architecture.n_routed_experts
    par = d["parallelism"]
    par.pop("attentionDataParallel", None)
    par.update(expertParallelSize=gpus, maxExpertsPerGpu=experts_per_gpu,
               redundantExperts=gpus * experts_per_gpu - e, allowSmallExpertParallel=True)
    lb = d.setdefault("loadBalancing", {})
    lb["maxReplicasPerExpert"] = min(lb.get("maxReplicasPerExpert", 4), gpus)
    return api.parse_spec(d)


def with_attention_tp(spec: api.MoEDeploymentSpec, tp: int) -> api.MoEDeploymentSpec:
    """The spec with attention TP `tp` (and attention DP EP / tp) instead of its own (`moe plan
    --attention-tp`). SpecError when the API refuses that layout (`tp` must divide the EP size,
    the attention heads and the GPUs per node)."""
    d = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    d["parallelism"].pop("attentionDataParallel", None)
    d["parallelism"]["attentionTensorParallel"] = tp
    return api.parse_spec(d)


def sweep_ep(spec: api.MoEDeploymentSpec, hw: Hardware, ep_sizes: list[int], *, context: int = DEFAULT_CONTEXT,
             tpot_target: float | None = DEFAULT_TPOT_TARGET_S, micro_batches: int = 2,
             imbalance: float | None = None) -> list[SweepRow]:
    """For each GPU count G: one expert per GPU (when G >= the E routed experts; the G - E spare
    GPUs hold replicas) against a colocated layout on the same GPUs with max(2, ceil(P / G))
    experts per GPU, P being the spec's physical experts, so colocating keeps at least the spec's
    replicas. Each is evaluated at its largest decode batch under memory and the TPOT target, with
    the imbalance the layout gets by default (no replicas: no load balancing) unless one is given."""
    e = spec.model.architecture.n_routed_experts
    rows = []
    for g in ep_sizes:
        if g < 1:
            raise PerfModelError(f"EP size must be >= 1, got {g}")
        layouts = [("one-per-gpu", 1)] if g >= e else []
        layouts.append(("colocated", max(2, math.ceil(spec.physical_experts / g))))
        if g < e:
            rows.append(SweepRow(g, 1, 0, "one-per-gpu", None, f"needs >= {e} GPUs"))
        for name, k in layouts:
            try:
                s = with_layout(spec, g, k)
            except api.SpecError as err:
                rows.append(SweepRow(g, k, g * k - e, name, None, str(err)))
                continue
            lim = max_batch(s, hw, "decode", context=context, tpot_target=tpot_target,
                            micro_batches=micro_batches, imbalance=imbalance)
            rows.append(SweepRow(g, k, g * k - e, name, lim, "" if lim.batch else f"nothing fits ({lim.binding})"))
    return rows


def plot_sweep(rows: list[SweepRow], path: str, title: str = "") -> None:
    """Scaling curve PNG: total and per-GPU decode throughput against GPUs, per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    valid = [r for r in rows if r.limit is not None and r.limit.estimate is not None]
    for layout, style in (("one-per-gpu", "o-"), ("colocated", "s--")):
        pts = [(r.gpus, r.limit.estimate) for r in valid if r.layout == layout]
        if not pts:
            continue
        xs = [g for g, _ in pts]
        ax1.plot(xs, [e.tokens_per_s_per_gpu * g / 1e3 for g, e in pts], style, label=layout)
        ax2.plot(xs, [e.tokens_per_s_per_gpu for _, e in pts], style, label=layout)
    if valid:
        # linear scaling from the best layout at the smallest GPU count
        g0 = min(r.gpus for r in valid)
        per_gpu0 = max(r.limit.estimate.tokens_per_s_per_gpu for r in valid if r.gpus == g0)
        xs = sorted({r.gpus for r in valid})
        ax1.plot(xs, [per_gpu0 * g / 1e3 for g in xs], ":", color="grey", label=f"linear from {g0} GPUs")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs in the EP group")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_ylabel("decode output tokens/s (thousands)")
    ax2.set_ylabel("decode output tokens/s per GPU")
    ax2.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- calibration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationCase:
    """A published setup, the model's inputs for it, the published per-node figure, and the band
    the model/published ratio must stay in (docs/perfmodel.md says why)."""

    key: str
    description: str
    spec: dict[str, Any]
    hardware: str
    phase: Phase
    published_per_node: float  # decode: output tok/s; prefill: input tok/s (cache hits included if cache_hit)
    source: str
    band: tuple[float, float]
    context: int
    batch: int | None = None  # None: the largest decode batch under memory and tpot_target
    cache_hit: float = 0.0
    tpot_target: float | None = DEFAULT_TPOT_TARGET_S
    imbalance: float | None = None


def _ds_spec(ep: int, experts_per_gpu: int, redundant: int, attn_tp: int = 1) -> dict[str, Any]:
    return {"model": {"checkpoint": {"pvcName": "deepseek-v3"}, "precision": "fp8"},
            "parallelism": {"expertParallelSize": ep, "maxExpertsPerGpu": experts_per_gpu,
                            "redundantExperts": redundant, "attentionTensorParallel": attn_tp},
            "placement": {"gpusPerNode": 8},
            "loadBalancing": {"enabled": redundant > 0}}


# Bands: a measured run must not beat the roofline (>= 1.0), and the costs the model leaves out
# (non-GEMM kernels, launch and scheduling gaps, imperfect overlap) stay below ~1.75x; a 24-hour
# production average adds load below saturation and mixed lengths, up to 2.5x.
BENCHMARK_BAND = (1.0, 1.75)
PRODUCTION_BAND = (1.0, 2.5)

# DeepSeek Day-6: 20-22 output tok/s per user (-> 50 ms TPOT target), mean KV length 4,989 per output
# token, 56.3% of input tokens were cache hits; H800 nodes of 8 GPUs.
CALIBRATION: tuple[CalibrationCase, ...] = (
    CalibrationCase(
        "decode-ep144", "decode EP144 (18 nodes), DP144 attention, 2 routed experts/GPU, KV 4,989, "
        "largest batch under memory and 50 ms", _ds_spec(144, 2, 32), "h800", "decode", 14_800,
        "DeepSeek Day-6, 24 h production average", PRODUCTION_BAND, context=4989),
    CalibrationCase(
        "decode-ep320-tp4", "decode EP320 (40 nodes), attention TP4 x DP80, 1 routed expert/GPU, KV 4,989, "
        "largest batch under memory and 50 ms", _ds_spec(320, 1, 64, attn_tp=4), "h800", "decode", 14_800,
        "DeepSeek Day-6 average; layout of V3 report section 3.4", (0.5, 1.0), context=4989),
    CalibrationCase(
        "decode-ep320-dp", "decode EP320 (40 nodes), DP320 attention (manifests/deepseek-v3-ep320.yaml), "
        "KV 4,989, largest batch under memory and 50 ms", _ds_spec(320, 1, 64), "h800", "decode", 14_800,
        "DeepSeek Day-6, 24 h production average", PRODUCTION_BAND, context=4989),
    CalibrationCase(
        "prefill-ep32", "prefill EP32 (4 nodes), DP32 attention, 9 routed experts/GPU, 16K new tokens/GPU, "
        "4K prompts, 56.3% cache hits", _ds_spec(32, 9, 32), "h800", "prefill", 73_700,
        "DeepSeek Day-6, 24 h production average, input incl. cache hits", PRODUCTION_BAND,
        context=4096, batch=16384, cache_hit=0.563),
    CalibrationCase(
        "profile-decode-ep128", "decode EP128 (16 nodes), 2 experts/GPU, 128 sequences/GPU, KV 4,096, "
        "balanced routing", _ds_spec(128, 2, 0), "h800", "decode", 18_598,
        "DeepSeek profile-data, per node as derived in the SGLang large-scale EP blog", BENCHMARK_BAND,
        context=4096, batch=128, imbalance=1.0),
    CalibrationCase(
        "profile-prefill-ep32", "prefill EP32 (4 nodes), 8 experts/GPU, 16K tokens/GPU, 4K prompts, "
        "balanced routing", _ds_spec(32, 8, 0), "h800", "prefill", 62_713,
        "DeepSeek profile-data, per node as derived in the SGLang large-scale EP blog", BENCHMARK_BAND,
        context=4096, batch=16384, imbalance=1.0),
    CalibrationCase(
        "sglang-decode-ep72", "decode EP72 (9 nodes), 4 experts/GPU (288 slots), 256 sequences/GPU, KV 2,000",
        _ds_spec(72, 4, 32), "h100", "decode", 22_282, "SGLang large-scale EP blog (96 H100)", BENCHMARK_BAND,
        context=2000, batch=256),
    CalibrationCase(
        "sglang-prefill-ep32", "prefill EP32 (4 nodes), 9 experts/GPU (288 slots), 16K tokens/GPU, 4K prompts",
        _ds_spec(32, 9, 32), "h100", "prefill", 50_302, "SGLang large-scale EP blog (96 H100)", BENCHMARK_BAND,
        context=4096, batch=16384),
)


@dataclass(frozen=True)
class CalibrationRow:
    case: CalibrationCase
    estimate: StepEstimate

    @property
    def predicted_per_node(self) -> float:
        e = self.estimate
        return e.input_tokens_per_s_per_node if self.case.phase == "prefill" else e.tokens_per_s_per_node

    @property
    def ratio(self) -> float:
        return self.predicted_per_node / self.case.published_per_node


def calibrate(cases: tuple[CalibrationCase, ...] = CALIBRATION) -> list[CalibrationRow]:
    rows = []
    for c in cases:
        spec = api.parse_spec(c.spec)
        hw = hardware(c.hardware)
        if c.batch is None:
            lim = max_batch(spec, hw, c.phase, context=c.context, tpot_target=c.tpot_target, imbalance=c.imbalance)
            if lim.estimate is None:
                raise PerfModelError(f"calibration case {c.key}: nothing fits ({lim.binding})")
            est = lim.estimate
        else:
            est = step(spec, hw, Workload(c.phase, c.batch, c.context, c.cache_hit, imbalance=c.imbalance))
        rows.append(CalibrationRow(c, est))
    return rows


__all__ = [
    "CALIBRATION", "GB", "GIB", "PROFILES", "BatchLimit", "CalibrationCase", "CalibrationRow", "Hardware",
    "LayerCost", "MemoryBreakdown", "Op", "PerfModelError", "Plan", "StepEstimate", "SweepRow", "Workload",
    "admission_memory", "attention_params", "calibrate", "check_fits", "comm_buffer_bytes", "default_imbalance",
    "expert_bytes", "hardware", "hardware_for_gpu_product", "hardware_from_dict", "kv_bytes_per_token",
    "linear_bytes", "max_batch", "memory", "plan", "plot_sweep", "step", "sweep_ep", "weight_bytes",
    "with_attention_tp", "with_layout",
]
