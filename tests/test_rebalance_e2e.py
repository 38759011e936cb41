"""Load-driven rebalancing end to end (issue 9): skewed traffic -> the operator measures per-expert
load on the ranks, publishes a new expert map, the 16 rank processes switch without restarting,
the measured imbalance falls, and every answer stays the same as before the switch. Then a
threshold the 16 ranks cannot reach: the operator adds rank pods on free GPUs (maxExtraGpus), the
running group takes them in without restarting, the imbalance falls below it; traffic stops: after
the cooldown the group shrinks back to 16 ranks, the extra pods go, answers never change."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml

from support import REPO, OperatorProcess, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

GROUP, VERSION, PLURAL = "serving.moe.dev", "v1alpha1", "moedeployments"


def _print_rank_logs(namespace: str) -> None:
    """The tail of rank 0's and every scale-out rank's container log (the local runner keeps them)."""
    import os
    from pathlib import Path

    pods = Path(os.environ.get("MOE_CLUSTER_DIR", "")) / "runner" / "pods"
    for d in sorted(pods.glob(f"{namespace}_rb-g0-r*")):
        rank = int(d.name.split("_")[1].rsplit("-r", 1)[1])
        if rank == 0 or rank >= 16:
            lines = (d / "container.log").read_text(errors="replace").splitlines() if (d / "container.log").exists() else []
            print(f"---- {d.name} ----\n" + "\n".join(lines[-15:]))


def test_skewed_load_gets_replicas_and_imbalance_falls(core, api_client, kubeconfig, namespace, gpu_pool,
                                                       crd_installed, tmp_path):
    from kubernetes import client

    from moe_operator import api
    from moe_operator.controller import scaling
    from moe_operator.controller.reconcile import shape_of
    from moe_operator.localdev import loadgen
    from moe_operator.placement import Plan
    from moe_operator.placement import plan as make_plan
    from moe_operator.topology import Topology

    custom = client.CustomObjectsApi(api_client)
    obj = yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text())
    spec = api.parse_deployment(obj).spec
    (tmp_path / "config.json").write_text(json.dumps(spec.model.architecture.hf_config()))
    ckpt = tmp_path / "ckpt"
    # bf16 weights and fp32 activations: greedy answers are exactly reproducible across maps.
    subprocess.run([sys.executable, "-m", "moe_worker.cli", "make-checkpoint", "--config",
                    str(tmp_path / "config.json"), "--out", str(ckpt), "--dtype", "bf16", "--seed", "1"],
                   check=True, cwd=REPO)
    # One 24-GPU NVLink domain (a single node here): 16 ranks + 8 free GPUs next to them, where
    # extra copies of hot experts take load off (tokens prefer copies on their own node).
    pool, _ = gpu_pool(nodes=1, gpus=24, local_runner=True)
    op = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log",
                         extra_env={"MOE_REBALANCE_MIN_TOKENS": "200"}).start()
    try:
        obj["metadata"] = {"name": "rb"}
        obj["spec"]["model"]["checkpoint"] = {"hostPath": str(ckpt)}
        obj["spec"]["model"]["precision"] = "bf16"
        obj["spec"]["placement"]["nodeSelector"] = {"moe.dev/pool": pool}
        obj["spec"]["loadBalancing"] = {"enabled": True, "windowSeconds": 10, "intervalSeconds": 2,
                                        "cooldownSeconds": 30, "imbalanceThreshold": 100.0,
                                        "maxReplicasPerExpert": 4}
        obj["spec"]["worker"]["env"] = [{"name": "MOE_THREADS", "value": "1"}, {"name": "MOE_MAP_POLL_S", "value": "0.5"}]
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)

        def status():
            return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "rb").get("status") or {}

        wait_for(lambda: status().get("phase") == "Ready", 300, "rb Ready", interval=1)
        url = f"{core.read_namespaced_pod('rb-g0-r0', namespace).status.pod_ip}:8080"
        traffic = loadgen.Traffic(hot_tokens=(5,), hot_fraction=0.75, prompt_len=12, max_tokens=3, vocab=512)

        # Phase A: skewed traffic, threshold out of reach: the operator only measures.
        a = loadgen.run(url, traffic, seconds=14, clients=6)
        assert a.errors == 0, a.error_messages[:3]
        st = wait_for(lambda: (s := status()).get("imbalance") and s, 30, "a measured imbalance")
        before = float(st["imbalance"])
        assert st["expertMapGeneration"] == 1
        # What rebalancing can reach for this load: the planner on the measured per-expert load.
        cm = core.read_namespaced_config_map("rb-g0-plan", namespace)
        current = Plan.from_json(cm.data["plan.json"])
        samples = []
        for r in range(16):
            ip = core.read_namespaced_pod(f"rb-g0-r{r}", namespace).status.pod_ip
            samples.append(urllib.request.urlopen(f"http://{ip}:9400/metrics", timeout=5).read().decode())
        counts = {}
        for t in samples:
            counts.update(scaling.parse_expert_tokens(t))
        shape = shape_of(spec)
        logical, _ = scaling.loads(counts, shape.moe_layers, shape.n_routed_experts, 16)
        better = make_plan(shape, Topology.synthetic(1, 16), load=logical + 1e-9, previous=None, redundant=4)
        reachable = scaling.imbalance(scaling.predicted_physical(better, logical))
        wider = make_plan(shape, Topology.synthetic(1, 24), load=logical + 1e-9, previous=None, redundant=8)
        reachable20 = scaling.imbalance(scaling.predicted_physical(wider, logical))
        now_pred = scaling.imbalance(scaling.predicted_physical(current, logical))
        assert reachable < now_pred * 0.9, (reachable, now_pred, before)
        threshold = round((before + max(reachable, 1.0)) / 2, 2)
        assert before > threshold > 1.0

        # Phase B: a reachable threshold; keep the same traffic flowing through the switch.
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "rb",
                                              {"spec": {"loadBalancing": {"imbalanceThreshold": threshold}}})
        pods_before = {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(namespace, label_selector="moe.dev/deployment").items}
        b = loadgen.run(url, traffic, seconds=30, clients=6)
        assert b.errors == 0, b.error_messages[:3]
        st = status()
        assert st["expertMapGeneration"] >= 2, st
        assert "imbalance" in (st.get("lastRebalanceReason") or ""), st
        hot = st.get("hotExperts") or []
        assert hot and max(h["replicas"] for h in hot) >= 2, hot
        # no rank restarted: the switch is live
        assert {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(namespace, label_selector="moe.dev/deployment").items} == pods_before

        # Phase C: after a full window on the new map, the measured imbalance is below the threshold.
        t0 = time.monotonic()
        c = loadgen.run(url, traffic, seconds=16, clients=6)
        assert c.errors == 0, c.error_messages[:3]
        after = float(status()["imbalance"])
        assert after < threshold, (before, threshold, after, time.monotonic() - t0)

        # Phase D: a threshold only more GPUs reach. The operator adds rank pods (scale-out); the
        # running group takes them in at a step boundary while the traffic flows.
        assert reachable20 < reachable * 0.9, (reachable, reachable20)
        # Between what 20 and 16 ranks reach, nearer 16: the measured imbalance on 20 ranks lands
        # up to ~9% above its prediction on a busy machine (0.4 of the way failed 1 run in 4).
        threshold_d = round(reachable20 + 0.6 * (reachable - reachable20), 2)
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "rb", {"spec": {"loadBalancing": {
            "imbalanceThreshold": threshold_d, "maxExtraGpus": 4}}})
        chunks: list = []
        stop = threading.Event()

        def traffic_until_stopped() -> None:  # traffic throughout, however long the scale-out takes
            while not stop.is_set():
                chunks.append(loadgen.run(url, traffic, seconds=10, clients=6))

        th = threading.Thread(target=traffic_until_stopped)
        th.start()
        try:  # cooldown left from phase B + a window above the threshold + new pods start and join
            st = wait_for(lambda: (s := status()).get("extraRanks") and s.get("phase") == "Ready"
                          and s.get("readyRanks") == s.get("totalRanks") and s, 180, "scale-out ranks Ready",
                          interval=1)
        except AssertionError:
            print("status:", json.dumps(status(), indent=1))
            print("events:", [(ev.reason, ev.message) for ev in core.list_namespaced_event(namespace).items][-12:])
            _print_rank_logs(namespace)
            raise
        finally:
            stop.set()
        extra = st["extraRanks"]
        assert 0 < extra <= 4 and st["totalRanks"] == 16 + extra, st
        assert "scale-out" in st["lastRebalanceReason"], st
        grown = Plan.from_json(core.read_namespaced_config_map("rb-g0-plan", namespace).data["plan.json"])
        assert grown.num_ranks == 16 + extra
        # the 16 original rank pods are the same processes: the group grew in place
        now_pods = {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(namespace, label_selector="moe.dev/deployment").items}
        assert all(now_pods.get(n) == uid for n, uid in pods_before.items()), "an original rank restarted"
        th.join()
        d = loadgen.Result()
        for ch in chunks:
            d.requests += ch.requests
            d.errors += ch.errors
            d.error_messages += ch.error_messages
            for prompt, outs in ch.answers.items():
                d.answers.setdefault(prompt, set()).update(outs)
        assert d.errors == 0, d.error_messages[:3]
        e = loadgen.run(url, traffic, seconds=16, clients=6)  # a full window on the grown group
        assert e.errors == 0, e.error_messages[:3]
        after_d = float(status()["imbalance"])
        assert after_d < threshold_d, (reachable, reachable20, threshold_d, after_d)
        ip0 = core.read_namespaced_pod(f"rb-g0-r{16 + extra - 1}", namespace).status.pod_ip
        text = urllib.request.urlopen(f"http://{ip0}:9400/metrics", timeout=5).read().decode()
        assert scaling.parse_expert_tokens(text), "a new rank computed no routed tokens"

        # Phase E: traffic stops. After the cooldown the group goes back to 16 ranks and the
        # resting map; the extra ranks leave the group, exit, and their pods are deleted.
        try:
            st = wait_for(lambda: (s := status()).get("extraRanks") == 0 and s.get("phase") == "Ready"
                          and s.get("totalRanks") == 16 and s, 150, "scale-in to 16 ranks", interval=2)
        except AssertionError:
            print("status:", json.dumps(status(), indent=1))
            print("events:", [(ev.reason, ev.message) for ev in core.list_namespaced_event(namespace).items][-12:])
            _print_rank_logs(namespace)
            raise
        wait_for(lambda: not [p for p in core.list_namespaced_pod(namespace, label_selector="moe.dev/deployment").items
                              if int(p.metadata.labels["moe.dev/rank"]) >= 16], 60, "extra rank pods gone")
        final = {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(namespace, label_selector="moe.dev/deployment").items}
        assert final == pods_before, "the original ranks must still be the same pods"
        f = loadgen.run(url, traffic, seconds=4, clients=2)
        assert f.errors == 0, f.error_messages[:3]

        # Every prompt got one and the same answer in all three phases (before, during, after).
        answers: dict = {}
        for res in (a, b, c, d, e, f):
            for p, outs in res.answers.items():
                answers.setdefault(p, set()).update(outs)
        assert all(len(v) == 1 for v in answers.values()), {p: v for p, v in answers.items() if len(v) > 1}
        # ... and the hot prompt's answer is the single-process reference's.
        hot_prompt = tuple([5] * 12)
        ref = subprocess.run([sys.executable, "-m", "moe_worker.cli", "generate", "--checkpoint", str(ckpt),
                              "--world-size", "1", "--prompt-ids", ",".join(map(str, hot_prompt)),
                              "--max-new-tokens", "3", "--json"], check=True, capture_output=True, text=True, cwd=REPO)
        doc = json.loads(ref.stdout)
        ids = doc.get("generated_ids") or doc.get("output_ids") or doc.get("ids")
        ids = ids[0] if ids and isinstance(ids[0], list) else ids
        assert answers[hot_prompt] == {tuple(int(x) for x in ids)}
        events = core.list_namespaced_event(namespace).items
        reasons = {ev.reason for ev in events}
        assert {"Rebalanced", "ScaledOut", "ScaledIn"} <= reasons, reasons
    finally:
        op.stop()
        print("---- operator log (tail) ----\n" + op.logs())
