"""The rank step loop of an EP group, and the engines that serve `engine_api.Engine` on top of it.

One process per rank (one GPU each in production). Rank 0 owns the scheduler. Every step:

1. Rank 0 builds a `StepPlan`: which sequences each rank runs (data-parallel attention), with
   their new tokens and positions (whole prompts for new requests, one token for running ones),
   sequences to free, whether to split into two micro-batches, and an agreed expert-map switch.
   It is broadcast to all ranks (`broadcast_object_list`: a small pickled plan, never weights).
2. Every rank takes the switch first (if any), then runs its share: attention per sequence on its
   own KV caches, and for each MoE layer the dispatch -> experts -> combine exchange. Every rank
   joins every exchange, with zero tokens if it has none, so collectives always match.
3. Each rank samples the next token of its sequences and sends (token, logits row sum), plus the
   expert-map generation it has staged, to rank 0 (`gather_object`). Rank 0 updates requests.

While idle, rank 0 sends an empty plan every `idle_heartbeat_s`, so a lost rank is noticed and
map switches happen even without traffic; an empty step runs no forward on any rank.

Failure (`EngineError`): a rank that dies closes its sockets, and the others' next collective
fails within milliseconds (gloo: "Connection reset/closed by peer"). A rank that hangs is caught
by the collective timeout (`dist_timeout_s`, default 30 s, env MOE_DIST_TIMEOUT_S; NCCL's watchdog
uses the same value), which bounds every wait since no legitimate step or heartbeat gap comes near
it. A failing rank destroys its process group so its peers fail at once instead of at the timeout.
The group cannot heal: every rank exits and the operator replaces the pods.

Start: ranks meet in a TCP store on rank 0 and load their experts before any collective, waiting
for each other up to `rendezvous_timeout_s` (600 s: pods start and load minutes apart); a rank
that fails to start writes why into the store and every other rank stops with that reason
(rank 0, the store's host, stays up to `START_FAILURE_ACK_S` = 15 s until they have read it).

Attention is per sequence (each has its own KV cache, positions differ); the feed-forward, MoE
exchange and output head run on all of a micro-batch's tokens at once.

Entry points:
- `run_rank_from_env()`: what `moe-worker serve` calls in each pod. Rank 0 gets a started
  `GroupEngine`; other ranks run the loop until the group stops and get None.
- `start_rank(RankConfig)`: the same from explicit settings (the local launcher uses it).
- World size 1: the same `GroupEngine` in one process, without torch.distributed or dispatch.
  (`local_engine.LocalEngine` is the serving side's plain single-process engine over
  `Transformer.forward`; this one runs the EP step loop, so `generate --world-size 1` and N > 1
  share the scheduler and the ragged forward.)

Metrics (`WorkerMetrics`): ranks count routed tokens per hosted expert (on the receiving rank),
dispatch/combine and step time, KV cache use, the expert-map generation and map errors, and
group readiness. Request-level metrics (requests, latencies, tokens in/out, queue depth,
running) are the server's: it reads `queue_depth()`, so the engine does not count them.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import Checkpoint
from .config import ModelArgs
from .dispatch import DispatchConfig, Dispatcher, interleave
from .engine_api import (
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    OverloadedError,
    RequestError,
    SequenceError,
)
from .expertmap import (
    MAX_ERRORS,
    ExpertMap,
    MapSwitcher,
    Staged,
    agreed_switch,
    default_map,
    parse_plan,
    read_plan_files,
)
from .fp8 import resolve_impl
from .model import KVCache, MoE, ParallelContext, Transformer, causal_mask
from .sampling import sample

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    """How a rank runs the model and how rank 0 schedules. Same on every rank of a group."""

    dtype: str = "auto"
    """Activation dtype: "fp32", "bf16", or "auto" (bf16 on CUDA, fp32 on CPU)."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:N", or "auto" (this rank's GPU if there is one)."""
    attn_impl: str = "absorb"
    fp8_impl: str = "auto"
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
    dist_timeout_s: float = 30.0
    """Collective timeout: the longest a rank waits for a hung peer."""
    rendezvous_timeout_s: float = 600.0
    """How long ranks wait for each other to start and load (pods start minutes apart)."""
    model_name: str = "deepseek-v3"
    threads: int | None = None
    """torch intra-op threads in this process (None: leave torch's default)."""

    def __post_init__(self) -> None:
        choices = {
            "dtype": ("auto", *DTYPES), "attn_impl": ("absorb", "naive"), "precision": ("auto", "fp8", "bf16"),
            "dispatch_fp8": ("auto", "on", "off"), "combine_dtype": ("auto", *DTYPES),
            "overlap": ("auto", "on", "off"), "dist_backend": ("auto", "nccl", "gloo"),
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
    "max_new_tokens": (1, False), "max_prefill_tokens": (1, False), "kv_cache_tokens": (0, False),
    "max_queue": (1, False), "idle_heartbeat_s": (0.001, True), "map_poll_s": (0, True),
    "dist_timeout_s": (0.001, True), "rendezvous_timeout_s": (0.001, True), "threads": (1, False),
}
"""Range checks of the numeric `EngineConfig` fields (a zero or negative limit hangs or breaks a rank)."""

_ENV_FIELDS: dict[str, str] = {
    # EngineConfig field: the env variable of a rank pod that sets it
    "dtype": "MOE_DTYPE", "device": "MOE_DEVICE", "attn_impl": "MOE_ATTN", "fp8_impl": "MOE_FP8_IMPL",
    "precision": "MOE_PRECISION", "dispatch_fp8": "MOE_DISPATCH_FP8", "combine_dtype": "MOE_COMBINE_DTYPE",
    "overlap": "MOE_OVERLAP", "overlap_min_tokens": "MOE_OVERLAP_MIN_TOKENS",
    "max_seqs_per_rank": "MOE_MAX_SEQS_PER_RANK", "max_context": "MOE_MAX_CONTEXT",
    "max_new_tokens": "MOE_MAX_NEW_TOKENS", "max_prefill_tokens": "MOE_MAX_PREFILL_TOKENS",
    "kv_cache_tokens": "MOE_KV_CACHE_TOKENS", "max_queue": "MOE_MAX_QUEUE", "map_poll_s": "MOE_MAP_POLL_S",
    "dist_backend": "MOE_DIST_BACKEND", "dist_timeout_s": "MOE_DIST_TIMEOUT_S",
    "rendezvous_timeout_s": "MOE_RENDEZVOUS_TIMEOUT_S", "model_name": "MOE_MODEL_NAME", "threads": "MOE_THREADS",
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankConfig:
        """A rank pod's env (what `resources.rank_pod` sets): RANK, WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT, MOE_GROUP, MOE_CHECKPOINT (required), MOE_EXPERT_MAP (PLAN.json path),
        MOE_PRECISION, MOE_MODEL_NAME. Optional `EngineConfig` knobs: MOE_DTYPE, MOE_DEVICE,
        MOE_ATTN, MOE_FP8_IMPL, MOE_DISPATCH_FP8, MOE_COMBINE_DTYPE, MOE_OVERLAP,
        MOE_OVERLAP_MIN_TOKENS, MOE_MAX_SEQS_PER_RANK, MOE_MAX_CONTEXT, MOE_MAX_NEW_TOKENS,
        MOE_MAX_PREFILL_TOKENS, MOE_KV_CACHE_TOKENS, MOE_MAX_QUEUE, MOE_MAP_POLL_S, MOE_DIST_BACKEND,
        MOE_DIST_TIMEOUT_S, MOE_RENDEZVOUS_TIMEOUT_S, MOE_THREADS (`_ENV_FIELDS`). Every number is
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


# ---------------------------------------------------------------------------------------------
# Step plans and replies (small pickled objects)
# ---------------------------------------------------------------------------------------------


@dataclass
class SeqWork:
    """One sequence's share of a step: `tokens` at positions start.. of sequence `seq`."""

    seq: int
    tokens: list[int]
    start: int
    new: bool = False
    """First step of this sequence: allocate its KV cache of `max_len` positions."""
    max_len: int = 0
    temperature: float = 0.0
    seed: int | None = None
    want_logits: bool = False
    """Keep every position's logits on the rank (the `logits` command; rank 0 only)."""


@dataclass
class StepPlan:
    step: int
    work: list[list[SeqWork]]
    """Per rank: the sequences it runs this step."""
    release: list[list[int]]
    """Per rank: sequences whose KV caches to free before the step."""
    micro_batches: int = 1
    switch_to: int | None = None
    """Expert-map generation every rank takes before running this step."""
    resize: int | None = None
    """With `switch_to`: the new generation has this many ranks. The step has no work; every rank
    takes the switch, leaves the old process group and joins the new one (ranks beyond it leave)."""
    stop: bool = False

    def has_work(self) -> bool:
        return any(self.work)


@dataclass
class StepReply:
    rank: int
    tokens: dict[int, tuple[int, float]]
    """seq -> (next token, sum of its fp32 logits row)."""
    staged: tuple[int, str]
    """(generation, digest) this rank could switch to now."""
    generation: int
    """Generation served in this step."""
    errors: list[str] = field(default_factory=list)
    """Expert-map errors since the last reply."""
    failed: dict[int, str] = field(default_factory=dict)
    """seq -> why it failed in this step on this rank (its request fails; the group goes on)."""


# ---------------------------------------------------------------------------------------------
# One rank: model, caches, dispatcher, expert-map switcher
# ---------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Part of a sequence's step that one micro-batch runs."""

    seq: int
    tokens: list[int]
    start: int
    cache: KVCache
    last: bool  # holds the sequence's last new token: produces its next-token logits
    want_logits: bool


@dataclass
class _SeqState:
    cache: KVCache
    temperature: float
    generator: torch.Generator | None
    want_logits: bool


class RankRunner:
    """Everything one rank does in a step. `run_step(plan)` -> `StepReply`."""

    def __init__(
        self,
        model: Transformer,
        ckpt: Checkpoint,
        emap: ExpertMap,
        cfg: EngineConfig,
        *,
        ctx: ParallelContext,
        device: torch.device,
        plan_path: str | Path | None = None,
        metrics: Any = None,
        before_step: Callable[[StepPlan, int], None] | None = None,
        resizable: bool = False,
    ):
        self.model = model
        self.ckpt = ckpt
        self.cfg = cfg
        self.ctx = ctx
        self.rank = ctx.rank
        self.device = device
        self.metrics = metrics
        self.before_step = before_step
        self.seqs: dict[int, _SeqState] = {}
        self.kept_logits: dict[int, torch.Tensor] = {}
        """seq -> (S, vocab) fp32 logits of `want_logits` sequences (read by rank 0's engine)."""
        self._errors: list[str] = []
        self.switches: list[tuple[int, int]] = []
        """(step, generation) of every switch this rank took."""
        self.dispatcher: Dispatcher | None = None
        if ctx.world_size > 1:
            self.dispatcher = Dispatcher(ctx, emap, device=device, config=dispatch_config(model, cfg), metrics=metrics)
        self.switcher = MapSwitcher(
            emap, ctx.rank, model.args, plan_path=plan_path, load_experts=self._read_experts,
            poll_interval_s=cfg.map_poll_s, background=cfg.background_load, on_error=self._map_error,
            resizable=resizable,
        )
        if metrics is not None:
            metrics.expert_map_generation.labels(**metrics.lbl()).set(emap.generation)

    @property
    def emap(self) -> ExpertMap:
        return self.switcher.current

    def attach(self, ctx: ParallelContext) -> None:
        """Use process group `ctx.group` from now on (it is created after the model is loaded)."""
        self.ctx = ctx
        self.model.ctx = ctx
        if self.dispatcher is not None:
            self.dispatcher.ctx = ctx
            self.dispatcher.group = ctx.group

    def regroup(self, ctx: ParallelContext) -> None:
        """Serve in a process group of a different size from now on (after a resize switch)."""
        self.ctx = ctx
        self.model.ctx = ctx
        self.dispatcher = None
        if ctx.world_size > 1:
            self.dispatcher = Dispatcher(ctx, self.emap, device=self.device,
                                         config=dispatch_config(self.model, self.cfg), metrics=self.metrics)

    # ---- expert map ----

    def _read_experts(self, added: dict[int, tuple[int, ...]]) -> dict[int, dict[int, Any]]:
        moes = {m.layer_id: m for m in self.model.moe_layers()}
        return {layer: {e: self.ckpt.read_expert(moes[layer], e) for e in ids} for layer, ids in added.items()}

    def _map_error(self, msg: str) -> None:
        self._errors.append(msg)
        if self.metrics is not None:
            self.metrics.expert_map_errors.labels(**self.metrics.lbl()).inc()

    def _switch(self, generation: int, step: int) -> None:
        staged = self.switcher.take(generation)
        self._hold_exactly(staged)
        if self.dispatcher is not None and staged.emap.world_size == self.ctx.world_size:
            self.dispatcher.set_map(staged.emap)  # (a resize builds a new dispatcher in `regroup`)
        self.switches.append((step, generation))
        if self.metrics is not None:
            self.metrics.expert_map_generation.labels(**self.metrics.lbl()).set(generation)
        log.info("rank %d: serving expert map generation %d from step %d", self.rank, generation, step)

    def _hold_exactly(self, staged: Staged) -> None:
        """Make this rank hold exactly the experts `staged.emap` assigns to it, whatever it held
        before: register the staged modules it lacks, read any still missing now (a generation
        staged against another map; slow, logged), drop the rest, then check."""
        want = staged.emap.owned(self.rank)
        moes = {m.layer_id: m for m in self.model.moe_layers()}
        missing: dict[int, tuple[int, ...]] = {}
        for layer, moe in moes.items():
            need, have = set(want.get(layer, ())), set(moe.local_experts())
            loaded = staged.experts.get(layer, {})
            for e in sorted(need - have):
                if e in loaded:
                    moe.add_expert(e, loaded[e])
            for e in sorted(have - need):
                moe.remove_expert(e)
            lacking = tuple(sorted(need - set(moe.local_experts())))
            if lacking:
                missing[layer] = lacking
        if missing:
            log.warning("rank %d: generation %d: experts %s were not staged; reading them at the switch",
                        self.rank, staged.emap.generation, missing)
            for layer, modules in self._read_experts(missing).items():
                for e, module in modules.items():
                    moes[layer].add_expert(e, module)
        wrong = {layer: sorted(moe.local_experts()) for layer, moe in moes.items()
                 if set(moe.local_experts()) != set(want.get(layer, ()))}
        if wrong:
            raise RuntimeError(f"rank {self.rank}: after switching to generation {staged.emap.generation} it holds "
                               f"experts {wrong}, the map assigns {dict(want)}")

    # ---- the step ----

    @torch.inference_mode()
    def run_step(self, plan: StepPlan) -> StepReply:
        for seq in plan.release[self.rank]:
            self.seqs.pop(seq, None)
        if plan.switch_to is not None:
            self._switch(plan.switch_to, plan.step)
        if self.before_step is not None:
            self.before_step(plan, self.rank)
        out: dict[int, tuple[int, float]] = {}
        failed: dict[int, str] = {}
        if plan.has_work():
            t0 = time.perf_counter()
            mine = [w for w in plan.work[self.rank] if not (w.new and self._admit(w, failed))]
            logits = self.forward(mine, plan.micro_batches)
            for seq, row in logits.items():
                try:
                    st = self.seqs[seq]
                    out[seq] = sample(row, st.temperature, st.generator), float(row.sum())
                except SequenceError as e:
                    failed[seq] = str(e)
            if self.dispatcher is not None:
                self.dispatcher.flush_metrics()
            if self.metrics is not None:
                phase = "prefill" if any(w.new for w in mine) else "decode"
                lbl = self.metrics.lbl()
                self.metrics.step_seconds.labels(**lbl, phase=phase).observe(time.perf_counter() - t0)
                cap = kv_budget(self.cfg)
                used = sum(s.cache.max_len for s in self.seqs.values())
                self.metrics.kv_cache_usage.labels(**lbl).set(used / cap if cap else 0.0)
        self.switcher.poll()
        errors, self._errors = self._errors, []
        for seq in failed:
            self.seqs.pop(seq, None)
            self.kept_logits.pop(seq, None)
        return StepReply(self.rank, out, self.switcher.staged_key(), self.emap.generation, errors, failed)

    def _admit(self, w: SeqWork, failed: dict[int, str]) -> bool:
        """Set up a new sequence (KV cache, sampler); False when it fits, True when it failed
        (recorded in `failed`: its request fails alone, the step runs without it)."""
        try:
            gen = None
            if w.temperature > 0:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(w.seed if w.seed is not None else int.from_bytes(os.urandom(7), "little"))
            self.seqs[w.seq] = _SeqState(self.model.new_cache(1, w.max_len), w.temperature, gen, w.want_logits)
            return False
        except (torch.OutOfMemoryError, MemoryError) as e:
            failed[w.seq] = f"rank {self.rank} has no memory for a KV cache of {w.max_len} positions: {e}"
        except (RuntimeError, ValueError) as e:
            failed[w.seq] = f"rank {self.rank} could not set up the sequence: {type(e).__name__}: {e}"
        log.error("sequence %d: %s", w.seq, failed[w.seq])
        return True

    def forward(self, work: list[SeqWork], micro_batches: int) -> dict[int, torch.Tensor]:
        """Run this rank's share -> seq -> last-position logits (vocab,) fp32."""
        chunks = [
            _Chunk(w.seq, list(w.tokens), w.start, self.seqs[w.seq].cache, True, self.seqs[w.seq].want_logits)
            for w in work
        ]
        batches = split_micro_batches(chunks, micro_batches)
        results: dict[int, torch.Tensor] = {}
        full: dict[int, list[torch.Tensor]] = {}
        interleave([self._mb_forward(b, results, full) for b in batches])
        for seq, parts in full.items():
            self.kept_logits[seq] = torch.cat(parts, dim=0)
        return results

    def _mb_forward(
        self, chunks: list[_Chunk], results: dict[int, torch.Tensor], full: dict[int, list[torch.Tensor]]
    ) -> Iterator[None]:
        """One micro-batch through every layer; yields while its MoE exchanges are in flight
        (three yields per MoE layer on every rank, whatever the token count)."""
        m = self.model
        D = m.args.hidden_size
        dev = self.device
        ropes, masks, hs = [], [], []
        for c in chunks:
            S = len(c.tokens)
            pos = torch.arange(c.start, c.start + S, device=dev)
            ropes.append(m.rotary(pos))
            masks.append(causal_mask(c.start, S, dev))
            hs.append(m.embed(torch.tensor([c.tokens], dtype=torch.long, device=dev)))  # (1, S, D)
        sizes = [len(c.tokens) for c in chunks]
        for i, block in enumerate(m.layers):
            hs = [
                h + block.attn(block.attn_norm(h), rope, c.start, mask, c.cache.layers[i], m.attn_impl)
                for h, rope, mask, c in zip(hs, ropes, masks, chunks, strict=True)
            ]
            if not hs and not isinstance(block.ffn, MoE):
                continue
            # Feed-forward over the micro-batch's tokens of all its sequences at once.
            x = torch.cat([h[0] for h in hs]) if hs else torch.zeros(0, D, dtype=m.dtype, device=dev)  # (T, D)
            xn = block.ffn_norm(x)
            if not isinstance(block.ffn, MoE):
                x = x + block.ffn(xn)
                hs = [t[None] for t in torch.split(x, sizes)]
                continue
            moe = block.ffn
            weights, ids = moe.gate(xn)  # (T, K) fp32, (T, K) int64
            if self.dispatcher is None:
                y = moe.routed(xn, ids, weights, moe.local_experts(), moe.layer_id)
                if moe.shared_experts is not None:
                    y = y + moe.shared_experts(xn)
            else:
                ex = self.dispatcher.start(xn, ids, weights, moe.local_experts(), moe.layer_id)
                yield  # counts in flight
                ex.advance()
                shared = moe.shared_experts(xn) if moe.shared_experts is not None else None
                yield  # rows in flight; the shared expert ran meanwhile
                ex.advance()
                yield  # partial sums in flight
                ex.advance()
                y = ex.result()
                if shared is not None:
                    y = y + shared
            x = x + y
            hs = [t[None] for t in torch.split(x, sizes)] if hs else []
        last = []
        for h, c in zip(hs, chunks, strict=True):
            if c.want_logits:
                lg = m.head(m.norm(h[0])).float()  # (S, vocab)
                full.setdefault(c.seq, []).append(lg)
                if c.last:
                    results[c.seq] = lg[-1]
            elif c.last:
                last.append((c.seq, h[0, -1]))
        if last:  # one head GEMM for the last position of every sequence
            rows = m.head(m.norm(torch.stack([r for _, r in last]))).float()  # (n, vocab)
            for (seq, _), row in zip(last, rows, strict=True):
                results[seq] = row


def split_micro_batches(chunks: list[_Chunk], n: int) -> list[list[_Chunk]]:
    """Split a rank's work into `n` (1 or 2) micro-batches of about equal token counts.

    A sequence that straddles the middle is cut in two: its first part runs in micro-batch 0,
    which is always a stage ahead of micro-batch 1, so the second part finds the first part's
    keys in the cache at every layer. The last new token stays in the last part (`last`).
    """
    if n == 1:
        return [chunks]
    total = sum(len(c.tokens) for c in chunks)
    half = (total + 1) // 2
    a: list[_Chunk] = []
    b: list[_Chunk] = []
    seen = 0
    for c in chunks:
        S = len(c.tokens)
        if seen >= half:
            b.append(c)
        elif seen + S <= half:
            a.append(c)
        else:
            cut = half - seen
            a.append(replace(c, tokens=c.tokens[:cut], last=False))
            b.append(replace(c, tokens=c.tokens[cut:], start=c.start + cut))
        seen += S
    return [a, b]


def dispatch_config(model: Transformer, cfg: EngineConfig) -> DispatchConfig:
    fp8 = cfg.dispatch_fp8 == "on"
    if cfg.dispatch_fp8 == "auto":
        fp8 = model.fp8 and resolve_impl(cfg.fp8_impl, model.embed.weight.device) in ("emulate", "scaled_mm")
    combine = None if cfg.combine_dtype == "auto" else DTYPES[cfg.combine_dtype]
    scale_fmt = model.args.quantization.scale_fmt if model.args.quantization else None
    return DispatchConfig(fp8_payload=fp8, combine_dtype=combine, scale_fmt=scale_fmt)


def build_runner(
    checkpoint: str | Path,
    emap: ExpertMap,
    cfg: EngineConfig,
    *,
    ctx: ParallelContext,
    plan_path: str | Path | None = None,
    metrics: Any = None,
    before_step: Callable[[StepPlan, int], None] | None = None,
    resizable: bool = False,
) -> RankRunner:
    """Build this rank's model with the experts `emap` gives it and load it from `checkpoint`."""
    device = resolve_device(cfg.device, ctx.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpt = Checkpoint(checkpoint)
    fp8 = False if cfg.precision == "bf16" else None
    model = Transformer(
        ckpt.args, dtype=resolve_dtype(cfg.dtype, device), attn_impl=cfg.attn_impl, fp8=fp8,
        fp8_impl=cfg.fp8_impl, owned_experts=emap.owned(ctx.rank), ctx=ctx, device=device,
    )
    ckpt.load(model)
    return RankRunner(model, ckpt, emap, cfg, ctx=ctx, device=device, plan_path=plan_path, metrics=metrics,
                      before_step=before_step, resizable=resizable)


# ---------------------------------------------------------------------------------------------
# Rank 0: the scheduler
# ---------------------------------------------------------------------------------------------


class _Ticket:
    """One request's progress; callbacks run on the step thread."""

    def __init__(self, req: GenerationRequest, want_logits: bool = False):
        self.req = req
        self.want_logits = want_logits
        self.arrived = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.output: list[int] = []
        self.logit_sums: list[float] = []
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.logits: torch.Tensor | None = None
        self.done = threading.Event()
        self.listeners: list[Callable[[int | None, _Ticket], None]] = []
        """Called with each new token, then with None when done (or failed)."""
        self.cancelled = False

    def _notify(self, tok: int | None) -> None:
        for fn in list(self.listeners):
            try:
                fn(tok, self)
            except Exception:  # a listener's loop may be closed; never break the step loop
                log.exception("request %s: listener failed", self.req.request_id)

    def finish(self, reason: str) -> None:
        now = time.monotonic()
        self.result = GenerationResult(
            request_id=self.req.request_id, output_ids=list(self.output), finish_reason=reason,
            prompt_tokens=len(self.req.prompt_ids),
            time_to_first_token_s=(self.first or now) - self.arrived, duration_s=now - self.arrived,
            logit_sums=list(self.logit_sums),
        )
        self.done.set()
        self._notify(None)

    def fail(self, err: BaseException) -> None:
        if self.done.is_set():
            return
        self.error = err
        self.done.set()
        self._notify(None)


@dataclass
class _Running:
    ticket: _Ticket
    rank: int
    pos: int = 0  # positions in the KV cache
    work: SeqWork | None = None
    kv: int = 0  # KV cache positions the rank allocated for it (prompt + max_tokens)


class Scheduler:
    """Rank 0's view of all requests: queue, the sequences on each rank, step plans."""

    def __init__(self, world_size: int, cfg: EngineConfig, info: ModelInfo, metrics: Any = None):
        self.world = world_size
        self.cfg = cfg
        self.info = info
        self.metrics = metrics
        self.waiting: deque[_Ticket] = deque()
        self.running: dict[int, _Running] = {}
        self.per_rank = [0] * world_size
        self.kv_budget = kv_budget(cfg)
        self.kv_used = [0] * world_size
        """KV cache positions allocated on each rank (admission keeps it <= kv_budget)."""
        self._rotate = 0  # ties between equally loaded ranks go round-robin, not always to rank 0
        self.release: list[list[int]] = [[] for _ in range(world_size)]
        self._next_seq = 0
        self.lock = threading.Lock()
        self.overlap = cfg.overlap
        self.draining: set[int] = set()
        """Ranks that leave at the next resize: no new sequences go to them."""

    def add(self, t: _Ticket) -> None:
        with self.lock:
            self.waiting.append(t)

    def idle(self) -> bool:
        with self.lock:
            return not self.waiting and not self.running

    def build(self, step: int, switch_to: int | None) -> StepPlan:
        """The next step: every running sequence decodes one token; queued requests are admitted
        to the least-loaded ranks with room, their whole prompts prefilled in this step."""
        work: list[list[SeqWork]] = [[] for _ in range(self.world)]
        with self.lock:
            for seq, r in list(self.running.items()):
                if r.ticket.cancelled:
                    self._finish(seq, "cancelled")
                    continue
                r.work = SeqWork(seq, [r.ticket.output[-1]], r.pos)
                work[r.rank].append(r.work)
            budget = self.cfg.max_prefill_tokens
            admitted = 0
            while self.waiting:
                t = self.waiting[0]
                if t.cancelled:
                    self.waiting.popleft()
                    continue
                n = len(t.req.prompt_ids)
                if admitted and n > budget:
                    break
                kv = n + t.req.max_tokens
                if t.want_logits:
                    rank = 0 if self._has_room(0, kv) else None
                else:
                    free = [r for r in range(self.world) if self._has_room(r, kv) and r not in self.draining]
                    # Least loaded first; among equals, round-robin from the last pick, so that a
                    # few requests spread over every node instead of piling onto the first one
                    # (tokens prefer expert replicas on their own node).
                    rank = min(free, key=lambda r: (self.per_rank[r], (r - self._rotate) % self.world)) if free else None
                    if rank is not None:
                        self._rotate = (rank + 1) % self.world
                if rank is None:
                    break
                self.waiting.popleft()
                seq = self._next_seq
                self._next_seq += 1
                req = t.req
                w = SeqWork(seq, [int(x) for x in req.prompt_ids], 0, new=True, max_len=n + req.max_tokens,
                            temperature=req.temperature, seed=req.seed, want_logits=t.want_logits)
                self.running[seq] = _Running(t, rank, 0, w, kv)
                self.per_rank[rank] += 1
                self.kv_used[rank] += kv
                work[rank].append(w)
                budget -= n
                admitted += 1
            release, self.release = self.release, [[] for _ in range(self.world)]
        busiest = max(sum(len(w.tokens) for w in ws) for ws in work)
        mb = {"on": 2, "off": 1}.get(self.overlap, 2 if busiest >= self.cfg.overlap_min_tokens else 1)
        return StepPlan(step, work, release, micro_batches=mb, switch_to=switch_to)

    def _has_room(self, rank: int, kv: int) -> bool:
        """Rank `rank` can take one more sequence of `kv` cache positions."""
        return self.per_rank[rank] < self.cfg.max_seqs_per_rank and self.kv_used[rank] + kv <= self.kv_budget

    def update(self, plan: StepPlan, replies: list[StepReply], kept_logits: dict[int, torch.Tensor]) -> None:
        """Apply the tokens the ranks sampled; finish requests that are done."""
        now = time.monotonic()
        with self.lock:
            for reply in replies:
                for seq, why in reply.failed.items():
                    if seq in self.running:
                        self._finish(seq, "failed", SequenceError(why))
                for seq, (tok, lsum) in reply.tokens.items():
                    r = self.running.get(seq)
                    if r is None:
                        continue
                    t = r.ticket
                    r.pos += len(r.work.tokens) if r.work is not None else 0
                    t.output.append(tok)
                    t.logit_sums.append(lsum)
                    if t.first is None:
                        t.first = now
                    t.last = now
                    if seq in kept_logits:
                        t.logits = kept_logits.pop(seq)
                    t._notify(tok)
                    if tok in t.req.stop_ids:
                        self._finish(seq, "stop")
                    elif len(t.output) >= t.req.max_tokens:
                        self._finish(seq, "length")

    def drained(self, world: int) -> bool:
        """Stop admitting to ranks >= `world`; True once none of them runs a sequence."""
        with self.lock:
            self.draining = set(range(world, self.world))
            return not any(self.per_rank[r] for r in self.draining)

    def resize(self, world: int) -> list[list[int]]:
        """The group now has `world` ranks; returns the releases pending for the old ranks."""
        with self.lock:
            release, self.release = self.release, [[] for _ in range(world)]
            if any(r.rank >= world for r in self.running.values()):
                raise RuntimeError("resize below a rank that still runs sequences")
            self.per_rank = (self.per_rank + [0] * world)[:world]
            self.kv_used = (self.kv_used + [0] * world)[:world]
            self.world = world
            self.draining = set()
            self._rotate %= world
            return release

    def _finish(self, seq: int, reason: str, err: BaseException | None = None) -> None:
        """End a running sequence: its rank frees the cache before the next step; the request
        gets its result, or `err` ("failed"), or a cancellation ("cancelled")."""
        r = self.running.pop(seq)
        self.per_rank[r.rank] -= 1
        self.kv_used[r.rank] -= r.kv
        self.release[r.rank].append(seq)
        if reason == "cancelled":
            r.ticket.fail(asyncio.CancelledError())
        elif err is not None:
            r.ticket.fail(err)
        else:
            r.ticket.finish(reason)

    def fail_all(self, err: BaseException) -> None:
        with self.lock:
            tickets = [r.ticket for r in self.running.values()] + list(self.waiting)
            self.running.clear()
            self.waiting.clear()
            self.per_rank = [0] * self.world
            self.kv_used = [0] * self.world
        for t in tickets:
            t.fail(err)


# ---------------------------------------------------------------------------------------------
# Collectives of the control plane
# ---------------------------------------------------------------------------------------------


class _Control:
    """Step plans out (broadcast), replies in (gather); identity for a single process."""

    def __init__(self, ctx: ParallelContext, group: Any = None):
        self.rank, self.world = ctx.rank, ctx.world_size
        self.group = group if group is not None else ctx.group

    def plan(self, plan: StepPlan | None) -> StepPlan:
        if self.world == 1:
            assert plan is not None
            return plan
        box = [plan]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def replies(self, reply: StepReply) -> list[StepReply]:
        if self.world == 1:
            return [reply]
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(reply, out, dst=0, group=self.group)
        return out if out is not None else []


def _abort_group() -> None:
    """Tear down this process's process group so peers blocked on us fail now, not at the timeout."""
    if not dist.is_initialized():
        return

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # already broken: nothing more to release
            pass

    t = threading.Thread(target=destroy, daemon=True)
    t.start()
    t.join(5.0)


_COMM_ERROR_HINTS = ("Connection", "peer", "Timed out", "timed out", "Timeout", "NCCL", "gloo", "closed")


def _group_error(step: int, rank: int, e: BaseException) -> EngineError:
    text = str(e).splitlines()[0] if str(e) else ""
    comm = isinstance(e, dist.DistError) or any(h in text for h in _COMM_ERROR_HINTS)
    why = "lost a peer rank or a collective failed" if comm else "failed"
    return EngineError(f"EP group {why} at step {step} on rank {rank}: {type(e).__name__}: {text}")


class _Membership:
    """How this rank (re)joins its EP group's process group: the rendezvous store on rank 0, the
    backend and the timeout. A group of G ranks that switches to a map of G' ranks re-forms in
    place: every rank destroys its process group and creates one of G' ranks on a fresh store
    prefix (`pg/<generation>`); ranks >= G' leave; new ranks (started as pods beforehand, waiting
    in `_join_running`) join at the same moment. No process restarts; KV caches stay."""

    def __init__(self, store: Any, rank: int, backend: str, device: torch.device, timeout: datetime.timedelta):
        self.store, self.rank, self.backend, self.device, self.timeout = store, rank, backend, device, timeout

    def form(self, world: int, prefix: str) -> tuple[ParallelContext, Any]:
        """Create the process group of `world` ranks; one all-reduce proves every rank is in it."""
        kw = {"device_id": self.device} if self.backend == "nccl" else {}
        dist.init_process_group(self.backend, store=dist.PrefixStore(prefix, self.store), rank=self.rank,
                                world_size=world, timeout=self.timeout, **kw)
        group = dist.group.WORLD
        control_group = dist.new_group(backend="gloo", timeout=self.timeout) if self.backend == "nccl" else group
        probe = torch.ones(1, device=self.device)
        dist.all_reduce(probe, group=group)
        if int(probe.item()) != world:
            raise EngineError(f"EP group: all_reduce saw {int(probe.item())} ranks, expected {world}")
        return ParallelContext(self.rank, world, group), control_group

    def regroup(self, generation: int, world: int) -> tuple[ParallelContext, Any] | None:
        """Leave the current process group and join the one of generation `generation` (None: this
        rank is not in it and has left)."""
        dist.destroy_process_group()
        if self.rank >= world:
            return None
        return self.form(world, f"pg/{generation}")


def _take_resize(runner: RankRunner, membership: _Membership | None, plan: StepPlan) -> tuple[ParallelContext, Any] | None:
    """Run a resize step: take the new map, then re-form the process group (None: this rank left)."""
    if membership is None:
        raise EngineError("a resize step reached a rank that cannot regroup")
    runner.run_step(replace(plan, resize=None))
    joined = membership.regroup(plan.switch_to, plan.resize)
    if joined is not None:
        runner.regroup(joined[0])
        log.info("rank %d: EP group re-formed with %d ranks at generation %d", runner.rank, plan.resize, plan.switch_to)
    else:
        log.info("rank %d: left the EP group (generation %d has %d ranks)", runner.rank, plan.switch_to, plan.resize)
    return joined


def worker_loop(runner: RankRunner, control: _Control, membership: _Membership | None = None) -> None:
    """Ranks 1..N-1: take step plans from rank 0 until it says stop, or until a resize leaves this
    rank out. Raises EngineError on failure."""
    step = -1
    try:
        while True:
            plan = control.plan(None)
            step = plan.step
            if plan.stop:
                return
            if plan.resize is not None:
                joined = _take_resize(runner, membership, plan)
                if joined is None:
                    return
                control = _Control(*joined)
                continue
            control.replies(runner.run_step(plan))
    except Exception as e:
        _abort_group()
        raise _group_error(step, runner.rank, e) from e


# ---------------------------------------------------------------------------------------------
# Engines (rank 0)
# ---------------------------------------------------------------------------------------------


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


class GroupEngine:
    """`engine_api.Engine` on rank 0 of an EP group (or of a group of one, in process).

    The step loop runs in a background thread (collectives block); `generate`/`stream` are
    called from the server's asyncio loop and only enqueue and await. `submit`/`run` are the
    synchronous equivalents (CLI, tests).
    """

    def __init__(self, runner: RankRunner, control: _Control, cfg: EngineConfig, metrics: Any = None,
                 membership: _Membership | None = None):
        self.runner = runner
        self.control = control
        self.membership = membership
        self._resize: tuple[int, int] | None = None  # (generation, world) the next step regroups to
        self.cfg = cfg
        self.metrics = metrics
        self.info = model_info(runner.model.args, cfg)
        self.world = control.world
        self.scheduler = Scheduler(self.world, cfg, self.info, metrics)
        self.step = 0
        self.switches: list[tuple[int, int]] = []
        """(step, generation) of every expert-map switch the group took."""
        self.resizes: list[tuple[int, int, int, int, float]] = []
        """(step, generation, old world, new world, seconds the resize step took) of every switch that
        re-formed the group."""
        self.map_errors: deque[str] = deque(maxlen=MAX_ERRORS)
        """The latest expert-map errors reported by any rank (a bounded window)."""
        self._wake = threading.Condition()
        self._failed: EngineError | None = None
        self._stopping = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._switch_to: int | None = None

    # ---- lifecycle ----

    def start(self) -> GroupEngine:
        self._thread = threading.Thread(target=self._loop, name="moe-step-loop", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every rank's loop (they return normally) and wait for the step thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.scheduler.fail_all(EngineError("engine shut down"))
        if self.world > 1:
            _abort_group()

    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failed is None and not self._stopping

    @property
    def failure(self) -> EngineError | None:
        """Why the group stopped serving, or None."""
        return self._failed

    def wait(self, timeout: float | None = None) -> EngineError | None:
        """Block until the step loop ends (shutdown or failure); the failure, or None. A serving
        process should exit non-zero on a failure: the group cannot heal, its pods are replaced."""
        self._stopped.wait(timeout)
        return self._failed

    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    def set_overlap(self, mode: str) -> None:
        """"on", "off" or "auto" from the next step (rank 0 decides; the plan tells every rank)."""
        if mode not in ("on", "off", "auto"):
            raise ValueError(f"overlap {mode!r}: expected 'on', 'off' or 'auto'")
        self.scheduler.overlap = mode

    # ---- requests ----

    def validate(self, req: GenerationRequest) -> None:
        """Raise RequestError for a request this engine cannot run."""
        info = self.info
        if not req.prompt_ids:
            raise RequestError("empty prompt: at least one input token is needed")
        bad = [t for t in req.prompt_ids if not (hasattr(t, "__index__") and 0 <= t < info.vocab_size)]
        if bad:
            raise RequestError(f"token ids {bad[:5]} outside the vocabulary 0..{info.vocab_size - 1}")
        if not isinstance(req.max_tokens, int) or not 1 <= req.max_tokens <= info.max_new_tokens:
            raise RequestError(f"max_tokens must be between 1 and {info.max_new_tokens}, got {req.max_tokens}")
        if len(req.prompt_ids) + req.max_tokens > info.max_context:
            raise RequestError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the context of "
                f"{info.max_context} tokens"
            )
        if not (isinstance(req.temperature, (int, float)) and math.isfinite(req.temperature) and req.temperature >= 0):
            raise RequestError(f"temperature must be a finite number >= 0, got {req.temperature}")

    def submit(self, req: GenerationRequest, *, want_logits: bool = False) -> _Ticket:
        """Queue a request (thread-safe); the ticket's `done` event fires when it finishes."""
        t = _Ticket(req, want_logits)
        self._enqueue(t)
        return t

    def run(self, reqs: list[GenerationRequest], timeout: float | None = None) -> list[GenerationResult]:
        """Submit all, wait for all (synchronous; they are batched together)."""
        tickets = [self.submit(r) for r in reqs]
        return [self._wait(t, timeout) for t in tickets]

    def prompt_logits(self, prompt_ids: list[int] | tuple[int, ...], timeout: float | None = None) -> torch.Tensor:
        """(S, vocab) fp32 logits of a prompt (prefilled on rank 0; the `logits` command)."""
        req = GenerationRequest(request_id=f"logits-{time.monotonic_ns()}", prompt_ids=tuple(prompt_ids), max_tokens=1)
        t = self.submit(req, want_logits=True)
        self._wait(t, timeout)
        assert t.logits is not None
        return t.logits

    def _wait(self, t: _Ticket, timeout: float | None) -> GenerationResult:
        if not t.done.wait(timeout):
            raise EngineError(f"request {t.req.request_id} did not finish within {timeout} s")
        if t.error is not None:
            raise t.error
        assert t.result is not None
        return t.result

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[GenerationResult] = loop.create_future()

        def on_event(tok: int | None, t: _Ticket) -> None:
            if tok is None:
                _call(loop, _settle, fut, t)

        t = _Ticket(req)
        t.listeners.append(on_event)
        self._enqueue(t)
        try:
            return await fut
        except asyncio.CancelledError:
            t.cancelled = True
            raise

    async def stream(self, req: GenerationRequest) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[int | None] = asyncio.Queue()

        def on_event(tok: int | None, t: _Ticket) -> None:
            _call(loop, q.put_nowait, tok)

        t = _Ticket(req)
        t.listeners.append(on_event)
        self._enqueue(t)
        try:
            while True:
                tok = await q.get()
                if tok is None:
                    if t.error is not None:
                        raise t.error
                    return
                yield tok
        finally:
            if not t.done.is_set():
                t.cancelled = True

    def _enqueue(self, t: _Ticket) -> None:
        self.validate(t.req)
        if self._failed is not None:
            raise self._failed
        if not self.ready():
            raise EngineError("engine is not running")
        if len(self.scheduler.waiting) >= self.cfg.max_queue:
            raise OverloadedError(f"{len(self.scheduler.waiting)} requests are waiting (MOE_MAX_QUEUE "
                                  f"{self.cfg.max_queue}); retry later")
        self.scheduler.add(t)
        with self._wake:
            self._wake.notify_all()

    # ---- the step loop ----

    def _loop(self) -> None:
        runner, sched = self.runner, self.scheduler
        try:
            while True:
                with self._wake:
                    if not self._stopping and sched.idle():
                        self._wake.wait(self.cfg.idle_heartbeat_s)
                    stopping = self._stopping
                if stopping:
                    self.control.plan(StepPlan(self.step, [[] for _ in range(self.world)],
                                               [[] for _ in range(self.world)], stop=True))
                    break
                if self._resize is not None:
                    self._regroup(*self._resize)
                    continue
                plan = sched.build(self.step, self._switch_to)
                self.control.plan(plan)
                reply = runner.run_step(plan)
                replies = self.control.replies(reply)
                if plan.switch_to is not None:
                    self.switches.append((plan.step, plan.switch_to))
                for rp in replies:
                    self.map_errors.extend(rp.errors)
                self._switch_to = self._next_switch(agreed_switch(runner.emap.generation, [rp.staged for rp in replies]))
                sched.update(plan, replies, runner.kept_logits)
                self.step += 1
        except Exception as e:
            self._failed = _group_error(self.step, 0, e)
            log.error("%s", self._failed)
            if self.metrics is not None:
                self.metrics.group_ready.labels(**self.metrics.lbl()).set(0)
            _abort_group()
            sched.fail_all(self._failed)
        finally:
            self._stopped.set()


    def _next_switch(self, generation: int | None) -> int | None:
        """The generation the next step switches to. One with a different number of ranks waits
        until the ranks it adds have loaded it (their `join/<rank>` key in the store names it) and
        the ranks it drops run no sequence (none are admitted to them meanwhile); then the next
        step is a resize step instead."""
        staged = self.runner.switcher.staged
        if generation is None or staged is None or staged.emap.world_size == self.world:
            self.scheduler.drained(self.world)  # no resize pending: admit to every rank
            return generation
        new = staged.emap.world_size
        if self.membership is None:
            return None
        want = f"{generation}:{staged.emap.digest}".encode()
        store = self.membership.store
        joined = all(store.check([f"join/{r}"]) and store.get(f"join/{r}") == want for r in range(self.world, new))
        if self.scheduler.drained(new) and joined:
            self._resize = (generation, new)
        return None

    def _regroup(self, generation: int, world: int) -> None:
        """The resize step: every rank takes `generation` and re-forms the group with `world` ranks."""
        self._resize = None
        t0 = time.perf_counter()
        release = self.scheduler.resize(world)
        old = self.world
        plan = StepPlan(self.step, [[] for _ in range(old)], release, switch_to=generation, resize=world)
        self.membership.store.set(f"resize/{generation}", str(world))  # joiners wait for this key
        self.control.plan(plan)
        ctx, control_group = _take_resize(self.runner, self.membership, plan)
        self.control = _Control(ctx, control_group)
        self.world = world
        self.switches.append((plan.step, generation))
        took = time.perf_counter() - t0
        self.resizes.append((plan.step, generation, old, world, took))
        log.info("EP group resized %d -> %d ranks at step %d (generation %d) in %.3f s", old, world, plan.step,
                 generation, took)
        self.step += 1


def _call(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the caller's loop is closed: nobody waits any more
        pass


def _settle(fut: asyncio.Future, t: _Ticket) -> None:
    if fut.done():
        return
    if t.error is not None:
        fut.set_exception(t.error)
    else:
        fut.set_result(t.result)


# ---------------------------------------------------------------------------------------------
# Starting a rank
# ---------------------------------------------------------------------------------------------


def _initial_map(args: ModelArgs, world: int, plan_path: str | Path | None, gpus_per_node: int) -> ExpertMap:
    """The map a group starts on: the plan file's (its ranks are the group, whatever WORLD_SIZE
    says: the operator may have grown or shrunk the group since this pod was created), else the
    default map for `world` ranks."""
    if plan_path is None:
        return default_map(args, world, gpus_per_node=gpus_per_node)
    gen, text = read_plan_files(plan_path)
    return parse_plan(text, args, None if world > 1 else 1, gen or 0)


START_FAILURE_ACK_S = 15.0
"""How long rank 0, which hosts the store, stays up after a start failure so that the other ranks
can read why (they would otherwise wait for the rendezvous timeout on a store that is gone)."""


def _start_failed(store: Any, rank: int, world: int, message: str) -> None:
    """Record a start failure in the store; rank 0 waits until the others have read it (bounded)."""
    try:
        if not store.check(["failed"]):
            store.set("failed", message)
        if rank == 0:
            keys = [f"failed-ack/{r}" for r in range(1, world)]
            deadline = time.monotonic() + START_FAILURE_ACK_S
            while time.monotonic() < deadline and not all(store.check([k]) for k in keys):
                time.sleep(0.05)
    except Exception:  # the store is gone (rank 0 died): nobody left to tell
        pass


def _start_failure(store: Any, rank: int) -> EngineError:
    msg = store.get("failed").decode()
    store.set(f"failed-ack/{rank}", "1")
    return EngineError(f"EP group start failed: {msg}")


def _store_wait(store: Any, keys: list[str], rank: int, timeout_s: float, what: str) -> None:
    """Wait until every key is set, or raise the group's start failure (no collective, so ranks
    may take minutes to start and load without tripping the collective timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if store.check(["failed"]):
            raise _start_failure(store, rank)
        missing = [k for k in keys if not store.check([k])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise EngineError(f"EP group start: {what} not done within {timeout_s:.0f} s (waiting for {missing[:8]})")
        time.sleep(0.05)


@dataclass
class Rank:
    """A started rank: rank 0 has `engine` (started); others call `run()` to serve the loop."""

    config: RankConfig
    runner: RankRunner | None
    """None: this rank is not in the group's expert map (see `standby`)."""
    control: _Control | None
    engine: GroupEngine | None = None
    membership: _Membership | None = None
    standby: str = ""
    """Why this rank has nothing to serve (it is beyond the group's current map)."""

    def run(self) -> None:
        """Ranks 1..N-1: run step plans until rank 0 stops the group or a resize leaves this rank
        out; EngineError on failure."""
        if self.engine is not None:
            raise RuntimeError("rank 0 serves through its engine, not run()")
        if self.runner is None:
            log.info("rank %d: %s; exiting", self.config.rank, self.standby)
            return
        try:
            worker_loop(self.runner, self.control, self.membership)
        finally:
            if self.runner.metrics is not None:
                self.runner.metrics.group_ready.labels(**self.runner.metrics.lbl()).set(0)
        _abort_group()


def start_rank(
    rc: RankConfig,
    *,
    metrics: Any = None,
    before_step: Callable[[StepPlan, int], None] | None = None,
) -> Rank:
    """Join the EP group `rc` describes, load this rank's part of the model, and return it ready.

    Order: TCP store rendezvous (rank 0 hosts it at MASTER_ADDR:MASTER_PORT) -> rank 0 publishes
    the initial expert map in the store so all ranks start on the same generation -> each rank
    builds and loads its model -> store barrier -> process group (gloo on CPU, NCCL on CUDA,
    with a gloo group for the step plans) -> rank 0's engine starts.
    """
    cfg = rc.engine
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if rc.world_size == 1 and rc.rank == 0:
        ctx = ParallelContext()
        args = Checkpoint(rc.checkpoint).args
        emap = _initial_map(args, 1, rc.expert_map, rc.gpus_per_node)
        runner = build_runner(rc.checkpoint, emap, cfg, ctx=ctx, plan_path=rc.expert_map, metrics=metrics,
                              before_step=before_step)
        control = _Control(ctx)
        engine = GroupEngine(runner, control, cfg, metrics).start()
        if metrics is not None:
            metrics.group_ready.labels(**metrics.lbl()).set(1)
        return Rank(rc, runner, control, engine)

    rdv = datetime.timedelta(seconds=cfg.rendezvous_timeout_s)
    store = _tcp_store(rc, rdv)
    device = resolve_device(cfg.device, rc.rank)
    backend = dist_backend(cfg.dist_backend, device)
    membership = _Membership(store, rc.rank, backend, device, datetime.timedelta(seconds=cfg.dist_timeout_s))
    resizable = rc.expert_map is not None  # the group follows the plan file's ranks
    world = rc.world_size
    try:
        args = Checkpoint(rc.checkpoint).args
        if rc.rank != 0 and store.check(["serving"]):
            return _join_running(rc, membership, args, metrics, before_step)
        if rc.rank == 0:
            emap = _initial_map(args, rc.world_size, rc.expert_map, rc.gpus_per_node)
            store.set("initial-map", repr(emap.generation) + "\n" + json.dumps(emap.to_plan_json()))
        else:
            _store_wait(store, ["initial-map"], rc.rank, cfg.rendezvous_timeout_s, "rank 0 publishing the expert map")
            gen, doc = store.get("initial-map").decode().split("\n", 1)
            emap = parse_plan(doc, args, None if resizable else rc.world_size, int(gen))
        world = emap.world_size
        if rc.rank >= world:  # started for a bigger group than rank 0 found in the plan: join later
            return _join_running(rc, membership, args, metrics, before_step)
        # The process group comes after loading (below); `attach` gives it to the runner then.
        runner = build_runner(rc.checkpoint, emap, cfg, ctx=ParallelContext(rc.rank, world, None),
                              plan_path=rc.expert_map, metrics=metrics, before_step=before_step, resizable=resizable)
        store.set(f"loaded/{rc.rank}", "1")
        _store_wait(store, [f"loaded/{r}" for r in range(world)], rc.rank, cfg.rendezvous_timeout_s,
                    "loading on every rank")
    except Exception as e:
        # Records the first failure only; rank 0 also waits here until the others have read it.
        _start_failed(store, rc.rank, world, f"rank {rc.rank}: {type(e).__name__}: {e}")
        raise

    ctx, control_group = membership.form(world, "pg")
    runner.attach(ctx)
    control = _Control(ctx, control_group)
    if metrics is not None:
        metrics.group_ready.labels(**metrics.lbl()).set(1)
    engine = None
    if rc.rank == 0:
        engine = GroupEngine(runner, control, cfg, metrics, membership).start()
        store.set("serving", "1")  # ranks that start from now on join the running group
    return Rank(rc, runner, control, engine, membership)


def _join_running(rc: RankConfig, membership: _Membership, args: ModelArgs, metrics: Any,
                  before_step: Callable[[StepPlan, int], None] | None) -> Rank:
    """A rank pod started for a group that is already serving (the operator grew it): wait until
    the plan file lists this rank, load its part of the model for that generation, say so in the
    store (`join/<rank>` = generation:digest), and join when rank 0 regroups to it (`resize/<g>`).
    A newer generation that arrives meanwhile is loaded and announced instead. Gives up after
    `rendezvous_timeout_s` with `standby` set when no plan includes this rank."""
    cfg, store = rc.engine, membership.store
    if rc.expert_map is None:
        raise EngineError(f"rank {rc.rank}: the EP group is already running and no expert-map file "
                          "(MOE_EXPERT_MAP) says whether it includes this rank")
    deadline = time.monotonic() + cfg.rendezvous_timeout_s
    runner: RankRunner | None = None
    # Every generation announced so far -> its staged experts (None: the runner's own map). Rank 0
    # may regroup to one this rank has since superseded (it read the key just before), so each
    # stays joinable.
    announced: dict[int, Any] = {}
    while True:
        if store.check(["failed"]):
            raise _start_failure(store, rc.rank)
        hit = next((g for g in sorted(announced, reverse=True) if store.check([f"resize/{g}"])), None)
        if hit is not None:
            if announced[hit] is not None:
                runner.switcher.staged = announced[hit]
                runner._switch(hit, -1)
            world = int(store.get(f"resize/{hit}"))
            ctx, control_group = membership.form(world, f"pg/{hit}")
            runner.regroup(ctx)
            if metrics is not None:
                metrics.group_ready.labels(**metrics.lbl()).set(1)
            log.info("rank %d: joined the running EP group (%d ranks, generation %d)", rc.rank, world, hit)
            return Rank(rc, runner, _Control(ctx, control_group), None, membership)
        if runner is None:
            gen, text = read_plan_files(rc.expert_map)
            emap = parse_plan(text, args, None, gen or 0)
            if rc.rank < emap.world_size:
                runner = build_runner(rc.checkpoint, emap, cfg, ctx=ParallelContext(rc.rank, emap.world_size, None),
                                      plan_path=rc.expert_map, metrics=metrics, before_step=before_step,
                                      resizable=True)
        else:
            runner.switcher.poll()
        if runner is not None:
            staged = runner.switcher.staged
            target = staged.emap if staged is not None else runner.emap
            if rc.rank >= target.world_size:
                return Rank(rc, None, None, standby=f"generation {target.generation} has {target.world_size} ranks")
            if target.generation not in announced:
                announced[target.generation] = staged
                store.set(f"join/{rc.rank}", f"{target.generation}:{target.digest}")
                continue  # look for its resize key at once
        if time.monotonic() > deadline:
            if runner is None:
                return Rank(rc, None, None, standby=f"no expert map within {cfg.rendezvous_timeout_s:.0f} s lists it")
            raise EngineError(f"rank {rc.rank}: the running EP group did not take it in within "
                              f"{cfg.rendezvous_timeout_s:.0f} s")
        time.sleep(0.1)


def _tcp_store(rc: RankConfig, timeout: datetime.timedelta) -> dist.TCPStore:
    """The rendezvous store; rank 0 serves it on POD_IP only when that is set.

    TCPStore's own server listens on every interface. In a pod that is harmless, but where pods
    share one network namespace (the local runner gives each its own loopback address) two
    groups' rank 0 would collide on the port, so rank 0 binds the listening socket itself.
    """
    bind = os.environ.get("POD_IP", "")
    if rc.rank == 0 and bind and bind not in ("0.0.0.0", "::"):
        import socket

        sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, rc.master_port))
        sock.listen(1024)
        # The store's server owns the descriptor from here on; detach so Python never closes it.
        return dist.TCPStore(rc.master_addr, rc.master_port, rc.world_size, True, timeout=timeout,
                             wait_for_workers=False, master_listen_fd=sock.detach(), use_libuv=False)
    return dist.TCPStore(rc.master_addr, rc.master_port, rc.world_size, rc.rank == 0, timeout=timeout,
                         wait_for_workers=False)


def run_rank_from_env(metrics: Any = None, env: Mapping[str, str] | None = None) -> GroupEngine | None:
    """What `moe-worker serve` runs in a rank pod (configuration from env, see RankConfig.from_env).

    Rank 0: returns the started GroupEngine (serve it; call `engine.shutdown()` on exit).
    Other ranks: serve step plans until rank 0 shuts the group down, then return None; raise
    EngineError when the group breaks (exit non-zero so the pod is replaced).
    """
    rc = RankConfig.from_env(env)
    rank = start_rank(rc, metrics=metrics)
    if rank.engine is not None:
        return rank.engine
    rank.run()
    return None


__all__ = [
    "EngineConfig",
    "GroupEngine",
    "Rank",
    "RankConfig",
    "RankRunner",
    "Scheduler",
    "StepPlan",
    "StepReply",
    "SeqWork",
    "build_runner",
    "run_rank_from_env",
    "split_micro_batches",
    "start_rank",
    "worker_loop",
]
