"""The control collectives (plans out, replies in), the process group a rank belongs to and how it
re-forms, and the loop of ranks 1..N-1."""

from __future__ import annotations

import datetime
import hmac
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from ..engine_api import EngineError
from ..model import ParallelContext
from .auth import SignedStore, membership_proof
from .runner import RankRunner
from .steps import (
    MAX_FRAME_BYTES,
    StepPlan,
    StepReply,
    WireError,
    decode_plan,
    decode_reply,
    encode_plan,
    encode_reply,
)

log = logging.getLogger(__name__)


class _Control:
    """Step plans out (broadcast), replies in (gather); identity for a single process. Frames are
    `steps`' JSON encodings carried as uint8 tensors over the control group (gloo): a length, then
    the bytes. No pickle. Rank 0 is group rank 0; with lost ranks the group has only `ctx.live()`."""

    def __init__(self, ctx: ParallelContext, group: Any = None, wait: Callable[[Any], None] | None = None):
        self.rank, self.world = ctx.rank, ctx.world_size
        self.live = ctx.live()
        self.group = group if group is not None else ctx.group
        self.wait = wait or (lambda work: work.wait())
        """How to wait for a collective (`_Membership.wait_work`: in slices, watching for a broken group)."""

    def plan(self, plan: StepPlan | None) -> StepPlan:
        if self.world == 1:
            assert plan is not None
            return plan
        data = encode_plan(plan) if self.rank == 0 else b""
        n = torch.tensor([len(data)], dtype=torch.int64)
        self.wait(dist.broadcast(n, src=0, group=self.group, async_op=True))
        size = _frame_size(int(n.item()))
        buf = _to_tensor(data) if self.rank == 0 else torch.empty(size, dtype=torch.uint8)
        self.wait(dist.broadcast(buf, src=0, group=self.group, async_op=True))
        return plan if self.rank == 0 else decode_plan(buf.numpy().tobytes(), self.world)

    def replies(self, reply: StepReply) -> list[StepReply]:
        if self.world == 1:
            return [reply]
        data = encode_reply(reply)
        M = len(self.live)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(M)]
        self.wait(dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group,
                                  async_op=True))
        width = max(_frame_size(int(n.item())) for n in sizes)
        buf = torch.zeros(width, dtype=torch.uint8)
        buf[: len(data)] = _to_tensor(data)
        out = [torch.empty(width, dtype=torch.uint8) for _ in range(M)] if self.rank == 0 else None
        self.wait(dist.gather(buf, out, dst=0, group=self.group, async_op=True))
        if out is None:
            return []
        replies = [reply]
        for i in range(1, M):
            r = self.live[i]
            got = decode_reply(out[i][: int(sizes[i].item())].numpy().tobytes(), self.world)
            if got.rank != r:
                raise WireError(f"the reply gathered from rank {r} says it is rank {got.rank}")
            replies.append(got)
        return replies


def _frame_size(n: int) -> int:
    if not 0 < n <= MAX_FRAME_BYTES:
        raise WireError(f"control frame of {n} bytes (1..{MAX_FRAME_BYTES} allowed)")
    return n


def _to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _abort_group(backend: str = "gloo") -> None:
    """Tear down this process's process group so peers blocked on us fail now, not at the timeout.

    NCCL: abort the communicators (`ncclCommAbort`): destroying them waits for the dead peer.
    gloo: destroy the group, which closes its sockets. Either runs in a thread with a bound, as a
    broken group may block."""
    if not dist.is_initialized():
        return

    def release() -> None:
        try:
            if backend == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception:  # already broken: nothing more to release
            pass

    t = threading.Thread(target=release, daemon=True)
    t.start()
    t.join(5.0)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def bury(failure: BaseException, after_s: float) -> None:
    """Keep `failure` (and what its traceback's frames hold: the broken group's pending gloo work)
    alive for `after_s`, then drop it on a timer thread. A pending gloo work object's destructor
    waits for its operation to end, at the collective timeout when a peer hung; dropped on the
    step thread when the `except` clause ends, it would stall the re-formed group that long."""
    hold = [failure]
    t = threading.Timer(after_s, hold.clear)
    t.daemon = True
    t.start()


_COMM_ERROR_HINTS = ("Connection", "peer", "Timed out", "timed out", "Timeout", "NCCL", "gloo", "closed")


def _group_error(step: int, rank: int, e: BaseException) -> EngineError:
    if isinstance(e, GroupBroken):
        return GroupBroken(f"EP group broken at step {step} (seen on rank {rank}): {e}")
    text = str(e).splitlines()[0] if str(e) else ""
    comm = isinstance(e, dist.DistError) or any(h in text for h in _COMM_ERROR_HINTS)
    why = "lost a peer rank or a collective failed" if comm else "failed"
    return EngineError(f"EP group {why} at step {step} on rank {rank}: {type(e).__name__}: {text}")


class GroupBroken(EngineError):
    """The group's current process group is broken (a rank marked it, or rank 0 saw a member go
    silent); every rank re-forms."""


WAIT_SLICE_S = 0.5
"""How long a rank waits for a collective before it looks again whether the group is broken."""


class FrontLost(EngineError):
    """Rank 0 (the front, which hosts the group's store and scheduler) is gone."""


RECOVERY_ATTEMPTS = 4
"""How many decisions of rank 0 a survivor takes for one broken step before it gives up."""

HEARTBEAT_S = 0.25
"""How often a rank adds to its heartbeat counter `hb/<rank>` in the store."""


class _Heartbeat:
    """This rank's heartbeat in the store, from its own thread and store connection (the step
    thread may be blocked in a collective for up to the timeout): `hb/<rank>` = "<incarnation>:
    <count>", the incarnation random per process. Rank 0 also watches its group's members, so
    that when the group breaks it knows which ranks went silent (dead: SIGKILL, node gone;
    stopped: SIGSTOP, a hung driver) or were replaced by a new process already (a new
    incarnation: the process it formed the group with is gone)."""

    def __init__(self, client: SignedStore, rank: int, watch: bool):
        self.rank, self.watch = rank, watch
        self.incarnation = os.urandom(6).hex()
        self.client = client
        """A store connection of its own (the step thread's may be in use)."""
        self._count = 0
        self._ranks: tuple[int, ...] = ()
        self._seen: dict[int, tuple[str, float]] = {}  # rank -> (last value, when it last changed)
        self._formed_with: dict[int, str] = {}  # rank -> its incarnation when the group formed
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> _Heartbeat:
        threading.Thread(target=self._run, name=f"moe-heartbeat-{self.rank}", daemon=True).start()
        return self

    def watched(self) -> tuple[int, ...]:
        with self._lock:
            return self._ranks

    def watch_ranks(self, incarnations: dict[int, str]) -> None:
        """Rank 0, after forming a group: watch its members (rank -> the incarnation each formed
        it with)."""
        with self._lock:
            self._ranks = tuple(incarnations)
            self._formed_with = dict(incarnations)
            # (a beat of an earlier process of a rank is no beat of the one in the group now)
            self._seen = {r: v for r, v in self._seen.items()
                          if r in self._formed_with and v[0].split(":")[0] == self._formed_with[r]}

    def _run(self) -> None:
        while True:
            try:
                self.beat()
                if self.watch:
                    self._sample()
            except Exception as e:  # the store (rank 0) is gone: nothing to beat to
                log.warning("rank %d: heartbeat stopped: %s", self.rank, str(e).splitlines()[0] if str(e) else e)
                return
            if self._stop.wait(HEARTBEAT_S):
                return

    def beat(self) -> None:
        self._count += 1
        self.client.set(f"hb/{self.rank}", f"{self.incarnation}:{self._count}")

    def _sample(self) -> None:
        now = time.monotonic()
        values = {}
        for r in self._ranks:
            try:
                if self.client.check([f"hb/{r}"]):
                    values[r] = self.client.get(f"hb/{r}").decode()
            except WireError:  # overwritten by a forgery between the two calls: not a beat
                pass
        with self._lock:
            for r, v in values.items():
                if self._seen.get(r, ("",))[0] != v:
                    self._seen[r] = (v, now)

    def silent_for(self, rank: int) -> float:
        """Seconds since `rank`'s heartbeat last moved (since watching began, if never seen);
        infinite when another process has taken the rank since the group formed."""
        with self._lock:
            seen = self._seen.get(rank)
            if seen is None:
                self._seen[rank] = seen = ("", time.monotonic())
            formed = self._formed_with.get(rank)
            if formed is not None and seen[0] and seen[0].split(":")[0] != formed:
                return math.inf
        return time.monotonic() - seen[1]

    def stop(self) -> None:
        self._stop.set()


class _Membership:
    """How this rank (re)joins its EP group's process group: the rendezvous store on rank 0, the
    backend and the timeout, the heartbeat, and the group's epoch: every re-formation makes a
    process group on a fresh store prefix (`pg` first, then `pg/e<epoch>`).

    Three ways the group re-forms in place, none of which restarts a process or drops a KV cache:
    - a resize step (a map with more or fewer ranks): ranks beyond it leave, new ranks (started
      as pods beforehand, waiting in `startup._join_running`) join at the same moment;
    - a rejoin step: ranks the group had lost come back (same step, same mechanism);
    - a broken step (`recover_*`): a rank died or hung and every survivor's collective failed.
      Each survivor checks in (`alive/<epoch>/<rank>`); rank 0 waits until every rank has either
      checked in or been silent for `peer_lost_s`, and publishes the decision
      (`reform/<epoch>`: generation, lost ranks); all survivors re-form without the lost ones.
    """

    def __init__(self, store: Any, rank: int, backend: str, device: torch.device, timeout: datetime.timedelta,
                 peer_lost_s: float = 2.0, attention_tp: int = 1):
        self.store, self.rank, self.backend, self.device, self.timeout = store, rank, backend, device, timeout
        self.peer_lost_s = peer_lost_s
        self.attention_tp = attention_tp
        self.epoch = 0
        self.members: tuple[int, ...] = ()
        self.heartbeat: _Heartbeat | None = None

    def start_heartbeat(self) -> None:
        if self.heartbeat is None:
            client = dist.TCPStore(self.store.host, self.store.port, is_master=False,
                                   timeout=datetime.timedelta(seconds=30))
            self.heartbeat = _Heartbeat(SignedStore(client, self.store.key), self.rank, watch=self.rank == 0).start()

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()

    @staticmethod
    def prefix(epoch: int) -> str:
        return "pg" if epoch == 0 else f"pg/e{epoch}"

    def form(self, members: Sequence[int], world: int) -> tuple[ParallelContext, Any]:
        """Create the process group of `members` (ranks of a map of `world` ranks) for the
        current epoch; one all-reduce proves every member is in it."""
        members = tuple(sorted(members))
        if self.backend == "nccl":
            # Abort the communicator on a timeout instead of tearing the process down (torch's
            # default), so the survivors can re-form. Not yet run on GPUs.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        kw = {"device_id": self.device} if self.backend == "nccl" else {}
        prefix = self.prefix(self.epoch)
        if self.heartbeat is not None:  # which process of this rank is in the group (see _Heartbeat)
            self.store.set(f"{prefix}/incarnation/{self.rank}", self.heartbeat.incarnation)
        dist.init_process_group(self.backend, store=dist.PrefixStore(prefix, self.store.raw),
                                rank=members.index(self.rank), world_size=len(members), timeout=self.timeout, **kw)
        group = dist.group.WORLD
        control_group = dist.new_group(backend="gloo", timeout=self.timeout) if self.backend == "nccl" else group
        probe = torch.ones(1, device=self.device)
        dist.all_reduce(probe, group=group)
        if int(probe.item()) != len(members):
            raise EngineError(f"EP group: all_reduce saw {int(probe.item())} ranks, expected {len(members)}")
        self._prove(members, prefix, control_group)
        self.members = members
        if self.heartbeat is not None and self.heartbeat.watch:
            self.heartbeat.watch_ranks({r: self.store.get(f"{prefix}/incarnation/{r}").decode()
                                        for r in members if r != self.rank})
        whole = members == tuple(range(world))
        tp_group = self._tp_groups(members, world)
        return (ParallelContext(self.rank, world, group, None if whole else members, self.attention_tp, tp_group),
                control_group)

    def _tp_groups(self, members: tuple[int, ...], world: int) -> Any:
        """The process groups of the attention TP groups (ranks [g * tp, (g + 1) * tp)) whose
        ranks are all members; every member creates every one, in the same order (torch's rule).
        Returns this rank's, or None (tp 1, or a rank of its TP group is lost: it then serves
        experts only until the group is whole again)."""
        tp = self.attention_tp
        if tp == 1:
            return None
        if world % tp:
            raise EngineError(f"EP group of {world} ranks: attention TP {tp} must divide it")
        mine = None
        for base in range(0, world, tp):
            block = range(base, base + tp)
            if all(r in members for r in block):
                g = dist.new_group([members.index(r) for r in block], timeout=self.timeout)
                if self.rank in block:
                    mine = g
        return mine

    def _prove(self, members: tuple[int, ...], prefix: str, control_group: Any) -> None:
        """Every member shows it holds the group's secret (`auth.membership_proof`), before the
        group serves; a process that took a rank's place in the rendezvous cannot."""
        key = self.store.key
        if key is None:
            return
        session = self.store.session_id()
        mine = membership_proof(key, session, prefix, members, self.rank)
        got = [torch.empty(len(mine), dtype=torch.uint8) for _ in members]
        dist.all_gather(got, torch.frombuffer(bytearray(mine), dtype=torch.uint8), group=control_group)
        for r, proof in zip(members, got, strict=True):
            if not hmac.compare_digest(proof.numpy().tobytes(), membership_proof(key, session, prefix, members, r)):
                raise EngineError(f"EP group {prefix}: the process in rank {r}'s place does not hold the group's "
                                  "secret; refusing to serve with it")

    def regroup(self, world: int) -> tuple[ParallelContext, Any] | None:
        """Leave the current process group and join the next epoch's, of all `world` ranks of the
        new map (None: this rank is not in it and has left)."""
        dist.destroy_process_group()
        self.epoch += 1
        if self.rank >= world:
            return None
        return self.form(range(world), world)

    # ---- noticing a broken group ----

    def wait_work(self, work: Any) -> None:
        """Wait for a collective in slices of `WAIT_SLICE_S`, and between them look for a broken
        group: another rank marked it broken in the store (its step failed: a peer died), or, on
        rank 0, a member's heartbeat is silent for `peer_lost_s` or comes from a new process (a
        hang, or a death the collective has not noticed). Then raise GroupBroken at once instead
        of waiting for the collective timeout. For gloo work (the control group; the exchanges on
        CPU): NCCL exchanges are waited for whole (`dispatch_waiter`)."""
        slice_ = datetime.timedelta(seconds=WAIT_SLICE_S)
        while True:
            try:
                work.wait(timeout=slice_)
                return
            except RuntimeError as e:
                if "Operation timed out" not in str(e):
                    raise
            why = self.broken()
            if why:
                raise GroupBroken(why)

    def dispatch_waiter(self) -> Callable[[Any], None] | None:
        """How the dispatcher should wait for its exchanges: in slices on gloo; NCCL work as is
        (its own timeout and abort; not run on GPUs yet)."""
        return self.wait_work if self.backend == "gloo" else None

    def broken(self) -> str:
        """Why the current process group is broken, or ''."""
        key = f"broken/{self.epoch}"
        if self.store.check([key]):
            return self.store.get(key).decode()
        hb = self.heartbeat
        if hb is not None and hb.watch:
            lost = [r for r in hb.watched() if hb.silent_for(r) >= self.peer_lost_s]
            if lost:
                why = f"rank 0: no heartbeat from ranks {lost} for {self.peer_lost_s} s (or a new process)"
                self.mark_broken(why)
                return why
        return ""

    def mark_broken(self, why: str) -> None:
        """Tell every rank of the group that it is broken (they stop waiting and check in); the
        first reason stays."""
        try:
            self.store.set_if_absent(f"broken/{self.epoch}", why[:500])
        except Exception:  # the store (rank 0) is gone: the others notice that themselves
            pass

    # ---- a broken step ----

    def check_in(self, generation: int) -> None:
        """A survivor's word to rank 0: alive after the group broke, serving `generation`."""
        try:
            self.store.set(f"alive/{self.epoch}/{self.rank}", str(generation))
        except dist.DistError as e:
            raise FrontLost(f"rank {self.rank}: the group's store on rank 0 is gone ({_first_line(e)})") from e

    def decide(self, generation: int, world: int, lost_before: frozenset[int]) -> dict[str, Any]:
        """Rank 0: which ranks the group lost, published as `reform/<epoch>`. Waits until every
        member has checked in or been silent for `peer_lost_s`; a member that beats but never
        checks in is counted lost after the collective timeout (it will find itself left out)."""
        e, others = self.epoch, [r for r in self.members if r != self.rank]

        deadline = time.monotonic() + self.timeout.total_seconds() + self.peer_lost_s + 5.0
        while True:
            alive = {r: int(self.store.get(f"alive/{e}/{r}")) for r in others if self.store.check([f"alive/{e}/{r}"])}
            pending = [r for r in others if r not in alive]
            silent = self.heartbeat.silent_for if self.heartbeat is not None else (lambda r: math.inf)
            if all(silent(r) >= self.peer_lost_s for r in pending) or time.monotonic() > deadline:
                break

            time.sleep(0.05)
        doc = {"epoch": e + 1, "generation": max([generation, *alive.values()]), "world": world,
               "lost": sorted(set(pending) | lost_before)}
        self.store.set(f"reform/{e}", json.dumps(doc))
        return doc

    def await_decision(self) -> dict[str, Any]:
        """A survivor: rank 0's decision for the current epoch (EngineError when rank 0 is gone
        or decides nothing in time)."""
        key = f"reform/{self.epoch}"
        deadline = time.monotonic() + 2 * (self.timeout.total_seconds() + self.peer_lost_s) + 10.0
        try:
            while not self.store.check([key]):
                if time.monotonic() > deadline:
                    raise EngineError(f"rank {self.rank}: rank 0 did not re-form the group within "
                                      f"{deadline - time.monotonic():.0f} s")
                time.sleep(0.05)
            return json.loads(self.store.get(key))
        except dist.DistError as e:
            raise FrontLost(f"rank {self.rank}: the group's store on rank 0 is gone ({_first_line(e)})") from e

    def reform(self, decision: dict[str, Any]) -> tuple[ParallelContext, Any]:
        """Join the process group of the decision's epoch: every rank of its map but the lost. If
        it fails, the group's members for the next decision are these."""
        self.epoch = decision["epoch"]
        lost = set(decision["lost"])
        self.members = tuple(r for r in range(decision["world"]) if r not in lost)
        return self.form(self.members, decision["world"])


def _take_resize(runner: RankRunner, membership: _Membership | None, plan: StepPlan) -> tuple[ParallelContext, Any] | None:
    """Run a resize or rejoin step: take the new map, then re-form the process group (None: this
    rank left)."""
    if membership is None:
        raise EngineError("a resize step reached a rank that cannot regroup")
    runner.run_step(replace(plan, resize=None))
    joined = membership.regroup(plan.resize)
    if joined is not None:
        runner.regroup(joined[0])
        log.info("rank %d: EP group re-formed with %d ranks at generation %d", runner.rank, plan.resize, plan.switch_to)
    else:
        log.info("rank %d: left the EP group (generation %d has %d ranks)", runner.rank, plan.switch_to, plan.resize)
    return joined


def recover_rank(runner: RankRunner, membership: _Membership, err: EngineError) -> _Control:
    """Ranks 1..N-1 after a broken step: release the broken group, check in, take rank 0's
    decision (serve the degraded map without the lost ranks) and re-form; when forming fails (a
    member died meanwhile), check in again for rank 0's next decision. Raises FrontLost when rank
    0 is gone, EngineError when this rank was left out or the group does not re-form."""
    log.warning("%s; re-forming the group", err)
    membership.mark_broken(str(err))
    _abort_group(membership.backend)
    for _ in range(RECOVERY_ATTEMPTS):
        membership.check_in(runner.emap.generation)
        decision = membership.await_decision()
        lost = frozenset(decision["lost"])
        if runner.rank in lost:
            raise EngineError(f"rank {runner.rank}: the group re-formed without it (silent for more than "
                              f"{membership.peer_lost_s} s when it broke)")
        runner.take_degraded(decision["generation"], lost)
        try:
            ctx, control_group = membership.reform(decision)
        except Exception as e:  # a member did not come: rank 0 decides again
            log.warning("rank %d: re-forming failed (%s); checking in again", runner.rank,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            _abort_group(membership.backend)
            continue
        runner.regroup(ctx)
        log.info("rank %d: EP group re-formed without ranks %s (epoch %d)", runner.rank, sorted(lost),
                 membership.epoch)
        return _Control(ctx, control_group, membership.wait_work)
    raise EngineError(f"rank {runner.rank}: the group did not re-form in {RECOVERY_ATTEMPTS} attempts")


def worker_loop(runner: RankRunner, control: _Control, membership: _Membership | None = None) -> None:
    """Ranks 1..N-1: take step plans from rank 0 until it says stop, or until a resize leaves this
    rank out. A broken step re-forms the group without the lost ranks. Raises FrontLost when
    rank 0 is gone, EngineError when this rank cannot go on (left out, no membership)."""
    step = -1
    while True:
        try:
            plan = control.plan(None)
            step = plan.step
            if plan.stop:
                return
            if plan.resize is not None:
                joined = _take_resize(runner, membership, plan)
                if joined is None:
                    return
                control = _Control(*joined, membership.wait_work)
                continue
            control.replies(runner.run_step(plan))
        except Exception as e:
            bury(e, membership.timeout.total_seconds() + 5.0 if membership else 0.0)
            err = _group_error(step, runner.rank, e)
            if membership is None or (isinstance(e, EngineError) and not isinstance(e, GroupBroken)):
                _abort_group(membership.backend if membership else "gloo")
                raise err from e
            try:
                control = recover_rank(runner, membership, err)
            except FrontLost:
                raise  # the caller waits for a new rank 0 (`startup.Rank.run`)
            except Exception as again:
                _abort_group(membership.backend)
                raise EngineError(f"{err}; could not re-form: {again}") from again
