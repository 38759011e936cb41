"""`LocalEngine`: `engine_api.Engine` on one process with the whole model (tests, single-process serving).

One background thread runs the step loop; `generate` / `stream` hand requests to it and await
their results on the caller's event loop, so the server's loop never runs model code.

Batching: the model advances a batch at one shared position (`Transformer.forward(tokens, start_pos,
cache)`), so requests are batched as *cohorts*: requests waiting at a step boundary with the same
prompt length are prefilled together (up to `max_batch`) and then decode together, one token per
loop iteration; a request that finishes leaves its cohort (its cache rows are dropped). Every
cohort advances once per iteration, round-robin, and new requests are admitted between iterations,
so a long request never blocks others. Cohorts never merge, and requests of different lengths run
side by side as separate forwards.

Numerics: batching changes the GEMM shapes, so logits differ from a batch-1 run by rounding
(about 1e-5 with fp32 activations, more with bf16 or FP8 activation quantization); greedy tokens
are the same unless the top two logits are that close. Sampling (temperature > 0) draws from a
per-request generator seeded with `seed` (fresh entropy when None).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CONFIG_FILE, load_model
from .engine_api import (
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    RequestError,
    SequenceError,
)
from .model import KVCache, Transformer
from .sampling import sample

_END = object()  # end of a stream


@dataclass(eq=False)
class _Seq:
    """One request in flight. Touched by the step thread only, except `cancelled`."""

    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None  # generate(): the GenerationResult
    queue: asyncio.Queue | None  # stream(): token ids, then _END or an exception
    arrival: float
    out: list[int] = field(default_factory=list)
    logit_sums: list[float] = field(default_factory=list)
    first_token_at: float = 0.0
    generator: torch.Generator | None = None
    cancelled: bool = False


@dataclass(eq=False)
class _Cohort:
    """Sequences with one prompt length that advance together through one KV cache."""

    seqs: list[_Seq]
    cache: KVCache
    pos: int = 0  # positions already in the cache
    last: torch.Tensor | None = None  # (B, 1) tokens to feed next; None before the prefill


class LocalEngine:
    """The whole model in this process; see the module docstring."""

    def __init__(self, model: Transformer, info: ModelInfo, *, max_batch: int = 8, max_running: int = 64):
        if max_batch < 1 or max_running < 1:
            raise ValueError("max_batch and max_running must be >= 1")
        if info.vocab_size != model.args.vocab_size:
            raise ValueError(f"info.vocab_size {info.vocab_size} != the model's {model.args.vocab_size}")
        self.model = model
        self.info = info
        self.max_batch = max_batch
        self.max_running = max_running
        self.device = model.embed.weight.device
        self.stats = {"steps": 0, "rows": 0, "max_batch_seen": 0, "cohorts": 0}
        """Counters for tests and benchmarks: forward calls, sequences summed over them (rows / steps
        is the mean batch), the largest batch, cohorts formed."""
        self._cv = threading.Condition()
        self._pending: list[_Seq] = []
        self._cohorts: list[_Cohort] = []
        self._closed = False
        self._paused = False
        self._thread = threading.Thread(target=self._run, name="local-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        max_context: int | None = None,
        max_new_tokens: int = 256,
        max_batch: int = 8,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **model_kw: Any,
    ) -> LocalEngine:
        """Load checkpoint `path` (kwargs as `Transformer`). dtype default: fp32 on CPU, bf16 on GPUs.
        name default: the directory's name; max_context default: the config's max_position_embeddings."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        model = load_model(path, dtype=dtype, device=device, **model_kw)
        args = model.args
        eos = None
        try:  # ModelArgs ignores eos_token_id; the server uses it as the default stop token
            raw = json.loads((Path(path) / CONFIG_FILE).read_text()).get("eos_token_id")
            eos = raw if isinstance(raw, int) and 0 <= raw < args.vocab_size else None
        except (OSError, ValueError):
            pass
        ctx = min(max_context or args.max_position_embeddings, args.max_position_embeddings)
        info = ModelInfo(
            name=name or Path(path).resolve().name,
            vocab_size=args.vocab_size,
            max_context=ctx,
            max_new_tokens=min(max_new_tokens, ctx - 1),
            eos_token_id=eos,
        )
        return cls(model, info, max_batch=max_batch)

    # ---- Engine protocol ----

    def ready(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._pending)

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        loop = asyncio.get_running_loop()
        seq = _Seq(req, loop, loop.create_future(), None, time.perf_counter())
        self._submit(seq)
        try:
            return await seq.future
        except asyncio.CancelledError:
            seq.cancelled = True  # the step thread drops it at the next step
            raise

    async def stream(self, req: GenerationRequest) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        seq = _Seq(req, loop, None, asyncio.Queue(), time.perf_counter())
        self._submit(seq)
        try:
            while True:
                item = await seq.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            seq.cancelled = True

    # ---- control ----

    def close(self) -> None:
        """Stop the step loop; requests still pending or running fail with EngineError."""
        with self._cv:
            self._closed = True
            self._paused = False
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        err = EngineError("the engine is shutting down")
        for seq in self._pending + [s for c in self._cohorts for s in c.seqs]:
            self._fail(seq, err)
        self._pending.clear()
        self._cohorts.clear()

    def pause(self) -> None:
        """Hold the step loop at the next step boundary; requests queue up (tests: deterministic batches)."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    # ---- validation and hand-off ----

    def check(self, req: GenerationRequest) -> None:
        """Raise RequestError when `req` cannot run on this model."""
        info = self.info
        n = len(req.prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        bad = [(i, t) for i, t in enumerate(req.prompt_ids) if not 0 <= t < info.vocab_size]
        if bad:
            i, t = bad[0]
            raise RequestError(f"prompt token {i} is {t}, outside the vocabulary 0..{info.vocab_size - 1}")
        if not 1 <= req.max_tokens <= info.max_new_tokens:
            raise RequestError(f"max_tokens is {req.max_tokens}; expected 1..{info.max_new_tokens}")
        if n + req.max_tokens > info.max_context:
            raise RequestError(
                f"{n} prompt tokens + max_tokens {req.max_tokens} exceed the model's context of {info.max_context}"
            )
        if not (req.temperature >= 0 and req.temperature != float("inf")):
            raise RequestError(f"temperature is {req.temperature}; expected a finite number >= 0")

    def _submit(self, seq: _Seq) -> None:
        self.check(seq.req)
        if seq.req.temperature > 0:
            seq.generator = torch.Generator(device=self.device)
            if seq.req.seed is None:
                seq.generator.seed()
            else:
                seq.generator.manual_seed(seq.req.seed)
        with self._cv:
            if self._closed or not self._thread.is_alive():
                raise EngineError("the engine is not running")
            self._pending.append(seq)
            self._cv.notify_all()

    # ---- the step loop (its own thread) ----

    def _run(self) -> None:
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (self._paused or not (self._pending or self._cohorts)):
                    self._cv.wait()
                if self._closed:
                    return
                self._admit_locked()
            for cohort in list(self._cohorts):
                try:
                    self._step(cohort)
                except Exception as e:  # a model failure fails its cohort; the loop keeps serving
                    err = EngineError(f"generation failed: {type(e).__name__}: {e}")
                    for seq in cohort.seqs:
                        self._fail(seq, err)
                    cohort.seqs = []
                if not cohort.seqs:
                    self._cohorts.remove(cohort)

    def _admit_locked(self) -> None:
        running = sum(len(c.seqs) for c in self._cohorts)
        room = self.max_running - running
        if room <= 0 or not self._pending:
            return
        take, self._pending = self._pending[:room], self._pending[room:]
        by_len: dict[int, list[_Seq]] = {}
        for seq in take:
            if not seq.cancelled:
                by_len.setdefault(len(seq.req.prompt_ids), []).append(seq)
        for n, seqs in by_len.items():
            for i in range(0, len(seqs), self.max_batch):
                group = seqs[i : i + self.max_batch]
                max_len = n + max(s.req.max_tokens for s in group)
                self._cohorts.append(_Cohort(group, self.model.new_cache(len(group), max_len)))
                self.stats["cohorts"] += 1

    def _step(self, c: _Cohort) -> None:
        B = len(c.seqs)
        if c.last is None:
            tokens = torch.tensor([s.req.prompt_ids for s in c.seqs], dtype=torch.long, device=self.device)
            logits = self.model(tokens, 0, c.cache)[:, -1]  # (B, vocab) fp32
            c.pos = tokens.shape[1]
        else:
            logits = self.model(c.last, c.pos, c.cache)[:, -1]
            c.pos += 1
        self.stats["steps"] += 1
        self.stats["rows"] += B
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], B)
        now = time.perf_counter()
        next_ids = self._sample(c.seqs, logits)
        sums = logits.sum(dim=-1).tolist()
        keep: list[int] = []
        for row, seq in enumerate(c.seqs):
            if seq.cancelled:
                continue
            tok = next_ids[row]
            if isinstance(tok, SequenceError):  # this request fails alone; its cohort goes on
                self._fail(seq, tok)
                next_ids[row] = 0
                continue
            seq.out.append(tok)
            seq.logit_sums.append(sums[row])
            if len(seq.out) == 1:
                seq.first_token_at = now
            if seq.queue is not None:
                self._emit(seq, tok)
            if tok in seq.req.stop_ids:
                self._finish(seq, "stop", now)
            elif len(seq.out) >= seq.req.max_tokens:
                self._finish(seq, "length", now)
            else:
                keep.append(row)
        last = torch.tensor(next_ids, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        if len(keep) < B:
            idx = torch.tensor(keep, dtype=torch.long, device=self.device)
            _keep_rows(c.cache, idx)
            last = last[idx]
        c.seqs = [c.seqs[r] for r in keep]
        c.last = last

    @staticmethod
    def _sample(seqs: list[_Seq], logits: torch.Tensor) -> list[int | SequenceError]:
        """logits (B, vocab) fp32 -> one id per row (`sampling.sample`), or why that row failed."""
        ids: list[int | SequenceError] = []
        for row, seq in enumerate(seqs):
            try:
                ids.append(sample(logits[row], seq.req.temperature, seq.generator))
            except SequenceError as e:
                ids.append(e)
        return ids

    # ---- results back to the callers' loops ----

    def _finish(self, seq: _Seq, reason: str, now: float) -> None:
        result = GenerationResult(
            request_id=seq.req.request_id,
            output_ids=list(seq.out),
            finish_reason=reason,
            prompt_tokens=len(seq.req.prompt_ids),
            time_to_first_token_s=seq.first_token_at - seq.arrival,
            duration_s=now - seq.arrival,
            logit_sums=list(seq.logit_sums),
        )
        if seq.future is not None:
            _call(seq.loop, _set_result, seq.future, result)
        if seq.queue is not None:
            _call(seq.loop, seq.queue.put_nowait, _END)

    def _emit(self, seq: _Seq, tok: int) -> None:
        _call(seq.loop, seq.queue.put_nowait, tok)

    def _fail(self, seq: _Seq, err: Exception) -> None:
        if seq.future is not None:
            _call(seq.loop, _set_exception, seq.future, err)
        if seq.queue is not None:
            _call(seq.loop, seq.queue.put_nowait, err)


def _keep_rows(cache: KVCache, idx: torch.Tensor) -> None:
    """Keep batch rows `idx` of every layer's cache (finished sequences leave their cohort)."""
    for layer in cache.layers:
        for attr in ("kv", "pe", "k", "v"):
            t = getattr(layer, attr, None)
            if t is not None:
                setattr(layer, attr, t.index_select(0, idx))
    cache.batch = int(idx.numel())


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the caller's loop is closed: nobody is waiting any more
        pass


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
