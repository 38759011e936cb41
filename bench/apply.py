"""Time from `kubectl apply` of a MoEDeployment to all rank pods Running, against the API server's
own pace: the same pods created directly with one `kubectl apply` of a List, in the same run.

    python bench/apply.py [--ep 64,288,1024] [--repeat 1]

Uses the local control plane (`moe cluster up`) with KWOK GPU nodes and the operator as a real
subprocess. Prints one table; the ratio operator/direct is what matters (target: <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from moe_operator.controller.kube import Kube  # noqa: E402
from moe_operator.localdev import devcluster  # noqa: E402

# (EP, routed experts, redundant, n_group): one expert per GPU, EP = routed + redundant.
SHAPES = {64: (56, 8, 8), 288: (256, 32, 8), 1024: (256, 768, 8)}


def deployment(name: str, pool: str, ep: int) -> dict:
    routed, redundant, n_group = SHAPES[ep]
    return {
        "apiVersion": "serving.moe.dev/v1alpha1", "kind": "MoEDeployment", "metadata": {"name": name},
        "spec": {
            "model": {"checkpoint": {"hostPath": "/var/tmp/moe-bench"},
                      "architecture": {"nRoutedExperts": routed, "nGroup": n_group}},
            "parallelism": {"expertParallelSize": ep, "redundantExperts": redundant},
            "placement": {"nodeSelector": {devcluster.POOL_LABEL: pool}},
        },
    }


def running(kube: Kube, ns: str, selector: str | None = None) -> int:
    return sum(1 for p in kube.list("Pod", ns, labels=selector) if (p.get("status") or {}).get("phase") == "Running")


def wait_running(kube: Kube, ns: str, n: int, timeout: float = 900) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if running(kube, ns) >= n:
            return time.perf_counter()
        time.sleep(0.1)
    raise TimeoutError(f"{n} pods not Running in {ns} after {timeout}s")


def kubectl(kc: str, *args: str, input: str | None = None) -> None:
    exe = devcluster.testbin() / "kubectl"
    subprocess.run([str(exe), f"--kubeconfig={kc}", *args], check=True, capture_output=True, text=True, input=input)


def one(kube: Kube, kc: str, ep: int) -> tuple[float, float]:
    pool = f"bench{uuid.uuid4().hex[:6]}"
    # Two identical node pools: the operator's pods on one, the directly applied copies on the other.
    nodes = devcluster.gpu_nodes(ep // 8, gpus=8, racks=max(1, ep // 64), prefix=pool, pool=pool)
    mirror = devcluster.gpu_nodes(ep // 8, gpus=8, racks=max(1, ep // 64), prefix=f"{pool}m", pool=f"{pool}m")
    devcluster.apply_nodes(nodes + mirror, kc)
    to_mirror = {a["metadata"]["name"]: b["metadata"]["name"] for a, b in zip(nodes, mirror, strict=True)}
    time.sleep(2)
    ns_op, ns_direct = f"{pool}-op", f"{pool}-direct"
    for ns in (ns_op, ns_direct):
        kubectl(kc, "create", "namespace", ns)
    log = open(Path(tempfile.gettempdir()) / f"{pool}-operator.log", "wb")
    op = subprocess.Popen([sys.executable, "-m", "kopf", "run", "-m", "moe_operator.controller.main", "--standalone",
                           "--namespace", ns_op], env=dict(os.environ, KUBECONFIG=kc, MOE_OPERATOR_METRICS_PORT="0",
                                                           MOE_OPERATOR_NAMESPACE=ns_op),
                          stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        time.sleep(3)  # operator startup is not part of the measurement
        t0 = time.perf_counter()
        kubectl(kc, "apply", "-n", ns_op, "-f", "-", input=json.dumps(deployment("bench", pool, ep)))
        t_op = wait_running(kube, ns_op, ep) - t0
        # The same pods, created directly: one kubectl apply of a List.
        pods = kube.list("Pod", ns_op)
        items = []
        for p in pods:
            meta = p["metadata"]
            spec = {k: v for k, v in p["spec"].items() if k not in ("nodeName",)}
            term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
            term["matchFields"][0]["values"] = [to_mirror[v] for v in term["matchFields"][0]["values"]]
            items.append({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": meta["name"], "labels": meta.get("labels", {})}, "spec": spec})
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        t0 = time.perf_counter()
        kubectl(kc, "apply", "-n", ns_direct, "-f", "-", input=doc)
        t_direct = wait_running(kube, ns_direct, ep) - t0
    finally:
        op.terminate()
        op.wait(timeout=20)
        for ns in (ns_op, ns_direct):
            kubectl(kc, "delete", "namespace", ns, "--wait=false")
        for p in (pool, f"{pool}m"):
            kubectl(kc, "delete", "nodes", "-l", f"{devcluster.POOL_LABEL}={p}", "--wait=false")
    return t_op, t_direct


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", default="64,288,1024")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    # A cluster of its own: an operator left running elsewhere (make demo's) must not act here.
    os.environ.setdefault("MOE_CLUSTER_DIR", str(devcluster.cache_dir() / "bench-cluster"))
    c = devcluster.up(quiet=True)
    kc = str(c.kubeconfig)
    kube = Kube(kubeconfig=kc)
    kubectl(kc, "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / "moedeployment.yaml"))
    rows = []
    for ep in (int(x) for x in args.ep.split(",")):
        for _ in range(args.repeat):
            t_op, t_direct = one(kube, kc, ep)
            rows.append((ep, t_op, t_direct))
            print(f"EP{ep}: operator {t_op:.2f}s, direct {t_direct:.2f}s", file=sys.stderr)
    print(f"{'EP':>6} {'operator s':>11} {'direct apply s':>15} {'ratio':>7}")
    for ep, t_op, t_direct in rows:
        print(f"{ep:>6} {t_op:>11.2f} {t_direct:>15.2f} {t_op / t_direct:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
