"""ModelArgs from Hugging Face config.json: the real 671B config, tiny ones, and clear errors."""

from __future__ import annotations

import json
import math

import pytest

from moe_common.model_args import ConfigError, ModelArgs

# deepseek-ai/DeepSeek-V3 config.json as published (auto_map shortened).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_real_deepseek_v3_config():
    a = ModelArgs.from_hf_config(DEEPSEEK_V3)
    assert (a.hidden_size, a.num_hidden_layers, a.n_routed_experts, a.num_experts_per_tok) == (7168, 61, 256, 8)
    assert a.qk_head_dim == 192
    assert a.kv_cache_width == 576  # latent 512 + rope key 64 per token per layer (notes 5.4)
    assert a.experts_per_group == 32
    assert list(a.moe_layers) == list(range(3, 61))
    assert a.quantization is not None and a.quantization.weight_block == (128, 128)
    assert a.rope_scaling is not None and a.rope_scaling.attention_factor == 1.0
    mscale = 0.1 * math.log(40) + 1
    assert a.softmax_scale == pytest.approx(192**-0.5 * mscale**2, rel=1e-12)
    assert a.extra["aux_loss_alpha"] == 0.001  # kept, unused


def test_transformers5_spelling(tiny_config):
    """save_pretrained in transformers 5 writes rope_parameters, head_dim, qk_head_dim, dtype."""
    cfg = dict(tiny_config)
    rope = cfg.pop("rope_scaling")
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = float(cfg.pop("rope_theta"))
    cfg.update(rope_parameters=rope, head_dim=16, qk_head_dim=48, dtype="bfloat16", rope_interleave=True,
               pad_token_id=None, output_router_logits=False)
    a = ModelArgs.from_hf_config(cfg)
    b = ModelArgs.from_hf_config(tiny_config)
    assert a == b


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hiden_size": 7168}, "unknown field 'hiden_size'"),
        ({"rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "alpha": 1}}, "unknown field 'rope_scaling.alpha'"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "weight_block_size"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method"),
        ({"hidden_size": "7168"}, "field 'hidden_size' must be int"),
        ({"norm_topk_prob": 1}, "field 'norm_topk_prob' must be bool"),
        ({"routed_scaling_factor": None}, "field 'routed_scaling_factor' must be float"),
        ({"topk_group": 9}, "field 'topk_group': topk_group (9) must be <= n_group (8)"),
        ({"n_group": 7}, "field 'n_group': n_group (7) must divide n_routed_experts (256)"),
        ({"num_experts_per_tok": 129}, "field 'num_experts_per_tok': num_experts_per_tok (129) must be <="),
        ({"num_key_value_heads": 1}, "'num_key_value_heads' (1) must equal 'num_attention_heads' (128)"),
        ({"first_k_dense_replace": 62}, "'first_k_dense_replace' (62) exceeds 'num_hidden_layers' (61)"),
        ({"scoring_func": "softmax"}, "field 'scoring_func' is 'softmax'"),
        ({"moe_layer_freq": 2}, "field 'moe_layer_freq'"),
        ({"model_type": "deepseek_v2"}, "field 'model_type'"),
        ({"qk_rope_head_dim": 63}, "'qk_rope_head_dim' must be even"),
        ({"kv_lora_rank": 0}, "field 'kv_lora_rank' must be positive"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "only 'yarn'"),
        ({"rope_scaling": {"type": "yarn", "factor": 40}}, "missing field 'rope_scaling.original_max_position_embeddings'"),
        ({"head_dim": 128}, "'head_dim' (128) must equal 'qk_rope_head_dim' (64)"),
    ],
)
def test_errors_name_the_field(change, message):
    cfg = {**DEEPSEEK_V3, **change}
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_hf_config(cfg)
    assert message in str(e.value)


def test_missing_field():
    cfg = dict(DEEPSEEK_V3)
    del cfg["vocab_size"]
    with pytest.raises(ConfigError, match="missing field 'vocab_size'"):
        ModelArgs.from_hf_config(cfg)


def test_no_yarn_and_no_quantization(tiny_config):
    del tiny_config["rope_scaling"]
    a = ModelArgs.from_hf_config(tiny_config)
    assert a.rope_scaling is None and a.quantization is None
    assert a.softmax_scale == pytest.approx(48**-0.5)


def test_from_file_names_the_file(tmp_path):
    good = tmp_path / "config.json"
    good.write_text(json.dumps(DEEPSEEK_V3))
    assert ModelArgs.from_file(good).vocab_size == 129280
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**DEEPSEEK_V3, "topk_group": 0}))
    with pytest.raises(ConfigError, match=r"bad\.json: field 'topk_group' must be positive"):
        ModelArgs.from_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        ModelArgs.from_file(broken)
    with pytest.raises(ConfigError, match="no such file"):
        ModelArgs.from_file(tmp_path / "absent.json")


def test_real_config_builds_with_671b_parameters():
    """The full-size model builds (on the meta device, one expert per layer) with DeepSeek's sizes."""
    from moe_worker.model import Transformer

    a = ModelArgs.from_hf_config(DEEPSEEK_V3)
    m = Transformer(a, owned_experts={layer: [0] for layer in a.moe_layers}, device="meta")
    expert = m.layers[3].ffn.experts["0"]
    expert_params = sum(p.numel() for n, p in expert.named_parameters() if not n.endswith("scale"))
    assert expert_params == 3 * 7168 * 2048  # 44.04 M (notes 5.5)
    assert sum(p.numel() * p.element_size() for p in expert.parameters()) == 3 * 7168 * 2048 + 3 * 16 * 56 * 4
    others = sum(p.numel() for n, p in m.named_parameters() if not n.endswith("scale") and ".experts." not in n)
    total = others + len(a.moe_layers) * a.n_routed_experts * expert_params
    assert total / 1e9 == pytest.approx(671.0, abs=0.1)  # report: 671 B (without the MTP layer)


# What transformers 4.x's `PretrainedConfig.to_dict()` adds to every model's dump (its generation
# defaults and bookkeeping), with the values it writes; none of them changes inference.
TRANSFORMERS4_GENERIC = {
    "return_dict": True, "output_hidden_states": False, "output_attentions": False, "torchscript": False,
    "torch_dtype": "bfloat16", "use_bfloat16": False, "tf_legacy_loss": False, "pruned_heads": {},
    "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "is_decoder": False,
    "cross_attention_hidden_size": None, "add_cross_attention": False, "tie_encoder_decoder": False,
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False,
    "return_dict_in_generate": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "architectures": ["DeepseekV3ForCausalLM"], "finetuning_task": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "tokenizer_class": None, "prefix": None, "bos_token_id": 0, "pad_token_id": None, "eos_token_id": 1,
    "sep_token_id": None, "decoder_start_token_id": None, "task_specific_params": None, "problem_type": None,
    "_name_or_path": "", "transformers_version": "4.57.1",
}


def test_a_full_to_dict_dump_is_accepted(tiny_config):
    """A config.json written by `DeepseekV3Config(...).to_dict()` (transformers 4.x adds generic
    fields such as bad_words_ids; 5.x writes its own dump) reads like the plain config."""
    plain = ModelArgs.from_hf_config(tiny_config)
    assert ModelArgs.from_hf_config({**tiny_config, **TRANSFORMERS4_GENERIC}).hidden_size == plain.hidden_size
    transformers = pytest.importorskip("transformers")
    dump = transformers.DeepseekV3Config(**{k: v for k, v in tiny_config.items() if k != "architectures"}).to_dict()
    args = ModelArgs.from_hf_config(dump)
    assert (args.hidden_size, args.n_routed_experts, args.kv_lora_rank) == (
        plain.hidden_size, plain.n_routed_experts, plain.kv_lora_rank)
    with pytest.raises(ConfigError, match="unknown field 'bad_word_ids'"):  # a typo is still an error
        ModelArgs.from_hf_config({**tiny_config, "bad_word_ids": None})
