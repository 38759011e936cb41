"""Decode steps in fixed-size buckets (`engine.graphs`): what a rank on a GPU captures as CUDA
graphs, run here eagerly (cuda_graphs="on" on the CPU). The bucketing, the padding rows (the
cache's scratch row) and the per-bucket buffers must give the plain decode path's tokens while
batches shrink and grow through buckets, pages are reused and experts live on other ranks."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
from test_ep_engine import ENGINE, Reference, check_group, plan_doc, standard_phases, tiny_ep16_config

from moe_worker.checkpoint import make_checkpoint
from moe_worker.engine import EngineConfig, RankConfig, start_rank
from moe_worker.engine.graphs import bucket_sizes
from moe_worker.engine_api import GenerationRequest
from moe_worker.expertmap import write_plan_files
from moe_worker.launch import Job, run_local


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tiny_ep16_config(), tmp_path_factory.mktemp("graphs") / "fp8", dtype="fp8", seed=1)


def test_bucket_sizes():
    assert bucket_sizes(1, 9, 64) == (1, 64)
    assert bucket_sizes(3, 64, 64) == (4, 64)
    assert bucket_sizes(5, 65, 64) == (8, 128)
    assert bucket_sizes(64, 1000, 64) == (64, 1024)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    """bf16 weights (computed in fp32): no FP8 activation rounding, whose steps would turn the
    bucket's other summation order (padded keys) into another token now and then."""
    return make_checkpoint(tiny_ep16_config(), tmp_path_factory.mktemp("graphs") / "bf16", dtype="bf16", seed=2)


def _answers(ckpt, mode: str) -> tuple[list[list[int]], list]:
    cfg = EngineConfig(max_context=160, max_new_tokens=40, threads=1, max_seqs_per_rank=4, cuda_graphs=mode)
    engine = start_rank(RankConfig(0, 1, str(ckpt), engine=cfg)).engine
    try:
        # Prompts of 2..37 tokens, answers of 3..38: six requests on four sequence slots, so the
        # batch shrinks (4, 3, 2, 1) and refills with requests that take over freed pages. All are
        # queued before the first step, so both runs schedule the same steps.
        reqs = [GenerationRequest(f"r{i}", tuple(range(1 + i, 3 + 7 * i)), 3 + 7 * i) for i in range(6)]
        with engine.paused():
            done: list = []
            t = threading.Thread(target=lambda: done.extend(engine.run(reqs, timeout=600)))
            t.start()
            while engine.queue_depth() < len(reqs) and t.is_alive():
                time.sleep(0.001)
        t.join(600)
        graphs = engine.runner.graphs
        return [r.output_ids for r in done], sorted(graphs._buckets) if graphs is not None else []
    finally:
        engine.shutdown()


def test_one_rank_in_buckets_gives_the_plain_paths_tokens(bf16_ckpt):
    plain, none = _answers(bf16_ckpt, "off")
    bucketed, buckets = _answers(bf16_ckpt, "on")
    assert none == []
    assert bucketed == plain
    assert {b for b, _ in buckets} >= {1, 2, 4} and {t for _, t in buckets} >= {64, 128}, buckets


def test_four_ranks_in_buckets_give_the_references_tokens(ckpt, tmp_path):
    """Expert parallelism: the routed experts of each bucketed layer go through the exchange;
    overlap on (two micro-batches) and prompt steps take the plain path, a map switch mid-answer."""
    plan = write_plan_files(tmp_path / "plan", plan_doc(4, replicas=False, shift=0), 1)
    res = run_local(ckpt, 4, Job(standard_phases(4)), engine=replace(ENGINE, cuda_graphs="on"), expert_map=plan,
                    timeout_s=300)
    check_group(res, Reference(ckpt), 4, switch_phase=2, switch_gen=2)
