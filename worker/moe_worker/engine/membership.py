"""The control collectives (plans out, replies in), the process group a rank belongs to and how it
re-forms, and the loop of ranks 1..N-1."""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from ..engine_api import EngineError
from ..model import ParallelContext
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
    the bytes. No pickle."""

    def __init__(self, ctx: ParallelContext, group: Any = None):
        self.rank, self.world = ctx.rank, ctx.world_size
        self.group = group if group is not None else ctx.group

    def plan(self, plan: StepPlan | None) -> StepPlan:
        if self.world == 1:
            assert plan is not None
            return plan
        data = encode_plan(plan) if self.rank == 0 else b""
        n = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(n, src=0, group=self.group)
        size = _frame_size(int(n.item()))
        buf = _to_tensor(data) if self.rank == 0 else torch.empty(size, dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.group)
        return plan if self.rank == 0 else decode_plan(buf.numpy().tobytes(), self.world)

    def replies(self, reply: StepReply) -> list[StepReply]:
        if self.world == 1:
            return [reply]
        data = encode_reply(reply)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
        width = max(_frame_size(int(n.item())) for n in sizes)
        buf = torch.zeros(width, dtype=torch.uint8)
        buf[: len(data)] = _to_tensor(data)
        out = [torch.empty(width, dtype=torch.uint8) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(buf, out, dst=0, group=self.group)
        if out is None:
            return []
        replies = [reply]
        for r in range(1, self.world):
            got = decode_reply(out[r][: int(sizes[r].item())].numpy().tobytes(), self.world)
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
