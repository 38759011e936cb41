"""``moe place``: files in, PLAN.json out, one clear line on stderr when it cannot plan."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe_operator.cli import place as place_cli
from moe_operator.placement import MoEShape, Plan, validate_plan
from moe_operator.placement.traces import Trace, generate_trace

SMALL_CONFIG = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 5,
    "first_k_dense_replace": 1,
    "n_routed_experts": 32,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 4,
}
SMALL = MoEShape.from_hf_config(SMALL_CONFIG)  # 4 MoE layers


def write_nodes(path: Path, nodes: int, gpus: int = 8, extra: list[dict[str, Any]] | None = None) -> Path:
    items = [
        {
            "metadata": {"name": f"gpu-{i}", "labels": {"moe.dev/nvlink-domain": f"nvl-{i // 2}"}},
            "spec": {},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
        }
        for i in range(nodes)
    ]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items + (extra or [])}))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    trace = tmp_path / "trace.npz"
    generate_trace(SMALL, 256, seed=0).save(trace)
    return {
        "nodes": write_nodes(tmp_path / "nodes.json", 5),
        "config": config,
        "trace": trace,
        "dir": tmp_path,
    }


def place(files: dict[str, Path], *extra: str, out: str = "plan.json") -> tuple[int, Path]:
    argv = ["--nodes", str(files["nodes"]), "--trace", str(files["trace"]), "--model", str(files["config"])]
    path = files["dir"] / out
    return place_cli.main([*argv, "--out", str(path), *extra]), path


def test_writes_a_valid_plan(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = place(files, "--redundant", "4")
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"ranks", "expert_map", "metrics"}
    assert [r["rank"] for r in doc["ranks"]] == list(range(36))
    assert doc["ranks"][0] == {"rank": 0, "node": "gpu-0", "gpu": 0}
    assert len(doc["expert_map"]) == 4 and all(len(layer) == 36 for layer in doc["expert_map"])
    assert all(len(cell) == 1 for layer in doc["expert_map"] for cell in layer)
    assert doc["metrics"]["redundant"] == 4
    validate_plan(Plan.from_json(doc), SMALL, 1)
    assert "wrote" in capsys.readouterr().out


def test_previous_plan_same_trace_moves_nothing(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, first = place(files, "--redundant", "4")
    assert rc == 0
    rc, second = place(files, "--redundant", "4", "--previous", str(first), out="plan2.json")
    assert rc == 0
    assert json.loads(second.read_text())["metrics"]["moved_experts"] == 0
    assert json.loads(second.read_text())["expert_map"] == json.loads(first.read_text())["expert_map"]
    assert "moved 0 experts" in capsys.readouterr().out


def test_default_model_is_deepseek_v3(tmp_path: Path) -> None:
    trace = tmp_path / "v3.npz"
    Trace(np.random.default_rng(0).integers(0, 256, (58, 16, 8)).astype(np.int32)).save(trace)
    nodes = write_nodes(tmp_path / "nodes.json", 36)
    rc = place_cli.main(
        ["--nodes", str(nodes), "--trace", str(trace), "--redundant", "32", "--out", str(tmp_path / "p.json")]
    )
    assert rc == 0
    plan = Plan.from_json((tmp_path / "p.json").read_text())
    assert plan.num_layers == 58 and plan.num_ranks == 288 and plan.shape == MoEShape.deepseek_v3()


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("moe place: error: ")
    return err


def test_too_few_gpus_is_one_clear_line(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    write_nodes(files["nodes"], 3)  # 24 GPUs for 32 experts
    rc, out = place(files)
    assert rc == 1 and not out.exists()
    err = one_error_line(capsys)
    assert "32 routed experts on 24 GPU slots" in err and "E > G" in err
    # Packing fixes it when allowed.
    rc, out = place(files, "--max-experts-per-gpu", "2")
    assert rc == 0
    assert max(len(cell) for cell in json.loads(out.read_text())["expert_map"][0]) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing-trace", "no such file"),
        ("junk-trace", "not a readable .npz"),
        ("wrong-layers", "trace has 3 layers but the model has 4 MoE layers"),
        ("bad-nodes-json", "node list"),
        ("bad-config", "must divide n_routed_experts"),
        ("bad-previous", "previous plan"),
        ("too-redundant", "use at most 8 redundant"),
        ("bad-toleration", "toleration"),
    ],
)
def test_input_errors(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], change: str, message: str
) -> None:
    extra: list[str] = []
    if change == "missing-trace":
        files["trace"].unlink()
    elif change == "junk-trace":
        files["trace"].write_bytes(b"junk")
    elif change == "wrong-layers":
        generate_trace(MoEShape(3, 32, 4, 2, 4), 16).save(files["trace"])
    elif change == "bad-nodes-json":
        files["nodes"].write_text("{not json")
    elif change == "bad-config":
        files["config"].write_text(json.dumps({**SMALL_CONFIG, "n_routed_experts": 30}))
    elif change == "bad-previous":
        (files["dir"] / "prev.json").write_text(json.dumps({"ranks": []}))
        extra = ["--previous", str(files["dir"] / "prev.json")]
    elif change == "too-redundant":
        extra = ["--redundant", "9"]
    elif change == "bad-toleration":
        extra = ["--tolerate", "key:Never"]
    rc, _ = place(files, *extra)
    assert rc == 1
    assert message in one_error_line(capsys)


def test_taints_pods_and_labels(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    tainted = {
        "metadata": {"name": "gpu-t"},
        "spec": {"taints": [{"key": "dedicated", "value": "moe", "effect": "NoSchedule"}]},
        "status": {"allocatable": {"nvidia.com/gpu": "8"}},
    }
    write_nodes(files["nodes"], 3, extra=[tainted])
    rc, _ = place(files)
    err = one_error_line(capsys)  # 24 usable GPUs for 32 experts, and the message says why
    assert rc == 1 and "E > G" in err and "gpu-t: taint dedicated=moe:NoSchedule not tolerated" in err
    rc, out = place(files, "--tolerate", "dedicated=moe:NoSchedule")
    assert rc == 0 and "gpu-t" in {r["node"] for r in json.loads(out.read_text())["ranks"]}
    pods = files["dir"] / "pods.json"
    pods.write_text(
        json.dumps(
            {
                "items": [
                    {
                        "spec": {
                            "nodeName": "gpu-0",
                            "containers": [{"resources": {"limits": {"nvidia.com/gpu": "8"}}}],
                        },
                        "status": {"phase": "Running"},
                    }
                ]
            }
        )
    )
    write_nodes(files["nodes"], 4, extra=[tainted])  # 40 GPUs, 8 of them taken by the pod
    rc, out = place(files, "--tolerate", "*", "--pods", str(pods))
    assert rc == 0 and "gpu-0" not in {r["node"] for r in json.loads(out.read_text())["ranks"]}


def test_add_parser_registers_place() -> None:
    parser = argparse.ArgumentParser(prog="moe")
    sub = parser.add_subparsers(dest="command", required=True)
    place_cli.add_parser(sub)
    args = parser.parse_args(
        ["place", "--nodes", "n.json", "--trace", "t.npz", "--redundant", "32", "--out", "p.json"]
    )
    assert args.func is place_cli.run
    assert (args.nodes, args.trace, args.redundant, args.out, args.model, args.previous) == (
        "n.json",
        "t.npz",
        32,
        "p.json",
        None,
        None,
    )
    assert args.max_experts_per_gpu == 1 and args.gpu_resource == "nvidia.com/gpu"


def test_runs_as_a_module(files: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(place_cli.__file__).resolve().parents[1])}
    argv = [
        sys.executable,
        "-m",
        "moe_operator.cli.place",
        "--nodes",
        str(files["nodes"]),
        "--trace",
        str(files["trace"]),
    ]
    ok = subprocess.run(
        [*argv, "--model", str(files["config"]), "--out", str(files["dir"] / "m.json")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*argv, "--out", str(files["dir"] / "v3.json")], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "moe place: error: trace has 4 layers but the model has 58 MoE layers"
    ]
