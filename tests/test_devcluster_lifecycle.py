"""`moe cluster up` / `down` on a private state directory: no process is left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.cluster


def test_up_twice_then_down_leaves_no_process(tmp_path):
    if os.environ.get("KUBECONFIG"):
        pytest.skip("using an external cluster")
    env = dict(os.environ, MOE_CLUSTER_DIR=str(tmp_path / "c"))

    def moe(*args):
        return subprocess.run([sys.executable, "-m", "moe_operator.cli", "cluster", *args], env=env,
                              capture_output=True, text=True, cwd=REPO, timeout=300)

    first = moe("up")
    assert first.returncode == 0, first.stderr
    pids = [int((tmp_path / "c" / f"{c}.pid").read_text())
            for c in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")]
    second = moe("up")
    assert second.returncode == 0 and "already running" in second.stderr
    assert second.stdout == first.stdout
    assert [int((tmp_path / "c" / f"{c}.pid").read_text())
            for c in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")] == pids
    down = moe("down")
    assert down.returncode == 0, down.stderr
    alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
             open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []
    assert not (tmp_path / "c").exists()
    assert moe("env").returncode == 1
