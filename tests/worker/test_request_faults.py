"""One request cannot take the group down, a client that leaves frees its sequence, and a rank's
limits are checked before it starts (issue 22, items 1, 3, 7 and the worker side of 8).

The engine is the EP group's own (`GroupEngine`, one rank in process, as `moe-worker serve` runs
rank 0), behind the real KServe v2 server, driven by tritonclient and raw HTTP.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from moe_worker.engine import EngineConfig, RankConfig, Scheduler, StepReply, model_info, start_rank
from moe_worker.engine import runner as runner_mod
from moe_worker.engine.scheduler import _Ticket
from moe_worker.engine_api import GenerationRequest, OverloadedError, SequenceError
from moe_worker.metrics import WorkerMetrics
from moe_worker.sampling import sample
from moe_worker.serve import check_env
from moe_worker.server import serve

PROMPT = [5, 6, 7, 8, 9]


class Served:
    """A one-rank GroupEngine and the server over it on an event loop thread."""

    def __init__(self, ckpt, cfg: EngineConfig, **serve_kw):
        import threading

        self.metrics = WorkerMetrics()
        self.engine = start_rank(RankConfig(0, 1, str(ckpt), engine=cfg), metrics=self.metrics).engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            serve(self.engine, self.engine.info, self.metrics, "127.0.0.1", 0, 0, **serve_kw), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.engine.shutdown()

    def infer(self, prompt: list[int], **params) -> tuple[list[int], dict]:
        client = th.InferenceServerClient(self.server.http_url.removeprefix("http://"))
        inp = th.InferInput("input_ids", [len(prompt)], "INT64")
        inp.set_data_from_numpy(np.array(prompt, dtype=np.int64))
        res = client.infer("deepseek-v3", [inp], parameters=params)
        return res.as_numpy("output_ids").tolist(), res.get_response()["parameters"]

    def outcomes(self) -> dict[str, float]:
        out = {}
        for fam in self.metrics.registry.collect():
            for s in fam.samples:
                if s.name == "moe_requests_total":
                    out[s.labels["outcome"]] = s.value
        return out


@pytest.fixture(scope="module")
def served(bf16_ckpt):
    s = Served(bf16_ckpt, EngineConfig(map_poll_s=0.0, idle_heartbeat_s=0.02))
    yield s
    s.close()


# ---- 1. a request cannot kill the group ---------------------------------------------------------

def test_sampling_takes_any_finite_temperature():
    row = torch.tensor([0.5, 3.0, -2.0, 3.0 - 1e-3, 1.0])
    gen = torch.Generator().manual_seed(0)
    for t in (1e-45, 1e-30, 5e-324, 1e-6):
        assert {sample(row, t, gen) for _ in range(20)} == {1}  # tiny: greedy
    draws = [sample(row, 1e30, gen) for _ in range(2000)]
    assert set(draws) == set(range(5)) and max(np.bincount(draws)) < 500  # huge: uniform (400 each)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(SequenceError, match="1 non-finite logits"):
            sample(torch.tensor([0.0, bad, 1.0]), 0.7, gen)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e30])
def test_extreme_temperatures_are_served_and_the_next_request_too(served, temperature):
    greedy, _ = served.infer(PROMPT, max_tokens=6)
    out, params = served.infer(PROMPT, max_tokens=6, temperature=temperature, seed=3)
    assert len(out) == 6 and params["finish_reason"] == "length"
    if temperature < 1:
        assert out == greedy  # a tiny temperature is greedy
    assert served.infer(PROMPT, max_tokens=6)[0] == greedy and served.engine.ready()


def test_a_failure_inside_a_step_fails_that_request_only(served, monkeypatch):
    """Non-finite logits of one sequence and no memory for another's cache: those two requests get
    500 naming why; the sequences batched with them finish; the group keeps serving."""
    greedy, _ = served.infer(PROMPT, max_tokens=6)
    real_sample, real_cache = runner_mod.sample, served.engine.runner.new_cache

    def nan_for_seed_7(row, temperature, generator, top_p=1.0):
        if temperature == 0.25:
            row = row.clone()
            row[3] = float("nan")
        return real_sample(row, temperature, generator, top_p)

    def no_memory_for_77(max_len):
        if max_len == len(PROMPT) + 77:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_cache(max_len)

    monkeypatch.setattr(runner_mod, "sample", nan_for_seed_7)
    monkeypatch.setattr(served.engine.runner, "new_cache", no_memory_for_77)
    eng = served.engine
    good = [eng.submit(GenerationRequest(f"good-{i}", tuple(PROMPT), max_tokens=6)) for i in range(3)]
    nan = eng.submit(GenerationRequest("nan", tuple(PROMPT), max_tokens=6, temperature=0.25, seed=7))
    oom = eng.submit(GenerationRequest("oom", tuple(PROMPT), max_tokens=77))
    for t in good:
        assert eng._wait(t, 60).output_ids == greedy
    with pytest.raises(SequenceError, match="1 non-finite logits"):
        eng._wait(nan, 60)
    with pytest.raises(SequenceError, match="no memory for a KV cache of 82 positions"):
        eng._wait(oom, 60)
    with pytest.raises(InferenceServerException, match="failed: rank 0 has no memory") as e:
        served.infer(PROMPT, max_tokens=77)
    assert e.value.status() == "500"
    assert eng.ready() and not eng.scheduler.running and not eng.runner.seqs
    assert served.infer(PROMPT, max_tokens=6)[0] == greedy


# ---- 3. a client that leaves cancels its generation ----------------------------------------------

def test_a_disconnected_http_client_frees_its_sequence(served):
    eng = served.engine
    before = served.outcomes()
    body = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [5], "data": PROMPT}],
                       "parameters": {"max_tokens": eng.info.max_new_tokens - 10}}).encode()
    host, port = served.server.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v2/models/deepseek-v3/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while not eng.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.005)
        (r,) = eng.scheduler.running.values()
    ticket, closed_at = r.ticket, eng.step  # the client is gone
    deadline = time.monotonic() + 30
    while (eng.scheduler.running or eng.runner.seqs) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not eng.scheduler.running and not eng.runner.seqs, "the sequence is still running"
    freed_after = eng.step - closed_at
    assert len(ticket.output) < eng.info.max_new_tokens - 10 and ticket.cancelled
    after = served.outcomes()
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after.get("ok", 0) == before.get("ok", 0)
    print(f"freed {freed_after} steps after the disconnect")
    assert freed_after <= 5


def test_the_queue_is_bounded_and_the_server_says_overloaded(bf16_ckpt):
    s = Served(bf16_ckpt, EngineConfig(map_poll_s=0.0, idle_heartbeat_s=0.02, max_seqs_per_rank=1, max_queue=2))
    try:
        eng = s.engine
        long = eng.submit(GenerationRequest("long", tuple(PROMPT), max_tokens=eng.info.max_new_tokens - 10))
        deadline = time.monotonic() + 30
        while not eng.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.005)
        queued = [eng.submit(GenerationRequest(f"q{i}", tuple(PROMPT), max_tokens=2)) for i in range(2)]
        with pytest.raises(OverloadedError, match="2 requests are waiting"):
            eng.submit(GenerationRequest("one too many", tuple(PROMPT), max_tokens=2))
        with pytest.raises(InferenceServerException, match="retry later") as e:
            s.infer(PROMPT, max_tokens=2)
        assert e.value.status() == "429"
        long.cancelled = True
        for t in queued:
            assert len(eng._wait(t, 60).output_ids) == 2
    finally:
        s.close()


def test_a_request_past_the_server_deadline_gets_504_and_is_freed(bf16_ckpt):
    s = Served(bf16_ckpt, EngineConfig(map_poll_s=0.0, idle_heartbeat_s=0.02), request_timeout_s=0.3)
    try:
        with pytest.raises(InferenceServerException, match="deadline of 0.3 s") as e:
            s.infer(PROMPT, max_tokens=s.engine.info.max_new_tokens - 10)
        assert e.value.status() == "504"
        deadline = time.monotonic() + 10
        while s.engine.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not s.engine.scheduler.running
        assert len(s.infer(PROMPT, max_tokens=3)[0]) == 3 and s.outcomes().get("timeout") == 1
    finally:
        s.close()


# ---- 7. limits checked at start -------------------------------------------------------------------

BAD_ENV = [
    ("MOE_MAX_SEQS_PER_RANK", "0"), ("MOE_MAX_CONTEXT", "-5"), ("MOE_THREADS", "-2"), ("MOE_MAP_POLL_S", "inf"),
    ("MOE_DIST_TIMEOUT_S", "nan"), ("MOE_MAX_NEW_TOKENS", "0"), ("MOE_MAX_PREFILL_TOKENS", "x"),
    ("MOE_OVERLAP_MIN_TOKENS", "-1"), ("MOE_RENDEZVOUS_TIMEOUT_S", "0"), ("MOE_KV_CACHE_TOKENS", "1"),
    ("MOE_MAX_QUEUE", "0"), ("WORLD_SIZE", "0"), ("RANK", "-1"), ("MASTER_PORT", "70000"),
    ("MOE_HTTP_PORT", "0"), ("MOE_GRPC_PORT", "1e3"), ("MOE_METRICS_PORT", "-80"), ("MOE_REQUEST_TIMEOUT_S", "-1"),
    ("MOE_MAX_CONTEXT", "1.5"), ("MOE_DIST_TIMEOUT_S", "-inf"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ENV)
def test_every_out_of_range_number_is_refused_naming_its_variable(name, value):
    with pytest.raises(ValueError, match=rf"env {name}='{value}': expected"):
        check_env({"MOE_CHECKPOINT": "/nowhere", name: value})


def test_good_numbers_are_taken():
    env = {"MOE_CHECKPOINT": "/c", "MOE_MAX_SEQS_PER_RANK": "3", "MOE_MAP_POLL_S": "0", "MOE_THREADS": "0",
           "MOE_KV_CACHE_TOKENS": "5000", "MOE_HTTP_PORT": "8000", "MOE_REQUEST_TIMEOUT_S": "2.5"}
    rc, sc = check_env(env)
    assert (rc.engine.max_seqs_per_rank, rc.engine.map_poll_s, rc.engine.threads, rc.engine.kv_cache_tokens) == (
        3, 0.0, None, 5000)
    assert (sc.http_port, sc.request_timeout_s) == (8000, 2.5)
    with pytest.raises(ValueError, match="max_seqs_per_rank 0: expected an integer >= 1"):
        EngineConfig(max_seqs_per_rank=0)
    with pytest.raises(ValueError, match="dist_timeout_s nan"):
        EngineConfig(dist_timeout_s=math.nan)


@pytest.mark.parametrize(("name", "value"), BAD_ENV[:5])
def test_moe_worker_serve_exits_non_zero_naming_the_variable(bf16_ckpt, name, value):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    env.update({"MOE_CHECKPOINT": str(bf16_ckpt), "RANK": "0", "WORLD_SIZE": "1", "MOE_METRICS_PORT": "1",
                name: value})
    p = subprocess.run([sys.executable, "-m", "moe_worker.cli", "serve"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and f"env {name}='{value}'" in p.stderr, p.stderr[-2000:]


# ---- 8. admission bounded by the rank's KV budget ------------------------------------------------

def test_admission_keeps_each_ranks_kv_positions_within_its_budget(bf16_ckpt):
    from moe_worker.checkpoint import Checkpoint

    args = Checkpoint(bf16_ckpt).args
    cfg = EngineConfig(max_seqs_per_rank=64, max_context=4096, kv_cache_tokens=100)
    info = model_info(args, cfg)
    assert info.max_context == 100 and info.max_new_tokens == 99  # a longer request could never be admitted
    sched = Scheduler(2, cfg, info)
    tickets = [_Ticket(GenerationRequest(f"r{i}", tuple(range(30)), max_tokens=10)) for i in range(7)]
    for t in tickets:
        sched.add(t)
    plan = sched.build(0, None)
    assert [len(w) for w in plan.work] == [2, 2] and sched.kv_used == [80, 80] and len(sched.waiting) == 3
    sched.update([StepReply(rank, {seq: (1, 0.0) for seq, r in sched.running.items() if r.rank == rank}, (0, ""), 0)
                  for rank in (0, 1)], {})  # each sampled a token
    first = next(iter(sched.running))
    sched._finish(first, "length")
    plan = sched.build(1, None)
    assert sum(len([w for w in ws if w.new]) for ws in plan.work) == 1 and max(sched.kv_used) <= 100
    assert EngineConfig().kv_cache_tokens == 0 and model_info(args, EngineConfig()).max_context == 4096


def test_a_sequence_admitted_again_gives_back_its_first_pages(served):
    """A step that broke is sent again with its new sequences: admitting one a second time must
    return the first admission's pages to the pool (else every recovery shrinks the KV cache)."""
    from moe_worker.engine.steps import SeqWork

    runner = served.engine.runner
    free = runner.pool.free_pages
    w = SeqWork(10**9, [1, 2, 3], 0, new=True, max_len=200)
    failed: dict[int, str] = {}
    assert not runner._admit(w, failed) and not runner._admit(w, failed), failed
    assert runner.pool.free_pages == free - 4  # 200 positions: 4 pages of 64, once
    runner._drop(w.seq)
    assert runner.pool.free_pages == free
