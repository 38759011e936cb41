"""The KServe v2 front end (`moe_worker.server`) over the engine a pod serves (`GroupEngine`, one rank in
process), driven by tritonclient itself.

The model is manifests/tiny-ep16.yaml's architecture with random weights. Tokens are compared with
a greedy reference that recomputes the whole sequence with `load_model` at every step (no KV cache),
so the server, the engine's cache and its batching are all checked against plain model calls.
Activations are fp32: batching then changes logits by ~1e-5, and every reference step's top-2 margin
is asserted to be far above that, so exact token equality is the right expectation.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import http.client
import json
import os
import struct
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
import tritonclient.http as th
import yaml
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from moe_worker.checkpoint import load_model, make_checkpoint
from moe_worker.engine import EngineConfig, GroupEngine, RankConfig, start_rank
from moe_worker.engine_api import EngineError, GenerationRequest, GenerationResult, ModelInfo, RequestError
from moe_worker.metrics import WorkerMetrics
from moe_worker.server import serve
from moe_worker.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-ep16"
MAX_CONTEXT = 64
MAX_NEW = 24
MARGIN = 1e-3  # smallest top-2 logit gap the reference may have (batching noise is ~1e-5)



def tiny_ep16_config() -> dict:
    from moe_operator import api

    dep = api.parse_deployment(yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text()))
    return dep.spec.model.architecture.hf_config()


def make_tokenizer_json(path: Path) -> None:
    """A small byte-level BPE (< 512 ids) trained in place: a checkpoint that ships tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the expert routes the token to the gpu", "hello world of experts"] * 20, trainer)
    tok.save(str(path))


class Reference:
    """Greedy generation by recomputing the full sequence with the model each step."""

    def __init__(self, ckpt: Path):
        self.model = load_model(ckpt, dtype=torch.float32)

    @functools.cache  # noqa: B019 - one Reference per module
    def greedy(self, prompt: tuple[int, ...], k: int) -> tuple[int, ...]:
        seq = list(prompt)
        for _ in range(k):
            logits = self.model(torch.tensor([seq]))[0, -1]
            top = logits.topk(2).values
            assert top[0] - top[1] > MARGIN, f"reference step at {seq} has a near tie; pick another prompt"
            seq.append(int(logits.argmax()))
        return tuple(seq[len(prompt):])


def one_rank_engine(ckpt: Path) -> GroupEngine:
    """The engine `moe-worker serve` runs, as one rank in process (fp32 on CPU)."""
    cfg = EngineConfig(model_name=MODEL, max_context=MAX_CONTEXT, max_new_tokens=MAX_NEW, idle_heartbeat_s=0.05)
    return start_rank(RankConfig(0, 1, str(ckpt), engine=cfg)).engine


class Running:
    """serve() on its own event loop thread, as a worker process runs it; tests use sync clients."""

    def __init__(self, engine, info: ModelInfo, metrics: WorkerMetrics | None = None, **kw):
        self.engine, self.info = engine, info
        self.metrics = metrics or WorkerMetrics()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(serve(engine, info, self.metrics, "127.0.0.1", 0, 0, **kw))
        self.http_url, self.grpc_url = self.server.http_url, self.server.grpc_url

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def http(self) -> th.InferenceServerClient:
        return th.InferenceServerClient(self.http_url)

    def grpc(self) -> tg.InferenceServerClient:
        return tg.InferenceServerClient(self.grpc_url)

    def metric(self, name: str, **labels: str) -> float:
        for fam in self.metrics.registry.collect():
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = make_checkpoint(tiny_ep16_config(), tmp_path_factory.mktemp("srv") / MODEL, dtype="bf16", seed=0)
    make_tokenizer_json(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def ref(ckpt) -> Reference:
    return Reference(ckpt)


@pytest.fixture(scope="module")
def srv(ckpt):
    engine = one_rank_engine(ckpt)
    running = Running(engine, engine.info, checkpoint_dir=ckpt)
    yield running
    running.close()
    engine.shutdown()


# ---------------------------------------------------------------------------------------------
# Client helpers
# ---------------------------------------------------------------------------------------------


def http_generate(client: th.InferenceServerClient, ids, *, binary: bool, dtype="INT64", outputs=("output_ids", "text"),
                  **params):
    arr = np.asarray(ids, dtype=np.int64 if dtype == "INT64" else np.int32)
    inp = th.InferInput("input_ids", list(arr.shape), dtype)
    inp.set_data_from_numpy(arr, binary_data=binary)
    outs = None if outputs is None else [th.InferRequestedOutput(n, binary_data=binary) for n in outputs]
    return client.infer(MODEL, [inp], outputs=outs, parameters=params or None)


def grpc_generate(client: tg.InferenceServerClient, ids, dtype="INT64", **params):
    arr = np.asarray(ids, dtype=np.int64 if dtype == "INT64" else np.int32)
    inp = tg.InferInput("input_ids", list(arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    return client.infer(MODEL, [inp], parameters=params or None)


def ids_of(result) -> list[int]:
    return [int(t) for t in result.as_numpy("output_ids").reshape(-1)]


def text_of(result) -> str:
    v = result.as_numpy("text").reshape(-1)[0]
    return v.decode() if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------------------------------------
# Metadata and health
# ---------------------------------------------------------------------------------------------


def test_metadata_and_health_over_http_and_grpc(srv):
    h, g = srv.http(), srv.grpc()
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready(MODEL) and h.is_model_ready(MODEL, "1")
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(MODEL)
    assert not h.is_model_ready("nope") and not h.is_model_ready(MODEL, "2")
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        g.is_model_ready("nope")
    assert h.get_server_metadata()["extensions"] == ["binary_tensor_data", "parameters", "model_configuration", "generate"]
    assert g.get_server_metadata().name == "moe-worker"
    md = h.get_model_metadata(MODEL)
    assert md["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in md["inputs"]} == {("input_ids", "INT64"), ("text", "BYTES")}
    assert {(t["name"], t["datatype"]) for t in md["outputs"]} == {("output_ids", "INT64"), ("text", "BYTES")}
    gmd = g.get_model_metadata(MODEL)
    assert [t.name for t in gmd.outputs] == ["output_ids", "text"] and list(gmd.inputs[0].shape) == [-1]


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


PROMPT = [11, 300, 7, 42, 5, 250]


@pytest.mark.parametrize(
    "how",
    ["http-json", "http-binary", "http-no-outputs-listed", "http-int32-rank1", "http-gzip", "grpc", "grpc-int32-rank1"],
)
def test_greedy_tokens_equal_the_model(srv, ref, how):
    k = 10
    want = list(ref.greedy(tuple(PROMPT), k))
    ids: list = [PROMPT]
    if how == "http-json":
        r = http_generate(srv.http(), ids, binary=False, max_tokens=k)
    elif how == "http-binary":
        r = http_generate(srv.http(), ids, binary=True, max_tokens=k)
    elif how == "http-no-outputs-listed":  # tritonclient then asks for binary_data_output
        r = http_generate(srv.http(), ids, binary=True, outputs=None, max_tokens=k)
    elif how == "http-int32-rank1":
        r = http_generate(srv.http(), PROMPT, binary=True, dtype="INT32", max_tokens=k)
    elif how == "http-gzip":
        arr = np.asarray(ids, dtype=np.int64)
        inp = th.InferInput("input_ids", list(arr.shape), "INT64").set_data_from_numpy(arr, binary_data=False)
        r = srv.http().infer(MODEL, [inp], parameters={"max_tokens": k}, request_compression_algorithm="gzip",
                             response_compression_algorithm="deflate")
    elif how == "grpc":
        r = grpc_generate(srv.grpc(), ids, max_tokens=k)
    else:
        r = grpc_generate(srv.grpc(), PROMPT, dtype="INT32", max_tokens=k)
    assert ids_of(r) == want
    rank1 = how.endswith("rank1")
    assert list(r.as_numpy("output_ids").shape) == ([k] if rank1 else [1, k])
    assert list(r.as_numpy("text").shape) == ([1] if rank1 else [1, 1])
    assert text_of(r) == srv.server.front.tokenizer.decode(want)


def test_response_parameters_and_request_id(srv, ref):
    r = http_generate(srv.http(), [PROMPT], binary=False, max_tokens=3)
    body = r.get_response()
    assert body["parameters"] == {"finish_reason": "length", "prompt_tokens": len(PROMPT), "completion_tokens": 3}
    assert body["model_name"] == MODEL and body["model_version"] == "1"
    arr = np.asarray([PROMPT], dtype=np.int64)
    inp = tg.InferInput("input_ids", [1, len(PROMPT)], "INT64").set_data_from_numpy(arr)
    g = srv.grpc().infer(MODEL, [inp], request_id="req-7", parameters={"max_tokens": 3}).get_response()
    assert g.id == "req-7" and g.parameters["completion_tokens"].int64_param == 3
    assert g.parameters["finish_reason"].string_param == "length"


def test_default_max_tokens_is_16_and_clamped_to_the_context(srv, ref):
    assert ids_of(http_generate(srv.http(), [PROMPT], binary=True)) == list(ref.greedy(tuple(PROMPT), 16))
    long = list(range(1, MAX_CONTEXT - 3))  # 60 tokens: only 4 fit
    assert len(ids_of(grpc_generate(srv.grpc(), [long]))) == 4


def test_text_input_uses_the_checkpoint_tokenizer(srv, ckpt, ref):
    tok = HFTokenizer(ckpt / "tokenizer.json", 512)
    prompt = "the expert routes"
    ids = tok.encode(prompt)
    assert 1 < len(ids) < len(prompt.encode())  # BPE merges, not bytes
    want = list(ref.greedy(tuple(ids), 6))
    for binary in (False, True):
        inp = th.InferInput("text", [1], "BYTES").set_data_from_numpy(np.array([prompt], dtype=object), binary_data=binary)
        r = srv.http().infer(MODEL, [inp], parameters={"max_tokens": 6})
        assert ids_of(r) == want and text_of(r) == tok.decode(want)
        assert r.get_response()["parameters"]["prompt_tokens"] == len(ids)
    inp = tg.InferInput("text", [1, 1], "BYTES").set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    r = srv.grpc().infer(MODEL, [inp], parameters={"max_tokens": 6})
    assert ids_of(r) == want and list(r.as_numpy("output_ids").shape) == [1, 6]


def test_sampling_is_seeded(srv):
    async def direct(seed):
        req = GenerationRequest("d", tuple(PROMPT), max_tokens=8, temperature=0.9, seed=seed)
        return (await srv.engine.generate(req)).output_ids

    a = ids_of(http_generate(srv.http(), [PROMPT], binary=True, max_tokens=8, temperature=0.9, seed=1234))
    b = ids_of(grpc_generate(srv.grpc(), [PROMPT], max_tokens=8, temperature=0.9, seed=1234))
    c = ids_of(grpc_generate(srv.grpc(), [PROMPT], max_tokens=8, temperature=0.9, seed=99))
    assert a == b == srv.call(direct(1234))
    assert a != c  # 8 draws at temperature 0.9 over 512 ids: equal by chance ~never


def test_extreme_temperatures_are_served(srv, ref):
    """1e-45 and 1e-30 are greedy, 1e30 is served, and the next request is untouched."""
    want = list(ref.greedy(tuple(PROMPT), 6))
    for t in (1e-45, 1e-30):
        assert ids_of(http_generate(srv.http(), [PROMPT], binary=True, max_tokens=6, temperature=t, seed=1)) == want
    out = ids_of(http_generate(srv.http(), [PROMPT], binary=True, max_tokens=6, temperature=1e30, seed=1))
    assert len(out) == 6
    assert ids_of(http_generate(srv.http(), [PROMPT], binary=True, max_tokens=6)) == want


# ---------------------------------------------------------------------------------------------
# Concurrency and batching
# ---------------------------------------------------------------------------------------------


def _client_call(srv, kind: str, prompt: list[int], k: int):
    if kind == "http-json":
        return ids_of(http_generate(srv.http(), [prompt], binary=False, max_tokens=k))
    if kind == "http-binary":
        return ids_of(http_generate(srv.http(), [prompt], binary=True, max_tokens=k))
    return ids_of(grpc_generate(srv.grpc(), [prompt], max_tokens=k))


def _run_threads(fns):
    results, errors = [None] * len(fns), []

    def go(i, fn):
        try:
            results[i] = fn()
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    return threads, results, errors


def test_concurrent_clients_are_batched_and_exact(srv, ref):
    """Six clients (JSON, binary, gRPC) queue while the engine is held, then run as one batch of 6."""
    kinds = ["http-json", "http-binary", "grpc"] * 2
    prompts = [[(13 * i + j * 7) % 500 + 1 for j in range(5)] for i in range(6)]
    ks = [4, 9, 6, 12, 3, 8]  # different lengths: rows leave the batch as they finish
    want = [list(ref.greedy(tuple(p), k)) for p, k in zip(prompts, ks, strict=True)]
    steps0 = srv.engine.stats["steps"]
    with srv.engine.paused():
        threads, results, errors = _run_threads(
            [functools.partial(_client_call, srv, kd, p, k) for kd, p, k in zip(kinds, prompts, ks, strict=True)])
        deadline = time.monotonic() + 20
        while srv.metric("moe_queue_depth_requests") < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.metric("moe_queue_depth_requests") == 6
        assert srv.metric("moe_running_requests") == 0
    for t in threads:
        t.join(60)
    assert not errors
    assert results == want
    assert srv.engine.stats["max_batch_seen"] >= 6
    assert srv.engine.stats["steps"] - steps0 == max(ks)  # one forward per step for all six

    # Free-running: 6 clients x 3 requests of different lengths, arriving whenever they do.
    def client(i):
        out = []
        for j in range(3):
            p = [(31 * i + 17 * j + m * 3) % 509 + 1 for m in range(3 + (i + j) % 4)]
            out.append((p, _client_call(srv, kinds[i], p, 5 + j)))
        return out

    threads, results, errors = _run_threads([functools.partial(client, i) for i in range(6)])
    for t in threads:
        t.join(120)
    assert not errors
    for per_client in results:
        for p, got in per_client:
            assert got == list(ref.greedy(tuple(p), len(got))) and len(got) in (5, 6, 7)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_request_metrics(srv):
    ok0 = srv.metric("moe_requests_total", outcome="ok")
    bad0 = srv.metric("moe_requests_total", outcome="invalid")
    out0 = srv.metric("moe_output_tokens_total")
    in0 = srv.metric("moe_input_tokens_total")
    ttft0 = srv.metric("moe_time_to_first_token_seconds_count")
    itl0 = srv.metric("moe_inter_token_seconds_count")
    http_generate(srv.http(), [PROMPT], binary=True, max_tokens=5)
    grpc_generate(srv.grpc(), [PROMPT[:3]], max_tokens=2)
    with pytest.raises(InferenceServerException):
        grpc_generate(srv.grpc(), [PROMPT], max_tokens=0)
    assert srv.metric("moe_requests_total", outcome="ok") - ok0 == 2
    assert srv.metric("moe_requests_total", outcome="invalid") - bad0 == 1
    assert srv.metric("moe_output_tokens_total") - out0 == 7
    assert srv.metric("moe_input_tokens_total") - in0 == len(PROMPT) + 3
    assert srv.metric("moe_time_to_first_token_seconds_count") - ttft0 == 2
    assert srv.metric("moe_inter_token_seconds_count") - itl0 == 4 + 1
    text = urllib.request.urlopen(f"http://{srv.http_url}/metrics", timeout=10).read().decode()
    assert 'moe_requests_total{group="0",outcome="ok",rank="0"}' in text
    assert "moe_queue_depth_requests" in text


# ---------------------------------------------------------------------------------------------
# Malformed requests: each gets a clear error, and the server keeps serving
# ---------------------------------------------------------------------------------------------


def _post(url: str, path: str, body: bytes, headers: dict | None = None, method: str = "POST"):
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data).get("error", "") if data else "")
    finally:
        conn.close()


def _ids_input(ids, shape=None, datatype="INT64"):
    return {"name": "input_ids", "datatype": datatype, "shape": shape or [1, len(ids)], "data": ids}


def _doc(*inputs, **params):
    d = {"inputs": list(inputs)}
    if params:
        d["parameters"] = params
    return json.dumps(d).encode()


def _binary(json_doc: dict, blob: bytes) -> tuple[bytes, dict]:
    head = json.dumps(json_doc).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


INFER = f"/v2/models/{MODEL}/infer"
I64 = struct.Struct("<3q").pack(1, 2, 3)
_bin_ids = {"name": "input_ids", "datatype": "INT64", "shape": [3], "parameters": {"binary_data_size": 24}}

# (case id, path, body, headers, method, HTTP status, words the message must contain)
HTTP_CASES = [
    ("unknown-model", "/v2/models/nope/infer", _doc(_ids_input([1])), None, "POST", 404, "unknown model 'nope'"),
    ("unknown-version", f"/v2/models/{MODEL}/versions/7/infer", _doc(_ids_input([1])), None, "POST", 404, "no version '7'"),
    ("malformed-json", INFER, b'{"inputs": [', None, "POST", 400, "not valid JSON"),
    ("json-not-object", INFER, b"[1, 2]", None, "POST", 400, "must be a JSON object"),
    ("no-inputs-field", INFER, b"{}", None, "POST", 400, "'inputs' must be a list"),
    ("empty-inputs", INFER, _doc(), None, "POST", 400, "no inputs"),
    ("unknown-input", INFER, _doc({**_ids_input([1]), "name": "prompt"}), None, "POST", 400, "unknown input 'prompt'"),
    ("both-inputs", INFER, _doc(_ids_input([1]), {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}),
     None, "POST", 400, "exactly one of 'input_ids' and 'text'"),
    ("wrong-dtype", INFER, _doc(_ids_input([1.0], datatype="FP32")), None, "POST", 400, "'input_ids' has datatype FP32"),
    ("batch-of-2", INFER, _doc(_ids_input([[1, 2], [3, 4]], shape=[2, 2])), None, "POST", 400, "shape [2, 2]"),
    ("rank-3", INFER, _doc(_ids_input([[[1]]], shape=[1, 1, 1])), None, "POST", 400, "expected [n] or [1, n]"),
    ("shape-data-mismatch", INFER, _doc(_ids_input([1, 2, 3], shape=[4])), None, "POST", 400, "has 3 values; shape [4]"),
    ("negative-dim", INFER, _doc(_ids_input([1], shape=[-1])), None, "POST", 400, "negative dimension"),
    ("empty-input", INFER, _doc(_ids_input([], shape=[0])), None, "POST", 400, "'input_ids' is empty"),
    ("id-past-vocab", INFER, _doc(_ids_input([1, 512])), None, "POST", 400, "'input_ids'[1] is 512, outside the vocabulary 0..511"),
    ("negative-id", INFER, _doc(_ids_input([-1])), None, "POST", 400, "outside the vocabulary"),
    ("float-ids", INFER, _doc(_ids_input([1.5])), None, "POST", 400, "must hold integers; got 1.5"),
    ("too-many-tokens", INFER, _doc(_ids_input(list(range(MAX_CONTEXT)))), None, "POST", 400,
     f"has {MAX_CONTEXT} tokens; this model's context is {MAX_CONTEXT}"),
    ("negative-max-tokens", INFER, _doc(_ids_input([1]), max_tokens=-3), None, "POST", 400, "'max_tokens' is -3; it must be >= 1"),
    ("string-max-tokens", INFER, _doc(_ids_input([1]), max_tokens="5"), None, "POST", 400, "'max_tokens' must be an integer"),
    ("max-tokens-over-limit", INFER, _doc(_ids_input([1]), max_tokens=MAX_NEW + 1), None, "POST", 400,
     f"generates at most {MAX_NEW}"),
    ("max-tokens-past-context", INFER, _doc(_ids_input(list(range(50))), max_tokens=20), None, "POST", 400,
     "exceed the model's context"),
    ("negative-temperature", INFER, _doc(_ids_input([1]), temperature=-0.5), None, "POST", 400, "'temperature' is -0.5"),
    ("unknown-parameter", INFER, _doc(_ids_input([1]), max_token=4), None, "POST", 400, "unknown parameter 'max_token'"),
    ("bad-seed", INFER, _doc(_ids_input([1]), temperature=1.0, seed=-1), None, "POST", 400, "'seed' is -1"),
    ("binary-header-not-int", INFER, _binary({"inputs": [_bin_ids]}, I64)[0], {"Inference-Header-Content-Length": "abc"},
     "POST", 400, "Inference-Header-Content-Length header must be an integer"),
    ("binary-header-past-body", INFER, b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, "POST", 400,
     "Inference-Header-Content-Length is 999 but the request body has 14 bytes"),
    ("binary-header-cuts-json", INFER, *_binary({"inputs": [_bin_ids]}, I64)[:1], {"Inference-Header-Content-Length": "10"},
     "POST", 400, "not valid JSON"),
    ("binary-extra-bytes", INFER, *_binary({"inputs": [_bin_ids]}, I64 + b"\0" * 8), "POST", 400,
     "32 bytes of binary data follow the JSON header but the inputs' binary_data_size add up to 24"),
    ("binary-size-vs-shape", INFER, *_binary({"inputs": [{**_bin_ids, "parameters": {"binary_data_size": 16}}]}, I64[:16]),
     "POST", 400, "binary data has 16 bytes; shape [3] of INT64 needs 24"),
    ("binary-without-header", INFER, json.dumps({"inputs": [_bin_ids]}).encode(), None, "POST", 400,
     "has binary_data_size but the request has no Inference-Header-Content-Length header"),
    ("binary-bytes-truncated", INFER,
     *_binary({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]},
              struct.pack("<I", 9) + b"hi"), "POST", 400, "runs past the end"),
    ("text-not-utf8", INFER,
     *_binary({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]},
              struct.pack("<I", 2) + b"\xff\xfe"), "POST", 400, "'text' is not valid UTF-8"),
    ("text-empty", INFER, _doc({"name": "text", "datatype": "BYTES", "shape": [1], "data": [""]}), None, "POST", 400,
     "'text' is an empty string"),
    ("text-wrong-dtype", INFER, _doc({"name": "text", "datatype": "INT64", "shape": [1], "data": [1]}), None, "POST", 400,
     "'text' has datatype INT64; expected BYTES"),
    ("unknown-output", INFER, json.dumps({"inputs": [_ids_input([1])], "outputs": [{"name": "logits"}]}).encode(), None,
     "POST", 400, "unknown output 'logits'"),
    ("bad-gzip", INFER, b"not gzip at all", {"Content-Encoding": "gzip"}, "POST", 400, "not valid gzip data"),
    ("unknown-encoding", INFER, _doc(_ids_input([1])), {"Content-Encoding": "br"}, "POST", 400, "Content-Encoding 'br'"),
    ("get-on-infer", INFER, b"", None, "GET", 405, "method GET is not allowed"),
    ("unknown-route", "/v2/models/tiny-ep16/explain", b"{}", None, "POST", 404, "no such endpoint"),
    ("deep-json", INFER, b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", None, "POST", 400, "JSON"),
]


def _assert_still_serving(srv, ref):
    r = http_generate(srv.http(), [PROMPT], binary=True, max_tokens=2)
    assert ids_of(r) == list(ref.greedy(tuple(PROMPT), 2))


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_malformed_http_request(srv, ref, case):
    _, path, body, headers, method, status, words = case
    got_status, message = _post(srv.http_url, path, body, headers, method)
    assert (got_status, words in message) == (status, True), message
    _assert_still_serving(srv, ref)


def _grpc_raw(srv, body: bytes):
    with grpc.insecure_channel(srv.grpc_url) as ch:
        return ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              response_deserializer=pb.ModelInferResponse.FromString)(body, timeout=30)


def _grpc_req(ids=(1, 2, 3), datatype="INT64", shape=None, model=MODEL, raw_count=1, **params) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input_ids", datatype=datatype, shape=shape if shape is not None else [1, len(ids)])
    for k, v in params.items():
        if isinstance(v, bool):
            req.parameters[k].bool_param = v
        elif isinstance(v, int):
            req.parameters[k].int64_param = v
        else:
            req.parameters[k].double_param = v
    for _ in range(raw_count):
        req.raw_input_contents.append(np.asarray(ids, dtype=np.int64).tobytes())
    return req.SerializeToString()


GRPC_CASES = [
    ("malformed-protobuf", b"\x0a\xff\xff\xff\xff\x0f", grpc.StatusCode.INVALID_ARGUMENT, "malformed ModelInferRequest"),
    ("unknown-model", _grpc_req(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    ("raw-count-mismatch", _grpc_req(raw_count=2), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries for 1 inputs"),
    ("wrong-dtype", _grpc_req(datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT, "datatype FP32"),
    ("negative-max-tokens", _grpc_req(max_tokens=-1), grpc.StatusCode.INVALID_ARGUMENT, "'max_tokens' is -1"),
    ("bool-max-tokens", _grpc_req(max_tokens=True), grpc.StatusCode.INVALID_ARGUMENT, "'max_tokens' must be an integer"),
    ("empty-input", _grpc_req(ids=(), shape=[0]), grpc.StatusCode.INVALID_ARGUMENT, "'input_ids' is empty"),
    ("short-raw", _grpc_req(shape=[1, 4]), grpc.StatusCode.INVALID_ARGUMENT, "binary data has 24 bytes; shape [1, 4]"),
    ("nan-temperature", _grpc_req(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "'temperature' is nan"),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_malformed_grpc_request(srv, ref, case):
    _, body, code, words = case
    with pytest.raises(grpc.RpcError) as err:
        _grpc_raw(srv, body)
    assert (err.value.code(), words in err.value.details()) == (code, True), err.value.details()
    r = grpc_generate(srv.grpc(), [PROMPT], max_tokens=2)
    assert ids_of(r) == list(ref.greedy(tuple(PROMPT), 2))


def test_gzip_request_body_is_accepted_raw(srv, ref):
    status, _ = _post(srv.http_url, INFER, gzip.compress(_doc(_ids_input(PROMPT), max_tokens=2)), {"Content-Encoding": "gzip"})
    assert status == 200


# ---------------------------------------------------------------------------------------------
# A second checkpoint: FP8 weights, no tokenizer.json (byte-level fallback)
# ---------------------------------------------------------------------------------------------


def test_fp8_checkpoint_and_byte_tokenizer(tmp_path):
    ckpt = make_checkpoint(tiny_ep16_config(), tmp_path / "fp8", dtype="fp8", seed=1)
    engine = one_rank_engine(ckpt)
    running = Running(engine, engine.info, checkpoint_dir=ckpt)
    try:
        assert isinstance(running.server.front.tokenizer, ByteTokenizer)
        ref = Reference(ckpt)
        assert ref.model.fp8
        r = http_generate(running.http(), [PROMPT], binary=True, max_tokens=8)
        assert ids_of(r) == list(ref.greedy(tuple(PROMPT), 8))
        inp = tg.InferInput("text", [1], "BYTES").set_data_from_numpy(np.array(["héllo".encode()], dtype=object))
        g = running.grpc().infer(MODEL, [inp], parameters={"max_tokens": 5})
        prompt = tuple("héllo".encode())  # 6 byte ids
        assert ids_of(g) == list(ref.greedy(prompt, 5))
        assert g.get_response().parameters["prompt_tokens"].int64_param == 6
        assert text_of(g) == ByteTokenizer(512).decode(ids_of(g))
    finally:
        running.close()
        engine.shutdown()


def test_byte_tokenizer_round_trip_and_fallbacks(tmp_path):
    tok = ByteTokenizer(512)
    ids = tok.encode("héllo ✓")
    assert ids == list("héllo ✓".encode()) and tok.decode(ids) == "héllo ✓"
    assert tok.decode([104, 300, 105, 0xC3]) == "h\ufffdi\ufffd"  # id >= 256 and a cut UTF-8 sequence
    assert isinstance(load_tokenizer(tmp_path, 512), ByteTokenizer)
    assert load_tokenizer(tmp_path, 200) is None  # too small for bytes: ids only
    make_tokenizer_json(tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path, 512), HFTokenizer)
    with pytest.raises(ValueError, match=r"tokenizer has \d+ ids, the model's vocabulary only 256"):
        load_tokenizer(tmp_path, 256)


# ---------------------------------------------------------------------------------------------
# Readiness, engine failures, shutdown (a stub engine: no model needed)
# ---------------------------------------------------------------------------------------------


class StubEngine:
    """Answers from a script: `mode` 'ok' echoes the prompt, else raises the named error."""

    def __init__(self):
        self.info = ModelInfo(name=MODEL, vocab_size=512, max_context=32, max_new_tokens=8)
        self.is_ready = True
        self.mode = "ok"
        self.waiting = 0

    def ready(self) -> bool:
        return self.is_ready

    def queue_depth(self) -> int:
        return self.waiting

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        if self.mode == "engine-error":
            raise EngineError("rank 5 left the group")
        if self.mode == "request-error":
            raise RequestError("prompt too long for the KV cache")
        if self.mode == "bug":
            raise ZeroDivisionError("oops")
        if self.mode == "slow":
            await asyncio.sleep(0.3)
        out = list(req.prompt_ids[: req.max_tokens])
        return GenerationResult(req.request_id, out, "length", len(req.prompt_ids), 0.01, 0.02)

    async def stream(self, req):  # pragma: no cover - the server does not stream
        yield 0


def test_readiness_and_engine_errors_map_to_status_codes():
    eng = StubEngine()
    running = Running(eng, eng.info)
    try:
        h, g = running.http(), running.grpc()
        assert ids_of(http_generate(h, [[5, 6, 7]], binary=False, max_tokens=2)) == [5, 6]

        eng.is_ready = False
        assert h.is_server_live() and not h.is_server_ready() and not h.is_model_ready(MODEL)
        assert not g.is_server_ready() and not g.is_model_ready(MODEL)
        status, msg = _post(running.http_url, INFER, _doc(_ids_input([1])))
        assert status == 503 and "not ready" in msg
        with pytest.raises(InferenceServerException, match="not ready") as e:
            grpc_generate(g, [[1]])
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        eng.is_ready = True

        for mode, status, words in [("engine-error", 503, "rank 5 left the group"),
                                    ("request-error", 400, "prompt too long"),
                                    ("bug", 500, "internal error: ZeroDivisionError")]:
            eng.mode = mode
            got, msg = _post(running.http_url, INFER, _doc(_ids_input([1])))
            assert (got, words in msg) == (status, True), msg
        eng.mode = "engine-error"
        with pytest.raises(InferenceServerException) as e:
            grpc_generate(g, [[1]])
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        assert running.metric("moe_requests_total", outcome="unavailable") == 4  # 2 not ready, 2 EngineError
        assert running.metric("moe_requests_total", outcome="error") == 1

        eng.mode = "ok"
        eng.waiting = 3
        assert running.metric("moe_queue_depth_requests") == 3
        assert ids_of(grpc_generate(g, [[9, 8]], max_tokens=1)) == [9]
    finally:
        running.close()


def test_stop_finishes_requests_in_flight_then_closes_ports():
    eng = StubEngine()
    eng.mode = "slow"
    running = Running(eng, eng.info)
    threads, results, errors = _run_threads([lambda: _post(running.http_url, INFER, _doc(_ids_input([4, 5])))])
    time.sleep(0.1)  # the request is inside the engine
    running.call(running.server.stop(grace=5.0))
    threads[0].join(10)
    assert not errors and results[0][0] == 200
    running.call(running.server.stop())  # twice is fine
    with pytest.raises(OSError):
        _post(running.http_url, "/v2/health/live", b"", method="GET")
    with pytest.raises(InferenceServerException):
        tg.InferenceServerClient(running.grpc_url).is_server_live(client_timeout=2)
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(10)


def test_engine_stream_yields_the_generated_tokens(srv, ref):
    async def collect():
        req = GenerationRequest("s", tuple(PROMPT), max_tokens=7)
        return [t async for t in srv.engine.stream(req)], (await srv.engine.generate(req)).output_ids

    streamed, generated = srv.call(collect())
    assert streamed == generated == list(ref.greedy(tuple(PROMPT), 7))


def test_engine_close_fails_queued_requests_with_503(ckpt):
    engine = one_rank_engine(ckpt)
    running = Running(engine, engine.info)
    try:
        engine.pause()
        threads, results, errors = _run_threads(
            [lambda: _post(running.http_url, INFER, _doc(_ids_input(PROMPT), max_tokens=3))] * 2)
        deadline = time.monotonic() + 20
        while engine.queue_depth() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        engine.shutdown()
        for t in threads:
            t.join(20)
        assert not errors
        assert [r[0] for r in results] == [503, 503]
        assert all("engine shut down" in r[1] for r in results)
        assert not running.http().is_server_ready()
        status, msg = _post(running.http_url, INFER, _doc(_ids_input(PROMPT)))
        assert status == 503 and "not ready" in msg
    finally:
        running.close()


# ---------------------------------------------------------------------------------------------
# API key (issue 20)
# ---------------------------------------------------------------------------------------------


KEY = "s3cret-key_0123"
BEARER = {"Authorization": f"Bearer {KEY}"}


def _get(url: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


@pytest.fixture
def keyed(tmp_path):
    from moe_worker.api_key import ApiKey

    path = tmp_path / "key"
    path.write_text(KEY + "\n")  # as `kubectl create secret --from-file` keeps a newline
    eng = StubEngine()
    running = Running(eng, eng.info, api_key=ApiKey(str(path), recheck_s=0))
    running.key_path = path
    yield running
    running.close()


def test_http_requests_without_the_key_get_401_and_health_and_metrics_stay_open(keyed):
    url = keyed.http_url
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready",
                 f"/v2/models/{MODEL}/versions/1/ready", "/metrics"):
        assert _get(url, path)[0] == 200, path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
        for path in ("/v2", f"/v2/models/{MODEL}", "/v2/no/such/route"):
            status, hdrs, body = _get(url, path, headers)
            assert status == 401 and hdrs["WWW-Authenticate"].startswith("Bearer"), (path, headers, status)
            assert "API key" in json.loads(body)["error"]
        status, msg = _post(url, INFER, _doc(_ids_input([1, 2])), headers=headers)
        assert status == 401 and "Authorization: Bearer" in msg
    assert _get(url, "/v2", BEARER)[0] == 200
    assert _get(url, "/v2", {"Authorization": f"bearer {KEY}"})[0] == 200  # the scheme is case-insensitive
    assert _get(url, "/v2/no/such/route", BEARER)[0] == 404
    assert _post(url, INFER, _doc(_ids_input([1, 2])), headers=BEARER)[0] == 200
    assert keyed.metric("moe_requests_total", outcome="ok") == 1  # refused requests never reached the engine
    assert keyed.metric("moe_requests_total", outcome="invalid") == 0


def test_tritonclient_passes_the_key_over_http_and_grpc(keyed):
    h, g = keyed.http(), keyed.grpc()
    assert h.is_server_ready() and h.is_model_ready(MODEL) and g.is_server_live() and g.is_model_ready(MODEL)
    with pytest.raises(InferenceServerException) as e:
        http_generate(h, [[5, 6, 7]], binary=True, max_tokens=2)
    assert "API key" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        grpc_generate(g, [[5, 6, 7]], max_tokens=2)
    assert e.value.status() == "StatusCode.UNAUTHENTICATED" and "API key" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        g.get_model_metadata(MODEL, headers={"authorization": "Bearer wrong"})
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"

    arr = np.asarray([[5, 6, 7]], dtype=np.int64)
    hi = th.InferInput("input_ids", list(arr.shape), "INT64")
    hi.set_data_from_numpy(arr, binary_data=True)
    assert ids_of(h.infer(MODEL, [hi], parameters={"max_tokens": 2}, headers=BEARER)) == [5, 6]
    gi = tg.InferInput("input_ids", list(arr.shape), "INT64")
    gi.set_data_from_numpy(arr)
    grpc_headers = {"authorization": f"Bearer {KEY}"}  # gRPC metadata keys are lower case
    assert ids_of(g.infer(MODEL, [gi], parameters={"max_tokens": 2}, headers=grpc_headers)) == [5, 6]
    assert g.get_model_metadata(MODEL, headers=grpc_headers).name == MODEL
    assert h.get_model_metadata(MODEL, headers=BEARER)["name"] == MODEL


def test_a_rotated_key_file_takes_effect_without_a_restart(keyed):
    url = keyed.http_url
    new = keyed.key_path.parent / "new"
    new.write_text("rotated-key")
    os.replace(new, keyed.key_path)  # atomic, as the kubelet swaps a Secret's files
    assert _get(url, "/v2", {"Authorization": "Bearer rotated-key"})[0] == 200
    assert _get(url, "/v2", BEARER)[0] == 401
    keyed.key_path.write_text("")  # a file gone bad keeps the key read before
    assert _get(url, "/v2", {"Authorization": "Bearer rotated-key"})[0] == 200


@pytest.mark.parametrize("content,words", [(None, "cannot read"), ("", "empty"), ("  \n", "empty"),
                                           ("two words", "visible ASCII"), ("x" * 5000, "longer than")])
def test_a_bad_api_key_file_stops_the_rank_naming_the_variable(tmp_path, content, words):
    from moe_worker.serve import check_env

    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="MOE_API_KEY_FILE") as e:
        check_env({"MOE_CHECKPOINT": "/c", "MOE_API_KEY_FILE": str(path)})
    assert words in str(e.value)


def test_no_api_key_file_means_no_key(tmp_path):
    from moe_worker.serve import check_env

    assert check_env({"MOE_CHECKPOINT": "/c"})[1].api_key is None
    path = tmp_path / "key"
    path.write_text(f"{KEY}\n")
    key = check_env({"MOE_CHECKPOINT": "/c", "MOE_API_KEY_FILE": str(path)})[1].api_key
    assert key.accepts(f"Bearer {KEY}") and not key.accepts(None) and not key.accepts(f"Bearer {KEY[:-1]}")
