"""`make demo`: the main job on a local cluster, end to end, in one command.

1. the local control plane (etcd, kube-apiserver, scheduler, controller-manager, KWOK) with 40
   GPU nodes x 8 GPUs in 5 racks;
2. the CRD and the operator (a real `kopf run` subprocess);
3. the tiny EP16 MoEDeployment from manifests/, reconciled into 16 rank pods;
4. the placement: node, GPU slot and experts per MoE layer for every rank.

It ends cleanly (operator stopped, cluster left running for you to explore, `moe cluster down`
stops it) or with one clear error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import devcluster
from .kube import Kube, KubeError

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "moe-demo"


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


def main() -> int:
    t0 = time.monotonic()
    op = None
    try:
        step("local control plane (first run builds Kubernetes from the Go module proxy: ~25 min cold)")
        c = devcluster.up(quiet=True)
        kc = str(c.kubeconfig)
        kube = Kube(kubeconfig=kc)
        step("40 KWOK GPU nodes x 8 nvidia.com/gpu in 5 racks (pool 'demo')")
        devcluster.apply_nodes(devcluster.gpu_nodes(40, gpus=8, racks=5, zones=1, prefix="gpu-node", pool="demo"), kc)
        wait(lambda: sum(1 for n in kube.list("Node") if any(
            x.get("type") == "Ready" and x.get("status") == "True" for x in n["status"].get("conditions", []))) >= 40,
            60, "40 nodes Ready")
        step("CRD and namespace")
        kubectl(kc, "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / "moedeployment.yaml"))
        kubectl(kc, "wait", "--for=condition=Established", "crd/moedeployments.serving.moe.dev", "--timeout=60s")
        if not _ns_exists(kc):
            kubectl(kc, "create", "namespace", NAMESPACE)
        step("operator (kopf run -m moe_operator.main)")
        log_path = devcluster.state_dir() / "demo-operator.log"
        op = subprocess.Popen([sys.executable, "-m", "kopf", "run", "-m", "moe_operator.main", "--standalone",
                               "--all-namespaces", "--log-format=plain"],
                              env=dict(os.environ, KUBECONFIG=kc, MOE_OPERATOR_METRICS_PORT="0",
                                       MOE_OPERATOR_NAMESPACE=NAMESPACE),
                              stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=REPO)
        step("kubectl apply -f manifests/tiny-ep16.yaml (with nodeSelector moe.dev/pool=demo)")
        obj = yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text())
        obj["spec"].setdefault("placement", {})["nodeSelector"] = {devcluster.POOL_LABEL: "demo"}
        kubectl(kc, "apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(obj))

        def ready():
            if op.poll() is not None:
                raise DemoError(f"the operator exited ({op.returncode}); see {log_path}")
            obj = kube.get("MoEDeployment", "tiny-ep16", NAMESPACE) or {}
            st = obj.get("status") or {}
            if st.get("phase") == "Failed":
                raise DemoError(f"tiny-ep16 failed: {st.get('reason')}")
            current = st.get("observedGeneration") == obj.get("metadata", {}).get("generation")
            return st if current and st.get("phase") == "Ready" else None

        st = wait(ready, 180, "tiny-ep16 Ready")
        print(kubectl(kc, "get", "moed", "-n", NAMESPACE))
        cm = kube.get("ConfigMap", "tiny-ep16-g0-plan", NAMESPACE)
        plan = json.loads(cm["data"]["plan.json"])
        step(f"placement (expert-map generation {cm['data']['generation']}, {st['nodesUsed']} nodes)")
        show_plan(plan)
        pred = st.get("prediction") or {}
        if pred:
            print(f"   predicted on {pred['hardware']}: {pred['memoryPerGpuGib']:.1f} GiB/GPU, "
                  f"{pred['decodeTokensPerSecondPerGpu']:.0f} decode tok/s/GPU")
        step(f"done in {time.monotonic() - t0:.0f}s. Next:")
        print(f"   export KUBECONFIG={kc}")
        print(f"   kubectl get moed,pods -n {NAMESPACE} -o wide")
        print("   moe plan -f manifests/deepseek-v3-ep320.yaml      # what the real model would need")
        print("   moe cluster down                                   # stop the local cluster")
        return 0
    except (DemoError, devcluster.ClusterError, KubeError) as e:
        print(f"make demo: {e}", file=sys.stderr)
        return 1
    finally:
        if op is not None and op.poll() is None:
            op.terminate()
            try:
                op.wait(timeout=15)
            except subprocess.TimeoutExpired:
                op.kill()


def _ns_exists(kc: str) -> bool:
    out = subprocess.run([str(devcluster.testbin() / "kubectl"), f"--kubeconfig={kc}", "get", "ns", NAMESPACE],
                         capture_output=True, text=True)
    return out.returncode == 0


if __name__ == "__main__":
    sys.exit(main())

