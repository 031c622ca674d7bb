"""`sparsetrain demo`: the main job on the embedded default corpus (the Python standard library sources).

Prepares the corpus (once), trains the tiny model densely and with each method that runs on it, side by side
on the same data, seed and schedule, and writes a short report (markdown + loss curves) into the run folder.
CPU timings say nothing about GPU speed-ups: the report says so.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from . import config as config_mod
from .data import TokenData, describe, prepare
from .report import Panel, plot_panels, read_metrics, run_series
from .train import train

# Method sections trained by the demo, each against the same dense baseline.
CONTENDERS: list[tuple[str, dict[str, Any]]] = [
    ("dense", {"name": "dense"}),
    ("sat", {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5}),
]


def ensure_data(data_dir: Path, max_bytes: int) -> None:
    if (data_dir / "meta.json").is_file():
        print(f"data: using {data_dir} (delete it to prepare again)")
        return
    print(f"data: preparing the stdlib corpus into {data_dir} (first {max_bytes / 1e6:.0f} MB)")
    meta = prepare("stdlib", data_dir, vocab_size=4096, max_bytes=max_bytes, val_fraction=0.02)
    print(describe(meta))


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Training loss by step and validation loss by counted FLOPs, one line per method."""
    plot_panels([
        Panel("training loss", "step", "training loss", run_series(runs, "step", "loss")),
        Panel("validation loss vs FLOPs", "counted training TFLOPs", "validation loss",
              run_series(runs, "flops", "val_loss", 1e-12), marker="o"),
    ], path)


def run_demo(out: Path, data_dir: Path, steps: int = 300, max_bytes: int = 8_000_000) -> Path:
    ensure_data(data_dir, max_bytes)
    if out.exists():
        print(f"demo: replacing the previous demo in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    runs, summaries = {}, {}
    for name, method in CONTENDERS:
        raw = {
            "model": {"preset": "tiny"},
            "data": {"dir": str(data_dir)},
            "train": {"steps": steps, "batch_size": 16, "seq_len": 256, "lr": 2e-3, "warmup_steps": 20,
                      "eval_every": max(1, steps // 4), "eval_tokens": 32768, "checkpoint_every": steps,
                      "log_every": 10, "keep_checkpoints": 1},
            "method": method,
        }
        print(f"demo: training tiny with method {name} for {steps} steps")
        summaries[name] = train(config_mod.from_dict(raw), out / name)
        runs[name] = read_metrics(out / name)
    plot_runs(runs, out / "loss.png")
    meta = TokenData(data_dir).meta
    dense = summaries["dense"]
    lines = [
        "# sparsetrain demo",
        "",
        f"Corpus: {meta.get('source')} ({meta['train_tokens']:,} training tokens, {meta['val_tokens']:,} validation "
        f"tokens, vocabulary {meta['vocab_size']}). Model: `tiny` preset. {steps} steps of 16 x 256 tokens each.",
        "",
        "| method | final val loss | vs dense | counted training FLOPs | vs dense | wall-clock s (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['val_loss']:.4f} | {(s['val_loss'] - dense['val_loss']) / dense['val_loss']:+.2%} "
                     f"| {s['flops']:.3g} | {s['flops'] / dense['flops']:.2f}x | {s['train_time']:.1f} |")
    lines += [
        "",
        "![loss curves](loss.png)",
        "",
        "CPU timings do not predict GPU speed-ups: the methods pay off in large matrix products on the GPU.",
        "See BENCHMARKS.md for the GPU numbers.",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    print("\n".join(lines[4:4 + 2 + len(summaries)]))
    print(f"demo: report in {report}, loss curves in {out / 'loss.png'}")
    return report
