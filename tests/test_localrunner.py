"""The local runner: pods on runner nodes run as real processes, with status like a kubelet's."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest

from support import wait_for

pytestmark = pytest.mark.cluster

SERVER = ("import http.server, os, functools\n"
          "h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.environ['DATA'])\n"
          "http.server.ThreadingHTTPServer((os.environ['POD_IP'], 8000), h).serve_forever()\n")


def pod(name: str, node: str, command: list[str], probe: bool = True, restart: str = "Never") -> dict:
    c = {"name": "main", "image": "local", "command": command,
         "env": [{"name": "DATA", "value": "/data"},
                 {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                 {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
         "ports": [{"name": "http", "containerPort": 8000}],
         "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    if probe:
        c["readinessProbe"] = {"httpGet": {"path": "/hello.txt", "port": "http"}, "periodSeconds": 1}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": node, "restartPolicy": restart, "containers": [c],
                     "volumes": [{"name": "data", "configMap": {"name": "data"}}]}}


def test_pod_runs_as_a_process_with_ip_probe_configmap_and_exit_status(core, namespace, gpu_pool):
    from kubernetes import client

    _, nodes = gpu_pool(nodes=1, gpus=8, local_runner=True)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "data"}, "data": {"hello.txt": "v1"}})
    core.create_namespaced_pod(namespace, pod("web", nodes[0], ["python3", "-c", SERVER]))

    def ready():
        p = core.read_namespaced_pod("web", namespace)
        conds = {c.type: c.status for c in p.status.conditions or []}
        return p if p.status.phase == "Running" and conds.get("Ready") == "True" else None

    p = wait_for(ready, 60, "web Ready")
    ip = p.status.pod_ip
    assert ip.startswith("127.") and ip != "127.0.0.1"
    assert urllib.request.urlopen(f"http://{ip}:8000/hello.txt", timeout=5).read() == b"v1"
    # configMap updates reach the mounted files, as the kubelet syncs them
    core.patch_namespaced_config_map("data", namespace, {"data": {"hello.txt": "v2"}})
    wait_for(lambda: urllib.request.urlopen(f"http://{ip}:8000/hello.txt", timeout=5).read() == b"v2", 30, "v2")

    # exit status is reported
    core.create_namespaced_pod(namespace, pod("fails", nodes[0], ["python3", "-c", "raise SystemExit(3)"], probe=False))

    def failed():
        p = core.read_namespaced_pod("fails", namespace)
        return p if p.status.phase == "Failed" else None

    p = wait_for(failed, 60, "fails Failed")
    assert p.status.container_statuses[0].state.terminated.exit_code == 3

    # deletion stops the process and removes the object
    core.delete_namespaced_pod("web", namespace, grace_period_seconds=2)

    def gone():
        try:
            core.read_namespaced_pod("web", namespace)
            return False
        except client.ApiException as e:
            return e.status == 404

    wait_for(gone, 30, "web deleted")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{ip}:8000/hello.txt", timeout=2)


def test_runner_nodes_stay_ready_without_kwok(core, gpu_pool):
    _, nodes = gpu_pool(nodes=2, gpus=8, local_runner=True)
    time.sleep(6)  # past a heartbeat period
    for n in nodes:
        node = core.read_node(n)
        assert node.status.node_info.kubelet_version == "moe-local-runner"
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


PID_SERVER = ("import http.server, os\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        body = str(os.getpid()).encode()\n"
              "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
              "        self.wfile.write(body)\n"
              "http.server.ThreadingHTTPServer((os.environ['POD_IP'], 8000), H).serve_forever()\n")


def test_a_hung_process_fails_its_liveness_probe_and_is_killed(core, namespace, gpu_pool):
    # SIGSTOP: the process keeps its socket (connections are accepted, never answered), so only
    # the probe's timeout tells; SIGTERM waits while it is stopped, SIGKILL after the grace ends it.
    _, nodes = gpu_pool(nodes=1, gpus=8, local_runner=True)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "data"}, "data": {}})
    p = pod("hung", nodes[0], ["python3", "-c", PID_SERVER])
    probe = {"httpGet": {"path": "/live", "port": "http"}, "periodSeconds": 1, "timeoutSeconds": 1}
    p["spec"]["containers"][0]["startupProbe"] = {**probe, "failureThreshold": 30}
    p["spec"]["containers"][0]["livenessProbe"] = {**probe, "failureThreshold": 2, "terminationGracePeriodSeconds": 2}
    core.create_namespaced_pod(namespace, p)

    def ready():
        p = core.read_namespaced_pod("hung", namespace)
        conds = {c.type: c.status for c in p.status.conditions or []}
        return p if conds.get("Ready") == "True" else None

    ip = wait_for(ready, 60, "hung Ready").status.pod_ip
    time.sleep(3)  # liveness probes pass meanwhile: no kill
    pid = int(urllib.request.urlopen(f"http://{ip}:8000/pid", timeout=5).read())
    assert core.read_namespaced_pod("hung", namespace).status.phase == "Running"
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()

    def failed():
        p = core.read_namespaced_pod("hung", namespace)
        return p if p.status.phase == "Failed" else None

    p = wait_for(failed, 60, "hung Failed")
    # two failed probes (1 s apart, 1 s timeout each) and the 2 s grace: a few seconds, not the pod's 30 s grace
    assert time.monotonic() - t0 < 20
    term = p.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (128 + signal.SIGKILL, "Error")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=hung").items
    reasons = [(e.reason, e.message) for e in events]
    assert any(r == "Unhealthy" and m.startswith("Liveness probe failed") for r, m in reasons), reasons
    assert [m for r, m in reasons if r == "Killing"] == ["Container main failed liveness probe, will be killed"]


ENV_SERVER = ("import http.server, os\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        body = os.environ['PEER'].encode()\n"
              "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
              "        self.wfile.write(body)\n"
              "http.server.ThreadingHTTPServer((os.environ['POD_IP'], 8000), H).serve_forever()\n")


def test_a_pod_name_resolves_to_the_live_pod_not_to_an_ended_one_of_the_same_name(core, namespace, gpu_pool):
    # A replacement rank (same hostname) and an old one that has failed, not yet deleted: a process
    # started now must get the live one's address for `hostname.subdomain`, as DNS would give it.
    _, nodes = gpu_pool(nodes=1, gpus=8, local_runner=True)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "data"}, "data": {}})

    def named(name: str, command: list[str], probe: bool) -> dict:
        p = pod(name, nodes[0], command, probe=probe)
        p["spec"].update({"hostname": "r0", "subdomain": "ranks"})
        return p

    def phase_of(name: str, want: str):
        return lambda: core.read_namespaced_pod(name, namespace) if core.read_namespaced_pod(
            name, namespace).status.phase == want else None

    # listed after the live one (by name), so without the check it would win the name
    core.create_namespaced_pod(namespace, named("z-old", ["python3", "-c", "raise SystemExit(1)"], probe=False))
    old_ip = wait_for(phase_of("z-old", "Failed"), 60, "z-old Failed").status.pod_ip
    core.create_namespaced_pod(namespace, named("a-new", ["python3", "-c", SERVER], probe=False))
    live_ip = wait_for(phase_of("a-new", "Running"), 60, "a-new Running").status.pod_ip
    # The new pod of that name takes the address (its process ended): processes given the address
    # at start, as MASTER_ADDR, reach the new pod (in a cluster, DNS would follow the name).
    assert live_ip == old_ip
    client = pod("client", nodes[0], ["python3", "-c", ENV_SERVER])
    client["spec"]["containers"][0]["env"].append({"name": "PEER", "value": "r0.ranks"})
    client["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = "/"
    core.create_namespaced_pod(namespace, client)

    def ready():
        p = core.read_namespaced_pod("client", namespace)
        return p if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []) else None

    ip = wait_for(ready, 60, "client Ready").status.pod_ip
    assert urllib.request.urlopen(f"http://{ip}:8000/", timeout=5).read().decode() == live_ip


def test_a_secret_volume_holds_the_decoded_bytes_read_only_and_the_pod_waits_for_its_secret(core, namespace, gpu_pool):
    import base64

    _, nodes = gpu_pool(nodes=1, gpus=8, local_runner=True)
    key = bytes(range(200, 232))  # not text: the file must hold these bytes, not their base64
    report = ("import http.server, os, stat\n"
              "p = os.environ['KEY_FILE']\n"
              "line = f\"{os.path.basename(p)} {oct(stat.S_IMODE(os.stat(p).st_mode))} {open(p, 'rb').read().hex()}\"\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers(); self.wfile.write(line.encode())\n"
              "http.server.HTTPServer((os.environ['POD_IP'], 8000), H).serve_forever()\n")
    spec = pod("keyed", nodes[0], ["python3", "-c", report], probe=False)
    c = spec["spec"]["containers"][0]
    c["env"].append({"name": "KEY_FILE", "value": "/etc/key/rank"})
    c["volumeMounts"] = [{"name": "key", "mountPath": "/etc/key", "readOnly": True}]
    spec["spec"]["volumes"] = [{"name": "key", "secret": {"secretName": "k", "defaultMode": 0o440,
                                                          "items": [{"key": "key", "path": "rank"}]}}]
    core.create_namespaced_pod(namespace, spec)
    time.sleep(3)  # the Secret does not exist yet: the pod waits for it, as with a kubelet
    assert core.read_namespaced_pod("keyed", namespace).status.phase == "Pending"
    core.create_namespaced_secret(namespace, {"metadata": {"name": "k"},
                                              "data": {"key": base64.b64encode(key).decode(), "other": "eA=="}})

    def answer():
        p = core.read_namespaced_pod("keyed", namespace)
        if p.status.phase != "Running" or not p.status.pod_ip:
            return None
        try:
            return urllib.request.urlopen(f"http://{p.status.pod_ip}:8000/", timeout=2).read().decode()
        except OSError:
            return None

    assert wait_for(answer, 60, "the pod's report") == f"rank 0o440 {key.hex()}"
