"""The pure builders of rank pods: the admission settings from the memory model, the probes."""

from __future__ import annotations

from invalid_specs import tiny_spec
from moe_operator import api, perfmodel
from moe_operator.controller import resources
from moe_operator.controller.reconcile import shape_of
from moe_operator.placement import plan
from moe_operator.topology import Topology

OWNER = resources.Owner(name="tiny", namespace="ns", uid="u")


def _pod(spec: api.MoEDeploymentSpec, kv: perfmodel.KvAdmission | None) -> dict:
    p = plan(shape_of(spec), Topology.synthetic(2, 8), redundant=4)
    return resources.rank_pod(OWNER, spec, p, 0, 3, resources.pod_spec_hash(spec, kv), kv)


def _env(pod: dict) -> list[tuple[str, str | None]]:
    return [(e["name"], e.get("value")) for e in pod["spec"]["containers"][0]["env"]]


def test_rank_pod_carries_the_kv_admission_and_its_hash_changes_with_it():
    spec = api.parse_spec(tiny_spec())
    kv = perfmodel.KvAdmission(cache_tokens=123456, max_context=4096, max_seqs=30, model_context=4096)
    env = dict(_env(_pod(spec, kv)))
    assert (env["MOE_KV_CACHE_TOKENS"], env["MOE_MAX_CONTEXT"], env["MOE_MAX_SEQS_PER_RANK"]) == ("123456", "4096", "30")
    # hardware unknown: nothing set, the worker's defaults apply, and the hash is what it always was
    assert not {"MOE_KV_CACHE_TOKENS", "MOE_MAX_CONTEXT", "MOE_MAX_SEQS_PER_RANK"} & set(dict(_env(_pod(spec, None))))
    assert resources.pod_spec_hash(spec, None) == resources.pod_spec_hash(spec)
    # the ranks of a group must agree: other limits restart them
    other = perfmodel.KvAdmission(cache_tokens=654321, max_context=4096, max_seqs=30, model_context=4096)
    assert resources.pod_spec_hash(spec, kv) != resources.pod_spec_hash(spec, other) != resources.pod_spec_hash(spec)


def test_a_limit_the_spec_sets_itself_is_not_set_twice():
    raw = tiny_spec()
    raw["worker"]["env"] = [{"name": "MOE_MAX_CONTEXT", "value": "1024"}]
    spec = api.parse_spec(raw)
    kv = perfmodel.KvAdmission(cache_tokens=8192, max_context=1024, max_seqs=8, model_context=1024)
    env = _env(_pod(spec, kv))
    assert [v for n, v in env if n == "MOE_MAX_CONTEXT"] == ["1024"]
    assert ("MOE_KV_CACHE_TOKENS", "8192") in env and ("MOE_MAX_SEQS_PER_RANK", "8") in env
    assert resources.spec_env_int(spec, "MOE_MAX_CONTEXT") == 1024
    assert resources.spec_env_int(spec, "MOE_MAX_SEQS_PER_RANK") is None


def _probe_window_s(probe: dict) -> float:
    """Longest time from a process going silent to the kubelet's SIGKILL: failureThreshold probes,
    the first up to a period after the stop, each waiting its timeout, then the probe's grace."""
    return (probe["failureThreshold"] * probe["periodSeconds"] + probe.get("timeoutSeconds", 1)
            + probe.get("terminationGracePeriodSeconds", 0))


def test_a_hung_rank_is_killed_soon_and_a_slow_start_is_not_taken_for_a_hang():
    spec = api.parse_spec(tiny_spec())
    c = _pod(spec, None)["spec"]["containers"][0]
    live, start = c["livenessProbe"], c["startupProbe"]
    for probe in (live, start, c["readinessProbe"]):
        assert probe["httpGet"]["port"] == "metrics" and "metrics" in {p["name"] for p in c["ports"]}
    assert live["httpGet"]["path"] == start["httpGet"]["path"] == "/live"
    # Issue 16: a SIGSTOPped rank's pod must be Failed, and replaced, well within the two minutes
    # in which full EP is back; its SIGTERM is never acted on, so the probe's own grace is short.
    assert _probe_window_s(live) <= 30
    assert live["terminationGracePeriodSeconds"] < _pod(spec, None)["spec"]["terminationGracePeriodSeconds"]
    # liveness starts when the startup probe passes, not after a fixed delay
    assert "initialDelaySeconds" not in live
    # a process gets minutes to open its port, and a transient stall of one probe kills nothing
    assert start["periodSeconds"] * start["failureThreshold"] >= 120
    assert live["failureThreshold"] >= 2 and live["timeoutSeconds"] >= 2
