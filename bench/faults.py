"""Faults under steady load: what an EP16 group survives, and what each fault costs (issue 16).

    python bench/faults.py [--only rank-kill,front-kill] [--clients 3] [--manifest manifests/tiny-ep16-tp2.yaml]

A local control plane of its own (the bench cluster), four runner nodes of 8 GPUs: the tiny EP16
model's 16 rank processes on two of them, two spare, and the deployment's two routers. Two
operator replicas (one leads through the Lease). tritonclient clients send the prompts through the
routers in turn (client i to the i-th Ready router; after a failure, to the next one Ready then,
as a client of the Service would), each waiting for its answer; every answer is checked against
`moe-worker generate --world-size 1`. The faults, in this order, each once the group is whole
again:

    rank-kill          SIGKILL of rank 5's process
    rank-stop          SIGSTOP of rank 9's process (a hang; the liveness probe then kills it)
    front-kill         SIGKILL of rank 0's process (the front: the routers send its requests again)
    router-kill        SIGKILL of the first client's router (it holds its clients' connections)
    node-delete        the Node object of the node holding ranks 8-15 deleted (its processes stop)
    node-drain         kubectl drain of the node holding ranks 8-15 now (eviction API, PDB)
    apiserver-restart  kube-apiserver stopped and started again
    etcd-restart       etcd stopped and started again (the API server fails while it is down)
    leader-kill        SIGKILL of rank 3, then at once of the operator leader: the other replica
                       must finish the recovery

Columns: requests in flight at the fault that failed; requests sent after it that failed
(a client retries after 0.2 s); the longest time without a successful answer (from the last one
before the fault); seconds until full EP again (every rank pod Ready, status Ready 16/16, and for
router-kill two Ready routers again); rank processes restarted besides the fault's own; answers
that differ from the reference. On 2 cores
the 16 ranks, the control plane and the clients share the CPUs: times are bound by that.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from moe_operator import api  # noqa: E402
from moe_operator.controller.kube import Kube  # noqa: E402
from moe_operator.localdev import devcluster  # noqa: E402
from moe_operator.localdev.loadgen import SteadyClients  # noqa: E402
from moe_operator.localdev.localrunner import rank_processes, router_process  # noqa: E402

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [100, 200, 300, 400]]
NEW = 6
FAULTS = ["rank-kill", "rank-stop", "front-kill", "router-kill", "node-delete", "node-drain", "apiserver-restart",
          "etcd-restart", "leader-kill"]


class Bench:
    def __init__(self, clients: int, manifest: Path = REPO / "manifests" / "tiny-ep16.yaml"):
        self.manifest = manifest
        os.environ.setdefault("MOE_CLUSTER_DIR", str(devcluster.cache_dir() / "bench-cluster"))
        self.c = devcluster.up(quiet=True)
        self.kc = str(self.c.kubeconfig)
        self.kube = Kube(kubeconfig=self.kc)
        self.kubectl = str(devcluster.testbin() / "kubectl")
        self.clients = clients
        tag = uuid.uuid4().hex[:6]
        self.ns, self.pool = f"bench-faults-{tag}", f"ft{tag}"
        self.work = Path(tempfile.mkdtemp(prefix="moe-bench-faults-"))
        self.operators: dict[str, subprocess.Popen] = {}
        self._routers: list[str] = []

    def sh(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        return subprocess.run([self.kubectl, f"--kubeconfig={self.kc}", *args], check=check, capture_output=True,
                              text=True, timeout=timeout).stdout

    # ---- set-up ----

    def setup(self) -> None:
        self.sh("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / "moedeployment.yaml"))
        obj = yaml.safe_load(self.manifest.read_text())
        (self.work / "config.json").write_text(json.dumps(api.parse_deployment(obj).spec.model.architecture.hf_config()))
        self.ckpt = self.work / "ckpt"
        subprocess.run([sys.executable, "-m", "moe_worker.cli", "make-checkpoint", "--config",
                        str(self.work / "config.json"), "--out", str(self.ckpt), "--dtype", "fp8", "--seed", "0"],
                       check=True, capture_output=True)
        self.reference = {}
        for p in PROMPTS:
            r = subprocess.run([sys.executable, "-m", "moe_worker.cli", "generate", "--checkpoint", str(self.ckpt),
                                "--world-size", "1", "--prompt-ids", ",".join(map(str, p)), "--max-new-tokens",
                                str(NEW), "--json"], check=True, capture_output=True, text=True, timeout=300)
            self.reference[tuple(p)] = json.loads(r.stdout)["output_ids"]
        devcluster.apply_nodes(devcluster.gpu_nodes(4, gpus=8, prefix=self.pool, pool=self.pool, local_runner=True),
                               self.kc)
        self.sh("create", "namespace", self.ns)
        for i in range(2):
            self.start_operator(f"operator-{i}")
        obj["metadata"] = {"name": "ft", "namespace": self.ns}
        s = obj["spec"]
        s["model"]["checkpoint"] = {"hostPath": str(self.ckpt)}
        s["placement"]["nodeSelector"] = {devcluster.POOL_LABEL: self.pool}
        s["worker"]["env"] = [{"name": "MOE_THREADS", "value": "1"}, {"name": "MOE_DEVICE", "value": "cpu"}]
        self.kube.apply(obj)
        self.wait(self.whole, 300, "ft Ready 16/16")
        self.wait(lambda: len(self.routers()) == 2, 120, "two Ready routers")

    def start_operator(self, name: str) -> None:
        log = open(self.work / f"{name}.log", "ab")
        self.operators[name] = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "-m", "moe_operator.controller.main", "--standalone",
             "--namespace", self.ns], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, KUBECONFIG=self.kc, MOE_OPERATOR_METRICS_PORT="0", MOE_OPERATOR_NAMESPACE=self.ns,
                     POD_NAME=name))

    def teardown(self) -> None:
        for p in self.operators.values():
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=20)
        self.sh("delete", "namespace", self.ns, "--wait=false", check=False)
        self.sh("delete", "nodes", "-l", f"{devcluster.POOL_LABEL}={self.pool}", "--wait=false", check=False)

    # ---- observing ----

    @staticmethod
    def wait(pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            time.sleep(0.5)
        raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")

    def pods(self) -> dict[int, dict]:
        return {int(p["metadata"]["labels"]["moe.dev/rank"]): p
                for p in self.kube.list("Pod", self.ns, labels="moe.dev/deployment=ft")
                if not p["metadata"].get("deletionTimestamp")}

    def whole(self) -> bool:
        try:
            st = (self.kube.get("MoEDeployment", "ft", self.ns) or {}).get("status") or {}
            pods = self.pods()
        except Exception:  # the API server is restarting
            return False
        ready = [p for p in pods.values() if any(c.get("type") == "Ready" and c.get("status") == "True"
                                                  for c in (p.get("status") or {}).get("conditions") or [])]
        return st.get("phase") == "Ready" and st.get("ready") == "16/16" and len(ready) == 16

    def routers(self) -> list[str]:
        """host:port of the Ready routers (the client Service's endpoints)."""
        try:
            pods = self.kube.list("Pod", self.ns, labels="moe.dev/router=ft")
        except Exception:  # the API server is restarting: the last ones stand
            return self._routers
        self._routers = sorted(f"{p['status']['podIP']}:8080" for p in pods
                               if not p["metadata"].get("deletionTimestamp")
                               and any(c.get("type") == "Ready" and c.get("status") == "True"
                                       for c in (p.get("status") or {}).get("conditions") or []))
        return self._routers

    def pids(self) -> dict[int, int]:
        ips = {p["status"].get("podIP"): r for r, p in self.pods().items() if (p.get("status") or {}).get("podIP")}
        return rank_processes(ips)

    def leader(self) -> str:
        lease = self.kube.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{self.ns}/leases/moe-operator")
        return lease["spec"]["holderIdentity"]

    # ---- faults ----

    def inject(self, fault: str, pids: dict[int, int]) -> set[int]:
        """Cause `fault`; the ranks whose processes it replaces."""
        if fault == "rank-kill":
            os.kill(pids[5], signal.SIGKILL)
            return {5}
        if fault == "rank-stop":
            os.kill(pids[9], signal.SIGSTOP)
            return {9}
        if fault == "front-kill":
            os.kill(pids[0], signal.SIGKILL)
            return {0}
        if fault == "router-kill":
            pid = router_process(self.routers()[0].rsplit(":", 1)[0])
            assert pid is not None, "no router process found"
            os.kill(pid, signal.SIGKILL)
            return set()
        if fault in ("node-delete", "node-drain"):
            node = self.pods()[8]["spec"]["nodeName"]
            ranks = {r for r, p in self.pods().items() if p["spec"].get("nodeName") == node}
            if fault == "node-delete":
                self.sh("delete", "node", node, "--wait=false")
            else:
                self.drain = threading.Thread(target=self.sh, args=(
                    "drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=600s"),
                    kwargs={"check": False, "timeout": 660}, daemon=True)
                self.drain.start()
            return ranks
        if fault == "apiserver-restart":
            devcluster.restart(self.c, "kube-apiserver")
            return set()
        if fault == "etcd-restart":
            devcluster.restart(self.c, "etcd")
            return set()
        if fault == "leader-kill":
            os.kill(pids[3], signal.SIGKILL)
            leader = self.leader()
            self.operators[leader].kill()
            return {3}
        raise ValueError(fault)

    def run(self, faults: list[str]) -> list[dict]:
        rows = []
        with SteadyClients(self.routers, PROMPTS, NEW, self.clients) as load:
            self.wait(lambda: load.answered_after(0) >= 6, 120, "steady traffic")
            for fault in faults:
                before = self.pids()
                t0 = time.monotonic()
                print(f"{time.strftime('%H:%M:%S')} {fault}", flush=True)
                replaced = self.inject(fault, before)
                self.wait(lambda t0=t0: load.answered_after(t0) >= 6, 300, f"answers after {fault}")
                gone = {r: p for r, p in before.items() if r in replaced}
                self.wait(lambda gone=gone: self.whole() and len(self.routers()) == 2
                          and all(self.pids().get(r) not in (None, p) for r, p in gone.items()), 600,
                          f"full EP after {fault}")
                t_whole = time.monotonic()
                time.sleep(3)
                after = self.pids()
                got = load.outcomes(since=t0 - 60)
                failed = [o for o in got if o.output is None and o.answered >= t0]
                rows.append({
                    "fault": fault,
                    "in_flight_failed": sum(1 for o in failed if o.sent < t0),
                    "refused": sum(1 for o in failed if o.sent >= t0),
                    "outage_s": load.longest_outage(t0, time.monotonic()),
                    "full_ep_s": t_whole - t0,
                    "restarted": sum(1 for r, p in before.items() if r not in replaced and after.get(r) != p),
                    "wrong": sum(1 for o in got if o.output is not None and o.output != self.reference[o.prompt]),
                    "errors": sorted({o.error.split(":")[0] for o in failed})[:3],
                })
                print(f"{fault}: {rows[-1]}", flush=True)
                if os.environ.get("MOE_BENCH_TIMELINE"):  # answers around the fault, seconds from it
                    print("  answered:", [round(o.answered - t0, 1) for o in got if o.output is not None
                                          and -5 < o.answered - t0 < 30], flush=True)
                if fault == "node-drain":
                    self.drain.join(60)
                    self.sh("uncordon", self.pods()[8]["spec"]["nodeName"], check=False)
        return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(FAULTS), help=f"comma-separated faults, from {FAULTS}")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--manifest", type=Path, default=REPO / "manifests" / "tiny-ep16.yaml",
                    help="a variant of the tiny EP16 model, e.g. manifests/tiny-ep16-tp2.yaml (attention TP2)")
    a = ap.parse_args()
    faults = [f for f in a.only.split(",") if f]
    if bad := [f for f in faults if f not in FAULTS]:
        raise SystemExit(f"unknown faults {bad}; known: {FAULTS}")
    b = Bench(a.clients, a.manifest)
    try:
        b.setup()
        rows = b.run(faults)
    finally:
        b.teardown()
    print(f"\n{'fault':<18} {'in flight failed':>16} {'refused':>8} {'outage s':>9} {'full EP s':>10} "
          f"{'restarted':>10} {'wrong':>6}  errors")
    for r in rows:
        print(f"{r['fault']:<18} {r['in_flight_failed']:>16d} {r['refused']:>8d} {r['outage_s']:>9.1f} "
              f"{r['full_ep_s']:>10.1f} {r['restarted']:>10d} {r['wrong']:>6d}  {', '.join(r['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
