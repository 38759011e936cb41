"""Rank 0's view of every request (`Scheduler`): the queue, admission to ranks, step plans, results."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..engine_api import GenerationRequest, GenerationResult, ModelInfo, SequenceError
from ..model import tp_group
from .config import EngineConfig, kv_budget
from .steps import SeqWork, StepPlan, StepReply

log = logging.getLogger(__name__)


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
        self.seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "little")
        """The sampling seed every rank that runs it uses (chosen here when the request has none,
        so a recomputation after a fault draws the same tokens)."""
        self.recomputed = 0
        """Times the sequence was recomputed on another rank after its rank was lost."""

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
    """The rank that runs it (with attention TP: the first rank of the TP group that does)."""
    pos: int = 0  # positions in the KV cache
    work: SeqWork | None = None
    """The work sent for it whose step has not completed yet (a step that broke: sent again)."""
    kv: int = 0  # KV cache positions the rank allocated for it (prompt + max_tokens)
    prefill: list[int] | None = None
    """The tokens it was admitted with (prompt, plus the output so far when recomputed), while
    some of them are not in its cache yet (`pos` < len): chunked prefill continues."""


class Scheduler:
    """Rank 0's view of all requests: queue, the sequences on each rank, step plans.

    With attention tensor parallelism (`cfg.attention_tp` = n) the unit of scheduling is a TP
    group, ranks [g * n, (g + 1) * n): its sequences are counted on its first rank and sent to
    every rank of it (`_expand`); a group with a lost rank takes none."""

    def __init__(self, world_size: int, cfg: EngineConfig, info: ModelInfo, metrics: Any = None):
        self.world = world_size
        self.cfg = cfg
        self.tp = cfg.attention_tp
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
        self.lost: set[int] = set()
        """Ranks the group lost (it serves without them until they rejoin): no sequences."""

    def add(self, t: _Ticket) -> None:
        with self.lock:
            self.waiting.append(t)

    def idle(self) -> bool:
        with self.lock:
            return not self.waiting and not self.running

    def build(self, step: int, switch_to: int | None) -> StepPlan:
        """The next step, within `max_step_tokens` per rank: every decoding sequence runs one
        token, then prompts being prefilled run their next chunk, then queued requests are
        admitted to the least-loaded ranks with room, their prompts' first chunks in this step
        (continuous batching with chunked prefill: a long prompt never holds up the others'
        decoding by more than a step of `max_step_tokens`)."""
        work: list[list[SeqWork]] = [[] for _ in range(self.world)]
        room = [self.cfg.max_step_tokens] * self.world  # tokens each rank may still take this step
        with self.lock:
            prefilling = []
            for seq, r in list(self.running.items()):
                if r.ticket.cancelled:
                    self._finish(seq, "cancelled")
                elif r.work is not None:  # sent again after a broken step
                    work[r.rank].append(r.work)
                    room[r.rank] -= len(r.work.tokens)
                elif r.prefill is not None:
                    prefilling.append((seq, r))
                else:
                    r.work = SeqWork(seq, [r.ticket.output[-1]], r.pos)
                    work[r.rank].append(r.work)
                    room[r.rank] -= 1
            for seq, r in prefilling:  # (the rank set the sequence up with its first chunk)
                n = min(len(r.prefill) - r.pos, room[r.rank])
                if n > 0:
                    r.work = SeqWork(seq, r.prefill[r.pos:r.pos + n], r.pos, sample=r.pos + n == len(r.prefill))
                    work[r.rank].append(r.work)
                    room[r.rank] -= n
            budget = self.cfg.max_prefill_tokens
            admitted = 0
            while self.waiting:
                t = self.waiting[0]
                if t.cancelled:
                    self.waiting.popleft()
                    continue
                tokens = [int(x) for x in t.req.prompt_ids] + t.output  # output: a recomputed sequence
                n = len(tokens)
                if admitted and n > budget:
                    break
                kv = len(t.req.prompt_ids) + t.req.max_tokens
                if t.want_logits and not self._serves(0):  # would wait until the group is whole: say so now
                    self.waiting.popleft()
                    t.fail(SequenceError("prompt logits are computed on rank 0, whose attention TP group lost a "
                                         "rank; retry once the group is whole"))
                    continue
                if t.want_logits:  # prompt logits: the whole prompt in one step, on rank 0
                    rank = 0 if self._has_room(0, kv) else None
                else:
                    free = [r for r in range(0, self.world, self.tp)
                            if self._has_room(r, kv) and room[r] > 0 and r not in self.draining and self._serves(r)]
                    # Least loaded first; among equals, round-robin from the last pick, so that a
                    # few requests spread over every node instead of piling onto the first one
                    # (tokens prefer expert replicas on their own node).
                    rank = min(free, key=lambda r: (self.per_rank[r], (r - self._rotate) % self.world)) if free else None
                    if rank is not None:
                        self._rotate = (rank + 1) % self.world
                if rank is None:
                    break
                self.waiting.popleft()
                if self.metrics is not None and not t.output:  # first admission (a recomputation is not queueing)
                    self.metrics.queue_seconds.labels(**self.metrics.lbl()).observe(time.monotonic() - t.arrived)
                seq = self._next_seq
                self._next_seq += 1
                req = t.req
                first = n if t.want_logits else min(n, room[rank])
                w = SeqWork(seq, tokens[:first], 0, new=True, max_len=kv, temperature=req.temperature, seed=t.seed,
                            want_logits=t.want_logits, drawn=len(t.output), top_p=req.top_p, sample=first == n)
                self.running[seq] = _Running(t, rank, 0, w, kv, tokens if first < n else None)
                self.per_rank[rank] += 1
                self.kv_used[rank] += kv
                work[rank].append(w)
                room[rank] -= first
                budget -= n
                admitted += 1
            release, self.release = self.release, [[] for _ in range(self.world)]
        self._expand(work)
        self._expand(release)
        busiest = max(sum(len(w.tokens) for w in ws) for ws in work)
        mb = {"on": 2, "off": 1}.get(self.overlap, 2 if busiest >= self.cfg.overlap_min_tokens else 1)
        return StepPlan(step, work, release, micro_batches=mb, switch_to=switch_to)

    def _serves(self, rank: int) -> bool:
        """The TP group that starts at `rank` has all its ranks (it can attend)."""
        return self.lost.isdisjoint(tp_group(rank, self.tp))

    def _expand(self, per_rank: list[list]) -> None:
        """Give every rank of a TP group its first rank's list (attention TP: they run the same
        sequences)."""
        for first in range(0, self.world, self.tp):
            for r in range(first + 1, first + self.tp):
                per_rank[r] = per_rank[first]

    def _has_room(self, rank: int, kv: int) -> bool:
        """Rank `rank` can take one more sequence of `kv` cache positions."""
        return self.per_rank[rank] < self.cfg.max_seqs_per_rank and self.kv_used[rank] + kv <= self.kv_budget

    def update(self, replies: list[StepReply], kept_logits: dict[int, torch.Tensor]) -> None:
        """Apply the tokens the ranks sampled; finish requests that are done."""
        now = time.monotonic()
        with self.lock:
            for r in self.running.values():  # prompt chunks that draw no token: in the cache now
                if r.work is not None and not r.work.sample:
                    r.pos += len(r.work.tokens)
                    r.work = None
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
                    r.work = None
                    r.prefill = None
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

    def step_broke(self, plan: StepPlan) -> None:
        """The group broke during `plan`: its releases are sent again with the next step, and
        every running sequence runs its uncommitted work again (`_Running.work`)."""
        with self.lock:
            for r, seqs in enumerate(plan.release):
                if r < self.world and r % self.tp == 0 and self._serves(r):
                    self.release[r][:0] = seqs

    def lose(self, ranks: set[int]) -> int:
        """The group serves on without `ranks`: the sequences they ran (their KV caches are
        gone) go back to the head of the queue, in arrival order, to be recomputed on another
        rank from prompt + the tokens generated so far. Returns how many."""
        with self.lock:
            self.lost |= ranks
            groups = {tp_group(r, self.tp).start for r in ranks}  # a TP group that lost a rank loses its sequences
            moved = [self.running.pop(seq).ticket for seq in sorted(self.running) if self.running[seq].rank in groups]
            for t in moved:
                t.recomputed += 1
            self.waiting.extendleft(reversed(moved))
            for r in ranks | groups:
                self.per_rank[r] = 0
                self.kv_used[r] = 0
                self.release[r] = []
            return len(moved)

    def rejoined(self) -> None:
        """Every lost rank is back (a regroup step took them in)."""
        with self.lock:
            self.lost = set()

    def drained(self, world: int) -> bool:
        """Stop admitting to ranks >= `world`; True once none of them runs a sequence."""
        with self.lock:
            self.draining = set(range(world, self.world))
            return not any(self.per_rank[r] for r in self.draining)

    def resize(self, world: int) -> list[list[int]]:
        """The group now has `world` ranks; returns the releases pending for the old ranks."""
        with self.lock:
            release, self.release = self.release, [[] for _ in range(world)]
            self._expand(release)
            if any(r.rank >= world for r in self.running.values()):
                raise RuntimeError("resize below a rank that still runs sequences")
            self.per_rank = (self.per_rank + [0] * world)[:world]
            self.kv_used = (self.kv_used + [0] * world)[:world]
            self.world = world
            self.draining = set()
            self.lost = set()  # the new map's ranks are all in the group
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
