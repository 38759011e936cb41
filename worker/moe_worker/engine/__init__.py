"""The rank step loop of an EP group, and the engine that serves `engine_api.Engine` on top of it.

Modules, in the order they build on each other: `steps` (the plan and reply of a step), `auth`
(the group's secret: signed store values, membership proofs), `config` (EngineConfig, RankConfig,
env), `runner` (one rank's share of a step), `scheduler` (rank 0's requests and admission),
`membership` (control collectives, heartbeats, the process group and how it re-forms after a
loss, ranks 1..N-1), `group` (GroupEngine), `startup` (rendezvous, loading, joining a running
group, following a new rank 0).

One process per rank (one GPU each in production). Rank 0 owns the scheduler. Every step:

1. Rank 0 builds a `StepPlan`: which sequences each rank runs (data-parallel attention; with
   attention TP the same ones on every rank of a TP group), with their new tokens and positions
   (one token for running ones, then prompt chunks within `max_step_tokens` per rank), sequences
   to free, whether to split into two micro-batches, and an agreed expert-map switch.
   It is broadcast to all ranks as a small JSON frame with a fixed schema (`steps`; never pickled).
2. Every rank takes the switch first (if any), then runs its share: batched attention over its
   paged latent cache (with attention TP its heads, then a reduce-scatter and an all-gather in
   its TP group: `attention_tp`), and for each MoE layer the dispatch -> experts -> combine
   exchange. Every rank joins every exchange, with zero tokens if it has none, so collectives
   always match.
3. Each rank (with TP: each TP group's first rank) samples the next token of its sequences whose
   tokens ended this step and sends (token, logits row sum), plus the expert-map generation it
   has staged, to rank 0 (a gathered JSON frame). Rank 0 updates requests.

While idle, rank 0 sends an empty plan every `idle_heartbeat_s`, so a lost rank is noticed and
map switches happen even without traffic; an empty step runs no forward on any rank.

A lost rank (`membership`, `GroupEngine._recover`). Ranks wait for collectives in 0.5 s slices
and between them look for a broken group: a `broken/<epoch>` mark in the store, which any rank
whose step failed sets (a dead peer closes its sockets: its neighbours' collectives fail within
about a second), and which rank 0 sets when a member's heartbeat (a counter each rank's own
thread signs into the store every 0.25 s) is silent for `peer_lost_s` (2 s, MOE_PEER_LOST_S) or
comes from a new process. So a dead or hung rank is noticed in about `peer_lost_s`; the
collective timeout (`dist_timeout_s`, 10 s, MOE_DIST_TIMEOUT_S) is only the last bound. Every
survivor releases its process group and checks in; rank 0 counts as lost every member that has
not checked in and is silent, and publishes the decision. Every survivor then serves the degraded
map (`expertmap.degrade`: the lost ranks' sole expert copies read from the checkpoint by one
survivor each), re-forms the process group without the lost ranks on a fresh store prefix (if a
member dies meanwhile, forming fails and rank 0 decides again), and goes on; no process restarts,
and no KV cache is dropped but those of a TP group that lost a rank (its sequences move too). Rank 0 queues the lost ranks' sequences for recomputation on
survivors (a prefill of prompt + tokens generated so far; draws are seeded by (seed, token
index), so the answer is the one the client would have got) and sends the broken step's work
again. A replacement rank (the operator replaces the failed pod) joins like a rank added by a
resize: once it has loaded the published map, rank 0 admits it at a rejoin step and the group
is whole again.

The front (rank 0) lost: it held the requests, the scheduler and the store, so its requests fail
(their clients' connections close). The other ranks keep their processes, drop their sequences,
and wait for a new rank 0 (the operator's replacement pod, at MASTER_ADDR), which forms the group
with them. The group stops only when steps keep breaking with no rank lost.

Authentication (`auth`): with the group's secret (MOE_RANK_KEY_FILE) every store value is signed
and a forged one reads as absent, and every new process group's members prove they hold it.

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
