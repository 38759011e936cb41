"""One set of routing-group rules: the worker's ModelArgs, the operator's API model and the CRD's
CEL rules all agree with `moe_common.routing.routing_errors` on every small shape."""

from __future__ import annotations

import itertools
import re

import pytest

from moe_common.model_args import ConfigError, ModelArgs
from moe_common.routing import CEL_RULES, routing_errors
from moe_operator import api

SHAPES = list(itertools.product(range(1, 17), range(1, 9), range(1, 9), range(1, 17)))  # E, G, TG, K
CAMEL = {"n_group": "nGroup", "topk_group": "topkGroup", "num_experts_per_tok": "numExpertsPerTok"}


def cel_failures(E: int, G: int, TG: int, K: int) -> set[str]:
    """The fields of the CEL rules that fail, evaluated as the API server would: these rules use
    only integer arithmetic, comparison and ||, which read the same in Python (`/` on ints is CEL's
    truncating division: //)."""
    env = {"nRoutedExperts": E, "nGroup": G, "topkGroup": TG, "numExpertsPerTok": K}
    out = set()
    for rule, _, field in CEL_RULES:
        expr = re.sub(r"self\.(\w+)", r"\1", rule).replace("||", " or ").replace(" / ", " // ")
        if not eval(expr, {}, dict(env)):  # noqa: S307 - our own constant rules
            out.add(field)
    return out


def test_the_cel_rules_and_routing_errors_agree_on_every_small_shape():
    disagree = [(s, cel_failures(*s), routing_errors(*s)) for s in SHAPES
                if cel_failures(*s) != {CAMEL[f] for f, _ in routing_errors(*s)}]
    assert not disagree, disagree[:5]
    assert sum(bool(routing_errors(*s)) for s in SHAPES) > len(SHAPES) // 2  # the rules do refuse shapes


def test_the_crd_carries_the_shared_rules():
    rules = {r["rule"] for r in api.Architecture.cel}
    assert {rule for rule, _, _ in CEL_RULES} <= rules


@pytest.mark.parametrize(("E", "G", "TG", "K"), [(16, 3, 1, 2), (16, 4, 5, 2), (8, 8, 2, 2), (16, 4, 2, 9),
                                                 (16, 4, 2, 8), (256, 8, 4, 8), (12, 1, 1, 12)])
def test_the_operator_and_the_worker_refuse_the_same_shapes(tiny_config_dict, E, G, TG, K):
    want = routing_errors(E, G, TG, K)
    cfg = {**tiny_config_dict, "n_routed_experts": E, "n_group": G, "topk_group": TG, "num_experts_per_tok": K}
    try:
        ModelArgs.from_hf_config(cfg)
        worker = None
    except ConfigError as e:
        worker = str(e)
    arch = {"nRoutedExperts": E, "nGroup": G, "topkGroup": TG, "numExpertsPerTok": K}
    try:
        api.Architecture.model_validate(arch)
        operator = None
    except (api.SpecError, ValueError) as e:
        operator = str(e)
    if not want:
        assert worker is None and operator is None
    else:
        field, message = want[0]
        assert worker is not None and f"'{field}'" in worker and message in worker
        assert operator is not None and CAMEL[field] in operator and message in operator


@pytest.fixture
def tiny_config_dict() -> dict:
    return {
        "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
    }
