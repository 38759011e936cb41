"""The generated CRD in a real API server: manifests accepted, invalid specs rejected by name."""

from __future__ import annotations

import json

import pytest
import yaml

from invalid_specs import CASES, INVALID_NAMES, LONGEST_NAME, MESSAGES, invalid_spec, tiny_spec
from support import REPO, wait_for

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "serving.moe.dev", "v1alpha1", "moedeployments"


@pytest.fixture(scope="module")
def custom(api_client, crd_installed):
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


def body(name: str, spec: dict) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MoEDeployment", "metadata": {"name": name}, "spec": spec}


def test_every_manifest_is_accepted(kubectl, namespace, crd_installed):
    paths = sorted((REPO / "manifests").glob("*.yaml"))
    assert len(paths) >= 2
    for p in paths:
        kubectl("apply", "-n", namespace, "--server-side", "-f", str(p))
    out = kubectl("get", "moed", "-n", namespace, "-o", "json")
    names = {i["metadata"]["name"] for i in json.loads(out.stdout)["items"]}
    assert names == {yaml.safe_load(p.read_text())["metadata"]["name"] for p in paths}
    # Defaults from the schema are applied by the API server.
    got = json.loads(kubectl("get", "moed", "deepseek-v3-ep320", "-n", namespace, "-o", "json").stdout)
    assert got["spec"]["model"]["architecture"]["nRoutedExperts"] == 256
    assert got["spec"]["placement"]["topologyKeys"]["rack"] == "moe.dev/rack"


def test_invalid_specs_are_rejected_naming_the_field(custom, namespace):
    from kubernetes import client

    failures = []
    for case, changes, field in CASES:
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                   body(f"bad-{case}", invalid_spec(changes)),
                                                   field_validation="Strict")
            failures.append(f"{case}: accepted")
        except client.ApiException as e:
            msg = json.loads(e.body).get("message", e.body)
            if e.status not in (400, 422) or field not in msg or MESSAGES.get(case, "") not in msg:
                failures.append(f"{case}: HTTP {e.status}, expected {field!r} and {MESSAGES.get(case)!r} in: {msg}")
    assert not failures, "\n".join(failures)
    assert len(CASES) >= 25


def test_attention_tp_layouts_are_accepted(custom, namespace):
    """TP 2 and 4 divide the tiny model's EP16, its 4 heads and its 8 GPUs per node; TP 4 fills
    nodes of 4 GPUs too. (TP 3, 8 and a TP that leaves part of a node are in CASES.)"""
    for name, changes in (("tp2", {"parallelism.attentionTensorParallel": 2}),
                          ("tp4", {"parallelism.attentionTensorParallel": 4}),
                          ("tp4-node4", {"parallelism.attentionTensorParallel": 4, "placement.gpusPerNode": 4})):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body(name, invalid_spec(changes)),
                                               field_validation="Strict")
        got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        assert got["spec"]["parallelism"]["attentionTensorParallel"] == changes["parallelism.attentionTensorParallel"]


def test_unusable_names_are_rejected_and_the_longest_usable_one_accepted(custom, namespace):
    from kubernetes import client

    failures = []
    for case, name in INVALID_NAMES:
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body(name, tiny_spec()))
            failures.append(f"{case}: {name!r} accepted")
        except client.ApiException as e:
            msg = json.loads(e.body).get("message", e.body)
            if e.status != 422 or "metadata.name" not in msg:
                failures.append(f"{case}: HTTP {e.status}, expected 'metadata.name' in: {msg}")
    assert not failures, "\n".join(failures)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body(LONGEST_NAME, tiny_spec()))


def test_architecture_is_immutable(custom, namespace):
    from kubernetes import client

    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body("imm", tiny_spec()))
    patch = {"spec": {"model": {"architecture": {"hiddenSize": 256}}}}
    with pytest.raises(client.ApiException) as e:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "imm", patch)
    assert e.value.status == 422
    assert "spec.model.architecture" in e.value.body and "immutable" in e.value.body
    # Other fields still change.
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "imm",
                                          {"spec": {"loadBalancing": {"imbalanceThreshold": 1.5}}})


def test_kubectl_explain_shows_descriptions(kubectl, crd_installed):
    def explained():
        out = kubectl("explain", "moedeployment.spec.parallelism", check=False)
        return out.returncode == 0 and out.stdout

    text = wait_for(explained, 30, "kubectl explain to see the CRD")
    assert "expertParallelSize" in text and "GPUs in one expert-parallel group" in text
    assert "redundantExperts" in text and "maxExpertsPerGpu" in text


def test_kubectl_get_moed_shows_the_columns(kubectl, custom, namespace):
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body("cols", tiny_spec()))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "cols", {
        "status": {"phase": "Ready", "ready": "16/16", "readyRanks": 16, "totalRanks": 16, "imbalance": 1.12}})
    out = kubectl("get", "moed", "cols", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "EP", "READY", "IMBALANCE", "AGE"]
    assert out[1].split()[:5] == ["cols", "Ready", "16", "16/16", "1.12"]
