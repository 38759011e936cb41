"""The objects that decide who may talk to rank pods (issue 20), built without a cluster: the
NetworkPolicy and the pods its selectors must cover, the rank key Secret and its mount, the API key
mount. No network plugin enforces NetworkPolicy in the local cluster, so these tests check the
selectors against the labels of the pods the operator builds, with the API server's matching rules.
"""

from __future__ import annotations

import base64
import copy

import pytest

from invalid_specs import tiny_spec
from moe_operator import api
from moe_operator.controller import resources
from moe_operator.controller.reconcile import shape_of
from moe_operator.placement import plan
from moe_operator.topology import Topology
from support import selects

OWNER = resources.Owner(name="tiny", namespace="ns", uid="u")
OTHER = resources.Owner(name="tiny2", namespace="ns", uid="v")


def admits(policy: dict, src_labels: dict[str, str], src_ns_labels: dict[str, str], src_ns: str,
           dst_labels: dict[str, str], port: int) -> bool:
    """Whether `policy` (in its namespace) lets a pod with `src_labels` in namespace `src_ns` reach
    `port` of a pod with `dst_labels`, per the NetworkPolicy rules (peers ORed, ports ORed, rules ORed)."""
    spec = policy["spec"]
    if not selects(spec["podSelector"], dst_labels):
        return False
    for rule in spec.get("ingress") or []:
        if rule.get("ports") and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in rule["ports"]):
            continue
        for peer in rule.get("from") or [{}]:  # no `from`: every source
            if "ipBlock" in peer:
                continue  # pods are not matched by address here
            if "namespaceSelector" in peer:
                ns_ok = selects(peer["namespaceSelector"], src_ns_labels)
            else:
                ns_ok = src_ns == policy["metadata"]["namespace"]
            if ns_ok and selects(peer.get("podSelector") or {}, src_labels):
                return True
    return False


def ns_labels(name: str) -> dict[str, str]:
    return {resources.L_NAMESPACE_NAME: name}


def spec_with(**serving) -> api.MoEDeploymentSpec:
    raw = tiny_spec()
    raw.setdefault("serving", {}).update(serving)
    return api.parse_spec(raw)


def pods_of(owner: resources.Owner, spec: api.MoEDeploymentSpec, groups: int = 2, extra_ranks: int = 2) -> list[dict]:
    """Rank pods of `groups` groups, each with `extra_ranks` scale-out ranks beyond the spec's size."""
    shape = shape_of(spec)
    p = plan(shape, Topology.synthetic(3, 8), redundant=4 + extra_ranks)
    h = resources.pod_spec_hash(spec)
    return [resources.rank_pod(owner, spec, p, g, r, h) for g in range(groups) for r in range(p.num_ranks)]


def labels(pod: dict) -> dict[str, str]:
    return pod["metadata"]["labels"]


def ports_of(pod: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}


# --- NetworkPolicy --------------------------------------------------------------------------------

def test_the_policy_selects_every_rank_pod_of_its_deployment_and_no_other():
    spec = api.parse_spec(tiny_spec())
    policy = resources.network_policy(OWNER, spec)
    mine, theirs = pods_of(OWNER, spec), pods_of(OTHER, spec)
    assert len(mine) == 2 * 18 and {labels(p)[resources.L_RANK] for p in mine} >= {"16", "17"}  # scale-out ranks
    assert all(selects(policy["spec"]["podSelector"], labels(p)) for p in mine)
    assert not any(selects(policy["spec"]["podSelector"], labels(p)) for p in theirs)
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress left open
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "u" and policy["metadata"]["name"] == "tiny"


def test_ranks_reach_each_other_on_any_port_and_other_pods_do_not():
    spec = api.parse_spec(tiny_spec())
    policy = resources.network_policy(OWNER, spec)
    mine, theirs = pods_of(OWNER, spec), pods_of(OTHER, spec)
    random_gloo_port = 41234
    for src in (mine[0], mine[-1]):  # group 0 front, group 1's last scale-out rank
        for dst in mine:
            for port in (resources.DIST_PORT, random_gloo_port, *ports_of(dst).values()):
                assert admits(policy, labels(src), ns_labels("ns"), "ns", labels(dst), port)
    # another deployment's rank, or any other pod, does not reach the rendezvous or gloo ports
    for src_labels, src_ns in ((labels(theirs[0]), "ns"), ({}, "ns"), (labels(mine[0]), "elsewhere")):
        for port in (resources.DIST_PORT, random_gloo_port):
            assert not admits(policy, src_labels, ns_labels(src_ns), src_ns, labels(mine[1]), port)


def test_serving_ports_are_open_to_the_cluster_by_default_and_to_the_specs_sources_otherwise():
    spec = api.parse_spec(tiny_spec())
    front = next(p for p in pods_of(OWNER, spec) if labels(p).get(resources.L_FRONT) == "true")
    http, grpc = ports_of(front)["http"], ports_of(front)["grpc"]
    assert (http, grpc) == (spec.serving.http_port, spec.serving.grpc_port)
    default = resources.network_policy(OWNER, spec)
    for port in (http, grpc):
        assert admits(default, {"app": "client"}, ns_labels("anywhere"), "anywhere", labels(front), port)
    assert not admits(default, {"app": "client"}, ns_labels("anywhere"), "anywhere", labels(front), resources.DIST_PORT)

    narrowed = spec_with(allowedSources=[
        {"namespaceSelector": {"matchLabels": {"team": "ml"}}, "podSelector": {"matchLabels": {"app": "gateway"}}},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}])
    policy = resources.network_policy(OWNER, narrowed)
    assert policy["spec"]["ingress"][1]["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "ml"}}, "podSelector": {"matchLabels": {"app": "gateway"}}},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]
    gw_ns = {**ns_labels("gw"), "team": "ml"}
    assert admits(policy, {"app": "gateway"}, gw_ns, "gw", labels(front), http)
    assert not admits(policy, {"app": "other"}, gw_ns, "gw", labels(front), http)
    assert not admits(policy, {"app": "gateway"}, ns_labels("gw"), "gw", labels(front), grpc)


def test_metrics_port_is_open_to_any_namespace_by_default_and_else_to_the_named_ones_and_the_operator():
    spec = api.parse_spec(tiny_spec())
    rank = pods_of(OWNER, spec)[3]
    port = ports_of(rank)["metrics"]
    default = resources.network_policy(OWNER, spec, operator_namespace="moe-system")
    assert admits(default, {"app": "prometheus"}, ns_labels("anything"), "anything", labels(rank), port)
    assert not admits(default, {"app": "prometheus"}, ns_labels("anything"), "anything", labels(rank), resources.DIST_PORT)

    policy = resources.network_policy(OWNER, spec_with(metricsNamespaces=["monitoring"]), operator_namespace="moe-system")
    for ns in ("monitoring", "moe-system"):
        assert admits(policy, {"app": "prometheus"}, ns_labels(ns), ns, labels(rank), port)
    assert not admits(policy, {"app": "prometheus"}, ns_labels("default"), "default", labels(rank), port)
    # the operator's namespace is not known (run by hand): only the named ones
    alone = resources.network_policy(OWNER, spec_with(metricsNamespaces=["monitoring"]))
    assert not admits(alone, {}, ns_labels("moe-system"), "moe-system", labels(rank), port)


def test_the_policy_changes_no_rank_but_the_api_key_restarts_the_group():
    spec = api.parse_spec(tiny_spec())
    h = resources.pod_spec_hash(spec)
    assert resources.pod_spec_hash(spec_with(metricsNamespaces=["monitoring"],
                                             allowedSources=[{"ipBlock": {"cidr": "0.0.0.0/0"}}])) == h
    assert resources.pod_spec_hash(spec_with(apiKeySecret={"name": "keys", "key": "k"})) != h
    # a rank key Secret created again holds a new key: its uid is in the hash
    assert resources.pod_spec_hash(spec, None, "uid-1") != resources.pod_spec_hash(spec, None, "uid-2") != h


@pytest.mark.parametrize("bad,field", [
    ({"allowedSources": []}, "spec.serving.allowedSources"),
    ({"allowedSources": [{}]}, "spec.serving.allowedSources[0]"),
    ({"allowedSources": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}, "spec.serving.allowedSources[0]"),
    ({"allowedSources": [{"ipBlock": {"cidr": "ten"}}]}, "spec.serving.allowedSources[0].ipBlock.cidr"),
    ({"metricsNamespaces": ["Not_A_Namespace"]}, "spec.serving.metricsNamespaces[0]"),
    ({"apiKeySecret": {"name": "keys"}}, "spec.serving.apiKeySecret.key"),
])
def test_bad_sources_and_key_references_are_refused_naming_the_field(bad, field):
    raw = tiny_spec()
    raw.setdefault("serving", {}).update(bad)
    with pytest.raises(api.SpecError) as e:
        api.parse_spec(raw)
    assert e.value.field == field, e.value


def test_the_api_key_secret_cannot_be_the_rank_key_secret():
    obj = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": "tiny"},
           "spec": {**tiny_spec(), "serving": {"apiKeySecret": {"name": "tiny-rank-key", "key": "key"}}}}
    with pytest.raises(api.SpecError) as e:
        api.parse_deployment(obj)
    assert e.value.field == "spec.serving.apiKeySecret.name"
    other = copy.deepcopy(obj)
    other["metadata"]["name"] = "other"
    api.parse_deployment(other)


# --- the routers ---------------------------------------------------------------------------------

def router_labels(owner: resources.Owner, spec: api.MoEDeploymentSpec) -> dict[str, str]:
    """The labels of the router pods the Deployment controller makes from the operator's template."""
    return resources.router_deployment(owner, spec)["spec"]["template"]["metadata"]["labels"]


def test_nothing_that_selects_rank_pods_selects_a_router():
    spec = api.parse_spec(tiny_spec())
    router = router_labels(OWNER, spec)
    ranks = pods_of(OWNER, spec)
    rank_selectors = {
        "headless Service": {"matchLabels": resources.headless_service(OWNER, spec)["spec"]["selector"]},
        "PodDisruptionBudget": resources.pod_disruption_budget(OWNER)["spec"]["selector"],
        "NetworkPolicy": resources.network_policy(OWNER, spec)["spec"]["podSelector"],
        # the reconciler lists its rank pods, and kopf watches pods, by this label
        "the operator's pod listing and watch": {"matchExpressions": [
            {"key": resources.L_DEPLOYMENT, "operator": "Exists"}]},
    }
    for what, sel in rank_selectors.items():
        assert all(selects(sel, labels(p)) for p in ranks), what
        assert not selects(sel, router), f"the {what} would take a router pod for a rank"
    # and the routers' own objects take no rank pod, nor another deployment's router
    router_selectors = {
        "router Deployment": resources.router_deployment(OWNER, spec)["spec"]["selector"],
        "router PodDisruptionBudget": resources.router_pod_disruption_budget(OWNER)["spec"]["selector"],
        "router NetworkPolicy": resources.router_network_policy(OWNER, spec)["spec"]["podSelector"],
    }
    for what, sel in router_selectors.items():
        assert selects(sel, router), what
        assert not any(selects(sel, labels(p)) for p in ranks), what
        assert not selects(sel, router_labels(OTHER, spec)), what


def test_ranks_admit_their_routers_on_the_serving_ports_only():
    spec = spec_with(allowedSources=[{"ipBlock": {"cidr": "10.0.0.0/8"}}])  # no pod is an allowed source
    policy = resources.network_policy(OWNER, spec, operator_namespace="moe-system")
    front = next(p for p in pods_of(OWNER, spec) if labels(p).get(resources.L_FRONT) == "true")
    mine, theirs = router_labels(OWNER, spec), router_labels(OTHER, spec)
    for port in (spec.serving.http_port, spec.serving.grpc_port):
        assert admits(policy, mine, ns_labels("ns"), "ns", labels(front), port)
        assert not admits(policy, theirs, ns_labels("ns"), "ns", labels(front), port)
        assert not admits(policy, mine, ns_labels("elsewhere"), "elsewhere", labels(front), port)
    assert not admits(policy, mine, ns_labels("ns"), "ns", labels(front), resources.DIST_PORT)
    assert not admits(policy, mine, ns_labels("ns"), "ns", labels(front), 41234)  # a gloo port


def test_routers_admit_the_specs_clients_and_metrics_scrapers():
    spec = api.parse_spec(tiny_spec())
    router = router_labels(OWNER, spec)
    http, grpc, metrics = spec.serving.http_port, spec.serving.grpc_port, spec.serving.metrics_port
    default = resources.router_network_policy(OWNER, spec)
    assert default["metadata"]["name"] == "tiny-router" and default["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert default["spec"]["policyTypes"] == ["Ingress"]  # egress open: to the fronts and DNS
    for port in (http, grpc, metrics):
        assert admits(default, {"app": "client"}, ns_labels("anywhere"), "anywhere", router, port)
    assert not admits(default, {"app": "client"}, ns_labels("anywhere"), "anywhere", router, resources.DIST_PORT)

    narrowed = spec_with(metricsNamespaces=["monitoring"], allowedSources=[
        {"namespaceSelector": {"matchLabels": {"team": "ml"}}, "podSelector": {"matchLabels": {"app": "gateway"}}}])
    policy = resources.router_network_policy(OWNER, narrowed, operator_namespace="moe-system")
    gw_ns = {**ns_labels("gw"), "team": "ml"}
    for port in (http, grpc):
        assert admits(policy, {"app": "gateway"}, gw_ns, "gw", router, port)
        assert not admits(policy, {"app": "other"}, gw_ns, "gw", router, port)
        assert not admits(policy, {"app": "gateway"}, ns_labels("gw"), "gw", router, port)
    assert not admits(policy, {"app": "gateway"}, gw_ns, "gw", router, metrics)
    for ns in ("monitoring", "moe-system"):
        assert admits(policy, {"app": "prometheus"}, ns_labels(ns), ns, router, metrics)
    assert not admits(policy, {"app": "prometheus"}, ns_labels("default"), "default", router, metrics)
    # the same sources as the ranks' serving and metrics ports
    ranks = resources.network_policy(OWNER, narrowed, operator_namespace="moe-system")["spec"]["ingress"]
    assert policy["spec"]["ingress"] == [ranks[1], ranks[2]]


def test_every_client_service_port_reaches_a_port_the_allowed_sources_are_admitted_to():
    # A Service forwards to its targetPort; a NetworkPolicy sees that port, not the Service's, so the
    # `openai` port (8000 -> the container port `http`) needs no rule of its own.
    gw_ns = {**ns_labels("gw"), "team": "ml"}
    for routers in (2, 0):
        spec = spec_with(routerReplicas=routers, allowedSources=[{"namespaceSelector": {"matchLabels": {"team": "ml"}}}])
        svc = resources.client_service(OWNER, spec)["spec"]
        if routers:
            policy = resources.router_network_policy(OWNER, spec)
            target = resources.router_deployment(OWNER, spec)["spec"]["template"]
            dst = target["metadata"]["labels"]
            container_ports = {p["name"]: p["containerPort"] for p in target["spec"]["containers"][0]["ports"]}
        else:
            policy = resources.network_policy(OWNER, spec)
            front = next(p for p in pods_of(OWNER, spec) if labels(p).get(resources.L_FRONT) == "true")
            dst, container_ports = labels(front), ports_of(front)
        assert selects({"matchLabels": svc["selector"]}, dst)
        assert {p["name"] for p in svc["ports"]} == {"http", "grpc", "openai"}
        for port in svc["ports"]:
            target_port = container_ports[port["targetPort"]]
            assert admits(policy, {"app": "gateway"}, gw_ns, "gw", dst, target_port), (routers, port)
            assert not admits(policy, {"app": "gateway"}, ns_labels("gw"), "gw", dst, target_port), (routers, port)
        assert not admits(policy, {"app": "gateway"}, gw_ns, "gw", dst, spec.serving.openai_port)


def test_the_router_budget_lets_one_router_go_at_a_time():
    pdb = resources.router_pod_disruption_budget(OWNER)
    assert pdb["metadata"]["name"] == "tiny-router" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == "u"


# --- rank key and API key -------------------------------------------------------------------------

def test_the_rank_key_secret_holds_the_key_and_is_immutable():
    key = bytes(range(32))
    s = resources.rank_key_secret(OWNER, key)
    assert s["metadata"]["name"] == "tiny-rank-key" and s["immutable"] is True and s["type"] == "Opaque"
    assert base64.b64decode(s["data"][resources.RANK_KEY_FIELD]) == key
    assert s["metadata"]["ownerReferences"][0]["uid"] == "u"


def _mounts(pod: dict) -> dict[str, dict]:
    c = pod["spec"]["containers"][0]
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    return {m["mountPath"]: {**m, "volume": vols[m["name"]]} for m in c["volumeMounts"]}


def test_every_rank_mounts_the_rank_key_read_only_and_only_the_front_the_api_key():
    spec = spec_with(apiKeySecret={"name": "keys", "key": "api-key"})
    for pod in pods_of(OWNER, spec, groups=1):
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        mounts = _mounts(pod)
        m = mounts[resources.RANK_KEY_MOUNT]
        assert m["readOnly"] and m["volume"]["secret"]["secretName"] == "tiny-rank-key"
        assert m["volume"]["secret"]["items"] == [{"key": "key", "path": "key"}]
        assert m["volume"]["secret"]["defaultMode"] == 0o440
        assert env["MOE_RANK_KEY_FILE"] == "/etc/moe/rank-key/key"
        front = labels(pod).get(resources.L_FRONT) == "true"
        assert ("MOE_API_KEY_FILE" in env) == front == (resources.API_KEY_MOUNT in mounts)
        if front:
            a = mounts[resources.API_KEY_MOUNT]
            assert a["readOnly"] and a["volume"]["secret"]["secretName"] == "keys"
            assert a["volume"]["secret"]["items"] == [{"key": "api-key", "path": "key"}]
            assert env["MOE_API_KEY_FILE"] == "/etc/moe/api-key/key"
    no_key = pods_of(OWNER, api.parse_spec(tiny_spec()), groups=1)[0]
    assert resources.API_KEY_MOUNT not in _mounts(no_key)
