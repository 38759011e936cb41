"""Names of the objects one MoEDeployment owns, and the deployment names that keep them all valid.

The one definition of each name: `resources` builds objects with these names and `api` admits only
deployment names for which every derived name is valid (the CRD checks the same with CEL). Per EP
group g and rank r of deployment D: pods `D-g<g>-r<r>` (also each pod's `hostname`), ConfigMaps
`D-g<g>-plan`; per deployment: the headless Service `D-ranks` (each pod's `subdomain`), the client
Service `D`, the PodDisruptionBudget and NetworkPolicy `D`, the rank key Secret `D-rank-key`, and the
router Deployment `D-router` with its PodDisruptionBudget and NetworkPolicy of the same name (its pods
are named by the ReplicaSet controller: `D-router-<pod-template-hash>-<5 characters>`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Bounds of the indices that appear in names (the API enforces them on the spec).
MAX_REPLICAS = 100  # EP groups per deployment: group index <= 99
MAX_EXPERT_PARALLEL = 4096  # spec.parallelism.expertParallelSize
MAX_EXTRA_GPUS = 4096  # spec.loadBalancing.maxExtraGpus: scale-out ranks beyond expertParallelSize
MAX_RANK = MAX_EXPERT_PARALLEL + MAX_EXTRA_GPUS - 1

HEADLESS_SUFFIX = "-ranks"
RANK_KEY_SUFFIX = "-rank-key"
ROUTER_SUFFIX = "-router"
# What the Deployment and ReplicaSet controllers append to a Deployment's name to name its pods:
# `-<pod-template-hash, at most 10 characters>-<5 random characters>`.
REPLICASET_POD_SUFFIX = "-" + "b" * 10 + "-" + "b" * 5

DNS_LABEL_MAX = 63  # RFC 1123 / RFC 1035 label: Service names, pod hostname and subdomain, label values
DNS_SUBDOMAIN_MAX = 253  # object names of most kinds (Pod, ConfigMap, PodDisruptionBudget)
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def pod(deployment: str, group: int, rank: int) -> str:
    return f"{deployment}-g{group}-r{rank}"


def plan_configmap(deployment: str, group: int) -> str:
    return f"{deployment}-g{group}-plan"


def headless_service(deployment: str) -> str:
    return f"{deployment}{HEADLESS_SUFFIX}"


def client_service(deployment: str) -> str:
    return deployment


def pod_disruption_budget(deployment: str) -> str:
    return deployment


def network_policy(deployment: str) -> str:
    return deployment


def rank_key_secret(deployment: str) -> str:
    """The Secret holding the deployment's rank key: every rank pod mounts it, and ranks prove
    membership of their group with it. Created once by the operator, never rotated by it."""
    return f"{deployment}{RANK_KEY_SUFFIX}"


def router(deployment: str) -> str:
    """The router Deployment in front of the deployment's front ranks; its PodDisruptionBudget and
    NetworkPolicy have the same name (which is why NAME_RULES refuses deployment names ending in
    ROUTER_SUFFIX: their own PodDisruptionBudget and NetworkPolicy would take it)."""
    return f"{deployment}{ROUTER_SUFFIX}"


def derived(deployment: str, group: int = MAX_REPLICAS - 1, rank: int = MAX_RANK) -> list[tuple[str, str, re.Pattern, int]]:
    """(what, name, pattern, length limit) of every name derived from `deployment`, for one group
    and rank index (by default the largest the API admits, i.e. the longest names)."""
    p = pod(deployment, group, rank)
    svc = headless_service(deployment)
    return [
        ("pod", p, DNS1123_SUBDOMAIN, DNS_SUBDOMAIN_MAX),
        ("pod hostname", p, DNS1123_LABEL, DNS_LABEL_MAX),
        ("pod subdomain", svc, DNS1123_LABEL, DNS_LABEL_MAX),
        ("headless Service", svc, DNS1035_LABEL, DNS_LABEL_MAX),
        ("client Service", client_service(deployment), DNS1035_LABEL, DNS_LABEL_MAX),
        ("plan ConfigMap", plan_configmap(deployment, group), DNS1123_SUBDOMAIN, DNS_SUBDOMAIN_MAX),
        ("PodDisruptionBudget", pod_disruption_budget(deployment), DNS1123_SUBDOMAIN, DNS_SUBDOMAIN_MAX),
        ("NetworkPolicy", network_policy(deployment), DNS1123_SUBDOMAIN, DNS_SUBDOMAIN_MAX),
        ("rank key Secret", rank_key_secret(deployment), DNS1123_SUBDOMAIN, DNS_SUBDOMAIN_MAX),
        ("router Deployment, PodDisruptionBudget and NetworkPolicy", router(deployment), DNS1123_SUBDOMAIN,
         DNS_SUBDOMAIN_MAX),
        ("router pod", router(deployment) + REPLICASET_POD_SUFFIX, DNS1123_SUBDOMAIN, DNS_SUBDOMAIN_MAX),
        ("label value", deployment, DNS1123_LABEL, DNS_LABEL_MAX),
    ]


# The longest deployment name whose longest derived name still fits its limit (53 with the bounds
# above: the hostname `D-g99-r8191` adds 10 characters).
MAX_NAME_LENGTH = min(limit - (len(name)) for _, name, _, limit in derived(""))


# Rules on a deployment's name: (CEL on the object for the CRD, the same check in Python, message).
NAME_RULES: list[tuple[str, Callable[[str], bool], str]] = [
    (f"self.metadata.name.matches('{DNS1035_LABEL.pattern}')", lambda n: bool(DNS1035_LABEL.match(n)),
     "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter "
     "and ending with a letter or digit): it names the deployment's Services"),
    (f"size(self.metadata.name) <= {MAX_NAME_LENGTH}", lambda n: len(n) <= MAX_NAME_LENGTH,
     f"metadata.name must be at most {MAX_NAME_LENGTH} characters: rank pods are named NAME-g<group>-r<rank> "
     f"and a pod's hostname is at most {DNS_LABEL_MAX}"),
    (f"!self.metadata.name.endsWith('{HEADLESS_SUFFIX}')", lambda n: not n.endswith(HEADLESS_SUFFIX),
     f"metadata.name must not end in '{HEADLESS_SUFFIX}': NAME{HEADLESS_SUFFIX} is the headless Service "
     f"of the deployment NAME"),
    (f"!self.metadata.name.endsWith('{ROUTER_SUFFIX}')", lambda n: not n.endswith(ROUTER_SUFFIX),
     f"metadata.name must not end in '{ROUTER_SUFFIX}': NAME{ROUTER_SUFFIX} is the router PodDisruptionBudget "
     f"and NetworkPolicy of the deployment NAME"),
]


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a MoEDeployment's name, or None when every derived name is valid and
    none can equal a name derived from another accepted deployment."""
    return next((message for _, ok, message in NAME_RULES if not ok(name)), None)
