"""The operator against the real control plane with KWOK GPU nodes (issue 5 acceptance)."""

from __future__ import annotations

import base64
import copy
import json

import pytest
import yaml

from support import REPO, wait_for

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "serving.moe.dev", "v1alpha1", "moedeployments"


@pytest.fixture
def custom(api_client, crd_installed):
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


def manifest(name: str, pool: str, path: str = "tiny-ep16.yaml") -> dict:
    obj = yaml.safe_load((REPO / "manifests" / path).read_text())
    obj["metadata"] = {"name": name}
    obj["spec"].setdefault("placement", {})["nodeSelector"] = {"moe.dev/pool": pool}
    return obj


def get(custom, ns, name) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def rank_pods(core, ns, name) -> dict[str, dict]:
    out = {}
    for p in core.list_namespaced_pod(ns, label_selector=f"moe.dev/deployment={name}").items:
        out[p.metadata.name] = p
    return out


def plan_of(core, ns, name, group=0) -> dict:
    cm = core.read_namespaced_config_map(f"{name}-g{group}-plan", ns)
    return {"generation": int(cm.data["generation"]), **json.loads(cm.data["plan.json"])}


def wait_phase(custom, ns, name, phase, timeout=120):
    def check():
        st = get(custom, ns, name).get("status") or {}
        return st if st.get("phase") == phase else None

    return wait_for(check, timeout, f"{name} phase {phase}")


def assert_pods_match_plan(core, ns, name, plan):
    pods = rank_pods(core, ns, name)
    assert len(pods) == len(plan["ranks"]), sorted(pods)
    for r in plan["ranks"]:
        p = pods[f"{name}-g0-r{r['rank']}"]
        assert p.spec.node_name == r["node"], (p.metadata.name, p.spec.node_name, r["node"])
        assert p.status.phase == "Running"
    # one pod per GPU: never more ranks on a node than it has GPUs
    per_node = {}
    for p in pods.values():
        per_node[p.spec.node_name] = per_node.get(p.spec.node_name, 0) + 1
    return per_node


def test_tiny_ep16_becomes_ready_with_rank_pods_on_planned_nodes(core, custom, namespace, gpu_pool, operator):
    pool, nodes = gpu_pool(nodes=4, gpus=8, racks=2)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest("tiny", pool))
    st = wait_phase(custom, namespace, "tiny", "Ready")
    assert st["readyRanks"] == st["totalRanks"] == 16 and st["ready"] == "16/16"
    assert st["expertMapGeneration"] == 1 and st["observedGeneration"] == 1
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Placed"]["status"] == "True" and conds["Ready"]["status"] == "True"
    assert conds["Degraded"]["status"] == "False"
    plan = plan_of(core, namespace, "tiny")
    per_node = assert_pods_match_plan(core, namespace, "tiny", plan)
    assert max(per_node.values()) <= 8 and set(per_node) <= set(nodes)
    # every MoE layer hosts every logical expert, one per rank
    for layer in plan["expert_map"]:
        assert all(len(cell) == 1 for cell in layer)
        assert set(e for cell in layer for e in cell) == set(range(12))
    # pod spec essentials
    p = core.read_namespaced_pod("tiny-g0-r3", namespace)
    c = p.spec.containers[0]
    env = {e.name: e.value for e in c.env if e.value is not None}
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "16" and env["MASTER_ADDR"] == "tiny-g0-r0.tiny-ranks"
    assert c.resources.limits["nvidia.com/gpu"] == "1"
    assert c.security_context.read_only_root_filesystem and not c.security_context.allow_privilege_escalation
    assert c.security_context.capabilities.drop == ["ALL"] and p.spec.security_context.run_as_non_root
    assert p.metadata.owner_references[0].kind == "MoEDeployment"
    for svc in ("tiny", "tiny-ranks"):
        assert core.read_namespaced_service(svc, namespace).metadata.owner_references[0].name == "tiny"
    # issue 20: the rank key Secret every rank mounts, and the NetworkPolicy over exactly these pods
    from kubernetes import client

    secret = core.read_namespaced_secret("tiny-rank-key", namespace)
    assert secret.immutable and len(base64.b64decode(secret.data["key"])) == 32
    assert secret.metadata.owner_references[0].name == "tiny"
    assert {v.secret.secret_name for v in p.spec.volumes if v.secret} == {"tiny-rank-key"}
    np = client.NetworkingV1Api(core.api_client).read_namespaced_network_policy("tiny", namespace)
    assert np.metadata.owner_references[0].name == "tiny" and np.spec.policy_types == ["Ingress"]
    selected = core.list_namespaced_pod(namespace, label_selector=",".join(
        f"{k}={v}" for k, v in np.spec.pod_selector.match_labels.items())).items
    assert {q.metadata.name for q in selected} == set(rank_pods(core, namespace, "tiny"))
    assert np.spec.ingress[0]._from[0].pod_selector.match_labels == np.spec.pod_selector.match_labels
    assert [q.port for q in np.spec.ingress[1].ports] == [8080, 8081]
    assert [q.port for q in np.spec.ingress[2].ports] == [9400]


def test_too_few_gpus_is_pending_with_the_count(custom, namespace, gpu_pool, operator, core):
    pool, nodes = gpu_pool(nodes=2, gpus=8)
    core.patch_node(nodes[1], {"spec": {"unschedulable": True}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest("small", pool))
    st = wait_phase(custom, namespace, "small", "Pending", timeout=60)
    assert st["reason"].startswith("needs 16 GPUs, 8 schedulable"), st["reason"]
    assert "cordoned" in st["reason"] or "unschedulable" in st["reason"], st["reason"]
    assert not rank_pods(core, namespace, "small")
    core.patch_node(nodes[1], {"spec": {"unschedulable": False}})
    wait_phase(custom, namespace, "small", "Ready", timeout=90)


def test_two_deployments_applied_together_both_become_ready_on_separate_gpus(core, custom, namespace, gpu_pool,
                                                                           operator):
    pool, nodes = gpu_pool(nodes=4, gpus=8)  # exactly the 32 GPUs of two EP16 groups
    for name in ("twin-a", "twin-b"):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest(name, pool))
    for name in ("twin-a", "twin-b"):
        st = wait_phase(custom, namespace, name, "Ready", timeout=90)
        assert st["expertMapGeneration"] == 1, f"{name} re-planned: {st}"  # planned right the first time
    per_node: dict[str, int] = {}
    for name in ("twin-a", "twin-b"):
        for p in rank_pods(core, namespace, name).values():
            per_node[p.spec.node_name] = per_node.get(p.spec.node_name, 0) + 1
    assert per_node == dict.fromkeys(nodes, 8), per_node


def test_deleted_rank_pod_is_recreated_in_its_slot(core, custom, namespace, gpu_pool, operator):
    pool, _ = gpu_pool(nodes=2, gpus=8)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest("heal", pool))
    wait_phase(custom, namespace, "heal", "Ready")
    before = core.read_namespaced_pod("heal-g0-r5", namespace)
    uids = {n: p.metadata.uid for n, p in rank_pods(core, namespace, "heal").items()}
    core.delete_namespaced_pod("heal-g0-r5", namespace)

    def recreated():
        try:
            p = core.read_namespaced_pod("heal-g0-r5", namespace)
        except Exception:
            return None
        return p if p.metadata.uid != before.metadata.uid and p.status.phase == "Running" else None

    p = wait_for(recreated, 60, "rank 5 recreated")
    assert p.spec.node_name == before.spec.node_name
    assert plan_of(core, namespace, "heal")["generation"] == 1  # no re-plan for a lost pod
    st = wait_phase(custom, namespace, "heal", "Ready")
    # issue 16: no other pod recreated; the loss and the recovery are told, then the degraded fields go
    assert {n for n, p in rank_pods(core, namespace, "heal").items() if uids[n] != p.metadata.uid} == {"heal-g0-r5"}
    assert "degradedGroups" not in st and "degradedSince" not in st

    def told():
        events = [e for e in core.list_namespaced_event(namespace).items if e.involved_object.name == "heal"]
        return events if {"RankLost", "GroupWhole"} <= {e.reason for e in events} else None

    lost = [e.message for e in wait_for(told, 30, "RankLost and GroupWhole events") if e.reason == "RankLost"]
    assert len(lost) == 1 and lost[0].startswith("group 0 rank 5 (heal-g0-r5): pod "), lost


def test_node_loss_replaces_only_that_nodes_ranks(core, custom, namespace, gpu_pool, operator):
    pool, nodes = gpu_pool(nodes=3, gpus=8)  # 24 GPUs for EP16: one spare node
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest("nl", pool))
    wait_phase(custom, namespace, "nl", "Ready")
    plan1 = plan_of(core, namespace, "nl")
    used = sorted({r["node"] for r in plan1["ranks"]})
    victim = used[0]
    victim_ranks = {r["rank"] for r in plan1["ranks"] if r["node"] == victim}
    core.delete_node(victim)

    def replanned():
        p = plan_of(core, namespace, "nl")
        return p if p["generation"] == 2 else None

    plan2 = wait_for(replanned, 60, "a new plan after the node loss")
    assert victim not in {r["node"] for r in plan2["ranks"]}
    # ranks on surviving nodes keep their node
    for r1, r2 in zip(plan1["ranks"], plan2["ranks"], strict=True):
        if r1["node"] != victim:
            assert r2["node"] == r1["node"], (r1, r2)
    # only the lost node's experts moved
    moved = [(layer, r) for layer, (a, b) in enumerate(zip(plan1["expert_map"], plan2["expert_map"], strict=True))
             for r in range(16) if a[r] != b[r]]
    assert {r for _, r in moved} <= victim_ranks, moved
    seen = set()

    def ready_again():
        st = get(custom, namespace, "nl").get("status") or {}
        seen.add(st.get("phase"))
        return st if st.get("phase") == "Ready" and st.get("expertMapGeneration") == 2 else None

    wait_for(ready_again, 120, "Ready on generation 2", interval=0.2)
    assert_pods_match_plan(core, namespace, "nl", plan2)
    events = core.list_namespaced_event(namespace).items
    reasons = {e.reason for e in events if e.involved_object.name == "nl"}
    assert "Planned" in reasons and "Degraded" in reasons, reasons


def test_operator_killed_mid_reconcile_converges_without_duplicates(core, custom, namespace, gpu_pool, operator):
    pool, _ = gpu_pool(nodes=5, gpus=8)
    obj = manifest("crash", pool)
    # A bigger group so the kill lands while pods are being created.
    obj["spec"]["model"]["architecture"].update({"nRoutedExperts": 32, "nGroup": 4})
    obj["spec"]["parallelism"] = {"expertParallelSize": 36, "redundantExperts": 4}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)
    wait_for(lambda: len(rank_pods(core, namespace, "crash")) > 0, 60, "first rank pods")
    operator.kill()
    n_at_kill = len(rank_pods(core, namespace, "crash"))
    operator.start()
    st = wait_phase(custom, namespace, "crash", "Ready", timeout=120)
    assert st["ready"] == "36/36"
    pods = rank_pods(core, namespace, "crash")
    assert sorted(pods) == sorted(f"crash-g0-r{i}" for i in range(36))
    plan = plan_of(core, namespace, "crash")
    assert plan["generation"] == 1, "a restart must not re-plan"
    assert_pods_match_plan(core, namespace, "crash", plan)
    assert n_at_kill <= 36


def test_spec_change_restarts_the_group_together_and_deletion_cleans_up(core, custom, namespace, gpu_pool, operator):
    pool, _ = gpu_pool(nodes=2, gpus=8)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest("roll", pool))
    wait_phase(custom, namespace, "roll", "Ready")
    old = {n: p.metadata.annotations["moe.dev/spec-hash"] for n, p in rank_pods(core, namespace, "roll").items()}
    assert len(set(old.values())) == 1
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "roll",
                                          {"spec": {"worker": {"image": "ghcr.io/moe-operator/worker:0.2.0"}}})
    mixed = []

    def rolled():
        pods = rank_pods(core, namespace, "roll")
        live = [p for p in pods.values() if not p.metadata.deletion_timestamp]
        hashes = {p.metadata.annotations["moe.dev/spec-hash"] for p in live}
        running = {p.metadata.annotations["moe.dev/spec-hash"] for p in live if p.status.phase == "Running"}
        if len(running) > 1:
            mixed.append(sorted(running))
        return (len(live) == 16 and len(hashes) == 1 and hashes != set(old.values())
                and all(p.spec.containers[0].image.endswith(":0.2.0") for p in live))

    wait_for(rolled, 90, "all ranks on the new spec", interval=0.2)
    assert not mixed, "old and new ranks ran at the same time"
    st = wait_phase(custom, namespace, "roll", "Ready")
    assert st["observedGeneration"] == 2
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "roll")

    def gone():
        return (not rank_pods(core, namespace, "roll")
                and not [c for c in core.list_namespaced_config_map(namespace).items if c.metadata.name.startswith("roll")]
                and not [s for s in core.list_namespaced_service(namespace).items if s.metadata.name.startswith("roll")])

    wait_for(gone, 90, "garbage collection of everything the deployment owned")


def test_invalid_spec_that_only_the_operator_sees_fails_with_a_reason(custom, namespace, gpu_pool, operator):
    # The CRD cannot check that a DeepSeek-V3 layout fits these nodes; the operator says why.
    pool, _ = gpu_pool(nodes=1, gpus=8)
    obj = copy.deepcopy(manifest("huge", pool, "deepseek-v3-ep288.yaml"))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)
    st = wait_phase(custom, namespace, "huge", "Pending", timeout=60)
    assert "needs 288 GPUs, 8 schedulable" in st["reason"]


def test_deployment_that_cannot_fit_in_gpu_memory_fails_at_admission(custom, namespace, gpu_pool, operator, core):
    pool, _ = gpu_pool(nodes=1, gpus=8)
    obj = manifest("toobig", pool, "deepseek-v3-ep288.yaml")
    # DeepSeek-V3 in bf16 packed 36 experts per GPU on 8 GPUs of the brief's 64 GB cannot fit.
    obj["spec"]["model"]["precision"] = "bf16"
    obj["spec"]["parallelism"] = {"expertParallelSize": 8, "maxExpertsPerGpu": 36, "redundantExperts": 32,
                                  "allowSmallExpertParallel": True}
    obj["spec"]["loadBalancing"]["maxReplicasPerExpert"] = 4
    obj["spec"]["placement"]["hardwareProfile"] = "brief"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)
    st = wait_phase(custom, namespace, "toobig", "Failed", timeout=60)
    assert st["reason"].startswith("does not fit in GPU memory"), st["reason"]
    assert "routed experts" in st["reason"]
    assert not rank_pods(core, namespace, "toobig")


def test_ready_deployment_reports_a_prediction(custom, namespace, gpu_pool, operator):
    pool, _ = gpu_pool(nodes=2, gpus=8)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest("pred", pool))
    st = wait_phase(custom, namespace, "pred", "Ready")
    p = st["prediction"]
    assert p["hardware"] == "h100" and p["memoryPerGpuGib"] > 0 and p["decodeTokensPerSecondPerGpu"] > 0


@pytest.mark.slow
def test_deepseek_v3_ep320_on_40_nodes(core, custom, namespace, gpu_pool, operator):
    pool, nodes = gpu_pool(nodes=40, gpus=8, racks=5)
    # The checkpoint volume: a statically bound PV/PVC pair, as an admin would provide it.
    core.create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{namespace}-weights"},
        "spec": {"capacity": {"storage": "1Ti"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "hostPath": {"path": "/var/tmp/moe-weights"},
                 "claimRef": {"namespace": namespace, "name": "deepseek-v3-weights"}}})
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "deepseek-v3-weights"},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": f"{namespace}-weights",
                 "resources": {"requests": {"storage": "1Ti"}}}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           manifest("dsv3", pool, "deepseek-v3-ep320.yaml"))
    st = wait_phase(custom, namespace, "dsv3", "Ready", timeout=300)
    assert st["readyRanks"] == st["totalRanks"] == 320 and st["nodesUsed"] == 40
    plan = plan_of(core, namespace, "dsv3")
    per_node = assert_pods_match_plan(core, namespace, "dsv3", plan)
    assert sorted(per_node.values()) == [8] * 40  # one rank per GPU, every GPU used
    assert len(plan["expert_map"]) == 58
    for layer in plan["expert_map"]:
        ids = [e for cell in layer for e in cell]
        assert len(ids) == 320 and set(ids) == set(range(256))
    core.delete_persistent_volume(f"{namespace}-weights")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_never_act_at_once_and_the_standby_takes_over(
        core, custom, namespace, gpu_pool, operator, kubeconfig, tmp_path, api_client):
    from kubernetes import client

    from support import OperatorProcess

    coord = client.CoordinationV1Api(api_client)
    port_b = _free_port()
    b = OperatorProcess(kubeconfig, namespace, tmp_path / "operator-b.log", identity="op-b",
                        metrics_port=port_b).start()
    try:
        pool, _ = gpu_pool(nodes=2, gpus=8)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest("ha", pool))
        wait_phase(custom, namespace, "ha", "Ready")
        leader = coord.read_namespaced_lease("moe-operator", namespace).spec.holder_identity
        assert leader in ("op-a", "op-b")
        # Only the leader reconciled: the standby's reconcile counter stays at zero.
        import urllib.request

        def reconciles(port: int) -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return float(next(x for x in text.splitlines() if x.startswith("moe_operator_reconciles_total")).split()[-1])

        standby_port = port_b if leader == "op-a" else operator.metrics_port
        leader_port = operator.metrics_port if leader == "op-a" else port_b
        assert reconciles(standby_port) == 0.0 and reconciles(leader_port) > 0
        (operator if leader == "op-a" else b).kill()
        standby = "op-b" if leader == "op-a" else "op-a"
        wait_for(lambda: coord.read_namespaced_lease("moe-operator", namespace).spec.holder_identity == standby,
                 30, f"{standby} to take the lease")
        before = core.read_namespaced_pod("ha-g0-r7", namespace).metadata.uid
        core.delete_namespaced_pod("ha-g0-r7", namespace)

        def recreated():
            try:
                p = core.read_namespaced_pod("ha-g0-r7", namespace)
            except client.ApiException:
                return False
            return p.metadata.uid != before and p.status.phase == "Running"

        wait_for(recreated, 60, "the new leader to recreate rank 7")
        assert len(rank_pods(core, namespace, "ha")) == 16
    finally:
        b.stop()
