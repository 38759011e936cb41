"""Decode throughput of the engine a pod serves vs Hugging Face transformers, same model, same device, same run.

    python bench/decode.py [--batches 1,16,64] [--new 32] [--prompt 8] [--threads 1] [--dtype fp32|bf16] [--device cpu|cuda]

The model: a random DeepSeek-V3-shaped model (4 layers, 1 dense + 3 MoE, 16 experts, MLA), built
with transformers' own `DeepseekV3ForCausalLM` and saved in its format (as the HF-parity tests do),
so both sides load the same weights (bf16 on disk, computed in `--dtype`).

- transformers: `model.generate(batch of B prompts, max_new_tokens, greedy, KV cache)`.
- ours: the engine `moe-worker serve` runs (`GroupEngine`, one rank), B requests submitted at once
  (continuous batching: one step decodes every running sequence), each greedy for `--new` tokens.

tokens/s = B x new / wall time (prefill of the short prompts included on both sides); ratios
ours / transformers per batch size, and ours at batch B / ours at batch 1. The engine's step-time
breakdown (prefill vs decode step means) comes from its forward stats. On 2 cores the engine's
own thread and the step loop share the CPU with torch's: threads are pinned to `--threads`.
"""

from __future__ import annotations

import argparse
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


def hf_tokens_per_s(path: Path, dtype, batch: int, new: int, length: int,
                    device: str = "cpu") -> tuple[float, list[list[int]]]:
    import torch
    import transformers

    model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)
    ids = torch.tensor(prompts(batch, length, model.config.vocab_size), device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        wall = time.perf_counter() - t
    return batch * new / wall, out[:, length:].tolist()


def ours_tokens_per_s(path: Path, dtype: str, batch: int, new: int, length: int, threads: int,
                      device: str = "cpu") -> tuple[float, list, dict]:
    from moe_worker.engine import EngineConfig, RankConfig, start_rank
    from moe_worker.engine_api import GenerationRequest

    cfg = EngineConfig(model_name="bench", max_context=length + new + 1, max_new_tokens=new, threads=threads,
                       max_seqs_per_rank=max(batch, 1), dtype=dtype, max_prefill_tokens=max(batch * length, 64),
                       device=device)
    engine = start_rank(RankConfig(0, 1, str(path), engine=cfg)).engine
    try:
        ps = prompts(batch, length, engine.info.vocab_size)
        engine.run([GenerationRequest("warm", tuple(ps[0]), 2)])
        before = dict(engine.stats)
        t = time.perf_counter()
        results = engine.run([GenerationRequest(f"r{i}", tuple(p), new) for i, p in enumerate(ps)], timeout=3600)
        wall = time.perf_counter() - t
        after = dict(engine.stats)
        stats = {"steps": after["steps"] - before["steps"], "rows": after["rows"] - before["rows"]}
        return sum(len(r.output_ids) for r in results) / wall, [r.output_ids for r in results], stats
    finally:
        engine.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: both sides on the GPU (hack/gpu-check.sh)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        path = build_model(Path(tmp) / "tiny-deepseek-v3")
        for b in batches:
            hf, hf_out = hf_tokens_per_s(path, tdtype, b, a.new, a.prompt, a.device)
            ours, our_out, stats = ours_tokens_per_s(path, a.dtype, b, a.new, a.prompt, a.threads, a.device)
            same = sum(x == y for x, y in zip(hf_out, our_out, strict=True)) / b
            rows.append((b, hf, ours, same, stats))
            print(f"batch {b}: transformers {hf:.1f} tok/s, ours {ours:.1f} tok/s ({ours / hf:.2f}x), "
                  f"greedy sequences equal {same:.2f}; engine stats {stats}", file=sys.stderr, flush=True)
    base = next((ours for b, _, ours, _, _ in rows if b == 1), None)
    print(f"\n{a.device}, {a.dtype}, {a.threads} thread(s), prompt {a.prompt}, {a.new} new tokens per sequence, greedy")
    print(f"{'batch':>5} {'transformers tok/s':>19} {'ours tok/s':>11} {'ours / HF':>10} {'ours / ours@1':>14} "
          f"{'same tokens':>12}")
    for b, hf, ours, same, _ in rows:
        scale = f"{ours / base:.2f}" if base else "-"
        print(f"{b:>5} {hf:>19.1f} {ours:>11.1f} {ours / hf:>10.2f} {scale:>14} {same:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
