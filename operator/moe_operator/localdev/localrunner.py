"""The local runner: a small kubelet for the local cluster's runner nodes, running containers as processes.

No container runtime exists where this project is built, so KWOK simulates most nodes. Nodes
labelled `moe.dev/local-runner=true` are left to this runner instead (KWOK is started with a label
selector that excludes them). For those nodes it does what a kubelet does, in the smallest form
that lets the operator's real pod specs run:

- keeps the Node Ready (status + a Lease in kube-node-lease);
- for every pod bound to one of its nodes, starts the first container's `command + args` as a
  local process with the pod's `env` (fieldRefs resolved), on its own loopback address
  127.0.0.N that becomes the pod IP;
- stands in for cluster DNS: an env value or argument `POD.SUBDOMAIN` (pod hostname + headless
  Service, as in MASTER_ADDR or the router's `--front`) is replaced by that pod's address when the
  process starts. A name keeps its address from pod to pod (the replacement takes it), and a name
  whose pod is gone or not created yet resolves to the address its next pod will take, so that a
  process reaches it once it is there, as it would by asking DNS again;
- mounts volumes as directories: configMap and secret (files written and kept in sync like the
  kubelet does; a secret's files hold the decoded bytes, with its defaultMode or item mode, and a
  pod whose Secret does not exist yet waits for it), emptyDir (a fresh directory), hostPath (the
  path itself); mount paths in env values are rewritten to those directories;
- stands in for the projected service-account token: a pod that mounts its token gets a
  kubeconfig holding a TokenRequest token of its ServiceAccount in KUBECONFIG (Kubernetes clients
  fall back to it when the in-cluster files are absent), so it acts with its own RBAC;
- runs the httpGet probes: startup and liveness as the kubelet does (initialDelaySeconds,
  periodSeconds, timeoutSeconds, failureThreshold; liveness and readiness wait for startup; a
  probe that fails failureThreshold times in a row gets the container killed: SIGTERM, then
  SIGKILL after the probe's terminationGracePeriodSeconds or the pod's, which also ends a
  SIGSTOPped process; Events Unhealthy and Killing), and readiness, which writes the Ready
  condition (every second, no thresholds: quicker than the kubelet, so that tests settle soon);
- reports exit codes (phase Failed / Succeeded, containerStatuses; a signal N is 128+N, as a
  container runtime reports it) and restarts per restartPolicy;
- on deletion, SIGTERM then SIGKILL after the grace period, then removes the pod object.

Differences from a kubelet, on purpose: one container per pod, no images (the command must be
on PATH; the virtualenv's bin is put first), no resource limits, no user switch (securityContext
is not enforced), no PVCs.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from moe_operator.controller.kube import Kube, KubeError

log = logging.getLogger("moe.localrunner")

RUNNER_LABEL = "moe.dev/local-runner"
_POD_DNS = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shows(pod: dict, phase: str, ready: str) -> bool:
    """The pod object as listed has this phase and Ready condition."""
    st = pod.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in st.get("conditions") or []}
    return st.get("phase") == phase and conds.get("Ready") == ready


def _now_micro() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class HttpProbe:
    """One httpGet probe of a container, with the kubelet's defaults for what the spec leaves unset."""

    path: str
    port: int | str | None
    initial_delay_s: float
    period_s: float
    timeout_s: float
    failure_threshold: int
    grace_s: float | None  # the probe's own terminationGracePeriodSeconds (liveness, startup)

    @classmethod
    def of(cls, spec: dict | None) -> HttpProbe | None:
        """The probe `spec` describes, or None when there is none (or it is not httpGet)."""
        if not spec or "httpGet" not in spec:
            return None
        get = spec["httpGet"]
        grace = spec.get("terminationGracePeriodSeconds")
        return cls(path=get.get("path", "/"), port=get.get("port"),
                   initial_delay_s=float(spec.get("initialDelaySeconds", 0)),
                   period_s=float(spec.get("periodSeconds", 10)), timeout_s=float(spec.get("timeoutSeconds", 1)),
                   failure_threshold=int(spec.get("failureThreshold", 3)),
                   grace_s=None if grace is None else float(grace))


@dataclass
class ProbeState:
    """Where one probe of a running container stands: when it runs next, failures in a row."""

    next_at: float = 0.0
    failures: int = 0
    passed: bool = False  # startup: it has succeeded once, and is not run again


@dataclass
class RunningPod:
    uid: str
    namespace: str
    name: str
    ip: str
    workdir: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    ready: bool = False
    started_at: str = ""
    next_probe: float = 0.0  # readiness
    startup: ProbeState = field(default_factory=ProbeState)
    liveness: ProbeState = field(default_factory=ProbeState)
    kill_at: float | None = None  # a probe failed: SIGTERM sent, SIGKILL due at this time
    configmaps: dict[str, Path] = field(default_factory=dict)  # configMap name -> directory
    secrets: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # volume name -> (directory, its `secret`)
    exit_code: int | None = None
    finished: bool = False
    deleting_since: float | None = None
    last_status: dict = field(default_factory=dict)


def _processes():
    """(pid, environment, command line) of every process this user may read."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        yield int(d.name), env, cmd


def rank_processes(ranks_by_ip: dict[str, int]) -> dict[int, int]:
    """rank -> PID of the `moe-worker serve` process this runner runs for each rank pod (pod IP ->
    rank), found by POD_IP and RANK in the process's environment. For fault drills (bench/faults.py,
    tests/test_heal_e2e.py) that kill or stop one rank's process."""
    out = {}
    for pid, env, cmd in _processes():
        ip = env.get("POD_IP")
        if "serve" in cmd and ip in ranks_by_ip and env.get("RANK") == str(ranks_by_ip[ip]):
            out[ranks_by_ip[ip]] = pid
    return out


def router_process(ip: str) -> int | None:
    """PID of the `moe-router` process of the router pod at `ip` (for fault drills)."""
    return next((pid for pid, env, cmd in _processes() if "route" in cmd and env.get("POD_IP") == ip), None)


class LocalRunner:
    def __init__(self, kube: Kube, state: Path, poll_s: float = 0.5, subnet: int = 0):
        self.kube = kube
        self.state = state
        self.poll_s = poll_s
        self.pods: dict[str, RunningPod] = {}  # uid -> pod
        self.ips: dict[str, str] = {}  # uid -> 127.0.0.N, allocated at first sight
        self.named_ips: dict[tuple[str, str], str] = {}  # (namespace, hostname.subdomain) -> its address
        self.next_ip = 2
        # Pod IPs are 127.<subnet>.x.y: two local clusters (say the demo's and the tests') must never
        # hand out the same address. KWOK's fake IPs live in 127.64.0.0/10, above every subnet.
        self.subnet = subnet
        self.nodes: list[str] = []
        self.stop = threading.Event()
        self._reads: dict[tuple[str, str, str], dict | None] = {}  # this sync pass's (kind, namespace, name) reads
        self.path_env = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

    # --- nodes ----------------------------------------------------------------------------
    def refresh_nodes(self) -> None:
        self.nodes = [n["metadata"]["name"] for n in self.kube.list("Node", labels=f"{RUNNER_LABEL}=true")]

    def heartbeat(self) -> None:
        now, micro = _now(), _now_micro()
        for name in self.nodes:
            conds = [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "local runner",
                      "lastHeartbeatTime": now, "lastTransitionTime": now}]
            for t in ("MemoryPressure", "DiskPressure", "PIDPressure"):
                conds.append({"type": t, "status": "False", "reason": "KubeletHasSufficient", "message": "",
                              "lastHeartbeatTime": now, "lastTransitionTime": now})
            try:
                self.kube.request("PATCH", self.kube.path("Node", None, name, "status"), body={"status": {
                    "conditions": conds, "phase": "Running",
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
                    "nodeInfo": {"kubeletVersion": "moe-local-runner", "kubeProxyVersion": "", "architecture": "amd64",
                                 "operatingSystem": "linux", "containerRuntimeVersion": "local://process",
                                 "kernelVersion": "", "osImage": "", "machineID": "", "systemUUID": "", "bootID": ""}}},
                    content_type="application/strategic-merge-patch+json")
                self._renew_lease(name, micro)
            except KubeError as e:
                log.warning("heartbeat %s: %s", name, e)

    def _renew_lease(self, node: str, micro: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}"
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": micro}}
        try:
            self.kube.request("PATCH", path, body=body, query={"fieldManager": "moe-local-runner", "force": "true"},
                              content_type="application/apply-patch+yaml")
        except KubeError as e:
            log.warning("lease %s: %s", node, e)

    # --- pods -----------------------------------------------------------------------------
    def ip_for(self, pod: dict) -> str:
        """The pod's address, allocated at first sight. A pod with a DNS name (hostname.subdomain)
        gets the address its predecessor of that name had, once no process holds it: this stands
        in for cluster DNS, where the name follows the new pod, for processes that were given the
        address at start (MASTER_ADDR) and reconnect to it."""
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if uid in self.ips:
            return self.ips[uid]
        name = (meta["namespace"], f"{spec['hostname']}.{spec['subdomain']}") \
            if spec.get("hostname") and spec.get("subdomain") else None
        ip = self.named_ips.get(name) if name else None
        if ip is None or any(rp.ip == ip and rp.proc is not None and rp.proc.poll() is None
                             for rp in self.pods.values()):
            ip = self._new_ip()
        self.ips[uid] = ip
        if name:
            self.named_ips[name] = ip
        return ip

    def _new_ip(self) -> str:
        ip = f"127.{self.subnet}.{self.next_ip // 254}.{self.next_ip % 254 + 1}"
        self.next_ip += 1
        return ip

    def sync(self) -> None:
        # 16 ranks mount the same plan ConfigMap and rank key Secret: read each once per pass, not once per pod.
        self._reads = {}
        pods = [p for n in self.nodes for p in self.kube.list("Pod", fields=f"spec.nodeName={n}")]
        dns = {}
        for p in pods:
            spec = p["spec"]
            if p["metadata"].get("deletionTimestamp") or (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue  # no longer an endpoint: a replacement of the same name must not resolve to it
            if spec.get("hostname") and spec.get("subdomain"):
                ip = self.ip_for(p)
                dns[(p["metadata"]["namespace"], f"{spec['hostname']}.{spec['subdomain']}")] = ip
        seen = set()
        for p in pods:
            uid = p["metadata"]["uid"]
            seen.add(uid)
            rp = self.pods.get(uid)
            if p["metadata"].get("deletionTimestamp"):
                self._delete(p, rp)
                continue
            phase = (p.get("status") or {}).get("phase")
            if rp is None:
                if phase in ("Succeeded", "Failed"):
                    continue
                rp = self._start(p, dns)
                if rp is None:
                    continue
            self._supervise(p, rp, dns)
        for uid in list(self.pods):
            if uid not in seen:  # the pod object is gone (force-deleted): stop its process
                self._kill(self.pods.pop(uid), grace=0)

    def _start(self, pod: dict, dns: dict) -> RunningPod | None:
        meta = pod["metadata"]
        uid = meta["uid"]
        rp = RunningPod(uid=uid, namespace=meta["namespace"], name=meta["name"], ip=self.ip_for(pod),
                        workdir=self.state / "pods" / f"{meta['namespace']}_{meta['name']}_{uid[:8]}")
        rp.workdir.mkdir(parents=True, exist_ok=True)
        self.pods[uid] = rp
        try:
            self._launch(pod, rp, dns)
        except RunnerRetry as e:
            self.pods.pop(uid, None)  # not started: the next sync tries again, as a kubelet would
            log.info("%s/%s: waiting: %s", rp.namespace, rp.name, e)
            return None
        except RunnerError as e:
            rp.finished = True
            self._status(pod, rp, phase="Failed", reason="RunnerError", message=str(e))
            log.warning("%s/%s: %s", rp.namespace, rp.name, e)
        return rp

    def _launch(self, pod: dict, rp: RunningPod, dns: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        c = spec["containers"][0]
        mounts = self._volumes(pod, rp)
        env = {"PATH": self.path_env, "HOME": str(rp.workdir), "HOSTNAME": spec.get("hostname") or meta["name"],
               "PYTHONUNBUFFERED": "1"}
        for k in ("LANG", "LC_ALL", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "MOE_CACHE"):
            if k in os.environ:
                env[k] = os.environ[k]
        for e in c.get("env") or []:
            if "value" in e:
                v = e["value"]
            elif "valueFrom" in e and "fieldRef" in e["valueFrom"]:
                v = self._field(pod, rp, e["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                raise RunnerError(f"env {e['name']}: only value and fieldRef are supported by the local runner")
            # $(VAR) expands from the variables defined before it, as in Kubernetes.
            v = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), v)
            env[e["name"]] = self._rewrite(v, meta["namespace"], mounts, dns)
        env.setdefault("POD_IP", rp.ip)
        if spec.get("automountServiceAccountToken", True):
            env["KUBECONFIG"] = str(self._service_account_kubeconfig(pod, rp))
        # $(VAR) in command and args expands from the container's env, as in Kubernetes.
        argv = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                       self._rewrite(a, meta["namespace"], mounts, dns))
                for a in (c.get("command") or []) + (c.get("args") or [])]
        if not argv:
            raise RunnerError("container has no command: the local runner cannot run images")
        exe = shutil.which(argv[0], path=self.path_env)
        if exe is None:
            raise RunnerError(f"command {argv[0]!r} not found on PATH")
        logf = open(rp.workdir / "container.log", "ab")
        rp.proc = subprocess.Popen([exe, *argv[1:]], env=env, cwd=rp.workdir, stdout=logf, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        rp.started_at = _now()
        rp.exit_code = None
        rp.ready = False
        self._reset_probes(c, rp)
        self._status(pod, rp, phase="Running")
        log.info("%s/%s: started %s on %s (pid %d)", rp.namespace, rp.name, argv[0], rp.ip, rp.proc.pid)

    def _service_account_kubeconfig(self, pod: dict, rp: RunningPod) -> Path:
        meta = pod["metadata"]
        named = pod["spec"].get("serviceAccountName")
        sa = named or "default"  # unset only because this cluster runs without ServiceAccount admission
        spec: dict = {"expirationSeconds": 86400}
        if named:  # bind the token to the pod, as the kubelet's projected token is
            spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}
        try:
            tr = self.kube.request("POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", body={
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        except KubeError as e:
            if e.status == 404:  # a new namespace's "default" ServiceAccount may not exist yet
                raise RunnerRetry(f"service account {sa} not found yet") from None
            raise RunnerError(f"service account {sa}: token request failed: {e}") from None
        cfg = self.kube.api.configuration
        ca = Path(cfg.ssl_ca_cert).read_text() if cfg.ssl_ca_cert else ""
        import base64

        path = rp.workdir / "serviceaccount.kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: pod\n"
            f"clusters: [{{name: local, cluster: {{server: '{cfg.host}', "
            f"certificate-authority-data: '{base64.b64encode(ca.encode()).decode()}'}}}}]\n"
            f"users: [{{name: {sa}, user: {{token: '{tr['status']['token']}'}}}}]\n"
            f"contexts: [{{name: pod, context: {{cluster: local, user: {sa}, namespace: {meta['namespace']}}}}}]\n")
        return path

    def _volumes(self, pod: dict, rp: RunningPod) -> dict[str, str]:
        """mountPath -> local directory, for the first container's mounts."""
        vols = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        out = {}
        for m in pod["spec"]["containers"][0].get("volumeMounts") or []:
            v = vols.get(m["name"])
            if v is None:
                raise RunnerError(f"volumeMount {m['name']} has no volume")
            if "hostPath" in v:
                out[m["mountPath"]] = v["hostPath"]["path"]
            elif "emptyDir" in v:
                d = rp.workdir / "volumes" / m["name"]
                d.mkdir(parents=True, exist_ok=True)
                out[m["mountPath"]] = str(d)
            elif "configMap" in v:
                d = rp.workdir / "volumes" / m["name"]
                d.mkdir(parents=True, exist_ok=True)
                rp.configmaps[v["configMap"]["name"]] = d
                self._sync_configmap(rp.namespace, v["configMap"]["name"], d)
                out[m["mountPath"]] = str(d)
            elif "secret" in v:
                d = rp.workdir / "volumes" / m["name"]
                d.mkdir(parents=True, exist_ok=True)
                rp.secrets[m["name"]] = (d, v["secret"])
                self._sync_secret(rp.namespace, v["secret"], d)
                out[m["mountPath"]] = str(d)
            else:
                raise RunnerError(f"volume {m['name']}: the local runner supports hostPath, emptyDir, configMap "
                                  f"and secret only")
        return out

    def _read(self, kind: str, namespace: str, name: str) -> dict | None:
        key = (kind, namespace, name)
        if key not in self._reads:
            self._reads[key] = self.kube.get(kind, name, namespace)
        return self._reads[key]

    def _sync_configmap(self, namespace: str, name: str, d: Path) -> None:
        cm = self._read("ConfigMap", namespace, name)
        if cm is None:
            raise RunnerError(f"configMap {name} not found")
        for k, v in (cm.get("data") or {}).items():
            _write_file(d / k, v.encode(), 0o644)

    def _sync_secret(self, namespace: str, vol: dict, d: Path) -> None:
        """The Secret's keys (or the volume's `items`) as files of decoded bytes; RunnerRetry while
        the Secret does not exist (the kubelet too waits for it), unless the volume is optional."""
        name = vol["secretName"]
        secret = self._read("Secret", namespace, name)
        if secret is None:
            if vol.get("optional"):
                return
            raise RunnerRetry(f"secret {name} not found")
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        mode = vol.get("defaultMode", 0o644)
        items = vol.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise RunnerError(f"secret {name} has no key {item['key']!r}")
            _write_file(d / item["path"], data[item["key"]], item.get("mode", mode))

    @staticmethod
    def _field(pod: dict, rp: RunningPod, path: str) -> str:
        table = {"spec.nodeName": pod["spec"].get("nodeName", ""), "status.podIP": rp.ip,
                 "metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
                 "status.hostIP": "127.0.0.1", "metadata.uid": pod["metadata"]["uid"]}
        if path not in table:
            raise RunnerError(f"fieldRef {path} is not supported by the local runner")
        return table[path]

    def _rewrite(self, v: str, namespace: str, mounts: dict[str, str], dns: dict) -> str:
        for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if v == mount or v.startswith(mount + "/"):
                return local + v[len(mount):]
        return self._resolve(v, namespace, dns)

    def _resolve(self, v: str, namespace: str, dns: dict) -> str:
        """A pod's DNS name (hostname.subdomain) as the address its pod has, or will have.

        Cluster DNS is asked at every connection; here the name is resolved once, when the process
        starts. So that a process started while the named pod is gone or not yet created (a router
        before its front rank, a rank while rank 0 is being replaced) reaches it once it is there,
        such a name resolves to the address the name's next pod will take (`ip_for`): the one its
        last pod had, or one reserved now when the subdomain is a headless Service here."""
        key = (namespace, v)
        if key in dns:
            return dns[key]
        if key in self.named_ips:
            return self.named_ips[key]
        m = _POD_DNS.fullmatch(v)
        if m is None:
            return v
        svc = self._read("Service", namespace, m.group(3))
        if svc is None or (svc.get("spec") or {}).get("clusterIP") != "None":
            return v
        self.named_ips[key] = self._new_ip()
        return self.named_ips[key]

    def _supervise(self, pod: dict, rp: RunningPod, dns: dict) -> None:
        """One look at a running container: its configMaps, its exit, a kill in progress, its probes."""
        if rp.finished or rp.proc is None:
            return
        for name, d in rp.configmaps.items():
            try:
                self._sync_configmap(rp.namespace, name, d)
            except RunnerError:
                pass
        for d, vol in rp.secrets.values():
            try:
                self._sync_secret(rp.namespace, vol, d)
            except (RunnerError, RunnerRetry):
                pass
        code = rp.proc.poll()
        if code is not None:
            self._exited(pod, rp, dns, code)
            return
        if rp.kill_at is not None:
            self._finish_kill(rp)
            return
        c = pod["spec"]["containers"][0]
        if not self._startup_passed(pod, rp, c) or not self._alive(pod, rp, c):
            return
        self._readiness(pod, rp, c)

    def _exited(self, pod: dict, rp: RunningPod, dns: dict, code: int) -> None:
        """The process ended: restart it per restartPolicy, else report the pod finished."""
        code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as a container runtime says
        rp.kill_at = None
        policy = pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            rp.restarts += 1
            log.info("%s/%s exited %d; restarting (%d)", rp.namespace, rp.name, code, rp.restarts)
            self._launch(pod, rp, dns)
            return
        rp.finished, rp.exit_code = True, code
        self._status(pod, rp, phase="Succeeded" if code == 0 else "Failed")
        log.info("%s/%s exited %d", rp.namespace, rp.name, code)

    @staticmethod
    def _reset_probes(c: dict, rp: RunningPod) -> None:
        """A container (re)started: every probe waits its initialDelaySeconds from now."""
        now = time.monotonic()
        delay = {k: float((c.get(k) or {}).get("initialDelaySeconds", 0))
                 for k in ("readinessProbe", "startupProbe", "livenessProbe")}
        rp.next_probe = now + delay["readinessProbe"]
        rp.startup = ProbeState(next_at=now + delay["startupProbe"])
        rp.liveness = ProbeState(next_at=now + delay["livenessProbe"])
        rp.kill_at = None

    def _startup_passed(self, pod: dict, rp: RunningPod, c: dict) -> bool:
        """Whether the startup probe has succeeded (at once when there is none); until it has,
        liveness and readiness wait, and failureThreshold failures in a row kill the container."""
        probe = HttpProbe.of(c.get("startupProbe"))
        if probe is None or rp.startup.passed:
            return True
        rp.startup.passed = self._run_probe(pod, rp, probe, rp.startup, "Startup") is True
        return rp.startup.passed

    def _alive(self, pod: dict, rp: RunningPod, c: dict) -> bool:
        """Run the liveness probe when due; False once it has failed failureThreshold times in a
        row and the container is being killed."""
        probe = HttpProbe.of(c.get("livenessProbe"))
        if probe is not None:
            self._run_probe(pod, rp, probe, rp.liveness, "Liveness")
        return rp.kill_at is None

    def _readiness(self, pod: dict, rp: RunningPod, c: dict) -> None:
        """Run the readiness probe every second and write the Ready condition when it changes,
        or when the pod as listed shows another (someone else wrote it)."""
        probe = (c.get("readinessProbe") or {}).get("httpGet")
        if time.monotonic() >= rp.next_probe:
            ready = self._probe(pod, rp, probe)[0] if probe else True
            rp.next_probe = time.monotonic() + 1.0
            if ready != rp.ready or not _shows(pod, "Running", "True" if ready else "False"):
                rp.ready = ready
                self._status(pod, rp, phase="Running")

    def _run_probe(self, pod: dict, rp: RunningPod, probe: HttpProbe, state: ProbeState, kind: str) -> bool | None:
        """Run a startup or liveness probe if it is due: None when it was not, else its result.
        Every failure is an Unhealthy Event; the failureThreshold-th in a row starts the kill."""
        now = time.monotonic()
        if now < state.next_at:
            return None
        ok, why = self._probe(pod, rp, {"path": probe.path, "port": probe.port}, probe.timeout_s)
        state.next_at = time.monotonic() + probe.period_s
        if ok:
            state.failures = 0
            return True
        state.failures += 1
        self._event(pod, "Warning", "Unhealthy", f"{kind} probe failed: {why}")
        log.warning("%s/%s: %s probe failed (%d/%d): %s", rp.namespace, rp.name, kind.lower(), state.failures,
                    probe.failure_threshold, why)
        if state.failures >= probe.failure_threshold:
            grace = probe.grace_s if probe.grace_s is not None else float(
                pod["spec"].get("terminationGracePeriodSeconds", 30))
            self._start_kill(pod, rp, f"failed {kind.lower()} probe", grace)
        return False

    def _start_kill(self, pod: dict, rp: RunningPod, why: str, grace: float) -> None:
        """SIGTERM now and SIGKILL after `grace` (`_finish_kill`); the exit is then reported like any other."""
        name = pod["spec"]["containers"][0]["name"]
        self._event(pod, "Normal", "Killing", f"Container {name} {why}, will be killed")
        log.warning("%s/%s: %s; killing it (grace %gs)", rp.namespace, rp.name, why, grace)
        rp.kill_at = time.monotonic() + max(grace, 0.0)
        try:
            os.killpg(rp.proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        except ProcessLookupError:
            pass

    @staticmethod
    def _finish_kill(rp: RunningPod) -> None:
        """SIGKILL a container whose grace period after a probe's SIGTERM has run out; a SIGSTOPped
        process never acts on SIGTERM, and SIGKILL ends it all the same."""
        if rp.kill_at is not None and time.monotonic() >= rp.kill_at:
            try:
                os.killpg(rp.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _event(self, pod: dict, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about the pod, from the local runner as the kubelet would post it."""
        meta = pod["metadata"]
        self.kube.event({"apiVersion": "v1", "kind": "Pod", "metadata": meta}, type_, reason, message,
                        component="moe-local-runner")

    def _probe(self, pod: dict, rp: RunningPod, probe: dict, timeout_s: float = 1.0) -> tuple[bool, str]:
        """One httpGet: (success, why it failed). 2xx and 3xx succeed, as with the kubelet."""
        port = probe.get("port")
        if isinstance(port, str):
            ports = {p.get("name"): p["containerPort"] for p in pod["spec"]["containers"][0].get("ports") or []}
            port = ports.get(port)
        if not port:
            return False, f"port {probe.get('port')!r} not found"
        url = f"http://{rp.ip}:{port}{probe.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                return 200 <= r.status < 400, f"HTTP probe failed with statuscode: {r.status}"
        except Exception as e:  # refused, timed out (a stopped process accepts but never answers), HTTP 4xx/5xx
            return False, f"Get \"{url}\": {e}"

    def _status(self, pod: dict, rp: RunningPod, phase: str, reason: str = "", message: str = "") -> None:
        now = _now()
        c = pod["spec"]["containers"][0]
        if phase == "Running":
            state = {"running": {"startedAt": rp.started_at or now}}
        elif rp.exit_code is not None:
            state = {"terminated": {"exitCode": rp.exit_code, "reason": "Completed" if rp.exit_code == 0 else "Error",
                                    "startedAt": rp.started_at or now, "finishedAt": now}}
        else:
            state = {"waiting": {"reason": reason or "RunnerError", "message": message}}
        ready = rp.ready and phase == "Running"
        st = "True" if ready else "False"
        status = {
            "phase": phase, "podIP": rp.ip, "podIPs": [{"ip": rp.ip}], "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}], "startTime": rp.started_at or now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": st, "lastTransitionTime": now},
                {"type": "Ready", "status": st, "lastTransitionTime": now},
            ],
            "containerStatuses": [{"name": c["name"], "image": c.get("image", ""), "imageID": "",
                                   "ready": ready, "restartCount": rp.restarts, "started": phase == "Running",
                                   "state": state}],
        }
        if reason:
            status["reason"], status["message"] = reason, message
        key = (phase, ready, rp.restarts, rp.exit_code)
        if rp.last_status.get("key") == key and _shows(pod, phase, st):
            return  # (written before, and nobody changed it since: the node controller marks the
            # pods of a node whose lease lapsed, say while the API server was down, not Ready)
        try:
            self.kube.request("PATCH", self.kube.path("Pod", rp.namespace, rp.name, "status"), body={"status": status},
                              content_type="application/merge-patch+json")
            rp.last_status["key"] = key
        except KubeError as e:
            log.warning("%s/%s status: %s", rp.namespace, rp.name, e)

    def _delete(self, pod: dict, rp: RunningPod | None) -> None:
        grace = int(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
        if rp is not None:
            self.pods.pop(rp.uid, None)
            self._kill(rp, grace=min(grace, 30))
        # The kubelet's last word: remove the object now that nothing runs.
        self.kube.delete("Pod", pod["metadata"]["name"], pod["metadata"]["namespace"], uid=pod["metadata"]["uid"],
                         grace_seconds=0)

    @staticmethod
    def _kill(rp: RunningPod, grace: int) -> None:
        p = rp.proc
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=max(grace, 0.1))
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)

    def run(self) -> None:
        last_beat = 0.0
        while not self.stop.is_set():
            try:
                if time.monotonic() - last_beat > 5:
                    self.refresh_nodes()
                    self.heartbeat()
                    last_beat = time.monotonic()
                self.sync()
            except KubeError as e:
                log.warning("sync: %s", e)
            self.stop.wait(self.poll_s)
        for rp in list(self.pods.values()):
            self._kill(rp, grace=5)


def _write_file(f: Path, data: bytes, mode: int) -> None:
    """Write a mounted file when its bytes changed: atomically, like the kubelet's symlink swap,
    with `mode` (a secret's files are read-only)."""
    if f.exists() and f.read_bytes() == data:
        return
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.parent / f".{f.name}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, f)


class RunnerError(RuntimeError):
    pass


class RunnerRetry(RuntimeError):
    """The pod cannot start yet (something it needs is still being created); try again later."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-local-runner", description="Run pods of runner nodes as local processes.")
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    ap.add_argument("--state", default=None, help="directory for pod work dirs and logs")
    ap.add_argument("--subnet", type=int, default=0, help="pod IPs are 127.SUBNET.x.y (0-63)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    state = Path(args.state or Path(args.kubeconfig).parent / "runner")
    state.mkdir(parents=True, exist_ok=True)
    runner = LocalRunner(Kube(kubeconfig=args.kubeconfig), state, subnet=args.subnet)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop.set())
    signal.signal(signal.SIGINT, lambda *_: runner.stop.set())
    runner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

