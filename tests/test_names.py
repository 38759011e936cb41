"""Deployment names: every name derived from an accepted one is valid, and no two collide."""

from __future__ import annotations

import pytest
import yaml

from invalid_specs import INVALID_NAMES, LONGEST_NAME, tiny_spec
from moe_operator import api, names
from moe_operator.controller import resources
from moe_operator.controller.reconcile import shape_of
from moe_operator.placement import plan
from moe_operator.topology import Topology


def test_the_longest_accepted_name_gives_valid_names_for_every_object():
    assert names.MAX_NAME_LENGTH == len(LONGEST_NAME) == 53
    api.check_name(LONGEST_NAME)
    for what, name, pattern, limit in names.derived(LONGEST_NAME):
        assert pattern.match(name) and len(name) <= limit, (what, name, len(name))
    # the bound is tight: one character more and the longest pod hostname is too long
    hostname = dict((w, n) for w, n, _, _ in names.derived(LONGEST_NAME + "x"))["pod hostname"]
    assert len(hostname) == 64
    with pytest.raises(api.SpecError, match="at most 53"):
        api.check_name(LONGEST_NAME + "x")


def test_the_index_bounds_are_the_apis():
    p = api.Parallelism.model_fields
    assert any(getattr(m, "le", None) == names.MAX_REPLICAS for m in p["replicas"].metadata)
    assert any(getattr(m, "le", None) == names.MAX_EXPERT_PARALLEL for m in p["expert_parallel_size"].metadata)
    lb = api.LoadBalancing.model_fields
    assert any(getattr(m, "le", None) == names.MAX_EXTRA_GPUS for m in lb["max_extra_gpus"].metadata)
    assert names.MAX_RANK == names.MAX_EXPERT_PARALLEL + names.MAX_EXTRA_GPUS - 1


def test_the_builders_use_exactly_these_names():
    spec = api.parse_spec(tiny_spec())
    owner = resources.Owner(name=LONGEST_NAME, namespace="ns", uid="u")
    p = plan(shape_of(spec), Topology.synthetic(2, 8), redundant=4)
    objs = resources.desired_objects(owner, spec, [p, p], [1, 1])
    derived = {n for g in range(2) for r in range(16) for _, n, _, _ in names.derived(LONGEST_NAME, g, r)}
    for o in objs:
        assert o["metadata"]["name"] in derived, o["metadata"]["name"]
        if o["kind"] == "Pod":
            assert o["spec"]["hostname"] in derived and o["spec"]["subdomain"] in derived
            assert len(o["spec"]["hostname"]) <= 63 and len(o["spec"]["subdomain"]) <= 63
    services = [o["metadata"]["name"] for o in objs if o["kind"] == "Service"]
    assert sorted(services) == sorted([LONGEST_NAME, LONGEST_NAME + "-ranks"])
    (router,) = [o for o in objs if o["kind"] == "Deployment"]
    assert router["metadata"]["name"] == LONGEST_NAME + "-router"
    # its pods are named by the ReplicaSet controller: NAME-router-<hash up to 10>-<5>
    router_pod = dict((w, n) for w, n, _, _ in names.derived(LONGEST_NAME))["router pod"]
    assert router_pod.startswith(LONGEST_NAME + "-router-") and len(router_pod) == len(LONGEST_NAME) + 7 + 17


@pytest.mark.parametrize("case,name", INVALID_NAMES, ids=[c[0] for c in INVALID_NAMES])
def test_invalid_names_are_refused_naming_the_field(case, name):
    with pytest.raises(api.SpecError) as e:
        api.check_name(name)
    assert e.value.field == "metadata.name"
    obj = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": name},
           "spec": tiny_spec()}
    with pytest.raises(api.SpecError) as e:  # `moe plan` reads whole manifests
        api.parse_deployment(obj)
    assert e.value.field == "metadata.name"


def _services(deployment: str) -> set[str]:
    return {names.client_service(deployment), names.headless_service(deployment)}


def test_no_two_accepted_names_share_a_service_name():
    # The client Service is named like the deployment and the headless one NAME-ranks; a deployment
    # named X-ranks would take X's headless Service, so such names are refused.
    candidates = ["x", "x-ranks", "x-ranks-ranks", "a-b", "a", "ranks", "r-anks", "tiny", "tiny-ranks",
                  "my-ranks2", LONGEST_NAME]
    accepted = [n for n in candidates if names.name_problem(n) is None]
    assert "x-ranks" not in accepted and "tiny-ranks" not in accepted and "ranks" in accepted
    seen: dict[str, str] = {}
    for d in accepted:
        for s in _services(d):
            assert seen.setdefault(s, d) == d, f"{d} and {seen[s]} both own Service {s}"
    # and in general: the headless Service name of an accepted name is never an accepted name
    for d in accepted:
        assert names.name_problem(names.headless_service(d)) is not None


def test_no_two_accepted_names_share_a_budget_or_policy_name():
    # The rank PodDisruptionBudget and NetworkPolicy are named like the deployment, the routers'
    # NAME-router; a deployment named X-router would take X's, so such names are refused.
    candidates = ["x", "x-router", "x-router-router", "router", "x-routers", "tiny", "tiny-router", LONGEST_NAME]
    accepted = [n for n in candidates if names.name_problem(n) is None]
    assert "x-router" not in accepted and "tiny-router" not in accepted
    assert {"router", "x-routers", "x"} <= set(accepted)
    seen: dict[str, str] = {}
    for d in accepted:
        for n in {names.pod_disruption_budget(d), names.network_policy(d), names.router(d)}:
            assert seen.setdefault(n, d) == d, f"{d} and {seen[n]} both own a budget or policy {n}"
    for d in accepted:
        assert names.name_problem(names.router(d)) is not None


def test_every_manifest_name_is_accepted():
    from support import REPO

    for path in sorted((REPO / "manifests").glob("*.yaml")):
        api.check_name(yaml.safe_load(path.read_text())["metadata"]["name"])


def test_a_deployment_admitted_before_the_rule_existed_fails_with_the_reason():
    from fakekube import FakeKube
    from moe_operator.controller.reconcile import Reconciler

    kube = FakeKube()
    kube.add_gpu_nodes(2)
    kube.add_deployment({"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                         "metadata": {"name": "my.model"}, "spec": tiny_spec()}, "ns")
    out = Reconciler(kube, workers=1).reconcile("ns", "my.model")
    assert out.status.phase == "Failed" and out.status.reason.startswith("metadata.name: must be a DNS-1035")
    assert not kube.list("Pod", "ns") and not kube.list("Service", "ns")
