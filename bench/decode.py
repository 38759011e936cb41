"""Decode throughput of the engine a pod serves vs Hugging Face transformers, same model, same device, same run.

    python bench/decode.py [--batches 1,16,64] [--new 32] [--prompt 8] [--threads 1] [--dtype fp32|bf16] [--device cpu|cuda]

The model: a random DeepSeek-V3-shaped model (4 layers, 1 dense + 3 MoE, 16 experts, MLA), built
with transformers' own `DeepseekV3ForCausalLM` and saved in its format (as the HF-parity tests do),
so both sides load the same weights (bf16 on disk, computed in `--dtype`).

- transformers: `model.generate(batch of B prompts, max_new_tokens, greedy, KV cache)`.
- ours: the engine `moe-worker serve` runs (`GroupEngine`, one rank), B requests submitted at once
  (continuous batching: one step decodes every running sequence), each greedy for `--new` tokens.

tokens/s = B x new / wall time (prefill of the short prompts included on both sides). Each side is
loaded once per batch size, then timed `--rounds` times in turns (HF, ours, HF, ours, ...), since
the speed of a shared machine drifts by 2x over minutes; a round alternates `--repeat` runs of each
side and takes the best of each (a busy machine only ever slows a run down). The table gives medians, the median of
the per-round ratios ours / transformers and their range, and ours at batch B / ours at batch 1. Then
the step-time breakdown of one more (untimed) run of ours: prefill and decode step means, and in a
decode step the time in attention, in the routed experts and in replayed graph segments. On 2 cores the engine's
own thread and the step loop share the CPU with torch's: threads are pinned to `--threads`.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "worker"))
sys.path.insert(0, str(REPO / "tests" / "worker"))


def build_model(out: Path) -> Path:
    from test_worker_hf_parity import build_hf_model

    return build_hf_model(out, first_k_dense_replace=1)


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


class HF:
    """transformers' model, loaded once; `run()` times one batched greedy `generate`."""

    def __init__(self, path: Path, dtype, batch: int, new: int, length: int, device: str):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)
        self.ids = torch.tensor(prompts(batch, length, self.model.config.vocab_size), device=device)
        self.batch, self.new, self.length = batch, new, length
        with torch.no_grad():
            self.model.generate(self.ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up

    def run(self) -> tuple[float, list[list[int]]]:
        kw = dict(max_new_tokens=self.new, min_new_tokens=self.new, do_sample=False, use_cache=True, pad_token_id=0)
        with self.torch.no_grad():
            t = time.perf_counter()
            out = self.model.generate(self.ids, attention_mask=self.torch.ones_like(self.ids), **kw)
            wall = time.perf_counter() - t
        return self.batch * self.new / wall, out[:, self.length:].tolist()


class Ours:
    """The engine a rank pod serves (one rank), started once; `run()` times B requests at once."""

    def __init__(self, path: Path, dtype: str, batch: int, new: int, length: int, threads: int, device: str,
                 cuda_graphs: str = "auto"):
        from moe_worker.engine import EngineConfig, RankConfig, start_rank
        from moe_worker.engine_api import GenerationRequest

        cfg = EngineConfig(model_name="bench", max_context=length + new + 1, max_new_tokens=new, threads=threads,
                           max_seqs_per_rank=max(batch, 1), dtype=dtype, max_prefill_tokens=max(batch * length, 64),
                           device=device, cuda_graphs=cuda_graphs)
        self.engine = start_rank(RankConfig(0, 1, str(path), engine=cfg)).engine
        ps = prompts(batch, length, self.engine.info.vocab_size)
        self.reqs = [GenerationRequest(f"r{i}", tuple(p), new) for i, p in enumerate(ps)]
        self.engine.run([GenerationRequest("warm", tuple(ps[0]), 2)])

    def run(self) -> tuple[float, list[list[int]], dict]:
        before = dict(self.engine.stats)
        t = time.perf_counter()
        results = self.engine.run(self.reqs, timeout=3600)
        wall = time.perf_counter() - t
        after = self.engine.stats
        stats = {"steps": after["steps"] - before["steps"], "rows": after["rows"] - before["rows"]}
        return sum(len(r.output_ids) for r in results) / wall, [r.output_ids for r in results], stats

    def breakdown(self) -> dict[str, float]:
        """One more run, with timers around each step and, inside decode steps, around attention,
        the routed experts and replays of graphed segments (a GPU is synchronized around each, so
        this run is not one of the timed ones): mean ms per step of each phase and part."""
        import torch

        r = self.engine.runner
        sync = torch.cuda.synchronize if r.device.type == "cuda" else (lambda: None)
        acc: dict[str, float] = collections.defaultdict(float)
        steps: collections.Counter = collections.Counter()
        phase = ["decode"]

        def timed(part, fn):
            def run(*args, **kw):
                sync()
                t = time.perf_counter()
                try:
                    return fn(*args, **kw)
                finally:
                    sync()
                    acc[f"{phase[0]} {part}"] += time.perf_counter() - t
            return run

        def step(plan):
            phase[0] = "prefill" if any(len(w.tokens) > 1 or w.new for ws in plan.work for w in ws) else "decode"
            steps[phase[0]] += 1
            return timed("step", run_step)(plan)

        run_step = r.run_step
        patched = [(r, "run_step", step)]
        for block in r.model.layers:
            patched += [(block.attn, name, timed("attention", getattr(block.attn, name)))
                        for name in ("forward_decode", "forward_packed")]
        patched += [(moe, "routed", timed("routed experts", moe.routed)) for moe in r.model.moe_layers()]
        if r.graphs is not None:
            patched.append((r.graphs, "run", timed("graphed segments", r.graphs.run)))
        saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patched]
        for obj, name, fn in patched:
            setattr(obj, name, fn)
        try:
            self.engine.run(self.reqs, timeout=3600)
        finally:
            for obj, name, old in saved:
                if old is None:
                    delattr(obj, name)
                else:
                    setattr(obj, name, old)
        return {k: v / steps[k.split()[0]] * 1e3 for k, v in acc.items() if steps[k.split()[0]]}

    def close(self) -> None:
        self.engine.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: both sides on the GPU (hack/gpu-check.sh)")
    ap.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                    help="ours: decode steps as CUDA graphs (auto: on CUDA; see engine.graphs)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds of each side, taken in turns")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side per round; a round takes the best")
    a = ap.parse_args()
    import statistics

    import torch

    torch.set_num_threads(a.threads)
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        path = build_model(Path(tmp) / "tiny-deepseek-v3")
        for b in batches:
            hf, ours = HF(path, tdtype, b, a.new, a.prompt, a.device), Ours(path, a.dtype, b, a.new, a.prompt,
                                                                             a.threads, a.device, a.cuda_graphs)
            try:
                runs = []
                for _ in range(a.rounds):  # in turns, so drifts of a shared machine's speed hit both sides
                    pairs = [(hf.run(), ours.run()) for _ in range(a.repeat)]  # (alternating run by run)
                    h, hf_out = max((p[0] for p in pairs), key=lambda r: r[0])
                    o, our_out, stats = max((p[1] for p in pairs), key=lambda r: r[0])
                    runs.append((h, o))
                parts = ours.breakdown()
            finally:
                ours.close()
            hf_tps = statistics.median(h for h, _ in runs)
            our_tps = statistics.median(o for _, o in runs)
            ratio = statistics.median(o / h for h, o in runs)
            same = sum(x == y for x, y in zip(hf_out, our_out, strict=True)) / b
            rows.append((b, hf_tps, our_tps, ratio, same, [o / h for h, o in runs], parts))
            print(f"batch {b}: transformers {hf_tps:.1f} tok/s, ours {our_tps:.1f} tok/s (median ratio {ratio:.2f}x "
                  f"of {a.rounds} runs in turns: {' '.join(f'{o / h:.2f}' for h, o in runs)}), greedy sequences "
                  f"equal {same:.2f}; engine stats {stats}", file=sys.stderr, flush=True)
    base = next((ours for b, _, ours, *_ in rows if b == 1), None)
    print(f"\n{a.device}, {a.dtype}, {a.threads} thread(s), cuda_graphs {a.cuda_graphs}, prompt {a.prompt}, {a.new} new tokens per sequence, greedy, "
          f"medians of {a.rounds} rounds in turns, each the best of {a.repeat} runs per side")
    print(f"{'batch':>5} {'transformers tok/s':>19} {'ours tok/s':>11} {'ours / HF':>10} {'range':>11} "
          f"{'ours / ours@1':>14} {'same tokens':>12}")
    for b, hf_tps, our_tps, ratio, same, each, _ in rows:
        scale = f"{our_tps / base:.2f}" if base else "-"
        spread = f"{min(each):.2f}-{max(each):.2f}"
        print(f"{b:>5} {hf_tps:>19.1f} {our_tps:>11.1f} {ratio:>10.2f} {spread:>11} {scale:>14} {same:>12.2f}")
    print("\nours, step time (one more run, timers around each part): mean ms per step; the decode step's parts "
          "(graphed segments hold attention, which is counted in both where they run eagerly: the CPU)")
    for b, *_, parts in rows:
        dec = parts.get("decode step", 0.0)
        share = ", ".join(f"{k.split(' ', 1)[1]} {v:.2f} ({100 * v / dec:.0f}%)" for k, v in parts.items()
                          if k.startswith("decode ") and k != "decode step" and dec)
        print(f"batch {b:>3}: prefill step {parts.get('prefill step', 0.0):.2f}, decode step {dec:.2f}: {share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
