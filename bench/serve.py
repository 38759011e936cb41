"""KServe v2 serving overhead and streaming: N concurrent tritonclient clients vs the same generation done directly.

Baseline ("direct"): a process with the engine (`GroupEngine`, one rank) and N asyncio tasks calling
`engine.generate` back to back. Then, for each protocol (tritonclient HTTP with JSON tensors, HTTP
with binary tensors, gRPC), N client threads in this process send the same requests to a server
process (`moe_worker.server.serve` over the same kind of engine). Every request is greedy with a
fixed prompt length and `--max-tokens`, so each mode does the same work per request. The modes take
turns in `--rounds` rounds of `--duration / --rounds` seconds each, so drift on a shared machine
hits all of them alike. `grpc-stream` sends the same requests over ModelStreamInfer (one response
per token): its TTFT is the first token's response, where the non-streamed modes' TTFT is the whole
answer (their first token arrives with it). With `--perf-analyzer`, Triton's perf_analyzer (`make
perf-analyzer` installs it outside the repo) then runs a concurrency sweep 1..16 against the server
over HTTP, gRPC and gRPC streaming and the run fails on any error it reports.

Columns: output tokens/s, request latency p50/p99, time to first token p50/p99, `batch` = mean sequences per engine forward
(the engine admits the requests waiting at a step boundary and decodes every running sequence in
each step, so how clients' requests line up in time matters as much as the protocol), `same` = fraction of
responses whose tokens equal a batch-1 generation of the same prompt (batching rounds logits
differently; with FP8 activation quantization a close greedy choice can flip), and the ratios
server / direct.

    PYTHONPATH=worker python bench/serve.py [--clients 4] [--duration 12] [--rounds 3] [--dtype fp8|bf16]
        [--checkpoint DIR] [--url HOST:PORT --grpc-url HOST:PORT --model NAME]

Without --checkpoint a random checkpoint of manifests/tiny-ep16.yaml's architecture is written to
a temporary directory. With --url (and --grpc-url) the clients target that server instead of
starting one; the baseline then needs --checkpoint of the same model, or is skipped. Exit status 1
when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = ("http-json", "http-binary", "grpc", "grpc-stream")


def tiny_ep16_config() -> dict:
    import yaml

    from moe_operator import api

    dep = api.parse_deployment(yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text()))
    return dep.spec.model.architecture.hf_config()


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


class Tally:
    """One mode's results, summed over rounds."""

    def __init__(self, mode: str):
        self.mode = mode
        self.lat: list[float] = []
        self.ttft: list[float] = []
        self.tokens = 0
        self.errors = 0
        self.elapsed = 0.0
        self.same: list[bool] = []
        self.steps = 0
        self.rows = 0

    def add(self, seg: dict) -> None:
        self.lat += seg["lat"]
        self.ttft += seg.get("ttft", seg["lat"])
        self.tokens += seg["tokens"]
        self.errors += seg["errors"]
        self.elapsed += seg["elapsed"]
        self.same += seg["same"]

    def row(self) -> dict:
        def pct(xs: list[float], q: float) -> float:
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else float("nan")

        return {"mode": self.mode, "requests": len(self.lat), "errors": self.errors,
                "tok_s": self.tokens / self.elapsed if self.elapsed else 0.0, "p50_ms": pct(self.lat, 0.50),
                "p99_ms": pct(self.lat, 0.99), "ttft50_ms": pct(self.ttft, 0.50), "ttft99_ms": pct(self.ttft, 0.99), "same": sum(self.same) / len(self.same) if self.same else None,
                "batch": self.rows / self.steps if self.steps else None}


# ---------------------------------------------------------------------------------------------
# Child processes (engine owners): commands on stdin, one JSON line per answer on stdout
# ---------------------------------------------------------------------------------------------


def _engine(a):
    import torch

    from moe_worker.engine import EngineConfig, RankConfig, start_rank

    torch.set_num_threads(a.threads)
    cfg = EngineConfig(model_name=a.model, max_context=a.prompt_len + a.max_tokens + 1, max_new_tokens=a.max_tokens,
                       threads=a.threads)
    return start_rank(RankConfig(0, 1, str(a.checkpoint), engine=cfg)).engine


async def _commands(handle) -> None:
    """Answer 'stats' / 'run SECONDS' / 'quit' lines from the parent."""
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "quit":
            return
        print(json.dumps(await handle(line)), flush=True)


def child_server(a) -> int:
    from moe_worker.metrics import WorkerMetrics
    from moe_worker.server import serve

    engine = _engine(a)

    async def main():
        server = await serve(engine, engine.info, WorkerMetrics(), "127.0.0.1", 0, 0, checkpoint_dir=a.checkpoint)
        print(json.dumps({"http": server.http_url, "grpc": server.grpc_url}), flush=True)

        async def handle(cmd):
            return dict(engine.stats)

        await _commands(handle)
        await server.stop(grace=2.0)

    asyncio.run(main())
    engine.shutdown()
    return 0


def child_direct(a) -> int:
    from moe_worker.engine_api import GenerationRequest

    engine = _engine(a)
    ps = prompts(a.num_prompts, a.prompt_len, engine.info.vocab_size)

    async def segment(seconds: float, ref) -> dict:
        seg = {"lat": [], "tokens": 0, "errors": 0, "same": []}
        deadline = time.perf_counter() + seconds

        async def client(c: int):
            k = c
            while time.perf_counter() < deadline:
                i = k % len(ps)
                t = time.perf_counter()
                try:
                    r = await engine.generate(GenerationRequest(f"c{c}-{k}", tuple(ps[i]), a.max_tokens))
                except Exception:
                    seg["errors"] += 1
                    continue
                seg["lat"].append(time.perf_counter() - t)
                seg["tokens"] += len(r.output_ids)
                seg["same"].append(r.output_ids == ref[i])
                k += a.clients

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(a.clients)))
        seg["elapsed"] = time.perf_counter() - start
        return seg

    async def main():
        ref = []
        for i, p in enumerate(ps):  # batch-1 reference tokens, one prompt at a time (also the warm-up)
            ref.append((await engine.generate(GenerationRequest(f"ref{i}", tuple(p), a.max_tokens))).output_ids)
        print(json.dumps({"ref": ref}), flush=True)

        async def handle(cmd):
            if cmd[0] == "run":
                return await segment(float(cmd[1]), ref)
            return dict(engine.stats)

        await _commands(handle)

    asyncio.run(main())
    engine.shutdown()
    return 0


class Child:
    def __init__(self, a, role: str):
        args = [sys.executable, __file__, "--role", role, "--checkpoint", str(a.checkpoint), "--model", a.model,
                "--clients", str(a.clients), "--prompt-len", str(a.prompt_len), "--max-tokens", str(a.max_tokens),
                "--threads", str(a.threads), "--num-prompts", str(a.num_prompts)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "worker"), env.get("PYTHONPATH")]))
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self.read()

    def read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.p.args[3]} exited with status {self.p.wait()}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
        except OSError:
            pass
        self.p.wait(30)


# ---------------------------------------------------------------------------------------------
# tritonclient clients (threads of this process)
# ---------------------------------------------------------------------------------------------


def client_segment(mode: str, a, url: str, ps: list[list[int]], ref: list[list[int]] | None, seconds: float) -> dict:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    seg = {"lat": [], "ttft": [], "tokens": 0, "errors": 0, "same": []}
    lock = threading.Lock()
    errors_seen: list[str] = []
    params = {"max_tokens": a.max_tokens}
    first_token: dict[int, float] = {}  # worker -> time of the current request's first token

    def one(client, i: int, c: int) -> list[int]:
        arr = np.asarray([ps[i]], dtype=np.int64)
        if mode == "grpc-stream":
            import queue

            got: queue.Queue = queue.Queue()
            client._moe_sink = got  # the stream's callback (started below) feeds this worker's queue
            inp = tg.InferInput("input_ids", list(arr.shape), "INT64")
            inp.set_data_from_numpy(arr)
            client.async_stream_infer(a.model, [inp], parameters=params)
            out: list[int] = []
            while True:
                result, error = got.get(timeout=600)
                if error is not None:
                    raise RuntimeError(str(error))
                if not out:
                    first_token[c] = time.perf_counter()
                out += [int(t) for t in result.as_numpy("output_ids").reshape(-1)]
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return out
        if mode == "grpc":
            inp = tg.InferInput("input_ids", list(arr.shape), "INT64")
            inp.set_data_from_numpy(arr)
            r = client.infer(a.model, [inp], parameters=params)
        else:
            binary = mode == "http-binary"
            inp = th.InferInput("input_ids", list(arr.shape), "INT64")
            inp.set_data_from_numpy(arr, binary_data=binary)
            outs = [th.InferRequestedOutput("output_ids", binary_data=binary)]
            r = client.infer(a.model, [inp], outputs=outs, parameters=params)
        return [int(t) for t in r.as_numpy("output_ids").reshape(-1)]

    clients = [tg.InferenceServerClient(url) if mode.startswith("grpc") else th.InferenceServerClient(url)
               for _ in range(a.clients)]
    if mode == "grpc-stream":
        for cl in clients:
            cl.start_stream(callback=lambda result, error, cl=cl: cl._moe_sink.put((result, error)))
    start = time.perf_counter()
    deadline = start + seconds

    def worker(c: int):
        k = c
        while time.perf_counter() < deadline:
            i = k % len(ps)
            t = time.perf_counter()
            try:
                out = one(clients[c], i, c)
            except Exception as e:
                with lock:
                    seg["errors"] += 1
                    errors_seen.append(str(e)[:200])
                continue
            dt = time.perf_counter() - t
            with lock:
                seg["lat"].append(dt)
                seg["ttft"].append(first_token.pop(c, t + dt) - t)
                seg["tokens"] += len(out)
                if ref is not None:
                    seg["same"].append(out == ref[i])
            k += a.clients

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seg["elapsed"] = time.perf_counter() - start
    for c in clients:
        if mode == "grpc-stream":
            c.stop_stream()
        c.close()
    if errors_seen:
        print(f"{mode}: {len(errors_seen)} errors, first: {errors_seen[0]}", file=sys.stderr)
    return seg


PERF_ANALYZER = Path.home() / ".cache" / "moe-operator" / "bin" / "perf_analyzer"


def perf_analyzer_sweeps(a, http_url: str, grpc_url: str, ps: list[list[int]], work: Path) -> list[dict]:
    """perf_analyzer's concurrency sweep over HTTP, gRPC and gRPC streaming: one row per
    (protocol, concurrency) from its CSV; a sweep that reports an error fails the run."""
    import csv

    data = work / "ids.json"
    data.write_text(json.dumps({"data": [{"input_ids": {"content": p, "shape": [len(p)]}} for p in ps]}))
    sweeps = {"http": ["-u", http_url], "grpc": ["-i", "grpc", "-u", grpc_url,
                                                 "--request-parameter", f"max_tokens:{a.max_tokens}:int"],
              "grpc-streaming": ["-i", "grpc", "-u", grpc_url, "--streaming",
                                 "--request-parameter", f"max_tokens:{a.max_tokens}:int"]}
    rows = []
    for name, args in sweeps.items():
        out = work / f"{name}.csv"
        cmd = [str(PERF_ANALYZER), "-m", a.model, *args, "--input-data", str(data), "--concurrency-range",
               a.pa_concurrency, "--stability-percentage", str(a.pa_stability), "-f", str(out)]
        print("$", " ".join(cmd), file=sys.stderr)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0 or not out.exists():
            tail = (p.stdout + p.stderr).strip().splitlines()[-5:]
            rows.append({"protocol": name, "concurrency": "-", "error": " / ".join(tail) or f"exit {p.returncode}"})
            continue
        with out.open() as f:
            for r in csv.DictReader(f):
                rows.append({"protocol": name, "concurrency": r["Concurrency"], "infer_s": float(r["Inferences/Second"]),
                             "p50_ms": float(r["p50 latency"]) / 1e3, "p99_ms": float(r["p99 latency"]) / 1e3,
                             "error": ""})
    return rows


def print_perf_analyzer(rows: list[dict], a) -> None:
    print(f"\nperf_analyzer (concurrency {a.pa_concurrency}, {a.max_tokens} output tokens per request; HTTP gets the "
          f"server's default max_tokens 16: perf_analyzer sends request parameters over gRPC only)")
    print(f"{'protocol':<15} {'concurrency':>11} {'infer/s':>8} {'p50 ms':>8} {'p99 ms':>8}  error")
    for r in rows:
        if r["error"]:
            print(f"{r['protocol']:<15} {'-':>11} {'-':>8} {'-':>8} {'-':>8}  {r['error']}")
        else:
            print(f"{r['protocol']:<15} {r['concurrency']:>11} {r['infer_s']:>8.1f} {r['p50_ms']:>8.1f} "
                  f"{r['p99_ms']:>8.1f}")


def print_table(rows: list[dict], base: dict | None, a) -> None:
    print(f"\n{a.clients} clients, {a.rounds} rounds x {a.duration / a.rounds:g} s per mode, prompt {a.prompt_len} "
          f"tokens, {a.max_tokens} output tokens per request, greedy; model {a.model}")
    hdr = (f"{'mode':<12} {'requests':>8} {'errors':>6} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'TTFT p50':>8} "
           f"{'TTFT p99':>8} {'batch':>5} "
           f"{'same':>5} {'tok/s x':>8} {'p50 x':>6} {'p99 x':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        same = "-" if r["same"] is None else f"{r['same']:.2f}"
        batch = "-" if r["batch"] is None else f"{r['batch']:.2f}"
        if base is None:
            ratios = f"{'-':>8} {'-':>6} {'-':>6}"
        else:
            ratios = (f"{r['tok_s'] / base['tok_s']:>8.2f} {r['p50_ms'] / base['p50_ms']:>6.2f} "
                      f"{r['p99_ms'] / base['p99_ms']:>6.2f}")
        print(f"{r['mode']:<12} {r['requests']:>8} {r['errors']:>6} {r['tok_s']:>8.1f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['ttft50_ms']:>8.1f} {r['ttft99_ms']:>8.1f} {batch:>5} {same:>5} {ratios}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=12.0, help="seconds per mode, over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each engine process")
    ap.add_argument("--dtype", choices=("fp8", "bf16"), default="fp8", help="weights of the random checkpoint")
    ap.add_argument("--checkpoint", help="checkpoint directory (default: a random tiny-ep16 one)")
    ap.add_argument("--model", default="tiny-ep16")
    ap.add_argument("--url", help="HTTP host:port of a running server (default: start one)")
    ap.add_argument("--grpc-url", help="gRPC host:port of a running server")
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    ap.add_argument("--perf-analyzer", action="store_true", help="also run perf_analyzer's sweeps (make perf-analyzer)")
    ap.add_argument("--pa-concurrency", default="1:16:5", help="perf_analyzer --concurrency-range start:end:step")
    ap.add_argument("--pa-stability", type=int, default=30, help="perf_analyzer --stability-percentage (a shared "
                    "2-core machine needs a loose one)")
    ap.add_argument("--role", choices=("bench", "server", "direct"), default="bench", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "server":
        return child_server(a)
    if a.role == "direct":
        return child_direct(a)

    modes = [m for m in a.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    tmp = None
    if a.checkpoint is None and a.url is None:
        sys.path.insert(0, str(REPO / "worker"))
        from moe_worker.checkpoint import make_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        a.checkpoint = str(make_checkpoint(tiny_ep16_config(), Path(tmp.name) / a.model, dtype=a.dtype, seed=0))
        print(f"random {a.dtype} tiny-ep16 checkpoint in {a.checkpoint}", file=sys.stderr)

    if a.perf_analyzer and not PERF_ANALYZER.exists():
        ap.error(f"--perf-analyzer: {PERF_ANALYZER} is missing; run `make perf-analyzer`")
    children: list[Child] = []
    pa_rows: list[dict] = []
    try:
        direct = ref = None
        if a.checkpoint is not None:
            direct = Child(a, "direct")
            children.append(direct)
            ref = direct.hello["ref"]
        else:
            print("no --checkpoint: the direct baseline is skipped", file=sys.stderr)
        server = None
        if a.url is None:
            server = Child(a, "server")
            children.append(server)
            urls = {"http-json": server.hello["http"], "http-binary": server.hello["http"], "grpc": server.hello["grpc"],
                    "grpc-stream": server.hello["grpc"]}
        else:
            urls = {"http-json": a.url, "http-binary": a.url, "grpc": a.grpc_url, "grpc-stream": a.grpc_url}
        # The direct child's prompts; without a checkpoint, ids < 256 fit any model this serves.
        vocab = json.loads((Path(a.checkpoint) / "config.json").read_text())["vocab_size"] if a.checkpoint else 256
        ps = prompts(a.num_prompts, a.prompt_len, vocab)

        tallies = {m: Tally(m) for m in (["direct"] if direct else []) + [m for m in modes if urls[m]]}
        seconds = a.duration / a.rounds
        for _ in range(a.rounds):
            for mode, tally in tallies.items():
                owner = direct if mode == "direct" else server
                before = owner.ask("stats") if owner else None
                if mode == "direct":
                    tally.add(direct.ask(f"run {seconds}"))
                else:
                    tally.add(client_segment(mode, a, urls[mode], ps, ref, seconds))
                if owner:
                    after = owner.ask("stats")
                    tally.steps += after["steps"] - before["steps"]
                    tally.rows += after["rows"] - before["rows"]
        if a.perf_analyzer:
            with tempfile.TemporaryDirectory(prefix="bench-serve-pa-") as work:
                pa_rows = perf_analyzer_sweeps(a, urls["http-json"], urls["grpc"], ps, Path(work))
    finally:
        for c in children:
            c.close()
        if tmp is not None:
            tmp.cleanup()
    rows = [t.row() for t in tallies.values()]
    print_table(rows, rows[0] if direct else None, a)
    if a.perf_analyzer:
        print_perf_analyzer(pa_rows, a)
    return 1 if any(r["errors"] for r in rows) or any(r["error"] for r in pa_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
