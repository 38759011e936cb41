"""moe-worker make-checkpoint and logits, through main(argv)."""

from __future__ import annotations

import json

import numpy as np
import torch

from moe_worker.checkpoint import load_model
from moe_worker.cli import main


def test_make_checkpoint_then_logits(tiny_config, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config))
    ckpt = tmp_path / "ckpt"
    assert main(["make-checkpoint", "--config", str(cfg), "--out", str(ckpt), "--dtype", "fp8", "--seed", "3"]) == 0
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    out = tmp_path / "logits.npy"
    assert main(["logits", "--checkpoint", str(ckpt), "--input-ids", "1,2,3,250", "--out", str(out)]) == 0
    logits = np.load(out, allow_pickle=False)
    assert logits.dtype == np.float32 and logits.shape == (4, 256)
    direct = load_model(ckpt, dtype=torch.float32)(torch.tensor([[1, 2, 3, 250]]))[0]
    assert np.array_equal(logits, direct.numpy())
    assert "wrote logits (4, 256) float32" in capsys.readouterr().out

    again = tmp_path / "again.npy"  # same seed, same checkpoint, same logits
    ckpt2 = tmp_path / "ckpt2"
    main(["make-checkpoint", "--config", str(cfg), "--out", str(ckpt2), "--dtype", "fp8", "--seed", "3"])
    main(["logits", "--checkpoint", str(ckpt2), "--input-ids", "1,2,3,250", "--out", str(again)])
    assert np.array_equal(np.load(again), logits)


def test_bf16_checkpoint_and_options(tiny_config, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config))
    ckpt = tmp_path / "ckpt"
    assert main(["make-checkpoint", "--config", str(cfg), "--out", str(ckpt), "--dtype", "bf16"]) == 0
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["logits", "--checkpoint", str(ckpt), "--input-ids", "7,8", "--out", str(a), "--attn", "naive"]) == 0
    assert main(["logits", "--checkpoint", str(ckpt), "--input-ids", "7,8", "--out", str(b), "--dtype", "bf16"]) == 0
    assert np.abs(np.load(a) - np.load(b)).max() < 0.05 * np.abs(np.load(a)).max()


def test_errors_are_reported_not_raised(tiny_config, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**tiny_config, "n_group": 3}))
    assert main(["make-checkpoint", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 1
    assert "field 'n_group': n_group (3) must divide n_routed_experts (16)" in capsys.readouterr().err
    assert main(["logits", "--checkpoint", str(tmp_path / "nothing"), "--input-ids", "1", "--out", "o.npy"]) == 1
    assert "not a checkpoint directory" in capsys.readouterr().err

    cfg.write_text(json.dumps(tiny_config))
    ckpt = tmp_path / "ok"
    main(["make-checkpoint", "--config", str(cfg), "--out", str(ckpt), "--dtype", "bf16"])
    assert main(["logits", "--checkpoint", str(ckpt), "--input-ids", "1,256", "--out", str(tmp_path / "o.npy")]) == 2
    assert "outside the vocabulary 0..255" in capsys.readouterr().err
    assert main(["logits", "--checkpoint", str(ckpt), "--input-ids", "1", "--out", "o.npy", "--world-size", "0"]) == 2
    assert "--world-size must be >= 1" in capsys.readouterr().err


def test_device_option(tiny_config, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config))
    ckpt = tmp_path / "ckpt"
    main(["make-checkpoint", "--config", str(cfg), "--out", str(ckpt), "--dtype", "bf16"])
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["logits", "--checkpoint", str(ckpt), "--input-ids", "7,8", "--out", str(a)]) == 0
    assert main(["logits", "--checkpoint", str(ckpt), "--input-ids", "7,8", "--out", str(b), "--device", "auto"]) == 0
    if not torch.cuda.is_available():  # auto is the CPU here: the same numbers
        assert np.array_equal(np.load(a), np.load(b))
        assert main(["logits", "--checkpoint", str(ckpt), "--input-ids", "7", "--out", str(b), "--device", "cuda"]) == 2
        assert "device 'cuda': no CUDA device is visible" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt-ids", "7", "--device", "tpu:0"]) == 2
    assert "expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
