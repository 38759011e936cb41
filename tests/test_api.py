"""The MoEDeployment models: defaults, manifests, and every invalid spec names its field."""

from __future__ import annotations

import pytest
import yaml

from invalid_specs import CASES, MESSAGES, invalid_spec, tiny_spec
from moe_operator import api
from support import REPO


@pytest.mark.parametrize("path", sorted((REPO / "manifests").glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_parses(path):
    obj = yaml.safe_load(path.read_text())
    dep = api.parse_deployment(obj)
    spec = dep.spec
    p, a = spec.parallelism, spec.model.architecture
    assert p.expert_parallel_size * p.max_experts_per_gpu >= a.n_routed_experts + p.redundant_experts


def test_defaults_are_deepseek_v3():
    a = api.Architecture()
    assert (a.num_hidden_layers, a.first_k_dense_replace, a.moe_layers) == (61, 3, 58)
    assert (a.hidden_size, a.n_routed_experts, a.n_shared_experts, a.num_experts_per_tok) == (7168, 256, 1, 8)
    assert (a.n_group, a.topk_group, a.kv_lora_rank, a.qk_rope_head_dim) == (8, 4, 512, 64)
    spec = api.parse_spec({"model": {"checkpoint": {"pvcName": "w"}}})
    assert spec.parallelism.expert_parallel_size == 288 == spec.physical_experts


def test_architecture_from_hf_config_ignores_unmodelled_fields():
    cfg = {"hidden_size": 7168, "n_routed_experts": 256, "rope_scaling": {"type": "yarn"}, "model_type": "deepseek_v3"}
    assert api.Architecture.from_hf_config(cfg).hidden_size == 7168


def test_tiny_spec_is_valid():
    spec = api.parse_spec(tiny_spec())
    assert spec.parallelism.expert_parallel_size == 16 and spec.physical_experts == 16


@pytest.mark.parametrize("case,changes,field", CASES, ids=[c[0] for c in CASES])
def test_invalid_spec_names_the_field(case, changes, field):
    with pytest.raises(api.SpecError) as e:
        api.parse_spec(invalid_spec(changes))
    assert e.value.field.startswith(field), (e.value.field, str(e.value))
    assert MESSAGES.get(case, "") in e.value.message


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_attention_tp_dividing_ep_heads_and_node_is_accepted(tp):
    """The tiny model (EP16, 4 heads, 8 GPUs per node) runs attention TP 1, 2 and 4; attention DP
    defaults to EP / TP, and an explicit one must agree."""
    par = api.parse_spec(invalid_spec({"parallelism.attentionTensorParallel": tp})).parallelism
    assert (par.attention_tensor_parallel, par.attention_dp) == (tp, 16 // tp)
    explicit = invalid_spec({"parallelism.attentionTensorParallel": tp, "parallelism.attentionDataParallel": 16 // tp})
    assert api.parse_spec(explicit).parallelism.attention_dp == 16 // tp


def test_attention_tp_errors_say_the_numbers():
    with pytest.raises(api.SpecError) as e:
        api.parse_spec(invalid_spec({"parallelism.attentionTensorParallel": 8}))
    assert e.value.message == (f"{api.ATTENTION_TP_HEADS} (4 heads, attentionTensorParallel 8)")
    with pytest.raises(api.SpecError) as e:
        api.parse_spec(invalid_spec({"parallelism.attentionTensorParallel": 4, "placement.gpusPerNode": 6}))
    assert e.value.message == f"{api.ATTENTION_TP_NODE} (6 GPUs per node, attentionTensorParallel 4)"
    # TP 4 with 4 GPUs per node: a TP group fills a node
    spec = api.parse_spec(invalid_spec({"parallelism.attentionTensorParallel": 4, "placement.gpusPerNode": 4}))
    assert spec.parallelism.attention_tensor_parallel == 4


def test_there_are_at_least_25_distinct_invalid_cases():
    assert len({c[0] for c in CASES}) >= 25
    assert len({c[2] for c in CASES}) >= 25
