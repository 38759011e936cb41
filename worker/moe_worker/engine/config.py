"""How a rank runs the model and how rank 0 schedules (`EngineConfig`), where a rank sits (`RankConfig`),
read and range-checked from a rank pod's env."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_common.model_args import ModelArgs

from ..engine_api import ModelInfo
from ..fp8 import DECODE_GEMMS
from .auth import read_key

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """How a rank runs the model and how rank 0 schedules. Same on every rank of a group."""

    dtype: str = "auto"
    """Activation dtype: "fp32", "bf16", or "auto" (bf16 on CUDA, fp32 on CPU)."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:N", or "auto" (this rank's GPU if there is one)."""
    attn_impl: str = "absorb"
    fp8_impl: str = "auto"
    fp8_decode_gemm: str = "cublas"
    """FP8 products of up to 64 tokens on CUDA (`fp8.set_decode_gemm`): "cublas", "triton" (our
    split-K kernel wherever it agrees with the exact product), or "auto" (each weight shape and
    token bucket times both at its first product and keeps the faster; per process, so ranks may
    differ). cuBLAS stays the default until a GPU run has measured the others."""
    cuda_graphs: str = "auto"
    """Decode steps as CUDA graphs, per batch bucket (`engine.graphs`): "auto" (on CUDA), "off",
    or "on" (on the CPU: the same fixed-shape segments, run eagerly, for tests)."""
    precision: str = "auto"
    """Routed/linear weights: "fp8" or "auto" (as the checkpoint), "bf16" (dequantize FP8 at load)."""
    dispatch_fp8: str = "auto"
    """FP8 dispatch payload: "on", "off", "auto" (on when the experts quantize activations to FP8
    anyway, i.e. FP8 weights with the emulate or scaled_mm product: then it changes nothing)."""
    combine_dtype: str = "auto"
    """Partial sums sent back: "bf16", "fp32", "auto" (the activation dtype)."""
    overlap: str = "auto"
    """Two micro-batches with overlapped exchanges: "on", "off", "auto" (when the busiest rank has
    at least `overlap_min_tokens` tokens in the step; below that the split only adds latency)."""
    overlap_min_tokens: int = 128
    max_seqs_per_rank: int = 64
    """Sequences one rank holds KV caches for; more requests wait in the queue."""
    max_context: int = 4096
    """Prompt + generated tokens per request (clamped to the model's max_position_embeddings)."""
    max_new_tokens: int = 1024
    max_prefill_tokens: int = 8192
    """New prompt tokens admitted per step over the group (at least one request is always admitted)."""
    max_step_tokens: int = 2048
    """Tokens one rank runs in a step: its sequences' decode tokens first, then chunks of the
    prompts it is prefilling (chunked prefill), so a long prompt delays the others' next tokens by
    at most one such step. (A prompt-logits request runs whole, and a broken step's work is sent
    again as it was.)"""
    kv_cache_tokens: int = 0
    """KV cache positions one rank may hold over all its sequences (each sequence takes prompt +
    max_tokens); a request waits while its rank has no room. 0: max_seqs_per_rank x max_context.
    The operator sets it from its memory model (what the GPU has after weights and buffers)."""
    max_queue: int = 1024
    """Requests waiting for admission; beyond it a request is refused as overloaded (HTTP 429)."""
    idle_heartbeat_s: float = 1.0
    map_poll_s: float = 1.0
    """How often a rank looks at its expert-map files (0: every step)."""
    background_load: bool = True
    """Load the experts of a new map generation in a background thread."""
    dist_backend: str = "auto"
    """Process-group backend for the exchanges: "nccl", "gloo", or "auto" (NCCL on CUDA, gloo on
    CPU). gloo on CUDA moves through host memory: for ranks that share one GPU (NCCL refuses two
    ranks on one device) and for debugging, never for speed."""
    dist_timeout_s: float = 10.0
    """Collective timeout: the longest a rank waits in one collective, so the bound on noticing a
    hung peer (a dead one is noticed at once: its sockets close). No legitimate wait comes near it:
    ranks meet at every MoE layer, and an idle rank 0 sends a heartbeat plan every
    `idle_heartbeat_s`."""
    peer_lost_s: float = 2.0
    """A rank whose store heartbeat (every 0.25 s, from its own thread) has been silent this long
    when its group breaks is counted lost; the others re-form without it."""
    rendezvous_timeout_s: float = 600.0
    """How long ranks wait for each other to start and load (pods start minutes apart)."""
    model_name: str = "deepseek-v3"
    attention_tp: int = 1
    """Attention tensor-parallel degree: ranks [g * n, (g + 1) * n) split the attention heads and
    serve the same sequences (`attention_tp`); it must divide the group's ranks and the heads."""
    threads: int | None = None
    """torch intra-op threads in this process (None: leave torch's default)."""

    def __post_init__(self) -> None:
        choices = {
            "dtype": ("auto", *DTYPES), "attn_impl": ("absorb", "naive"), "precision": ("auto", "fp8", "bf16"),
            "dispatch_fp8": ("auto", "on", "off"), "combine_dtype": ("auto", *DTYPES),
            "overlap": ("auto", "on", "off"), "dist_backend": ("auto", "nccl", "gloo"),
            "fp8_decode_gemm": DECODE_GEMMS, "cuda_graphs": ("auto", "on", "off"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigFieldError(name, f"{getattr(self, name)!r}: expected one of {allowed}")
        for name, (low, floating) in _LIMITS.items():
            value = getattr(self, name)
            if value is None and name == "threads":
                continue
            ok = isinstance(value, (int, float) if floating else int) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < low:
                kind = "a finite number" if floating else "an integer"
                raise ConfigFieldError(name, f"{value!r}: expected {kind} >= {low}")
        if self.kv_cache_tokens == 1:
            raise ConfigFieldError("kv_cache_tokens", "expected 0 (no limit of its own) or at least 2")


class ConfigFieldError(ValueError):
    """An `EngineConfig` field out of range; `field` names it (`from_env` names the variable)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.field = name
        self.detail = message


_LIMITS: dict[str, tuple[float, bool]] = {
    # field: (lowest allowed value, float field)
    "overlap_min_tokens": (0, False), "max_seqs_per_rank": (1, False), "max_context": (2, False),
    "max_new_tokens": (1, False), "max_prefill_tokens": (1, False), "max_step_tokens": (1, False), "kv_cache_tokens": (0, False),
    "max_queue": (1, False), "idle_heartbeat_s": (0.001, True), "map_poll_s": (0, True),
    "dist_timeout_s": (0.001, True), "peer_lost_s": (0.5, True), "rendezvous_timeout_s": (0.001, True),
    "threads": (1, False), "attention_tp": (1, False),
}
"""Range checks of the numeric `EngineConfig` fields (a zero or negative limit hangs or breaks a rank)."""

_ENV_FIELDS: dict[str, str] = {
    # EngineConfig field: the env variable of a rank pod that sets it
    "dtype": "MOE_DTYPE", "device": "MOE_DEVICE", "attn_impl": "MOE_ATTN", "fp8_impl": "MOE_FP8_IMPL",
    "fp8_decode_gemm": "MOE_FP8_DECODE_GEMM", "cuda_graphs": "MOE_CUDA_GRAPHS",
    "precision": "MOE_PRECISION", "dispatch_fp8": "MOE_DISPATCH_FP8", "combine_dtype": "MOE_COMBINE_DTYPE",
    "overlap": "MOE_OVERLAP", "overlap_min_tokens": "MOE_OVERLAP_MIN_TOKENS",
    "max_seqs_per_rank": "MOE_MAX_SEQS_PER_RANK", "max_context": "MOE_MAX_CONTEXT",
    "max_new_tokens": "MOE_MAX_NEW_TOKENS", "max_prefill_tokens": "MOE_MAX_PREFILL_TOKENS",
    "max_step_tokens": "MOE_MAX_STEP_TOKENS",
    "kv_cache_tokens": "MOE_KV_CACHE_TOKENS", "max_queue": "MOE_MAX_QUEUE", "map_poll_s": "MOE_MAP_POLL_S",
    "dist_backend": "MOE_DIST_BACKEND", "dist_timeout_s": "MOE_DIST_TIMEOUT_S",
    "peer_lost_s": "MOE_PEER_LOST_S",
    "rendezvous_timeout_s": "MOE_RENDEZVOUS_TIMEOUT_S", "model_name": "MOE_MODEL_NAME", "threads": "MOE_THREADS",
    "attention_tp": "MOE_ATTENTION_TP",
}


def env_number(env: Mapping[str, str], name: str, default: float, *, low: float = 0, high: float = math.inf,
               integer: bool = False) -> Any:
    """Env variable `name` as a finite number in [low, high] (`default` when unset or empty);
    ValueError naming the variable otherwise."""
    v = env.get(name)
    if v is None or v.strip() == "":
        return default
    kind = "an integer" if integer else "a finite number"
    try:
        x: float = int(v) if integer else float(v)
    except ValueError:
        raise ValueError(f"env {name}={v!r}: expected {kind}") from None
    if not math.isfinite(x) or not low <= x <= high:
        bound = f">= {low}" if high == math.inf else f"in {low}..{high}"
        raise ValueError(f"env {name}={v!r}: expected {kind} {bound}")
    return x


def _engine_config_from_env(env: Mapping[str, str]) -> EngineConfig:
    """EngineConfig from the `_ENV_FIELDS` variables; every number range-checked, errors name the variable."""
    defaults = EngineConfig()
    kw: dict[str, Any] = {}
    for name, var in _ENV_FIELDS.items():
        default = getattr(defaults, name)
        if name in _LIMITS:
            low, floating = _LIMITS[name]
            if name == "threads":  # 0 or unset: torch's default
                kw[name] = env_number(env, var, 0, integer=True) or None
                continue
            kw[name] = env_number(env, var, default, low=low, integer=not floating)
        else:
            kw[name] = env.get(var, default)
    try:
        return EngineConfig(**kw)
    except ConfigFieldError as e:
        raise ValueError(f"env {_ENV_FIELDS[e.field]}={env.get(_ENV_FIELDS[e.field])!r}: {e.detail}") from None


@dataclass(frozen=True)
class RankConfig:
    """Where one rank process sits and what it serves; `from_env` reads a rank pod's env."""

    rank: int
    world_size: int
    checkpoint: str
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    group: int = 0
    """EP group index (label of this rank's metrics)."""
    expert_map: str | None = None
    """PLAN.json path (a `generation` file next to it); None: `default_map`."""
    gpus_per_node: int = 8
    """Node layout of the default map."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    rank_key: bytes | None = field(default=None, repr=False)
    """The group's secret (the file MOE_RANK_KEY_FILE names): signs the store's values and proves
    membership of every process group (`auth`). None: nothing is authenticated (local runs)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankConfig:
        """A rank pod's env (what `resources.rank_pod` sets): RANK, WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT, MOE_GROUP, MOE_CHECKPOINT (required), MOE_EXPERT_MAP (PLAN.json path),
        MOE_PRECISION, MOE_MODEL_NAME. Optional `EngineConfig` knobs: MOE_DTYPE, MOE_DEVICE,
        MOE_ATTN, MOE_FP8_IMPL, MOE_FP8_DECODE_GEMM, MOE_CUDA_GRAPHS, MOE_DISPATCH_FP8, MOE_COMBINE_DTYPE, MOE_OVERLAP,
        MOE_OVERLAP_MIN_TOKENS, MOE_MAX_SEQS_PER_RANK, MOE_MAX_CONTEXT, MOE_MAX_NEW_TOKENS,
        MOE_MAX_PREFILL_TOKENS, MOE_MAX_STEP_TOKENS, MOE_KV_CACHE_TOKENS, MOE_MAX_QUEUE, MOE_MAP_POLL_S, MOE_DIST_BACKEND,
        MOE_DIST_TIMEOUT_S, MOE_PEER_LOST_S, MOE_RENDEZVOUS_TIMEOUT_S, MOE_THREADS, MOE_ATTENTION_TP
        (`_ENV_FIELDS`);
        MOE_RANK_KEY_FILE (the group's secret, at least 16 bytes). Every number is
        range-checked: a ValueError names the variable. Other MOE_* variables (ports, node) are the server's."""
        env = os.environ if env is None else env
        if not env.get("MOE_CHECKPOINT"):
            raise ValueError("env MOE_CHECKPOINT (the checkpoint directory) is not set")
        return cls(
            rank=env_number(env, "RANK", 0, integer=True),
            world_size=env_number(env, "WORLD_SIZE", 1, low=1, integer=True),
            checkpoint=env["MOE_CHECKPOINT"],
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=env_number(env, "MASTER_PORT", 29500, low=1, high=65535, integer=True),
            group=env_number(env, "MOE_GROUP", 0, integer=True),
            expert_map=env.get("MOE_EXPERT_MAP") or None,
            engine=_engine_config_from_env(env),
            rank_key=read_key(env["MOE_RANK_KEY_FILE"]) if env.get("MOE_RANK_KEY_FILE") else None,
        )


def resolve_device(spec: str, rank: int = 0) -> torch.device:
    """"auto": this rank's GPU (rank mod the GPUs visible) or the CPU; "cuda" without an index: the
    same rank-local GPU; anything else as given."""
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        device = torch.device("cuda" if spec == "auto" else spec)
    except RuntimeError:
        raise ValueError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: no CUDA device is visible to this process")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", rank % torch.cuda.device_count())
    return device


def dist_backend(spec: str, device: torch.device) -> str:
    """The process-group backend for `spec` ("auto": NCCL on CUDA, gloo on CPU)."""
    if spec == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if spec == "nccl" and device.type != "cuda":
        raise ValueError(f"dist_backend 'nccl' needs a CUDA device, got {device}")
    return spec


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec]


def kv_budget(cfg: EngineConfig) -> int:
    """KV cache positions one rank may allocate over all its sequences."""
    return cfg.kv_cache_tokens or cfg.max_seqs_per_rank * cfg.max_context


def model_info(args: ModelArgs, cfg: EngineConfig) -> ModelInfo:
    """What the server tells clients; a request's context is bounded by the model, the config and
    one rank's KV budget (a longer one could never be admitted)."""
    eos = args.extra.get("eos_token_id")
    context = min(cfg.max_context, args.max_position_embeddings, kv_budget(cfg))
    return ModelInfo(
        name=cfg.model_name,
        vocab_size=args.vocab_size,
        max_context=context,
        max_new_tokens=max(1, min(cfg.max_new_tokens, context - 1)),
        eos_token_id=eos if isinstance(eos, int) and not isinstance(eos, bool) else None,
    )
