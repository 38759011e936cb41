"""Load generators for a KServe v2 endpoint with tritonclient: skewed traffic (`run`) and steady
clients for fault drills (`SteadyClients`).

Skew without touching the model: a prompt that repeats one token gives every position the same
hidden state in the first MoE layer, so all its tokens pick the same experts; a handful of such
"hot" prompts concentrates load on a few experts, the rest of the traffic is uniform random
prompts. `--hot-fraction` sets the mix. For tests and demos of load-driven rebalancing.

    python -m moe_operator.localdev.loadgen --url 127.0.0.5:8080 --seconds 30 --clients 8 --hot-fraction 0.8
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Traffic:
    hot_tokens: tuple[int, ...] = (5, 17)
    hot_fraction: float = 0.8
    prompt_len: int = 16
    max_tokens: int = 4
    vocab: int = 512
    seed: int = 0

    def prompts(self, n: int) -> list[list[int]]:
        rng = random.Random(self.seed)
        out = []
        for _ in range(n):
            if rng.random() < self.hot_fraction:
                out.append([rng.choice(self.hot_tokens)] * self.prompt_len)
            else:
                out.append([rng.randrange(self.vocab) for _ in range(self.prompt_len)])
        return out


@dataclass
class Result:
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    answers: dict[tuple[int, ...], set[tuple[int, ...]]] = field(default_factory=dict)
    error_messages: list[str] = field(default_factory=list)


def run(url: str, traffic: Traffic, seconds: float, clients: int, model: str = "moe",
        on_answer: Callable[[list[int], list[int]], None] | None = None) -> Result:
    """Send requests from `clients` threads for `seconds`; collect every distinct answer per prompt."""
    import numpy as np
    import tritonclient.http as httpclient

    res = Result()
    lock = threading.Lock()
    prompts = traffic.prompts(max(64, clients * 8))
    deadline = time.monotonic() + seconds

    def worker(k: int) -> None:
        c = httpclient.InferenceServerClient(url, network_timeout=120.0, connection_timeout=30.0)
        i = k
        while time.monotonic() < deadline:
            p = prompts[i % len(prompts)]
            i += clients
            inp = httpclient.InferInput("input_ids", [len(p)], "INT64")
            inp.set_data_from_numpy(np.array(p, dtype=np.int64), binary_data=True)
            try:
                out = c.infer(model, [inp], parameters={"max_tokens": traffic.max_tokens})
                ids = out.as_numpy("output_ids").tolist()
                with lock:
                    res.requests += 1
                    res.tokens += len(ids)
                    res.answers.setdefault(tuple(p), set()).add(tuple(ids))
                if on_answer:
                    on_answer(p, ids)
            except Exception as e:  # counted, never raised: a load generator reports
                with lock:
                    res.errors += 1
                    res.error_messages.append(str(e)[:200])

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return res


@dataclass(frozen=True)
class Outcome:
    sent: float
    """time.monotonic() when the request was sent."""
    answered: float
    """... and when its answer or error came."""
    prompt: tuple[int, ...]
    output: list[int] | None
    """The answer's output ids; None when the request failed."""
    error: str = ""


class SteadyClients:
    """`clients` threads, each sending `prompts` in turn and waiting for every answer, until
    stopped; every outcome is kept. Steady traffic for fault drills (bench/faults.py,
    tests/test_heal_e2e.py): what failed, and how long nothing was answered."""

    def __init__(self, url: str | Callable[[], list[str]], prompts: list[list[int]], max_tokens: int,
                 clients: int = 3, model: str = "moe", retry_pause_s: float = 0.2):
        """`url`: one host:port, or a function giving the current ones (a Service's ready endpoints):
        client i starts on the i-th and, after a failure, takes the next of those current then, as
        a client of a Service reconnects to another endpoint."""
        self.endpoints = url if callable(url) else lambda: [url]
        self.prompts, self.max_tokens, self.model = prompts, max_tokens, model
        self.retry_pause_s = retry_pause_s
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> SteadyClients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(130)

    def _client(self, i: int) -> None:
        import numpy as np
        import tritonclient.http as httpclient

        def connect(k: int) -> httpclient.InferenceServerClient:
            urls = self.endpoints() or [""]
            return httpclient.InferenceServerClient(urls[k % len(urls)], connection_timeout=120, network_timeout=120)

        http = connect(i)
        n, failures = i, 0
        while not self._stop.is_set():
            prompt = self.prompts[n % len(self.prompts)]
            n += 1
            t0 = time.monotonic()
            try:
                inp = httpclient.InferInput("input_ids", [len(prompt)], "INT64")
                inp.set_data_from_numpy(np.array(prompt, dtype=np.int64))
                res = http.infer(self.model, [inp], parameters={"max_tokens": self.max_tokens})
                out, err = res.as_numpy("output_ids").tolist(), ""
            except Exception as e:  # kept as an outcome; the client goes on after a pause
                out, err = None, f"{type(e).__name__}: {str(e)[:160]}"
                self._stop.wait(self.retry_pause_s)
                failures += 1
                http = connect(i + failures)
            with self._lock:
                self._outcomes.append(Outcome(t0, time.monotonic(), tuple(prompt), out, err))

    def outcomes(self, since: float = float("-inf"), until: float = float("inf")) -> list[Outcome]:
        """Outcomes answered (or failed) between `since` and `until`."""
        with self._lock:
            return [o for o in self._outcomes if since <= o.answered <= until]

    def answered_after(self, t: float) -> int:
        """Requests sent at or after `t` that were answered."""
        with self._lock:
            return sum(1 for o in self._outcomes if o.sent >= t and o.output is not None)

    def longest_outage(self, t_fault: float, until: float) -> float:
        """The longest time without an answer, from the last answer before `t_fault` to `until`."""
        with self._lock:
            done = sorted(o.answered for o in self._outcomes if o.output is not None and o.answered <= until)
        marks = [t for t in done if t < t_fault][-1:] + [t for t in done if t >= t_fault]
        return max((b - a for a, b in zip(marks, marks[1:], strict=False)), default=float("inf"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-loadgen", description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="host:port of the KServe v2 HTTP endpoint")
    ap.add_argument("--model", default="moe")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--hot-fraction", type=float, default=0.8)
    ap.add_argument("--hot-tokens", default="5,17")
    ap.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args(argv)
    t = Traffic(hot_tokens=tuple(int(x) for x in args.hot_tokens.split(",")), hot_fraction=args.hot_fraction,
                max_tokens=args.max_tokens)
    r = run(args.url, t, args.seconds, args.clients, args.model)
    print(f"{r.requests} requests, {r.errors} errors, {r.tokens / args.seconds:.1f} output tokens/s")
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
