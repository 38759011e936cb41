"""Starting a rank: rendezvous in the TCP store, the initial expert map, loading, the process group;
joining a group that is already serving."""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_common.model_args import ModelArgs

from ..checkpoint import Checkpoint
from ..engine_api import EngineError
from ..expertmap import ExpertMap, default_map, parse_plan, read_plan_files
from ..model import ParallelContext
from .auth import SignedStore
from .config import RankConfig, dist_backend, resolve_device
from .group import GroupEngine
from .membership import FrontLost, _abort_group, _Control, _Membership, worker_loop
from .runner import RankRunner, build_runner
from .steps import StepPlan

log = logging.getLogger(__name__)


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
        backend = self.membership.backend if self.membership is not None else "gloo"
        try:
            control = self.control
            while True:
                try:
                    worker_loop(self.runner, control, self.membership)
                    break
                except FrontLost as e:
                    log.warning("%s; waiting for a new rank 0", e)
                    if self.runner.metrics is not None:
                        self.runner.metrics.group_ready.labels(**self.runner.metrics.lbl()).set(0)
                    control = _follow_new_front(self.config, self.runner, self.membership)
        finally:
            if self.runner.metrics is not None:
                self.runner.metrics.group_ready.labels(**self.runner.metrics.lbl()).set(0)
            if self.membership is not None:
                self.membership.stop()
        _abort_group(backend)


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
    if rc.rank_key is None:
        log.warning("rank %d: no group secret (MOE_RANK_KEY_FILE): store values and group membership are not "
                    "authenticated", rc.rank)
    store = SignedStore(_tcp_store(rc, rdv), rc.rank_key, create_session=rc.rank == 0)
    device = resolve_device(cfg.device, rc.rank)
    backend = dist_backend(cfg.dist_backend, device)
    membership = _Membership(store, rc.rank, backend, device, datetime.timedelta(seconds=cfg.dist_timeout_s),
                             cfg.peer_lost_s, cfg.attention_tp)
    membership.start_heartbeat()
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

    ctx, control_group = membership.form(range(world), world)
    runner.attach(ctx, membership.dispatch_waiter())
    control = _Control(ctx, control_group, membership.wait_work)
    if metrics is not None:
        metrics.group_ready.labels(**metrics.lbl()).set(1)
    engine = None
    if rc.rank == 0:
        engine = GroupEngine(runner, control, cfg, metrics, membership).start()
        store.set("serving", "1")  # ranks that start from now on join the running group
    return Rank(rc, runner, control, engine, membership)


def _join_running(rc: RankConfig, membership: _Membership, args: ModelArgs, metrics: Any,
                  before_step: Callable[[StepPlan, int], None] | None) -> Rank:
    """A rank pod started for a group that is already serving (the operator grew it, or replaced
    a rank the group lost): wait until the plan file lists this rank, load its part of the model
    for that generation, say so in the store (`join/<rank>` = generation:digest), and join when
    rank 0 admits it (`admit/<rank>`: the generation, the epoch and size of the group). A newer
    generation that arrives meanwhile is loaded and announced instead. Gives up after
    `rendezvous_timeout_s` with `standby` set when no plan includes this rank."""
    cfg, store = rc.engine, membership.store
    if rc.expert_map is None:
        raise EngineError(f"rank {rc.rank}: the EP group is already running and no expert-map file "
                          "(MOE_EXPERT_MAP) says whether it includes this rank")
    deadline = time.monotonic() + cfg.rendezvous_timeout_s
    runner: RankRunner | None = None
    # Every generation announced so far -> its staged experts (None: the runner's own map). Rank 0
    # may admit this rank to one it has since superseded (it read the key just before), so each
    # stays joinable.
    announced: dict[tuple[int, str], Any] = {}
    admit_key = f"admit/{rc.rank}"
    store.delete_key(admit_key)  # an admission meant for the rank this pod replaces
    while True:
        if store.check(["failed"]):
            raise _start_failure(store, rc.rank)
        admit = json.loads(store.get(admit_key)) if store.check([admit_key]) else None
        hit = (admit["generation"], admit["digest"]) if admit else None
        if hit in announced:
            if announced[hit] is not None:
                runner.switcher.staged = announced[hit]
                runner._switch(hit[0], -1)
            membership.epoch = admit["epoch"]
            ctx, control_group = membership.form(range(admit["world"]), admit["world"])
            runner.wait_work = membership.dispatch_waiter()
            runner.regroup(ctx)
            if metrics is not None:
                metrics.group_ready.labels(**metrics.lbl()).set(1)
            log.info("rank %d: joined the running EP group (%d ranks, generation %d, epoch %d)", rc.rank,
                     admit["world"], hit[0], membership.epoch)
            return Rank(rc, runner, _Control(ctx, control_group, membership.wait_work), None, membership)
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
            key = (target.generation, target.digest)
            if key not in announced:
                announced[key] = staged
                store.set(f"join/{rc.rank}", f"{target.generation}:{target.digest}")
                continue  # look for its admission at once
        if time.monotonic() > deadline:
            if runner is None:
                return Rank(rc, None, None, standby=f"no expert map within {cfg.rendezvous_timeout_s:.0f} s lists it")
            raise EngineError(f"rank {rc.rank}: the running EP group did not take it in within "
                              f"{cfg.rendezvous_timeout_s:.0f} s")
        time.sleep(0.1)


def _follow_new_front(rc: RankConfig, runner: RankRunner, membership: _Membership) -> _Control:
    """Rank 0 was lost: keep this process (its model and experts) and join the group a new rank 0
    forms (the operator replaces the rank-0 pod; MASTER_ADDR names it). Its sequences went with
    the old rank 0. Connect to the new store, take the map it publishes, say this rank is loaded,
    and form the group with the others. Raises EngineError when no rank 0 comes back within
    `rendezvous_timeout_s`, or its map leaves this rank out."""
    cfg = rc.engine
    _abort_group(membership.backend)
    membership.stop()
    deadline = time.monotonic() + cfg.rendezvous_timeout_s
    store = None
    while store is None:
        try:
            store = SignedStore(dist.TCPStore(rc.master_addr, rc.master_port, None, False,
                                              timeout=datetime.timedelta(seconds=5), wait_for_workers=False),
                                rc.rank_key)
        except (dist.DistError, RuntimeError) as e:
            if time.monotonic() > deadline:
                raise EngineError(f"rank {rc.rank}: no new rank 0 at {rc.master_addr}:{rc.master_port} within "
                                  f"{cfg.rendezvous_timeout_s:.0f} s ({e})") from e
            time.sleep(0.5)
    membership.store, membership.epoch, membership.heartbeat = store, 0, None
    membership.start_heartbeat()
    _store_wait(store, ["initial-map"], rc.rank, max(1.0, deadline - time.monotonic()), "the new rank 0's expert map")
    gen, doc = store.get("initial-map").decode().split("\n", 1)
    emap = parse_plan(doc, runner.model.args, None, int(gen))
    if rc.rank >= emap.world_size:
        raise EngineError(f"rank {rc.rank}: the new rank 0's map has {emap.world_size} ranks")
    runner.adopt(emap)
    store.set(f"loaded/{rc.rank}", "1")
    _store_wait(store, [f"loaded/{r}" for r in range(emap.world_size)], rc.rank,
                max(1.0, deadline - time.monotonic()), "loading on every rank")
    ctx, control_group = membership.form(range(emap.world_size), emap.world_size)
    runner.regroup(ctx)
    if runner.metrics is not None:
        runner.metrics.group_ready.labels(**runner.metrics.lbl()).set(1)
    log.info("rank %d: joined the group of a new rank 0 (%d ranks, generation %d), same process",
             rc.rank, emap.world_size, emap.generation)
    return _Control(ctx, control_group, membership.wait_work)


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
    return run_rank(RankConfig.from_env(env), metrics)


def run_rank(rc: RankConfig, metrics: Any = None) -> GroupEngine | None:
    """`run_rank_from_env` with the configuration already read."""
    rank = start_rank(rc, metrics=metrics)
    if rank.engine is not None:
        return rank.engine
    rank.run()
    return None
