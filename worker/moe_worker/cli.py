"""`moe-worker`: the worker's command line.

    moe-worker make-checkpoint --config CONFIG.json --out DIR [--dtype fp8|bf16] [--seed N]
    moe-worker logits --checkpoint DIR --input-ids 1,2,3 --out LOGITS.npy [--world-size N]
    moe-worker generate --checkpoint DIR --world-size N --prompt-ids 1,2,3 --max-new-tokens K [--json]

`--world-size N` > 1 spawns N local ranks of an EP group (`launch.run_local`); each subcommand is
one `_cmd_*` function registered in `_build_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from moe_common.model_args import ConfigError

from .checkpoint import CheckpointError, load_model, make_checkpoint
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
    if a.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {a.world_size}")
    if a.world_size > 1:
        return _logits_ep(a)
    device = _device(a.device)
    model = load_model(a.checkpoint, dtype=DTYPES[a.dtype], attn_impl=a.attn, fp8_impl=a.fp8_impl, device=device)
    vocab = model.args.vocab_size
    bad = [i for i in a.input_ids if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"--input-ids {bad} outside the vocabulary 0..{vocab - 1}")
    tokens = torch.tensor([a.input_ids], dtype=torch.long, device=device)
    logits = model(tokens)[0].cpu()  # (tokens, vocab) fp32
    np.save(a.out, logits.numpy().astype(np.float32))
    print(f"wrote logits {tuple(logits.shape)} float32 to {a.out}")
    return 0


def _device(spec: str) -> torch.device:
    """--device: "auto" (the first GPU if there is one), "cpu", "cuda" or "cuda:N"."""
    from .engine import resolve_device

    try:
        return resolve_device(spec)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def _engine_config(a: argparse.Namespace, dtype: str):
    from .engine import EngineConfig

    _device(a.device)  # a clear error here rather than inside every rank
    tp = getattr(a, "attention_tp", 1)
    if tp < 1 or a.world_size % tp:
        raise UsageError(f"--attention-tp {tp} must be >= 1 and divide --world-size {a.world_size}")
    return EngineConfig(dtype=dtype, attn_impl=a.attn, fp8_impl=a.fp8_impl, device=a.device,
                        overlap=getattr(a, "overlap", "auto"), dispatch_fp8=getattr(a, "dispatch_fp8", "auto"),
                        attention_tp=tp)


def _check_ids(checkpoint: str, ids: list[int], flag: str) -> None:
    from .checkpoint import Checkpoint

    vocab = Checkpoint(checkpoint).args.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"{flag} {bad} outside the vocabulary 0..{vocab - 1}")


def _logits_ep(a: argparse.Namespace) -> int:
    from .launch import GroupFailed, Job, Phase, run_local

    _check_ids(a.checkpoint, a.input_ids, "--input-ids")
    try:
        res = run_local(a.checkpoint, a.world_size, Job([Phase(logits_prompt=tuple(a.input_ids))]),
                        engine=_engine_config(a, a.dtype))
    except GroupFailed as e:
        print(f"moe-worker logits: {e}", file=sys.stderr)
        return 1
    logits = res.phases[0].logits
    np.save(a.out, logits.astype(np.float32))
    print(f"wrote logits {tuple(logits.shape)} float32 to {a.out} ({a.world_size} ranks)")
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .engine_api import EngineError, GenerationRequest, RequestError
    from .expertmap import ExpertMapError
    from .launch import GroupFailed, Job, Phase, run_local

    if a.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {a.world_size}")
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    _check_ids(a.checkpoint, a.prompt_ids, "--prompt-ids")
    eos = Checkpoint(a.checkpoint).args.extra.get("eos_token_id")
    stop = (eos,) if isinstance(eos, int) and not isinstance(eos, bool) else ()  # as the server does
    req = GenerationRequest("generate", tuple(a.prompt_ids), max_tokens=a.max_new_tokens,
                            temperature=a.temperature, seed=a.seed, stop_ids=stop)
    try:
        res = run_local(a.checkpoint, a.world_size, Job([Phase([req])]), engine=_engine_config(a, a.dtype),
                        expert_map=a.expert_map)
    except (GroupFailed, ExpertMapError, EngineError, RequestError) as e:
        print(f"moe-worker generate: {e}", file=sys.stderr)
        return 1
    r = res.phases[0].results[0]
    out = {
        "prompt_ids": a.prompt_ids,
        "output_ids": r["output_ids"],
        "finish_reason": r["finish_reason"],
        "logits_checksum": float(sum(r["logit_sums"])),
        "logit_sums": r["logit_sums"],
        "world_size": a.world_size,
        "expert_map_generation": res.generation,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"output ids: {','.join(map(str, out['output_ids']))} ({out['finish_reason']})")
        print(f"logits checksum: {out['logits_checksum']:.6f} ({a.world_size} ranks)")
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
    lg.add_argument("--world-size", type=int, default=1, help="expert-parallel ranks (local processes)")
    lg.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="activation dtype")
    lg.add_argument("--attn", choices=("absorb", "naive"), default="absorb")
    lg.add_argument("--fp8-impl", choices=IMPLS, default="auto")
    lg.add_argument("--device", default="cpu", help="cpu (default: the exact reference), cuda, cuda:N or auto")
    lg.set_defaults(func=_cmd_logits)

    gn = sub.add_parser("generate", help="generate tokens greedily (or sampled) on N local EP ranks")
    gn.add_argument("--checkpoint", required=True, help="checkpoint directory")
    gn.add_argument("--world-size", type=int, default=1, help="expert-parallel ranks (local processes)")
    gn.add_argument("--prompt-ids", required=True, type=_ids, help="comma-separated token ids")
    gn.add_argument("--max-new-tokens", type=int, default=16)
    gn.add_argument("--json", action="store_true", help="print one JSON object")
    gn.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gn.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    gn.add_argument("--expert-map", default=None, help="PLAN.json (a 'generation' file next to it); default: "
                    "one expert per rank, replicas on the ranks beyond the expert count")
    gn.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="activation dtype (auto: fp32 on CPU)")
    gn.add_argument("--attn", choices=("absorb", "naive"), default="absorb")
    gn.add_argument("--fp8-impl", choices=IMPLS, default="auto")
    gn.add_argument("--device", default="auto", help="auto (each rank's GPU if there is one, else the CPU), "
                    "cpu, cuda or cuda:N")
    gn.add_argument("--overlap", choices=("auto", "on", "off"), default="auto", help="two overlapped micro-batches")
    gn.add_argument("--dispatch-fp8", choices=("auto", "on", "off"), default="auto", help="FP8 dispatch payload")
    gn.add_argument("--attention-tp", type=int, default=1, help="attention tensor-parallel degree: consecutive ranks "
                    "split the heads (divides --world-size and the heads)")
    gn.set_defaults(func=_cmd_generate)

    sv = sub.add_parser("serve", help="run one rank of an EP group, as a rank pod does (configuration from env: "
                        "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, MOE_CHECKPOINT, MOE_EXPERT_MAP, POD_IP, "
                        "MOE_HTTP_PORT, MOE_GRPC_PORT, MOE_METRICS_PORT, MOE_MODEL_NAME)")
    sv.set_defaults(func=_cmd_serve)

    rt = sub.add_parser("route", add_help=False, help="run the router in front of the EP groups' front ranks, as a "
                        "router pod does (--front HOST per group; MOE_HTTP_PORT, MOE_GRPC_PORT, MOE_METRICS_PORT, "
                        "MOE_ROUTER_RETRY_S, POD_IP from env)")
    rt.set_defaults(func=_cmd_route)
    return p


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import main as serve_main

    return serve_main()


def _cmd_route(args: argparse.Namespace) -> int:
    from .router import main as route_main

    return route_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    args, rest = _build_parser().parse_known_args(argv)
    if rest and args.command != "route":
        _build_parser().parse_args(argv)  # the usual error for unknown arguments
    args.rest = rest
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
