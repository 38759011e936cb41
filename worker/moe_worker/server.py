"""KServe v2 / Open Inference Protocol front end over an `Engine`: HTTP (aiohttp) and gRPC (grpc.aio).

    server = await serve(engine, info, metrics, "0.0.0.0", 8000, 8001, checkpoint_dir=ckpt)
    ...
    await server.stop()            # or run(...) which blocks until SIGINT / SIGTERM

HTTP: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}][/ready],
POST /v2/models/{m}[/versions/{v}]/infer (JSON tensors and the binary tensor data extension:
`Inference-Header-Content-Length`; gzip/deflate bodies both ways), GET /metrics (Prometheus text
of `metrics.registry`). gRPC: `inference.GRPCInferenceService` ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer, served from tritonclient's bundled `service_pb2`
messages; the other methods answer UNIMPLEMENTED.

The model, one inference request = one sequence:
- inputs, exactly one of: `input_ids` INT64 or INT32, shape [n] or [1, n]; `text` BYTES, shape [1]
  or [1, 1], one UTF-8 string, tokenized by the checkpoint's tokenizer.json or the byte-level
  fallback (`tokenizer.py`).
- parameters (request level): `max_tokens` int 1..info.max_new_tokens (default 16, clamped to the
  context), `temperature` number >= 0 (default 0: greedy), `seed` int >= 0 (sampling only).
  Triton's reserved parameters (sequence_*, priority, timeout, binary_data_output, triton_*) are
  accepted and ignored; any other name is an error, so a typo is not silently ignored.
- outputs: `output_ids` INT64 and `text` BYTES (the decoded output), shaped like the input: [m] and
  [1] for a rank-1 input, [1, m] and [1, 1] for rank 2. Response parameters: finish_reason
  ("length" | "stop"), prompt_tokens, completion_tokens. The model's EOS (info.eos_token_id), if
  any, stops generation.

API key (`api_key`, optional): every endpoint but health (/v2/health/live, /v2/health/ready, model
ready; gRPC ServerLive, ServerReady, ModelReady) and /metrics then needs `Authorization: Bearer
<key>` (gRPC: `authorization` metadata); without it HTTP answers 401 with `WWW-Authenticate: Bearer`
and gRPC UNAUTHENTICATED, before the request is read.

Errors: a bad request gets HTTP 400 / INVALID_ARGUMENT with a message naming the input or
parameter; an unknown model or version 404 / NOT_FOUND; a full queue 429 / RESOURCE_EXHAUSTED; a
request that failed alone inside a step (`SequenceError`: non-finite logits, no memory for its
cache) 500 / INTERNAL, while the engine goes on serving; an engine that is not ready or fails
(`EngineError`) 503 / UNAVAILABLE; a request past the server's deadline (`request_timeout_s`,
queueing included) 504 / DEADLINE_EXCEEDED. HTTP error bodies are `{"error": "..."}` (what
tritonclient reads). A client that disconnects (HTTP) or cancels (gRPC) cancels its generation:
its sequence is freed at the next step.

Metrics (`WorkerMetrics`): this module counts finished inference requests by outcome, their latency,
time to first token and inter-token time (mean gap per request, observed once per gap), prompt and
output tokens, and reports `engine.queue_depth()` and in-flight requests not queued as the queue
depth and running gauges, read at scrape time. An engine must not count those again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import math
import signal
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from .api_key import ApiKey
from .chat_template import ChatTemplate, load_chat_template
from .engine_api import (
    Engine,
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    OverloadedError,
    RequestError,
    SequenceError,
)
from .metrics import WorkerMetrics
from .textstream import Piece, TextStream
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

SERVER_NAME = "moe-worker"
INPUT_IDS, INPUT_TEXT = "input_ids", "text"
OUTPUT_IDS, OUTPUT_TEXT = "output_ids", "text"
HEADER_LENGTH = "Inference-Header-Content-Length"
DEFAULT_MAX_TOKENS = 16
DEFAULT_REQUEST_TIMEOUT_S = 600.0
"""Server-side deadline of one request, queueing included (MOE_REQUEST_TIMEOUT_S); then 504."""
GRPC_SERVER_OPTIONS = (("grpc.http2.min_ping_interval_without_data_ms", 4000),
                       ("grpc.keepalive_permit_without_calls", 1))
"""Let clients (the router) keep connections alive with pings every 5 s (the default allows one per 5 min)."""
MAX_BODY_BYTES = 64 << 20
"""Largest HTTP body or gRPC message, compressed or not (a DeepSeek-V3 context of INT64 ids is 1.3 MB)."""
PARAMETERS = ("max_tokens", "temperature", "top_p", "seed")
_IGNORED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output", "headers"}
)
_INT_TYPES = {"INT64": ("<i8", 8), "INT32": ("<i4", 4)}
_GRPC_METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                 "ModelConfig")
_GRPC_OPEN = frozenset({"ServerLive", "ServerReady", "ModelReady"})  # health: no API key needed
UNAUTHENTICATED = "missing or wrong API key: send 'Authorization: Bearer <key>'"

try:
    from importlib.metadata import version as _dist_version

    SERVER_VERSION = _dist_version("moe-operator")
except Exception:  # not installed as a distribution (a source checkout on sys.path)
    SERVER_VERSION = "0.1.0"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class InferError(Exception):
    """A request the server answers with an error; `kind` picks the HTTP status and gRPC code."""

    HTTP = {"invalid": 400, "not_found": 404, "too_large": 413, "overloaded": 429, "unavailable": 503,
            "internal": 500, "deadline": 504}
    GRPC = {
        "invalid": grpc.StatusCode.INVALID_ARGUMENT,
        "not_found": grpc.StatusCode.NOT_FOUND,
        "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "unavailable": grpc.StatusCode.UNAVAILABLE,
        "internal": grpc.StatusCode.INTERNAL,
        "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    OUTCOME = {"invalid": "invalid", "not_found": "not_found", "too_large": "invalid", "overloaded": "overloaded",
               "unavailable": "unavailable", "internal": "error", "deadline": "timeout"}

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def _invalid(message: str) -> InferError:
    return InferError("invalid", message)


# ---------------------------------------------------------------------------------------------
# Protocol-neutral request and response
# ---------------------------------------------------------------------------------------------


@dataclass
class InTensor:
    """One input as the wire gave it: `values` (JSON data / gRPC contents, maybe nested) or `raw` bytes."""

    name: str
    datatype: str
    shape: list[int]
    values: Any = None
    raw: bytes | None = None


@dataclass
class Job:
    """A parsed inference request."""

    request: GenerationRequest
    rank: int  # of the input tensor: outputs get the same rank
    outputs: list[str]  # names to return, in order


@dataclass
class OutTensor:
    name: str
    datatype: str
    shape: list[int]
    ids: list[int] | None = None  # INT64
    text: str | None = None  # BYTES, one element

    def to_bytes(self) -> bytes:
        if self.ids is not None:
            return np.asarray(self.ids, dtype="<i8").tobytes()
        s = self.text.encode("utf-8")
        return struct.pack("<I", len(s)) + s

    def json_data(self) -> list:
        return list(self.ids) if self.ids is not None else [self.text]


@dataclass
class Delta:
    """New output of a streamed request."""

    ids: list[int]
    text: str
    finish_reason: str | None = None
    """On the last Delta: "length" (max_tokens), "stop" (an end token) or "stop_string"."""


@dataclass
class Answer:
    request_id: str
    outputs: list[OutTensor]
    parameters: dict[str, Any]


def _shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _invalid(f"input '{name}': shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise _invalid(f"input '{name}': shape {list(shape)} has a negative dimension")
    return list(shape)


def _flatten(name: str, values: Any) -> list:
    """JSON `data` may be nested row-major lists or flat; return the elements in order."""
    if not isinstance(values, list):
        return [values]
    out: list = []
    stack = [iter(values)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    """BYTES binary data: each element is a 4-byte little-endian length then that many bytes."""
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise _invalid(f"input '{name}': BYTES binary data is truncated (an element length needs 4 bytes)")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise _invalid(f"input '{name}': BYTES element of {n} bytes runs past the end of its binary data")
        items.append(raw[i : i + n])
        i += n
    return items


class Frontend:
    """What both protocols share: metadata, readiness, parsing, running and metrics."""

    def __init__(self, engine: Engine, info: ModelInfo, metrics: WorkerMetrics, tokenizer: Tokenizer | None,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
        self.engine = engine
        self.request_timeout_s = request_timeout_s
        self.info = info
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.stopping = False
        self.in_flight = 0
        lbl = metrics.lbl()
        metrics.queue_depth.labels(**lbl).set_function(lambda: float(self._queue_depth()))
        metrics.running.labels(**lbl).set_function(lambda: float(max(self.in_flight - self._queue_depth(), 0)))

    def _queue_depth(self) -> int:
        try:
            return int(self.engine.queue_depth())
        except Exception:
            return 0

    # ---- metadata and health ----

    def live(self) -> bool:
        return not self.stopping

    def ready(self) -> bool:
        if self.stopping:
            return False
        try:
            return bool(self.engine.ready())
        except Exception:
            log.exception("engine.ready() failed")
            return False

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION,
                "extensions": ["binary_tensor_data", "parameters", "model_configuration", "generate"]}

    def check_model(self, name: str, version: str = "") -> None:
        if name != self.info.name:
            raise InferError("not_found", f"unknown model '{name}'; this server serves '{self.info.name}'")
        if version not in ("", self.info.version):
            raise InferError("not_found", f"model '{name}' has no version '{version}'; it has version '{self.info.version}'")

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        self.check_model(name, version)
        inputs = [{"name": INPUT_IDS, "datatype": "INT64", "shape": [-1]}]
        outputs = [{"name": OUTPUT_IDS, "datatype": "INT64", "shape": [-1]}]
        if self.tokenizer is not None:
            inputs.append({"name": INPUT_TEXT, "datatype": "BYTES", "shape": [1]})
            outputs.append({"name": OUTPUT_TEXT, "datatype": "BYTES", "shape": [1]})
        return {"name": self.info.name, "versions": [self.info.version], "platform": self.info.platform,
                "inputs": inputs, "outputs": outputs}

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        """Triton's model configuration (the `model_configuration` extension), as perf_analyzer
        reads it: no batching dimension (one sequence per request: max_batch_size 0), inputs
        optional (send one of them), not decoupled (`infer` answers once; ModelStreamInfer streams
        tokens with `triton_final_response` flags, which clients honour whatever this says)."""
        md = self.model_metadata(name, version)
        types = {"INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}
        return {
            "name": md["name"], "platform": "", "backend": SERVER_NAME, "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": 0,
            "input": [{"name": t["name"], "data_type": types[t["datatype"]], "dims": [-1], "optional": True}
                      for t in md["inputs"]],
            "output": [{"name": t["name"], "data_type": types[t["datatype"]], "dims": [-1]} for t in md["outputs"]],
            "model_transaction_policy": {"decoupled": False},
            "parameters": {"max_context": {"string_value": str(self.info.max_context)},
                           "max_new_tokens": {"string_value": str(self.info.max_new_tokens)}},
        }

    def output_names(self) -> list[str]:
        return [OUTPUT_IDS] + ([OUTPUT_TEXT] if self.tokenizer is not None else [])

    # ---- parsing ----

    def parse(self, inputs: list[InTensor], params: dict[str, Any], request_id: str,
              outputs: list[str] | None) -> Job:
        """Validate one request; raise InferError('invalid') naming the input or parameter at fault."""
        if not inputs:
            raise _invalid("the request has no inputs; send 'input_ids' (INT64/INT32) or 'text' (BYTES)")
        names = [t.name for t in inputs]
        for t in inputs:
            if t.name not in (INPUT_IDS, INPUT_TEXT):
                raise _invalid(f"unknown input '{t.name}'; this model takes '{INPUT_IDS}' (INT64 or INT32) or '{INPUT_TEXT}' (BYTES)")
            if names.count(t.name) > 1:
                raise _invalid(f"input '{t.name}' is given more than once")
        if len(inputs) > 1:
            raise _invalid(f"send exactly one of '{INPUT_IDS}' and '{INPUT_TEXT}', not both")
        t = inputs[0]
        if t.name == INPUT_IDS:
            prompt, rank = self._parse_ids(t)
        else:
            prompt, rank = self._parse_text(t)
        max_tokens, temperature, top_p, seed = self._parse_params(params, len(prompt))
        wanted = self.output_names() if outputs is None else outputs
        for i, name in enumerate(wanted):
            if name not in self.output_names():
                have = " and ".join(f"'{n}'" for n in self.output_names())
                raise _invalid(f"unknown output '{name}'; this model returns {have}")
            if name in wanted[:i]:
                raise _invalid(f"output '{name}' is requested more than once")
        stop = () if self.info.eos_token_id is None else (self.info.eos_token_id,)
        req = GenerationRequest(request_id=request_id or uuid.uuid4().hex, prompt_ids=tuple(prompt),
                                max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop_ids=stop)
        return Job(req, rank, list(wanted))

    def _parse_ids(self, t: InTensor) -> tuple[list[int], int]:
        if t.datatype not in _INT_TYPES:
            raise _invalid(f"input '{INPUT_IDS}' has datatype {t.datatype}; expected INT64 or INT32")
        shape = _shape(t.name, t.shape)
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != 1):
            raise _invalid(f"input '{INPUT_IDS}' has shape {shape}; expected [n] or [1, n] (one sequence per request)")
        n = shape[-1]
        if t.raw is not None:
            np_dtype, size = _INT_TYPES[t.datatype]
            if len(t.raw) != n * size:
                raise _invalid(f"input '{INPUT_IDS}': binary data has {len(t.raw)} bytes; shape {shape} of "
                               f"{t.datatype} needs {n * size}")
            ids = np.frombuffer(t.raw, dtype=np_dtype).tolist()
        else:
            ids = _flatten(t.name, t.values)
            if len(ids) != n:
                raise _invalid(f"input '{INPUT_IDS}' has {len(ids)} values; shape {shape} needs {n}")
            bad = [v for v in ids if not isinstance(v, int) or isinstance(v, bool)]
            if bad:
                raise _invalid(f"input '{INPUT_IDS}' must hold integers; got {bad[0]!r}")
        if n == 0:
            raise _invalid(f"input '{INPUT_IDS}' is empty; send at least one token id")
        if n > self.info.max_context - 1:
            raise _invalid(f"input '{INPUT_IDS}' has {n} tokens; this model's context is {self.info.max_context} "
                           f"tokens, so a prompt may have at most {self.info.max_context - 1}")
        vocab = self.info.vocab_size
        for i, v in enumerate(ids):
            if not 0 <= v < vocab:
                raise _invalid(f"input '{INPUT_IDS}'[{i}] is {v}, outside the vocabulary 0..{vocab - 1}")
        return ids, len(shape)

    def _parse_text(self, t: InTensor) -> tuple[list[int], int]:
        if self.tokenizer is None:
            raise _invalid(f"input '{INPUT_TEXT}' needs a tokenizer and this model has none "
                           f"(no tokenizer.json, vocabulary below 256); send '{INPUT_IDS}'")
        if t.datatype != "BYTES":
            raise _invalid(f"input '{INPUT_TEXT}' has datatype {t.datatype}; expected BYTES")
        shape = _shape(t.name, t.shape)
        if shape not in ([1], [1, 1]):
            raise _invalid(f"input '{INPUT_TEXT}' has shape {shape}; expected [1] or [1, 1] (one string)")
        items = _split_bytes(t.name, t.raw) if t.raw is not None else _flatten(t.name, t.values)
        if len(items) != 1:
            raise _invalid(f"input '{INPUT_TEXT}' has {len(items)} elements; shape {shape} needs 1")
        item = items[0]
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _invalid(f"input '{INPUT_TEXT}' is not valid UTF-8 ({e})") from None
        if not isinstance(item, str):
            raise _invalid(f"input '{INPUT_TEXT}' must hold a string; got {item!r}")
        if not item:
            raise _invalid(f"input '{INPUT_TEXT}' is an empty string")
        try:
            ids = self.tokenizer.encode(item)
        except TokenizerError as e:
            raise _invalid(f"input '{INPUT_TEXT}': {e}") from None
        if not ids:
            raise _invalid(f"input '{INPUT_TEXT}' encodes to no tokens")
        if len(ids) > self.info.max_context - 1:
            raise _invalid(f"input '{INPUT_TEXT}' is {len(ids)} tokens; this model's context is "
                           f"{self.info.max_context} tokens, so a prompt may have at most {self.info.max_context - 1}")
        return ids, len(shape)

    def _parse_params(self, params: dict[str, Any], n_prompt: int) -> tuple[int, float, float, int | None]:
        for key in params:
            if key in _IGNORED_PARAMETERS or key.startswith("triton_") or key in PARAMETERS:
                continue
            raise _invalid(f"unknown parameter '{key}'; this model takes {', '.join(PARAMETERS)}")
        room = self.info.max_context - n_prompt
        limit = min(self.info.max_new_tokens, room)
        if "max_tokens" in params:
            max_tokens = params["max_tokens"]
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
                raise _invalid(f"parameter 'max_tokens' must be an integer, got {max_tokens!r}")
            if max_tokens < 1:
                raise _invalid(f"parameter 'max_tokens' is {max_tokens}; it must be >= 1")
            if max_tokens > self.info.max_new_tokens:
                raise _invalid(f"parameter 'max_tokens' is {max_tokens}; this model generates at most "
                               f"{self.info.max_new_tokens} tokens per request")
            if max_tokens > room:
                raise _invalid(f"{n_prompt} prompt tokens + parameter 'max_tokens' {max_tokens} exceed the "
                               f"model's context of {self.info.max_context} tokens")
        else:
            max_tokens = min(DEFAULT_MAX_TOKENS, limit)
        temperature = params.get("temperature", 0.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise _invalid(f"parameter 'temperature' must be a number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise _invalid(f"parameter 'temperature' is {temperature}; it must be a finite number >= 0")
        top_p = params.get("top_p", 1.0)
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
            raise _invalid(f"parameter 'top_p' is {top_p!r}; it must be a number in (0, 1]")
        seed = params.get("seed")
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise _invalid(f"parameter 'seed' must be an integer, got {seed!r}")
            if not 0 <= seed < 2**63:
                raise _invalid(f"parameter 'seed' is {seed}; it must be in 0..2**63-1")
        return max_tokens, float(temperature), float(top_p), seed

    # ---- running ----

    async def run(self, job: Job) -> Answer:
        self._check_ready()
        self.in_flight += 1
        start = time.perf_counter()
        try:
            with self._engine_errors(job.request):
                result: GenerationResult = await asyncio.wait_for(self.engine.generate(job.request),
                                                                  self.request_timeout_s)
        finally:
            self.in_flight -= 1
        self._observe(result, time.perf_counter() - start)
        suffix = [1] if job.rank == 1 else [1, 1]
        outs = []
        for name in job.outputs:
            if name == OUTPUT_IDS:
                outs.append(OutTensor(OUTPUT_IDS, "INT64", suffix[:-1] + [len(result.output_ids)], ids=result.output_ids))
            else:
                outs.append(OutTensor(OUTPUT_TEXT, "BYTES", suffix, text=self.tokenizer.decode(result.output_ids)))
        params = {"finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                  "completion_tokens": len(result.output_ids)}
        return Answer(job.request.request_id, outs, params)

    async def stream(self, req: GenerationRequest, stop: list[str] | tuple[str, ...] = ()) -> AsyncIterator[Delta]:
        """The request's output as it is generated: one Delta per token (its text may be empty
        while a character or a possible stop string is held back, see `textstream`); the last
        one has `finish_reason` and holds the rest of the text. A stop string ends the sequence
        (freed within a step) with finish_reason "stop_string". The iterator must be closed
        (`aclosing`): closing it early cancels the sequence."""
        self._check_ready()
        if stop and self.tokenizer is None:
            raise _invalid("stop strings need a tokenizer and this model has none; send stop token ids")
        text = TextStream(self.tokenizer, stop) if self.tokenizer is not None else None
        self.in_flight += 1
        m, lbl = self.metrics, self.metrics.lbl()
        start = last = time.perf_counter()
        n = 0
        finished = False
        deadline = time.monotonic() + self.request_timeout_s
        try:
            with self._engine_errors(req):
                async with contextlib.aclosing(self.engine.stream(req)) as toks:
                    while True:
                        try:
                            tok = await asyncio.wait_for(toks.__anext__(), max(deadline - time.monotonic(), 0.001))
                        except StopAsyncIteration:
                            break
                        now = time.perf_counter()
                        (m.ttft_seconds if n == 0 else m.itl_seconds).labels(**lbl).observe(now - last)
                        last = now
                        n += 1
                        if finished:
                            continue  # a token past the end the engine already had in flight
                        piece = text.add(tok) if text is not None else Piece("")
                        reason = "stop_string" if piece.stopped else "stop" if tok in req.stop_ids else \
                            "length" if n >= req.max_tokens else None
                        if reason is not None and not piece.stopped and text is not None:
                            piece = Piece(piece.text + text.finish().text)
                        finished = reason is not None
                        yield Delta([tok], piece.text, reason)
                        if piece.stopped:
                            break  # closing the engine's stream cancels the sequence
            if not finished:  # the engine ended it for a reason of its own
                yield Delta([], text.finish().text if text is not None else "", "length")
            m.requests.labels(**lbl, outcome="ok").inc()
            m.request_seconds.labels(**lbl).observe(time.perf_counter() - start)
            m.input_tokens.labels(**lbl).inc(len(req.prompt_ids))
            m.output_tokens.labels(**lbl).inc(n)
        except GeneratorExit:  # the caller stopped reading: the client left (or had it all)
            if not finished:
                m.requests.labels(**lbl, outcome="cancelled").inc()
            raise
        finally:
            self.in_flight -= 1

    def _check_ready(self) -> None:
        if not self.ready():
            raise InferError("unavailable", f"model '{self.info.name}' is not ready (the EP group is not up)")

    @contextlib.contextmanager
    def _engine_errors(self, req: GenerationRequest):
        """The engine's exceptions as InferErrors; a cancellation counted."""
        try:
            yield
        except (asyncio.TimeoutError, TimeoutError):  # the generation was cancelled: its sequence is freed
            raise InferError("deadline", f"request {req.request_id} did not finish within the server's "
                             f"deadline of {self.request_timeout_s:g} s (MOE_REQUEST_TIMEOUT_S)") from None
        except asyncio.CancelledError:  # the client left (disconnect, gRPC cancel or deadline)
            self.metrics.requests.labels(**self.metrics.lbl(), outcome="cancelled").inc()
            raise
        except RequestError as e:
            raise _invalid(str(e)) from None
        except SequenceError as e:
            raise InferError("internal", f"request {req.request_id} failed: {e}") from None
        except OverloadedError as e:
            raise InferError("overloaded", str(e)) from None
        except EngineError as e:
            raise InferError("unavailable", f"the engine cannot serve: {e}") from None
        except InferError:
            raise
        except Exception as e:
            log.exception("the engine failed on request %s", req.request_id)
            raise InferError("internal", f"internal error: {type(e).__name__}: {e}") from None

    def _observe(self, result: GenerationResult, wall: float) -> None:
        m, lbl = self.metrics, self.metrics.lbl()
        n = len(result.output_ids)
        m.requests.labels(**lbl, outcome="ok").inc()
        m.request_seconds.labels(**lbl).observe(wall)
        # The engine times from when it got the request; the server's own share is added to TTFT.
        m.ttft_seconds.labels(**lbl).observe(result.time_to_first_token_s + max(wall - result.duration_s, 0.0))
        if n > 1:
            gap = max(result.duration_s - result.time_to_first_token_s, 0.0) / (n - 1)
            itl = m.itl_seconds.labels(**lbl)
            for _ in range(n - 1):
                itl.observe(gap)
        m.input_tokens.labels(**lbl).inc(result.prompt_tokens)
        m.output_tokens.labels(**lbl).inc(n)

    def count_failure(self, err: InferError) -> None:
        self.metrics.requests.labels(**self.metrics.lbl(), outcome=InferError.OUTCOME[err.kind]).inc()


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")


def _error_response(status: int, message: str) -> web.Response:
    return _json_response({"error": message}, status)


def _decompress(body: bytes, encoding: str) -> bytes:
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise _invalid(f"Content-Encoding '{encoding}' is not supported; use gzip, deflate or none")
    d = zlib.decompressobj(zlib.MAX_WBITS | 16 if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as e:
        raise _invalid(f"request body is not valid {enc} data ({e})") from None
    if len(out) > MAX_BODY_BYTES:
        raise InferError("too_large", f"request body decompresses to more than {MAX_BODY_BYTES} bytes")
    if not d.eof:
        raise _invalid(f"request body is truncated {enc} data")
    return out


def _http_inputs(doc: dict[str, Any], binary: bytes | None) -> list[InTensor]:
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise _invalid("request field 'inputs' must be a list of tensors")
    tensors: list[InTensor] = []
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise _invalid(f"inputs[{i}] must be an object with name, datatype, shape and data")
        name = item.get("name")
        if not isinstance(name, str):
            raise _invalid(f"inputs[{i}] has no string 'name'")
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise _invalid(f"input '{name}' has no string 'datatype'")
        if "shape" not in item:
            raise _invalid(f"input '{name}' has no 'shape'")
        shape = _shape(name, item["shape"])
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise _invalid(f"input '{name}': 'parameters' must be an object")
        if "shared_memory_region" in params:
            raise _invalid(f"input '{name}': shared memory is not supported; send the data in the request")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _invalid(f"input '{name}': binary_data_size must be an integer >= 0, got {size!r}")
            if "data" in item:
                raise _invalid(f"input '{name}' has both 'data' and binary_data_size")
            if binary is None:
                raise _invalid(f"input '{name}' has binary_data_size but the request has no {HEADER_LENGTH} header")
            if offset + size > len(binary):
                raise _invalid(f"input '{name}': binary_data_size {size} runs past the {len(binary)} bytes of "
                               f"binary data after the JSON header")
            tensors.append(InTensor(name, datatype, shape, raw=binary[offset : offset + size]))
            offset += size
        else:
            if "data" not in item:
                raise _invalid(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
            tensors.append(InTensor(name, datatype, shape, values=item["data"]))
    if binary is not None and offset != len(binary):
        raise _invalid(f"{len(binary)} bytes of binary data follow the JSON header but the inputs' "
                       f"binary_data_size add up to {offset}")
    return tensors


def _http_outputs(doc: dict[str, Any], params: dict[str, Any]) -> tuple[list[str] | None, dict[str, bool]]:
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise _invalid(f"parameter 'binary_data_output' must be true or false, got {default!r}")
    raw = doc.get("outputs")
    if raw is None:
        return None, {"*": default}
    if not isinstance(raw, list):
        raise _invalid("request field 'outputs' must be a list")
    names, binary = [], {"*": default}
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _invalid(f"outputs[{i}] must be an object with a string 'name'")
        name = item["name"]
        p = item.get("parameters") or {}
        if not isinstance(p, dict):
            raise _invalid(f"output '{name}': 'parameters' must be an object")
        if p.get("classification"):
            raise _invalid(f"output '{name}': classification is not supported")
        b = p.get("binary_data", default)
        if not isinstance(b, bool):
            raise _invalid(f"output '{name}': binary_data must be true or false, got {b!r}")
        names.append(name)
        binary[name] = b
    return names, binary


class HttpApp:
    """aiohttp handlers over a Frontend; with `api_key`, only health and /metrics are open."""

    def __init__(self, front: Frontend, api_key: ApiKey | None = None, chat: ChatTemplate | None = None):
        from .llm_api import LlmRoutes

        self.front = front
        self.api_key = api_key
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        r = self.app.router
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_post(base + "/infer", self.infer)
            r.add_get(base + "/config", self.model_config)
        LlmRoutes(front, chat).add_to(r)
        r.add_get("/metrics", self.metrics)
        self.open = (self.live, self.ready, self.model_ready, self.metrics)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """401 for a request without the API key, unless it is for health or metrics (unknown
        routes too: without the key nobody learns which exist)."""
        if self.api_key is None or handler in self.open or self.api_key.accepts(request.headers.get("Authorization")):
            return await handler(request)
        resp = _error_response(401, UNAUTHENTICATED)
        resp.headers["WWW-Authenticate"] = 'Bearer realm="moe-worker"'
        return resp

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        try:
            return await handler(request)
        except InferError as e:
            resp = _error_response(InferError.HTTP[e.kind], e.message)
            if e.kind in ("overloaded", "unavailable"):
                resp.headers["Retry-After"] = "1"  # a full queue or a group re-forming: seconds, not minutes
            return resp
        except web.HTTPException as e:  # unknown route, wrong method, body too large
            if e.status < 400:
                raise
            msg = {404: f"no such endpoint: {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}",
                   413: f"request body is larger than {MAX_BODY_BYTES} bytes"}.get(e.status, e.text or e.reason)
            return _error_response(e.status, msg)
        except Exception as e:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _error_response(500, f"internal error: {type(e).__name__}: {e}")

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json_response(self.front.server_metadata())

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.front.live() else 503)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.front.ready() else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json_response(self.front.model_metadata(m["model"], m.get("version", "")))

    async def model_config(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json_response(self.front.model_config(m["model"], m.get("version", "")))

    async def model_ready(self, request: web.Request) -> web.Response:
        m = request.match_info
        self.front.check_model(m["model"], m.get("version", ""))
        return web.Response(status=200 if self.front.ready() else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.front.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def infer(self, request: web.Request) -> web.Response:
        m = request.match_info
        front = self.front
        try:
            front.check_model(m["model"], m.get("version", ""))
            body = _decompress(await request.read(), request.headers.get("Content-Encoding", ""))
            doc, binary = self._split_body(body, request.headers.get(HEADER_LENGTH))
            params = doc.get("parameters") or {}
            if not isinstance(params, dict):
                raise _invalid("request field 'parameters' must be an object")
            request_id = doc.get("id", "")
            if not isinstance(request_id, str):
                raise _invalid(f"request field 'id' must be a string, got {request_id!r}")
            outputs, out_binary = _http_outputs(doc, params)
            job = front.parse(_http_inputs(doc, binary), params, request_id, outputs)
            answer = await front.run(job)
        except InferError as e:
            front.count_failure(e)
            raise
        return self._encode(request, answer, request_id, out_binary)

    @staticmethod
    def _split_body(body: bytes, header: str | None) -> tuple[dict[str, Any], bytes | None]:
        binary = None
        if header is not None:
            try:
                n = int(header.strip())
            except ValueError:
                raise _invalid(f"{HEADER_LENGTH} header must be an integer, got {header!r}") from None
            if not 0 <= n <= len(body):
                raise _invalid(f"{HEADER_LENGTH} is {n} but the request body has {len(body)} bytes")
            body, binary = body[:n], body[n:]
        try:
            doc = json.loads(body)
        except RecursionError:
            raise _invalid("request JSON is nested too deeply") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = (f"the JSON header (the first {len(body)} bytes, per {HEADER_LENGTH})" if binary is not None
                     else "the request body")
            raise _invalid(f"{where} is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise _invalid(f"the request body must be a JSON object, got {type(doc).__name__}")
        return doc, binary

    def _encode(self, request: web.Request, answer: Answer, request_id: str, out_binary: dict[str, bool]) -> web.Response:
        front = self.front
        outputs, blobs = [], []
        for t in answer.outputs:
            entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
            if out_binary.get(t.name, out_binary["*"]):
                blob = t.to_bytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = t.json_data()
            outputs.append(entry)
        doc: dict[str, Any] = {"model_name": front.info.name, "model_version": front.info.version}
        if request_id:
            doc["id"] = request_id
        doc["parameters"] = answer.parameters
        doc["outputs"] = outputs
        head = json.dumps(doc).encode()
        headers = {}
        if blobs:
            headers[HEADER_LENGTH] = str(len(head))
            headers["Content-Type"] = "application/octet-stream"
        else:
            headers["Content-Type"] = "application/json"
        body = head + b"".join(blobs)
        accept = request.headers.get("Accept-Encoding", "").lower()
        if "gzip" in accept:
            body, headers["Content-Encoding"] = gzip.compress(body, compresslevel=1), "gzip"
        elif "deflate" in accept:
            body, headers["Content-Encoding"] = zlib.compress(body, 1), "deflate"
        return web.Response(body=body, headers=headers)


# ---------------------------------------------------------------------------------------------
# gRPC
# ---------------------------------------------------------------------------------------------


def _grpc_param(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _grpc_inputs(req: pb.ModelInferRequest) -> list[InTensor]:
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise _invalid(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs; "
                       "give raw data for every input or for none")
    tensors = []
    for i, t in enumerate(req.inputs):
        shape = list(t.shape)
        if "shared_memory_region" in t.parameters:
            raise _invalid(f"input '{t.name}': shared memory is not supported; send the data in the request")
        if raw:
            if t.HasField("contents"):
                raise _invalid(f"input '{t.name}' has both contents and raw_input_contents")
            tensors.append(InTensor(t.name, t.datatype, shape, raw=raw[i]))
            continue
        c = t.contents
        if t.datatype == "INT64":
            values = list(c.int64_contents)
        elif t.datatype == "INT32":
            values = list(c.int_contents)
        elif t.datatype == "BYTES":
            values = list(c.bytes_contents)
        else:
            values = []  # the datatype check names the input
        tensors.append(InTensor(t.name, t.datatype, shape, values=values))
    return tensors


class GrpcService:
    """`inference.GRPCInferenceService` over a Frontend; requests are parsed here (bad protobuf -> INVALID_ARGUMENT).
    With `api_key`, every method but the health ones needs it (UNAUTHENTICATED otherwise)."""

    def __init__(self, front: Frontend, api_key: ApiKey | None = None):
        self.front = front
        self.api_key = api_key

    def handler(self) -> grpc.GenericRpcHandler:
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        handlers = {}
        for name in _GRPC_METHODS:
            method = service.methods_by_name[name]
            req_cls = getattr(pb, method.input_type.name)
            resp_cls = getattr(pb, method.output_type.name)
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._wrap(name, getattr(self, name), req_cls),
                request_deserializer=None,  # raw bytes: parsed in _wrap so a bad message gets a clear status
                response_serializer=resp_cls.SerializeToString,
            )
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.ModelStreamInfer, request_deserializer=None,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def _wrap(self, name: str, fn, req_cls):
        async def call(raw: bytes, context: grpc.aio.ServicerContext):
            if self.api_key is not None and name not in _GRPC_OPEN and not self.api_key.accepts(
                    _metadata(context, "authorization")):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
            try:
                req = req_cls.FromString(raw)
            except (DecodeError, RuntimeWarning) as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: malformed {req_cls.__name__} protobuf ({e})")
            try:
                return await fn(req)
            except InferError as e:
                hint = (("retry-after", "1"),) if e.kind in ("overloaded", "unavailable") else ()
                await context.abort(InferError.GRPC[e.kind], e.message, trailing_metadata=hint)
            except Exception as e:
                log.exception("unhandled error in gRPC %s", name)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

        return call

    async def ServerLive(self, req: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.front.live())

    async def ServerReady(self, req: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.front.ready())

    async def ModelReady(self, req: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        self.front.check_model(req.name, req.version)
        return pb.ModelReadyResponse(ready=self.front.ready())

    async def ServerMetadata(self, req: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.front.server_metadata())

    async def ModelMetadata(self, req: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        md = self.front.model_metadata(req.name, req.version)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=md["name"], versions=md["versions"], platform=md["platform"],
            inputs=[tm(**t) for t in md["inputs"]], outputs=[tm(**t) for t in md["outputs"]],
        )

    async def ModelConfig(self, req: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        config = json_format.ParseDict(self.front.model_config(req.name, req.version), mc.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def ModelStreamInfer(self, requests: AsyncIterator[bytes],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Decoupled streaming: every request on the stream gets one response per generated token
        (output_ids: that token; text: the text it completes, maybe empty), the last flagged
        `triton_final_response` true (the others false); a failed request gets one response with
        `error_message` naming its id, and the stream goes on. Requests run concurrently; their
        responses interleave. The stream ends once the client has half-closed and every request
        has finished; a cancelled stream cancels them all."""
        if self.api_key is not None and not self.api_key.accepts(_metadata(context, "authorization")):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def read() -> None:
            async for raw in requests:
                task = asyncio.create_task(self._stream_one(raw, out))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while (resp := await out.get()) is not None:
                yield resp
            await reader
        finally:
            for t in (reader, *tasks):
                t.cancel()

    async def _stream_one(self, raw: bytes, out: asyncio.Queue) -> None:
        front = self.front
        rid = ""
        try:
            try:
                req = pb.ModelInferRequest.FromString(raw)
            except (DecodeError, RuntimeWarning) as e:
                raise _invalid(f"ModelStreamInfer: malformed ModelInferRequest protobuf ({e})") from None
            rid = req.id
            front.check_model(req.model_name, req.model_version)
            params = {k: _grpc_param(v) for k, v in req.parameters.items()}
            job = front.parse(_grpc_inputs(req), params, req.id, [o.name for o in req.outputs] or None)
            suffix = [1] if job.rank == 1 else [1, 1]
            async with contextlib.aclosing(front.stream(job.request)) as deltas:
                async for d in deltas:
                    resp = pb.ModelInferResponse(model_name=front.info.name, model_version=front.info.version, id=req.id)
                    for t in job.outputs:
                        ot = (OutTensor(OUTPUT_IDS, "INT64", suffix[:-1] + [len(d.ids)], ids=d.ids) if t == OUTPUT_IDS
                              else OutTensor(OUTPUT_TEXT, "BYTES", suffix, text=d.text))
                        resp.outputs.add(name=ot.name, datatype=ot.datatype, shape=ot.shape)
                        resp.raw_output_contents.append(ot.to_bytes())
                    resp.parameters["triton_final_response"].bool_param = d.finish_reason is not None
                    if d.finish_reason is not None:
                        resp.parameters["finish_reason"].string_param = d.finish_reason
                    await out.put(pb.ModelStreamInferResponse(infer_response=resp))
        except InferError as e:
            front.count_failure(e)
            final = pb.ModelInferResponse(model_name=front.info.name, model_version=front.info.version, id=rid)
            final.parameters["triton_final_response"].bool_param = True
            await out.put(pb.ModelStreamInferResponse(
                error_message=f"request '{rid}': {e.message}" if rid else e.message, infer_response=final))

    async def ModelInfer(self, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
        front = self.front
        try:
            front.check_model(req.model_name, req.model_version)
            params = {k: _grpc_param(v) for k, v in req.parameters.items()}
            outputs = [o.name for o in req.outputs] if req.outputs else None
            job = front.parse(_grpc_inputs(req), params, req.id, outputs)
            answer = await front.run(job)
        except InferError as e:
            front.count_failure(e)
            raise
        resp = pb.ModelInferResponse(model_name=front.info.name, model_version=front.info.version, id=req.id)
        for key, value in answer.parameters.items():
            if isinstance(value, str):
                resp.parameters[key].string_param = value
            else:
                resp.parameters[key].int64_param = value
        for t in answer.outputs:
            resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            resp.raw_output_contents.append(t.to_bytes())  # tritonclient reads raw contents
        return resp


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """The first value of one invocation metadata key (gRPC keys are lower case)."""
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


class Server:
    """A started HTTP + gRPC server. `await stop()` shuts both down; the engine stays the caller's."""

    def __init__(self, front: Frontend, runner: web.AppRunner, grpc_server: grpc.aio.Server,
                 host: str, http_port: int, grpc_port: int):
        self.front = front
        self._runner = runner
        self._grpc = grpc_server
        self.host = host
        self.http_port = http_port
        """The bound HTTP port (the real one when 0 was asked for)."""
        self.grpc_port = grpc_port
        self._stopped = asyncio.Event()

    @property
    def http_url(self) -> str:
        """host:port as tritonclient.http takes it."""
        return f"{_connect_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_connect_host(self.host)}:{self.grpc_port}"

    async def stop(self, grace: float = 5.0) -> None:
        """Report not ready, let requests in flight finish for up to `grace` seconds, close both servers."""
        if self._stopped.is_set():
            return
        self.front.stopping = True
        await asyncio.gather(self._grpc.stop(grace), self._runner.cleanup())
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host


async def serve(
    engine: Engine,
    info: ModelInfo,
    metrics: WorkerMetrics,
    host: str = "0.0.0.0",
    http_port: int = 8000,
    grpc_port: int = 8001,
    *,
    tokenizer: Tokenizer | None = None,
    checkpoint_dir: str | Path | None = None,
    grace: float = 5.0,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    api_key: ApiKey | None = None,
) -> Server:
    """Start KServe v2 over HTTP and gRPC for `engine` on this event loop; return the running Server.

    Port 0 picks a free port (see Server.http_port / grpc_port). Text uses `tokenizer`, else the
    checkpoint's tokenizer.json from `checkpoint_dir`, else the byte-level fallback. With
    `api_key`, requests other than health and metrics must carry it.
    """
    if tokenizer is None:
        tokenizer = load_tokenizer(checkpoint_dir, info.vocab_size)
    front = Frontend(engine, info, metrics, tokenizer, request_timeout_s)
    # auto_decompress off: _decompress gives clear errors for bad gzip/deflate and bounds the size.
    # handler_cancellation: a client that disconnects cancels its handler, and so its generation
    # (aiohttp's default keeps generating to max_tokens for nobody).
    runner = web.AppRunner(HttpApp(front, api_key, load_chat_template(checkpoint_dir)).app, access_log=None, shutdown_timeout=grace, auto_decompress=False,
                           handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, http_port)
        await site.start()
        bound_http = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - aiohttp keeps the socket here
        opts = [("grpc.max_receive_message_length", MAX_BODY_BYTES), ("grpc.max_send_message_length", MAX_BODY_BYTES),
                ("grpc.so_reuseport", 0), *GRPC_SERVER_OPTIONS]
        gserver = grpc.aio.server(options=opts)
        gserver.add_generic_rpc_handlers((GrpcService(front, api_key).handler(),))
        bound_grpc = gserver.add_insecure_port(f"{_grpc_host(host)}:{grpc_port}")
        await gserver.start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("serving model %s: HTTP %s:%d, gRPC %s:%d", info.name, host, bound_http, host, bound_grpc)
    return Server(front, runner, gserver, host, bound_http, bound_grpc)


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host or "0.0.0.0"


def run(engine: Engine, info: ModelInfo, metrics: WorkerMetrics, host: str = "0.0.0.0", http_port: int = 8000,
        grpc_port: int = 8001, **kw: Any) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly (blocking; for the command line)."""

    async def main() -> None:
        server = await serve(engine, info, metrics, host, http_port, grpc_port, **kw)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop(kw.get("grace", 5.0))

    asyncio.run(main())
