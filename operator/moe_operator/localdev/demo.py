"""`make demo`: the main job on a local cluster, end to end, in one command.

1. the local control plane (etcd, kube-apiserver, scheduler, controller-manager, KWOK) with 40
   GPU nodes x 8 GPUs in 5 racks;
2. the CRD, and the operator installed with Helm (its pods run as processes by the local runner);
3. the tiny EP16 MoEDeployment from manifests/ (or the manifest named as the argument, e.g.
   `make demo MANIFEST=manifests/tiny-ep16-tp2.yaml` for attention TP2), reconciled into 16 rank pods;
4. the same request over HTTP and gRPC through a router, checked against the single-process
   reference (`moe-worker generate --world-size 1` on the same checkpoint);
5. the placement: node, GPU slot and experts per MoE layer for every rank.

It ends cleanly (operator stopped, cluster left running for you to explore, `moe cluster down`
stops it) or with one clear error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from moe_operator.controller.kube import Kube, KubeError
from moe_operator.localdev import devcluster

REPO = Path(__file__).resolve().parents[3]
NAMESPACE = "moe-demo"
OPERATOR_NAMESPACE = "moe-system"


class DemoError(RuntimeError):
    pass


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def kubectl(kc: str, *args: str, input: str | None = None) -> str:
    out = subprocess.run([str(devcluster.testbin() / "kubectl"), f"--kubeconfig={kc}", *args],
                         capture_output=True, text=True, input=input)
    if out.returncode != 0:
        raise DemoError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


def show_plan(plan: dict, per_line: int = 4) -> None:
    """Compact placement: one line per rank: node, GPU, experts per MoE layer."""
    layers = plan["expert_map"]
    print(f"   {'rank':>4}  {'node':<14} gpu  experts per MoE layer (L0..L{len(layers) - 1})")
    for r in plan["ranks"]:
        experts = " ".join(",".join(str(e) for e in layers[li][r["rank"]]) for li in range(len(layers)))
        print(f"   {r['rank']:>4}  {r['node']:<14} {r['gpu']:>3}  {experts}")


CHECKPOINT = Path("/var/tmp/moe-demo/tiny-ep16")  # the manifest's hostPath


def make_checkpoint(obj: dict) -> None:
    from moe_operator.api import parse_deployment

    if (CHECKPOINT / "config.json").exists():
        return
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    cfg = CHECKPOINT.parent / "tiny-ep16-config.json"
    cfg.write_text(json.dumps(parse_deployment(obj).spec.model.architecture.hf_config()))
    out = subprocess.run([sys.executable, "-m", "moe_worker.cli", "make-checkpoint", "--config", str(cfg),
                          "--out", str(CHECKPOINT), "--dtype", "fp8", "--seed", "0"], capture_output=True, text=True)
    if out.returncode != 0:
        raise DemoError(f"make-checkpoint failed: {out.stderr.strip()}")


def ask(ip: str, prompt: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """The same request over KServe v2 HTTP (binary tensors) and gRPC, with tritonclient."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    h = httpclient.InferenceServerClient(f"{ip}:8080")
    i = httpclient.InferInput("input_ids", [len(prompt)], "INT64")
    i.set_data_from_numpy(np.array(prompt, dtype=np.int64), binary_data=True)
    a = h.infer("moe", [i], parameters={"max_tokens": max_tokens}).as_numpy("output_ids").tolist()
    g = grpcclient.InferenceServerClient(f"{ip}:8081")
    gi = grpcclient.InferInput("input_ids", [len(prompt)], "INT64")
    gi.set_data_from_numpy(np.array(prompt, dtype=np.int64))
    b = g.infer("moe", [gi], parameters={"max_tokens": max_tokens}).as_numpy("output_ids").tolist()
    return a, b


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    """The single-process answer on the demo's checkpoint (greedy)."""
    out = subprocess.run([sys.executable, "-m", "moe_worker.cli", "generate", "--checkpoint", str(CHECKPOINT),
                          "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(max_tokens), "--json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise DemoError(f"moe-worker generate failed: {out.stderr.strip()}")
    return json.loads(out.stdout)["output_ids"]


def expert_load(kube: Kube, plan: dict, name: str) -> list[list[float]]:
    """(layers, experts) routed tokens, scraped from every rank's /metrics."""
    import urllib.request

    from moe_operator.controller.scaling import parse_expert_tokens

    n_layers = len(plan["expert_map"])
    n_experts = 1 + max(e for layer in plan["expert_map"] for cell in layer for e in cell)
    load = [[0.0] * n_experts for _ in range(n_layers)]
    for p in kube.list("Pod", NAMESPACE, labels=f"moe.dev/deployment={name}"):
        ip = (p.get("status") or {}).get("podIP")
        with urllib.request.urlopen(f"http://{ip}:9400/metrics", timeout=5) as r:
            for (_, layer, e), v in parse_expert_tokens(r.read().decode()).items():
                load[layer][e] += v
    return load


def figure(plan: dict, load: list[list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    em = np.array([[cell[0] if cell else -1 for cell in layer] for layer in plan["expert_map"]])  # (L, G)
    nodes = [r["node"] for r in plan["ranks"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    im = a.imshow(em, aspect="auto", cmap="tab20", interpolation="nearest")
    a.set_title("placement: logical expert on each rank (GPU), per MoE layer")
    a.set_xlabel("rank (GPU); node boundaries dashed")
    a.set_ylabel("MoE layer")
    for g in range(1, len(nodes)):
        if nodes[g] != nodes[g - 1]:
            a.axvline(g - 0.5, color="k", ls="--", lw=1)
    for li in range(em.shape[0]):
        for g in range(em.shape[1]):
            a.text(g, li, str(em[li, g]), ha="center", va="center", fontsize=7)
    a.set_yticks(range(em.shape[0]))
    fig.colorbar(im, ax=a, label="expert id")
    im2 = b.imshow(np.array(load), aspect="auto", cmap="viridis", interpolation="nearest")
    b.set_title("measured load: routed tokens per (layer, expert)")
    b.set_xlabel("logical expert")
    b.set_ylabel("MoE layer")
    b.set_yticks(range(len(load)))
    fig.colorbar(im2, ax=b, label="tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    manifest = Path(args[0]) if args else REPO / "manifests" / "tiny-ep16.yaml"
    t0 = time.monotonic()
    try:
        step("local control plane (first run builds Kubernetes from the Go module proxy: 15-30 min cold)")
        c = devcluster.up(quiet=True)
        kc = str(c.kubeconfig)
        kube = Kube(kubeconfig=kc)
        step("40 GPU nodes x 8 nvidia.com/gpu in 5 racks: 38 KWOK nodes + 2 whose pods the local runner runs")
        devcluster.apply_nodes(devcluster.gpu_nodes(38, gpus=8, racks=5, zones=1, prefix="gpu-node", pool="demo"), kc)
        devcluster.apply_nodes(devcluster.gpu_nodes(2, gpus=8, racks=1, zones=1, prefix="run-node", pool="demo-run",
                                                    local_runner=True), kc)
        wait(lambda: sum(1 for n in kube.list("Node", labels="moe.dev/pool in (demo,demo-run)") if any(
            x.get("type") == "Ready" and x.get("status") == "True" for x in n["status"].get("conditions", []))) >= 40,
            60, "40 nodes Ready")
        print(kubectl(kc, "get", "nodes", "-l", "moe.dev/pool in (demo,demo-run)", "-L",
                      "moe.dev/rack,moe.dev/nvlink-domain", "--no-headers").count("\n"), "nodes Ready")
        obj = yaml.safe_load(manifest.read_text())
        name = obj["metadata"]["name"]
        if obj["spec"]["model"]["checkpoint"].get("hostPath") != str(CHECKPOINT):
            raise DemoError(f"{manifest}: the demo writes its checkpoint to hostPath {CHECKPOINT}; the manifest "
                            "names another")
        step(f"random FP8 checkpoint of the tiny DeepSeek-V3-shaped model in {CHECKPOINT}")
        make_checkpoint(obj)
        step("CRD and namespace")
        kubectl(kc, "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / "moedeployment.yaml"))
        wait(lambda: devcluster.crd_established(lambda *a: kubectl(kc, *a), "moedeployments.serving.moe.dev"), 60,
             "the CRD to be Established")
        if not _ns_exists(kc):
            kubectl(kc, "create", "namespace", NAMESPACE)
        for old in kube.list("MoEDeployment", NAMESPACE):
            was = old["metadata"]["name"]
            step(f"removing the previous run's {was} (its ranks run the code of that time)")
            kubectl(kc, "delete", "moed", was, "-n", NAMESPACE, "--wait=true")
            wait(lambda was=was: not kube.list("Pod", NAMESPACE, labels=f"moe.dev/deployment={was}"), 120,
                 "the previous rank pods to go")
        step("helm upgrade --install moe-operator charts/moe-operator (2 replicas, one leads; on the runner nodes)")
        helm = str(devcluster.testbin() / "helm")
        out = subprocess.run([helm, f"--kubeconfig={kc}", "upgrade", "--install", "moe-operator",
                              str(REPO / "charts" / "moe-operator"), "-n", OPERATOR_NAMESPACE, "--create-namespace",
                              "--skip-crds", "--set", "nodeSelector.moe\\.dev/pool=demo-run", "--wait", "--timeout=120s"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise DemoError(f"helm install failed: {out.stderr.strip()}")
        wait(lambda: (kube.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{OPERATOR_NAMESPACE}/leases/moe-operator")
                      .get("spec", {}).get("holderIdentity")), 60, "an operator replica to take the Lease")
        leader = kube.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{OPERATOR_NAMESPACE}/leases/moe-operator")
        print(f"   leader: {leader['spec']['holderIdentity']}")
        step(f"kubectl apply -f {manifest.relative_to(REPO) if manifest.is_relative_to(REPO) else manifest} "
             "(nodeSelector moe.dev/pool=demo-run)")
        obj["spec"].setdefault("placement", {})["nodeSelector"] = {devcluster.POOL_LABEL: "demo-run"}
        obj["spec"]["worker"]["env"] = [{"name": "MOE_THREADS", "value": "1"}]
        kubectl(kc, "apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(obj))

        def ready():
            o = kube.get("MoEDeployment", name, NAMESPACE) or {}
            st = o.get("status") or {}
            if st.get("phase") == "Failed":
                raise DemoError(f"{name} failed: {st.get('reason')}")
            current = st.get("observedGeneration") == o.get("metadata", {}).get("generation")
            return st if current and st.get("phase") == "Ready" else None

        st = wait(ready, 300, f"{name} Ready (16 rank processes loading the model)")
        print(kubectl(kc, "get", "moed", "-n", NAMESPACE))
        ip = wait(lambda: ready_router(kube, name), 120, f"a Ready router ({name}-router)")
        front = (kube.get("Pod", f"{name}-g0-r0", NAMESPACE) or {}).get("status", {}).get("podIP")
        prompt = [1, 2, 3, 4, 5, 6, 7, 8]
        step(f"tritonclient -> a router at {ip} (KServe v2; it forwards to rank 0 at {front}): "
             f"input_ids {prompt}, max_tokens 8")
        via_http, via_grpc = ask(ip, prompt, 8)
        print(f"   HTTP: {via_http}\n   gRPC: {via_grpc}")
        if via_http != via_grpc:
            raise DemoError("HTTP and gRPC answers differ")
        ref = reference(prompt, 8)
        print(f"   single process (moe-worker generate --world-size 1): {ref}")
        if via_http != ref:
            raise DemoError(f"the group's answer {via_http} differs from the single-process reference {ref}")
        for k in range(8):  # some traffic for the load figure
            ask(ip, [(k * 37 + j) % 500 for j in range(12)], 4)
        cm = kube.get("ConfigMap", f"{name}-g0-plan", NAMESPACE)
        plan = json.loads(cm["data"]["plan.json"])
        step(f"placement (expert-map generation {cm['data']['generation']}, {st['nodesUsed']} nodes): rank, node, "
             "GPU slot, expert per MoE layer")
        show_plan(plan)
        load = expert_load(kube, plan, name)
        png = devcluster.state_dir() / "demo-placement.png"
        figure(plan, load, png)
        o = kube.get("MoEDeployment", name, NAMESPACE) or {}
        imb = (o.get("status") or {}).get("imbalance")
        print(f"   imbalance (max/mean rank load, as the operator measured it): {imb if imb is not None else 'n/a yet'}")
        pred = st.get("prediction") or {}
        if pred:
            print(f"   the performance model for this spec on {pred['hardware']}: {pred['memoryPerGpuGib']:.1f} GiB/GPU")
        step(f"done in {time.monotonic() - t0:.0f}s. Next:")
        print(f"   figure: {png}")
        print(f"   export KUBECONFIG={kc}")
        print(f"   kubectl get moed,pods -n {NAMESPACE} -o wide; kubectl describe moed -n {NAMESPACE} {name}")
        print(f"   container logs (the local runner keeps them; no kubectl logs here): "
              f"{devcluster.state_dir() / 'runner' / 'pods'}/<namespace>_<pod>_*/container.log")
        print(f"   curl http://{front}:9400/metrics | grep moe_expert_tokens_total")
        print(f"   python -m moe_operator.localdev.loadgen --url {ip}:8080   # traffic through the router; "
              f"kill -9 a rank or rank 0: no request fails")
        print(f"   curl -N http://{ip}:8080/v1/completions -d '{{\"prompt\": [1, 2, 3], \"max_tokens\": 8, "
              f"\"stream\": true}}'   # the OpenAI API (also /v2/models/moe/generate_stream; chat needs a checkpoint with a chat template)")
        print("   moe plan -f manifests/deepseek-v3-ep320.yaml      # what the real model would need")
        print("   moe cluster down                                   # stop the local cluster and every rank")
        return 0
    except (DemoError, devcluster.ClusterError, KubeError, OSError) as e:
        print(f"make demo: {e}", file=sys.stderr)
        return 1


def ready_router(kube: Kube, name: str) -> str | None:
    """The address of a Ready router pod of deployment `name` (the client Service's endpoints;
    the local cluster has no Service proxy)."""
    for p in kube.list("Pod", NAMESPACE, labels=f"moe.dev/router={name}"):
        st = p.get("status") or {}
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []):
            return st.get("podIP")
    return None


def _ns_exists(kc: str) -> bool:
    out = subprocess.run([str(devcluster.testbin() / "kubectl"), f"--kubeconfig={kc}", "get", "ns", NAMESPACE],
                         capture_output=True, text=True)
    return out.returncode == 0


if __name__ == "__main__":
    sys.exit(main())

