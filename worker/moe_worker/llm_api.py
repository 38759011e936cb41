"""The LLM-shaped HTTP APIs beside KServe v2 `infer`, on the same port, over the same `Frontend`:

- the Open Inference Protocol generate extension: `POST /v2/models/{m}[/versions/{v}]/generate`
  and `/generate_stream` (server-sent events; the last event has `"done": true` and
  `details.finish_reason`): `text_input` in, `text_output` out; parameters max_tokens (default
  20), temperature (default 1), top_p, seed, stop. Errors are `{"error": ...}`: 422 for the
  input, 429 with Retry-After when the queue is full, 503 while the model is not ready;
- an OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions` (prompt as text or token
  ids) and `POST /v1/chat/completions` (messages rendered with the checkpoint's chat template),
  with stream (SSE, `data: [DONE]`, `stream_options.include_usage`), max_tokens, temperature,
  top_p, seed, stop, usage and finish_reason; errors in OpenAI's shape
  (`{"error": {"message", "type", "param", "code"}}`).

A stream's status goes out with its first event, so everything that can fail before the first
token (parsing, admission, a full queue) is answered with a real status; a failure after it is an
`error` event. A client that disconnects cancels its sequence (the handler is cancelled).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .chat_template import ChatTemplate, ChatTemplateError
from .engine_api import GenerationRequest
from .server import Delta, Frontend, InferError

OIP_STATUS = {"invalid": 422, "not_found": 404, "too_large": 413, "overloaded": 429, "unavailable": 503,
              "internal": 500, "deadline": 504}
OPENAI_TYPE = {"invalid": "invalid_request_error", "not_found": "not_found_error", "too_large": "invalid_request_error",
               "overloaded": "rate_limit_error", "unavailable": "service_unavailable", "internal": "internal_error",
               "deadline": "timeout"}
OIP_FINISH = {"length": "length", "stop": "eos_token", "stop_string": "stop_sequence"}
OPENAI_FINISH = {"length": "length", "stop": "stop", "stop_string": "stop"}
RETRY_AFTER_S = "1"
MAX_STOP = 16
OIP_DEFAULT_MAX_TOKENS = 20  # generate_rest.yaml
OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions; chat completions default to what fits
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def _invalid(message: str, param: str | None = None) -> InferError:
    e = InferError("invalid", message)
    e.param = param  # type: ignore[attr-defined]
    return e


class Sampling:
    """The sampling parameters both APIs share, checked; `field` names the request's key in errors."""

    def __init__(self, doc: dict[str, Any], where: str, default_max: int | None, max_key: tuple[str, ...] = ("max_tokens",)):
        self.doc, self.where = doc, where
        self.max_tokens = None
        for key in max_key:
            if doc.get(key) is not None:
                self.max_tokens = self._int(key, 1)
                break
        self.default_max = default_max
        self.temperature = self._num("temperature", 1.0, 0.0, math.inf)
        self.top_p = self._num("top_p", 1.0, 0.0, 1.0)
        if self.top_p == 0:
            raise _invalid(f"{where}'top_p' is 0; it must be in (0, 1]", "top_p")
        self.seed = None if doc.get("seed") is None else self._int("seed", 0, 2**63 - 1)
        self.stop = self._stop()

    def _name(self, key: str) -> str:
        return f"{self.where}'{key}'"

    def _int(self, key: str, lo: int, hi: int | None = None) -> int:
        v = self.doc[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise _invalid(f"{self._name(key)} must be an integer, got {v!r}", key)
        if v < lo or (hi is not None and v > hi):
            raise _invalid(f"{self._name(key)} is {v}; it must be >= {lo}" + (f" and <= {hi}" if hi is not None else ""),
                           key)
        return v

    def _num(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self.doc.get(key)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise _invalid(f"{self._name(key)} must be a finite number, got {v!r}", key)
        if not lo <= v <= hi:
            raise _invalid(f"{self._name(key)} is {v}; it must be in [{lo:g}, {hi:g}]", key)
        return float(v)

    def _stop(self) -> list[str]:
        v = self.doc.get("stop")
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _invalid(f"{self._name('stop')} must be a string or a list of strings", "stop")
        if len(stops) > MAX_STOP:
            raise _invalid(f"{self._name('stop')} has {len(stops)} strings; at most {MAX_STOP}", "stop")
        if any(not s for s in stops):
            raise _invalid(f"{self._name('stop')} holds an empty string", "stop")
        return stops

    def request(self, front: Frontend, prompt: list[int], request_id: str) -> GenerationRequest:
        info = front.info
        if not prompt:
            raise _invalid("the prompt is empty; send at least one token", "prompt")
        if len(prompt) > info.max_context - 1:
            raise _invalid(f"the prompt has {len(prompt)} tokens; this model's context is {info.max_context} tokens, "
                           f"so a prompt may have at most {info.max_context - 1}", "prompt")
        room = info.max_context - len(prompt)
        if self.max_tokens is None:
            limit = min(info.max_new_tokens, room)
            max_tokens = limit if self.default_max is None else min(self.default_max, limit)
        else:
            max_tokens = self.max_tokens
            if max_tokens > info.max_new_tokens:
                raise _invalid(f"{self._name('max_tokens')} is {max_tokens}; this model generates at most "
                               f"{info.max_new_tokens} tokens per request", "max_tokens")
            if max_tokens > room:
                raise _invalid(f"{len(prompt)} prompt tokens + {self._name('max_tokens')} {max_tokens} exceed the "
                               f"model's context of {info.max_context} tokens", "max_tokens")
        stop_ids = () if info.eos_token_id is None else (info.eos_token_id,)
        return GenerationRequest(request_id=request_id, prompt_ids=tuple(prompt), max_tokens=max_tokens,
                                 temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop_ids=stop_ids)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid(f"the request body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _invalid("the request body must be a JSON object")
    return doc


class Collected:
    """A whole answer from a stream of Deltas."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.ids: list[int] = []
        self.finish_reason = "length"

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        self.ids.extend(d.ids)
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason


async def _first_then_rest(stream: AsyncIterator[Delta]) -> tuple[Delta | None, AsyncIterator[Delta]]:
    """The first Delta (errors before it are raised here, before any byte of the answer), then the rest."""
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    return first, stream


def _sse(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n\n"


class LlmRoutes:
    """The generate extension and the OpenAI-compatible API over `front`."""

    def __init__(self, front: Frontend, chat: ChatTemplate | None):
        self.front = front
        self.chat_template = chat
        self.created = int(time.time())

    def add_to(self, r: web.UrlDispatcher) -> None:
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_post(base + "/generate", self.generate)
            r.add_post(base + "/generate_stream", self.generate_stream)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model}", self.model)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)

    def _error(self, e: InferError, shape) -> web.Response:
        self.front.count_failure(e)
        return shape(e)

    # ---- OIP generate ----

    def _oip_request(self, request: web.Request, doc: dict[str, Any]) -> tuple[GenerationRequest, list[str]]:
        m = request.match_info
        self.front.check_model(m["model"], m.get("version", ""))
        text = doc.get("text_input")
        if not isinstance(text, str) or not text:
            raise _invalid("'text_input' must be a non-empty string")
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise _invalid("'parameters' must be an object")
        s = Sampling(params, "parameter ", OIP_DEFAULT_MAX_TOKENS)
        rid = doc.get("id")
        if rid is not None and not isinstance(rid, str):
            raise _invalid("'id' must be a string")
        return s.request(self.front, self._encode(text, special=True), rid or uuid.uuid4().hex), s.stop

    def _oip_doc(self, req: GenerationRequest, text: str, finish: str | None = None) -> dict[str, Any]:
        info = self.front.info
        doc: dict[str, Any] = {"model_name": info.name, "model_version": info.version, "id": req.request_id,
                               "text_output": text}
        if finish is not None:
            doc["details"] = {"finish_reason": OIP_FINISH[finish]}
        return doc

    async def generate(self, request: web.Request) -> web.Response:
        try:
            req, stop = self._oip_request(request, await _json_body(request))
            got = Collected()
            async with contextlib.aclosing(self.front.stream(req, stop)) as deltas:
                async for d in deltas:
                    got.add(d)
        except InferError as e:
            return self._error(e, _oip_error)
        return web.json_response(self._oip_doc(req, "".join(got.text), got.finish_reason))

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            req, stop = self._oip_request(request, await _json_body(request))
            stream = self.front.stream(req, stop)
            first, rest = await _first_then_rest(stream)
        except InferError as e:
            return self._error(e, _oip_error)
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        async with contextlib.aclosing(rest):
            try:
                d = first
                while d is not None:
                    doc = self._oip_doc(req, d.text, d.finish_reason)
                    if d.finish_reason is not None:
                        doc["done"] = True
                    await resp.write(_sse(doc))
                    d = await _next(rest)
            except InferError as e:
                self.front.count_failure(e)
                await resp.write(_sse({"error": e.message}))
        await resp.write_eof()
        return resp

    # ---- OpenAI ----

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.front.info.name:
            return _openai_error(InferError("not_found", f"the model '{request.match_info['model']}' does not exist; "
                                            f"this server serves '{self.front.info.name}'"))
        return web.json_response(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.front.info.name, "object": "model", "created": self.created, "owned_by": "moe-operator",
                "max_model_len": self.front.info.max_context}

    def _check_openai(self, doc: dict[str, Any]) -> None:
        model = doc.get("model")
        if model is not None and model != self.front.info.name:
            raise InferError("not_found", f"the model '{model}' does not exist; this server serves "
                             f"'{self.front.info.name}'")
        if doc.get("n") not in (None, 1):
            raise _invalid("'n' must be 1: one choice per request", "n")
        if doc.get("best_of") not in (None, 1):
            raise _invalid("'best_of' must be 1", "best_of")
        if doc.get("echo") not in (None, False):
            raise _invalid("'echo' is not supported", "echo")
        for key in ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "response_format", "suffix"):
            if doc.get(key) not in (None, False, {}, []) and not (key == "response_format" and doc[key] == {"type": "text"}):
                raise _invalid(f"'{key}' is not supported by this server", key)
        for key in ("presence_penalty", "frequency_penalty"):
            if doc.get(key) not in (None, 0, 0.0):
                raise _invalid(f"'{key}' is not supported by this server (only 0)", key)
        so = doc.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise _invalid("'stream_options' must be an object", "stream_options")

    def _completion_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise _invalid("'prompt' is an empty string", "prompt")
            return self._encode(prompt, special=True)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.front.info.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise _invalid(f"'prompt' holds token id {bad[0]}, outside the vocabulary 0..{vocab - 1}", "prompt")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1:
            raise _invalid("'prompt' holds several prompts; send one per request", "prompt")
        raise _invalid("'prompt' must be a string or a list of token ids", "prompt")

    def _chat_prompt(self, doc: dict[str, Any]) -> list[int]:
        if self.chat_template is None:
            raise _invalid("this model's checkpoint has no chat template (tokenizer_config.json 'chat_template'); "
                           "use /v1/completions with a prompt", "messages")
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _invalid("'messages' must be a non-empty list", "messages")
        flat = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise _invalid(f"'messages[{i}]' must be an object with a 'role'", "messages")
            content = msg.get("content")
            if isinstance(content, list):  # content parts: text only
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise _invalid(f"'messages[{i}].content' may hold only text parts", "messages")
                    texts.append(part["text"])
                content = "".join(texts)
            if content is not None and not isinstance(content, str):
                raise _invalid(f"'messages[{i}].content' must be a string or a list of text parts", "messages")
            flat.append({**msg, "content": content or ""})
        try:
            text = self.chat_template.render(flat, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise _invalid(str(e), "messages") from None
        return self._encode(text, special=False)

    def _encode(self, text: str, special: bool) -> list[int]:
        tok = self.front.tokenizer
        if tok is None:
            raise _invalid("this model has no tokenizer (no tokenizer.json, vocabulary below 256); send token ids",
                           "prompt")
        return tok.encode(text, special=special)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            doc = await _json_body(request)
            self._check_openai(doc)
            prompt = self._chat_prompt(doc) if chat else self._completion_prompt(doc.get("prompt"))
            s = Sampling(doc, "", None if chat else OPENAI_DEFAULT_MAX_TOKENS,
                         ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",))
            req = s.request(self.front, prompt, rid)
            stream = doc.get("stream") or False
            if not isinstance(stream, bool):
                raise _invalid("'stream' must be true or false", "stream")
            deltas = self.front.stream(req, s.stop)
            first, rest = await _first_then_rest(deltas)
        except InferError as e:
            return self._error(e, _openai_error)
        kind = "chat.completion" if chat else "text_completion"
        base = {"id": rid, "created": created, "model": self.front.info.name}
        if not stream:
            got = Collected()
            try:
                async with contextlib.aclosing(rest):
                    d = first
                    while d is not None:
                        got.add(d)
                        d = await _next(rest)
            except InferError as e:
                return self._error(e, _openai_error)
            text = "".join(got.text)
            choice: dict[str, Any] = {"index": 0, "finish_reason": OPENAI_FINISH[got.finish_reason], "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return web.json_response({**base, "object": kind, "choices": [choice],
                                      "usage": _usage(len(prompt), len(got.ids))})
        include_usage = bool((doc.get("stream_options") or {}).get("include_usage"))
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        n_out = 0

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "finish_reason": OPENAI_FINISH[finish] if finish else None, "logprobs": None}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                c["delta"] = delta
            else:
                c["text"] = text or ""
            out = {**base, "object": chunk_kind, "choices": [c]}
            if include_usage:
                out["usage"] = None
            return out

        async with contextlib.aclosing(rest):
            try:
                if chat:
                    await resp.write(_sse(chunk("", None, role=True)))
                d = first
                while d is not None:
                    n_out += len(d.ids)
                    if d.text or d.finish_reason is not None:
                        await resp.write(_sse(chunk(d.text, d.finish_reason)))
                    d = await _next(rest)
                if include_usage:
                    await resp.write(_sse({**base, "object": chunk_kind, "choices": [],
                                           "usage": _usage(len(prompt), n_out)}))
            except InferError as e:
                self.front.count_failure(e)
                await resp.write(_sse({"error": {"message": e.message, "type": OPENAI_TYPE[e.kind], "param": None,
                                                 "code": OIP_STATUS[e.kind] if e.kind != "invalid" else 400}}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _next(it: AsyncIterator[Delta]) -> Delta | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _oip_error(e: InferError) -> web.Response:
    resp = web.json_response({"error": e.message}, status=OIP_STATUS[e.kind])
    if e.kind in ("overloaded", "unavailable"):
        resp.headers["Retry-After"] = RETRY_AFTER_S
    return resp


def _openai_error(e: InferError) -> web.Response:
    status = 400 if e.kind == "invalid" else OIP_STATUS[e.kind]
    resp = web.json_response({"error": {"message": e.message, "type": OPENAI_TYPE[e.kind],
                                        "param": getattr(e, "param", None), "code": status}}, status=status)
    if e.kind in ("overloaded", "unavailable"):
        resp.headers["Retry-After"] = RETRY_AFTER_S
    return resp
