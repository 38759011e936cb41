"""Checkpoints: a directory with `config.json` and safetensors shards in HF DeepSeek-V3 naming.

- Never pickle: only safetensors files are read, through `safe_open` (memory-mapped), one tensor at
  a time, so experts a rank does not own are never read.
- With `model.safetensors.index.json` the index says which file holds which tensor; without one,
  every `*.safetensors` file in the directory is listed (headers only).
- Errors name the tensor and the file: missing tensor or file, wrong shape, wrong dtype, and
  truncated or corrupt files (detected when a file is opened).
- `make_checkpoint` writes random checkpoints in exactly this format (FP8 or bf16), deterministic
  for a seed.

Our parameter names follow DeepSeek's `inference/model.py`; `HF_SEGMENTS` maps them to the HF names
(the table of DeepSeek's `convert.py`, reversed).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from moe_common.model_args import FP8_BLOCK, ConfigError, ModelArgs

from .fp8 import Linear, dequantize_weight, quantize_weight, scale_shape
from .model import MLP, Gate, MoE, RMSNorm, Transformer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"

# our name segment -> Hugging Face DeepSeek-V3 segment
HF_SEGMENTS: dict[str, str] = {
    "embed": "embed_tokens",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn": "self_attn",
    "ffn": "mlp",
    "wq": "q_proj",
    "wq_a": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "bias": "e_score_correction_bias",  # only the gate has a bias
    "scale": "weight_scale_inv",
}

ST_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
}
FLOAT_DTYPES = ("BF16", "F16", "F32")


class CheckpointError(ValueError):
    """A checkpoint that does not hold what the model needs; the message names tensor and file."""


def hf_name(name: str) -> str:
    """Our parameter name -> HF name: 'layers.3.ffn.experts.7.w1.scale' ->
    'model.layers.3.mlp.experts.7.gate_proj.weight_scale_inv'; 'head.weight' -> 'lm_head.weight'."""
    parts = [HF_SEGMENTS.get(p, p) for p in name.split(".")]
    if parts[0] == "head":
        return ".".join(["lm_head", *parts[1:]])
    return ".".join(["model", *parts])


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F8_E4M3, BF16, F32, ...


class Checkpoint:
    """A checkpoint directory, opened lazily. `load(model)` fills exactly the model's parameters."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        try:
            self.args = ModelArgs.from_file(self.path / CONFIG_FILE)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self._handles: dict[str, Any] = {}
        self.weight_map = self._read_index()
        """HF tensor name -> file name (relative to the directory)."""
        self.tensors_read: list[str] = []
        """HF names of the tensors whose data was read, in order (headers do not count)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when dropped

    def _read_index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                data = json.loads(index.read_text())
                weight_map = data["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
            for file in sorted(set(weight_map.values())):
                if Path(file).name != file or not file.endswith(".safetensors"):
                    raise CheckpointError(f"{index}: '{file}' is not a .safetensors file in the checkpoint directory")
            return dict(weight_map)
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
        weight_map: dict[str, str] = {}
        for file in files:
            for name in self._handle(file).keys():
                if name in weight_map:
                    raise CheckpointError(f"tensor '{name}' is in both {weight_map[name]} and {file}")
                weight_map[name] = file
        return weight_map

    def _handle(self, file: str, tensor: str | None = None):
        handle = self._handles.get(file)
        if handle is None:
            path = self.path / file
            if not path.exists():
                wanted = f"tensor '{tensor}' is in " if tensor else ""
                raise CheckpointError(f"{wanted}{path}: file does not exist (listed in {INDEX_FILE})")
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
            self._handles[file] = handle
        return handle

    def info(self, name: str) -> TensorInfo:
        """Header facts of tensor `name` (HF naming); reads no tensor data."""
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"tensor '{name}' is missing from checkpoint {self.path}")
        handle = self._handle(file, name)
        try:
            sl = handle.get_slice(name)
        except SafetensorError:
            raise CheckpointError(f"tensor '{name}' is listed under {file} but that file does not hold it") from None
        return TensorInfo(name, file, tuple(sl.get_shape()), sl.get_dtype())

    def read(self, name: str, shape: tuple[int, ...] | None = None, dtypes: Iterable[str] | None = None,
             part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Read one tensor after checking its header against `shape` and allowed `dtypes`; with
        `part` = (dim, lo, hi) only entries lo..hi-1 along dim 0 or 1 (read from the file alone)."""
        info = self.info(name)
        if shape is not None and info.shape != tuple(shape):
            raise CheckpointError(f"tensor '{name}' in {info.file} has shape {list(info.shape)}, expected {list(shape)}")
        allowed = tuple(dtypes) if dtypes is not None else tuple(ST_DTYPES)
        if info.dtype not in allowed:
            raise CheckpointError(
                f"tensor '{name}' in {info.file} has dtype {info.dtype}, expected {' or '.join(allowed)}"
            )
        try:
            if part is None:
                tensor = self._handle(info.file).get_tensor(name)
            else:
                dim, lo, hi = part
                sl = self._handle(info.file).get_slice(name)
                tensor = (sl[lo:hi] if dim == 0 else sl[:, lo:hi]).contiguous()
        except SafetensorError as e:
            raise CheckpointError(f"tensor '{name}' in {info.file} could not be read ({e})") from None
        self.tensors_read.append(name)
        return tensor

    # ---- filling a model ----

    def build(self, **model_kw) -> Transformer:
        """Make a Transformer for this checkpoint's config (kwargs as Transformer) and load it."""
        model = Transformer(self.args, **model_kw)
        self.load(model)
        return model

    def load(self, model: Transformer) -> None:
        """Fill every parameter of `model` (only the experts it holds) from the checkpoint."""
        if model.args != self.args:
            raise CheckpointError(f"model was built for another config than {self.path / CONFIG_FILE}")
        loaded: set[int] = set()
        for prefix, module in model.named_modules():
            if isinstance(module, (Linear, RMSNorm, Gate, nn.Embedding)):
                self.load_module(prefix, module, tied_embed=model.args.tie_word_embeddings)
                loaded.update(id(p) for p in module.parameters())
        missed = [n for n, p in model.named_parameters() if id(p) not in loaded]
        if missed:  # a module type this loader does not know; never leave weights uninitialised
            raise CheckpointError(f"no loader for parameters {missed[:5]}")

    def read_expert(self, moe: MoE, eid: int) -> MLP:
        """Routed expert `eid` of `moe`'s layer as a new module, not registered in `moe` (yet)."""
        expert = moe.new_expert()
        prefix = f"layers.{moe.layer_id}.ffn.experts.{eid}"
        for part in ("w1", "w2", "w3"):
            self.load_module(f"{prefix}.{part}", getattr(expert, part))
        return expert

    def load_expert(self, moe: MoE, eid: int) -> MLP:
        """Read routed expert `eid` and register it in `moe` (replacing one of the same id)."""
        return moe.add_expert(eid, self.read_expert(moe, eid))

    def load_module(self, prefix: str, module: nn.Module, *, tied_embed: bool = False) -> None:
        """Load one leaf module named `prefix` in our naming."""
        if isinstance(module, Linear):
            if prefix == "head" and tied_embed:
                prefix = "embed"
            self._load_linear(prefix, module)
        elif isinstance(module, Gate):
            self._load_float(f"{prefix}.weight", module.weight)
            self._load_float(f"{prefix}.bias", module.bias)
        elif isinstance(module, (RMSNorm, nn.Embedding)):
            self._load_float(f"{prefix}.weight", module.weight)
        else:
            raise TypeError(f"no loader for {type(module).__name__} at {prefix}")

    def _load_float(self, name: str, param: torch.Tensor) -> None:
        t = self.read(hf_name(name), tuple(param.shape), FLOAT_DTYPES)
        with torch.no_grad():
            param.copy_(t)

    def _load_linear(self, prefix: str, lin: Linear) -> None:
        """Fill `lin` from the checkpoint: its whole weight, or with `lin.shard` the rank's part,
        read as whole 128x128 blocks when the stored weight is FP8 and cut to the part."""
        wname, sname = hf_name(f"{prefix}.weight"), hf_name(f"{prefix}.scale")
        shape = (lin.out_features, lin.in_features)
        info = self.info(wname)
        sh = lin.shard
        fp8_stored = info.dtype == "F8_E4M3"
        if sh is None:
            part = spart = None
        else:  # FP8 is read as whole blocks (their scales); lin.is_fp8 stores them as read
            blocks = sh if lin.is_fp8 or not fp8_stored else replace(sh, block=FP8_BLOCK)
            lo, hi = blocks.lo, blocks.hi
            part, spart = (sh.dim, lo, hi), (sh.dim, lo // FP8_BLOCK, -(-hi // FP8_BLOCK))
        if lin.is_fp8:
            w = self.read(wname, shape, ("F8_E4M3",), part)  # an FP8 config with a bf16 tensor fails here
            s = self.read(sname, scale_shape(*shape), ("F32",), spart)
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.scale.copy_(s)
        elif fp8_stored:  # FP8 checkpoint into a model built with fp8=False
            w = self.read(wname, shape, ("F8_E4M3",), part)
            s = self.read(sname, scale_shape(*shape), ("F32",), spart)
            w = dequantize_weight(w, s, lin.weight.dtype)
            if sh is not None:
                w = w.narrow(sh.dim, sh.start - part[1], sh.stop - sh.start)
            with torch.no_grad():
                lin.weight.copy_(w)
        else:
            w = self.read(wname, shape, FLOAT_DTYPES, part)
            if sname in self.weight_map:
                raise CheckpointError(f"tensor '{sname}' in {self.weight_map[sname]} scales a {info.dtype} weight")
            with torch.no_grad():
                lin.weight.copy_(w)



def load_model(path: str | Path, **model_kw) -> Transformer:
    """Open checkpoint `path`, build the model (kwargs as Transformer) and load it."""
    with Checkpoint(path) as ckpt:
        return ckpt.build(**model_kw)


# ---------------------------------------------------------------------------------------------
# Random checkpoints
# ---------------------------------------------------------------------------------------------

DEEPSEEK_FP8_QUANT = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _randn(shape: tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)


def _random_module(prefix: str, module: nn.Module, seed: int, tied_embed: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of one leaf module; values depend only on (seed, name)."""
    if isinstance(module, Linear):
        if prefix == "head" and tied_embed:
            return
        wname = hf_name(f"{prefix}.weight")
        w = _randn((module.out_features, module.in_features), seed, wname) / math.sqrt(module.in_features)
        if module.is_fp8:
            q, s = quantize_weight(w)
            yield wname, q
            yield hf_name(f"{prefix}.scale"), s
        else:
            yield wname, w.to(torch.bfloat16)
    elif isinstance(module, Gate):
        wname, bname = hf_name(f"{prefix}.weight"), hf_name(f"{prefix}.bias")
        yield wname, (_randn(tuple(module.weight.shape), seed, wname) / math.sqrt(module.weight.shape[1])).bfloat16()
        yield bname, 0.1 * _randn(tuple(module.bias.shape), seed, bname)  # fp32, as in DeepSeek's files
    elif isinstance(module, RMSNorm):
        name = hf_name(f"{prefix}.weight")
        yield name, (1.0 + 0.1 * _randn(tuple(module.weight.shape), seed, name)).bfloat16()
    elif isinstance(module, nn.Embedding):
        name = hf_name(f"{prefix}.weight")
        yield name, _randn(tuple(module.weight.shape), seed, name).bfloat16()


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def make_checkpoint(
    config: dict[str, Any],
    out_dir: str | Path,
    *,
    dtype: str = "fp8",
    seed: int = 0,
    max_shard_bytes: int = 2**30,
    index: bool | None = None,
) -> Path:
    """Write a random checkpoint for HF config dict `config` into empty/new `out_dir`.

    dtype "fp8": linear weights e4m3 + weight_scale_inv (DeepSeek's quantization_config is set);
    "bf16": all weights bf16 (quantization_config removed). Gate bias and scales are fp32. Shards
    hold whole modules up to `max_shard_bytes`; an index is written when there are several shards
    (or when `index` is True). Same config, dtype and seed -> byte-identical files.
    """
    if dtype not in ("fp8", "bf16"):
        raise ValueError(f"dtype {dtype!r}: expected 'fp8' or 'bf16'")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: directory is not empty")
    cfg = dict(config)
    if dtype == "fp8":
        cfg["quantization_config"] = dict(cfg.get("quantization_config") or DEEPSEEK_FP8_QUANT)
    else:
        cfg.pop("quantization_config", None)
    cfg.setdefault("torch_dtype", "bfloat16")
    args = ModelArgs.from_hf_config(cfg)
    skeleton = Transformer(args, dtype=torch.bfloat16, fp8=dtype == "fp8", device="meta")

    leaves = [
        (prefix, m)
        for prefix, m in skeleton.named_modules()
        if isinstance(m, (Linear, RMSNorm, Gate, nn.Embedding))
        and not (prefix == "head" and args.tie_word_embeddings)
    ]
    shards: list[list[tuple[str, nn.Module]]] = [[]]
    size = 0
    for prefix, m in leaves:
        n = _nbytes(m)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((prefix, m))
        size += n
    with_index = len(shards) > 1 if index is None else index

    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if with_index else "model.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for prefix, m in shard:
            for name, t in _random_module(prefix, m, seed, args.tie_word_embeddings):
                tensors[name] = t.contiguous()
                weight_map[name] = file
                total += t.numel() * t.element_size()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    if with_index:
        index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def expert_tensor_names(args: ModelArgs, layer: int, eid: int) -> list[str]:
    """HF names of routed expert `eid` of `layer` (weights, plus scales for FP8 configs)."""
    names = []
    for part in ("gate_proj", "up_proj", "down_proj"):
        names.append(f"model.layers.{layer}.mlp.experts.{eid}.{part}.weight")
        if args.quantization is not None:
            names.append(f"model.layers.{layer}.mlp.experts.{eid}.{part}.weight_scale_inv")
    return names


__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "Checkpoint",
    "CheckpointError",
    "TensorInfo",
    "expert_tensor_names",
    "hf_name",
    "load_model",
    "make_checkpoint",
]
