"""Expert maps: PLAN.json parsing (against the operator's own writer), replica tables, the
generation switch protocol of one rank, and the replica choice per token. No processes."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch

from moe_common.model_args import ModelArgs
from moe_worker.dispatch import choose_replicas
from moe_worker.expertmap import (
    ExpertMapError,
    MapSwitcher,
    agreed_switch,
    default_map,
    parse_plan,
    read_plan_files,
    write_plan_files,
)

# tiny-ep16's routing shape: 12 experts, 3 MoE layers (layer ids 1..3).
ARGS = ModelArgs.from_hf_config({
    "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
    "moe_intermediate_size": 64, "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 4,
    "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "n_routed_experts": 12, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
})


def operator_plan(world: int, cells_per_layer: list[list[list[int]]], nodes: list[str]) -> str:
    """PLAN.json text written by the operator's own `Plan.dumps` (the format the worker must read)."""
    from moe_operator.placement import Plan, RankSlot

    width = max(len(c) for layer in cells_per_layer for c in layer)
    em = np.full((len(cells_per_layer), world, width), -1, dtype=np.int32)
    for li, layer in enumerate(cells_per_layer):
        for r, cell in enumerate(layer):
            em[li, r, : len(cell)] = cell
    gpu = {}
    ranks = []
    for r, n in enumerate(nodes):
        ranks.append(RankSlot(r, n, gpu.get(n, 0)))
        gpu[n] = gpu.get(n, 0) + 1
    return Plan(ranks=tuple(ranks), expert_map=em).dumps()


def ep16_cells(shift: int) -> list[list[list[int]]]:
    """16 ranks: experts 0..11 once each, ranks 12..15 replicas; differs per layer."""
    return [[[(r + shift + li) % 12] for r in range(16)] for li in range(3)]


def test_parse_the_operators_plan_json():
    nodes = [f"n{r // 8}" for r in range(16)]
    text = operator_plan(16, ep16_cells(0), nodes)
    m = parse_plan(text, ARGS, 16, generation=7)
    assert m.generation == 7 and m.world_size == 16 and m.moe_layers == (1, 2, 3)
    assert m.owned(13) == {1: (1,), 2: (2,), 3: (3,)}
    assert m.replicas(1)[0] == (0, 12) and m.replicas(1)[5] == (5,)
    assert m.node_index() == tuple([0] * 8 + [1] * 8)
    # Same content, same digest; a different map, a different one.
    assert parse_plan(text, ARGS, 16, 8).digest == m.digest
    assert parse_plan(operator_plan(16, ep16_cells(1), nodes), ARGS, 16, 8).digest != m.digest
    # And back: our writer round-trips through the operator's reader.
    from moe_operator.placement import Plan

    back = Plan.from_json(m.to_plan_json())
    assert [back.experts_on(0, r) for r in range(16)] == [list(c) for c in m.hosts[0]]


def test_candidates_prefer_the_tokens_node():
    # Expert 0 on ranks 0 (node a) and 3 (node b); expert 1 only on rank 1 (node a).
    hosts = [[0, 4, 8], [1, 5, 9], [2, 6, 10, 1], [0, 7, 11], [3]]
    nodes = ["a", "a", "b", "b", "c"]
    doc = {"ranks": [{"rank": r, "node": n, "gpu": nodes[:r].count(n)} for r, n in enumerate(nodes)],
           "expert_map": [hosts for _ in range(3)]}
    m = parse_plan(doc, ARGS, 5, 1)
    assert m.candidates(0, 1)[0] == (0,)  # own node a
    assert m.candidates(2, 1)[0] == (3,)  # own node b
    assert m.candidates(4, 1)[0] == (0, 3)  # node c has none: all replicas
    assert m.candidates(3, 1)[1] == (2,)  # expert 1 on ranks 1 (a) and 2 (b): rank 3 is on b
    cand, n = m.route_table(4, 1)
    assert cand.shape == (12, 2) and cand[0].tolist() == [0, 3] and n[0] == 2 and cand[5].tolist() == [1, -1]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: [d.update(ranks=d["ranks"][:3])] + [layer.pop() for layer in d["expert_map"]],
         "plan has 3 ranks, the EP group has 4"),
        (lambda d: d.update(ranks=d["ranks"][:3]), "plan expert_map layer 0 must list 3 ranks"),
        (lambda d: d["ranks"][1].update(gpu=d["ranks"][0]["gpu"], node=d["ranks"][0]["node"]), "same (node, gpu)"),
        (lambda d: d["expert_map"].pop(), "2 layers, the model has 3 MoE layers"),
        (lambda d: d["expert_map"][1][2].append(12), "layer 1 rank 2: expert ids [12] outside 0..11"),
        (lambda d: d["expert_map"][0][0].remove(0), "layer 0 hosts no replica of experts [0]"),
        (lambda d: d["expert_map"][2][3].append(True), "layer 2 rank 3: expected a list of integer expert ids"),
        (lambda d: d["ranks"][1].update(rank=5), "numbered 0..G-1 in order; entry #1 is rank 5"),
    ],
)
def test_plans_the_group_cannot_serve_are_refused(mutate, message):
    doc = default_map(ARGS, 4).to_plan_json()
    mutate(doc)
    with pytest.raises(ExpertMapError, match=re.escape(message)):
        parse_plan(doc, ARGS, 4, 1)
    with pytest.raises(ExpertMapError, match="not valid JSON"):
        parse_plan("{", ARGS, 4, 1)


def test_duplicates_count_once_and_empty_ranks_are_allowed():
    doc = default_map(ARGS, 16).to_plan_json()
    for layer in doc["expert_map"]:
        layer[12], layer[13] = [], [3, 3]
    m = parse_plan(doc, ARGS, 16, 2)
    assert m.owned(12)[1] == () and m.owned(13)[1] == (3,)


def test_default_maps():
    m4 = default_map(ARGS, 4)
    assert m4.hosts[0] == ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11))
    m16 = default_map(ARGS, 16, gpus_per_node=8)
    assert [c[0] for c in m16.hosts[0]] == [*range(12), 0, 1, 2, 3]
    assert m16.nodes[7] == "node-0" and m16.nodes[8] == "node-1"
    assert m16.candidates(9, 1)[1] == (13,)  # expert 1 on ranks 1 (node 0) and 13 (node 1)


def test_plan_files_and_generation(tmp_path):
    path = write_plan_files(tmp_path, default_map(ARGS, 4), 3)
    gen, text = read_plan_files(path)
    assert gen == 3 and parse_plan(text, ARGS, 4, gen).hosts == default_map(ARGS, 4).hosts
    (tmp_path / "generation").unlink()
    assert read_plan_files(path)[0] is None
    doc = json.loads(path.read_text()) | {"generation": 9}
    path.write_text(json.dumps(doc))
    assert read_plan_files(path)[0] == 9
    (tmp_path / "generation").write_text("x\n")
    with pytest.raises(ExpertMapError, match="generation must be an integer"):
        read_plan_files(path)


def _shifted(shift: int, world: int = 4) -> dict:
    m = default_map(ARGS, world).to_plan_json()
    m["expert_map"] = [[[(e + shift) % 12 for e in cell] for cell in layer] for layer in m["expert_map"]]
    return m


def test_switcher_stages_newer_generations_and_takes_them(tmp_path):
    loads = []

    def load(added):
        loads.append(added)
        return {layer: {e: f"expert {layer}.{e}" for e in ids} for layer, ids in added.items()}

    plan = write_plan_files(tmp_path, default_map(ARGS, 4, generation=1), 1)
    sw = MapSwitcher(parse_plan(plan.read_text(), ARGS, 4, 1), 1, ARGS, plan_path=plan, load_experts=load,
                     poll_interval_s=0, background=False)
    sw.poll()
    assert sw.staged is None and sw.staged_key() == (1, sw.current.digest) and loads == []

    write_plan_files(tmp_path, _shifted(1), 2)
    sw.poll()
    assert sw.staged_key()[0] == 2 and sw.current.generation == 1
    assert loads == [{1: (6,), 2: (6,), 3: (6,)}]  # rank 1 held 3,4,5; now 4,5,6: only 6 is new
    assert sw.staged.experts[2] == {6: "expert 2.6"}
    sw.poll()  # the same generation again: nothing new
    assert len(loads) == 1
    with pytest.raises(RuntimeError, match="told to switch to generation 3, staged 2"):
        sw.take(3)
    staged = sw.take(2)
    assert sw.current.generation == 2 and staged.emap.owned(1)[1] == (4, 5, 6) and sw.staged is None

    write_plan_files(tmp_path, _shifted(0), 1)  # an older generation is ignored
    sw.poll()
    assert sw.staged is None and len(loads) == 1


def test_switcher_keeps_the_old_map_when_loading_fails(tmp_path):
    errors = []

    def load(added):
        raise OSError("disk on fire")

    plan = write_plan_files(tmp_path, default_map(ARGS, 4), 1)
    sw = MapSwitcher(parse_plan(plan.read_text(), ARGS, 4, 1), 2, ARGS, plan_path=plan, load_experts=load,
                     poll_interval_s=0, background=True, on_error=errors.append)
    write_plan_files(tmp_path, _shifted(5), 2)
    sw.poll()
    sw.wait_idle(10)
    assert sw.current.generation == 1 and sw.staged is None and sw.failed == {2}
    assert len(errors) == 1 and "generation 2: loading experts failed: OSError: disk on fire" in errors[0]
    assert "keeping generation 1" in errors[0]
    sw.poll()  # a failed generation is not retried
    sw.wait_idle(10)
    assert len(errors) == 1
    write_plan_files(tmp_path, {"ranks": [], "expert_map": []}, 3)  # unparseable for this group
    sw.poll()
    assert sw.failed == {2, 3} and "plan has 0 ranks, the EP group has 4" in errors[-1]


def test_switcher_background_load_is_staged_at_a_later_poll(tmp_path):
    gate = threading.Event()

    def load(added):
        gate.wait(10)
        return {layer: dict.fromkeys(ids, "m") for layer, ids in added.items()}

    plan = write_plan_files(tmp_path, default_map(ARGS, 4), 1)
    sw = MapSwitcher(parse_plan(plan.read_text(), ARGS, 4, 1), 0, ARGS, plan_path=plan, load_experts=load,
                     poll_interval_s=0, background=True)
    write_plan_files(tmp_path, _shifted(3), 2)
    sw.poll()
    assert sw.staged_key()[0] == 1  # still loading: serving and reporting generation 1
    gate.set()
    sw.wait_idle(10)
    assert sw.staged_key()[0] == 2


def test_agreement_needs_every_rank_on_the_same_newer_map():
    a, b = (2, "d2"), (3, "d3")
    assert agreed_switch(1, [a, a, a]) == 2
    assert agreed_switch(1, [a, a, (1, "d1")]) is None  # a rank has not staged it (or failed)
    assert agreed_switch(1, [a, b, a]) is None  # ranks saw different generations: wait
    assert agreed_switch(1, [a, (2, "other"), a]) is None  # same number, different content
    assert agreed_switch(2, [a, a]) is None  # already served


def test_replica_choice_is_balanced_per_sender():
    # Expert 0 has 3 candidates, expert 1 one, expert 2 two.
    cand = torch.tensor([[4, 5, 6], [7, -1, -1], [8, 9, -1]])
    ncand = torch.tensor([3, 1, 2])
    g = torch.Generator().manual_seed(0)
    flat = torch.randint(0, 3, (1000,), generator=g)
    for rank in (0, 1, 2):
        dest = choose_replicas(flat, cand, ncand, rank)
        for e, reps in ((0, [4, 5, 6]), (1, [7]), (2, [8, 9])):
            got = torch.bincount(dest[flat == e], minlength=10)[reps]
            assert int(got.sum()) == int((flat == e).sum()) and int(got.max() - got.min()) <= 1
        # The i-th pair of an expert goes to candidate (i + rank) mod n.
        first0 = int(torch.nonzero(flat == 0)[0])
        assert int(dest[first0]) == [4, 5, 6][rank % 3]


def test_a_generation_loaded_while_the_group_switches_to_the_staged_one_has_every_expert(tmp_path):
    """g2 is staged, g3 loads in the background, the group takes g2 meanwhile: g3 must bring back
    the experts g2 dropped (it was once computed against g1 only, which still held them)."""
    gate = threading.Event()
    loads = []

    def load(added):
        loads.append(added)
        if len(loads) == 2:  # g3's load finishes only after the group has switched to g2
            gate.wait(10)
        return {layer: {e: f"expert {layer}.{e}" for e in ids} for layer, ids in added.items()}

    plan = write_plan_files(tmp_path, default_map(ARGS, 4, generation=1), 1)
    sw = MapSwitcher(parse_plan(plan.read_text(), ARGS, 4, 1), 1, ARGS, plan_path=plan, load_experts=load,
                     poll_interval_s=0, background=True)
    assert sw.current.owned(1)[1] == (3, 4, 5)
    write_plan_files(tmp_path, _shifted(1), 2)  # rank 1: 4, 5, 6 (drops 3)
    sw.poll()
    sw.wait_idle(10)
    assert sw.staged_key()[0] == 2
    write_plan_files(tmp_path, _shifted(0), 3)  # rank 1: 3, 4, 5 again
    sw.poll()
    assert sw._loading == 3
    sw.take(2)
    gate.set()
    sw.wait_idle(10)
    staged = sw.take(3)
    assert loads[1] == {1: (3,), 2: (3,), 3: (3,)}  # what g3 adds over what both g1 and g2 hold
    for layer in (1, 2, 3):
        assert set(staged.experts[layer]) == {3}


def test_a_bad_or_older_generation_is_reported_once_not_at_every_poll(tmp_path):
    errors = []
    plan = write_plan_files(tmp_path, default_map(ARGS, 4), 3)
    sw = MapSwitcher(parse_plan(plan.read_text(), ARGS, 4, 3), 0, ARGS, plan_path=plan,
                     load_experts=lambda added: {}, poll_interval_s=0, background=False, on_error=errors.append)
    (tmp_path / "generation").write_text("2.5\n")  # the operator's non-integer generation
    for _ in range(50):
        sw.poll()
    assert len(errors) == 1 and "generation must be an integer" in errors[0] and len(sw.errors) == 1
    write_plan_files(tmp_path, _shifted(0), 1)  # a reset operator: the generation went backwards
    for _ in range(50):
        sw.poll()
    assert len(errors) == 2 and "generation 1 is older than the generation this rank serves" in errors[1]
    assert sw.current.generation == 3 and sw.staged is None
    write_plan_files(tmp_path, _shifted(1), 4)  # repaired: taken as usual
    sw.poll()
    assert sw.staged_key()[0] == 4 and len(errors) == 2
    (tmp_path / "generation").write_text("x\n")  # broken again: reported again, once
    for _ in range(10):
        sw.poll()
    assert len(errors) == 3
    for i in range(300):  # the window of kept errors is bounded
        sw._fail(None, f"error {i}")
    assert len(sw.errors) == 100 and sw.errors[-1].endswith("error 299; keeping generation 3")
