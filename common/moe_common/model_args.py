"""`ModelArgs`: the whole DeepSeek-V3 model configuration, read from a Hugging Face `config.json`.

The one definition of the model shape: the worker builds its model from it, and the operator checks
a MoEDeployment's `spec.model.architecture` with it at admission (`api.Architecture`). Validated
once, here: an unknown field, a field of the wrong type, or fields that contradict each other raise
`ConfigError` naming the field. Everything after trusts a `ModelArgs`. No torch.

Both spellings Hugging Face has used are accepted: `rope_theta` + `rope_scaling: {"type": "yarn"}`
(DeepSeek's published config, transformers 4.x) and `rope_parameters: {"rope_type": "yarn",
"rope_theta": ...}` (what transformers 5.x writes with `save_pretrained`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .routing import routing_errors

FP8_BLOCK = 128
"""Side of the square weight blocks and length of the activation groups that share one FP8 scale."""


class ConfigError(ValueError):
    """A config.json that does not describe a DeepSeek-V3 model this worker can run."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension as DeepSeek-V3 configures it (`rope_scaling` / `rope_parameters`)."""

    factor: float
    """Ratio of the extended context to the pretraining context (40 for DeepSeek-V3)."""
    original_max_position_embeddings: int
    """Context length the model was pretrained with (4096)."""
    beta_fast: float = 32.0
    """Rotations above which a frequency is kept unscaled (extrapolated)."""
    beta_slow: float = 1.0
    """Rotations below which a frequency is fully interpolated (divided by `factor`)."""
    mscale: float | None = None
    """Numerator of the attention factor applied to cos/sin (see `attention_factor`)."""
    mscale_all_dim: float | None = None
    """Scales the softmax by `yarn_mscale(factor, mscale_all_dim)**2` and is the cos/sin denominator."""

    @property
    def attention_factor(self) -> float:
        """Multiplier of cos and sin; 1.0 for DeepSeek-V3 (mscale == mscale_all_dim). HF's rule."""
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


@dataclass(frozen=True)
class Fp8Format:
    """`quantization_config` of DeepSeek's FP8 checkpoints (README_WEIGHTS.md)."""

    weight_block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
    """Weight block covered by one `weight_scale_inv` entry; only 128x128 is supported."""
    scale_fmt: str | None = None
    """None: activation scales are any fp32; "ue8m0": rounded up to a power of two (V3.1)."""


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(scale) + 1` (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def o_proj_splits(num_attention_heads: int, v_head_dim: int, attention_tp: int, fp8: bool) -> bool:
    """Whether attention TP `attention_tp` splits o_proj's columns by head over a TP group (the
    worker's `MLA.o_split`, the performance model's memory): always, except an FP8 o_proj whose
    columns per rank are not whole 128-column blocks. FP8 quantizes o_proj's input per token per
    128 columns, and a block cut between ranks would round differently from the unsharded model,
    so such an o_proj stays whole on every rank. DeepSeek-V3's 16384 columns split at TP 2-8."""
    return attention_tp == 1 or not fp8 or num_attention_heads // attention_tp * v_head_dim % FP8_BLOCK == 0


@dataclass(frozen=True)
class ModelArgs:
    """A DeepSeek-V3-class MoE transformer. Field names are those of the HF `config.json`."""

    vocab_size: int
    """Rows of the embedding and of the output head (129280)."""
    hidden_size: int
    """Model width, the `dim` of DeepSeek's reference code (7168)."""
    intermediate_size: int
    """Hidden width of the dense SwiGLU MLP of the first `first_k_dense_replace` layers (18432)."""
    moe_intermediate_size: int
    """Hidden width of one routed expert, and of the shared expert per `n_shared_experts` (2048)."""
    num_hidden_layers: int
    """Transformer blocks, not counting the multi-token-prediction layers (61)."""
    first_k_dense_replace: int
    """The first this many layers use the dense MLP, all later layers are MoE (3)."""
    num_attention_heads: int
    """MLA query heads (128); K and V have as many heads, expanded from the latent."""
    q_lora_rank: int | None
    """Rank of the low-rank query projection (1536); None: one dense query projection."""
    kv_lora_rank: int
    """Width of the compressed KV latent that the absorbed attention caches (512)."""
    qk_nope_head_dim: int
    """Per-head query/key dimensions without rotary embedding (128)."""
    qk_rope_head_dim: int
    """Per-head query/key dimensions with rotary embedding; the key part is shared by all heads (64)."""
    v_head_dim: int
    """Per-head value dimension (128)."""
    n_routed_experts: int
    """Routed experts per MoE layer (256)."""
    n_shared_experts: int
    """Shared experts per MoE layer, fused into one MLP of width n * moe_intermediate_size (1)."""
    num_experts_per_tok: int
    """Routed experts chosen per token, top-k (8)."""
    n_group: int
    """Expert groups for group-limited routing (8)."""
    topk_group: int
    """Groups a token may draw its experts from (4)."""
    routed_scaling_factor: float
    """Multiplier of the normalised routing weights (2.5)."""
    norm_topk_prob: bool
    """Normalise the top-k sigmoid scores to sum to one before scaling (true)."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm (1e-6)."""
    max_position_embeddings: int
    """Longest context the configuration supports (163840)."""
    rope_theta: float
    """Base of the rotary frequencies (10000)."""
    rope_scaling: YarnScaling | None
    """YaRN parameters, or None for plain RoPE."""
    tie_word_embeddings: bool = False
    """Output head shares the embedding matrix (false for DeepSeek-V3)."""
    num_nextn_predict_layers: int = 0
    """Multi-token-prediction layers stored after the main layers; ignored by this worker (1)."""
    quantization: Fp8Format | None = None
    """FP8 block quantization of the linear weights, or None for bf16 checkpoints."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Accepted-but-unused fields of the config (HF bookkeeping, training-only knobs)."""

    # ---- derived ----
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: nope + rope (192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_width(self) -> int:
        """Values the absorbed attention caches per token per layer: latent + rope key (576)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times yarn_mscale(factor, mscale_all_dim)**2 under YaRN (HF and reference)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def experts_per_group(self) -> int:
        """Routed experts in one routing group (32)."""
        return self.n_routed_experts // self.n_group

    def is_moe_layer(self, layer: int) -> bool:
        """Layer `layer` (0-based) has an MoE feed-forward; earlier ones have the dense MLP."""
        return layer >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> range:
        """Ids of the MoE layers (3..60 for DeepSeek-V3)."""
        return range(self.first_k_dense_replace, self.num_hidden_layers)

    # ---- reading ----
    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        """Read and validate a config.json; errors name the file and the field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_config(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Validate a Hugging Face DeepSeek-V3 config dict (any size) and build ModelArgs."""
        if not isinstance(config, dict):
            raise ConfigError("config must be a JSON object")
        return _parse(dict(config))


# ---------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------

# Fields read into ModelArgs: name -> (type, required). `rope_*` and `quantization_config` are
# parsed separately.
_FIELDS: dict[str, tuple[type, bool]] = {
    "vocab_size": (int, True),
    "hidden_size": (int, True),
    "intermediate_size": (int, True),
    "moe_intermediate_size": (int, True),
    "num_hidden_layers": (int, True),
    "first_k_dense_replace": (int, True),
    "num_attention_heads": (int, True),
    "kv_lora_rank": (int, True),
    "qk_nope_head_dim": (int, True),
    "qk_rope_head_dim": (int, True),
    "v_head_dim": (int, True),
    "n_routed_experts": (int, True),
    "n_shared_experts": (int, True),
    "num_experts_per_tok": (int, True),
    "n_group": (int, True),
    "topk_group": (int, True),
    "routed_scaling_factor": (float, True),
    "norm_topk_prob": (bool, True),
    "rms_norm_eps": (float, True),
    "max_position_embeddings": (int, True),
    "tie_word_embeddings": (bool, False),
    "num_nextn_predict_layers": (int, False),
}

# Fields that must hold one value because the model only implements that behaviour:
# name -> (allowed values, why).
_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "model_type": (("deepseek_v3",), "only DeepSeek-V3 models are supported"),
    "hidden_act": (("silu",), "experts are SwiGLU"),
    "scoring_func": (("sigmoid",), "the DeepSeek-V3 gate scores with a sigmoid"),
    "topk_method": (("noaux_tc",), "routing is DeepSeek-V3's bias-corrected group-limited top-k"),
    "moe_layer_freq": ((1,), "every layer after first_k_dense_replace is MoE"),
    "attention_bias": ((False,), "MLA projections have no bias"),
    "rope_interleave": ((True,), "DeepSeek-V3 checkpoints rotate interleaved pairs"),
}

# Accepted and ignored: HF bookkeeping and training-only fields (they do not change inference).
_IGNORED = frozenset(
    {
        "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
        "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "pretraining_tp",
        "aux_loss_alpha", "seq_aux", "ep_size", "attention_dropout", "output_router_logits",
        "router_aux_loss_coef", "return_dict", "output_hidden_states", "output_attentions",
        "torchscript", "id2label", "label2id", "problem_type", "tokenizer_class", "is_encoder_decoder",
        "chunk_size_feed_forward", "tie_encoder_decoder", "add_cross_attention", "is_decoder",
        "decoder_start_token_id", "sep_token_id", "task_specific_params", "finetuning_task", "prefix",
        "pruned_heads", "tf_legacy_loss", "use_bfloat16", "max_length",
        # transformers 4.x `PretrainedConfig.to_dict()` also writes its generation defaults
        "cross_attention_hidden_size", "min_length", "do_sample", "early_stopping", "num_beams",
        "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
        "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
        "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    }
)

_YARN_KEYS = {
    "type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "rope_theta", "truncate",
}
_QUANT_KEYS = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt", "modules_to_not_convert"}


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:  # float: JSON writes 2.5 and 40 alike
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    if not ok:
        raise ConfigError(f"field '{name}' must be {kind.__name__}, got {type(value).__name__} {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"field '{name}' must be finite, got {value!r}")
    return value


def _parse(cfg: dict[str, Any]) -> ModelArgs:
    for name in sorted(cfg):
        known = (
            name in _FIELDS or name in _FIXED or name in _IGNORED or name.startswith("_")
            or name in {"q_lora_rank", "num_key_value_heads", "head_dim", "qk_head_dim",
                        "rope_theta", "rope_scaling", "rope_parameters", "quantization_config"}
        )
        if not known:
            raise ConfigError(f"unknown field '{name}' (not a DeepSeek-V3 config field)")

    values: dict[str, Any] = {}
    for name, (kind, required) in _FIELDS.items():
        if name not in cfg:
            if required:
                raise ConfigError(f"missing field '{name}'")
            continue
        values[name] = _typed(name, cfg[name], kind)

    for name, (allowed, why) in _FIXED.items():
        if name in cfg and cfg[name] not in allowed:
            raise ConfigError(f"field '{name}' is {cfg[name]!r}; only {allowed[0]!r} is supported ({why})")

    q_lora = cfg.get("q_lora_rank")
    values["q_lora_rank"] = None if q_lora is None else _typed("q_lora_rank", q_lora, int)
    extra = {k: cfg[k] for k in cfg if k in _IGNORED or k.startswith("_")}

    rope_theta, rope_scaling = _parse_rope(cfg)
    args = ModelArgs(
        **values,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        quantization=_parse_quant(cfg.get("quantization_config")),
        extra=extra,
    )
    _check(args, cfg)
    return args


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    if "rope_scaling" in cfg and "rope_parameters" in cfg and cfg["rope_scaling"] is not None:
        raise ConfigError("give either 'rope_scaling' or 'rope_parameters', not both")
    key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
    params = cfg.get(key)
    theta = cfg.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"field '{key}' must be an object, got {params!r}")
        for k in params:
            if k not in _YARN_KEYS:
                raise ConfigError(f"unknown field '{key}.{k}'")
        if "rope_theta" in params:
            if theta is not None and float(params["rope_theta"]) != float(theta):
                raise ConfigError(f"'{key}.rope_theta' ({params['rope_theta']}) != 'rope_theta' ({theta})")
            theta = params["rope_theta"]
    if theta is None:
        theta = 10000.0  # HF DeepseekV3Config default
    theta = _typed("rope_theta", theta, float)
    if theta <= 1:
        raise ConfigError(f"field 'rope_theta' must be > 1, got {theta}")
    if params is None:
        return theta, None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"field '{key}.type' is {kind!r}; only 'yarn' (or none) is supported")
    if params.get("truncate", True) is not True:
        raise ConfigError(f"field '{key}.truncate' must be true (DeepSeek rounds the YaRN correction range)")
    for k in ("factor", "original_max_position_embeddings"):
        if k not in params:
            raise ConfigError(f"missing field '{key}.{k}' (required for yarn)")
    yarn = YarnScaling(
        factor=_typed(f"{key}.factor", params["factor"], float),
        original_max_position_embeddings=_typed(
            f"{key}.original_max_position_embeddings", params["original_max_position_embeddings"], int
        ),
        beta_fast=_typed(f"{key}.beta_fast", params.get("beta_fast", 32.0), float),
        beta_slow=_typed(f"{key}.beta_slow", params.get("beta_slow", 1.0), float),
        mscale=None if params.get("mscale") is None else _typed(f"{key}.mscale", params["mscale"], float),
        mscale_all_dim=None
        if params.get("mscale_all_dim") is None
        else _typed(f"{key}.mscale_all_dim", params["mscale_all_dim"], float),
    )
    if yarn.factor < 1:
        raise ConfigError(f"field '{key}.factor' must be >= 1, got {yarn.factor}")
    if yarn.original_max_position_embeddings <= 0:
        raise ConfigError(f"field '{key}.original_max_position_embeddings' must be positive")
    if yarn.beta_fast <= yarn.beta_slow or yarn.beta_slow <= 0:
        raise ConfigError(f"fields '{key}.beta_fast' > '{key}.beta_slow' > 0 required")
    return theta, yarn


def _parse_quant(q: Any) -> Fp8Format | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"field 'quantization_config' must be an object, got {q!r}")
    for k in q:
        if k not in _QUANT_KEYS:
            raise ConfigError(f"unknown field 'quantization_config.{k}'")
    expect = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    for k, v in expect.items():
        if k in q and q[k] != v:
            raise ConfigError(f"field 'quantization_config.{k}' is {q[k]!r}; only {v!r} is supported")
    if "quant_method" not in q:
        raise ConfigError("missing field 'quantization_config.quant_method'")
    block = q.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    if list(block) != [FP8_BLOCK, FP8_BLOCK]:
        raise ConfigError(f"field 'quantization_config.weight_block_size' is {block!r}; only [128, 128] is supported")
    if q.get("modules_to_not_convert"):
        raise ConfigError("field 'quantization_config.modules_to_not_convert' is not supported")
    scale_fmt = q.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"field 'quantization_config.scale_fmt' is {scale_fmt!r}; expected null or 'ue8m0'")
    return Fp8Format(scale_fmt=scale_fmt)


def _check(a: ModelArgs, cfg: dict[str, Any]) -> None:
    """Cross-field consistency; each message names the fields involved."""
    positive = [
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
    ]
    for name in positive:
        if getattr(a, name) <= 0:
            raise ConfigError(f"field '{name}' must be positive, got {getattr(a, name)}")
    for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        if getattr(a, name) < 0:
            raise ConfigError(f"field '{name}' must be >= 0, got {getattr(a, name)}")
    if a.q_lora_rank is not None and a.q_lora_rank <= 0:
        raise ConfigError(f"field 'q_lora_rank' must be positive or null, got {a.q_lora_rank}")
    if a.rms_norm_eps <= 0 or a.routed_scaling_factor <= 0:
        raise ConfigError("fields 'rms_norm_eps' and 'routed_scaling_factor' must be positive")
    if a.qk_rope_head_dim % 2:
        raise ConfigError(f"field 'qk_rope_head_dim' must be even (rotated in pairs), got {a.qk_rope_head_dim}")
    if a.first_k_dense_replace > a.num_hidden_layers:
        raise ConfigError(
            f"field 'first_k_dense_replace' ({a.first_k_dense_replace}) exceeds 'num_hidden_layers' "
            f"({a.num_hidden_layers})"
        )
    routing = routing_errors(a.n_routed_experts, a.n_group, a.topk_group, a.num_experts_per_tok)
    if routing:
        raise ConfigError(f"field '{routing[0][0]}': {routing[0][1]}")
    heads_kv = cfg.get("num_key_value_heads")
    if heads_kv is not None and heads_kv != a.num_attention_heads:
        raise ConfigError(
            f"'num_key_value_heads' ({heads_kv}) must equal 'num_attention_heads' ({a.num_attention_heads}): "
            "MLA expands K and V for every head"
        )
    if cfg.get("head_dim") is not None and cfg["head_dim"] != a.qk_rope_head_dim:
        raise ConfigError(f"'head_dim' ({cfg['head_dim']}) must equal 'qk_rope_head_dim' ({a.qk_rope_head_dim})")
    if cfg.get("qk_head_dim") is not None and cfg["qk_head_dim"] != a.qk_head_dim:
        raise ConfigError(
            f"'qk_head_dim' ({cfg['qk_head_dim']}) must equal 'qk_nope_head_dim' + 'qk_rope_head_dim' "
            f"({a.qk_head_dim})"
        )
