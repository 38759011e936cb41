"""Decode step time with attention tensor parallelism: TP 1, 2 and 4 in one EP group, same run.

    python bench/attention_tp.py [--world 16] [--tps 1,2,4] [--requests 16] [--new 16] [--heads 16] [--dtype fp8|bf16]

The model: the tiny-ep16 architecture (manifests/) with `--heads` attention heads of v_head_dim 64,
random weights (FP8 by default), so that o_proj splits by head at 128-column blocks as DeepSeek-V3's
does (the reduce-scatter path). Each TP runs the same `--requests` greedy requests, submitted at once, on
`--world` local rank processes over gloo; a warm-up phase runs first.

decode step = per request (duration - time to first token) / (tokens - 1), the mean over requests:
every step decodes one token of every running sequence. Ratios are against TP 1 in the same run,
and "same tokens" compares every answer with TP 1's. With FP8 weights that share can be below 1:
the activations are rounded to e4m3 per 128 channels, so the tiny difference that summing the
heads' partial sums over ranks makes in fp32 now and then moves a value across an e4m3 rounding
boundary (a whole e4m3 step of it), and greedy answers part where the top-2 logit gap is smaller
than what that moves. With `--dtype bf16` (no activation rounding) they should all be equal.

On a 2-core machine 16 rank processes time-share the cores: the figures measure contention and the
collectives' latency on loopback, not what TP does on GPUs (there attention TP cuts each rank's
share of the KV reads and the per-head projections by the TP degree). Say so when you quote them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "worker"))
sys.path.insert(0, str(REPO / "tests" / "worker"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=16)
    ap.add_argument("--tps", default="1,2,4")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dtype", choices=("fp8", "bf16"), default="fp8", help="checkpoint weights")
    a = ap.parse_args()

    from test_ep_engine import ENGINE, plan_doc, tiny_ep16_config

    from moe_worker.checkpoint import make_checkpoint
    from moe_worker.engine_api import GenerationRequest
    from moe_worker.expertmap import write_plan_files
    from moe_worker.launch import Job, Phase, run_local

    tps = [int(x) for x in a.tps.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-tp-"))
    cfg = tiny_ep16_config()
    cfg.update(num_attention_heads=a.heads, num_key_value_heads=a.heads, v_head_dim=64)
    ckpt = make_checkpoint(cfg, tmp / "ckpt", dtype=a.dtype, seed=5)
    plan = write_plan_files(tmp / "plan", plan_doc(a.world, replicas=False, shift=0), 1)

    def reqs(tag: str, n: int) -> list[GenerationRequest]:
        return [GenerationRequest(f"{tag}{i}", tuple((7 * i + j) % 500 for j in range(a.prompt)), max_tokens=a.new)
                for i in range(n)]

    rows = []
    answers: dict[int, list] = {}
    for tp in tps:
        engine = replace(ENGINE, attention_tp=tp, threads=1, overlap="off")
        t0 = time.monotonic()
        res = run_local(ckpt, a.world, Job([Phase(reqs("warm", 2)), Phase(reqs("r", a.requests))]), engine=engine,
                        expert_map=plan, timeout_s=600)
        results = res.phases[1].results
        decoded = [r for r in results if len(r["output_ids"]) > 1]  # (a request may stop at its first token)
        step_s = sum((r["duration_s"] - r["time_to_first_token_s"]) / (len(r["output_ids"]) - 1)
                     for r in decoded) / max(1, len(decoded))
        wall = max(r["duration_s"] for r in results)
        answers[tp] = [r["output_ids"] for r in results]
        rows.append((tp, step_s, a.requests * a.new / wall, time.monotonic() - t0))
        print(f"TP{tp}: decode step {step_s * 1e3:.1f} ms", file=sys.stderr)

    base = rows[0][1]
    print(f"EP{a.world}, {a.heads} heads, {a.dtype} weights, {a.requests} requests x {a.new} new tokens, gloo on CPU "
          f"({'2 cores: contention-bound, see the docstring' if a.world > 2 else ''})")
    print("| attention TP | DP groups | decode step (ms) | step / TP1 | tokens/s | same tokens as TP1 |")
    print("|---|---|---|---|---|---|")
    for tp, step_s, tps_, _ in rows:
        same = sum(x == y for x, y in zip(answers[tp], answers[tps[0]], strict=True)) / a.requests
        print(f"| {tp} | {a.world // tp} | {step_s * 1e3:.1f} | {step_s / base:.2f} | {tps_:.1f} | {same:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
