"""Continuous batching with chunked prefill: each step holds at most `max_step_tokens` tokens per
rank, decode tokens first, then chunks of the prompts being prefilled; a chunk that does not end
its prompt draws no token. The answers equal the single-process reference's."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_ep_engine import ENGINE, Reference, plan_doc, standard_phases, tiny_ep16_config

from moe_worker.checkpoint import make_checkpoint
from moe_worker.engine import EngineConfig, StepReply
from moe_worker.engine.scheduler import Scheduler, _Ticket
from moe_worker.engine_api import GenerationRequest, ModelInfo
from moe_worker.expertmap import write_plan_files
from moe_worker.launch import Job, run_local

INFO = ModelInfo(name="m", vocab_size=512, max_context=64, max_new_tokens=8, eos_token_id=None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tiny_ep16_config(), tmp_path_factory.mktemp("chunked") / "fp8", dtype="fp8", seed=1)


def _reply(plan, token: int = 7) -> list[StepReply]:
    """Every rank's reply: a token for each sequence whose work draws one."""
    return [StepReply(r, {w.seq: (token, 0.0) for w in ws if w.sample}, (0, ""), 0) for r, ws in enumerate(plan.work)]


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode():
    sched = Scheduler(1, EngineConfig(max_step_tokens=4), INFO)
    sched.add(_Ticket(GenerationRequest("a", (1, 2), max_tokens=8)))
    plan = sched.build(0, None)
    (a,), = plan.work
    assert a.new and a.tokens == [1, 2] and a.sample
    sched.update(_reply(plan), {})
    long_prompt = tuple(range(100, 110))
    sched.add(_Ticket(GenerationRequest("b", long_prompt, max_tokens=3)))
    seen = []
    for step in range(1, 5):
        plan = sched.build(step, None)
        ws = plan.work[0]
        assert sum(len(w.tokens) for w in ws) <= 4
        dec, chunk = ws  # a decodes every step; b gets the rest of the step
        assert dec.seq == a.seq and len(dec.tokens) == 1 and dec.start == 2 + step - 1
        seen.append((chunk.tokens, chunk.start, chunk.new, chunk.sample))
        sched.update(_reply(plan), {})
    assert seen == [(list(long_prompt[0:3]), 0, True, False), (list(long_prompt[3:6]), 3, False, False),
                    (list(long_prompt[6:9]), 6, False, False), (list(long_prompt[9:]), 9, False, True)]
    b = next(r for r in sched.running.values() if r.ticket.req.request_id == "b")
    assert b.ticket.output == [7] and b.pos == 10 and b.prefill is None
    plan = sched.build(5, None)
    assert [(w.tokens, w.start) for w in plan.work[0] if w.seq != a.seq] == [([7], 10)]  # b decodes now


def test_a_chunk_of_a_step_that_broke_is_sent_again():
    sched = Scheduler(1, EngineConfig(max_step_tokens=4), INFO)
    sched.add(_Ticket(GenerationRequest("b", tuple(range(10)), max_tokens=3)))
    first = sched.build(0, None)
    sched.step_broke(first)  # no update: the step did not complete
    again = sched.build(1, None)
    assert again.work == first.work and again.work[0][0].new
    sched.update(_reply(again), {})
    assert sched.build(2, None).work[0][0].start == 4


def test_chunked_prefill_gives_the_references_tokens(ckpt, tmp_path):
    # Prompts of 1-9 tokens in steps of 4 tokens per rank: most are prefilled over 2-3 steps, in
    # the same steps as other sequences decode. (The prompt-logits request stays whole.)
    ref = Reference(ckpt)
    for world in (1, 4):
        plan = write_plan_files(tmp_path / f"plan{world}", plan_doc(world, replicas=False, shift=0), 1)
        res = run_local(ckpt, world, Job(standard_phases(world)[:2]), engine=replace(ENGINE, max_step_tokens=4),
                        expert_map=plan, timeout_s=300)
        for ph in res.phases:
            ref.check(ph, f"{world} ranks, 4 tokens per step")
