"""The README's main job, shrunk: every method runs and the report renders."""
import json

from sparsetrain.cli.demo import CONTENDERS, CONTINUATIONS, run_demo
from sparsetrain.data.prepare import prepare


def test_demo_runs_every_method_and_writes_report(tmp_path):
    data = tmp_path / "data"  # the demo's windows are 256 tokens: a larger held-out share than the shared fixture
    prepare("stdlib", data, vocab_size=512, max_bytes=300_000, val_fraction=0.3, progress=False)
    out = tmp_path / "demo"
    report = run_demo(out, data_dir=data, steps=8, continue_steps=4)
    text = report.read_text()
    for name, _ in CONTENDERS + CONTINUATIONS:
        assert f"| {name} |" in text
        assert (out / name / "metrics.jsonl").is_file()
    assert {m["name"] for _, m in CONTENDERS + CONTINUATIONS} == {"dense", "sat", "ssd", "mst", "upcycle"}
    assert (out / "loss.png").stat().st_size > 10_000 and (out / "continuation.png").stat().st_size > 10_000
    # Every run trains squared ReLU (SSD's exact zeros); the timings say what they are; SSD's window is shaded
    for name, _ in CONTENDERS + CONTINUATIONS:
        assert 'activation = "relu2"' in (out / name / "config.toml").read_text()
    assert "| training steps' wall-clock s | whole run's CPU s |" in text
    assert "SSD's sparse phase (steps 2-6" in text and "final validation loss" in text
    rows = [json.loads(line) for line in (out / "ssd" / "metrics.jsonl").read_text().splitlines()]
    assert "sparse" in [r["ssd_phase"] for r in rows]
    # SSD's activation study over the SSD run's four checkpoints (steps 2, 4, 6, 8), rendered in the report
    study = json.loads((out / "ssd-analysis" / "analysis.json").read_text())
    assert study["steps"] == [2, 4, 6, 8] and study["experts"] == 8 and study["top_k"] == 2
    for step in study["steps"]:
        assert f"| {step} | " in text
    for png in ("sparsity.png", "stability.png"):
        assert (out / "ssd-analysis" / png).stat().st_size > 10_000
        assert f"(ssd-analysis/{png})" in text
