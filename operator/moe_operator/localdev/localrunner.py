"""The local runner: a small kubelet for the local cluster's runner nodes, running containers as processes.

No container runtime exists where this project is built, so KWOK simulates most nodes. Nodes
labelled `moe.dev/local-runner=true` are left to this runner instead (KWOK is started with a label
selector that excludes them). For those nodes it does what a kubelet does, in the smallest form
that lets the operator's real pod specs run:

- keeps the Node Ready (status + a Lease in kube-node-lease);
- for every pod bound to one of its nodes, starts the first container's `command + args` as a
  local process with the pod's `env` (fieldRefs resolved), on its own loopback address
  127.0.0.N that becomes the pod IP;
- stands in for cluster DNS: an env value `POD.SUBDOMAIN` (pod hostname + headless Service, as in
  MASTER_ADDR) is replaced by that pod's address;
- mounts volumes as directories: configMap (written and kept in sync like the kubelet does),
  emptyDir (a fresh directory), hostPath (the path itself); mount paths in env values are
  rewritten to those directories;
- stands in for the projected service-account token: a pod that mounts its token gets a
  kubeconfig holding a TokenRequest token of its ServiceAccount in KUBECONFIG (Kubernetes clients
  fall back to it when the in-cluster files are absent), so it acts with its own RBAC;
- runs the readiness probe (httpGet) and writes the Ready condition;
- reports exit codes (phase Failed / Succeeded, containerStatuses) and restarts per restartPolicy;
- on deletion, SIGTERM then SIGKILL after the grace period, then removes the pod object.

Differences from a kubelet, on purpose: one container per pod, no images (the command must be
on PATH; the virtualenv's bin is put first), no resource limits, no user switch (securityContext
is not enforced), no PVCs.
"""

from __future__ import annotations

import argparse
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_micro() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    next_probe: float = 0.0
    configmaps: dict[str, Path] = field(default_factory=dict)  # configMap name -> directory
    exit_code: int | None = None
    finished: bool = False
    deleting_since: float | None = None
    last_status: dict = field(default_factory=dict)


class LocalRunner:
    def __init__(self, kube: Kube, state: Path, poll_s: float = 0.5, subnet: int = 0):
        self.kube = kube
        self.state = state
        self.poll_s = poll_s
        self.pods: dict[str, RunningPod] = {}  # uid -> pod
        self.ips: dict[str, str] = {}  # uid -> 127.0.0.N, allocated at first sight
        self.next_ip = 2
        # Pod IPs are 127.<subnet>.x.y: two local clusters (say the demo's and the tests') must never
        # hand out the same address. KWOK's fake IPs live in 127.64.0.0/10, above every subnet.
        self.subnet = subnet
        self.nodes: list[str] = []
        self.stop = threading.Event()
        self._configmaps: dict[tuple[str, str], dict | None] = {}  # this sync pass's reads
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
    def ip_for(self, uid: str) -> str:
        if uid not in self.ips:
            self.ips[uid] = f"127.{self.subnet}.{self.next_ip // 254}.{self.next_ip % 254 + 1}"
            self.next_ip += 1
        return self.ips[uid]

    def sync(self) -> None:
        # 16 ranks mount the same plan ConfigMap: read each ConfigMap once per pass, not once per pod.
        self._configmaps = {}
        pods = [p for n in self.nodes for p in self.kube.list("Pod", fields=f"spec.nodeName={n}")]
        dns = {}
        for p in pods:
            spec = p["spec"]
            if spec.get("hostname") and spec.get("subdomain"):
                ip = self.ip_for(p["metadata"]["uid"])
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
        rp = RunningPod(uid=uid, namespace=meta["namespace"], name=meta["name"], ip=self.ip_for(uid),
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
        probe = c.get("readinessProbe") or {}
        rp.next_probe = time.monotonic() + float(probe.get("initialDelaySeconds", 0))
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
            else:
                raise RunnerError(f"volume {m['name']}: the local runner supports hostPath, emptyDir and configMap only")
        return out

    def _sync_configmap(self, namespace: str, name: str, d: Path) -> None:
        key = (namespace, name)
        if key not in self._configmaps:
            self._configmaps[key] = self.kube.get("ConfigMap", name, namespace)
        cm = self._configmaps[key]
        if cm is None:
            raise RunnerError(f"configMap {name} not found")
        for k, v in (cm.get("data") or {}).items():
            f = d / k
            if not f.exists() or f.read_text() != v:
                tmp = d / f".{k}.tmp"
                tmp.write_text(v)
                os.replace(tmp, f)  # atomic, like the kubelet's symlink swap

    @staticmethod
    def _field(pod: dict, rp: RunningPod, path: str) -> str:
        table = {"spec.nodeName": pod["spec"].get("nodeName", ""), "status.podIP": rp.ip,
                 "metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
                 "status.hostIP": "127.0.0.1", "metadata.uid": pod["metadata"]["uid"]}
        if path not in table:
            raise RunnerError(f"fieldRef {path} is not supported by the local runner")
        return table[path]

    @staticmethod
    def _rewrite(v: str, namespace: str, mounts: dict[str, str], dns: dict) -> str:
        for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if v == mount or v.startswith(mount + "/"):
                v = local + v[len(mount):]
                break
        if (namespace, v) in dns:
            v = dns[(namespace, v)]
        return v

    def _supervise(self, pod: dict, rp: RunningPod, dns: dict) -> None:
        if rp.finished or rp.proc is None:
            return
        for name, d in rp.configmaps.items():
            try:
                self._sync_configmap(rp.namespace, name, d)
            except RunnerError:
                pass
        code = rp.proc.poll()
        if code is not None:
            policy = pod["spec"].get("restartPolicy", "Always")
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                rp.restarts += 1
                log.info("%s/%s exited %d; restarting (%d)", rp.namespace, rp.name, code, rp.restarts)
                self._launch(pod, rp, dns)
                return
            rp.finished, rp.exit_code = True, code
            self._status(pod, rp, phase="Succeeded" if code == 0 else "Failed")
            log.info("%s/%s exited %d", rp.namespace, rp.name, code)
            return
        probe = (pod["spec"]["containers"][0].get("readinessProbe") or {}).get("httpGet")
        if time.monotonic() >= rp.next_probe:
            ready = self._probe(pod, rp, probe) if probe else True
            rp.next_probe = time.monotonic() + 1.0
            if ready != rp.ready:
                rp.ready = ready
                self._status(pod, rp, phase="Running")

    def _probe(self, pod: dict, rp: RunningPod, probe: dict) -> bool:
        port = probe.get("port")
        if isinstance(port, str):
            ports = {p.get("name"): p["containerPort"] for p in pod["spec"]["containers"][0].get("ports") or []}
            port = ports.get(port)
        if not port:
            return False
        try:
            with urllib.request.urlopen(f"http://{rp.ip}:{port}{probe.get('path', '/')}", timeout=1) as r:
                return 200 <= r.status < 400
        except Exception:
            return False

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
        if rp.last_status.get("key") == key:
            return
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

