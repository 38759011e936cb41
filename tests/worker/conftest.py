"""Shared fixtures of the worker tests: tiny DeepSeek-V3 configs and random checkpoints.

TINY has dimensions that are not multiples of 128 (hidden 320, q_lora 96, kv_a out 80, expert
width 96) so FP8 partial blocks are exercised, and DeepSeek-V3's YaRN settings.
"""

from __future__ import annotations

import copy

import pytest

from moe_worker.checkpoint import make_checkpoint

TINY: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 256,
    "hidden_size": 320,
    "intermediate_size": 256,
    "moe_intermediate_size": 96,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
}


@pytest.fixture
def tiny_config() -> dict:
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def bf16_ckpt(tmp_path_factory):
    return make_checkpoint(TINY, tmp_path_factory.mktemp("bf16") / "ckpt", dtype="bf16", seed=0)


@pytest.fixture(scope="session")
def fp8_ckpt(tmp_path_factory):
    return make_checkpoint(TINY, tmp_path_factory.mktemp("fp8") / "ckpt", dtype="fp8", seed=0)
