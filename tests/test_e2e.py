"""End to end: operator + tiny EP16 model on runner nodes, ranks run as real processes by the local
runner from the operator's own pod specs; tritonclient over HTTP (JSON, binary) and gRPC; a real
Prometheus scrapes the ranks; the operator rebalances a skewed load."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from support import REPO, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

GROUP, VERSION, PLURAL = "serving.moe.dev", "v1alpha1", "moedeployments"
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [100, 200, 300, 400]]
NEW = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from moe_operator import api

    d = tmp_path_factory.mktemp("tiny")
    dep = api.parse_deployment(yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text()))
    (d / "config.json").write_text(json.dumps(dep.spec.model.architecture.hf_config()))
    subprocess.run([sys.executable, "-m", "moe_worker.cli", "make-checkpoint", "--config", str(d / "config.json"),
                    "--out", str(d / "ckpt"), "--dtype", "fp8", "--seed", "0"], check=True, cwd=REPO)
    return d / "ckpt"


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy tokens from `moe-worker generate` on one process, per prompt."""
    out = {}
    for p in PROMPTS:
        r = subprocess.run([sys.executable, "-m", "moe_worker.cli", "generate", "--checkpoint", str(checkpoint),
                            "--world-size", "1", "--prompt-ids", ",".join(map(str, p)), "--max-new-tokens", str(NEW),
                            "--json"], check=True, capture_output=True, text=True, cwd=REPO, timeout=300)
        doc = json.loads(r.stdout)
        ids = doc.get("generated_ids") or doc.get("output_ids") or doc.get("ids")
        out[tuple(p)] = [int(x) for x in (ids[0] if ids and isinstance(ids[0], list) else ids)]
    return out


def tiny(name: str, pool: str, ckpt) -> dict:
    obj = yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text())
    obj["metadata"] = {"name": name}
    spec = obj["spec"]
    spec["model"]["checkpoint"] = {"hostPath": str(ckpt)}
    spec["placement"]["nodeSelector"] = {"moe.dev/pool": pool}
    spec["worker"]["env"] = [{"name": "MOE_THREADS", "value": "1"}, {"name": "MOE_DEVICE", "value": "cpu"},
                             {"name": "MOE_MAP_POLL_S", "value": "0.5"}]
    return obj


def test_tiny_ep16_serves_tritonclient_and_exports_metrics(core, api_client, namespace, gpu_pool, operator,
                                                          checkpoint, reference, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from kubernetes import client

    from moe_operator.controller.kube import Kube
    from moe_operator.localdev.devprom import Prometheus

    custom = client.CustomObjectsApi(api_client)
    pool, _ = gpu_pool(nodes=2, gpus=8, local_runner=True)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tiny("e2e", pool, checkpoint))

    def ready():
        st = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "e2e").get("status") or {}
        return st if st.get("phase") == "Ready" else None

    st = wait_for(ready, 300, "e2e Ready (16 rank processes up)", interval=1)
    assert st["ready"] == "16/16"
    front = core.read_namespaced_pod("e2e-g0-r0", namespace)
    ip = front.status.pod_ip
    assert ip.startswith("127.")

    # tritonclient: HTTP JSON, HTTP binary, gRPC
    http = httpclient.InferenceServerClient(f"{ip}:8080")
    grpc = grpcclient.InferenceServerClient(f"{ip}:8081")
    assert http.is_server_ready() and grpc.is_server_ready()
    for prompt in PROMPTS:
        want = reference[tuple(prompt)]
        for binary in (False, True):
            inp = httpclient.InferInput("input_ids", [len(prompt)], "INT64")
            inp.set_data_from_numpy(np.array(prompt, dtype=np.int64), binary_data=binary)
            out = httpclient.InferRequestedOutput("output_ids", binary_data=binary)
            res = http.infer("moe", [inp], outputs=[out], parameters={"max_tokens": NEW})
            assert res.as_numpy("output_ids").tolist() == want, (prompt, binary)
        ginp = grpcclient.InferInput("input_ids", [len(prompt)], "INT64")
        ginp.set_data_from_numpy(np.array(prompt, dtype=np.int64))
        gres = grpc.infer("moe", [ginp], parameters={"max_tokens": NEW})
        assert gres.as_numpy("output_ids").tolist() == want
    # a malformed request is refused, and the server still serves
    bad = httpclient.InferInput("input_ids", [2], "FP32")
    bad.set_data_from_numpy(np.array([1, 2], dtype=np.float32))
    with pytest.raises(Exception, match="datatype|dtype|INT64"):
        http.infer("moe", [bad])
    assert http.is_server_ready()

    # a real Prometheus scrapes every rank; routed tokens per expert add up to what we sent
    with Prometheus(tmp_path / "prom") as prom:
        n = prom.write_targets(Kube(api_client=api_client), namespace, "e2e", metrics_port=9400,
                               extra=[f"127.0.0.1:{operator.metrics_port}"])
        assert n == 16
        # and the deployment's two routers, each seeing the front ready
        wait_for(lambda: prom.up_targets() == 19, 60, "16 ranks, 2 routers and the operator up")
        fronts = wait_for(lambda: (r := prom.query('moe_router_front_ready{deployment="e2e"}')) and len(r) == 2 and r,
                          60, "the routers' front_ready series")
        assert all(float(r["value"][1]) == 1 for r in fronts), fronts
        pairs_per_layer = 4 * 3 * sum(len(p) + NEW - 1 for p in PROMPTS)  # top-4; 3 transports per prompt
        q = 'sum by (layer) (moe_expert_tokens_total{deployment="e2e"})'

        def counted():
            res = prom.query(q)
            return res if len(res) == 3 and all(float(r["value"][1]) == pairs_per_layer for r in res) else None

        wait_for(counted, 60, f"{pairs_per_layer} routed pairs per layer in Prometheus")
        per_expert = prom.query('sum by (layer, expert) (moe_expert_tokens_total{deployment="e2e"})')
        # the layer label is the MoE layer index, as in the plan's expert_map
        assert {r["metric"]["layer"] for r in per_expert} == {"0", "1", "2"}
        assert {int(r["metric"]["expert"]) for r in per_expert} <= set(range(12))

        # Every dashboard query runs against this Prometheus without error (issue 10).
        from dashboards.promql import committed_queries

        queries = committed_queries()
        assert len(queries) > 30
        failures = []
        for q in queries:
            try:
                prom.query(q.promql({"namespace": namespace, "deployment": "e2e"}))
            except Exception as e:  # collect them all, then fail once with the list
                failures.append(f"{q}: {e}")
        assert not failures, "\n".join(failures)
        # ... and the core panels have data: per-expert load and token throughput.
        assert prom.query(f'sum(rate(moe_expert_tokens_total{{namespace="{namespace}"}}[1m]))')
        assert prom.query('moe_operator_reconciles_total')
