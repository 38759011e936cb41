"""Shared fixtures: the real local control plane (session) and a fresh namespace per test."""

from __future__ import annotations

import os
import uuid

import pytest

from support import REPO, OperatorProcess, _node_ready, wait_for  # noqa: F401 (re-exported)


@pytest.fixture(scope="session")
def kubeconfig() -> str:
    """$KUBECONFIG when set; otherwise the local control plane, started for the session if needed."""
    if os.environ.get("KUBECONFIG"):
        yield os.environ["KUBECONFIG"]
        return
    from moe_operator.localdev import devcluster

    # The tests' own cluster, apart from the one `moe cluster up` / `make demo` leave running: an
    # operator installed there (the demo's watches every namespace) must never act on test objects.
    os.environ.setdefault("MOE_CLUSTER_DIR", str(devcluster.cache_dir() / "test-cluster"))
    existing = devcluster.load()
    started = not (existing and existing.healthy())
    c = devcluster.up(quiet=True)
    yield str(c.kubeconfig)
    if started and not os.environ.get("MOE_KEEP_CLUSTER"):
        devcluster.down(quiet=True)


@pytest.fixture(scope="session")
def api_client(kubeconfig):
    from kubernetes import config

    return config.new_client_from_config(config_file=kubeconfig)


@pytest.fixture(scope="session")
def core(api_client):
    from kubernetes import client

    return client.CoreV1Api(api_client)


@pytest.fixture
def namespace(core, request) -> str:
    """A fresh namespace for one test, deleted afterwards (garbage collection does the rest)."""
    from kubernetes import client

    name = f"t-{request.node.name[:30].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:6]}"
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture
def gpu_pool(kubeconfig, core, request):
    """Create KWOK GPU nodes labelled with a pool unique to this test; delete them afterwards.

    Usage: nodes = gpu_pool(nodes=4, gpus=8, racks=2) -> (pool label value, [node names]).
    """
    from kubernetes import client

    from moe_operator.localdev import devcluster

    created: list[str] = []

    def make(nodes: int, gpus: int = 8, racks: int = 1, zones: int = 1, **kw):
        pool = f"p{uuid.uuid4().hex[:8]}"
        manifests = devcluster.gpu_nodes(nodes, gpus=gpus, racks=racks, zones=zones, prefix=pool, pool=pool, **kw)
        devcluster.apply_nodes(manifests, kubeconfig)
        names = [m["metadata"]["name"] for m in manifests]
        created.extend(names)
        wait_for(lambda: all(_node_ready(core, n) for n in names), 60, f"nodes {names[0]}.. Ready")
        return pool, names

    yield make
    for n in created:
        try:
            core.delete_node(n)
        except client.ApiException as e:
            if e.status != 404:
                raise




@pytest.fixture(scope="session")
def kubectl(kubeconfig):
    """Run the kubectl built with the control plane (same version) against the test cluster."""
    import shutil
    import subprocess

    from moe_operator.localdev import devcluster

    binary = devcluster.testbin() / "kubectl"
    exe = str(binary) if binary.exists() else shutil.which("kubectl")

    def run(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run([exe, f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True,
                             input=input, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
        return out

    return run


@pytest.fixture(scope="session")
def crd_installed(kubectl):
    """The generated CRD, applied with server-side apply and Established."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / "moedeployment.yaml"))
    from moe_operator.localdev import devcluster

    wait_for(lambda: devcluster.crd_established(lambda *a: kubectl(*a).stdout, "moedeployments.serving.moe.dev"),
             60, "the CRD to be Established", interval=0.2)
    return True


@pytest.fixture
def operator(kubeconfig, namespace, crd_installed, tmp_path):
    """The operator, started for this test's namespace; its log is printed when the test fails."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    op = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", metrics_port=port).start()
    yield op
    op.stop()
    print("---- operator log (tail) ----\n" + op.logs())  # shown by pytest when the test fails
