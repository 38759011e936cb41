"""`moe-worker`: the worker's command line.

    moe-worker make-checkpoint --config CONFIG.json --out DIR [--dtype fp8|bf16] [--seed N]
    moe-worker logits --checkpoint DIR --input-ids 1,2,3 --out LOGITS.npy [--world-size 1]

`generate` and `serve` (and `--world-size` > 1) come with the expert-parallel runtime; each
subcommand is one `_cmd_*` function registered in `_build_parser`, so they slot in beside these.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model, make_checkpoint
from .config import ConfigError
from .fp8 import IMPLS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class UsageError(Exception):
    """Bad arguments the parser could not catch; printed without a traceback, exit status 2."""


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _cmd_make_checkpoint(a: argparse.Namespace) -> int:
    try:
        config = json.loads(Path(a.config).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--config {a.config}: {e}") from None
    out = make_checkpoint(config, a.out, dtype=a.dtype, seed=a.seed, max_shard_bytes=a.max_shard_mb << 20)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {a.dtype} checkpoint (seed {a.seed}) to {out}: {', '.join(files)}")
    return 0


def _cmd_logits(a: argparse.Namespace) -> int:
    if a.world_size != 1:
        raise UsageError("--world-size > 1 needs the expert-parallel runtime, which this build does not have")
    model = load_model(a.checkpoint, dtype=DTYPES[a.dtype], attn_impl=a.attn, fp8_impl=a.fp8_impl)
    vocab = model.args.vocab_size
    bad = [i for i in a.input_ids if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"--input-ids {bad} outside the vocabulary 0..{vocab - 1}")
    tokens = torch.tensor([a.input_ids], dtype=torch.long)
    logits = model(tokens)[0]  # (tokens, vocab) fp32
    np.save(a.out, logits.numpy().astype(np.float32))
    print(f"wrote logits {tuple(logits.shape)} float32 to {a.out}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-worker", description="DeepSeek-V3 MoE worker")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mk = sub.add_parser("make-checkpoint", help="write a random checkpoint in DeepSeek-V3's HF format")
    mk.add_argument("--config", required=True, help="Hugging Face DeepSeek-V3 config.json")
    mk.add_argument("--out", required=True, help="new or empty output directory")
    mk.add_argument("--dtype", choices=("fp8", "bf16"), default="fp8")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--max-shard-mb", type=int, default=1024, help="largest shard; more shards get an index file")
    mk.set_defaults(func=_cmd_make_checkpoint)

    lg = sub.add_parser("logits", help="run a prompt through the model and save its logits")
    lg.add_argument("--checkpoint", required=True, help="checkpoint directory")
    lg.add_argument("--input-ids", required=True, type=_ids, help="comma-separated token ids")
    lg.add_argument("--out", required=True, help="output .npy: float32 (tokens, vocab)")
    lg.add_argument("--world-size", type=int, default=1, help="expert-parallel ranks (only 1 for now)")
    lg.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="activation dtype")
    lg.add_argument("--attn", choices=("absorb", "naive"), default="absorb")
    lg.add_argument("--fp8-impl", choices=IMPLS, default="auto")
    lg.set_defaults(func=_cmd_logits)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"moe-worker {args.command}: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"moe-worker {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
