"""The step protocol between ranks has no pickle (issue 20's first part): plans and replies are JSON
frames with a fixed schema, and every decoder refuses crafted payloads with a clear error without
running anything."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from moe_worker.engine.steps import (
    MAX_FRAME_BYTES,
    SeqWork,
    StepPlan,
    StepReply,
    WireError,
    decode_plan,
    decode_reply,
    encode_plan,
    encode_reply,
)

PLAN = StepPlan(step=7, work=[[SeqWork(3, [1, 2, 3], 0, new=True, max_len=9, temperature=0.7, seed=42)],
                              [SeqWork(4, [5], 12), SeqWork(6, [7, 8], 4, sample=False)]],
                release=[[1, 2], []], micro_batches=2, switch_to=5)
REPLY = StepReply(rank=1, tokens={4: (17, -3.25)}, staged=(5, "abc123"), generation=4, errors=["map error"],
                  failed={9: "no memory for a KV cache"})


def test_round_trips():
    assert decode_plan(encode_plan(PLAN), 2) == PLAN
    assert decode_reply(encode_reply(REPLY), 2) == REPLY
    stop = StepPlan(8, [[], []], [[], []], stop=True, resize=3)
    assert decode_plan(encode_plan(stop), 2) == stop


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/moe-wire-pwned",))


@pytest.mark.parametrize("decode", [decode_plan, decode_reply])
def test_a_pickle_is_refused_and_nothing_runs(decode, tmp_path):
    if os.path.exists("/tmp/moe-wire-pwned"):
        os.remove("/tmp/moe-wire-pwned")
    for payload in (pickle.dumps(_Boom()), pickle.dumps(PLAN), pickle.dumps({"step": 1})):
        with pytest.raises(WireError, match="not a JSON frame"):
            decode(payload, 2)
    assert not os.path.exists("/tmp/moe-wire-pwned")


def _plan_doc() -> dict:
    return json.loads(encode_plan(PLAN))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.pop("step"), "must be an object with fields"),
    (lambda d: d.update(extra=1), "must be an object with fields"),
    (lambda d: d.update(step="7"), "step: expected an integer"),
    (lambda d: d.update(step=True), "step: expected an integer"),
    (lambda d: d.update(micro_batches=3), "micro_batches: expected an integer in 1..2"),
    (lambda d: d.update(work=[[]]), "work: expected one list per rank \\(2\\)"),
    (lambda d: d["work"][0][0].pop(), "must be \\[seq, tokens, start"),
    (lambda d: d["work"][0][0].__setitem__(1, []), "non-empty tokens"),
    (lambda d: d["work"][0][0].__setitem__(1, [1, -2]), "got \\[3, \\[1, -2\\]"),
    (lambda d: d["work"][0][0].__setitem__(5, float("nan")), "temperature \\(finite"),
    (lambda d: d["work"][0][0].__setitem__(3, 1), "new \\(bool\\)"),
    (lambda d: d["work"][0][0].__setitem__(1, [1, True]), "got \\[3, \\[1, True\\]"),
    (lambda d: d["work"][0][0].__setitem__(6, "42"), "seed \\(integer or null\\)"),
    (lambda d: d["work"][0][0].__setitem__(10, 0), "sample \\(bool\\)"),
    (lambda d: d.update(release=[["x"], []]), "release\\[0\\]: expected an integer"),
    (lambda d: d.update(stop="no"), "stop: expected a boolean"),
])
def test_malformed_plans_are_refused(mutate, message):
    doc = _plan_doc()
    mutate(doc)
    with pytest.raises(WireError, match=message):
        decode_plan(json.dumps(doc).encode(), 2)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(rank=2), "rank: expected an integer in 0..1"),
    (lambda d: d.update(staged=[5]), "staged must be \\[generation, digest\\]"),
    (lambda d: d.update(tokens=[[4, 17]]), "tokens\\[0\\] must be \\[seq, token, logit sum\\]"),
    (lambda d: d.update(tokens=[[4, "17", 1.0]]), "expected an integer"),
    (lambda d: d.update(failed=[[9, 3]]), "failed\\[0\\] must be \\[seq, reason\\]"),
    (lambda d: d.update(errors=[1]), "errors must be strings"),
])
def test_malformed_replies_are_refused(mutate, message):
    doc = json.loads(encode_reply(REPLY))
    mutate(doc)
    with pytest.raises(WireError, match=message):
        decode_reply(json.dumps(doc).encode(), 2)


def test_truncated_invalid_and_oversized_frames():
    data = encode_plan(PLAN)
    for bad in (data[:-1], data[: len(data) // 2], b"", b"\xff\xfe", b"[" * 100000):
        with pytest.raises(WireError):
            decode_plan(bad, 2)
    with pytest.raises(WireError, match="exceeds"):
        decode_plan(b" " * (MAX_FRAME_BYTES + 1), 2)
