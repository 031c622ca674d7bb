"""`sparsetrain demo`: the main job on the embedded default corpus (the Python standard library sources).

Prepares the corpus (once), pre-trains the tiny model densely and with SSD and MST, side by side on the same
data, seed and schedule; then continues the dense model dense, with SAT, and upcycled to a Mixture-of-Experts for
the same steps; and writes a short report (markdown + loss curves) into the run folder. The settings are shrunk so every
method's phases happen inside a few hundred steps. CPU timings say nothing about GPU speed-ups: the report says so.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sparsetrain import config as config_mod
from sparsetrain.cli.analyze import analyze_run
from sparsetrain.cli.analyze import table as analysis_table
from sparsetrain.data.prepare import describe, prepare
from sparsetrain.data.tokens import TokenData
from sparsetrain.plots import Panel, plot_panels, read_metrics, run_series
from sparsetrain.training.loop import train

# Method sections pre-trained by the demo, each against the same dense baseline.
CONTENDERS: list[tuple[str, dict[str, Any]]] = [
    ("dense", {"name": "dense"}),
    ("ssd", {"name": "ssd", "experts": 8, "top_k": 2, "schedule": "fixed", "sparse_windows": [[0.3, 0.8]],
             "monitor_every": 25}),
    ("mst-weight", {"name": "mst", "granularity": "weight", "update_every": 20}),
    ("mst-neuron", {"name": "mst", "granularity": "neuron", "update_every": 20}),
]
# The continuation of the dense run (SAT's and upcycling's setting): dense again, with SAT, and upcycled.
CONTINUATIONS: list[tuple[str, dict[str, Any]]] = [
    ("dense-continued", {"name": "dense"}),
    ("sat", {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5}),
    ("upcycled", {"name": "upcycle", "experts": 4, "top_k": 2, "layers": "every-other"}),
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


def demo_config(data_dir: Path, steps: int, method: dict[str, Any], **train: Any) -> config_mod.RunConfig:
    raw = {
        "model": {"preset": "tiny"},
        "data": {"dir": str(data_dir)},
        "train": {"steps": steps, "batch_size": 16, "seq_len": 256, "lr": 2e-3, "warmup_steps": 20,
                  "eval_every": max(1, steps // 4), "eval_tokens": 32768, "checkpoint_every": steps,
                  "log_every": 10, "keep_checkpoints": 1, **train},
        "method": method,
    }
    return config_mod.from_dict(raw)


def table(summaries: dict[str, dict[str, Any]], baseline: str) -> list[str]:
    base = summaries[baseline]
    lines = ["| method | final val loss | vs dense | counted training FLOPs | vs dense | wall-clock s (CPU) |",
             "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['val_loss']:.4f} | {(s['val_loss'] - base['val_loss']) / base['val_loss']:+.2%} "
                     f"| {s['flops']:.3g} | {s['flops'] / base['flops']:.2f}x | {s['train_time']:.1f} |")
    return lines


def run_demo(out: Path, data_dir: Path, steps: int = 200, max_bytes: int = 8_000_000,
             continue_steps: int | None = None) -> Path:
    ensure_data(data_dir, max_bytes)
    if out.exists():
        print(f"demo: replacing the previous demo in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    continue_steps = continue_steps or max(1, steps // 2)
    runs, summaries = {}, {}
    for name, method in CONTENDERS:
        print(f"demo: pre-training tiny with {name} for {steps} steps")
        # The SSD run keeps four checkpoints: the activation study (`sparsetrain analyze`) reads them.
        study = {"checkpoint_every": max(1, steps // 4), "keep_checkpoints": 4} if name == "ssd" else {}
        summaries[name] = train(demo_config(data_dir, steps, method, **study), out / name)
        runs[name] = read_metrics(out / name)
    ssd_experts, ssd_top_k = dict(CONTENDERS)["ssd"]["experts"], dict(CONTENDERS)["ssd"]["top_k"]
    print("demo: the activation study of the SSD run (sparsetrain analyze)")
    study = analyze_run(out / "ssd", out / "ssd-analysis", experts=ssd_experts, top_k=ssd_top_k)
    cont_runs, cont = {}, {}
    for name, method in CONTINUATIONS:
        print(f"demo: continuing the dense run as {name} for {continue_steps} steps")
        cfg = demo_config(data_dir, continue_steps, method, init_from=str(out / "dense"), lr=1e-3, warmup_steps=5,
                          seed=1338)
        cont[name] = train(cfg, out / name)
        cont_runs[name] = read_metrics(out / name)
    plot_runs(runs, out / "loss.png")
    plot_runs(cont_runs, out / "continuation.png")
    meta = TokenData(data_dir).meta
    lines = [
        "# sparsetrain demo",
        "",
        f"Corpus: {meta.get('source')} ({meta['train_tokens']:,} training tokens, {meta['val_tokens']:,} validation "
        f"tokens, vocabulary {meta['vocab_size']}). Model: `tiny` preset, 16 x 256 tokens a step.",
        "",
        f"## Pre-training, {steps} steps",
        "",
        *table(summaries, "dense"),
        "",
        "![loss curves](loss.png)",
        "",
        f"## Continuing the dense model for {continue_steps} steps: dense, SAT (omission 0.5, ladder) and upcycled "
        "(4 experts, top-2, every other layer)",
        "",
        *table(cont, "dense-continued"),
        "",
        "![continuation](continuation.png)",
        "",
        f"## SSD's activation study (`sparsetrain analyze {out / 'ssd'}`)",
        "",
        f"The SSD run's checkpoints on a probe of {study['probe_tokens']:,} validation tokens, its FFNs split into "
        f"{ssd_experts} experts (top-{ssd_top_k}): activation sparsity, the adjusted Rand index (ARI) of consecutive "
        "clusterings, and the share of activation mass the best / the router's top-k experts hold (means over "
        "layers; per layer in ssd-analysis/).",
        "",
        *analysis_table(study),
        "",
        "![activation sparsity per layer](ssd-analysis/sparsity.png)",
        "![clustering stability per layer](ssd-analysis/stability.png)",
        "",
        "MST at weight granularity computes dense matrix products with masked weights: its FLOPs are counted as a",
        "sparse kernel would do them, and its wall-clock does not drop. The other methods compute smaller products.",
        "CPU timings do not predict GPU speed-ups: the methods pay off in large matrix products on the GPU.",
        "See BENCHMARKS.md for the GPU numbers.",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    print("\n".join(table(summaries, "dense") + [""] + table(cont, "dense-continued")))
    print(f"demo: report in {report}, loss curves in {out / 'loss.png'} and {out / 'continuation.png'}")
    return report
