"""Pure builders: (spec, plan) -> the Kubernetes objects of one MoEDeployment. No client, no I/O.

Per EP group g of deployment D:
- a ConfigMap `D-g<g>-plan` with the plan (ranks, expert map) and its generation;
- one Pod per rank `D-g<g>-r<rank>`, pinned to the planned node by required node affinity;
and per deployment a headless Service `D-ranks` (rendezvous and per-pod DNS), a client Service `D`
(KServe v2 HTTP and gRPC: the routers, or the front ranks when there are none), a PodDisruptionBudget,
a NetworkPolicy `D` (who may reach which port of the rank pods), the Secret `D-rank-key` (the key
ranks prove membership with), and the routers in front of the front ranks: a Deployment `D-router`
with a PodDisruptionBudget and a NetworkPolicy of the same name. The names come from `names`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from moe_operator import api, names
from moe_operator.perfmodel import KvAdmission
from moe_operator.placement import Plan

MANAGER = "moe-operator"  # the one server-side-apply field manager
DIST_PORT = 29500  # torch.distributed rendezvous on rank 0
PLAN_MOUNT = "/etc/moe/plan"
MODEL_MOUNT = "/models"
RANK_KEY_MOUNT = "/etc/moe/rank-key"
RANK_KEY_FIELD = "key"  # the Secret's data key; the file the worker reads is RANK_KEY_MOUNT/RANK_KEY_FIELD
RANK_KEY_BYTES = 32
API_KEY_MOUNT = "/etc/moe/api-key"
API_KEY_FILE = "key"  # the file name the spec's apiKeySecret key is mounted as
SECRET_FILE_MODE = 0o440  # owner and group (fsGroup) read; the container runs as neither root nor other

L_NAME = "app.kubernetes.io/name"
L_INSTANCE = "app.kubernetes.io/instance"
L_MANAGED = "app.kubernetes.io/managed-by"
L_DEPLOYMENT = "moe.dev/deployment"
L_GROUP = "moe.dev/group"
L_RANK = "moe.dev/rank"
L_FRONT = "moe.dev/front"
L_COMPONENT = "app.kubernetes.io/component"
# Router pods carry this label (the deployment's name) and never L_DEPLOYMENT: everything that
# selects rank pods (the headless Service, the PodDisruptionBudget and NetworkPolicy `D`, the
# operator's own pod listings and watch) selects L_DEPLOYMENT, and must never take a router for a rank.
L_ROUTER = "moe.dev/router"
A_SPEC_HASH = "moe.dev/spec-hash"
A_GENERATION = "moe.dev/expert-map-generation"

# Rank pod probes. All three are on the metrics port, which a thread of the rank process serves
# from the moment it has read its env, before loading, rendezvous or serving; /live therefore says
# "the process answers", and only /ready says "the group serves".
# - startup: a new process has STARTUP_PROBE's period x failureThreshold to open the port (image
#   start, Python and torch imports). Liveness waits for it, so a slow start on a busy node is
#   never taken for a hang, and a replacement rank is watched from the moment its port opens
#   (a fixed initialDelaySeconds would be either too long for that or too short for a slow start).
# - liveness: a process that stops answering (hung, SIGSTOPped, wedged) is killed after
#   failureThreshold failed probes, period apart, each waiting timeoutSeconds, plus the probe's own
#   short grace (a hung process does not act on SIGTERM). With restartPolicy Never its pod turns
#   Failed, the operator replaces it, and the replacement joins the running group. The survivors
#   have dropped the rank from the group before that (the worker's collective timeout,
#   MOE_DIST_TIMEOUT_S, is the shorter), so the kill costs no requests; it brings full EP back.
# - readiness: the group serves (see `moe_worker.serve`).
STARTUP_PROBE = {"httpGet": {"path": "/live", "port": "metrics"},
                 "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 90}
LIVENESS_PROBE = {"httpGet": {"path": "/live", "port": "metrics"},
                  "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3,
                  "terminationGracePeriodSeconds": 2}
READINESS_PROBE = {"httpGet": {"path": "/ready", "port": "metrics"}, "periodSeconds": 5, "failureThreshold": 3}

# Router pod probes, on its metrics port too: /live (the process answers) and /ready (it listens on
# the HTTP and gRPC ports; it does not wait for a front, requests wait for one within the router's
# retry budget). The startup probe gives a new process ROUTER_STARTUP_PROBE's period x
# failureThreshold to open the port before liveness counts.
ROUTER_STARTUP_PROBE = {"httpGet": {"path": "/live", "port": "metrics"},
                        "periodSeconds": 1, "timeoutSeconds": 2, "failureThreshold": 60}
ROUTER_LIVENESS_PROBE = {"httpGet": {"path": "/live", "port": "metrics"},
                         "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}
ROUTER_READINESS_PROBE = {"httpGet": {"path": "/ready", "port": "metrics"}, "periodSeconds": 2, "failureThreshold": 2}
# A router holds client connections and buffers bodies up to the front's limit; no CPU limit (a
# throttled router delays every request it forwards). Ephemeral storage: its logs and /tmp.
ROUTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi", "ephemeral-storage": "64Mi"},
                    "limits": {"memory": "512Mi", "ephemeral-storage": "256Mi"}}
ROUTER_TMP_SIZE = "64Mi"
# Time a stopping router has to finish the requests it holds (its retry budget is 30 s too).
ROUTER_GRACE_S = 30
# Preferred anti-affinity weights of a router pod: away from the other routers (spread), and away
# from this deployment's rank pods (so a GPU node's death takes no router). The scheduler counts a
# term once per matching pod on the node, so a node with 8 ranks still weighs 8 x 50 against; the
# lower weight only says that spreading the routers comes first when a node holds one rank.
ROUTER_SPREAD_WEIGHT = 100
ROUTER_AVOID_RANKS_WEIGHT = 50

# Every pod the operator makes runs as the images' user 1000, non-root, with no privilege, no
# capability and a read-only root filesystem (writable: emptyDir volumes such as /tmp).
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                              "privileged": False, "capabilities": {"drop": ["ALL"]}}

# The worker's admission settings (moe_worker.engine.EngineConfig), set from the memory model.
ENV_KV_CACHE_TOKENS = "MOE_KV_CACHE_TOKENS"
ENV_MAX_CONTEXT = "MOE_MAX_CONTEXT"
ENV_MAX_SEQS = "MOE_MAX_SEQS_PER_RANK"
ENV_RANK_KEY_FILE = "MOE_RANK_KEY_FILE"
ENV_API_KEY_FILE = "MOE_API_KEY_FILE"
# Attention TP degree N (spec.parallelism.attentionTensorParallel): ranks [g*N, (g+1)*N) split the
# attention heads; set on every rank, 1 included. In the pod spec hash (spec.parallelism), so a
# change restarts the ranks.
ENV_ATTENTION_TP = "MOE_ATTENTION_TP"

# Namespaces carry their own name in this label (set by the API server since Kubernetes 1.21).
L_NAMESPACE_NAME = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Owner:
    """The MoEDeployment every object is owned by (garbage collection deletes them with it)."""

    name: str
    namespace: str
    uid: str

    def ref(self) -> dict[str, Any]:
        return {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "name": self.name,
                "uid": self.uid, "controller": True, "blockOwnerDeletion": True}


def group_labels(owner: Owner, group: int | None = None) -> dict[str, str]:
    out = {L_NAME: "moe-worker", L_INSTANCE: owner.name, L_MANAGED: MANAGER, L_DEPLOYMENT: owner.name}
    if group is not None:
        out[L_GROUP] = str(group)
    return out


def router_labels(owner: Owner) -> dict[str, str]:
    """The router Deployment's and its pods' labels: no L_DEPLOYMENT (see L_ROUTER)."""
    return {L_NAME: "moe-router", L_INSTANCE: owner.name, L_MANAGED: MANAGER, L_COMPONENT: "router",
            L_ROUTER: owner.name}


def router_selector(owner: Owner) -> dict[str, str]:
    """What selects the deployment's router pods (the Deployment's selector, which never changes)."""
    return {L_ROUTER: owner.name}


def pod_name(owner: Owner, group: int, rank: int) -> str:
    return names.pod(owner.name, group, rank)


def plan_configmap_name(owner: Owner, group: int) -> str:
    return names.plan_configmap(owner.name, group)


def headless_service_name(owner: Owner) -> str:
    return names.headless_service(owner.name)


def spec_env_int(spec: api.MoEDeploymentSpec, name: str) -> int | None:
    """The spec's own `worker.env` value of `name` as a positive integer, or None (unset or not one:
    the worker then reports the bad value itself)."""
    for e in reversed(spec.worker.env):  # the last of duplicates wins, as in the kubelet
        if e.name == name:
            try:
                return int(e.value) if int(e.value) > 0 else None
            except ValueError:
                return None
    return None


def kv_env(spec: api.MoEDeploymentSpec, kv: KvAdmission | None) -> list[dict[str, str]]:
    """The admission settings for rank pods; a variable the spec's `worker.env` sets is left to it."""
    if kv is None:  # hardware unknown: the worker's defaults
        return []
    own = {e.name for e in spec.worker.env}
    values = {ENV_KV_CACHE_TOKENS: kv.cache_tokens, ENV_MAX_CONTEXT: kv.max_context, ENV_MAX_SEQS: kv.max_seqs}
    return [{"name": k, "value": str(v)} for k, v in values.items() if k not in own]


def pod_spec_hash(spec: api.MoEDeploymentSpec, kv: KvAdmission | None = None, rank_key: str = "") -> str:
    """Hash of everything that needs the rank processes restarted when it changes.

    Not the expert map (ranks switch maps live), not load-balancing settings, not who may reach
    the pods (the NetworkPolicy changes in place), not the routers (a Deployment of their own) and
    not the client Service's OpenAI port (no pod listens on it).
    The admission settings are in: a group's ranks must agree on them. So is `rank_key`, the uid of
    the rank key Secret: a Secret deleted and created again holds a new key, which ranks started
    before it do not share, so the groups restart together on it.
    """
    relevant = {
        "model": spec.model.model_dump(mode="json"),
        "parallelism": spec.parallelism.model_dump(mode="json", exclude={"replicas"}),
        "worker": spec.worker.model_dump(mode="json"),
        "serving": spec.serving.model_dump(mode="json",
                                           exclude={*api.Serving.NETWORK_FIELDS, *api.Serving.ROUTER_FIELDS,
                                                    *api.Serving.SERVICE_FIELDS}),
        "tolerations": [t.model_dump(mode="json") for t in spec.placement.tolerations],
        "gpuResource": spec.placement.gpu_resource,
    }
    if kv_env(spec, kv):
        relevant["admission"] = kv_env(spec, kv)
    if rank_key:
        relevant["rankKey"] = rank_key
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _meta(name: str, owner: Owner, labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict:
    m: dict[str, Any] = {"name": name, "namespace": owner.namespace, "labels": labels,
                         "ownerReferences": [owner.ref()]}
    if annotations:
        m["annotations"] = annotations
    return m


def plan_configmap(owner: Owner, group: int, plan: Plan, generation: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _meta(plan_configmap_name(owner, group), owner, group_labels(owner, group),
                          {A_GENERATION: str(generation)}),
        "data": {"plan.json": plan.dumps(), "generation": str(generation)},
    }


def headless_service(owner: Owner, spec: api.MoEDeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(headless_service_name(owner), owner, group_labels(owner)),
        "spec": {
            "clusterIP": "None",
            # Ranks must find each other before any is Ready (readiness needs the whole group).
            "publishNotReadyAddresses": True,
            "selector": {L_DEPLOYMENT: owner.name},
            "ports": [{"name": "dist", "port": DIST_PORT, "targetPort": DIST_PORT},
                      {"name": "metrics", "port": spec.serving.metrics_port, "targetPort": "metrics"}],
        },
    }


def client_service(owner: Owner, spec: api.MoEDeploymentSpec) -> dict[str, Any]:
    """The Service clients use: it selects the router pods, or the front ranks when
    `serving.routerReplicas` is 0. The switch takes effect at once: going from 0 to some routers,
    new connections are refused until the first router is Ready (seconds).

    Its ports: `http` (KServe v2, the OIP generate extension and the OpenAI API), `grpc`, and
    `openai`, a second way to the HTTP port at `serving.openaiPort`, left out when that is the HTTP
    port itself. Every port targets a container port, so the NetworkPolicies, which see the
    target port, admit `openai` through the rule for `http`."""
    s = spec.serving
    if s.router_replicas > 0:
        selector = router_selector(owner)
    else:
        selector = {L_DEPLOYMENT: owner.name, L_FRONT: "true"}
    ports = [{"name": "http", "port": s.http_port, "targetPort": "http"},
             {"name": "grpc", "port": s.grpc_port, "targetPort": "grpc", "appProtocol": "grpc"}]
    if s.openai_port != s.http_port:
        ports.append({"name": "openai", "port": s.openai_port, "targetPort": "http", "appProtocol": "http"})
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(names.client_service(owner.name), owner, group_labels(owner)),
        "spec": {"selector": selector, "ports": ports},
    }


def pod_disruption_budget(owner: Owner) -> dict[str, Any]:
    # An EP group stops serving when any rank goes; let voluntary disruptions (drains) take one
    # rank at a time, which the operator re-places, instead of blocking drains forever.
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _meta(names.pod_disruption_budget(owner.name), owner, group_labels(owner)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {L_DEPLOYMENT: owner.name}}},
    }


def rank_pod(owner: Owner, spec: api.MoEDeploymentSpec, plan: Plan, group: int, rank: int,
             spec_hash: str, kv: KvAdmission | None = None) -> dict[str, Any]:
    """The pod of one rank: one GPU, pinned to the planned node, the plan mounted from its ConfigMap,
    the admission limits `kv` from the memory model (None: hardware unknown, the worker's defaults)."""
    slot = plan.ranks[rank]
    name = pod_name(owner, group, rank)
    svc = headless_service_name(owner)
    labels = {**group_labels(owner, group), L_RANK: str(rank)}
    if rank == 0:
        labels[L_FRONT] = "true"
    s, w = spec.serving, spec.worker
    ckpt = spec.model.checkpoint
    gpu = spec.placement.gpu_resource
    env = [
        {"name": "RANK", "value": str(rank)},
        {"name": "WORLD_SIZE", "value": str(plan.num_ranks)},
        {"name": "MASTER_ADDR", "value": f"{pod_name(owner, group, 0)}.{svc}"},
        {"name": "MASTER_PORT", "value": str(DIST_PORT)},
        {"name": "MOE_GROUP", "value": str(group)},
        {"name": "MOE_CHECKPOINT", "value": f"{MODEL_MOUNT}/{ckpt.sub_path}".rstrip("/")},
        {"name": "MOE_PRECISION", "value": spec.model.precision},
        {"name": ENV_ATTENTION_TP, "value": str(spec.parallelism.attention_tensor_parallel)},
        {"name": "MOE_EXPERT_MAP", "value": f"{PLAN_MOUNT}/plan.json"},
        {"name": "MOE_EXPERT_MAP_CONFIGMAP", "value": plan_configmap_name(owner, group)},
        {"name": "MOE_MODEL_NAME", "value": s.model_name},
        {"name": "MOE_HTTP_PORT", "value": str(s.http_port)},
        {"name": "MOE_GRPC_PORT", "value": str(s.grpc_port)},
        {"name": "MOE_METRICS_PORT", "value": str(s.metrics_port)},
        {"name": "MOE_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": ENV_RANK_KEY_FILE, "value": f"{RANK_KEY_MOUNT}/{RANK_KEY_FIELD}"},
        *kv_env(spec, kv),
        *({"name": e.name, "value": e.value} for e in w.env),
    ]
    if ckpt.pvc_name:
        model_volume = {"name": "model", "persistentVolumeClaim": {"claimName": ckpt.pvc_name, "readOnly": True}}
    else:
        model_volume = {"name": "model", "hostPath": {"path": ckpt.host_path, "type": "Directory"}}
    ports = [{"name": "metrics", "containerPort": s.metrics_port}, {"name": "dist", "containerPort": DIST_PORT}]
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "plan", "mountPath": PLAN_MOUNT, "readOnly": True},
        {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "rank-key", "mountPath": RANK_KEY_MOUNT, "readOnly": True},
    ]
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": w.shm_size}},
        {"name": "plan", "configMap": {"name": plan_configmap_name(owner, group)}},
        model_volume,
        {"name": "tmp", "emptyDir": {}},
        _secret_volume("rank-key", names.rank_key_secret(owner.name), RANK_KEY_FIELD, RANK_KEY_FIELD),
    ]
    if rank == 0:
        ports += [{"name": "http", "containerPort": s.http_port}, {"name": "grpc", "containerPort": s.grpc_port}]
        if s.api_key_secret is not None:  # only the front rank serves clients, so only it holds the key
            env.append({"name": ENV_API_KEY_FILE, "value": f"{API_KEY_MOUNT}/{API_KEY_FILE}"})
            mounts.append({"name": "api-key", "mountPath": API_KEY_MOUNT, "readOnly": True})
            volumes.append(_secret_volume("api-key", s.api_key_secret.name, s.api_key_secret.key, API_KEY_FILE))
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": _meta(name, owner, labels, {A_SPEC_HASH: spec_hash}),
        "spec": {
            "hostname": name,
            "subdomain": svc,
            "restartPolicy": "Never",  # a lost rank breaks the group's collectives; the operator replaces it
            "terminationGracePeriodSeconds": 10,
            "enableServiceLinks": False,
            "automountServiceAccountToken": False,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [slot.node]}]}]}}},
            "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in spec.placement.tolerations],
            "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
            "containers": [{
                "name": "worker",
                "image": w.image,
                "imagePullPolicy": w.image_pull_policy,
                "command": ["moe-worker", "serve"],
                "env": env,
                "ports": ports,
                "resources": {"requests": {**w.resources.requests, gpu: "1"},
                              "limits": {**w.resources.limits, gpu: "1"}},
                "startupProbe": copy.deepcopy(STARTUP_PROBE),
                "livenessProbe": copy.deepcopy(LIVENESS_PROBE),
                "readinessProbe": copy.deepcopy(READINESS_PROBE),
                "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    }


def _secret_volume(volume: str, secret: str, key: str, path: str) -> dict[str, Any]:
    """A volume with one key of a Secret as the file `path`, readable by the container's user only."""
    return {"name": volume, "secret": {"secretName": secret, "items": [{"key": key, "path": path}],
                                       "defaultMode": SECRET_FILE_MODE}}


def rank_key_secret(owner: Owner, key: bytes) -> dict[str, Any]:
    """The deployment's rank key Secret holding `key` (RANK_KEY_BYTES random bytes the caller draws).

    Immutable: the operator creates it once and never rotates it, since every rank of a group must
    hold the same key; the kubelet also need not watch an immutable Secret.
    """
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
        "metadata": _meta(names.rank_key_secret(owner.name), owner, group_labels(owner)),
        "data": {RANK_KEY_FIELD: base64.b64encode(key).decode()},
    }


def _peer(p: api.NetworkPeer) -> dict[str, Any]:
    """A NetworkPolicyPeer as written in YAML, empty fields left out (`{namespaceSelector: {}}`)."""
    return p.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)


def metrics_sources(spec: api.MoEDeploymentSpec, operator_namespace: str | None) -> list[dict[str, Any]]:
    """Who may scrape the metrics port: pods in the namespaces `serving.metricsNamespaces` names,
    plus the operator's own (it scrapes the ranks itself when load balancing reads no Prometheus);
    any pod in the cluster when the spec names none."""
    wanted = list(spec.serving.metrics_namespaces)
    if not wanted:
        return [{"namespaceSelector": {}}]
    if operator_namespace and operator_namespace not in wanted:
        wanted.append(operator_namespace)
    return [{"namespaceSelector": {"matchExpressions": [
        {"key": L_NAMESPACE_NAME, "operator": "In", "values": sorted(wanted)}]}}]


def network_policy(owner: Owner, spec: api.MoEDeploymentSpec, operator_namespace: str | None = None) -> dict[str, Any]:
    """Ingress to every rank pod of the deployment, four rules (NetworkPolicies only allow):

    - from the deployment's own pods, any port: the rendezvous port and the ports gloo and NCCL
      open at random. The deployment is the trust boundary: its groups share one rank key.
    - to the HTTP and gRPC ports from `serving.allowedSources` (default: any pod in the cluster).
    - to the metrics port from `metrics_sources`.
    - to the HTTP and gRPC ports from the deployment's routers (`router_network_policy` admits
      their clients); only front ranks listen there.

    Egress is left open. A network plugin that implements NetworkPolicy enforces it; without one
    it is inert.
    """
    s = spec.serving
    tcp = [{"protocol": "TCP", "port": port} for port in (s.http_port, s.grpc_port)]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(names.network_policy(owner.name), owner, group_labels(owner)),
        "spec": {
            "podSelector": {"matchLabels": {L_DEPLOYMENT: owner.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {L_DEPLOYMENT: owner.name}}}]},
                {"from": [_peer(p) for p in s.allowed_sources], "ports": tcp},
                {"from": metrics_sources(spec, operator_namespace),
                 "ports": [{"protocol": "TCP", "port": s.metrics_port}]},
                {"from": [{"podSelector": {"matchLabels": router_selector(owner)}}], "ports": tcp},
            ],
        },
    }


def router_deployment(owner: Owner, spec: api.MoEDeploymentSpec) -> dict[str, Any]:
    """The routers in front of the EP groups' front ranks: `serving.routerReplicas` pods of
    `moe-router` (the worker image's router; no torch imported), one `--front POD.SUBDOMAIN` per group (each name one item: the local dev
    runner resolves whole items of that form, as cluster DNS does), listening on the serving ports
    and forwarding to the same ports of the fronts.

    With routerReplicas 0 the Deployment stays, scaled to 0: the client Service then selects the
    front ranks, and the operator deletes nothing (no verb beyond server-side apply). Its pods run
    on the nodes `serving.routerNodeSelector` picks, else where the ranks may (placement's
    nodeSelector), with placement's tolerations; they spread over nodes when they can be, preferring
    nodes without this deployment's ranks, and roll one new pod at a time before an old one goes.
    """
    s, w = spec.serving, spec.worker
    svc = headless_service_name(owner)
    fronts = [item for g in range(spec.parallelism.replicas)
              for item in ("--front", f"{pod_name(owner, g, 0)}.{svc}")]
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": ROUTER_GRACE_S,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            # One node's death should take one router at most...
            {"weight": ROUTER_SPREAD_WEIGHT, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": router_selector(owner)}}},
            # ...and not take ranks and a router together (a GPU node's loss fails the requests its
            # router held too). No more weight than the spread: see ROUTER_AVOID_RANKS_WEIGHT.
            {"weight": ROUTER_AVOID_RANKS_WEIGHT, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {L_DEPLOYMENT: owner.name}}}},
        ]}},
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [{
            "name": "router",
            "image": w.image,
            "imagePullPolicy": w.image_pull_policy,
            "command": ["moe-router"],
            "args": fronts,
            "env": [
                {"name": "MOE_HTTP_PORT", "value": str(s.http_port)},
                {"name": "MOE_GRPC_PORT", "value": str(s.grpc_port)},
                {"name": "MOE_METRICS_PORT", "value": str(s.metrics_port)},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
            "ports": [{"name": "http", "containerPort": s.http_port},
                      {"name": "grpc", "containerPort": s.grpc_port},
                      {"name": "metrics", "containerPort": s.metrics_port}],
            "resources": copy.deepcopy(ROUTER_RESOURCES),
            "startupProbe": copy.deepcopy(ROUTER_STARTUP_PROBE),
            "livenessProbe": copy.deepcopy(ROUTER_LIVENESS_PROBE),
            "readinessProbe": copy.deepcopy(ROUTER_READINESS_PROBE),
            "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": ROUTER_TMP_SIZE}}],
    }
    node_selector = spec.placement.node_selector if s.router_node_selector is None else s.router_node_selector
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if spec.placement.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.placement.tolerations]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(names.router(owner.name), owner, router_labels(owner)),
        "spec": {
            "replicas": s.router_replicas,
            "selector": {"matchLabels": router_selector(owner)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": router_labels(owner)}, "spec": pod_spec},
        },
    }


def router_pod_disruption_budget(owner: Owner) -> dict[str, Any]:
    # A drain takes one router at a time (the Deployment replaces it elsewhere first); with fewer
    # than two routers it never blocks one, so it exists whatever serving.routerReplicas says.
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _meta(names.router(owner.name), owner, router_labels(owner)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": router_selector(owner)}},
    }


def router_network_policy(owner: Owner, spec: api.MoEDeploymentSpec,
                          operator_namespace: str | None = None) -> dict[str, Any]:
    """Ingress to the router pods: their HTTP and gRPC ports from `serving.allowedSources` (the
    clients the ranks' own policy lets in), their metrics port from `metrics_sources`. Egress is
    left open (to the fronts, and DNS)."""
    s = spec.serving
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(names.router(owner.name), owner, router_labels(owner)),
        "spec": {
            "podSelector": {"matchLabels": router_selector(owner)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [_peer(p) for p in s.allowed_sources],
                 "ports": [{"protocol": "TCP", "port": port} for port in (s.http_port, s.grpc_port)]},
                {"from": metrics_sources(spec, operator_namespace),
                 "ports": [{"protocol": "TCP", "port": s.metrics_port}]},
            ],
        },
    }


def shared_objects(owner: Owner, spec: api.MoEDeploymentSpec, operator_namespace: str | None = None) -> list[dict[str, Any]]:
    """The objects all groups share that the operator keeps as built (server-side apply); the rank
    key Secret is not one of them: it is created once. The routers' policy and budget come before
    their Deployment, so no router runs without them."""
    return [headless_service(owner, spec), client_service(owner, spec), pod_disruption_budget(owner),
            network_policy(owner, spec, operator_namespace), router_network_policy(owner, spec, operator_namespace),
            router_pod_disruption_budget(owner), router_deployment(owner, spec)]


def desired_objects(owner: Owner, spec: api.MoEDeploymentSpec, plans: list[Plan],
                    generations: list[int], kv: KvAdmission | None = None,
                    rank_key: bytes = bytes(RANK_KEY_BYTES)) -> list[dict[str, Any]]:
    """Everything one deployment consists of, for the given per-group plans."""
    h = pod_spec_hash(spec, kv)
    out = [*shared_objects(owner, spec), rank_key_secret(owner, rank_key)]
    for g, (plan, gen) in enumerate(zip(plans, generations, strict=True)):
        out.append(plan_configmap(owner, g, plan, gen))
        out.extend(rank_pod(owner, spec, plan, g, r, h, kv) for r in range(plan.num_ranks))
    return out
