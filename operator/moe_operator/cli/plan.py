"""`moe plan`: what a MoEDeployment will cost and deliver, from the performance model.

    moe plan -f DEPLOYMENT.yaml [--hardware NAME|PROFILE.yaml] [--json] [--sweep-ep 16,32,64] [--plot CURVE.png]
             [--attention-tp 4]   # the spec with attention TP 4 instead of its own
    moe plan --calibration      # the model against DeepSeek's and SGLang's published figures
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from moe_operator import api, perfmodel
from moe_operator.perfmodel import GB, PerfModelError

PROG = "moe plan"


class PlanError(Exception):
    """A problem with the command's inputs, reported as one line."""


# --- inputs -------------------------------------------------------------------------------------


def _read_yaml(path: str, what: str) -> list[Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise PlanError(f"{path}: no such {what} file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read {what} file ({e.__class__.__name__})") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise PlanError(f"{path}: not valid YAML/JSON{where}: {problem}") from None


def load_spec(path: str) -> tuple[str, api.MoEDeploymentSpec]:
    """(name, spec) from a MoEDeployment manifest (the first one in the file) or a bare spec."""
    docs = _read_yaml(path, "deployment")
    if not docs:
        raise PlanError(f"{path}: empty file")
    for doc in docs:
        if not isinstance(doc, dict):
            raise PlanError(f"{path}: expected a MoEDeployment mapping, got {type(doc).__name__}")
        if "kind" in doc or "apiVersion" in doc:
            if doc.get("kind") != api.KIND:
                continue
            try:
                dep = api.parse_deployment(doc)
            except api.SpecError as e:
                raise PlanError(f"{path}: invalid MoEDeployment: {e}") from None
            return dep.metadata.name or Path(path).stem, dep.spec
        try:
            return Path(path).stem, api.parse_spec(doc.get("spec", doc))
        except api.SpecError as e:
            raise PlanError(f"{path}: invalid MoEDeployment spec: {e}") from None
    raise PlanError(f"{path}: no {api.KIND} in the file")


def load_hardware(value: str) -> perfmodel.Hardware:
    """A built-in profile name, or a YAML/JSON file of Hardware fields (optionally `base: NAME`)."""
    if value.lower() in perfmodel.PROFILES:
        return perfmodel.hardware(value)
    looks_like_file = Path(value).suffix.lower() in (".yaml", ".yml", ".json") or "/" in value
    if not looks_like_file and not Path(value).exists():
        raise PlanError(f"--hardware: unknown hardware {value!r}; known: {', '.join(perfmodel.PROFILES)}, "
                        f"or a YAML/JSON profile file")
    docs = _read_yaml(value, "hardware profile")
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise PlanError(f"{value}: a hardware profile is one mapping of field: value")
    d = dict(docs[0])
    d.setdefault("name", Path(value).stem)
    try:
        return perfmodel.hardware_from_dict(d)
    except (PerfModelError, TypeError) as e:
        raise PlanError(f"{value}: {e}") from None


def parse_int_list(value: str, flag: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"{flag}: expected comma-separated integers such as 16,32,64, got {value!r}") from None
    if not out or any(x < 1 for x in out):
        raise PlanError(f"{flag}: expected positive integers, got {value!r}")
    return sorted(set(out))


# --- text ---------------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x * 1e3:.3f}"


def _layers_table(e: perfmodel.StepEstimate) -> list[str]:
    m = e.workload.batch / e.workload.micro_batches
    out = [f"  {'layer':6} {'count':>5} {'ms/layer':>9} {'compute':>8} {'a2a':>8}  bound     "
           f"(per micro-batch of {m:g} tokens/GPU; ms)"]
    for lc in e.layers:
        out.append(f"  {lc.kind:6} {lc.count:5d} {_ms(lc.layer_time):>9} {_ms(lc.compute):>8} {_ms(lc.comm):>8}  "
                   f"{lc.bound}")
        ops = ", ".join(f"{o.name} {_ms(o.time)} {o.bound}" for o in lc.compute_ops + lc.comm_ops)
        out.append(f"  {'':6}   {ops}")
    out.append(f"  lm_head {_ms(e.head_time)} ms")
    return out


def render_text(name: str, spec: api.MoEDeploymentSpec, p: perfmodel.Plan) -> str:
    hw, par, a = p.hardware, spec.parallelism, spec.model.architecture
    gpn = hw.gpus_per_node or spec.placement.gpus_per_node
    nodes = math.ceil(par.expert_parallel_size / gpn)
    slots = math.ceil(spec.physical_experts / par.expert_parallel_size)
    d = p.decode
    e = d.estimate
    imb = e.imbalance if e else p.prefill.imbalance
    lines = [
        f"{name} on {hw.name}: {hw.description or 'user-defined profile'}",
        f"  EP{par.expert_parallel_size} on {nodes} nodes x {gpn} GPUs; {slots} routed expert(s) per GPU per layer "
        f"({a.n_routed_experts} routed + {par.redundant_experts} redundant); attention TP{par.attention_tensor_parallel}"
        f" x DP{par.attention_dp}; {spec.model.precision}; load imbalance {imb:.2f} (max/mean per GPU)",
        f"  {hw.fp8_tflops:g} FP8 / {hw.bf16_tflops:g} BF16 TFLOPS at {hw.mfu:.0%}; {hw.memory_gb:g} GB at "
        f"{hw.memory_tbs:g} TB/s at {hw.memory_efficiency:.0%}; NVLink {hw.nvlink_gbs:g} GB/s, network "
        f"{hw.network_gbs:g} GB/s per GPU per direction at {hw.link_efficiency:.0%}",
        "",
    ]
    mem = e.memory if e else p.admission
    what = f"decode: {e.workload.batch:g} sequences x {e.workload.context} tokens; " if e else ""
    lines.append(f"Memory per GPU, GB ({what}admission: 1 sequence of {p.admission.kv_tokens:g} tokens)")
    lines.append(f"  {'':24} {'decode':>8} {'admission':>10}")
    for (row, v), (_, adm) in zip(mem.rows(), p.admission.rows(), strict=True):
        lines.append(f"  {row.replace('_', ' '):24} {v / GB:8.2f} {adm / GB:10.2f}")
    lines.append(f"  {'total':24} {mem.total / GB:8.2f} {p.admission.total / GB:10.2f}   of {hw.memory_gb:g}")
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"  admission: {verdict} ({p.admission.total / GB:.1f} GB with one sequence of "
                 f"{p.admission.kv_tokens:g} tokens; free {p.admission.free / GB:.1f} GB)")
    lines.append("")
    if e is None:
        lines.append(f"Decode: no batch fits ({d.binding})")
    else:
        target = f"TPOT target {d.tpot_target * 1e3:g} ms" if d.tpot_target else "no TPOT target"
        lines.append(f"Decode: {d.batch} sequences/GPU, context {e.workload.context} "
                     f"(largest under memory and {target}; bound by {d.binding})")
        lines += _layers_table(e)
        lines.append(f"  step {e.step_time * 1e3:.2f} ms ({e.bound}-bound) | {e.tokens_per_s_per_gpu:,.0f} tok/s per GPU | "
                     f"{e.tokens_per_s_per_node:,.0f} tok/s per node | TPOT {e.time_per_output_token * 1e3:.2f} ms")
        gpus = par.expert_parallel_size * par.replicas
        lines.append(f"  deployment: {e.tokens_per_s_per_gpu * gpus:,.0f} output tok/s on {gpus} GPUs "
                     f"({par.replicas} EP group(s))")
    lines.append("")
    pre = p.prefill
    w = pre.workload
    lines.append(f"Prefill: {w.batch:g} new tokens/GPU per step, prompts of {w.context} tokens, "
                 f"{w.cache_hit:.1%} cache hits; memory {pre.memory.total / GB:.1f} GB "
                 f"({'fits' if pre.memory.fits else 'DOES NOT FIT'})")
    lines += _layers_table(pre)
    lines.append(f"  step {pre.step_time * 1e3:.1f} ms ({pre.bound}-bound) | {pre.tokens_per_s_per_gpu:,.0f} new tok/s per GPU"
                 f" | {pre.input_tokens_per_s_per_node:,.0f} input tok/s per node incl. cache hits")
    return "\n".join(lines) + "\n"


def render_sweep(rows: list[perfmodel.SweepRow]) -> str:
    out = ["EP sweep (decode, largest batch under memory and the TPOT target)",
           f"  {'GPUs':>5} {'layout':12} {'exp/GPU':>7} {'redund':>6} {'batch':>6} {'bound':8} "
           f"{'imbal':>5} {'tok/s/GPU':>10} {'tok/s/node':>11} {'tok/s total':>12} {'TPOT ms':>8} {'mem GB':>7}"]
    for r in rows:
        d = r.to_dict()
        if not d["max_batch_per_gpu"]:
            out.append(f"  {r.gpus:5d} {r.layout:12} {r.experts_per_gpu:7d} {r.redundant_experts:6d}   -    {r.note}")
            continue
        out.append(f"  {r.gpus:5d} {r.layout:12} {r.experts_per_gpu:7d} {r.redundant_experts:6d} "
                   f"{d['max_batch_per_gpu']:6d} {d['binding']:8} {d['imbalance']:5.2f} {d['tokens_per_s_per_gpu']:10,.0f} "
                   f"{d['tokens_per_s_per_node']:11,.0f} {d['tokens_per_s_total']:12,.0f} "
                   f"{d['time_per_output_token_s'] * 1e3:8.2f} {d['memory_per_gpu'] / GB:7.1f}")
    return "\n".join(out) + "\n"


def calibration_markdown(rows: list[perfmodel.CalibrationRow]) -> str:
    """The calibration table of docs/perfmodel.md."""
    out = ["| Case | Setup | Hardware | Published per node | Model per node | Batch/GPU | Step | Bound | "
           "Model / published | Band |",
           "|---|---|---|--:|--:|--:|--:|---|--:|---|"]
    for r in rows:
        c, e = r.case, r.estimate
        unit = "in" if c.phase == "prefill" else "out"
        out.append(f"| `{c.key}` | {c.description} | {c.hardware.upper()} | {c.published_per_node:,.0f} {unit} "
                   f"({c.source}) | {r.predicted_per_node:,.0f} | {e.workload.batch:g} | "
                   f"{e.step_time * 1e3:.1f} ms | {e.bound} | **{r.ratio:.2f}** | {c.band[0]:g}-{c.band[1]:g} |")
    return "\n".join(out) + "\n"


# --- command ------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "plan", help="capacity and performance estimate of a MoEDeployment",
        description="Estimate per-GPU memory, decode and prefill throughput and latency of a MoEDeployment "
                    "from the performance model (docs/perfmodel.md).")
    s.add_argument("-f", "--filename", metavar="DEPLOYMENT.yaml", help="MoEDeployment manifest (or a bare spec)")
    s.add_argument("--hardware", default="brief", metavar="NAME|PROFILE.yaml",
                   help=f"hardware profile: {', '.join(perfmodel.PROFILES)} (default brief), or a YAML/JSON file "
                        "of profile fields (`base: h100` to start from a built-in)")
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")
    s.add_argument("--sweep-ep", metavar="16,32,64", help="compare one expert per GPU with colocated layouts at these GPU counts")
    s.add_argument("--plot", metavar="PATH.png", help="with --sweep-ep: write the scaling curve as a PNG here")
    s.add_argument("--context", type=int, default=perfmodel.DEFAULT_CONTEXT,
                   help="decode: mean KV-cache length per sequence (default %(default)s)")
    s.add_argument("--tpot-ms", type=float, default=perfmodel.DEFAULT_TPOT_TARGET_S * 1e3,
                   help="decode: time-per-output-token target in ms, 0 for none (default %(default)g)")
    s.add_argument("--batch", type=int, help="decode: sequences per GPU (default: the largest under memory and --tpot-ms)")
    s.add_argument("--prefill-tokens", type=int, default=perfmodel.DEFAULT_PREFILL_TOKENS,
                   help="prefill: new tokens per GPU per step (default %(default)s)")
    s.add_argument("--prompt", type=int, default=perfmodel.DEFAULT_CONTEXT, help="prefill: prompt length (default %(default)s)")
    s.add_argument("--cache-hit", type=float, default=0.0, help="prefill: fraction of prompt tokens in the prefix cache")
    s.add_argument("--micro-batches", type=int, choices=(1, 2), default=2, help="2: two-micro-batch overlap (default)")
    s.add_argument("--attention-tp", type=int, metavar="N",
                   help="model the spec with attention tensor parallelism N instead of its own (attention DP = EP / N)")
    s.add_argument("--imbalance", type=float, help="max/mean routed tokens per GPU (default: 1.11 with load "
                                                   "balancing and redundant experts, else 2.56)")
    s.add_argument("--calibration", action="store_true", help="print the calibration table (markdown) and exit")
    s.set_defaults(func=run)
    return s


def _fail(msg: str) -> int:
    print(f"{PROG}: {msg}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except PlanError as e:
        return _fail(str(e))
    except (PerfModelError, api.SpecError) as e:
        return _fail(str(e))


def _run(args: argparse.Namespace) -> int:
    if args.calibration:
        rows = perfmodel.calibrate()
        if args.json:
            print(json.dumps([{"case": r.case.key, "published_per_node": r.case.published_per_node,
                               "predicted_per_node": r.predicted_per_node, "ratio": r.ratio,
                               "band": list(r.case.band), "estimate": r.estimate.to_dict()} for r in rows], indent=2))
        else:
            sys.stdout.write(calibration_markdown(rows))
        return 0
    if not args.filename:
        raise PlanError("-f DEPLOYMENT.yaml is required (or --calibration)")
    if args.plot and not args.sweep_ep:
        raise PlanError("--plot needs --sweep-ep")
    for flag, v in (("--context", args.context), ("--prefill-tokens", args.prefill_tokens), ("--prompt", args.prompt)):
        if v < 1:
            raise PlanError(f"{flag} must be >= 1, got {v}")
    if args.batch is not None and args.batch < 1:
        raise PlanError(f"--batch must be >= 1, got {args.batch}")
    if args.tpot_ms < 0:
        raise PlanError(f"--tpot-ms must be >= 0, got {args.tpot_ms:g}")
    if not 0 <= args.cache_hit < 1:
        raise PlanError(f"--cache-hit must be in [0, 1), got {args.cache_hit:g}")
    if args.imbalance is not None and args.imbalance < 1:
        raise PlanError(f"--imbalance is max/mean and must be >= 1, got {args.imbalance:g}")
    if args.attention_tp is not None and args.attention_tp < 1:
        raise PlanError(f"--attention-tp must be >= 1, got {args.attention_tp}")
    sweep = parse_int_list(args.sweep_ep, "--sweep-ep") if args.sweep_ep else None
    hw = load_hardware(args.hardware)
    name, spec = load_spec(args.filename)
    if args.attention_tp is not None:
        try:
            spec = perfmodel.with_attention_tp(spec, args.attention_tp)
        except api.SpecError as e:
            raise PlanError(f"--attention-tp {args.attention_tp}: {e.message}") from None
    tpot = args.tpot_ms / 1e3 if args.tpot_ms > 0 else None
    p = perfmodel.plan(spec, hw, context=args.context, tpot_target=tpot, decode_batch=args.batch,
                       prefill_tokens=args.prefill_tokens, prompt=args.prompt, cache_hit=args.cache_hit,
                       micro_batches=args.micro_batches, imbalance=args.imbalance)
    rows = (perfmodel.sweep_ep(spec, hw, sweep, context=args.context, tpot_target=tpot,
                               micro_batches=args.micro_batches, imbalance=args.imbalance) if sweep else None)
    if rows and args.plot:
        try:
            perfmodel.plot_sweep(rows, args.plot, title=f"{name} on {hw.name}: decode, context {args.context}")
        except OSError as e:
            raise PlanError(f"--plot {args.plot}: cannot write ({e.strerror or e})") from None
    if args.json:
        out = {"name": name, **p.to_dict()}
        if rows is not None:
            out["sweep"] = [r.to_dict() for r in rows]
        print(json.dumps(out, indent=2))
    else:
        sys.stdout.write(render_text(name, spec, p))
        if rows is not None:
            sys.stdout.write("\n" + render_sweep(rows))
            if args.plot:
                sys.stdout.write(f"scaling curve: {args.plot}\n")
    return 0 if p.fits else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
