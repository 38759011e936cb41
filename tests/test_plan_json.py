"""PLAN.json has one definition (`moe_common.plan_json`): the planner's writer and reader and the
ranks' reader all go through it, so a document one accepts the other reads the same way."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_common import plan_json
from moe_common.model_args import ModelArgs
from moe_operator.placement import PlacementError, Plan, RankSlot
from moe_worker.expertmap import ExpertMapError, parse_plan

DOC = {"ranks": [{"rank": 0, "node": "a", "gpu": 0}, {"rank": 1, "node": "a", "gpu": 1},
                 {"rank": 2, "node": "b", "gpu": 0}],
       "expert_map": [[[0, 3], [1], [2, 0]], [[1], [2, 3], [0]]], "metrics": {"imbalance": 1.5}, "generation": 7}


def test_round_trip_and_both_readers():
    text = plan_json.dumps(DOC)
    d = plan_json.loads(text)
    assert json.loads(text) == DOC and d.generation == 7 and d.ranks[2] == plan_json.PlanRank(2, "b", 0)
    assert d.expert_map[0] == ((0, 3), (1,), (2, 0))
    plan = Plan.from_json(text)
    assert plan.experts_on(0, 2) == [2, 0] and plan.dumps() == plan_json.dumps(plan.to_json())
    args = ModelArgs.from_hf_config({
        "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 2,
        "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 64})
    m = parse_plan(plan.dumps(), args, 3, 7)
    assert m.hosts[0] == ((0, 3), (1,), (0, 2)) and m.nodes == ("a", "a", "b")


@pytest.mark.parametrize(("change", "message"), [
    ({"generation": "7"}, "generation must be an integer"),
    ({"expert_map": [[[0, True], [1], [2]]]}, "layer 0 rank 0: expected a list of integer expert ids"),
    ({"ranks": [{"rank": 0, "node": "a", "gpu": -1}]}, "integer 'gpu' >= 0"),
    ({"metrics": [1]}, "metrics must be an object"),
    ({"expert_map": {}}, "must be a list of MoE layers"),
])
def test_one_set_of_structure_errors_for_both_readers(change, message):
    doc = {**DOC, **change}
    with pytest.raises(plan_json.PlanFormatError, match=message):
        plan_json.loads(doc)
    with pytest.raises(PlacementError, match=message):
        Plan.from_json(doc)


def test_the_planners_plan_is_written_through_it():
    plan = Plan(ranks=(RankSlot(0, "a", 0), RankSlot(1, "b", 0)), expert_map=np.array([[[0, -1], [1, 2]]]))
    assert plan_json.loads(plan.dumps()).expert_map == (((0,), (1, 2)),)
    with pytest.raises(ExpertMapError, match="plan has 2 ranks, the EP group has 3"):
        parse_plan(plan.dumps(), None, 3, 1)  # type: ignore[arg-type]
