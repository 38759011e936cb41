"""Against Hugging Face transformers' own DeepseekV3ForCausalLM, an independent implementation.

A tiny random model (4 layers, 1 dense, 16 routed experts + 1 shared, top-4, 4 groups of which 2 are
kept, YaRN as DeepSeek-V3 configures it, random correction bias and norm weights) is built in
transformers, cast to bf16 (the correction bias stays fp32, as in DeepSeek's files) and saved with
`save_pretrained` as safetensors. Our loader reads the same files.

Tolerances (relative: max |difference| / max |HF logit|):
- fp32 compute on both sides, same bf16-valued weights: only summation order and transcendental
  implementations differ, ~1e-7 per operation (measured 1e-6 after 4 layers). 1e-5 leaves 10x
  margin while any semantic slip (YaRN, routing, softmax scale, rope layout) costs >1e-3: the two
  negative controls at the end show the comparison would catch such a slip.
- bf16 compute on both sides: each side rounds to bf16 (2**-8) at different points, so they cannot
  agree better than either agrees with the exact (fp32) result. On a dense variant (4 dense layers,
  same shapes) we require our bf16 logits to be no further from HF's fp32 logits than 2x HF's own
  bf16 logits are (measured over 4 prompts: 1.03x-1.31x, HF's own error 1.6e-2..2.2e-2).
  With MoE layers, bf16 noise flips near-tied expert choices of some tokens (discrete; HF's own bf16
  run flips different tokens than ours), which moves those tokens' logits by up to ~0.5 of the
  scale in a random tiny model; there only a cosine similarity is asserted.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV3ForCausalLM"):
    pytest.skip("transformers without DeepseekV3 (needs >= 4.51)", allow_module_level=True)

from moe_worker.checkpoint import load_model  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "rope_theta": 10000.0,
}


def build_hf_model(out, first_k_dense_replace: int):
    cfg_kw = dict(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=first_k_dense_replace, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
        topk_group=2, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_position_embeddings=163840, initializer_range=0.05, tie_word_embeddings=False,
    )
    try:
        cfg = transformers.DeepseekV3Config(**cfg_kw, rope_parameters=YARN)
    except TypeError:  # transformers 4.x spelling
        rope = {k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")}
        cfg = transformers.DeepseekV3Config(**cfg_kw, rope_theta=10000.0, rope_scaling={"type": "yarn", **rope})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    moe_layers = model.model.layers[first_k_dense_replace:]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)  # non-trivial norm weights
        for layer in moe_layers:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model = model.to(torch.bfloat16)
    for layer in moe_layers:
        layer.mlp.gate.e_score_correction_bias.data = layer.mlp.gate.e_score_correction_bias.data.float()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """4 layers: 1 dense + 3 MoE."""
    return build_hf_model(tmp_path_factory.mktemp("hf") / "tiny-deepseek-v3", first_k_dense_replace=1)


@pytest.fixture(scope="module")
def hf_dense_dir(tmp_path_factory):
    """The same shapes with 4 dense layers: no routing, so bf16 noise stays continuous."""
    return build_hf_model(tmp_path_factory.mktemp("hf") / "tiny-dense", first_k_dense_replace=4)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))


def hf_logits(path, dtype, ids):
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_saved_in_hf_deepseek_v3_format(hf_dir):
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("model.layers.2.mlp.experts.15.down_proj.weight").get_dtype() == "BF16"
    assert "model.layers.3.self_attn.kv_a_proj_with_mqa.weight" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys


@pytest.mark.parametrize("attn", ["absorb", "naive"])
def test_fp32_logits_match_transformers(hf_dir, ids, attn):
    ref = hf_logits(hf_dir, torch.float32, ids)
    ours = load_model(hf_dir, dtype=torch.float32, attn_impl=attn)(ids)
    assert ours.shape == ref.shape == (2, 13, 512)
    assert rel(ours, ref) < 1e-5


def test_bf16_logits_match_transformers(hf_dense_dir, hf_dir, ids):
    ref32 = hf_logits(hf_dense_dir, torch.float32, ids)
    ref16 = hf_logits(hf_dense_dir, torch.bfloat16, ids)
    ours16 = load_model(hf_dense_dir, dtype=torch.bfloat16)(ids)
    assert rel(load_model(hf_dense_dir, dtype=torch.float32)(ids), ref32) < 1e-5
    hf_own = rel(ref16, ref32)
    assert 1e-3 < hf_own < 0.1  # bf16 really rounds
    assert rel(ours16, ref32) <= 2 * hf_own
    assert rel(ours16, ref16) < 0.05

    moe32 = hf_logits(hf_dir, torch.float32, ids)
    moe16 = load_model(hf_dir, dtype=torch.bfloat16)(ids)
    assert float(torch.nn.functional.cosine_similarity(moe16.flatten(), moe32.flatten(), dim=0)) > 0.97


def test_cached_decode_matches_transformers(hf_dir, ids):
    """Prefill + token-by-token decode with the latent cache against HF's full forward."""
    ref = hf_logits(hf_dir, torch.float32, ids)
    model = load_model(hf_dir, dtype=torch.float32)
    cache = model.new_cache(2, 13)
    steps = [model(ids[:, :6], 0, cache)] + [model(ids[:, i : i + 1], i, cache) for i in range(6, 13)]
    assert rel(torch.cat(steps, 1), ref) < 1e-5


def test_negative_controls(hf_dir, ids):
    """The comparison is sensitive: dropping YaRN or the correction bias breaks it."""
    ref = hf_logits(hf_dir, torch.float32, ids)
    no_yarn = load_model(hf_dir, dtype=torch.float32)
    dim = no_yarn.args.qk_rope_head_dim
    no_yarn.rotary.inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
    assert rel(no_yarn(ids), ref) > 1e-3
    no_bias = load_model(hf_dir, dtype=torch.float32)
    for moe in no_bias.moe_layers():
        moe.gate.bias.zero_()
    assert rel(no_bias(ids), ref) > 1e-3
