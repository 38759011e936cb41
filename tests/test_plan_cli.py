"""`moe plan`: tables, JSON, the EP sweep and its PNG, and one clear line for every bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from moe_operator import api, perfmodel
from moe_operator.cli import main as cli
from moe_operator.cli import plan as plan_cli
from support import REPO

EP288 = str(REPO / "manifests" / "deepseek-v3-ep288.yaml")
EP320 = str(REPO / "manifests" / "deepseek-v3-ep320.yaml")


def plan(capsys, *argv: str) -> tuple[int, str, str]:
    rc = plan_cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_table_shows_memory_bounds_throughput_and_latency(capsys):
    rc, out, err = plan(capsys, "-f", EP288)
    assert rc == 0 and err == ""
    assert out.startswith("deepseek-v3-ep288 on brief:")
    for text in ("Memory per GPU", "routed experts", "kv cache", "comm buffers", "admission: fits",
                 "Decode:", "Prefill:", "tok/s per GPU", "tok/s per node", "TPOT", "compute", "memory"):
        assert text in out, text
    p = perfmodel.plan(api.parse_deployment(yaml.safe_load(open(EP288))).spec, perfmodel.hardware("brief"))
    assert f"Decode: {p.decode.batch} sequences/GPU" in out
    assert f"TPOT {p.decode.estimate.time_per_output_token * 1e3:.2f} ms" in out


def test_json_matches_the_model(capsys):
    rc, out, _ = plan(capsys, "-f", EP320, "--hardware", "h800", "--json", "--context", "2048")
    assert rc == 0
    d = json.loads(out)
    spec = api.parse_deployment(yaml.safe_load(open(EP320))).spec
    p = perfmodel.plan(spec, perfmodel.hardware("h800"), context=2048)
    assert d["name"] == "deepseek-v3-ep320" and d["hardware"]["name"] == "h800" and d["fits"] is True
    assert d["decode"]["max_batch_per_gpu"] == p.decode.batch
    est = d["decode"]["estimate"]
    assert est["tokens_per_s_per_gpu"] == pytest.approx(p.decode.estimate.tokens_per_s_per_gpu)
    assert est["memory"]["total"] == pytest.approx(p.decode.estimate.memory.total)
    assert {lc["kind"] for lc in est["layers"]} == {"dense", "moe"}
    assert all(o["bound"] in ("compute", "memory", "nvlink", "network", "latency")
               for lc in est["layers"] for o in lc["ops"])
    assert d["prefill"]["phase"] == "prefill" and "input_tokens_per_s_per_node" in d["prefill"]
    api.Prediction.model_validate(d["prediction"])


def test_sweep_table_and_png_only_when_asked(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = plan(capsys, "-f", EP288, "--hardware", "h800", "--sweep-ep", "64,288")
    assert rc == 0 and "EP sweep" in out and "one-per-gpu" in out and "colocated" in out
    assert list(tmp_path.iterdir()) == []  # no PNG unless --plot
    png = tmp_path / "curve.png"
    rc, out, _ = plan(capsys, "-f", EP288, "--hardware", "h800", "--sweep-ep", "288,64,128", "--plot", str(png),
                      "--json")
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads(out)["sweep"]
    assert [r["gpus"] for r in sweep] == [64, 64, 128, 128, 288, 288]
    assert sum(r["layout"] == "one-per-gpu" and r["max_batch_per_gpu"] > 0 for r in sweep) == 1


def test_user_defined_hardware_file(capsys, tmp_path):
    prof = tmp_path / "h100-small.yaml"
    prof.write_text("base: h100\nmemory_gb: 40\n")
    rc, out, _ = plan(capsys, "-f", EP288, "--hardware", str(prof), "--json")
    d = json.loads(out)
    assert rc == 0 and d["hardware"]["name"] == "h100-small" and d["hardware"]["memory_gb"] == 40
    j = tmp_path / "gpu.json"
    j.write_text(json.dumps({"name": "mygpu", "memory_gb": 96, "memory_tbs": 4.0, "fp8_tflops": 1500,
                             "bf16_tflops": 750}))
    rc, out, _ = plan(capsys, "-f", EP288, "--hardware", str(j))
    assert rc == 0 and out.startswith("deepseek-v3-ep288 on mygpu:")


def test_does_not_fit_exits_non_zero(capsys, tmp_path):
    dep = yaml.safe_load(open(EP288))
    dep["spec"]["parallelism"] = {"expertParallelSize": 16, "maxExpertsPerGpu": 18, "redundantExperts": 32}
    dep["spec"]["loadBalancing"]["maxReplicasPerExpert"] = 4
    f = tmp_path / "ep16.yaml"
    f.write_text(yaml.safe_dump(dep))
    rc, out, _ = plan(capsys, "-f", str(f))
    assert rc == 3 and "admission: DOES NOT FIT" in out


def _bad(tmp_path, name: str, text: str) -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize("case", [
    "unknown-hardware", "missing-file", "bad-yaml", "not-a-mapping", "invalid-spec", "no-moedeployment",
    "bad-sweep", "bad-hardware-file", "missing-hardware-file", "plot-without-sweep", "no-file", "bad-cache-hit",
    "attention-tp-beyond-a-node", "attention-tp-not-dividing",
])
def test_errors_are_one_line_on_stderr(capsys, tmp_path, case):
    argv = {
        "unknown-hardware": ["-f", EP288, "--hardware", "b300"],
        "missing-file": ["-f", str(tmp_path / "nope.yaml")],
        "bad-yaml": ["-f", _bad(tmp_path, "a.yaml", "spec: [unclosed\n")],
        "not-a-mapping": ["-f", _bad(tmp_path, "b.yaml", "- 1\n- 2\n")],
        "invalid-spec": ["-f", _bad(tmp_path, "c.yaml", yaml.safe_dump({
            "apiVersion": "serving.moe.dev/v1alpha1", "kind": "MoEDeployment", "metadata": {"name": "x"},
            "spec": {"model": {"checkpoint": {"pvcName": "w"}}, "parallelism": {"expertParallelSize": 100}}}))],
        "no-moedeployment": ["-f", _bad(tmp_path, "d.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")],
        "bad-sweep": ["-f", EP288, "--sweep-ep", "16,x"],
        "bad-hardware-file": ["-f", EP288, "--hardware", _bad(tmp_path, "e.yaml", "base: h100\nhbm_gb: 3\n")],
        "missing-hardware-file": ["-f", EP288, "--hardware", str(tmp_path / "gpu.yaml")],
        "plot-without-sweep": ["-f", EP288, "--plot", str(tmp_path / "x.png")],
        "no-file": [],
        "bad-cache-hit": ["-f", EP288, "--cache-hit", "1.5"],
        "attention-tp-beyond-a-node": ["-f", _bad(tmp_path, "f.yaml", yaml.safe_dump(_with_tp(EP320, 16)))],
        "attention-tp-not-dividing": ["-f", EP320, "--attention-tp", "3"],
    }[case]
    rc, out, err = plan(capsys, *argv)
    assert rc == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe plan: "), err
    expect = {
        "unknown-hardware": "unknown hardware 'b300'", "missing-file": "no such deployment file",
        "bad-yaml": "not valid YAML", "not-a-mapping": "expected a MoEDeployment mapping",
        "invalid-spec": "spec.parallelism.expertParallelSize", "no-moedeployment": "no MoEDeployment",
        "bad-sweep": "--sweep-ep", "bad-hardware-file": "unknown hardware field(s) hbm_gb",
        "missing-hardware-file": "no such hardware profile file", "plot-without-sweep": "--plot needs --sweep-ep",
        "no-file": "-f DEPLOYMENT.yaml is required", "bad-cache-hit": "--cache-hit",
        "attention-tp-beyond-a-node": "spec.parallelism.attentionTensorParallel: parallelism.attentionTensorParallel "
                                      "must divide placement.gpusPerNode (a TP group's ranks share one node, and its "
                                      "NVLink) (8 GPUs per node, attentionTensorParallel 16)",
        "attention-tp-not-dividing": "--attention-tp 3: attentionTensorParallel must divide expertParallelSize",
    }[case]
    assert expect in lines[0], lines[0]


def _with_tp(path: str, tp: int) -> dict:
    dep = yaml.safe_load(open(path))
    dep["spec"]["parallelism"]["attentionTensorParallel"] = tp
    return dep


def test_attention_tp_in_the_manifest_or_the_flag_is_the_same_plan(capsys, tmp_path):
    """DeepSeek's decode layout (EP320, attention TP4 x DP80), set in the manifest or with
    --attention-tp 4 on the DP manifest: one plan, with the TP collective and 4x the KV cache per
    sequence of DP attention."""
    rc, flag, err = plan(capsys, "-f", EP320, "--hardware", "h800", "--json", "--attention-tp", "4")
    assert rc == 0 and err == ""
    tp4_manifest = _bad(tmp_path, "tp4.yaml", yaml.safe_dump(_with_tp(EP320, 4)))
    rc, manifest, err = plan(capsys, "-f", tp4_manifest, "--hardware", "h800", "--json")
    assert rc == 0 and err == ""
    d = json.loads(flag)
    assert d == json.loads(manifest) and "what_if" not in d
    spec = api.parse_deployment(yaml.safe_load(open(EP320))).spec
    dp = perfmodel.plan(spec, perfmodel.hardware("h800"))
    tp4 = perfmodel.plan(perfmodel.with_attention_tp(spec, 4), perfmodel.hardware("h800"))
    assert d["decode"]["max_batch_per_gpu"] == tp4.decode.batch < dp.decode.batch  # 4x the KV cache per sequence
    assert any(o["name"] == "attention_tp_comm" for lc in d["decode"]["estimate"]["layers"] for o in lc["ops"])
    rc, out, _ = plan(capsys, "-f", tp4_manifest, "--hardware", "h800")
    assert rc == 0 and "attention TP4 x DP80" in out and "what-if" not in out


def test_registered_as_moe_plan(capsys):
    rc = cli.main(["plan", "-f", EP288, "--hardware", "h200", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["hardware"]["name"] == "h200"


def test_calibration_table(capsys):
    rc, out, _ = plan(capsys, "--calibration")
    assert rc == 0 and out.startswith("| Case |")
    assert "`decode-ep144`" in out and "14,800 out" in out and "73,700 in" in out
