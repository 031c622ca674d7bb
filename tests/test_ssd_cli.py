"""SSD from the command line: train with switching, analyze, moefy/densify, eval as MoE, generate."""
import json

import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.training.build import load_model
from sparsetrain.training.loop import train


def test_ssd_run_then_analyze_moefy_eval_generate(make_config, tmp_path, capsys):
    run = tmp_path / "ssd"
    method = {"name": "ssd", "experts": 4, "top_k": 2, "schedule": "fixed", "sparse_windows": [[0.25, 0.75]],
              "monitor_every": 4}
    train(make_config(steps=12, checkpoint_every=6, keep_checkpoints=2, model={"activation": "relu2"},
                      method=method), run)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    phases = [r.get("ssd_phase") for r in rows]
    assert "sparse" in phases and phases[-1] == "dense"
    per_token = [b["flops"] - a["flops"] for a, b in zip(rows, rows[1:])]
    assert min(per_token) < max(per_token)  # sparse steps count fewer FLOPs

    assert main(["analyze", str(run), "--experts", "4", "--top-k", "2", "--probe-tokens", "256"]) == 0
    assert (run / "analysis" / "analysis.json").is_file() and (run / "analysis" / "sparsity.png").is_file()

    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"]
    assert main(["eval", str(run), "--moe", "4", "--experts", "4"]) == 0  # every expert active = dense
    all_experts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"]
    assert all_experts == pytest.approx(dense, abs=1e-4)
    assert main(["eval", str(run), "--moe", "1", "--experts", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"] > dense - 1e-4

    moe_dir, back = tmp_path / "moe", tmp_path / "back"
    assert main(["convert", "moefy", "--from", str(run), "--experts", "4", "--out", str(moe_dir)]) == 0
    assert main(["convert", "densify", "--from", str(moe_dir), "--out", str(back)]) == 0
    a, _, _ = load_model(run)
    b, _, _ = load_model(back)
    x = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)

    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "5", "--moe", "2",
                 "--experts", "4"]) == 0
    out = capsys.readouterr().out
    assert "--- dense" in out and "--- moe" in out
