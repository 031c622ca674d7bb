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


def test_ssd_that_never_switches_says_so_with_the_numbers(make_config, tmp_path, capsys):
    """The README's adaptive SSD can end without a sparse step: the end of the run and summary.json say so, with
    the monitor's last numbers against the thresholds that kept it dense."""
    run = tmp_path / "ssd-dense"
    # top-1 of 4 experts never holds 99% of the activation mass: the pattern never counts as stable
    method = {"name": "ssd", "experts": 4, "top_k": 1, "monitor_every": 2, "dense_span": 2, "stable_mass": 0.99}
    summary = train(make_config(steps=12, eval_every=0, model={"activation": "relu2"}, method=method), run)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["ssd_switches"] == 0
    last = [r for r in rows if r.get("ssd_ari") is not None][-1]
    note = json.loads((run / "summary.json").read_text())["method_note"]
    assert note == summary["method_note"]
    assert note.startswith("SSD never switched to sparse (ssd_switches = 0 in 12 steps)")
    assert f"the last check (step {last['ssd_check_step']}) saw mean ARI {last['ssd_ari']:.3f} against " \
           f"method.stable_ari=0.9 and top-1 activation mass {last['ssd_router_mass']:.3f} against " \
           "method.stable_mass=0.99: not stable enough" in note
    assert f"note: {note}" in capsys.readouterr().out
    # A run that switched has nothing to add.
    switched = {"name": "ssd", "experts": 4, "top_k": 1, "schedule": "fixed", "sparse_windows": [[0.25, 0.5]],
                "monitor_every": 0}
    summary = train(make_config(steps=4, eval_every=0, model={"activation": "relu2"}, method=switched),
                    tmp_path / "ssd-switched")
    assert "method_note" not in summary
