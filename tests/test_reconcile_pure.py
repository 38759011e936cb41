"""Pure helpers of the reconcile loop: rank numbering across re-plans and resizes, degraded groups."""

from __future__ import annotations

from moe_operator.controller.reconcile import (
    degradation_events,
    degraded_groups,
    degraded_message,
    keep_rank_numbers,
    scaling_moves,
)
from moe_operator.placement import MoEShape, plan
from moe_operator.topology import Topology

SHAPE = MoEShape(moe_layers=3, n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=4)


def _nodes(p):
    return [r.node for r in p.ranks]


def test_growing_keeps_every_old_rank_number_on_its_node_and_appends_the_new_ones():
    small = plan(SHAPE, Topology.synthetic(2, 8), redundant=4)
    big = keep_rank_numbers(plan(SHAPE, Topology.synthetic(3, 8), previous=small, redundant=8), small)
    assert big.num_ranks == 20
    assert _nodes(big)[:16] == _nodes(small)
    assert [r.rank for r in big.ranks] == list(range(20))
    # every old rank keeps its experts unless the planner moved them; new ranks count fully
    assert scaling_moves(small, big) >= int((big.expert_map[:, 16:, :] >= 0).sum())


def test_shrinking_keeps_the_low_numbers_and_drops_the_high_ones():
    big = plan(SHAPE, Topology.synthetic(3, 8), redundant=8)
    base = Topology.synthetic(3, 8)
    small = keep_rank_numbers(plan(SHAPE, base, previous=big, redundant=4), big)
    assert small.num_ranks == 16
    by_node_big: dict[str, set[int]] = {}
    for r in big.ranks:
        by_node_big.setdefault(r.node, set()).add(r.rank)
    for r in small.ranks:  # each remaining rank number sits on a node that had it before, where possible
        if r.rank in by_node_big.get(r.node, set()):
            continue
        assert all(n >= 16 for n in by_node_big.get(r.node, set())), (r, by_node_big)


def test_same_size_replan_after_a_node_loss_keeps_surviving_ranks():
    p = plan(SHAPE, Topology.synthetic(3, 8), redundant=4)
    lost = p.ranks[0].node
    q = keep_rank_numbers(plan(SHAPE, Topology.synthetic(3, 8).without_nodes([lost]), previous=p, redundant=4), p)
    for r in p.ranks:
        if r.node != lost:
            assert q.ranks[r.rank].node == r.node


def _pod(ns, dep, node=None, pinned=None, gpus=1, phase="Pending"):
    spec = {"containers": [{"resources": {"requests": {"nvidia.com/gpu": str(gpus)}}}]}
    if node:
        spec["nodeName"] = node
    if pinned:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [pinned]}]}]}}}
    labels = {"moe.dev/deployment": dep} if dep else {}
    return {"metadata": {"namespace": ns, "labels": labels}, "spec": spec, "status": {"phase": phase}}


def test_claimed_gpus_count_pending_pods_pinned_to_a_node_and_other_deployments_plans():
    from moe_operator.controller.reconcile import claimed_gpus

    pods = [
        *[_pod("a", "x", pinned="n1") for _ in range(8)],  # deployment x's rank pods, created, not bound yet
        *[_pod("a", "x", node="n2", pinned="n2", phase="Running") for _ in range(3)],
        _pod("b", None, node="n3", gpus=2, phase="Running"),  # some other workload
        _pod("b", None, gpus=4),  # pending, free to go anywhere: takes nothing yet
        _pod("b", None, node="n3", gpus=4, phase="Succeeded"),  # finished
    ]
    assert claimed_gpus(pods, {}, "nvidia.com/gpu") == {"n1": 8, "n2": 3, "n3": 2}
    # Deployment y published a plan on n4 and n2 whose pods do not exist yet; x's plan holds 5 on n2
    # (2 ranks not created yet): each deployment counts the larger of its pods and its plan per node.
    plans = {("a", "y"): {"n4": 8, "n2": 1}, ("a", "x"): {"n1": 8, "n2": 5}}
    assert claimed_gpus(pods, plans, "nvidia.com/gpu") == {"n1": 8, "n2": 6, "n3": 2, "n4": 8}


def _name(g: int, r: int) -> str:
    return f"d-g{g}-r{r}"


def test_degraded_groups_keep_each_ranks_since_and_tolerate_a_garbled_status():
    old = [{"group": 0, "since": "T0", "missingRanks": [{"rank": 5, "since": "T0", "reason": "pod gone"}]},
           "garbage", {"group": "1"}, {"group": 1, "missingRanks": "x"}]
    (g0, g1) = degraded_groups([{5: "not Ready", 9: "pod Failed, exit code 137"}, {0: "pod gone"}], 16, old, "T1")
    assert (g0.since, [(m.rank, m.since, m.reason) for m in g0.missing_ranks]) == (
        "T0", [(5, "T0", "not Ready"), (9, "T1", "pod Failed, exit code 137")])
    assert (g1.group, g1.since, g1.ready_ranks, g1.ranks) == (1, "T1", 15, 16)
    assert degraded_groups([{}, {}], 16, old, "T1") == []
    msg = degraded_message([g0, g1])
    assert msg == ("group 0: rank 5 missing since T0 (not Ready), rank 9 missing since T1 (pod Failed, exit code "
                   "137); serving with 14/16; group 1: rank 0 missing since T1 (pod gone); front rank 0 lost, "
                   "15/16 ranks ready")
    many = degraded_groups([{r: "pod gone" for r in range(3, 13)}], 16, None, "T")
    assert degraded_message(many).endswith("rank 10 missing since T (pod gone), 2 more; serving with 6/16")


def test_degradation_events_say_lost_rejoined_and_whole_once_and_not_for_a_rollout():
    t = "T"
    one = degraded_groups([{5: "pod Failed, exit code 137"}], 16, None, t)
    assert degradation_events(None, one, _name) == [
        ("Warning", "RankLost", "group 0 rank 5 (d-g0-r5): pod Failed, exit code 137; 15/16 ranks ready")]
    stored = [g.model_dump(by_alias=True) for g in one]
    assert degradation_events(stored, degraded_groups([{5: "pod gone"}], 16, stored, t), _name) == []
    two = degraded_groups([{5: "not Ready", 7: "not Ready"}], 16, stored, t)
    assert [e[1] for e in degradation_events(stored, two, _name)] == ["RankLost"]
    back = degraded_groups([{7: "not Ready"}], 16, [g.model_dump(by_alias=True) for g in two], t)
    assert degradation_events([g.model_dump(by_alias=True) for g in two], back, _name) == [
        ("Normal", "RankRejoined", "group 0 rank 5 (d-g0-r5) Ready again; 15/16 ranks ready")]
    assert degradation_events([g.model_dump(by_alias=True) for g in back], [], _name) == [
        ("Normal", "GroupWhole", "group 0 whole again: rank(s) 7 back, every rank Ready")]
    rollout = degraded_groups([{r: "restarting with the new spec" for r in range(16)}], 16, None, t)
    assert degradation_events(None, rollout, _name) == []
