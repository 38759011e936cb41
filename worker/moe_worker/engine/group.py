"""`GroupEngine`: `engine_api.Engine` on rank 0 of an EP group, driving the step loop."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..engine_api import EngineError, GenerationRequest, GenerationResult, OverloadedError, RequestError
from ..expertmap import MAX_ERRORS, ExpertMap, agreed_switch
from .config import EngineConfig, model_info
from .membership import (
    RECOVERY_ATTEMPTS,
    _abort_group,
    _Control,
    _group_error,
    _Membership,
    _take_resize,
    bury,
)
from .runner import RankRunner
from .scheduler import Scheduler, _Ticket
from .steps import StepPlan

log = logging.getLogger(__name__)


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
        self._resize: ExpertMap | None = None  # the map the next step regroups to
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
        self._stop_group = True
        self._paused = False
        self.stats = {"steps": 0, "rows": 0, "max_batch_seen": 0}
        """Steps that ran a forward, sequences over those steps, the most sequences in one step."""
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._switch_to: int | None = None
        self._broken = 0  # steps broken in a row without a rank lost
        self.recoveries: list[tuple[int, list[int], int, float]] = []
        """(step, ranks lost, sequences recomputed, seconds to re-form) of every broken step the
        group survived."""

    # ---- lifecycle ----

    def start(self) -> GroupEngine:
        self._thread = threading.Thread(target=self._loop, name="moe-step-loop", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0, *, stop_group: bool = True) -> None:
        """Stop every rank's loop (they return normally) and wait for the step thread. Without
        `stop_group` rank 0 leaves alone: the other ranks see the front lost and wait for a new
        one (a rank-0 pod evicted or replaced while its group goes on serving)."""
        with self._wake:
            self._stopping = True
            self._stop_group = stop_group
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.scheduler.fail_all(EngineError("engine shut down"))
        if self.world > 1:
            _abort_group(self.membership.backend if self.membership else "gloo")
        if self.membership is not None:
            self.membership.stop()

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

    def pause(self) -> None:
        """Run no work from the next step on (requests queue; idle heartbeats go on)."""
        with self._wake:
            self._paused = True

    def resume(self) -> None:
        with self._wake:
            self._paused = False
            self._wake.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the step loop while requests queue (tests use it to batch requests together)."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

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
        if not (isinstance(req.top_p, (int, float)) and 0 < req.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {req.top_p}")

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
        sched = self.scheduler
        if self.runner.device.type == "cuda":  # a thread starts on device 0: Triton launches on the current one
            torch.cuda.set_device(self.runner.device)
        try:
            while True:
                with self._wake:
                    if not self._stopping and (sched.idle() or self._paused):
                        self._wake.wait(self.cfg.idle_heartbeat_s)
                    stopping = self._stopping
                if stopping:
                    if self._stop_group:
                        self.control.plan(StepPlan(self.step, [[] for _ in range(self.world)],
                                                   [[] for _ in range(self.world)], stop=True))
                    break
                if self._resize is not None:
                    self._regroup(self._resize)
                    continue
                plan = self._empty_plan() if self._paused else sched.build(self.step, self._switch_to)
                try:
                    self._run_step(plan)
                    self._broken = 0
                except Exception as e:
                    bury(e, self.cfg.dist_timeout_s + 5.0)
                    self._recover(plan, _group_error(plan.step, 0, e))
        except Exception as e:
            self._failed = e if isinstance(e, EngineError) else _group_error(self.step, 0, e)
            log.error("%s", self._failed)
            if self.metrics is not None:
                self.metrics.group_ready.labels(**self.metrics.lbl()).set(0)
            _abort_group(self.membership.backend if self.membership else "gloo")
            sched.fail_all(self._failed)
        finally:
            self._stopped.set()

    def _run_step(self, plan: StepPlan) -> None:
        """Send the plan, run rank 0's share, gather every rank's reply and apply it."""
        runner, sched = self.runner, self.scheduler
        self.control.plan(plan)
        reply = runner.run_step(plan)
        replies = self.control.replies(reply)
        if plan.switch_to is not None:
            self.switches.append((plan.step, plan.switch_to))
        for rp in replies:
            self.map_errors.extend(rp.errors)
        self._switch_to = self._next_switch(agreed_switch(runner.emap.generation, [rp.staged for rp in replies]))
        sched.update(replies, runner.kept_logits)
        self._count(plan)
        self.step += 1

    def _recover(self, plan: StepPlan, err: EngineError) -> None:
        """A step broke (a rank died or hung, so a collective failed): release the group, decide
        with the survivors which ranks are lost, re-form without them on the degraded map, and
        queue the lost ranks' sequences for recomputation. The step's own work is sent again.
        Raises (the group stops) without a membership, or when steps keep breaking with no rank
        lost (a fault of the step itself, not of a peer)."""
        m = self.membership
        if m is None:
            raise err
        self._broken += 1
        if self._broken > 2:
            raise EngineError(f"{err} (the step broke {self._broken} times in a row; giving up)")
        t0 = time.perf_counter()
        log.warning("%s; re-forming the group", err)
        if self.metrics is not None:
            self.metrics.group_ready.labels(**self.metrics.lbl()).set(0)
        self.scheduler.step_broke(plan)
        self._switch_to = None
        m.mark_broken(str(err))
        _abort_group(m.backend)
        runner, new, moved = self.runner, frozenset(), 0
        for _ in range(RECOVERY_ATTEMPTS):
            # A rank may die while the group re-forms (several ranks of a lost node check in one
            # by one, then go): forming then times out, every survivor checks in again, and rank
            # 0 decides again with their heartbeats by then silent.
            decision = m.decide(runner.emap.generation, self.world, runner.emap.lost)
            lost = frozenset(decision["lost"])
            now_lost = lost - runner.emap.lost
            runner.take_degraded(decision["generation"], lost)
            moved += self.scheduler.lose(set(now_lost))
            new |= now_lost
            try:
                ctx, control_group = m.reform(decision)
                break
            except Exception as e:  # a member did not come: decide again
                log.warning("EP group: re-forming without ranks %s failed (%s); deciding again", sorted(lost),
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                _abort_group(m.backend)
        else:
            raise EngineError(f"{err}; the group did not re-form in {RECOVERY_ATTEMPTS} attempts")
        runner.regroup(ctx)
        self.control = _Control(ctx, control_group, m.wait_work)
        if new:
            self._broken = 0  # a peer was lost: this was not the step's own fault
        took = time.perf_counter() - t0
        self.recoveries.append((plan.step, sorted(new), moved, took))
        if self.metrics is not None:
            self.metrics.group_ready.labels(**self.metrics.lbl()).set(1)
        log.warning("EP group re-formed without ranks %s at step %d in %.3f s (epoch %d); %d sequences to "
                    "recompute; serving %d of %d ranks", sorted(lost), plan.step, took, m.epoch, moved,
                    len(ctx.live()), self.world)

    def _next_switch(self, generation: int | None) -> int | None:
        """The generation the next step switches to (None: none yet).

        A generation with the same ranks is switched to as soon as every rank has staged it. One
        that changes who is in the group (more or fewer ranks, or the ranks the group lost coming
        back) waits until the ranks it adds have loaded it (their `join/<rank>` key in the store
        names it) and the ranks it drops run no sequence (none are admitted to them meanwhile);
        then the next step is a resize step instead. While ranks are lost, the target is the
        agreed staged generation, else the served generation's own (whole) map."""
        switcher = self.runner.switcher
        staged = switcher.staged
        lost = self.runner.emap.lost
        if not lost and (generation is None or staged is None or staged.emap.world_size == self.world):
            self.scheduler.drained(self.world)  # no resize pending: admit to every rank
            return generation
        if self.membership is None:
            return None
        if staged is not None:
            if generation is None:
                return None  # not staged everywhere yet
            target = staged.emap
        else:
            target = switcher.full
        joiners = [r for r in range(target.world_size) if r not in self.control.live]
        store = self.membership.store
        want = f"{target.generation}:{target.digest}".encode()
        joined = all(store.check([f"join/{r}"]) and store.get(f"join/{r}") == want for r in joiners)
        if self.scheduler.drained(target.world_size) and joined:
            self._resize = target
        return None

    def _empty_plan(self) -> StepPlan:
        return StepPlan(self.step, [[] for _ in range(self.world)], [[] for _ in range(self.world)])

    def _count(self, plan: StepPlan) -> None:
        rows = sum(len(w) for w in plan.work[::self.scheduler.tp])  # (a TP group's ranks share one list)
        if rows:
            self.stats["steps"] += 1
            self.stats["rows"] += rows
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], rows)

    def _regroup(self, target: ExpertMap) -> None:
        """The resize (or rejoin) step: every rank takes `target` (the staged generation, or the
        served one's whole map) and re-forms the group with all its ranks; the ranks it adds are
        admitted through `admit/<rank>`."""
        self._resize = None
        t0 = time.perf_counter()
        m = self.membership
        generation, world = target.generation, target.world_size
        joiners = [r for r in range(world) if r not in self.control.live]
        release = self.scheduler.resize(world)
        old = self.world
        plan = StepPlan(self.step, [[] for _ in range(old)], release, switch_to=generation, resize=world)
        admit = json.dumps({"generation": generation, "digest": target.digest, "epoch": m.epoch + 1, "world": world})
        for r in joiners:
            m.store.set(f"admit/{r}", admit)  # joiners wait for this key
        self.control.plan(plan)
        ctx, control_group = _take_resize(self.runner, m, plan)
        for r in joiners:
            m.store.delete_key(f"join/{r}")
        self.control = _Control(ctx, control_group, m.wait_work)
        self.world = world
        self.switches.append((plan.step, generation))
        took = time.perf_counter() - t0
        self.resizes.append((plan.step, generation, old, world, took))
        log.info("EP group resized %d -> %d ranks (ranks %s joined) at step %d (generation %d) in %.3f s", old,
                 world, joiners, plan.step, generation, took)
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
