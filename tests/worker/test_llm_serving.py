"""LLM-native serving (issue 18): streaming, the OIP generate extension, the OpenAI-compatible API,
Triton model configuration, stop strings, cancellation, over the engine a pod serves.

Every protocol must give the same answer: KServe v2 `infer` == `moe-worker generate` == gRPC
ModelStreamInfer's tokens joined == `/generate` == `/generate_stream` joined == the `openai` client's
completions and chat, streamed or not. Two random checkpoints: one without tokenizer.json (the
byte-level fallback: its output is mostly bytes that are not valid UTF-8) and one with a
tokenizer.json and a chat template in tokenizer_config.json.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from hypothesis import given, settings
from hypothesis import strategies as st
from test_server import (  # noqa: F401 - _few_threads: the module's autouse fixture
    MODEL,
    Running,
    _few_threads,
    make_tokenizer_json,
    one_rank_engine,
    tiny_ep16_config,
)
from tritonclient.grpc import service_pb2 as pb

from moe_worker.api_key import ApiKey
from moe_worker.checkpoint import make_checkpoint
from moe_worker.engine import EngineConfig, RankConfig, start_rank
from moe_worker.textstream import TextStream
from moe_worker.tokenizer import ByteTokenizer, HFTokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPT = "the expert routes"
NEW = 16


def checkpoint(root: Path, kind: str) -> Path:
    path = make_checkpoint(tiny_ep16_config(), root / kind, dtype="bf16", seed=1)
    if kind == "hf":
        make_tokenizer_json(path / "tokenizer.json")
        (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "chat_template": TEMPLATE}))
    return path


@pytest.fixture(scope="module", params=["bytes", "hf"])
def served(request, tmp_path_factory):
    ckpt = checkpoint(tmp_path_factory.mktemp("llm"), request.param)
    engine = one_rank_engine(ckpt)
    running = Running(engine, engine.info, checkpoint_dir=ckpt)
    running.kind, running.ckpt = request.param, ckpt
    yield running
    running.close()
    engine.shutdown()


def url(srv: Running) -> str:
    return f"http://{srv.http_url}"


def post(srv: Running, path: str, doc: dict, headers: dict | None = None) -> tuple[int, dict, str]:
    req = urllib.request.Request(url(srv) + path, data=json.dumps(doc).encode(), headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def sse_events(body: str) -> list[dict]:
    out = []
    for block in body.split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            out.append(json.loads(block[len("data: "):]))
    return out


def infer_text(srv: Running, text: str, max_tokens: int = NEW) -> tuple[list[int], str]:
    h = th.InferenceServerClient(srv.http_url)
    inp = th.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([text.encode()], dtype=object))
    r = h.infer(MODEL, [inp], parameters={"max_tokens": max_tokens})
    return r.as_numpy("output_ids").tolist(), r.as_numpy("text")[0].decode()


def grpc_stream(srv: Running, prompt_ids: list[int], max_tokens: int = NEW) -> list[tuple[list[int], str, bool]]:
    c = tg.InferenceServerClient(srv.grpc_url)
    q: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    inp = tg.InferInput("input_ids", [len(prompt_ids)], "INT64")
    inp.set_data_from_numpy(np.array(prompt_ids, dtype=np.int64))
    c.async_stream_infer(MODEL, [inp], request_id="s1", parameters={"max_tokens": max_tokens},
                         enable_empty_final_response=True)
    c.stop_stream()  # half-closes, then waits for the server to finish the request
    got = []
    while not q.empty():
        result, error = q.get()
        assert error is None, error
        resp = result.get_response()
        assert resp.id == "s1"
        got.append((result.as_numpy("output_ids").tolist(), result.as_numpy("text")[0].decode(),
                    resp.parameters["triton_final_response"].bool_param))
    c.close()
    return got


def test_every_protocol_gives_the_same_answer(served):
    srv = served
    tok = srv.server.front.tokenizer
    prompt_ids = tok.encode(PROMPT)
    ids, text = infer_text(srv, PROMPT)
    assert len(ids) == NEW and text == tok.decode(ids)
    # moe-worker generate (one process, its own engine) on the same prompt ids.
    out = subprocess.run([sys.executable, "-m", "moe_worker.cli", "generate", "--checkpoint", str(srv.ckpt),
                          "--world-size", "1", "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-new-tokens",
                          str(NEW), "--json", "--dtype", "fp32"], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout)["output_ids"] == ids
    # gRPC ModelStreamInfer: one response per token, the last one final.
    streamed = grpc_stream(srv, prompt_ids)
    assert [t for r in streamed for t in r[0]] == ids
    assert "".join(r[1] for r in streamed) == text
    assert [r[2] for r in streamed] == [False] * (len(streamed) - 1) + [True]
    # OIP generate and generate_stream (greedy: temperature 0; the extension's default is 1).
    params = {"max_tokens": NEW, "temperature": 0}
    code, _, body = post(srv, f"/v2/models/{MODEL}/generate", {"text_input": PROMPT, "parameters": params})
    assert code == 200, body
    gen = json.loads(body)
    assert gen["text_output"] == text and gen["details"]["finish_reason"] == "length"
    code, headers, body = post(srv, f"/v2/models/{MODEL}/versions/1/generate_stream",
                               {"text_input": PROMPT, "parameters": params})
    assert code == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(body)
    assert "".join(e["text_output"] for e in events) == text
    assert [e.get("done", False) for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["details"]["finish_reason"] == "length"
    # The openai client, completions: text prompt and token-id prompt, streamed and not.
    client = openai.OpenAI(base_url=url(srv) + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    for prompt in (PROMPT, prompt_ids):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW, temperature=0)
        assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), NEW)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == "length"
    # Chat: rendered with the checkpoint's template; without one, a clear 400.
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello experts"}]
    if srv.kind == "bytes":
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        return
    rendered = "<bos><system>be brief\n<user>hello experts\n<assistant>"
    chat_ids = tok.encode(rendered, special=False)
    want, _ = infer_ids(srv, chat_ids, NEW)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW, temperature=0)
    assert r.choices[0].message.content == tok.decode(want) and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tok.decode(want)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW


def infer_ids(srv: Running, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    h = th.InferenceServerClient(srv.http_url)
    inp = th.InferInput("input_ids", [len(prompt_ids)], "INT64")
    inp.set_data_from_numpy(np.array(prompt_ids, dtype=np.int64))
    r = h.infer(MODEL, [inp], parameters={"max_tokens": max_tokens})
    return r.as_numpy("output_ids").tolist(), r.as_numpy("text")[0].decode()


def test_a_stop_string_ends_the_answer_and_is_not_sent(served):
    srv = served
    _, text = infer_text(srv, PROMPT)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    want = text[:text.find(stop)]
    params = {"max_tokens": NEW, "temperature": 0, "stop": [stop]}
    code, _, body = post(srv, f"/v2/models/{MODEL}/generate", {"text_input": PROMPT, "parameters": params})
    assert code == 200, body
    assert json.loads(body)["text_output"] == want
    assert json.loads(body)["details"]["finish_reason"] == "stop_sequence"
    events = sse_events(post(srv, f"/v2/models/{MODEL}/generate_stream", {"text_input": PROMPT, "parameters": params})[2])
    assert "".join(e["text_output"] for e in events) == want
    client = openai.OpenAI(base_url=url(srv) + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0, stop=stop)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    eng = srv.engine
    deadline = time.monotonic() + 10
    while eng.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not eng.scheduler.running  # the stopped sequences were freed


def test_bad_requests_get_clear_errors(served):
    srv = served
    code, _, body = post(srv, f"/v2/models/{MODEL}/generate", {"parameters": {}})
    assert code == 422 and "'text_input'" in json.loads(body)["error"]
    code, _, body = post(srv, f"/v2/models/{MODEL}/generate", {"text_input": "x", "parameters": {"top_p": 2}})
    assert code == 422 and "'top_p'" in json.loads(body)["error"]
    code, _, body = post(srv, "/v2/models/nope/generate_stream", {"text_input": "x"})
    assert code == 404 and "unknown model 'nope'" in json.loads(body)["error"]
    client = openai.OpenAI(base_url=url(srv) + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        client.completions.create(model=MODEL, prompt="x", n=2)
    code, _, body = post(srv, "/v1/completions", {"prompt": [10**9]})
    assert code == 400 and "outside the vocabulary" in json.loads(body)["error"]["message"]
    with urllib.request.urlopen(url(srv) + f"/v2/models/{MODEL}/config", timeout=10) as r:
        config = json.loads(r.read())
    assert config["max_batch_size"] == 0 and config["model_transaction_policy"] == {"decoupled": False}
    assert {i["name"] for i in config["input"]} == {i["name"] for i in
                                                  th.InferenceServerClient(srv.http_url).get_model_metadata(MODEL)["inputs"]}
    g = tg.InferenceServerClient(srv.grpc_url).get_model_config(MODEL, as_json=True)["config"]
    assert g["name"] == MODEL and g["input"][0]["data_type"] == "TYPE_INT64"


def test_a_cancelled_stream_frees_its_kv_cache_within_a_step(served):
    srv = served
    eng = srv.engine
    # Steps of at least 20 ms here: the tiny model decodes its whole answer (24 tokens) in less time
    # than a cancel takes to cross gRPC, and the test needs the cancel to arrive mid-answer.
    eng.runner.before_step = lambda plan, rank: time.sleep(0.02)
    try:
        _cancel_a_stream_and_a_sse_client(srv, eng)
    finally:
        eng.runner.before_step = None


def _cancel_a_stream_and_a_sse_client(srv, eng) -> None:
    c = tg.InferenceServerClient(srv.grpc_url)
    q: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    inp = tg.InferInput("input_ids", [3], "INT64")
    inp.set_data_from_numpy(np.array([1, 2, 3], dtype=np.int64))
    c.async_stream_infer(MODEL, [inp], request_id="c1", parameters={"max_tokens": eng.info.max_new_tokens})
    for _ in range(2):
        result, error = q.get(timeout=30)
        assert error is None
    (running,) = eng.scheduler.running.values()
    assert sum(eng.scheduler.kv_used) > 0
    c.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 30
    while not running.ticket.cancelled and running in eng.scheduler.running.values() and time.monotonic() < deadline:
        time.sleep(0.0005)  # the cancel crosses gRPC: tens of steps of a tiny model may pass meanwhile
    cancelled_at = eng.step
    while (eng.scheduler.running or sum(eng.scheduler.kv_used) or eng.runner.seqs) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert not eng.scheduler.running and sum(eng.scheduler.kv_used) == 0 and not eng.runner.seqs
    freed_after = eng.step - cancelled_at
    print(f"freed {freed_after} steps after the cancel; {len(running.ticket.output)} tokens generated")
    # The step in flight when the cancel reached the engine finishes; the next one frees the
    # sequence (the scheduler drops it when it plans that step, the rank before running it).
    assert freed_after <= 2
    assert len(running.ticket.output) < eng.info.max_new_tokens
    c.close()
    # An SSE client that goes away after two events frees its sequence too; the server serves on.
    body = json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": eng.info.max_new_tokens,
                       "stream": True}).encode()
    host, port = srv.http_url.split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        while seen.count(b"data: ") < 2:
            seen += s.recv(65536)
    deadline = time.monotonic() + 30
    while eng.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.002)
    assert not eng.scheduler.running and sum(eng.scheduler.kv_used) == 0
    assert infer_ids(srv, [1, 2, 3], 4)[0]


def test_overload_is_429_with_retry_after(tmp_path):
    from moe_worker.engine_api import GenerationRequest

    ckpt = checkpoint(tmp_path, "hf")
    cfg = EngineConfig(model_name=MODEL, max_context=512, max_new_tokens=500, idle_heartbeat_s=0.02,
                       max_seqs_per_rank=1, max_queue=1)
    engine = start_rank(RankConfig(0, 1, str(ckpt), engine=cfg)).engine
    srv = Running(engine, engine.info, checkpoint_dir=ckpt)
    try:
        # One long sequence runs (one per rank), one waits: the queue (1) is full.
        blockers = [engine.submit(GenerationRequest("long0", (1, 2, 3), max_tokens=500))]
        deadline = time.monotonic() + 30
        while not engine.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.002)
        blockers.append(engine.submit(GenerationRequest("long1", (1, 2, 3), max_tokens=500)))
        code, headers, body = post(srv, f"/v2/models/{MODEL}/generate", {"text_input": "x"})
        assert code == 429 and headers["Retry-After"].isdigit(), body
        code, headers, body = post(srv, f"/v2/models/{MODEL}/infer", {"inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [1], "data": [1]}]})
        assert code == 429 and headers["Retry-After"].isdigit(), body
        client = openai.OpenAI(base_url=url(srv) + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        with grpc.insecure_channel(srv.grpc_url) as ch:  # RESOURCE_EXHAUSTED with a retry-after trailer
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
            req = pb.ModelInferRequest(model_name=MODEL)
            req.inputs.add(name="input_ids", datatype="INT64", shape=[1])
            req.raw_input_contents.append(np.array([1], dtype="<i8").tobytes())
            with pytest.raises(grpc.RpcError) as e:
                infer(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after", "1") in tuple(e.value.trailing_metadata())
        for t in blockers:
            t.cancelled = True
    finally:
        srv.close()
        engine.shutdown()


def test_the_openai_client_with_an_api_key(tmp_path):
    ckpt = checkpoint(tmp_path, "hf")
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key-of-enough-length")
    engine = one_rank_engine(ckpt)
    srv = Running(engine, engine.info, checkpoint_dir=ckpt, api_key=ApiKey(str(key_file)))
    try:
        good = openai.OpenAI(base_url=url(srv) + "/v1", api_key="s3cret-key-of-enough-length", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0).usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=url(srv) + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    finally:
        srv.close()
        engine.shutdown()


# ---- TextStream: pieces join to exactly the text ------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> HFTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    make_tokenizer_json(path)
    return HFTokenizer(path, 512)


def run_stream(tok, ids: list[int], stop: list[str]) -> tuple[list[str], bool]:
    ts = TextStream(tok, stop)
    pieces = []
    for i in ids:
        p = ts.add(i)
        pieces.append(p.text)
        if p.stopped:
            return pieces, True
    last = ts.finish()
    pieces.append(last.text)
    return pieces, last.stopped


def test_a_multibyte_character_goes_out_whole():
    tok = ByteTokenizer(512)
    ids = list("né€😀".encode())
    pieces, _ = run_stream(tok, ids, [])
    assert [p for p in pieces if p] == ["n", "é", "€", "😀"]
    assert "".join(pieces) == "né€😀"
    pieces, _ = run_stream(tok, [0xE2, 0x82, ord("x")], [])  # a character that never completes
    assert "".join(pieces) == tok.decode([0xE2, 0x82, ord("x")])


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.one_of(st.integers(0, 255), st.sampled_from(list("é€😀 ab".encode()))), max_size=40),
       stop=st.one_of(st.none(), st.text(alphabet="ab é\ufffd", min_size=1, max_size=3)))
def test_byte_pieces_join_to_the_decoded_text(ids, stop):
    check_join(ByteTokenizer(512), ids, stop)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 320), max_size=40),
       stop=st.one_of(st.none(), st.text(alphabet="the xpr", min_size=1, max_size=3)))
def test_tokenizer_json_pieces_join_to_the_decoded_text(hf_tokenizer, ids, stop):
    check_join(hf_tokenizer, ids, stop)


def check_join(tok, ids: list[int], stop: str | None) -> None:
    pieces, stopped = run_stream(tok, ids, [stop] if stop else [])
    whole, joined = tok.decode(ids), "".join(pieces)
    if stop and stop in whole:
        assert stopped and joined == whole[:whole.find(stop)], (pieces, whole)
    else:
        assert not stopped and joined == whole, (pieces, whole)
