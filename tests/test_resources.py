"""The pure builders of rank pods: the admission settings from the memory model."""

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
