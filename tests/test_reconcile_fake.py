"""The reconciler against an in-memory API server (tests/fakekube.py): what one pass decides, no cluster."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from prometheus_client import REGISTRY

from fakekube import FakeKube
from moe_operator.controller import reconcile
from support import REPO

NS = "ns"


class Clock:
    """Stands in for the `time` module inside `reconcile`: the test moves time on."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def time(self) -> float:
        return self.t

    monotonic = perf_counter = time


def tiny(name: str = "tiny") -> dict:
    obj = yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text())
    obj["metadata"] = {"name": name}
    obj["spec"]["loadBalancing"].update({"windowSeconds": 10, "intervalSeconds": 5, "cooldownSeconds": 600})
    return obj


def skewed_load(rec: reconcile.Reconciler, clock: Clock):
    """`_measure` for tests: cumulative per-(rank, layer, expert) counters with expert 0 ten times as hot."""

    def measure(owner, spec, group, p, own_pods):
        n = clock.t
        return {(r, layer, e): n * (10.0 if e == 0 else 1.0)
                for r in range(p.num_ranks) for layer in range(p.num_layers) for e in p.experts_on(layer, r)}

    rec._measure = measure


def ready_deployment(kube: FakeKube, rec: reconcile.Reconciler, name: str = "tiny") -> dict:
    kube.add_deployment(tiny(name), NS)
    rec.reconcile(NS, name)
    kube.bind_all(NS)
    out = rec.reconcile(NS, name)
    assert out.status.phase == "Ready", out.status
    return kube.get("MoEDeployment", name, NS)


def series(name: str, deployment: str = "tiny", **labels) -> float | None:
    return REGISTRY.get_sample_value(name, {"namespace": NS, "deployment": deployment, **labels})


def fake_cluster(monkeypatch, nodes: int, gpus: int):
    """A fake API server with `nodes` GPU nodes, a reconciler on it, and the clock it reads."""
    kube = FakeKube()
    kube.add_gpu_nodes(nodes, gpus=gpus)
    clock = Clock()
    monkeypatch.setattr(reconcile, "time", clock)
    return kube, reconcile.Reconciler(kube, workers=2), clock


@pytest.fixture
def world(monkeypatch):
    kube, rec, clock = fake_cluster(monkeypatch, 4, 8)
    skewed_load(rec, clock)
    return kube, rec, clock


def rebalance_once(kube: FakeKube, rec: reconcile.Reconciler, clock: Clock, name: str = "tiny") -> None:
    """Passes, 5 s apart, until the skewed load has made the operator publish a new expert map."""
    for _ in range(10):
        clock.t += 5
        rec.reconcile(NS, name)
        if any(reason == "Rebalanced" for n, _, reason, _ in kube.events if n == name):
            return
    raise AssertionError(f"no rebalance; events: {kube.events}")


# --- item 9: per-deployment state and metric series go with the deployment ---------------------------

def _per_deployment_series(deployment: str = "tiny") -> dict[str, float | None]:
    return {
        "imbalance": series("moe_operator_imbalance_ratio", deployment),
        "threshold": series("moe_operator_imbalance_threshold", deployment),
        "generation": series("moe_operator_expert_map_generation", deployment),
        "ranks": series("moe_operator_group_ranks", deployment, group="0"),
        "decisions": series("moe_operator_scaling_decisions_total", deployment, action="rebalance"),
        "rebalances": REGISTRY.get_sample_value("moe_operator_rebalances_total",
                                                {"deployment": f"{NS}/{deployment}"}),
    }


def test_deleting_a_deployment_forgets_its_state_and_removes_its_series(world):
    from moe_operator.controller import main

    kube, rec, clock = world
    ready_deployment(kube, rec)
    ready_deployment(kube, rec, "other")
    rebalance_once(kube, rec, clock)
    rebalance_once(kube, rec, clock, "other")
    assert all(v is not None for v in _per_deployment_series().values()), _per_deployment_series()
    assert rec.balance and rec.last_eval

    class Leader:
        def is_leader(self):
            return True

    async def scenario():
        main.S.reconciler, main.S.elector = rec, Leader()
        await main.moedeployment_event(type=None, name="tiny", namespace=NS)  # what kopf sends on start
        assert ("ns", "tiny") in main.S.loops
        kube.delete("MoEDeployment", "tiny", NS)
        await main.moedeployment_event(type="DELETED", name="tiny", namespace=NS)
        for _ in range(100):
            if ("ns", "tiny") not in main.S.loops:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the control loop did not end")

    asyncio.run(scenario())
    assert _per_deployment_series() == dict.fromkeys(_per_deployment_series())  # every series gone
    assert not [k for k in rec.balance if k[1] == "tiny"] and ("ns", "tiny") not in rec.last_eval
    # the other deployment's series and state stay
    assert all(v is not None for v in _per_deployment_series("other").values())
    assert ("ns", "other", 0) in rec.balance


def test_a_deployment_recreated_under_the_same_name_does_not_inherit_the_cooldown(world):
    kube, rec, clock = world
    ready_deployment(kube, rec)
    rebalance_once(kube, rec, clock)
    assert rec.balance[("ns", "tiny", 0)].last_change == clock.t  # in cooldown for 600 s now
    # Deleted and re-created while the operator was not watching (no DELETED event, no pass between).
    kube.objects.clear()
    kube.add_gpu_nodes(4, gpus=8)
    assert series("moe_operator_imbalance_ratio") is not None
    ready_deployment(kube, rec)
    assert series("moe_operator_scaling_decisions_total", action="rebalance") is None
    rebalance_once(kube, rec, clock)  # acts after one window, not after the old cooldown


# --- items 5 and 6: the plan's generation never goes back, and a garbled plan is repaired -------------

def plan_cm(kube: FakeKube, name: str = "tiny") -> dict:
    return kube.get("ConfigMap", f"{name}-g0-plan", NS)


def test_a_deleted_plan_configmap_continues_above_the_last_generation(world):
    kube, rec, clock = world
    ready_deployment(kube, rec)
    rebalance_once(kube, rec, clock)
    before = int(plan_cm(kube)["data"]["generation"])
    assert before == 2
    kube.delete("ConfigMap", "tiny-g0-plan", NS)
    rec.reconcile(NS, "tiny")
    cm = plan_cm(kube)
    assert int(cm["data"]["generation"]) > before
    assert cm["metadata"]["annotations"]["moe.dev/expert-map-generation"] == cm["data"]["generation"]
    st = kube.get("MoEDeployment", "tiny", NS)["status"]
    assert st["publishedGeneration"] == int(cm["data"]["generation"]) == st["expertMapGeneration"]


def test_the_published_generation_is_recorded_before_the_configmap(world):
    # An operator that dies between the two writes must not publish the same number twice.
    kube, rec, clock = world
    kube.add_deployment(tiny(), NS)
    rec.reconcile(NS, "tiny")
    writes = [(v, k) for v, k, _ in kube.writes if k in ("MoEDeployment", "ConfigMap")]
    assert writes.index(("patch_status", "MoEDeployment")) < writes.index(("apply", "ConfigMap"))
    assert kube.get("MoEDeployment", "tiny", NS)["status"]["publishedGeneration"] == 1
    # Status says 1 was published; the ConfigMap is gone (deleted, or never written): the next is 2.
    kube.delete("ConfigMap", "tiny-g0-plan", NS)
    rec.reconcile(NS, "tiny")
    assert plan_cm(kube)["data"]["generation"] == "2"


@pytest.mark.parametrize("garble", ["generation", "plan"])
def test_a_garbled_plan_configmap_is_published_again_with_a_higher_generation(world, garble):
    kube, rec, clock = world
    ready_deployment(kube, rec)
    cm = kube.objects[("ConfigMap", NS, "tiny-g0-plan")]
    good_plan = cm["data"]["plan.json"]
    if garble == "generation":
        cm["data"]["generation"] = "two"
    else:
        cm["data"]["plan.json"] = "{not json"
    rec.reconcile(NS, "tiny")
    fixed = plan_cm(kube)
    assert int(fixed["data"]["generation"]) >= 2
    if garble == "generation":
        assert fixed["data"]["plan.json"] == good_plan  # the same plan, published again: no expert moves
    bad = [m for n, _, reason, m in kube.events if reason == "BadPlan"]
    assert len(bad) == 1, bad
    kube.bind_all(NS)
    out = rec.reconcile(NS, "tiny")  # repaired: no more BadPlan, and the deployment serves
    assert len([1 for _, _, reason, _ in kube.events if reason == "BadPlan"]) == 1
    assert out.status.phase == "Ready" and out.status.expert_map_generation == int(fixed["data"]["generation"])


# --- item 4: two deployments never plan onto the same GPUs ---------------------------------------------

def nodes_of(kube: FakeKube, name: str) -> dict[str, int]:
    per_node: dict[str, int] = {}
    for r in yaml.safe_load(plan_cm(kube, name)["data"]["plan.json"])["ranks"]:
        per_node[r["node"]] = per_node.get(r["node"], 0) + 1
    return per_node


def test_a_second_deployment_does_not_plan_onto_the_first_ones_unbound_rank_pods(world):
    kube, rec, clock = world  # 4 nodes x 8 GPUs: room for exactly two EP16 deployments
    kube.add_deployment(tiny("a"), NS)
    kube.add_deployment(tiny("b"), NS)
    rec.reconcile(NS, "a")  # a's 16 rank pods exist, pinned to their nodes, not bound yet
    assert kube.list("Pod", NS, labels="moe.dev/deployment=a") and not kube.list("Pod", fields="spec.nodeName!=")
    rec.reconcile(NS, "b")
    a, b = nodes_of(kube, "a"), nodes_of(kube, "b")
    assert not set(a) & set(b), (a, b)
    kube.bind_all(NS)
    assert rec.reconcile(NS, "a").status.phase == rec.reconcile(NS, "b").status.phase == "Ready"


def test_a_published_plan_holds_its_gpus_before_its_pods_exist(world):
    # A published plan's rank pods may not exist yet (created later in the pass, or deleted since);
    # meanwhile its GPUs are not free for another deployment's planner.
    kube, rec, clock = world
    kube.add_deployment(tiny("a"), NS)
    rec.reconcile(NS, "a")
    for p in kube.list("Pod", NS):
        kube.delete("Pod", p["metadata"]["name"], NS)
    kube.add_deployment(tiny("b"), NS)
    rec.reconcile(NS, "b")
    assert not set(nodes_of(kube, "a")) & set(nodes_of(kube, "b"))


# --- item 8: rank pods carry the memory model's KV admission -----------------------------------------

def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_rank_pods_get_the_kv_budget_context_and_sequence_count(world):
    from moe_operator import api, perfmodel

    kube, rec, clock = world
    ready_deployment(kube, rec)
    # KWOK/devcluster nodes say NVIDIA-H100-80GB-HBM3: the h100 profile
    kv = perfmodel.kv_admission(api.parse_spec(tiny()["spec"]), perfmodel.hardware("h100"))
    pods = kube.list("Pod", NS, labels="moe.dev/deployment=tiny")
    assert len(pods) == 16
    for p in pods:
        env = env_of(p)
        assert env["MOE_KV_CACHE_TOKENS"] == str(kv.cache_tokens)
        assert env["MOE_MAX_CONTEXT"] == "4096" and env["MOE_MAX_SEQS_PER_RANK"] == str(kv.max_seqs)
    pred = kube.get("MoEDeployment", "tiny", NS)["status"]["prediction"]
    assert (pred["kvCacheTokensPerRank"], pred["maxContext"], pred["maxSequencesPerRank"]) == (
        kv.cache_tokens, 4096, kv.max_seqs)


def test_the_specs_own_sequence_count_is_kept_and_sizes_the_budget(world):
    from moe_operator import api, perfmodel

    kube, rec, clock = world
    obj = tiny()
    obj["spec"]["worker"]["env"] = [{"name": "MOE_MAX_SEQS_PER_RANK", "value": "8"}]
    kube.add_deployment(obj, NS)
    rec.reconcile(NS, "tiny")
    env = [e for e in kube.list("Pod", NS)[0]["spec"]["containers"][0]["env"]]
    assert [e["value"] for e in env if e["name"] == "MOE_MAX_SEQS_PER_RANK"] == ["8"]  # the spec's, once
    want = perfmodel.kv_admission(api.parse_spec(obj["spec"]), perfmodel.hardware("h100"), max_seqs=8)
    assert env_of(kube.list("Pod", NS)[0])["MOE_KV_CACHE_TOKENS"] == str(want.cache_tokens) == str(8 * 4096)


def test_a_context_longer_than_the_budget_is_clamped_with_a_warning(world):
    kube, rec, clock = world
    obj = tiny()
    obj["spec"]["placement"]["hardwareProfile"] = "h800"
    obj["spec"]["model"]["architecture"]["maxPositionEmbeddings"] = 10**9  # more than 80 GB can cache
    kube.add_deployment(obj, NS)
    rec.reconcile(NS, "tiny")
    env = env_of(kube.list("Pod", NS)[0])
    assert int(env["MOE_MAX_CONTEXT"]) == int(env["MOE_KV_CACHE_TOKENS"]) < 10**9
    warned = [m for _, t, reason, m in kube.events if reason == "ContextClamped"]
    assert len(warned) == 1 and env["MOE_MAX_CONTEXT"] in warned[0]
    rec.reconcile(NS, "tiny")
    assert len([1 for _, _, reason, _ in kube.events if reason == "ContextClamped"]) == 1


# --- leadership: a pass that outlives its Lease stops writing; renewals never wait for passes -----

def test_a_pass_stops_at_its_first_write_after_the_lease_is_lost(world):
    from moe_operator.controller.kube import LeaderOnly, NotLeader

    kube, _, clock = world
    lease = {"held": True, "creates_left": 5, "writes_at_loss": None}

    def is_leader():
        return lease["held"]

    guarded = LeaderOnly(kube, is_leader)
    orig_create = kube.create

    def create(obj):  # the Lease lapses while the fifth rank pod is being created
        out = orig_create(obj)
        lease["creates_left"] -= obj["kind"] == "Pod"  # the rank key Secret is created before them
        if lease["creates_left"] == 0:
            lease["held"], lease["writes_at_loss"] = False, len(kube.writes)
        return out

    kube.add_deployment(tiny(), NS)
    kube.create = create
    rec = reconcile.Reconciler(guarded, workers=1)
    with pytest.raises(NotLeader):
        rec.reconcile(NS, "tiny")
    assert len(kube.list("Pod", NS)) == 5  # stopped at the next write: 11 rank pods never created
    assert len(kube.writes) == lease["writes_at_loss"]  # and nothing else written (no status, no event)
    assert not [e for e in kube.events if e[0] == "tiny"]
    assert not rec.planning.locked()  # the aborted pass let go of the planning lock
    n = len(kube.writes)
    with pytest.raises(NotLeader):
        rec.reconcile(NS, "tiny")
    assert len(kube.writes) == n  # a non-leader writes nothing at all
    lease["held"] = True
    kube.bind_all(NS)
    rec.reconcile(NS, "tiny")
    kube.bind_all(NS)
    assert rec.reconcile(NS, "tiny").status.phase == "Ready"


def test_lease_renewals_do_not_wait_behind_reconcile_passes(monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from moe_operator.controller import main

    renewals = []
    busy = threading.Event()

    class Elector:
        identity, renew_s = "me", 0.01

        def is_leader(self):
            return True

        def try_acquire_or_renew(self):
            renewals.append(1)
            return True

    async def scenario():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        blocker = loop.run_in_executor(None, busy.wait, 5)  # a long pass holds every default thread
        monkeypatch.setattr(main.S, "elector", Elector())
        monkeypatch.setattr(main.S, "lease_pool", ThreadPoolExecutor(max_workers=1), raising=False)
        task = loop.create_task(main._elect())
        await asyncio.sleep(0.3)
        task.cancel()
        busy.set()
        await blocker

    asyncio.run(scenario())
    assert len(renewals) >= 5, renewals


# --- issue 17: load-driven plans are decided before pods are synced -----------------------------------

def test_a_scale_out_creates_its_rank_pods_in_the_pass_that_decides_it(monkeypatch):
    # One 24-GPU NVLink domain, the group on 16 of them, four hot experts per layer: 4 spare GPUs
    # cannot spread them below the threshold, 8 more can (as in test_scaling's scale-out tests).
    kube, rec, clock = fake_cluster(monkeypatch, 1, 24)

    def measure(owner, spec, group, p, own_pods):  # cumulative tokens, each expert's split over its copies
        copies = p.replica_counts(p.shape.n_routed_experts)  # (L, E)
        return {(r, layer, e): clock.t * 100 * (40.0 if e < 4 else 1.0) / copies[layer, e]
                for r in range(p.num_ranks) for layer in range(p.num_layers) for e in p.experts_on(layer, r)}

    rec._measure = measure
    obj = tiny()
    obj["spec"]["loadBalancing"].update({"maxExtraGpus": 8, "imbalanceThreshold": 1.7, "cooldownSeconds": 10})
    kube.add_deployment(obj, NS)
    rec.reconcile(NS, "tiny")
    kube.bind_all(NS)
    for _ in range(10):
        clock.t += 5
        before = len(kube.list("Pod", NS))
        out = rec.reconcile(NS, "tiny")
        if any(reason == "ScaledOut" for _, _, reason, _ in kube.events):
            break
    else:
        raise AssertionError(f"no scale-out; events: {kube.events}")
    ranks = len(yaml.safe_load(plan_cm(kube)["data"]["plan.json"])["ranks"])
    assert before == 16 and ranks > 16
    assert len(kube.list("Pod", NS)) == ranks  # the new ranks' pods, created in the same pass
    st = out.status
    assert (st.phase, st.total_ranks, st.ready_ranks, st.extra_ranks) == ("Ready", ranks, 16, ranks - 16)
    progressing = next(c for c in st.conditions if c.type == reconcile.PROGRESSING)
    assert progressing.status == "True" and f"{ranks - 16} scale-out rank(s) joining" in progressing.message
    assert st.expert_map_generation == int(plan_cm(kube)["data"]["generation"]) == 2


def test_the_status_patch_holds_exactly_the_fields_a_pass_sets(world):
    # `Outcome.patch` is what the API server sees: a merge patch, so a field left out stays as it
    # was and a None removes it (reason, once Ready).
    kube, rec, clock = world
    kube.add_deployment(tiny(), NS)
    starting = rec.reconcile(NS, "tiny").patch
    assert starting["phase"] == "Starting" and starting["reason"] == "0/16 ranks ready"
    assert set(starting) == {"phase", "observedGeneration", "conditions", "readyRanks", "totalRanks", "ready",
                             "nodesUsed", "expertMapGeneration", "reason", "extraRanks", "prediction",
                             "degradedGroups", "degradedSince"}
    assert starting["degradedGroups"] is starting["degradedSince"] is None  # removed, never written as null
    kube.bind_all(NS)
    ready = rec.reconcile(NS, "tiny").patch
    assert ready["reason"] is None and "reason" not in kube.get("MoEDeployment", "tiny", NS)["status"]
    assert [c["type"] for c in ready["conditions"]] == ["Placed", "Ready", "Progressing", "Degraded",
                                                        "MetricsAvailable"]
    assert set(ready["conditions"][0]) == {"type", "status", "reason", "message", "lastTransitionTime",
                                           "observedGeneration"}
    kube.add_deployment({**tiny("bad"), "spec": {**tiny()["spec"], "parallelism": {"expertParallelSize": 0}}}, NS)
    failed = rec.reconcile(NS, "bad").patch
    assert set(failed) == {"phase", "observedGeneration", "conditions", "reason"} and failed["phase"] == "Failed"


# --- issue 16: a lost rank is replaced alone, and status says what is degraded ----------------------

def uids(kube: FakeKube) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in kube.list("Pod", NS)}


def pod_writes(kube: FakeKube, since: int) -> list[tuple[str, str]]:
    return [(verb, name) for verb, kind, name in kube.writes[since:] if kind == "Pod"]


def reasons(kube: FakeKube, *which: str) -> list[tuple[str, str]]:
    return [(r, m) for n, _, r, m in kube.events if n == "tiny" and r in which]


def fail(kube: FakeKube, rank: int, exit_code: int = 137) -> None:
    """What the kubelet reports when a rank's container is killed (restartPolicy Never)."""
    kube.objects[("Pod", NS, f"tiny-g0-r{rank}")]["status"] = {
        "phase": "Failed", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{"name": "worker", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]}


def hang(kube: FakeKube, rank: int, ready: bool = False) -> None:
    """A rank whose readiness probe fails (hung, or dropped by its group) while its process runs."""
    kube.objects[("Pod", NS, f"tiny-g0-r{rank}")]["status"]["conditions"] = [
        {"type": "Ready", "status": "True" if ready else "False"}]


def test_a_failed_rank_pod_is_replaced_alone_and_status_says_what_is_missing_since_when(world):
    import datetime

    kube, rec, clock = world
    ready_deployment(kube, rec)
    before, n = uids(kube), len(kube.writes)
    fail(kube, 5)
    out = rec.reconcile(NS, "tiny")
    # the failed pod is deleted (and only it), nothing else is touched
    assert pod_writes(kube, n) == [("delete", "tiny-g0-r5")]
    st = kube.get("MoEDeployment", "tiny", NS)["status"]
    assert st["phase"] == "Degraded" and st["ready"] == "15/16"
    (g,) = st["degradedGroups"]
    assert (g["group"], g["readyRanks"], g["ranks"]) == (0, 15, 16)
    assert [(m["rank"], m["reason"]) for m in g["missingRanks"]] == [(5, "pod Failed, exit code 137")]
    since = st["degradedSince"]
    assert g["since"] == g["missingRanks"][0]["since"] == since
    datetime.datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ")  # RFC 3339, UTC
    degraded = next(c for c in out.status.conditions if c.type == reconcile.DEGRADED)
    assert degraded.status == "True"
    assert degraded.message == f"group 0: rank 5 missing since {since} (pod Failed, exit code 137); serving with 15/16"
    assert st["reason"] == degraded.message
    assert [r for r, _ in reasons(kube, "RankFailed", "RankLost")] == ["RankFailed", "RankLost"]
    assert "tiny-g0-r5" in reasons(kube, "RankLost")[0][1]

    # next passes: the replacement is created (only it), the loss is not reported again, since is kept
    n = len(kube.writes)
    clock.t += 30
    rec.reconcile(NS, "tiny")
    assert pod_writes(kube, n) == [("create", "tiny-g0-r5")]
    missing = kube.get("MoEDeployment", "tiny", NS)["status"]["degradedGroups"][0]["missingRanks"]
    assert [(m["rank"], m["reason"], m["since"]) for m in missing] == [(5, "pod gone", since)]  # as the pass read it
    rec.reconcile(NS, "tiny")
    st = kube.get("MoEDeployment", "tiny", NS)["status"]
    assert st["degradedSince"] == since and st["degradedGroups"][0]["missingRanks"][0]["reason"] == "pod not scheduled yet"
    assert len(reasons(kube, "RankLost")) == 1

    # the replacement is Ready: whole again, the degraded fields are removed, every other pod is the one it was
    kube.bind_all(NS)
    n = len(kube.writes)
    out = rec.reconcile(NS, "tiny")
    st = kube.get("MoEDeployment", "tiny", NS)["status"]
    assert st["phase"] == "Ready" and "degradedGroups" not in st and "degradedSince" not in st
    assert [m for r, m in reasons(kube, "GroupWhole")] == ["group 0 whole again: rank(s) 5 back, every rank Ready"]
    assert not pod_writes(kube, n)
    after = uids(kube)
    assert {k for k in before if before[k] != after[k]} == {"tiny-g0-r5"}


def test_hung_ranks_are_reported_lost_and_rejoined_one_by_one_and_nothing_is_restarted(world):
    kube, rec, clock = world
    ready_deployment(kube, rec)
    before, n = uids(kube), len(kube.writes)
    hang(kube, 5)
    rec.reconcile(NS, "tiny")
    first = kube.get("MoEDeployment", "tiny", NS)["status"]["degradedSince"]
    hang(kube, 7)
    clock.t += 5
    rec.reconcile(NS, "tiny")
    st = kube.get("MoEDeployment", "tiny", NS)["status"]
    (g,) = st["degradedGroups"]
    assert [(m["rank"], m["reason"]) for m in g["missingRanks"]] == [(5, "not Ready"), (7, "not Ready")]
    assert g["readyRanks"] == 14 and st["degradedSince"] == g["since"] == first
    assert [m.split(":")[0] for _, m in reasons(kube, "RankLost")] == ["group 0 rank 5 (tiny-g0-r5)",
                                                                       "group 0 rank 7 (tiny-g0-r7)"]
    # an operator restarted meanwhile reads the loss from status: no second RankLost, the same since
    rec = reconcile.Reconciler(kube, workers=2)
    skewed_load(rec, clock)
    rec.reconcile(NS, "tiny")
    assert len(reasons(kube, "RankLost")) == 2
    assert kube.get("MoEDeployment", "tiny", NS)["status"]["degradedSince"] == first

    hang(kube, 5, ready=True)
    rec.reconcile(NS, "tiny")
    st = kube.get("MoEDeployment", "tiny", NS)["status"]
    assert st["phase"] == "Degraded" and [m["rank"] for m in st["degradedGroups"][0]["missingRanks"]] == [7]
    assert st["degradedSince"] == first  # the group has missed a rank all along
    assert [m for _, m in reasons(kube, "RankRejoined")] == ["group 0 rank 5 (tiny-g0-r5) Ready again; 15/16 ranks ready"]
    assert not reasons(kube, "GroupWhole")
    hang(kube, 7, ready=True)
    assert rec.reconcile(NS, "tiny").status.phase == "Ready"
    assert len(reasons(kube, "GroupWhole")) == 1 and len(reasons(kube, "RankRejoined")) == 1
    # a rank that turns NotReady is the kubelet's (liveness) and the group's business: no pod was touched
    assert not pod_writes(kube, n) and uids(kube) == before


# --- issue 20: the rank key Secret and the NetworkPolicy ---------------------------------------------

def test_the_rank_key_is_created_once_and_a_new_one_restarts_the_groups_together(world):
    import base64

    from moe_operator.controller import resources

    kube, rec, _ = world
    ready_deployment(kube, rec)
    secret = kube.get("Secret", "tiny-rank-key", NS)
    assert len(base64.b64decode(secret["data"]["key"])) == 32 and secret["immutable"] is True
    writes = len(kube.writes)
    rec.reconcile(NS, "tiny")
    assert kube.get("Secret", "tiny-rank-key", NS) == secret  # never rewritten
    assert not [w for w in kube.writes[writes:] if w[1] == "Secret"]
    hashes = {p["metadata"]["annotations"][resources.A_SPEC_HASH] for p in kube.list("Pod", NS)}
    assert len(hashes) == 1

    kube.delete("Secret", "tiny-rank-key", NS)  # someone deleted it: a new key the running ranks lack
    rec.reconcile(NS, "tiny")
    again = kube.get("Secret", "tiny-rank-key", NS)
    assert again["data"]["key"] != secret["data"]["key"]
    assert ("Normal", "RollingOut") in {(t, r) for n, t, r, _ in kube.events if n == "tiny"}
    rec.reconcile(NS, "tiny")
    new = {p["metadata"]["annotations"][resources.A_SPEC_HASH] for p in kube.list("Pod", NS)}
    assert len(new) == 1 and new != hashes


def test_the_network_policy_covers_the_pods_the_pass_created(monkeypatch):
    kube, _, _ = fake_cluster(monkeypatch, 4, 8)
    rec = reconcile.Reconciler(kube, workers=2, operator_namespace="moe-system")
    obj = tiny()
    obj["spec"]["serving"] = {"metricsNamespaces": ["monitoring"],
                              "allowedSources": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]}
    kube.add_deployment(obj, NS)
    rec.reconcile(NS, "tiny")
    policy = kube.get("NetworkPolicy", "tiny", NS)
    pods = kube.list("Pod", NS)
    assert len(pods) == 16
    sel = policy["spec"]["podSelector"]["matchLabels"]
    assert all(sel.items() <= p["metadata"]["labels"].items() for p in pods)
    ingress = policy["spec"]["ingress"]
    assert ingress[0] == {"from": [{"podSelector": {"matchLabels": sel}}]}
    assert ingress[1]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]
    assert ingress[2]["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["moe-system", "monitoring"]
    assert policy["metadata"]["ownerReferences"][0]["name"] == "tiny"
    # narrowing who may connect restarts nothing
    hashes = {p["metadata"]["annotations"]["moe.dev/spec-hash"] for p in pods}
    stored = kube.objects[("MoEDeployment", NS, "tiny")]
    stored["spec"]["serving"]["allowedSources"] = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    stored["metadata"]["generation"] += 1
    kube.bind_all(NS)
    rec.reconcile(NS, "tiny")
    assert kube.get("NetworkPolicy", "tiny", NS)["spec"]["ingress"][1]["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert {p["metadata"]["annotations"]["moe.dev/spec-hash"] for p in kube.list("Pod", NS)} == hashes
    assert not [w for w in kube.writes if w[0] == "delete"]


def test_an_api_key_secret_that_is_the_rank_key_fails_the_deployment(world):
    kube, rec, _ = world
    obj = tiny()
    obj["spec"]["serving"] = {"apiKeySecret": {"name": "tiny-rank-key", "key": "key"}}
    kube.add_deployment(obj, NS)
    out = rec.reconcile(NS, "tiny")
    assert out.status.phase == "Failed" and "spec.serving.apiKeySecret.name" in out.status.reason
    assert not kube.list("Pod", NS) and kube.get("Secret", "tiny-rank-key", NS) is None


# --- the routers in front of the front ranks ---------------------------------------------------------

def router_pods(kube: FakeKube, n: int) -> list[str]:
    """What the Deployment controller and kubelets would do with the router Deployment: `n` pods of
    its template, Running and Ready on a node."""
    dep = kube.get("Deployment", "tiny-router", NS)
    out = []
    for i in range(n):
        name = f"tiny-router-7d4f9c5b8c-{'bcdfg'[i]}xz2k"
        kube.create({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "namespace": NS, "labels": dep["spec"]["template"]["metadata"]["labels"]},
                     "spec": {**dep["spec"]["template"]["spec"], "nodeName": "node-0"}})
        kube.objects[("Pod", NS, name)]["status"] = {"phase": "Running", "podIP": "127.0.0.2",
                                                     "conditions": [{"type": "Ready", "status": "True"}]}
        out.append(name)
    return out


def test_the_routers_are_applied_and_their_pods_are_never_taken_for_ranks(world):
    from moe_operator.controller import resources

    kube, rec, _ = world
    ready_deployment(kube, rec)
    dep = kube.get("Deployment", "tiny-router", NS)
    assert dep["metadata"]["ownerReferences"][0]["name"] == "tiny" and dep["spec"]["replicas"] == 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["--front", "tiny-g0-r0.tiny-ranks"]
    assert kube.get("NetworkPolicy", "tiny-router", NS) and kube.get("PodDisruptionBudget", "tiny-router", NS)
    assert kube.get("Service", "tiny", NS)["spec"]["selector"] == {resources.L_ROUTER: "tiny"}
    assert [w for w in kube.writes if w[1] == "Deployment"] == [("apply", "Deployment", "tiny-router")] * 2

    routers = router_pods(kube, 2)
    n = len(kube.writes)
    out = rec.reconcile(NS, "tiny")
    assert out.status.phase == "Ready" and (out.status.ready_ranks, out.status.total_ranks) == (16, 16)
    assert not [w for w in kube.writes[n:] if w[1] == "Pod"]  # no router deleted as a stray rank
    assert all(kube.get("Pod", r, NS) for r in routers)


def test_changing_the_router_count_or_nodes_restarts_no_rank(world):
    from moe_operator.controller import resources

    kube, rec, _ = world
    ready_deployment(kube, rec)
    router_pods(kube, 2)
    ranks = {p["metadata"]["name"]: p["metadata"]["uid"] for p in kube.list("Pod", NS, labels="moe.dev/deployment=tiny")}
    hashes = {p["metadata"]["annotations"][resources.A_SPEC_HASH] for p in kube.list("Pod", NS, labels="moe.dev/deployment=tiny")}
    n = len(kube.writes)
    stored = kube.objects[("MoEDeployment", NS, "tiny")]
    for count, nodes in ((0, None), (5, {"pool": "cpu"})):
        stored["spec"]["serving"] = {"routerReplicas": count, **({"routerNodeSelector": nodes} if nodes else {})}
        stored["metadata"]["generation"] += 1
        out = rec.reconcile(NS, "tiny")
        assert out.status.phase == "Ready"
        router = kube.get("Deployment", "tiny-router", NS)["spec"]
        assert router["replicas"] == count  # 0: kept, scaled to 0
        assert router["template"]["spec"].get("nodeSelector") == nodes
        selector = kube.get("Service", "tiny", NS)["spec"]["selector"]
        assert selector == ({resources.L_DEPLOYMENT: "tiny", resources.L_FRONT: "true"} if count == 0
                            else {resources.L_ROUTER: "tiny"})
    assert not [w for w in kube.writes[n:] if w[1] == "Pod"]
    after = kube.list("Pod", NS, labels="moe.dev/deployment=tiny")
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in after} == ranks
    assert {p["metadata"]["annotations"][resources.A_SPEC_HASH] for p in after} == hashes
    assert not [r for _, _, r, _ in kube.events if r == "RollingOut"]


# --- attention tensor parallelism: TP groups placed, passed and re-placed whole -----------------------

def tiny_tp2() -> dict:
    obj = yaml.safe_load((REPO / "manifests" / "tiny-ep16-tp2.yaml").read_text())
    obj["metadata"] = {"name": "tiny"}
    return obj


def stored_ranks(kube: FakeKube) -> list[str]:
    """The node of each rank in the published plan."""
    return [r["node"] for r in yaml.safe_load(plan_cm(kube)["data"]["plan.json"])["ranks"]]


def test_a_tp2_deployment_keeps_each_tp_group_on_one_node_through_a_node_loss(monkeypatch):
    # Nine nodes of 3 GPUs: a TP group of 2 fits once per node, so the 8 groups take 8 nodes (the
    # third GPU of each stays free) and node-008 is spare.
    kube, rec, clock = fake_cluster(monkeypatch, 9, 3)
    kube.add_deployment(tiny_tp2(), NS)
    rec.reconcile(NS, "tiny")
    kube.bind_all(NS)
    assert rec.reconcile(NS, "tiny").status.phase == "Ready"
    nodes = stored_ranks(kube)
    assert [nodes[2 * g] == nodes[2 * g + 1] for g in range(8)] == [True] * 8 and len(set(nodes)) == 8
    for pod in kube.list("Pod", NS):
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["MOE_ATTENTION_TP"] == "2"
    # node-003 goes: its TP group (both ranks) moves whole to the spare node; no other pod is touched
    lost = nodes.index("node-003")
    before = uids(kube)
    kube.delete("Node", "node-003")
    clock.t += 5
    rec.reconcile(NS, "tiny")
    after_nodes = stored_ranks(kube)
    assert after_nodes[lost] == after_nodes[lost + 1] == "node-008"
    assert [n for i, n in enumerate(after_nodes) if i not in (lost, lost + 1)] == \
           [n for i, n in enumerate(nodes) if i not in (lost, lost + 1)]
    kube.bind_all(NS)
    rec.reconcile(NS, "tiny")
    after = uids(kube)
    assert {k for k in before if before[k] != after.get(k)} == {f"tiny-g0-r{lost}", f"tiny-g0-r{lost + 1}"}
    # one more node lost: 7 nodes hold 7 whole groups of 2 (14 GPUs free besides), not 8: Pending, saying why
    kube.delete("Node", "node-005")
    clock.t += 5
    out = rec.reconcile(NS, "tiny")
    assert out.status.phase == "Pending"
    assert "a TP group's 2 ranks must share one node, so only 14 of the 21 free GPU slots" in out.status.reason


def test_turning_attention_tp_on_re_places_groups_that_straddle_nodes(monkeypatch):
    # TP1 on nodes of 3 GPUs puts ranks 2 and 3 on different nodes; TP2 needs them together.
    kube, rec, clock = fake_cluster(monkeypatch, 8, 3)
    ready_deployment(kube, rec)
    nodes = stored_ranks(kube)
    assert nodes[2] != nodes[3]
    obj = kube.objects[("MoEDeployment", NS, "tiny")]
    obj["spec"]["parallelism"]["attentionTensorParallel"] = 2
    obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
    clock.t += 5
    rec.reconcile(NS, "tiny")
    nodes = stored_ranks(kube)
    assert [nodes[2 * g] == nodes[2 * g + 1] for g in range(8)] == [True] * 8
    assert any("attention TP changed: attention TP group 1 (ranks 2-3) spans nodes" in m
               for _, _, r, m in kube.events if r == "Planned")
