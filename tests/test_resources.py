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


def test_rank_pods_carry_the_attention_tp_and_a_change_restarts_them():
    """MOE_ATTENTION_TP on every rank (1 included): the worker splits heads over ranks [g*N, (g+1)*N)
    as the planner placed them; a new degree is a new pod spec hash, so the groups restart."""
    hashes = set()
    for tp in (1, 2, 4):
        raw = tiny_spec()
        raw["parallelism"]["attentionTensorParallel"] = tp
        spec = api.parse_spec(raw)
        p = plan(shape_of(spec), Topology.synthetic(2, 8), redundant=4, attention_tp=tp)
        h = resources.pod_spec_hash(spec)
        hashes.add(h)
        for rank in range(p.num_ranks):
            env = _env(resources.rank_pod(OWNER, spec, p, 0, rank, h, None))
            assert [v for n, v in env if n == resources.ENV_ATTENTION_TP] == [str(tp)]
            assert ("WORLD_SIZE", "16") in env
    assert resources.ENV_ATTENTION_TP == "MOE_ATTENTION_TP" and len(hashes) == 3


# --- the routers in front of the front ranks -------------------------------------------------------

def _spec(**changes) -> api.MoEDeploymentSpec:
    """tiny_spec with `changes` ({section: {field: value}}) merged into its sections."""
    raw = tiny_spec()
    for section, fields in changes.items():
        raw.setdefault(section, {}).update(fields)
    return api.parse_spec(raw)


def _router_container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_the_router_deployment_names_one_front_per_group_and_serves_the_specs_ports():
    spec = _spec(parallelism={"replicas": 3}, serving={"httpPort": 18080, "grpcPort": 18081, "metricsPort": 19400})
    dep = resources.router_deployment(OWNER, spec)
    assert dep["apiVersion"] == "apps/v1" and dep["kind"] == "Deployment"
    assert dep["metadata"]["name"] == "tiny-router" and dep["metadata"]["namespace"] == "ns"
    assert dep["metadata"]["ownerReferences"] == [OWNER.ref()]
    assert dep["spec"]["replicas"] == 2  # the default
    c = _router_container(dep)
    assert c["name"] == "router" and c["command"] == ["moe-router"]
    assert (c["image"], c["imagePullPolicy"]) == (spec.worker.image, spec.worker.image_pull_policy)
    # one `--front` per group, each name one whole item (the local runner resolves POD.SUBDOMAIN items)
    assert c["args"] == ["--front", "tiny-g0-r0.tiny-ranks", "--front", "tiny-g1-r0.tiny-ranks",
                         "--front", "tiny-g2-r0.tiny-ranks"]
    env = {e["name"]: e.get("value") or e.get("valueFrom") for e in c["env"]}
    assert env == {"MOE_HTTP_PORT": "18080", "MOE_GRPC_PORT": "18081", "MOE_METRICS_PORT": "19400",
                   "POD_IP": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 18080, "grpc": 18081, "metrics": 19400}
    assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == "/live"
    assert c["resources"]["requests"]["cpu"] and "cpu" not in c["resources"]["limits"]
    assert c["resources"]["limits"]["memory"]
    # the front a rank pod of group 2 would be is the name the router gets
    p = plan(shape_of(spec), Topology.synthetic(2, 8), redundant=4)
    front = resources.rank_pod(OWNER, spec, p, 2, 0, "h")
    assert f"{front['spec']['hostname']}.{front['spec']['subdomain']}" == c["args"][-1]


def test_router_pods_are_hardened_like_ranks_and_run_where_ranks_may():
    spec = _spec(placement={"nodeSelector": {"pool": "gpu"},
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    dep = resources.router_deployment(OWNER, spec)
    pod = dep["spec"]["template"]["spec"]
    rank = _pod(spec, None)
    assert pod["securityContext"] == rank["spec"]["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = _router_container(dep)
    assert c["securityContext"] == rank["spec"]["containers"][0]["securityContext"]
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"] and "emptyDir" in vols[c["volumeMounts"][0]["name"]]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == rank["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    spread, _ = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert spread["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert spread["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # no node selector or toleration in the spec: none on the routers
    plain = resources.router_deployment(OWNER, _spec())["spec"]["template"]["spec"]
    assert "nodeSelector" not in plain and "tolerations" not in plain


def test_router_node_selector_replaces_the_placements_for_the_routers_only():
    gpu = {"placement": {"nodeSelector": {"pool": "gpu"},
                         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}
    for router_sel, want in ((None, {"pool": "gpu"}), ({"pool": "cpu", "zone": "a"}, {"pool": "cpu", "zone": "a"}),
                             ({}, None)):  # {}: any node, not the placement's
        serving = {} if router_sel is None else {"routerNodeSelector": router_sel}
        spec = _spec(**gpu, serving=serving)
        assert spec.serving.router_node_selector == router_sel
        pod = resources.router_deployment(OWNER, spec)["spec"]["template"]["spec"]
        assert pod.get("nodeSelector") == want
        # the tolerations stay the placement's
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # no selector anywhere: none on the routers either
    assert "nodeSelector" not in resources.router_deployment(OWNER, _spec())["spec"]["template"]["spec"]


def test_routers_prefer_nodes_without_this_deployments_ranks_after_spreading():
    spec = _spec()
    dep = resources.router_deployment(OWNER, spec)
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti  # preferences only: a router always runs
    spread, avoid = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert avoid["podAffinityTerm"] == {"topologyKey": "kubernetes.io/hostname",
                                        "labelSelector": {"matchLabels": {resources.L_DEPLOYMENT: "tiny"}}}
    assert 0 < avoid["weight"] <= spread["weight"] <= 100
    # the term picks every rank pod of this deployment, and no router (not even its own kind)
    sel = avoid["podAffinityTerm"]["labelSelector"]["matchLabels"]
    p = plan(shape_of(spec), Topology.synthetic(2, 8), redundant=4)
    ranks = [resources.rank_pod(OWNER, spec, p, g, r, "h")["metadata"]["labels"] for g in range(2) for r in range(16)]
    assert all(sel.items() <= labels.items() for labels in ranks)
    assert not sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    other = resources.rank_pod(resources.Owner(name="other", namespace="ns", uid="v"), spec, p, 0, 0, "h")
    assert not sel.items() <= other["metadata"]["labels"].items()


def test_router_pods_carry_no_rank_label():
    dep = resources.router_deployment(OWNER, _spec())
    for labels in (dep["metadata"]["labels"], dep["spec"]["template"]["metadata"]["labels"]):
        assert resources.L_DEPLOYMENT not in labels and resources.L_FRONT not in labels
        assert labels[resources.L_ROUTER] == "tiny" and labels["app.kubernetes.io/component"] == "router"


def test_router_replicas_reach_the_deployment_and_restart_no_rank():
    base = _spec()
    kv = perfmodel.KvAdmission(cache_tokens=8192, max_context=1024, max_seqs=8, model_context=1024)
    p = plan(shape_of(base), Topology.synthetic(2, 8), redundant=4)
    for n in (0, 1, 16):
        spec = _spec(serving={"routerReplicas": n})
        assert resources.router_deployment(OWNER, spec)["spec"]["replicas"] == n
        assert resources.pod_spec_hash(spec, kv, "uid") == resources.pod_spec_hash(base, kv, "uid")
        h = resources.pod_spec_hash(spec, kv)
        assert resources.rank_pod(OWNER, spec, p, 1, 0, h, kv) == resources.rank_pod(OWNER, base, p, 1, 0, h, kv)
    # a serving port is the ranks' business too: it still restarts them
    assert resources.pod_spec_hash(_spec(serving={"httpPort": 9000})) != resources.pod_spec_hash(base)


def test_router_node_selector_reaches_the_deployment_and_restarts_no_rank():
    base = _spec(placement={"nodeSelector": {"pool": "gpu"}})
    kv = perfmodel.KvAdmission(cache_tokens=8192, max_context=1024, max_seqs=8, model_context=1024)
    p = plan(shape_of(base), Topology.synthetic(2, 8), redundant=4)
    h = resources.pod_spec_hash(base, kv, "uid")
    for sel in ({"pool": "cpu"}, {}):
        spec = _spec(placement={"nodeSelector": {"pool": "gpu"}}, serving={"routerNodeSelector": sel})
        assert resources.router_deployment(OWNER, spec) != resources.router_deployment(OWNER, base)
        assert resources.pod_spec_hash(spec, kv, "uid") == h
        assert resources.rank_pod(OWNER, spec, p, 1, 0, h, kv) == resources.rank_pod(OWNER, base, p, 1, 0, h, kv)


def test_the_client_service_selects_the_routers_or_with_none_the_front_ranks():
    p = plan(shape_of(_spec()), Topology.synthetic(2, 8), redundant=4)
    for n, want in ((2, "routers"), (0, "fronts")):
        spec = _spec(serving={"routerReplicas": n})
        sel = resources.client_service(OWNER, spec)["spec"]["selector"]
        router = resources.router_deployment(OWNER, spec)["spec"]["template"]["metadata"]["labels"]
        ranks = [resources.rank_pod(OWNER, spec, p, g, r, "h")["metadata"]["labels"] for g in range(2) for r in range(16)]
        picked = [r for r in ranks if sel.items() <= r.items()]
        if want == "routers":
            assert sel.items() <= router.items() and not picked
        else:
            assert not sel.items() <= router.items()
            assert [r[resources.L_RANK] for r in picked] == ["0", "0"] and {r[resources.L_GROUP] for r in picked} == {"0", "1"}


# --- the client Service's OpenAI port ----------------------------------------------------------------

def _service_ports(spec: api.MoEDeploymentSpec) -> dict[str, tuple[int, str, str | None]]:
    ports = resources.client_service(OWNER, spec)["spec"]["ports"]
    # the API server refuses a Service with two ports of one number (and protocol), or one name twice
    assert len({p["port"] for p in ports}) == len({p["name"] for p in ports}) == len(ports)
    return {p["name"]: (p["port"], p["targetPort"], p.get("appProtocol")) for p in ports}


def test_the_client_service_serves_the_openai_api_on_port_8000_to_the_http_port():
    for n in (2, 0):  # routers or front ranks behind it, the same ports
        assert _service_ports(_spec(serving={"routerReplicas": n})) == {
            "http": (8080, "http", None), "grpc": (8081, "grpc", "grpc"), "openai": (8000, "http", "http")}
    got = _service_ports(_spec(serving={"openaiPort": 80, "httpPort": 18080}))
    assert got["openai"] == (80, "http", "http") and got["http"] == (18080, "http", None)
    # the target is a container port of whatever the Service selects, routers and front ranks alike
    spec = _spec()
    p = plan(shape_of(spec), Topology.synthetic(2, 8), redundant=4)
    front = resources.rank_pod(OWNER, spec, p, 0, 0, "h")["spec"]["containers"][0]["ports"]
    for ports in (front, _router_container(resources.router_deployment(OWNER, spec))["ports"]):
        assert {c["name"]: c["containerPort"] for c in ports}["http"] == spec.serving.http_port
        assert spec.serving.openai_port not in {c["containerPort"] for c in ports}


def test_an_openai_port_equal_to_the_http_port_adds_no_port():
    for serving in ({"httpPort": 8000}, {"openaiPort": 8080}):
        spec = _spec(serving=serving)
        assert spec.serving.openai_port == spec.serving.http_port
        assert _service_ports(spec) == {"http": (spec.serving.http_port, "http", None),
                                        "grpc": (8081, "grpc", "grpc")}


def test_the_openai_port_restarts_no_rank_and_no_router():
    base = _spec()
    kv = perfmodel.KvAdmission(cache_tokens=8192, max_context=1024, max_seqs=8, model_context=1024)
    p = plan(shape_of(base), Topology.synthetic(2, 8), redundant=4)
    h = resources.pod_spec_hash(base, kv, "uid")
    for port in (9000, 8080):
        spec = _spec(serving={"openaiPort": port})
        assert resources.client_service(OWNER, spec) != resources.client_service(OWNER, base)
        assert resources.pod_spec_hash(spec, kv, "uid") == h
        for rank in (0, 1):
            assert resources.rank_pod(OWNER, spec, p, 1, rank, h, kv) == resources.rank_pod(OWNER, base, p, 1, rank, h, kv)
        for build in (resources.router_deployment, resources.headless_service,
                      resources.network_policy, resources.router_network_policy):
            assert build(OWNER, spec) == build(OWNER, base), build.__name__
