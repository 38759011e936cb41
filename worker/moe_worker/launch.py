"""Start N local ranks of an EP group as processes (`generate`/`logits --world-size N`, tests, bench).

In a pod, a rank is started from its env (`engine.run_rank_from_env`: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Here the same `engine.start_rank` runs in N child processes on one
machine, with a free TCP port on 127.0.0.1 for the rendezvous.

Children come from a `forkserver` that has imported torch and the worker once, so starting 16
ranks costs about a second instead of 16 torch imports; each child sets torch to one thread (the
ranks share the machine's cores). The parent watches them: the first child that fails (an error
it reports, or an exit code) is recorded, the others are given `grace_s` to fail on their own (which
is what shows that a lost rank brings the group down by itself, as it must in pods), and whatever
is left is then killed. `GroupFailed` says which rank failed first, how, and how fast the rest
followed.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from .engine_api import GenerationRequest

PRELOAD = ["torch", "torch.distributed", "moe_worker.engine"]
FAULT_EXIT_CODE = 17
"""Exit code of a rank killed by `Job.exit_rank_at_step` (failure tests)."""


class GroupFailed(RuntimeError):
    """A local EP group did not finish: `first` failed first; `errors` and `exit_codes` per rank."""

    def __init__(self, message: str, *, first: int | None, errors: dict[int, str], exit_codes: dict[int, int | None],
                 exited_by_themselves_s: float | None, killed: list[int]):
        super().__init__(message)
        self.first = first
        self.errors = errors
        self.exit_codes = exit_codes
        self.exited_by_themselves_s = exited_by_themselves_s
        """Seconds from the first failure until every other rank had exited on its own (None: some
        had to be killed)."""
        self.killed = killed


def run_rank_from_env(metrics: Any = None, env: dict[str, str] | None = None) -> Any:
    """The pod case, one rank per process (same as `engine.run_rank_from_env`): rank 0 returns
    its started GroupEngine, other ranks serve until the group stops and return None."""
    from .engine import run_rank_from_env as run

    return run(metrics, env)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _child(target: Callable[..., Any], rank: int, world: int, port: int, args: tuple, q: Any) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        value = target(rank, world, port, *args)
        if rank == 0:
            q.put(("result", rank, value))
        q.put(("done", rank, None))
    except BaseException as e:  # report, then die without running atexit hooks (gloo teardown)
        text = f"{type(e).__name__}: {e}"
        if not isinstance(e, (RuntimeError, ValueError, OSError)) or os.environ.get("MOE_TRACEBACK"):
            text += "\n" + traceback.format_exc()
        try:
            q.put(("error", rank, text))
            q.close()
            q.join_thread()
        finally:
            os._exit(1)
    q.close()
    q.join_thread()


def spawn_ranks(
    world_size: int,
    target: Callable[..., Any],
    args: tuple = (),
    *,
    timeout_s: float = 600.0,
    grace_s: float = 40.0,
    may_die: Collection[int] = (),
) -> Any:
    """Run `target(rank, world_size, port, *args)` in `world_size` processes; rank 0's return value.

    `target` must be importable by name (a module-level function). Raises GroupFailed. Ranks in
    `may_die` are faults a test injects: their exit is no failure, and they are killed at the end
    if still there (a stopped process).
    """
    ctx = _context()
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(target, r, world_size, port, args, q), name=f"moe-rank-{r}", daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    result: Any = None
    have_result = False
    errors: dict[int, str] = {}
    t_fail: float | None = None

    def drain(block: float) -> None:
        nonlocal result, have_result
        try:
            kind, rank, value = q.get(timeout=block)
        except queue.Empty:
            return
        if kind == "result":
            result, have_result = value, True
        elif kind == "error":
            errors.setdefault(rank, value)

    try:
        while True:
            drain(0.05)
            codes = {r: p.exitcode for r, p in enumerate(procs) if r not in may_die}
            if t_fail is None and (errors or any(c not in (None, 0) for c in codes.values())):
                t_fail = time.monotonic()
            if t_fail is None and all(c == 0 for c in codes.values()):
                while not have_result and not q.empty():
                    drain(0.05)
                if not have_result:
                    raise GroupFailed("EP group exited without a result from rank 0", first=None, errors=errors,
                                      exit_codes=codes, exited_by_themselves_s=None, killed=[])
                return result
            if t_fail is not None:
                alive = [r for r, c in codes.items() if c is None]
                if not alive or time.monotonic() - t_fail > grace_s:
                    for _ in range(20):  # collect late error messages
                        drain(0.02)
                    took = time.monotonic() - t_fail if not alive else None
                    first = _root_cause(errors, codes)
                    for r in alive:
                        procs[r].kill()
                    for p in procs:
                        p.join(5)
                    codes = {r: p.exitcode for r, p in enumerate(procs)}
                    raise GroupFailed(_failure_message(world_size, first, errors, codes, took, alive, grace_s),
                                      first=first, errors=errors, exit_codes=codes, exited_by_themselves_s=took,
                                      killed=alive)
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(procs) if p.exitcode is None]
                for r in alive:
                    procs[r].kill()
                raise GroupFailed(f"EP group of {world_size} ranks did not finish within {timeout_s:.0f} s "
                                  f"(ranks still running: {alive[:16]})", first=None, errors=errors,
                                  exit_codes={r: p.exitcode for r, p in enumerate(procs)},
                                  exited_by_themselves_s=None, killed=alive)
    finally:
        for r in may_die:
            if procs[r].exitcode is None:
                procs[r].kill()
        for p in procs:
            if p.exitcode is None:
                p.join(10)
            if p.exitcode is None:
                p.kill()
                p.join(5)
        q.close()


def _root_cause(errors: dict[int, str], codes: dict[int, int | None]) -> int:
    """The rank that failed first: one that exited non-zero without a message crashed (the
    others report errors because of it); else the rank whose error is not a lost peer."""
    crashed = [r for r, c in codes.items() if c not in (None, 0) and r not in errors]
    if crashed:
        return crashed[0]
    own = [r for r, text in errors.items() if "lost a peer" not in text]
    return min(own or errors)


def _failure_message(world: int, first: int, errors: dict[int, str], codes: dict[int, int | None],
                     took: float | None, killed: list[int], grace_s: float) -> str:
    how = errors.get(first) or f"exited with code {codes.get(first)}"
    lines = [f"EP group of {world} ranks failed: rank {first} {how.splitlines()[0] if how else ''}".rstrip()]
    for r in sorted(errors):
        if r != first:
            lines.append(f"  rank {r}: {errors[r].splitlines()[0]}")
    if took is not None:
        lines.append(f"  every other rank exited by itself {took:.2f} s after the first failure")
    else:
        lines.append(f"  ranks {killed[:16]} were still running {grace_s:.0f} s after the first failure and were killed")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Engine jobs: what rank 0 does in a local group
# ---------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """Part of a job: optional settings, then requests run together (batched) to completion."""

    requests: list[GenerationRequest] = field(default_factory=list)
    overlap: str | None = None
    """Set the engine's overlap mode ("on", "off", "auto") before the requests."""
    logits_prompt: tuple[int, ...] | None = None
    """Also compute the full (S, vocab) logits of this prompt (on rank 0)."""
    plan_update: tuple[dict, int] | None = None
    """(PLAN.json document, generation) rank 0 writes to the expert-map files, between two steps,
    once the first request has `update_after_tokens` tokens: the operator's ConfigMap update."""
    update_after_tokens: int = 1


@dataclass
class Job:
    phases: list[Phase]
    exit_rank_at_step: tuple[int, int] | None = None
    """(rank, n): that rank exits with FAULT_EXIT_CODE before its n-th step with work (tests)."""
    stop_rank_at_step: tuple[int, int] | None = None
    """(rank, n): that rank stops itself (SIGSTOP, a hang) before its n-th step with work (tests)."""
    map_load_fails: tuple[int, int] | None = None
    """(rank, generation): loading that generation's experts raises on that rank (tests)."""


@dataclass
class PhaseResult:
    results: list[dict]
    """GenerationResult fields per request, in request order."""
    logits: Any = None
    """numpy (S, vocab) float32 when the phase asked for logits."""
    steps: tuple[int, int] = (0, 0)
    """First and last step number the phase ran."""
    dispatch: dict = field(default_factory=dict)
    """Rank 0's DispatchStats at the end of the phase (cumulative)."""


@dataclass
class JobResult:
    phases: list[PhaseResult]
    switches: list[tuple[int, int]]
    """(step, generation) of every expert-map switch."""
    generation: int
    map_errors: list[str]
    dispatch: dict
    """Rank 0's DispatchStats."""
    wall_s: float
    recoveries: list = field(default_factory=list)
    """`GroupEngine.recoveries`: (step, ranks lost, sequences recomputed, seconds) per broken step."""


def _fault_hook(job: Job) -> Callable | None:
    fault = job.exit_rank_at_step or job.stop_rank_at_step
    if fault is None:
        return None
    target, n = fault
    seen = [0]

    def hook(plan, rank):
        if plan.has_work():
            seen[0] += 1
            if rank == target and seen[0] >= n:
                if job.exit_rank_at_step is not None:
                    os._exit(FAULT_EXIT_CODE)
                os.kill(os.getpid(), signal.SIGSTOP)

    return hook


def _faulty_ranks(job: Job) -> tuple[int, ...]:
    return tuple(f[0] for f in (job.exit_rank_at_step, job.stop_rank_at_step) if f is not None)


def _fail_map_load(switcher: Any, generation: int) -> None:
    load = switcher.load_experts

    def failing(added):
        if switcher._loading == generation:
            raise OSError(f"injected failure loading experts {added} of generation {generation}")
        return load(added)

    switcher.load_experts = failing


def _engine_rank(rank: int, world: int, port: int, checkpoint: str, engine_cfg: Any, expert_map: str | None,
                 job: Job, key: bytes | None = None) -> Any:
    from .engine import RankConfig, start_rank

    rc = RankConfig(rank=rank, world_size=world, checkpoint=checkpoint, master_port=port,
                    expert_map=expert_map, engine=engine_cfg, rank_key=key)
    r = start_rank(rc, before_step=_fault_hook(job))
    if job.map_load_fails is not None and job.map_load_fails[0] == rank:
        _fail_map_load(r.runner.switcher, job.map_load_fails[1])
    if r.engine is None:
        r.run()
        return None
    try:
        return run_job(r.engine, job, expert_map)
    finally:
        r.engine.shutdown()


def run_job(engine: Any, job: Job, expert_map: str | None) -> JobResult:
    """Run `job`'s phases on a started engine (rank 0); used by run_local and in-process tests."""
    from .expertmap import write_plan_files

    t0 = time.monotonic()
    out = []
    for ph in job.phases:
        if ph.overlap is not None:
            engine.set_overlap(ph.overlap)
        first_step = engine.step
        tickets = [engine.submit(r) for r in ph.requests]
        if ph.plan_update is not None:
            if expert_map is None:
                raise ValueError("a plan_update needs the group to watch an expert-map file")
            doc, gen = ph.plan_update
            written = [False]

            def on_token(tok, t, doc=doc, gen=gen, written=written, n=ph.update_after_tokens):
                if not written[0] and len(t.output) >= n:
                    written[0] = True
                    write_plan_files(Path(expert_map).parent, doc, gen)

            tickets[0].listeners.insert(0, on_token)
        logits = engine.prompt_logits(ph.logits_prompt) if ph.logits_prompt is not None else None
        results = [engine._wait(t, None) for t in tickets]
        d = engine.runner.dispatcher
        out.append(PhaseResult([asdict(r) for r in results], None if logits is None else logits.cpu().numpy(),
                               (first_step, engine.step), asdict(d.stats) if d is not None else {}))
    d = engine.runner.dispatcher
    return JobResult(out, list(engine.switches), engine.runner.emap.generation, list(engine.map_errors),
                     asdict(d.stats) if d is not None else {}, time.monotonic() - t0, list(engine.recoveries))


def run_local(
    checkpoint: str | Path,
    world_size: int,
    job: Job,
    *,
    engine: Any = None,
    expert_map: str | Path | None = None,
    timeout_s: float = 600.0,
) -> JobResult:
    """Run `job` on a local EP group of `world_size` processes (1: in this process)."""
    from .engine import EngineConfig, RankConfig, start_rank

    cfg = engine or EngineConfig()
    plan = str(expert_map) if expert_map is not None else None
    if world_size == 1 and not _faulty_ranks(job):
        eng = start_rank(RankConfig(rank=0, world_size=1, checkpoint=str(checkpoint), expert_map=plan, engine=cfg)).engine
        try:
            return run_job(eng, job, plan)
        finally:
            eng.shutdown()
    grace = cfg.dist_timeout_s + 10.0
    key = os.urandom(32)  # the group's secret, as the operator's Secret would give every rank
    return spawn_ranks(world_size, _engine_rank, (str(checkpoint), cfg, plan, job, key), timeout_s=timeout_s,
                       grace_s=grace, may_die=_faulty_ranks(job))


__all__ = ["GroupFailed", "Job", "JobResult", "Phase", "PhaseResult", "free_port", "run_job", "run_local",
           "run_rank_from_env", "spawn_ranks"]
