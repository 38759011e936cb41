"""The rank step loop of an EP group, and the engine that serves `engine_api.Engine` on top of it.

Modules, in the order they build on each other: `config` (EngineConfig, RankConfig, env),
`steps` (the plan and reply of a step), `runner` (one rank's share of a step), `scheduler` (rank
0's requests and admission), `membership` (control collectives, the process group, ranks 1..N-1),
`group` (GroupEngine), `startup` (rendezvous, loading, joining a running group).

One process per rank (one GPU each in production). Rank 0 owns the scheduler. Every step:

1. Rank 0 builds a `StepPlan`: which sequences each rank runs (data-parallel attention), with
   their new tokens and positions (whole prompts for new requests, one token for running ones),
   sequences to free, whether to split into two micro-batches, and an agreed expert-map switch.
   It is broadcast to all ranks as a small JSON frame with a fixed schema (`steps`; never pickled).
2. Every rank takes the switch first (if any), then runs its share: attention per sequence on its
   own KV caches, and for each MoE layer the dispatch -> experts -> combine exchange. Every rank
   joins every exchange, with zero tokens if it has none, so collectives always match.
3. Each rank samples the next token of its sequences and sends (token, logits row sum), plus the
   expert-map generation it has staged, to rank 0 (a gathered JSON frame). Rank 0 updates requests.

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
- World size 1: the same `GroupEngine` in one process, without torch.distributed or dispatch: the
  one single-process engine (tests, `generate --world-size 1`, serving a model that fits one GPU).

Metrics (`WorkerMetrics`): ranks count routed tokens per hosted expert (on the receiving rank),
dispatch/combine and step time, KV cache use, the expert-map generation and map errors, and
group readiness. Request-level metrics (requests, latencies, tokens in/out, queue depth,
running) are the server's: it reads `queue_depth()`, so the engine does not count them.
"""

from __future__ import annotations

from .config import DTYPES, EngineConfig, RankConfig, env_number, kv_budget, model_info, resolve_device
from .group import GroupEngine
from .runner import RankRunner, build_runner, split_micro_batches
from .scheduler import Scheduler
from .startup import Rank, run_rank, run_rank_from_env, start_rank
from .steps import SeqWork, StepPlan, StepReply

__all__ = [
    "DTYPES",
    "EngineConfig",
    "GroupEngine",
    "Rank",
    "RankConfig",
    "RankRunner",
    "Scheduler",
    "SeqWork",
    "StepPlan",
    "StepReply",
    "build_runner",
    "env_number",
    "kv_budget",
    "model_info",
    "resolve_device",
    "run_rank",
    "run_rank_from_env",
    "split_micro_batches",
    "start_rank",
]
