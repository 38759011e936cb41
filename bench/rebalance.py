"""Rebalancing under load: time from the operator's decision to the new expert map live on every
rank, and output tokens/s around the switch against the steady state before it (same run).

    python bench/rebalance.py [--seconds 60] [--clients 6] [--threshold 2.5]
    python bench/rebalance.py --scale-out

Local control plane, two runner nodes (16 rank processes of the tiny EP16 model), the operator as a
subprocess, skewed traffic from `moe_operator.localdev.loadgen`. `--scale-out`: one 24-GPU runner node and
`maxExtraGpus: 4`; after 15 s of traffic the threshold is set between what the best 16-rank and
20-rank plans reach for the measured load, so the operator adds rank pods and the running group
grows (decision -> new ranks serving). Targets (issue 9): no request fails, the
throughput dip while switching stays under 20%.

Measured here (2 cores): rebalance 0.94 s to live, lowest 2 s bucket 0.92x steady, 0 errors;
scale-out 16 -> 20 ranks 8.7-11.6 s from decision to every rank serving (pods created, processes
started, experts loaded, group re-formed), 0 errors, the resize step itself 0.23-0.28 s on rank 0,
but the 2 s bucket around it at 0.33-0.63x steady (three runs): the new ranks' first steps (cold
processes, gloo connections, prefills landing on them) on the same two cores as the sixteen
serving ones. Target missed for scale-out here; it needs a measurement on real hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from moe_operator import api  # noqa: E402
from moe_operator.controller import scaling  # noqa: E402
from moe_operator.controller.kube import Kube  # noqa: E402
from moe_operator.controller.reconcile import shape_of  # noqa: E402
from moe_operator.localdev import devcluster, loadgen  # noqa: E402
from moe_operator.placement import plan as make_plan  # noqa: E402
from moe_operator.topology import Topology  # noqa: E402


def rank_generations(kube: Kube, ns: str) -> list[int]:
    out = []
    for p in kube.list("Pod", ns, labels="moe.dev/deployment=rb"):
        ip = p["status"].get("podIP")
        text = urllib.request.urlopen(f"http://{ip}:9400/metrics", timeout=3).read().decode()
        line = next(x for x in text.splitlines() if x.startswith("moe_expert_map_generation{"))
        out.append(int(float(line.split()[-1])))
    return out


def reachable(kube: Kube, ns: str, spec: api.MoEDeploymentSpec) -> tuple[float, float]:
    """Predicted imbalance of the best 16-rank and 20-rank plans for the load the ranks counted."""
    counts: dict = {}
    for p in kube.list("Pod", ns, labels="moe.dev/deployment=rb"):
        text = urllib.request.urlopen(f"http://{p['status']['podIP']}:9400/metrics", timeout=3).read().decode()
        counts.update(scaling.parse_expert_tokens(text))
    shape = shape_of(spec)
    logical, _ = scaling.loads(counts, shape.moe_layers, shape.n_routed_experts, 16)
    out = []
    for ranks in (16, 20):
        best = make_plan(shape, Topology.synthetic(1, ranks), load=logical + 1e-9, redundant=ranks - 12)
        out.append(scaling.imbalance(scaling.predicted_physical(best, logical)))
    return out[0], out[1]


def resizes(ns: str) -> list[tuple[float, float]]:
    """(wall-clock time, seconds) of each resize step rank 0 logged (the local runner keeps logs)."""
    import datetime

    out = []
    for log in (devcluster.cache_dir() / "bench-cluster" / "runner" / "pods").glob(f"{ns}_rb-g0-r0_*/container.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "EP group resized" in line:
                when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((when, float(line.rsplit(" in ", 1)[1].split()[0])))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--threshold", type=float, default=2.5,
                    help="rebalance threshold (with --scale-out it is set from the measured load)")
    ap.add_argument("--scale-out", action="store_true", help="measure a scale-out onto extra GPUs instead")
    args = ap.parse_args()
    # A cluster of its own: an operator left running elsewhere (make demo's) must not act here.
    os.environ.setdefault("MOE_CLUSTER_DIR", str(devcluster.cache_dir() / "bench-cluster"))
    c = devcluster.up(quiet=True)
    kc = str(c.kubeconfig)
    kube = Kube(kubeconfig=kc)
    kubectl = str(devcluster.testbin() / "kubectl")
    subprocess.run([kubectl, f"--kubeconfig={kc}", "apply", "--server-side", "--force-conflicts", "-f",
                    str(REPO / "crds" / "moedeployment.yaml")], check=True, capture_output=True)
    tag = uuid.uuid4().hex[:6]
    ns, pool = f"bench-rb-{tag}", f"rb{tag}"
    work = Path(tempfile.mkdtemp(prefix="moe-bench-rb-"))
    obj = yaml.safe_load((REPO / "manifests" / "tiny-ep16.yaml").read_text())
    (work / "config.json").write_text(json.dumps(api.parse_deployment(obj).spec.model.architecture.hf_config()))
    subprocess.run([sys.executable, "-m", "moe_worker.cli", "make-checkpoint", "--config", str(work / "config.json"),
                    "--out", str(work / "ckpt"), "--dtype", "bf16", "--seed", "1"], check=True, capture_output=True)
    nodes, gpus = (1, 24) if args.scale_out else (2, 8)
    devcluster.apply_nodes(devcluster.gpu_nodes(nodes, gpus=gpus, prefix=pool, pool=pool, local_runner=True), kc)
    subprocess.run([kubectl, f"--kubeconfig={kc}", "create", "namespace", ns], check=True, capture_output=True)
    op = subprocess.Popen([sys.executable, "-m", "kopf", "run", "-m", "moe_operator.controller.main", "--standalone",
                           "--namespace", ns], cwd=REPO, stdout=open(work / "operator.log", "wb"), stderr=subprocess.STDOUT,
                          env=dict(os.environ, KUBECONFIG=kc, MOE_OPERATOR_METRICS_PORT="0", MOE_OPERATOR_NAMESPACE=ns,
                                   MOE_REBALANCE_MIN_TOKENS="200"))
    try:
        obj["metadata"] = {"name": "rb", "namespace": ns}
        s = obj["spec"]
        s["model"]["checkpoint"] = {"hostPath": str(work / "ckpt")}
        s["model"]["precision"] = "bf16"
        s["placement"]["nodeSelector"] = {devcluster.POOL_LABEL: pool}
        s["loadBalancing"] = {"enabled": True, "windowSeconds": 10, "intervalSeconds": 2, "cooldownSeconds": 600,
                              "imbalanceThreshold": 100.0 if args.scale_out else args.threshold,
                              "maxReplicasPerExpert": 4,
                              "maxExtraGpus": 4 if args.scale_out else 0}
        s["worker"]["env"] = [{"name": "MOE_THREADS", "value": "1"}, {"name": "MOE_MAP_POLL_S", "value": "0.5"}]
        kube.apply(obj)
        deadline = time.monotonic() + 300
        while (kube.get("MoEDeployment", "rb", ns) or {}).get("status", {}).get("phase") != "Ready":
            if time.monotonic() > deadline:
                raise SystemExit("rb not Ready in 300 s")
            time.sleep(1)
        url = f"{kube.get('Pod', 'rb-g0-r0', ns)['status']['podIP']}:8080"
        stamps: list[tuple[float, int]] = []
        lock = threading.Lock()

        def on_answer(_p, ids):
            with lock:
                stamps.append((time.monotonic(), len(ids)))

        traffic = loadgen.Traffic(hot_tokens=(5,), hot_fraction=0.75, prompt_len=12, max_tokens=3)
        t0, t0_wall = time.monotonic(), time.time()
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("r", loadgen.run(url, traffic, args.seconds, args.clients,
                                                                             on_answer=on_answer)))
        th.start()
        decided = live = None
        patched = not args.scale_out
        while th.is_alive():
            if not patched and time.monotonic() - t0 > 15:
                # A threshold 16 ranks cannot reach and 20 can, from the load measured so far.
                r16, r20 = reachable(kube, ns, api.parse_deployment(obj).spec)
                thr = round(r20 + 0.4 * (r16 - r20), 2)
                print(f"measured load: 16 ranks reach {r16:.2f}, 20 reach {r20:.2f}; threshold {thr}")
                kube.request("PATCH", kube.path("MoEDeployment", ns, "rb"),
                             body={"spec": {"loadBalancing": {"imbalanceThreshold": thr}}},
                             content_type="application/merge-patch+json")
                patched = True
            st = (kube.get("MoEDeployment", "rb", ns) or {}).get("status") or {}
            if decided is None and (st.get("expertMapGeneration") or 1) >= 2:
                decided = time.monotonic()
                grown = st.get("totalRanks", 16)
            if decided is not None and live is None:
                try:
                    gens = rank_generations(kube, ns)
                except (OSError, StopIteration):  # a new rank's pod is still starting
                    gens = []
                want = (kube.get("MoEDeployment", "rb", ns) or {}).get("status", {}).get("totalRanks", 16)
                if gens and len(gens) >= want and all(g >= 2 for g in gens):
                    live = time.monotonic()
                    grown = want
            time.sleep(0.25)
        th.join()
        res = box["r"]
        # tokens/s in 2 s buckets
        buckets: dict[int, int] = {}
        for t, n in stamps:
            buckets[int((t - t0) // 2)] = buckets.get(int((t - t0) // 2), 0) + n
        rate = {k: v / 2 for k, v in sorted(buckets.items())}
        print(f"requests {res.requests}, errors {res.errors}, answers per prompt: "
              f"{max(len(v) for v in res.answers.values()) if res.answers else 0} distinct at most")
        if decided is None:
            print("no rebalance happened (imbalance never above the threshold for a window)")
            return 1
        kd, kl = int((decided - t0) // 2), int(((live or decided) - t0) // 2)
        steady = statistics.median([v for k, v in rate.items() if 1 <= k < kd - 1] or [0.0])
        during = min(v for k, v in rate.items() if kd <= k <= kl + 1)
        print(f"{'measure':<44} {'value':>10}")
        print(f"{'ranks after the decision':<44} {grown:>10d}")
        print(f"{'decision -> every rank on the new map (s)':<44} {((live or decided) - decided):>10.2f}")
        print(f"{'steady tokens/s before (median of 2 s buckets)':<44} {steady:>10.1f}")
        print(f"{'lowest tokens/s while switching (2 s bucket)':<44} {during:>10.1f}")
        print(f"{'throughput during switch / steady':<44} {during / steady if steady else float('nan'):>10.2f}")
        calm = min([v for k, v in rate.items() if 1 <= k < kd - 1] or [0.0])
        print(f"{'lowest bucket before the decision / steady':<44} {calm / steady if steady else float('nan'):>10.2f}")
        print(f"{'failed requests':<44} {res.errors:>10d}")
        for when, sec in resizes(ns):
            k = int((when - t0_wall) // 2)
            print(f"{'resize step on rank 0 (s)':<44} {sec:>10.3f}")
            print(f"{'tokens/s in its 2 s bucket / steady':<44} {rate.get(k, 0.0) / steady if steady else float('nan'):>10.2f}")
        return 0
    finally:
        op.terminate()
        op.wait(timeout=20)
        subprocess.run([kubectl, f"--kubeconfig={kc}", "delete", "namespace", ns, "--wait=false"], capture_output=True)
        subprocess.run([kubectl, f"--kubeconfig={kc}", "delete", "nodes", "-l", f"{devcluster.POOL_LABEL}={pool}",
                        "--wait=false"], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
