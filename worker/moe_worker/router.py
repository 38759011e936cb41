"""`moe-router` (also `moe-worker route`): the router in front of the EP groups' front ranks (the `NAME-router` pods).

The front rank (rank 0 of a group) holds its clients' connections, so when it dies they die with
it. The router holds them instead: it forwards every HTTP request and gRPC call to a front, and a
request whose front could not answer it (the connection failed or broke before an answer, or the
front said 503 / UNAVAILABLE: not ready, stopping, its group lost a peer) is sent again, to another
group's front or to the same front once it is back, until `MOE_ROUTER_RETRY_S` (30 s) have passed
since the request arrived; then the client gets 503 with `Retry-After` (gRPC UNAVAILABLE). A
request is never sent again once any of its answer has gone to the client. Inference is free of
side effects and a front that loses its connection to the router cancels the sequence, so sending
a request again repeats no work that is still running.

Fronts are named on the command line (`--front HOST`, one per EP group; the ports are the router's
own: MOE_HTTP_PORT, MOE_GRPC_PORT) and resolved at every connection, so a name follows its pod.
A poller asks each front `GET /v2/health/ready` every 0.5 s; requests go to the ready front with
the fewest requests in flight; while none is ready they wait (within the budget). The router's
own health (`/v2/health/live`, `/v2/health/ready`: some front is ready) it answers itself; its
metrics, `/live` and `/ready` (listening) are on MOE_METRICS_PORT. It keeps no state a replica
could lose: a client whose router dies reconnects to another replica behind the Service.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp
import grpc
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("moe.router")

MAX_BODY_BYTES = 64 << 20  # as the front's limit (server.MAX_BODY_BYTES): the router must not refuse what it takes
POLL_S = 0.5
DRAIN_S = 5.0
"""After SIGTERM: seconds answering not-ready while still serving, for the Service to drop the pod."""
KEEPALIVE_S = 5  # idle seconds before probing a connection to a front; then 3 probes 2 s apart
KEEPALIVE_GRPC = (("grpc.keepalive_time_ms", KEEPALIVE_S * 1000), ("grpc.keepalive_timeout_ms", 5000),
                  ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0))
"""Client-side gRPC keepalive towards the fronts (their servers permit pings this often: server.GRPC_SERVER_OPTIONS)."""
RETRY_AFTER_S = 2
# Hop-by-hop headers (RFC 9110 7.6.1) and those the HTTP layers set again themselves.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length"})
# What aiohttp's client would add on its own: the client's own headers (or their absence) go through.
_NO_AUTO = ("Accept-Encoding", "User-Agent", "Content-Type")
# gRPC metadata the channel sets itself.
_GRPC_OWN = frozenset({"user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})


class Unavailable(Exception):
    """The front tried could not answer this request (it may be sent again)."""


@dataclass
class RouterConfig:
    fronts: list[str]
    http_port: int = 8080
    grpc_port: int = 8081
    metrics_port: int = 9400
    host: str = "0.0.0.0"
    retry_s: float = 30.0

    @classmethod
    def parse(cls, argv: list[str] | None, env: Mapping[str, str]) -> RouterConfig:
        p = argparse.ArgumentParser(prog="moe-router", description=__doc__.split("\n")[0])
        p.add_argument("--front", action="append", required=True, help="a front rank's host (one per EP group)")
        a = p.parse_args(argv)

        def num(name: str, default: float, lo: float, hi: float) -> float:
            raw = env.get(name, "")
            try:
                v = float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}={raw!r}: not a number") from None
            if not lo <= v <= hi:
                raise ValueError(f"{name}={raw!r}: must be in [{lo:g}, {hi:g}]")
            return v

        ports = {n: int(num(n, d, 1, 65535)) for n, d in
                 (("MOE_HTTP_PORT", 8080), ("MOE_GRPC_PORT", 8081), ("MOE_METRICS_PORT", 9400))}
        if len(set(ports.values())) != 3:
            raise ValueError(f"MOE_HTTP_PORT, MOE_GRPC_PORT and MOE_METRICS_PORT must differ: {ports}")
        return cls(fronts=a.front, http_port=ports["MOE_HTTP_PORT"], grpc_port=ports["MOE_GRPC_PORT"],
                   metrics_port=ports["MOE_METRICS_PORT"], host=env.get("POD_IP") or "0.0.0.0",
                   retry_s=num("MOE_ROUTER_RETRY_S", 30.0, 0.0, 3600.0))


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moe_router_requests", "Requests the router answered, by protocol and how: 'ok' (the "
                                "front's answer, whatever its status), 'unavailable' (no front could answer within "
                                "the retry budget), 'broken' (the front failed after part of the answer was sent), "
                                "'cancelled' (the client left).", ["protocol", "outcome"], registry=r)
        self.retries = Counter("moe_router_retries", "Requests sent again because a front could not answer them, by "
                               "reason: 'connect' (no connection), 'broken' (the connection failed before an answer), "
                               "'unavailable' (503 / UNAVAILABLE).", ["protocol", "reason"], registry=r)
        self.front_ready = Gauge("moe_router_front_ready", "1 while the front answers ready.", ["front"], registry=r)
        self.in_flight = Gauge("moe_router_in_flight", "Requests being forwarded, per front.", ["front"], registry=r)
        self.seconds = Histogram("moe_router_request_seconds", "From a request's arrival to its last byte forwarded.",
                                 ["protocol"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600))


@dataclass
class Front:
    host: str
    ready: bool = False
    in_flight: int = 0
    channel: grpc.aio.Channel | None = field(default=None, repr=False)


class Fronts:
    """The fronts, their readiness (polled) and a choice of one per attempt."""

    def __init__(self, hosts: Iterable[str], http_port: int, metrics: RouterMetrics):
        self.all = [Front(h) for h in hosts]
        self.http_port = http_port
        self.metrics = metrics
        self._changed = asyncio.Event()

    def url(self, f: Front, path: str) -> str:
        host = f"[{f.host}]" if ":" in f.host else f.host
        return f"http://{host}:{self.http_port}{path}"

    def any_ready(self) -> bool:
        return any(f.ready for f in self.all)

    def mark(self, f: Front, ready: bool) -> None:
        if f.ready != ready:
            log.info("front %s %s", f.host, "ready" if ready else "not ready")
            f.ready = ready
            self.metrics.front_ready.labels(f.host).set(int(ready))
            self._changed.set()
            self._changed = asyncio.Event()

    async def choose(self, deadline: float, avoid: Front | None) -> Front:
        """A ready front, the one with fewest requests in flight (another than `avoid` if one is
        ready); waits for one until `deadline` (monotonic), then raises Unavailable."""
        while True:
            ready = [f for f in self.all if f.ready]
            others = [f for f in ready if f is not avoid] or ready
            if others:
                least = min(f.in_flight for f in others)
                return random.choice([f for f in others if f.in_flight == least])
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable("no front rank is ready")
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """Forever: every POLL_S ask each front whether it is ready."""
        timeout = aiohttp.ClientTimeout(total=1.0)

        async def one(f: Front) -> None:
            try:
                async with session.get(self.url(f, "/v2/health/ready"), timeout=timeout) as r:
                    self.mark(f, r.status == 200)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                self.mark(f, False)

        while True:
            await asyncio.gather(*(one(f) for f in self.all))
            await asyncio.sleep(POLL_S)


def _unavailable_response(message: str) -> web.Response:
    return web.json_response({"error": message}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})


class HttpProxy:
    """Forwards every HTTP request to a front (bodies up to MAX_BODY_BYTES, compressed or not, both
    ways unchanged); answers its own health."""

    def __init__(self, cfg: RouterConfig, fronts: Fronts, metrics: RouterMetrics):
        self.cfg = cfg
        self.fronts = fronts
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get("/v2/health/live", self.live)
        self.app.router.add_get("/v2/health/ready", self.ready)
        self.app.router.add_route("*", "/{tail:.*}", self.forward)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.fronts.any_ready() else 503)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        start = time.monotonic()
        deadline = start + self.cfg.retry_s
        body = await request.read()
        headers = _forward_headers(request.headers, request.remote)
        tried: Front | None = None
        outcome = "unavailable"
        try:
            while True:
                front = await self.fronts.choose(deadline, tried)
                tried = front
                front.in_flight += 1
                self.metrics.in_flight.labels(front.host).inc()
                try:
                    resp = await self._attempt(request, front, body, headers, deadline)
                    if resp is not None:
                        outcome = "ok"
                        return resp
                except Unavailable as e:
                    log.info("%s %s via %s: %s", request.method, request.path, front.host, e)
                finally:
                    front.in_flight -= 1
                    self.metrics.in_flight.labels(front.host).dec()
                if time.monotonic() >= deadline:
                    raise Unavailable("no front rank answered")
        except Unavailable as e:
            return _unavailable_response(f"{e} within {self.cfg.retry_s:g} s; retry later")
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except _Broken:
            outcome = "broken"
            raise
        finally:
            self.metrics.requests.labels("http", outcome).inc()
            self.metrics.seconds.labels("http").observe(time.monotonic() - start)

    async def _attempt(self, request: web.Request, front: Front, body: bytes, headers: CIMultiDict,
                       deadline: float) -> web.StreamResponse | None:
        """One try on `front`: the client's response once the front answered (None when the front
        said 503 and there is time to try again); Unavailable when it could not answer."""
        assert self.session is not None
        url = self.fronts.url(front, request.path_qs)
        try:
            up = await self.session.request(request.method, url, data=body or None, headers=headers,
                                            allow_redirects=False, skip_auto_headers=_NO_AUTO)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
            self.fronts.mark(front, False)
            connect = isinstance(e, aiohttp.ClientConnectorError)
            self.metrics.retries.labels("http", "connect" if connect else "broken").inc()
            raise Unavailable(f"{'no connection' if connect else 'the front failed before answering'}: "
                              f"{type(e).__name__}: {e}") from None
        async with up:
            if up.status == 503 and time.monotonic() < deadline:
                self.fronts.mark(front, False)
                self.metrics.retries.labels("http", "unavailable").inc()
                return None
            try:
                first = await up.content.readany()  # before the client sees anything: still retryable
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                self.fronts.mark(front, False)
                self.metrics.retries.labels("http", "broken").inc()
                raise Unavailable(f"the front failed before answering: {type(e).__name__}: {e}") from None
            resp = web.StreamResponse(status=up.status, reason=up.reason,
                                      headers={k: v for k, v in up.headers.items() if k.lower() not in _HOP})
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            try:
                chunk = first
                while chunk:
                    await resp.write(chunk)
                    chunk = await up.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                self.fronts.mark(front, False)
                log.warning("%s %s via %s: the front failed after part of its answer went out: %s",
                            request.method, request.path, front.host, e)
                raise _Broken() from None
            await resp.write_eof()
            return resp


class _Broken(Exception):
    """The front failed after part of its answer went to the client: the connection is closed."""


def _forward_headers(h: Mapping[str, str], remote: str | None) -> CIMultiDict:
    out = CIMultiDict((k, v) for k, v in h.items() if k.lower() not in _HOP)
    if remote:
        prior = h.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    return out


class GrpcProxy(grpc.GenericRpcHandler):
    """Forwards every gRPC method as raw bytes (any arity: the wire is the same), with the client's
    metadata and deadline. A call is sent again while no response message has gone back."""

    def __init__(self, cfg: RouterConfig, fronts: Fronts, metrics: RouterMetrics):
        self.cfg = cfg
        self.fronts = fronts
        self.metrics = metrics

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        async def behaviour(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async for out in self._forward(method, requests, context):
                yield out

        return grpc.stream_stream_rpc_method_handler(behaviour)

    def channel(self, f: Front) -> grpc.aio.Channel:
        if f.channel is None:
            host = f"[{f.host}]" if ":" in f.host else f.host
            f.channel = grpc.aio.insecure_channel(f"{host}:{self.cfg.grpc_port}", options=[
                ("grpc.max_receive_message_length", MAX_BODY_BYTES), ("grpc.max_send_message_length", MAX_BODY_BYTES),
                # Reconnect soon after a front comes back (the default backoff grows to 2 minutes).
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                # A front whose node vanished (no RST) fails its calls within ~10 s, not TCP's minutes.
                *KEEPALIVE_GRPC])
        return f.channel

    async def _forward(self, method: str, requests: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        start = time.monotonic()
        client_left = context.time_remaining()
        deadline = start + self.cfg.retry_s
        metadata = tuple((k, v) for k, v in (context.invocation_metadata() or ())
                         if not k.startswith(":") and k not in _GRPC_OWN)
        incoming = _Tee(requests)
        tried: Front | None = None
        outcome = "unavailable"
        try:
            while True:
                try:
                    front = await self.fronts.choose(deadline, tried)
                except Unavailable as e:
                    outcome = "unavailable"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{e} within {self.cfg.retry_s:g} s; retry later",
                                        trailing_metadata=(("retry-after", str(RETRY_AFTER_S)),))
                tried = front
                timeout = None if client_left is None else max(0.001, client_left - (time.monotonic() - start))
                call = self.channel(front).stream_stream(method)(incoming.replay(), metadata=metadata, timeout=timeout)
                front.in_flight += 1
                self.metrics.in_flight.labels(front.host).inc()
                answered = False
                try:
                    async for out in call:
                        answered = True
                        incoming.stop_keeping()
                        yield out
                    outcome = "ok"
                    await _pass_status(call, context)
                    return
                except grpc.aio.AioRpcError as e:
                    retry = e.code() == grpc.StatusCode.UNAVAILABLE and not answered and time.monotonic() < deadline
                    if not retry:
                        outcome = ("broken" if answered else "unavailable" if e.code() in (
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else "ok")
                        if e.code() == grpc.StatusCode.UNAVAILABLE:
                            self.fronts.mark(front, False)
                        await context.abort(e.code(), e.details() or "", trailing_metadata=e.trailing_metadata() or ())
                    self.fronts.mark(front, False)
                    self.metrics.retries.labels("grpc", "unavailable").inc()
                    log.info("gRPC %s via %s: %s; trying again", method, front.host, e.details())
                finally:
                    call.cancel()  # a client that left, or an abandoned try: the front frees the sequence
                    front.in_flight -= 1
                    self.metrics.in_flight.labels(front.host).dec()
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            incoming.close()
            self.metrics.requests.labels("grpc", outcome).inc()
            self.metrics.seconds.labels("grpc").observe(time.monotonic() - start)


async def _pass_status(call: grpc.aio.StreamStreamCall, context: grpc.aio.ServicerContext) -> None:
    trailing = await call.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(trailing)


class _Tee:
    """The client's request stream, read by one pump task into a buffer that each try replays
    from the start (so a try that failed and one that follows never read the source at once).
    Once a response has gone back no other try can follow: what the live try has taken is
    dropped."""

    def __init__(self, source: AsyncIterator[bytes]):
        self.source = source
        self.items: list[bytes] = []
        self.offset = 0  # index of items[0] in the stream
        self.done = False
        self.keeping = True
        self._more = asyncio.Event()
        self._pump: asyncio.Task | None = None
        self._live: object | None = None  # the replay of the current try

    def stop_keeping(self) -> None:
        self.keeping = False

    async def _run(self) -> None:
        try:
            async for m in self.source:
                self.items.append(m)
                self._more.set()
        finally:
            self.done = True
            self._more.set()

    async def replay(self) -> AsyncIterator[bytes]:
        """The stream from its start for a new try; the replay of an earlier try stops reading."""
        if self._pump is None:
            self._pump = asyncio.create_task(self._run())
        me = self._live = object()
        i = self.offset
        while self._live is me:
            if i - self.offset < len(self.items):
                m = self.items[i - self.offset]
                i += 1
                if not self.keeping:
                    del self.items[:i - self.offset]
                    self.offset = i
                yield m
                continue
            if self.done:
                return
            self._more.clear()  # no await since the check: nothing came in between
            await self._more.wait()

    def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()


def _keepalive_sockets() -> dict:
    """TCP keepalive (and a user timeout) on connections to fronts, where aiohttp lets us make
    the sockets (3.12+): a front that vanished without closing them fails its requests in ~11 s."""
    import inspect
    import socket

    if "socket_factory" not in inspect.signature(aiohttp.TCPConnector).parameters:
        return {}

    def factory(addr_info):
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", KEEPALIVE_S), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # unacknowledged data: give up after 15 s
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 15000)
        return sock

    return {"socket_factory": factory}


async def run(cfg: RouterConfig, stop: asyncio.Event, bound: asyncio.Future | None = None,
              drain_s: float = DRAIN_S) -> None:
    """Serve until `stop` is set; `bound` gets (http_port, grpc_port, metrics_port) once listening."""
    from .serve import HealthServer

    metrics = RouterMetrics()
    fronts = Fronts(cfg.fronts, cfg.http_port, metrics)
    for f in fronts.all:
        metrics.front_ready.labels(f.host).set(0)
    health = HealthServer(cfg.host, cfg.metrics_port, metrics.registry)
    health.ready_fn = lambda: True
    http = HttpProxy(cfg, fronts, metrics)
    # No connection limit (the fronts bound their queues); names resolved at every connection;
    # bodies passed on as they are (auto_decompress off both ways).
    connector = aiohttp.TCPConnector(limit=0, use_dns_cache=False, **_keepalive_sockets())
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0))
    http.session = session
    runner = web.AppRunner(http.app, access_log=None, auto_decompress=False, handler_cancellation=True,
                           shutdown_timeout=20.0)  # within the pod's 30 s grace, after DRAIN_S
    await runner.setup()
    gserver = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_BODY_BYTES),
                                       ("grpc.max_send_message_length", MAX_BODY_BYTES), ("grpc.so_reuseport", 0)])
    gproxy = GrpcProxy(cfg, fronts, metrics)
    gserver.add_generic_rpc_handlers((gproxy,))
    poller = asyncio.create_task(fronts.poll(session))
    try:
        site = web.TCPSite(runner, cfg.host, cfg.http_port)
        await site.start()
        http_port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - aiohttp keeps the socket here
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        grpc_port = gserver.add_insecure_port(f"{host}:{cfg.grpc_port}")
        await gserver.start()
        log.info("routing HTTP %s:%d and gRPC :%d to %s", cfg.host, http_port, grpc_port, ", ".join(cfg.fronts))
        if bound is not None:
            bound.set_result((http_port, grpc_port, health.httpd.server_address[1]))
        await stop.wait()
        # Say not ready and keep serving a while, so that the Service stops sending new
        # connections here before the listeners close.
        health.ready_fn = lambda: False
        await asyncio.sleep(drain_s)
    finally:
        poller.cancel()
        # Let answers in flight finish (a rolling update of the routers), then close.
        await asyncio.gather(gserver.stop(10.0), runner.cleanup())
        for f in fronts.all:
            if f.channel is not None:
                await f.channel.close()
        await session.close()
        health.close()


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    try:
        cfg = RouterConfig.parse(argv, env)
    except ValueError as e:
        log.error("moe-router: %s", e)
        return 2

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(cfg, stop)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
