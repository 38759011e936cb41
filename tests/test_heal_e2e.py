"""End to end: an EP16 group heals in place on the real control plane (issue 16).

The operator and the tiny EP16 model run as in test_e2e (ranks are real processes started by the
local runner from the operator's pod specs). Three tritonclient clients send steady traffic through
one of the deployment's routers while one rank process is SIGKILLed, then another is SIGSTOPped (a
hang), then rank 0 itself (the front) is SIGKILLed. Every answer must equal `moe-worker generate
--world-size 1`'s and no request may fail (the router sends the dead front's requests again to its
replacement); the other rank processes keep their PIDs, no other pod is recreated, and each
replacement joins the running group (a new front forms it with the old ranks) until the deployment
is Ready 16/16 again.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import test_e2e
from test_e2e import GROUP, NEW, PLURAL, PROMPTS, VERSION, tiny

from moe_operator.localdev.loadgen import SteadyClients
from moe_operator.localdev.localrunner import rank_processes
from support import wait_for

checkpoint, reference = test_e2e.checkpoint, test_e2e.reference  # the same module fixtures

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def rank_pids(core, namespace: str, name: str) -> dict[int, int]:
    """rank -> PID of its `moe-worker serve` process (found by the pod IP in its environment)."""
    ips = {}
    for pod in core.list_namespaced_pod(namespace, label_selector=f"moe.dev/deployment={name}").items:
        if pod.status.pod_ip and pod.status.phase == "Running" and not pod.metadata.deletion_timestamp:
            ips[pod.status.pod_ip] = int(pod.metadata.labels["moe.dev/rank"])
    return rank_processes(ips)


def test_a_lost_rank_heals_in_place_under_load(core, api_client, namespace, gpu_pool, operator, checkpoint,
                                               reference):
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)
    pool, _ = gpu_pool(nodes=2, gpus=8, local_runner=True)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tiny("heal", pool, checkpoint))

    def status():
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "heal").get("status") or {}

    def whole():
        st = status()
        return st if st.get("phase") == "Ready" and st.get("ready") == "16/16" else None

    wait_for(whole, 300, "heal Ready 16/16", interval=1)
    uids = {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(namespace).items}
    def all_pids():
        found = rank_pids(core, namespace, "heal")
        return found if len(found) == 16 else None

    pids = wait_for(all_pids, 30, "16 rank processes")

    def a_ready_router():
        for pod in core.list_namespaced_pod(namespace, label_selector="moe.dev/router=heal").items:
            if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
                return pod.status.pod_ip
        return None

    ip = wait_for(a_ready_router, 60, "a Ready router pod")

    def rejoined(rank: int) -> bool:
        try:
            pod = core.read_namespaced_pod(f"heal-g0-r{rank}", namespace)
        except client.exceptions.ApiException as e:
            if e.status == 404:  # between the old pod's deletion and its replacement
                return False
            raise
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        return pod.metadata.uid != uids[pod.metadata.name] and ready and bool(whole())

    with SteadyClients(f"{ip}:8080", PROMPTS, NEW) as load:
        def answered(after: float, n: int = 6) -> None:
            wait_for(lambda: load.answered_after(after) >= n, 120, f"{n} requests sent after t={after:.0f} answered")

        answered(0)  # steady traffic first
        faults = []
        # Bounds on the longest time without an answer. The target for a rank's SIGKILL is 5 s:
        # measured 3.6-4.2 s when this test runs alone and 4.0 s by bench/faults.py, but 7.6 and 8.4 s
        # in two full `make test` runs on the 2-core CI machine (the rest of the suite's processes
        # share the cores). The bound here is 10 s so that the suite does not fail on contention;
        # the 5 s figure is the bench's to report (README "What survives what").
        for rank, sig, outage in ((5, signal.SIGKILL, 10.0), (9, signal.SIGSTOP, 10.0), (0, signal.SIGKILL, 30.0)):
            t_fault = time.monotonic()
            os.kill(pids[rank], sig)
            answered(t_fault)
            stalled = load.longest_outage(t_fault, time.monotonic())
            t_whole = wait_for(lambda rank=rank: rejoined(rank) and time.monotonic(), 180,
                               f"a new rank {rank} in the group, Ready 16/16, after {sig.name}", interval=1) - t_fault
            faults.append((rank, sig.name, round(stalled, 2), round(t_whole, 2)))
            assert stalled < outage, (rank, sig.name, stalled)
            assert t_whole < 120, (rank, sig.name, t_whole)
            answered(time.monotonic())  # and it serves with the replacement in the group
    print("faults (rank, signal, longest time without an answer (s), s until Ready 16/16):", faults)

    # No request failed: a lost rank's sequences are recomputed by the group, and the requests the
    # dead front held are sent again by the router to the replacement front.
    failed = [o for o in load.outcomes() if o.output is None]
    assert not failed, failed[:5]
    wrong = [o for o in load.outcomes() if o.output is not None and o.output != reference[o.prompt]]
    assert not wrong, wrong[:5]
    # Only the faulty ranks were replaced: every other pod and rank process is the same one.
    now_pods = {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(namespace).items}
    changed = sorted(n for n, u in uids.items() if now_pods.get(n) != u)
    assert changed == ["heal-g0-r0", "heal-g0-r5", "heal-g0-r9"], changed
    now_pids = rank_pids(core, namespace, "heal")
    kept = {r: p for r, p in pids.items() if r not in (0, 5, 9)}
    assert {r: p for r, p in now_pids.items() if r in kept} == kept
    assert all(now_pids[r] != pids[r] for r in (0, 5, 9))
    events = [e.reason for e in core.list_namespaced_event(namespace).items]
    assert "RankLost" in events and "GroupWhole" in events, sorted(set(events))
