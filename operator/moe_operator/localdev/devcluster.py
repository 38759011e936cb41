"""A real local Kubernetes control plane for tests and the demo: no container runtime needed.

etcd, kube-apiserver, kube-scheduler and kube-controller-manager run as local processes on
127.0.0.1, built from the Go module proxy by `hack/build-testbin.sh` into a cache outside the
repository. KWOK plays the kubelets: it keeps the fake GPU nodes Ready and moves pods that the
real scheduler bound to them to Running. State (PIDs, logs, kubeconfig, etcd data) lives in one
directory, `~/.cache/moe-operator/cluster` unless `MOE_CLUSTER_DIR` says otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "local-runner")

# Default node label keys; the MoEDeployment's placement.topologyKeys default to the same keys.
NVLINK_LABEL = "moe.dev/nvlink-domain"
RACK_LABEL = "moe.dev/rack"
ZONE_LABEL = "topology.kubernetes.io/zone"
POOL_LABEL = "moe.dev/pool"
RUNNER_LABEL = "moe.dev/local-runner"  # nodes whose pods run as local processes (localrunner)


class ClusterError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_CACHE", Path.home() / ".cache" / "moe-operator"))


def state_dir() -> Path:
    return Path(os.environ.get("MOE_CLUSTER_DIR", cache_dir() / "cluster"))


def kubeconfig_path() -> Path:
    return state_dir() / "kubeconfig"


def testbin(build: bool = True) -> Path:
    """Directory with the binaries; builds what is missing (cold: ~25 min on 2 cores)."""
    script = REPO / "hack" / "build-testbin.sh"
    if not build:
        env = os.environ.get("MOE_TESTBIN")
        if env:
            return Path(env)
    out = subprocess.run(["bash", str(script)], check=False, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise ClusterError(f"hack/build-testbin.sh failed with exit code {out.returncode}; see its output above")
    return Path(out.stdout.strip().splitlines()[-1])


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux default 32768..60999)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _free_port() -> int:
    """A free port to listen on later, below the ephemeral range when there is room: a port from
    that range can be taken by any outgoing connection (the API server's to etcd, say) between now
    and the moment a component binds it, which once failed kube-controller-manager's start with
    'address already in use'."""
    lo, _ = _ephemeral_range()
    if lo > 11000:
        rng = random.Random()
        for _ in range(100):
            port = rng.randrange(10000, lo)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); check its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Cluster:
    dir: Path
    ports: dict[str, int]
    token: str

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def pids(self) -> dict[str, int]:
        out = {}
        for c in COMPONENTS:
            f = self.dir / f"{c}.pid"
            if f.exists():
                out[c] = int(f.read_text())
        return out

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError as e:
            return 0, str(e)

    def healthy(self) -> bool:
        pids = self.pids()
        if set(pids) != set(COMPONENTS) or not all(_alive(p) for p in pids.values()):
            return False
        return self.get("/readyz")[0] == 200


def restart(c: Cluster, name: str, down_s: float = 0.0) -> float:
    """Stop component `name` (SIGTERM, SIGKILL after 20 s) and start it again with the same
    arguments, after `down_s` seconds: a control-plane fault drill (bench/faults.py). Waits until
    the API server answers /readyz again; returns the seconds it was down."""
    pid = c.pids()[name]
    argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") if a]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    time.sleep(down_s)
    _spawn(c, name, argv)
    _wait("kube-apiserver /readyz", lambda: c.get("/readyz", timeout=2)[0] == 200, 180, c, "kube-apiserver")
    return time.monotonic() - t0


def load() -> Cluster | None:
    d = state_dir()
    f = d / "cluster.json"
    if not f.exists():
        return None
    data = json.loads(f.read_text())
    return Cluster(dir=d, ports=data["ports"], token=data["token"])


def _spawn(c: Cluster, name: str, argv: list[str]) -> int:
    log = open(c.dir / f"{name}.log", "ab")
    # New session: the components outlive `moe cluster up` and are stopped by PID, never pkill.
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, cwd=c.dir)
    (c.dir / f"{name}.pid").write_text(str(p.pid))
    return p.pid


def _wait(what: str, ok, timeout: float, c: Cluster, log: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        pid = c.pids().get(log)
        if pid and not _alive(pid):
            tail = (c.dir / f"{log}.log").read_text(errors="replace")[-3000:]
            raise ClusterError(f"{log} exited while waiting for {what}; last log lines:\n{tail}")
        time.sleep(0.3)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; see {c.dir}/{log}.log")


def up(quiet: bool = False) -> Cluster:
    """Start the control plane, or return the running one. Safe to call twice."""
    existing = load()
    if existing and existing.healthy():
        if not quiet:
            print(f"cluster already running at {existing.server}", file=sys.stderr)
        return existing
    if existing:
        down(quiet=True)

    bin_dir = testbin()
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "pki").mkdir(exist_ok=True)
    token = os.urandom(16).hex()
    ports = {k: _free_port() for k in ("etcd", "etcd_peer", "apiserver", "kcm", "scheduler")}
    c = Cluster(dir=d, ports=ports, token=token)
    (d / "cluster.json").write_text(json.dumps({"ports": ports, "token": token, "bin": str(bin_dir)}))

    subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
                   check=True, capture_output=True)
    (d / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
    kc = str(c.kubeconfig)
    b = str(bin_dir)
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd_peer']}"
    _spawn(c, "etcd", [
        f"{b}/etcd", f"--data-dir={d}/etcd", "--unsafe-no-fsync",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=default={peer_url}", "--quota-backend-bytes=4294967296"])
    _spawn(c, "kube-apiserver", [
        f"{b}/kube-apiserver", f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
        f"--cert-dir={d}/pki", f"--token-auth-file={d}/tokens.csv", "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={d}/sa.pub", f"--service-account-signing-key-file={d}/sa.key",
        "--service-cluster-ip-range=10.96.0.0/16", "--allow-privileged=true",
        "--disable-admission-plugins=ServiceAccount", "--endpoint-reconciler-type=none",
        # Large EP groups create hundreds of pods at once; do not throttle the operator.
        "--max-requests-inflight=1600", "--max-mutating-requests-inflight=800"])
    _wait("kube-apiserver /readyz", lambda: c.get("/readyz", timeout=2)[0] == 200, 180, c, "kube-apiserver")
    # The API server made its own CA and serving cert in --cert-dir; clients verify against it.
    ca = base64.b64encode((d / "pki" / "apiserver.crt").read_bytes()).decode()
    c.kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: moe-local, cluster: {{server: '{c.server}', certificate-authority-data: '{ca}'}}}}]\n"
        f"users: [{{name: admin, user: {{token: '{token}'}}}}]\n"
        "contexts: [{name: moe-local, context: {cluster: moe-local, user: admin}}]\n"
        "current-context: moe-local\n")
    common = [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
              "--leader-elect=false", "--bind-address=127.0.0.1"]
    _spawn(c, "kube-controller-manager", [
        f"{b}/kube-controller-manager", *common, f"--secure-port={ports['kcm']}",
        f"--service-account-private-key-file={d}/sa.key", f"--root-ca-file={d}/pki/apiserver.crt",
        "--kube-api-qps=500", "--kube-api-burst=1000", "--concurrent-gc-syncs=50",
        # No kubelets: evict from unreachable fake nodes quickly when a test takes one away.
        "--node-monitor-grace-period=20s"])
    _spawn(c, "kube-scheduler", [
        f"{b}/kube-scheduler", *common, f"--secure-port={ports['scheduler']}",
        "--kube-api-qps=500", "--kube-api-burst=1000"])
    _spawn(c, "kwok", [
        # Every node except the local runner's: those get a process-running kubelet stand-in.
        f"{b}/kwok", f"--kubeconfig={kc}", f"--manage-nodes-with-label-selector=!{RUNNER_LABEL}",
        # Pod and node IPs on loopback: nothing may ever send traffic to a private range from here.
        "--node-lease-duration-seconds=40", "--cidr=127.64.0.0/10", "--node-ip=127.0.0.1"])
    _spawn(c, "local-runner", [sys.executable, "-m", "moe_operator.localdev.localrunner", f"--kubeconfig={kc}",
                               f"--state={d}/runner", f"--subnet={runner_subnet(d)}"])
    for name, port in (("kube-controller-manager", ports["kcm"]), ("kube-scheduler", ports["scheduler"])):
        _wait(f"{name} /healthz", lambda port=port: _https_ok(port), 60, c, name)
    _wait("the default service account namespace", lambda: c.get("/api/v1/namespaces/default")[0] == 200,
          60, c, "kube-apiserver")
    if not quiet:
        print(f"cluster up at {c.server}; state in {d}", file=sys.stderr)
    return c


def crd_established(kubectl: Any, crd: str) -> bool:
    """Whether CRD `crd`'s Established condition is True; `kubectl(*args)` runs kubectl and returns
    its output. (Poll this: `kubectl wait --for=condition=Established` right after the apply fails
    instead of waiting while the API server has written no condition yet, ".status.conditions
    accessor error".)"""
    query = '{.status.conditions[?(@.type=="Established")].status}'
    return kubectl("get", "crd", crd, "-o", f"jsonpath={query}").strip() == "True"


def runner_subnet(d: Path) -> int:
    """127.N.0.0/16 for this cluster's runner pods, N in 1..63, fixed by the state directory, so that
    clusters in different directories (the demo's, the tests') never share pod addresses."""
    import hashlib

    return 1 + int(hashlib.sha256(str(Path(d).resolve()).encode()).hexdigest(), 16) % 63


def _https_ok(port: int) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=2, context=ctx) as r:
            return r.status == 200
    except OSError:
        return False


def down(quiet: bool = False) -> None:
    """Stop every component by its PID and remove the state directory."""
    d = state_dir()
    c = load()
    pids = c.pids() if c else {}
    for name in reversed(COMPONENTS):
        pid = pids.get(name)
        if pid and _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 20
    for pid in pids.values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    for pid in pids.values():
        # Reap our own children if we started them in this process.
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if d.exists():
        subprocess.run(["rm", "-rf", str(d)], check=False)
    if not quiet:
        print("cluster down", file=sys.stderr)


def node_manifest(name: str, gpus: int, labels: dict[str, str], gpu_resource: str = "nvidia.com/gpu",
                  cpu: str = "128", memory: str = "2Ti") -> dict[str, Any]:
    # ephemeral-storage: a kubelet reports its root filesystem; pods that request some (the chart's
    # operator) are unschedulable on a node without it.
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "1Ti", gpu_resource: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "type": "kwok",
                       "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", **labels},
        },
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def gpu_nodes(nodes: int, gpus: int = 8, racks: int = 1, zones: int = 1, prefix: str = "gpu-node",
              nodes_per_nvlink_domain: int = 1, pool: str | None = None, local_runner: bool = False,
              nvlink_label: str = NVLINK_LABEL, rack_label: str = RACK_LABEL, zone_label: str = ZONE_LABEL,
              gpu_resource: str = "nvidia.com/gpu") -> list[dict[str, Any]]:
    """Node manifests with GPUs and topology labels; consecutive nodes share a rack, racks a zone."""
    if nodes < 1 or gpus < 1 or racks < 1 or zones < 1 or nodes_per_nvlink_domain < 1:
        raise ValueError("nodes, gpus, racks, zones and nodes_per_nvlink_domain must be >= 1")
    out = []
    width = max(3, len(str(nodes - 1)))
    for i in range(nodes):
        name = f"{prefix}-{i:0{width}d}"
        rack = i * racks // nodes
        zone = rack * zones // racks
        domain = name if nodes_per_nvlink_domain == 1 else f"{prefix}-nvl{i // nodes_per_nvlink_domain}"
        labels = {nvlink_label: domain, rack_label: f"rack-{rack}", zone_label: f"zone-{zone}"}
        if pool:
            labels[POOL_LABEL] = pool
        if local_runner:
            labels[RUNNER_LABEL] = "true"
        out.append(node_manifest(name, gpus, labels, gpu_resource=gpu_resource))
    return out


def apply_nodes(manifests: list[dict[str, Any]], kubeconfig: str | Path) -> None:
    """Create (or update the labels and capacity of) the nodes through the API server."""
    from kubernetes import client, config  # the dev cluster may use the client; planners may not

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    for m in manifests:
        try:
            api.create_node(m)
        except client.ApiException as e:
            if e.status != 409:
                raise
            api.patch_node(m["metadata"]["name"], {"metadata": {"labels": m["metadata"]["labels"]}})
            api.patch_node_status(m["metadata"]["name"], {"status": m["status"]})
