"""The router (`moe_worker.router`): what it forwards, when it sends a request again, when it gives up.

Most tests put the router in front of small aiohttp / grpc.aio fronts in this process that fail on
purpose (answer 503, close the connection after reading a request, die halfway through an answer);
the last ones put it in front of two real one-rank `moe-worker serve` processes and SIGKILL the one
holding a request: the client gets the same tokens as without the kill. Router and fronts share one
port on different loopback addresses (127.0.0.1 the router, 127.0.0.2 and .3 the fronts), as pods do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from aiohttp import web

from moe_worker.router import RouterConfig, run
from moe_worker.server import GRPC_SERVER_OPTIONS

ROUTER, FRONT_A, FRONT_B = "127.0.0.1", "127.0.0.2", "127.0.0.3"


def free_port() -> int:
    """A port free on the router's and both fronts' addresses."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((ROUTER, 0))
            port = s.getsockname()[1]
        try:
            for host in (FRONT_A, FRONT_B):
                with socket.socket() as t:
                    t.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


class StubFront:
    """An HTTP front on `host`:`port` whose /infer behaves as `mode` says; /v2/health/ready follows `ready`."""

    def __init__(self, host: str, port: int, mode: str = "ok"):
        self.host, self.port, self.mode, self.ready = host, port, mode, True
        self.seen: list[dict] = []
        app = web.Application()
        app.router.add_get("/v2/health/ready", self.health)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, auto_decompress=False)

    async def start(self) -> StubFront:
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"method": request.method, "path": request.path_qs, "body": body,
                          "headers": dict(request.headers)})
        if self.mode == "unavailable":
            return web.json_response({"error": "EP group lost a peer rank"}, status=503)
        if self.mode == "die":  # the process goes away with the request read and no answer sent
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(10)
        if self.mode == "die-midway":
            resp = web.StreamResponse(status=200)
            await resp.prepare(request)
            await resp.write(b"data: first\n\n")
            await asyncio.sleep(0.1)
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(10)
        if self.mode == "bad-request":
            return web.json_response({"error": "input 'x': unknown"}, status=400)
        return web.Response(body=b"answer from " + self.host.encode() + b": " + body,
                            headers={"Content-Encoding": request.headers.get("Content-Encoding", "identity"),
                                     "X-Front": self.host})


@contextlib.asynccontextmanager
async def router(port: int, fronts: list[str], retry_s: float = 5.0, grpc_port: int | None = None):
    cfg = RouterConfig(fronts=fronts, http_port=port, grpc_port=grpc_port or free_port(), metrics_port=0, host=ROUTER,
                       retry_s=retry_s)
    stop = asyncio.Event()
    bound: asyncio.Future = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(cfg, stop, bound, drain_s=0.0))
    await asyncio.wait_for(asyncio.shield(bound), 10)
    try:
        yield cfg, bound.result()
    finally:
        stop.set()
        await task


async def wait_ready(url: str, timeout: float = 5.0) -> None:
    async with aiohttp.ClientSession() as s:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            async with s.get(url + "/v2/health/ready") as r:
                if r.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("router never ready")


def metric(metrics_port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://{ROUTER}:{metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_forwards_requests_and_answers_unchanged():
    async def main():
        port = free_port()
        a = await StubFront(FRONT_A, port).start()
        try:
            async with router(port, [FRONT_A]) as (_, (http_port, _, mport)):
                url = f"http://{ROUTER}:{http_port}"
                await wait_ready(url)
                async with aiohttp.ClientSession(auto_decompress=False) as s:
                    async with s.post(url + "/v2/models/m/infer?x=1", data=b"\x1f\x8bgz",
                                      headers={"Authorization": "Bearer k", "Content-Encoding": "gzip",
                                               "Inference-Header-Content-Length": "3"},
                                      skip_auto_headers=("Accept-Encoding", "User-Agent")) as r:
                        assert r.status == 200
                        assert r.headers["X-Front"] == FRONT_A
                        assert r.headers["Content-Encoding"] == "gzip"
                        assert await r.read() == b"answer from 127.0.0.2: \x1f\x8bgz"
                seen = a.seen[-1]
                assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/v2/models/m/infer?x=1", b"\x1f\x8bgz")
                assert seen["headers"]["Authorization"] == "Bearer k"
                assert seen["headers"]["Inference-Header-Content-Length"] == "3"
                assert seen["headers"]["X-Forwarded-For"] == ROUTER
                assert "Accept-Encoding" not in seen["headers"]  # the router asks for nothing the client did not
                assert metric(mport, "moe_router_requests_total", protocol="http", outcome="ok") == 1
        finally:
            await a.stop()

    asyncio.run(main())


def test_a_client_error_is_answered_once_not_retried():
    async def main():
        port = free_port()
        a, b = await StubFront(FRONT_A, port, "bad-request").start(), await StubFront(FRONT_B, port, "bad-request").start()
        try:
            async with router(port, [FRONT_A, FRONT_B]) as (_, (http_port, _, _)):
                url = f"http://{ROUTER}:{http_port}"
                await wait_ready(url)
                async with aiohttp.ClientSession() as s, s.post(url + "/v2/models/m/infer", data=b"{}") as r:
                    assert r.status == 400
                    assert "unknown" in (await r.json())["error"]
                assert len(a.seen) + len(b.seen) == 1
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["unavailable", "die"])
def test_a_request_the_front_could_not_answer_goes_to_another_front(mode, monkeypatch):
    import moe_worker.router as router_mod

    # Among equally busy fronts the router picks at random; here always the first ready one (A
    # while the poller says it is ready), so that every request tries A first.
    monkeypatch.setattr(router_mod.random, "choice", lambda xs: xs[0])

    async def main():
        port = free_port()
        a, b = await StubFront(FRONT_A, port, mode).start(), await StubFront(FRONT_B, port).start()
        try:
            async with router(port, [FRONT_A, FRONT_B]) as (_, (http_port, _, mport)):
                url = f"http://{ROUTER}:{http_port}"
                await wait_ready(url)
                async with aiohttp.ClientSession() as s:
                    for i in range(6):  # the choice is random among the least busy: A is hit at some point
                        a.ready = True
                        async with s.post(url + "/v2/models/m/infer", data=f"r{i}".encode()) as r:
                            assert r.status == 200, await r.text()
                            assert await r.read() == f"answer from {FRONT_B}: r{i}".encode()
                        await asyncio.sleep(0.6)  # the poller sees A ready again
                assert len(a.seen) >= 1, "front A was never tried"
                assert len(b.seen) == 6
                reason = "unavailable" if mode == "unavailable" else "broken"
                assert metric(mport, "moe_router_retries_total", protocol="http", reason=reason) == len(a.seen)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_without_a_ready_front_the_client_gets_503_with_retry_after():
    async def main():
        port = free_port()
        a = await StubFront(FRONT_A, port, "unavailable").start()
        a.ready = False
        try:
            async with router(port, [FRONT_A, FRONT_B], retry_s=1.0) as (_, (http_port, _, mport)):
                url = f"http://{ROUTER}:{http_port}"
                t = time.monotonic()
                async with aiohttp.ClientSession() as s:
                    async with s.get(url + "/v2/health/ready") as r:
                        assert r.status == 503
                    async with s.post(url + "/v2/models/m/infer", data=b"x") as r:
                        waited = time.monotonic() - t
                        assert r.status == 503
                        assert r.headers["Retry-After"].isdigit()
                        assert "within 1 s" in (await r.json())["error"]
                    async with s.get(url + "/v2/health/live") as r:
                        assert r.status == 200
                assert 0.9 <= waited < 5
                assert metric(mport, "moe_router_requests_total", protocol="http", outcome="unavailable") == 1
        finally:
            await a.stop()

    asyncio.run(main())


def test_a_request_waits_for_a_front_that_comes_back():
    """One group: its front is down when the request comes and back a second later (the
    operator's replacement rank 0); the request is answered, not refused."""
    async def main():
        port = free_port()
        async with router(port, [FRONT_A], retry_s=10.0) as (_, (http_port, _, _)):
            url = f"http://{ROUTER}:{http_port}"

            async def later():
                await asyncio.sleep(1.0)
                return await StubFront(FRONT_A, port).start()

            comeback = asyncio.create_task(later())
            async with aiohttp.ClientSession() as s, s.post(url + "/v2/models/m/infer", data=b"x") as r:
                assert r.status == 200
                assert await r.read() == f"answer from {FRONT_A}: x".encode()
            await (await comeback).stop()

    asyncio.run(main())


def test_an_answer_cut_halfway_is_not_sent_again():
    """Part of a streamed answer went out: the router closes the client's connection (no hang, no
    second copy of the first part)."""
    async def main():
        port = free_port()
        a, b = await StubFront(FRONT_A, port, "die-midway").start(), await StubFront(FRONT_B, port, "die-midway").start()
        try:
            async with router(port, [FRONT_A, FRONT_B]) as (_, (http_port, _, mport)):
                url = f"http://{ROUTER}:{http_port}"
                await wait_ready(url)
                got = b""
                async with aiohttp.ClientSession() as s:
                    with pytest.raises(aiohttp.ClientPayloadError):
                        async with s.post(url + "/v2/models/m/generate_stream", data=b"x",
                                          timeout=aiohttp.ClientTimeout(total=5)) as r:
                            async for chunk in r.content.iter_any():
                                got += chunk
                assert got == b"data: first\n\n"
                assert len(a.seen) + len(b.seen) == 1
                assert metric(mport, "moe_router_requests_total", protocol="http", outcome="broken") == 1
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# gRPC: raw bytes of any method, with metadata; UNAVAILABLE is tried again
# ---------------------------------------------------------------------------------------------


class GrpcStub(grpc.GenericRpcHandler):
    def __init__(self, name: str, mode: str):
        self.name, self.mode, self.calls = name, mode, 0

    def service(self, details):
        async def unary(req: bytes, context) -> bytes:
            self.calls += 1
            if self.mode == "unavailable":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "EP group not ready")
            if self.mode == "invalid":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input")
            md = dict(context.invocation_metadata())
            return f"{self.name} {details.method} {md.get('authorization')} ".encode() + req

        return grpc.unary_unary_rpc_method_handler(unary)


async def grpc_front(host: str, port: int, name: str, mode: str) -> tuple[grpc.aio.Server, GrpcStub]:
    stub = GrpcStub(name, mode)
    server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)  # as the front's: the router's keepalive pings
    server.add_generic_rpc_handlers((stub,))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, stub


@pytest.mark.parametrize("mode", ["unavailable", "invalid"])
def test_grpc_calls_are_forwarded_and_unavailable_ones_tried_again(mode, monkeypatch):
    import moe_worker.router as router_mod

    monkeypatch.setattr(router_mod.random, "choice", lambda xs: xs[0])  # A first while it is ready

    async def main():
        port = free_port()
        ha, hb = await StubFront(FRONT_A, port).start(), await StubFront(FRONT_B, port).start()  # health
        cfg_port = free_port()
        ga, sa = await grpc_front(FRONT_A, cfg_port, "A", mode)
        gb, sb = await grpc_front(FRONT_B, cfg_port, "B", "ok")
        try:
            async with router(port, [FRONT_A, FRONT_B], grpc_port=cfg_port) as (_, (_, gport, _)):
                await wait_ready(f"http://{ROUTER}:{port}")
                async with grpc.aio.insecure_channel(f"{ROUTER}:{gport}") as ch:
                    call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                    answers, errors = [], []
                    for i in range(6):
                        try:
                            answers.append(await call(f"q{i}".encode(), metadata=(("authorization", "Bearer k"),),
                                                      timeout=10))
                        except grpc.aio.AioRpcError as e:
                            errors.append(e)
                        await asyncio.sleep(0.6)
            assert sa.calls, "front A was never tried"
            if mode == "unavailable":
                assert not errors
                assert answers == [f"B /inference.GRPCInferenceService/ModelInfer Bearer k q{i}".encode()
                                   for i in range(6)]
            else:  # the front's own answer, once
                assert len(errors) == sa.calls
                assert all(e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details() == "bad input" for e in errors)
                assert len(answers) == sb.calls == 6 - sa.calls
        finally:
            for s in (ga, gb):
                await s.stop(0)
            await ha.stop()
            await hb.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Real fronts: two one-rank groups, the busy front SIGKILLed mid-request
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_fronts(tmp_path_factory):
    from test_server import tiny_ep16_config

    from moe_worker.checkpoint import make_checkpoint

    ckpt = make_checkpoint(tiny_ep16_config(), tmp_path_factory.mktemp("router") / "tiny", dtype="bf16", seed=0)
    port, gport, mport = free_port(), free_port(), free_port()

    dist = {FRONT_A: free_port(), FRONT_B: free_port()}

    def start(host: str) -> subprocess.Popen:
        dist_port = dist[host]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": host, "MASTER_PORT": str(dist_port),
               "POD_IP": host, "MOE_CHECKPOINT": str(ckpt), "MOE_MODEL_NAME": "moe", "MOE_HTTP_PORT": str(port),
               "MOE_GRPC_PORT": str(gport), "MOE_METRICS_PORT": str(mport), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "-m", "moe_worker.cli", "serve"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs = {FRONT_A: start(FRONT_A), FRONT_B: start(FRONT_B)}
    renv = {**os.environ, "MOE_HTTP_PORT": str(port), "MOE_GRPC_PORT": str(gport), "MOE_METRICS_PORT": str(free_port()),
            "POD_IP": ROUTER}
    router_proc = subprocess.Popen([sys.executable, "-m", "moe_worker.cli", "route", "--front", FRONT_A, "--front",
                                    FRONT_B], env=renv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 120
        while True:
            try:
                if all(urllib.request.urlopen(f"http://{h}:{port}/v2/health/ready", timeout=2).status == 200
                       for h in (FRONT_A, FRONT_B, ROUTER)):
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < end, "fronts or router not ready"
            time.sleep(0.5)
        yield {"port": port, "gport": gport, "procs": procs, "start": start,
               "router_metrics": int(renv["MOE_METRICS_PORT"])}
    finally:
        for p in (*procs.values(), router_proc):
            p.kill()
            p.wait()


PROMPT = [1, 2, 3]
LONG = 200  # tokens: long enough to be mid-generation when the front is killed


def _http_infer(host: str, port: int, max_tokens: int) -> list[int]:
    body = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [len(PROMPT)], "data": PROMPT}],
                       "parameters": {"max_tokens": max_tokens}}).encode()
    r = urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/v2/models/moe/infer", data=body),
                               timeout=120)
    return json.loads(r.read())["outputs"][0]["data"]


def _grpc_infer(host: str, port: int, max_tokens: int) -> list[int]:
    c = tg.InferenceServerClient(f"{host}:{port}")
    i = tg.InferInput("input_ids", [len(PROMPT)], "INT64")
    i.set_data_from_numpy(np.array(PROMPT, dtype=np.int64))
    return c.infer("moe", [i], parameters={"max_tokens": max_tokens}, client_timeout=120).as_numpy("output_ids").tolist()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sigkill_of_the_front_holding_a_request_loses_nothing(two_fronts, protocol):
    """The front that holds the request is SIGKILLed mid-generation: the router sends it to the
    other group's front and the client gets exactly the tokens it would have got."""
    port = two_fronts["port"] if protocol == "http" else two_fronts["gport"]
    infer = _http_infer if protocol == "http" else _grpc_infer
    alive = [h for h, p in two_fronts["procs"].items() if p.poll() is None]
    want = infer(alive[0], port, LONG)  # straight from a front: the answer without a fault
    result: dict = {}

    def client():
        try:
            result["tokens"] = infer(ROUTER, port, LONG)
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=client)
    t.start()
    mport = two_fronts["router_metrics"]
    end = time.monotonic() + 30
    busy: list[str] = []
    while not busy and time.monotonic() < end:
        text = urllib.request.urlopen(f"http://{ROUTER}:{mport}/metrics", timeout=5).read().decode()
        busy = [h for h, v in re.findall(r'moe_router_in_flight\{front="([^"]+)"\} (\S+)', text) if float(v) > 0]
        time.sleep(0.05)
    assert busy, "the request never reached a front"
    time.sleep(0.5)  # mid-generation
    victim = two_fronts["procs"][busy[0]]
    os.kill(victim.pid, signal.SIGKILL)
    t.join(120)
    assert "error" not in result, result.get("error")
    assert result["tokens"] == want
    # Bring the victim's group back for the next protocol: same address, as the operator's replacement.
    survivors = [h for h in two_fronts["procs"] if h != busy[0]]
    assert survivors and two_fronts["procs"][survivors[0]].poll() is None
    victim.wait()
    two_fronts["procs"][busy[0]] = two_fronts["start"](busy[0])
    end = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"http://{busy[0]}:{two_fronts['port']}/v2/health/ready", timeout=2).status == 200:
                break
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < end
        time.sleep(0.5)


class StreamStub(grpc.GenericRpcHandler):
    """A bidirectional stream: `fail` aborts UNAVAILABLE after reading the first message (a front
    that dies before answering), else every message is echoed back as it comes."""

    def __init__(self, name: str, fail: bool):
        self.name, self.fail, self.seen = name, fail, []

    def service(self, details):
        async def echo(requests, context):
            async for m in requests:
                self.seen.append(m)
                if self.fail:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "front lost")
                yield self.name.encode() + b":" + m

        return grpc.stream_stream_rpc_method_handler(echo)


def test_a_grpc_stream_tried_again_gets_the_messages_sent_after_the_failure(monkeypatch):
    """A client keeps its stream open: it sends m1, the first front fails before answering, the
    router tries the other front, then the client sends m2. The second front gets m1 and m2 (the
    failed try must not keep reading the client's stream) and the client both answers."""
    import moe_worker.router as router_mod

    monkeypatch.setattr(router_mod.random, "choice", lambda xs: xs[0])

    async def main():
        port, gport = free_port(), free_port()
        ha, hb = await StubFront(FRONT_A, port).start(), await StubFront(FRONT_B, port).start()
        servers = []
        stubs = {}
        for host, name, fail in ((FRONT_A, "A", True), (FRONT_B, "B", False)):
            stubs[name] = StreamStub(name, fail)
            srv = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
            srv.add_generic_rpc_handlers((stubs[name],))
            srv.add_insecure_port(f"{host}:{gport}")
            await srv.start()
            servers.append(srv)
        try:
            async with router(port, [FRONT_A, FRONT_B], retry_s=30.0, grpc_port=gport) as (_, (_, rport, _)):
                await wait_ready(f"http://{ROUTER}:{port}")
                async with grpc.aio.insecure_channel(f"{ROUTER}:{rport}") as ch:
                    call = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(timeout=20)
                    await call.write(b"m1")
                    first = await call.read()
                    await call.write(b"m2")
                    await call.done_writing()
                    second = await call.read()
            assert (first, second) == (b"B:m1", b"B:m2")
            assert stubs["A"].seen == [b"m1"] and stubs["B"].seen == [b"m1", b"m2"]
        finally:
            for srv in servers:
                await srv.stop(0)
            await ha.stop()
            await hb.stop()

    asyncio.run(main())
