"""`moe-worker serve`: the process one rank pod runs (configuration from env).

Every rank serves `/metrics`, `/live` and `/ready` on MOE_METRICS_PORT (the pod's probes). Ready
means the whole EP group is up: a rank is ready once the group's start-up all-reduce saw every
rank, and rank 0 while its engine is ready. Rank 0 also serves KServe v2 over HTTP
(MOE_HTTP_PORT) and gRPC (MOE_GRPC_PORT), behind the API key in MOE_API_KEY_FILE when that is
set (`api_key`). Addresses bind to POD_IP when set.

Exit codes: 0 after a clean shutdown (SIGTERM), 1 when this rank cannot go on: it cannot start,
its group re-formed without it (it was silent too long), or rank 0 is gone. A group that loses a
non-front rank heals in place (`engine`); the operator replaces only the failed pod, which joins.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .api_key import ApiKey
from .engine_api import EngineError
from .metrics import WorkerMetrics

if TYPE_CHECKING:
    from .engine import RankConfig

log = logging.getLogger("moe.serve")


class HealthServer:
    """/metrics, /live and /ready on the metrics port, in a daemon thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry):
        self.ready_fn: Callable[[], bool] = lambda: False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.startswith("/metrics"):
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path.startswith("/live"):
                    body, ctype, code = b"ok\n", "text/plain", 200
                elif self.path.startswith("/ready"):
                    ok = outer.ready_fn()
                    body, ctype, code = (b"ready\n" if ok else b"EP group not ready\n"), "text/plain", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="moe-health", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass(frozen=True)
class ServeConfig:
    """The server's own variables (the engine's are `RankConfig.from_env`'s)."""

    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    request_timeout_s: float
    checkpoint: str | None
    api_key: ApiKey | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServeConfig:
        """POD_IP, MOE_HTTP_PORT, MOE_GRPC_PORT, MOE_METRICS_PORT, MOE_REQUEST_TIMEOUT_S,
        MOE_API_KEY_FILE; ValueError naming the variable when one is out of range, or when the API
        key file cannot be read or holds no usable key."""
        from .engine import env_number
        from .server import DEFAULT_REQUEST_TIMEOUT_S

        def port(name: str, default: int) -> int:
            return env_number(env, name, default, low=1, high=65535, integer=True)

        return cls(host=env.get("POD_IP") or "0.0.0.0", http_port=port("MOE_HTTP_PORT", 8080),
                   grpc_port=port("MOE_GRPC_PORT", 8081), metrics_port=port("MOE_METRICS_PORT", 9400),
                   request_timeout_s=env_number(env, "MOE_REQUEST_TIMEOUT_S", DEFAULT_REQUEST_TIMEOUT_S, low=0.001),
                   checkpoint=env.get("MOE_CHECKPOINT"), api_key=api_key_from_env(env))


def api_key_from_env(env: Mapping[str, str]) -> ApiKey | None:
    """The API key in the file MOE_API_KEY_FILE names; None when it is unset or empty (no key)."""
    path = env.get("MOE_API_KEY_FILE")
    if not path:
        return None
    try:
        return ApiKey(path)
    except ValueError as e:
        raise ValueError(f"env MOE_API_KEY_FILE={path!r}: {e}") from None


def check_env(env: Mapping[str, str]) -> tuple[RankConfig, ServeConfig]:
    """Every variable of a rank pod, read and checked before anything starts (ValueError names the
    first bad one)."""
    from .engine import RankConfig

    return RankConfig.from_env(env), ServeConfig.from_env(env)


def main(env: Mapping[str, str] | None = None) -> int:
    from .engine import run_rank

    env = os.environ if env is None else env
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(rank)s %(levelname)s %(message)s"
                        .replace("%(rank)s", env.get("RANK", "0")))
    try:
        rc, sc = check_env(env)
    except ValueError as e:
        log.error("moe-worker serve: %s", e)
        return 2
    rank, group = rc.rank, rc.group
    host = sc.host
    metrics = WorkerMetrics(rank=rank, group=group)
    health = HealthServer(host, sc.metrics_port, metrics.registry)
    group_ready = metrics.group_ready.labels(**metrics.lbl())
    health.ready_fn = lambda: group_ready._value.get() == 1
    try:
        engine = run_rank(rc, metrics=metrics)
    except (EngineError, ValueError, RuntimeError) as e:
        log.error("rank %d: %s", rank, e)
        health.close()
        return 1
    if engine is None:  # rank > 0: the group was shut down cleanly
        health.close()
        return 0
    health.ready_fn = engine.ready
    try:
        return asyncio.run(_serve_front(engine, metrics, sc))
    finally:
        # Leave alone: the other ranks keep their processes and wait for a new rank 0 (this pod's
        # replacement); when the whole deployment goes, every rank gets its own SIGTERM.
        engine.shutdown(stop_group=False)
        health.close()


async def _serve_front(engine, metrics: WorkerMetrics, sc: ServeConfig) -> int:
    from .server import serve

    server = await serve(engine, engine.info, metrics, sc.host, sc.http_port, sc.grpc_port,
                         checkpoint_dir=sc.checkpoint,
                         request_timeout_s=sc.request_timeout_s, api_key=sc.api_key)
    host = sc.host
    log.info("serving %s: HTTP %s:%d, gRPC %s:%d%s", engine.info.name, host, server.http_port, host, server.grpc_port,
             ", API key required" if sc.api_key is not None else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    was_ready = False
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
        ok = engine.ready()
        if was_ready and not ok and not stop.is_set():
            log.error("the EP group broke; exiting so that the operator replaces the ranks")
            code = 1
            break
        was_ready = was_ready or ok
    await server.stop(5.0)
    return code


if __name__ == "__main__":
    sys.exit(main())
