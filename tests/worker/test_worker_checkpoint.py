"""Safetensors checkpoints: format, determinism, lazy partial loads, and errors that name names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_common.model_args import ModelArgs
from moe_worker.checkpoint import (
    INDEX_FILE,
    Checkpoint,
    CheckpointError,
    expert_tensor_names,
    hf_name,
    load_model,
    make_checkpoint,
)


def headers(path: Path) -> dict[str, tuple[list[int], str]]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (sl.get_shape(), sl.get_dtype())
    return out


def test_hf_names():
    assert hf_name("layers.3.ffn.experts.7.w1.scale") == "model.layers.3.mlp.experts.7.gate_proj.weight_scale_inv"
    assert hf_name("layers.0.attn.wkv_a.weight") == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert hf_name("layers.2.ffn.gate.bias") == "model.layers.2.mlp.gate.e_score_correction_bias"
    assert hf_name("layers.2.ffn.shared_experts.w2.weight") == "model.layers.2.mlp.shared_experts.down_proj.weight"
    assert hf_name("layers.1.attn.q_norm.weight") == "model.layers.1.self_attn.q_a_layernorm.weight"
    assert hf_name("embed.weight") == "model.embed_tokens.weight"
    assert hf_name("head.weight") == "lm_head.weight"


def test_fp8_checkpoint_format(fp8_ckpt):
    h = headers(fp8_ckpt)
    assert h["model.layers.1.mlp.experts.15.gate_proj.weight"] == ([96, 320], "F8_E4M3")
    assert h["model.layers.1.mlp.experts.15.gate_proj.weight_scale_inv"] == ([1, 3], "F32")
    assert h["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == ([1, 3], "F32")  # 80 x 320
    assert h["model.layers.0.self_attn.q_b_proj.weight_scale_inv"] == ([2, 1], "F32")  # 192 x 96
    assert h["model.layers.0.mlp.down_proj.weight"] == ([320, 256], "F8_E4M3")
    assert h["model.layers.2.mlp.gate.weight"] == ([16, 320], "BF16")
    assert h["model.layers.2.mlp.gate.e_score_correction_bias"] == ([16], "F32")
    assert h["lm_head.weight"] == ([256, 320], "BF16") and "lm_head.weight_scale_inv" not in h
    assert h["model.layers.0.input_layernorm.weight"] == ([320], "BF16")
    n_experts = sum(1 for k in h if ".mlp.experts." in k)
    assert n_experts == 2 * 16 * 3 * 2  # 2 MoE layers, 16 experts, 3 linears, weight + scale
    cfg = json.loads((fp8_ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert not (fp8_ckpt / INDEX_FILE).exists()


def test_bf16_checkpoint_format(bf16_ckpt):
    h = headers(bf16_ckpt)
    assert h["model.layers.1.mlp.experts.3.up_proj.weight"] == ([96, 320], "BF16")
    assert not any(k.endswith("weight_scale_inv") for k in h)
    assert "quantization_config" not in json.loads((bf16_ckpt / "config.json").read_text())


def test_generator_is_deterministic(tiny_config, tmp_path, fp8_ckpt):
    again = make_checkpoint(tiny_config, tmp_path / "a", dtype="fp8", seed=0)
    for f in sorted(fp8_ckpt.iterdir()):
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name
    other = make_checkpoint(tiny_config, tmp_path / "b", dtype="fp8", seed=1)
    assert (other / "model.safetensors").read_bytes() != (fp8_ckpt / "model.safetensors").read_bytes()


def test_sharded_with_index_equals_single_file(tiny_config, tmp_path, fp8_ckpt):
    sharded = make_checkpoint(tiny_config, tmp_path / "s", dtype="fp8", seed=0, max_shard_bytes=100_000)
    index = json.loads((sharded / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0].startswith("model-00001-of-")
    # same tensors, whatever the sharding
    single = load_file(str(fp8_ckpt / "model.safetensors"))
    for name, file in index["weight_map"].items():
        with safe_open(str(sharded / file), "pt") as h:
            assert torch.equal(h.get_tensor(name).view(torch.uint8), single[name].view(torch.uint8)), name
    t = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(load_model(sharded, dtype=torch.float32)(t), load_model(fp8_ckpt, dtype=torch.float32)(t))


def test_loads_only_owned_experts(tiny_config, tmp_path):
    """One shard per module: delete every shard of experts the rank does not own; it still loads."""
    path = make_checkpoint(tiny_config, tmp_path / "c", dtype="fp8", seed=0, max_shard_bytes=1)
    args = ModelArgs.from_file(path / "config.json")
    owned = {1: [2, 9], 2: [0]}
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    dropped = 0
    for layer in args.moe_layers:
        for eid in range(args.n_routed_experts):
            if eid not in owned[layer]:
                for name in expert_tensor_names(args, layer, eid):
                    (path / weight_map[name]).unlink(missing_ok=True)
                    dropped += 1
    assert dropped == 2 * 15 * 6 - 6 * 1  # 2 layers x 15/16 experts x 6 tensors (layer 1 owns 2)

    with Checkpoint(path) as ck:
        model = ck.build(dtype=torch.float32, owned_experts=owned)
        read_experts = {n.split(".mlp.experts.")[1].split(".")[0] for n in ck.tensors_read if ".mlp.experts." in n}
    assert read_experts == {"0", "2", "9"}
    assert [m.owned_experts for m in model.moe_layers()] == [{2, 9}, {0}]
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: file does not exist"):
        load_model(path, dtype=torch.float32)  # all experts: needs a deleted file


def rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(fp8_ckpt, tmp_path):
    name = "model.layers.2.mlp.experts.11.down_proj.weight_scale_inv"
    path = rewrite(fp8_ckpt, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        load_model(path)
    # not owning that expert, the same checkpoint loads fine
    load_model(path, owned_experts={1: range(16), 2: [0, 1]})


def test_wrong_shape_is_named(fp8_ckpt, tmp_path):
    name = "model.layers.0.self_attn.kv_b_proj.weight"

    def edit(t):
        t[name] = t[name][:-1].contiguous()

    path = rewrite(fp8_ckpt, tmp_path / "w", edit)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert f"tensor '{name}' in model.safetensors has shape [255, 64], expected [256, 64]" in str(e.value)


def test_wrong_dtype_is_named(fp8_ckpt, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"

    def edit(t):
        t[name] = t[name].float().to(torch.bfloat16)

    path = rewrite(fp8_ckpt, tmp_path / "d", edit)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' in model.safetensors has dtype BF16, expected F8_E4M3"):
        load_model(path)


def test_truncated_file_is_named(fp8_ckpt, tmp_path):
    path = tmp_path / "t"
    shutil.copytree(fp8_ckpt, path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file, truncated"):
        load_model(path)


def test_index_pointing_at_the_wrong_file(tiny_config, tmp_path):
    path = make_checkpoint(tiny_config, tmp_path / "i", dtype="bf16", seed=0, index=True)
    index = json.loads((path / INDEX_FILE).read_text())
    name = "model.norm.weight"
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{name}.*model-00002-of-00002.safetensors: file does not exist"):
        Checkpoint(path).read(name)


def test_bad_config_and_directory(tmp_path, bf16_ckpt):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Checkpoint(tmp_path / "absent")
    path = tmp_path / "c"
    shutil.copytree(bf16_ckpt, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["n_group"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: field 'n_group': n_group \(3\) must divide n_routed_experts \(16\)"):
        Checkpoint(path)
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "config.json").write_text((bf16_ckpt / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        Checkpoint(empty)


def test_fp8_checkpoint_into_a_bf16_model(fp8_ckpt):
    """fp8=False dequantizes at load (the reference model for FP8-vs-bf16 comparisons)."""
    ref = load_model(fp8_ckpt, dtype=torch.float32, fp8=False)
    fast = load_model(fp8_ckpt, dtype=torch.float32, fp8_impl="weight_only")
    assert not ref.fp8 and ref.layers[0].attn.wq_a.weight.dtype == torch.float32
    t = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.allclose(ref(t), fast(t), rtol=0, atol=1e-4 * float(ref(t).abs().max()))


def test_fp8_model_vs_dequantized_model_logits(tiny_config, tmp_path, fp8_ckpt):
    """End to end, FP8 activations (1x128 groups) move logits by about the FP8 rounding.

    Per linear the relative rms error is ~2.5e-2 (test_worker_fp8); 3 dense layers hold 12 linears
    whose independent errors add in quadrature to ~sqrt(12) * 2.5e-2 ~ 9e-2 (measured 7e-2), hence
    the 0.2 ceiling; the floor shows FP8 really ran. With MoE layers a perturbation can also flip a token's
    expert choice (discrete), which in random tiny models moves that token a lot: there we only ask
    that the logits stay strongly correlated.
    """
    t = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(7))
    tiny_config["first_k_dense_replace"] = tiny_config["num_hidden_layers"]  # dense: no routing
    dense = make_checkpoint(tiny_config, tmp_path / "dense", dtype="fp8", seed=0)
    a = load_model(dense, dtype=torch.float32)(t)  # emulated FP8 products
    b = load_model(dense, dtype=torch.float32, fp8=False)(t)  # same weights, unquantized activations
    rel_rms = float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())
    assert 3e-3 < rel_rms < 0.2

    a = load_model(fp8_ckpt, dtype=torch.float32)(t)
    b = load_model(fp8_ckpt, dtype=torch.float32, fp8=False)(t)
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.95


def test_generator_refuses_non_empty_dir(tiny_config, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "old.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError):
        make_checkpoint(tiny_config, tmp_path / "x")


def test_tied_embeddings(tiny_config, tmp_path):
    tiny_config["tie_word_embeddings"] = True
    path = make_checkpoint(tiny_config, tmp_path / "tied", dtype="bf16")
    assert "lm_head.weight" not in headers(path)
    model = load_model(path, dtype=torch.float32)
    assert torch.equal(model.head.weight, model.embed.weight)
