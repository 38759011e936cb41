"""A load generator that sends skewed traffic to a KServe v2 endpoint with tritonclient.

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
