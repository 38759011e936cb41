"""Project layout guarantees that are easy to break and hard to notice."""

import subprocess
import sys

from support import REPO


def test_import_operator_is_still_the_stdlib_module():
    # operator/ is a folder, not a package; the stdlib's `operator` must win.
    out = subprocess.run([sys.executable, "-c", "import operator, moe_operator; print(operator.__file__); "
                          "print(operator.itemgetter(1)([0, 7]))"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    path, value = out.stdout.split()
    assert "moe_operator" not in path and path.endswith("operator.py"), path
    assert value == "7"


def test_crd_is_generated_from_the_models():
    out = subprocess.run([sys.executable, "-m", "moe_operator.cli", "crd"], capture_output=True, text=True,
                         check=True, cwd=REPO)
    committed = (REPO / "crds" / "moedeployment.yaml").read_text()
    assert out.stdout == committed, "crds/moedeployment.yaml is stale: run `make crd`"


def test_chart_crd_copies_match():
    committed = (REPO / "crds" / "moedeployment.yaml").read_text()
    for copy in ("moe-operator/crds/moedeployment.yaml", "moe-operator-crds/files/moedeployment.yaml"):
        assert (REPO / "charts" / copy).read_text() == committed, f"charts/{copy} differs from crds/: copy it"


def test_model_code_never_imports_torch_distributed():
    # The parallel layers own the collectives (style.md); attention, expert and block code stay local.
    import ast

    for name in ("model.py", "fp8.py"):
        path = REPO / "worker" / "moe_worker" / name
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(m == "torch.distributed" or m.startswith("torch.distributed.") for m in mods), (name, mods)
            if isinstance(node, ast.Attribute) and node.attr == "distributed":
                assert not (isinstance(node.value, ast.Name) and node.value.id in ("torch", "dist")), name
