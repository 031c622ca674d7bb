"""`sparsetrain demo`: the main job on the embedded default corpus (the Python standard library sources).

Prepares the corpus (once), pre-trains the tiny model (squared ReLU, whose exact zeros SSD's sparse phase needs)
with SSD and MST, and densely at four budgets (0.5x-2x the methods' steps: one warmup-stable-decay trunk with a
decay branched off at each budget, `training.budgets`), all on the same data, seed and schedule family; reads each
method's speed-up at equal quality off dense's frontier (`sparsetrain.frontier`); then continues the dense model
dense, with SAT, and upcycled to a Mixture-of-Experts for the same steps; and writes a short report (markdown + loss
curves + the frontier) into the run folder. The settings are shrunk so every method's phases happen inside 100 steps
and the whole demo ends within 10 minutes on 2 busy CPU cores. CPU timings say nothing about GPU speed-ups: the
report says so.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from sparsetrain import config as config_mod
from sparsetrain.cli.analyze import analyze_run
from sparsetrain.cli.analyze import table as analysis_table
from sparsetrain.data.prepare import describe, prepare
from sparsetrain.data.tokens import TokenData
from sparsetrain.frontier import compare as iso_compare
from sparsetrain.frontier import plot_frontier
from sparsetrain.plots import Panel, plot_panels, read_metrics, run_series
from sparsetrain.training.budgets import branch_folder, budget_configs, with_wsd
from sparsetrain.training.loop import train

# ~100 of the ~690 files of the first 8 MB of the stdlib, chosen by a hash of their names (so drawn across the
# corpus), evaluated on windows spread over all of them: 0.02 gave 17 files, half of whose first tokens were two
# code-page tables. The demo trains on a fifth of the training tokens, so holding out 15% costs it nothing.
VAL_FRACTION = 0.15
# Squared ReLU, as the README's SSD example: SSD's premise is activations that are exactly zero (GELU's tiny model
# had 3.5% sparsity). Every run trains this model (the continuations continue the dense one), so all compare fairly.
MODEL = {"preset": "tiny", "activation": "relu2"}
SSD_WINDOW = (0.3, 0.8)  # SSD's sparse phase, as fractions of pre-training (shaded on the loss chart)
# Dense's budgets (multiples of the pre-training steps): the frontier the methods are read against.
BUDGETS = (0.5, 1.0, 1.5, 2.0)
DENSE_NAMES = {0.5: "dense-0.5x", 1.0: "dense", 1.5: "dense-1.5x", 2.0: "dense-2x"}
# Method sections pre-trained by the demo, each against the same dense baseline (dense: at every budget).
CONTENDERS: list[tuple[str, dict[str, Any]]] = [
    ("dense", {"name": "dense"}),
    ("ssd", {"name": "ssd", "experts": 8, "top_k": 2, "schedule": "fixed", "sparse_windows": [list(SSD_WINDOW)],
             "monitor_every": 20}),
    ("mst-weight", {"name": "mst", "granularity": "weight", "update_every": 10}),
    ("mst-neuron", {"name": "mst", "granularity": "neuron", "update_every": 10}),
]
# The continuation of the dense run (SAT's and upcycling's setting): dense again, with SAT, and upcycled.
CONTINUATIONS: list[tuple[str, dict[str, Any]]] = [
    ("dense-continued", {"name": "dense"}),
    ("sat", {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5}),
    ("upcycled", {"name": "upcycle", "experts": 4, "top_k": 2, "layers": "every-other"}),
]


def ensure_data(data_dir: Path, max_bytes: int) -> None:
    meta_file = data_dir / "meta.json"
    if meta_file.is_file():
        made_with = json.loads(meta_file.read_text()).get("val_fraction")
        if made_with != VAL_FRACTION:  # an older demo's corpus: the report counts its held-out files as they are
            print(f"data: {data_dir} holds out val_fraction {made_with} of its files, the demo prepares "
                  f"{VAL_FRACTION}; delete it to prepare it again")
        print(f"data: using {data_dir} (delete it to prepare again)")
        return
    print(f"data: preparing the stdlib corpus into {data_dir} (first {max_bytes / 1e6:.0f} MB)")
    meta = prepare("stdlib", data_dir, vocab_size=4096, max_bytes=max_bytes, val_fraction=VAL_FRACTION)
    print(describe(meta))


def sparse_spans(runs: dict[str, list[dict[str, Any]]], steps: int) -> list[tuple[float, float, str]]:
    """SSD's sparse window, in steps, when the SSD run took sparse steps (its metrics say so)."""
    if not any(r.get("ssd_phase") == "sparse" for r in runs.get("ssd", [])):
        return []
    return [(round(SSD_WINDOW[0] * steps), round(SSD_WINDOW[1] * steps), "SSD sparse phase")]


def final_points(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[float], list[float]]]:
    """(label, [TFLOPs], [validation loss]) of each run's last evaluation."""
    out = []
    for name, rows in runs.items():
        last = [r for r in rows if r.get("val_loss") is not None][-1:]
        out.append((name, [r["flops"] * 1e-12 for r in last], [r["val_loss"] for r in last]))
    return out


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: Path, steps: int, spans: bool = False) -> None:
    """Training loss by step (SSD's sparse phase shaded), and the final validation loss by counted FLOPs: points
    in the middle of one run's cosine schedule do not compare with the end of another's."""
    plot_panels([
        Panel("training loss", "step", "training loss", run_series(runs, "step", "loss"),
              spans=sparse_spans(runs, steps) if spans else []),
        Panel("final validation loss vs counted FLOPs", "counted training TFLOPs", "final validation loss",
              final_points(runs), marker="o", note="end of each run only: mid-schedule points are not comparable"),
    ], path)


def demo_config(data_dir: Path, steps: int, method: dict[str, Any], **train: Any) -> config_mod.RunConfig:
    raw = {
        "model": dict(MODEL),
        "data": {"dir": str(data_dir)},
        # 8 x 256 tokens a step, validation at half-way and at the end (the loss chart compares final points):
        # sized so the whole demo ends within 10 minutes on 2 busy cores.
        "train": {"steps": steps, "batch_size": 8, "seq_len": 256, "lr": 2e-3,
                  "warmup_steps": min(10, max(1, steps // 10)),
                  "eval_every": max(1, steps // 2), "eval_tokens": 16384, "checkpoint_every": steps,
                  "log_every": 5, "keep_checkpoints": 1, **train},
        "method": method,
    }
    return config_mod.from_dict(raw)


def timed_train(cfg: config_mod.RunConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    """train() with the process's CPU time over the whole call (evaluations and checkpoints included), which a
    busy machine disturbs far less than wall-clock."""
    cpu0 = time.process_time()
    summary = train(cfg, out, resume=resume)
    return {**summary, "cpu_time": time.process_time() - cpu0}


def pretrain_dense(data_dir: Path, out: Path, steps: int) -> dict[str, dict[str, Any]]:
    """Dense at every budget: the largest as the trunk, each other resumed from the trunk's checkpoint at its decay
    start (its time and FLOPs include the trunk's up to there; its CPU time is its own decay's)."""
    configs, starts = budget_configs(demo_config(data_dir, steps, {"name": "dense"}), BUDGETS)
    trunk = DENSE_NAMES[max(configs)]
    print(f"demo: pre-training dense for {configs[max(configs)].train.steps} steps, the trunk of its budgets")
    summaries = {trunk: timed_train(configs[max(configs)], out / trunk)}
    for f, cfg in configs.items():
        if f != max(configs):
            print(f"demo: dense at {cfg.train.steps} steps: the trunk's first {starts[f]}, then its own decay")
            branch_folder(out / trunk, out / DENSE_NAMES[f], starts[f])
            summaries[DENSE_NAMES[f]] = timed_train(cfg, out / DENSE_NAMES[f], resume=True)
    return {DENSE_NAMES[f]: summaries[DENSE_NAMES[f]] for f in configs}


def iso_runs(names: list[str], out: Path) -> list[dict[str, Any]]:
    """Runs as the frontier reads them: final validation loss, cost (the training steps' time; counted FLOPs) and
    the curve of evaluations."""
    runs = []
    for name in names:
        rows = [r | {"wallclock": r["train_time"]} for r in read_metrics(out / name) if r.get("val_loss") is not None]
        runs.append({"name": name, "val_loss": rows[-1]["val_loss"], "wallclock": rows[-1]["wallclock"],
                     "flops": rows[-1]["flops"], "curve": rows})
    return runs


def table(summaries: dict[str, dict[str, Any]], baseline: str, iso: dict[str, dict] | None = None) -> list[str]:
    """One row per run; with `iso` (name -> cost -> IsoLoss), each method's speed-up at equal quality too."""
    base = summaries[baseline]
    lines = ["| method | final validation loss | vs dense | counted training FLOPs | vs dense "
             "| training steps' wall-clock s | whole run's CPU s |"
             + (" at equal quality: time | FLOPs |" if iso else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if iso else "")]
    for name, s in summaries.items():
        row = (f"| {name} | {s['val_loss']:.4f} | {(s['val_loss'] - base['val_loss']) / base['val_loss']:+.2%} "
               f"| {s['flops']:.3g} | {s['flops'] / base['flops']:.2f}x | {s['train_time']:.1f} "
               f"| {s['cpu_time']:.1f} |")
        if iso:
            row += (f" {iso[name]['wallclock'].label()} | {iso[name]['flops'].label()} |" if name in iso
                    else " - | - |")
        lines.append(row)
    return lines


def notes(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """What a method said at the end of its run (for example: SSD never went sparse), as report lines."""
    return [f"- **{name}**: {s['method_note']}" for name, s in summaries.items() if s.get("method_note")]


def run_demo(out: Path, data_dir: Path, steps: int = 100, max_bytes: int = 8_000_000,
             continue_steps: int | None = None) -> Path:
    ensure_data(data_dir, max_bytes)
    if out.exists():
        print(f"demo: replacing the previous demo in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    continue_steps = continue_steps or max(1, steps // 2)
    summaries = pretrain_dense(data_dir, out, steps)
    for name, method in CONTENDERS[1:]:
        print(f"demo: pre-training tiny ({MODEL['activation']}) with {name} for {steps} steps")
        # The SSD run keeps four checkpoints: the activation study (`sparsetrain analyze`) reads them.
        study = {"checkpoint_every": max(1, steps // 4), "keep_checkpoints": 4} if name == "ssd" else {}
        summaries[name] = timed_train(with_wsd(demo_config(data_dir, steps, method, **study)), out / name)
    runs = {name: read_metrics(out / name) for name in summaries}
    dense_runs = iso_runs(list(DENSE_NAMES.values()), out)
    method_runs = iso_runs([name for name, _ in CONTENDERS[1:]], out)
    iso: dict[str, dict] = {}
    for cost in ("wallclock", "flops"):
        for name, result in iso_compare(dense_runs, method_runs, cost).items():
            iso.setdefault(name, {})[cost] = result
    plot_frontier(dense_runs, method_runs, "wallclock", out / "frontier.png",
                  "dense's frontier and the methods (CPU: not a GPU speed-up)",
                  xlabel="training steps' wall-clock s (CPU)")
    ssd_experts, ssd_top_k = dict(CONTENDERS)["ssd"]["experts"], dict(CONTENDERS)["ssd"]["top_k"]
    print("demo: the activation study of the SSD run (sparsetrain analyze)")
    study = analyze_run(out / "ssd", out / "ssd-analysis", experts=ssd_experts, top_k=ssd_top_k)
    cont_runs, cont = {}, {}
    for name, method in CONTINUATIONS:
        print(f"demo: continuing the dense run as {name} for {continue_steps} steps")
        cfg = demo_config(data_dir, continue_steps, method, init_from=str(out / "dense"), lr=1e-3, warmup_steps=5,
                          seed=1338)
        cont[name] = timed_train(cfg, out / name)
        cont_runs[name] = read_metrics(out / name)
    plot_runs(runs, out / "loss.png", steps, spans=True)
    plot_runs(cont_runs, out / "continuation.png", continue_steps)
    meta = TokenData(data_dir).meta
    said = notes({**summaries, **cont})
    lines = [
        "# sparsetrain demo",
        "",
        f"Corpus: {meta.get('source')} ({meta['train_tokens']:,} training tokens in {meta['train_docs']:,} files; "
        f"{meta['val_tokens']:,} validation tokens in {meta['val_docs']:,} whole files held out by a hash of their "
        f"names, evaluated on {demo_config(data_dir, steps, {}).train.eval_tokens:,} tokens in windows spread over "
        f"all of them; vocabulary {meta['vocab_size']}). Model: `tiny` preset with {MODEL['activation']}, 8 x 256 "
        "tokens a step.",
        "",
        "Timings: *training steps' wall-clock* is the time of the training steps alone (evaluations and "
        "checkpoints excluded) and moves with whatever else the machine runs; *whole run's CPU s* is the process's "
        "CPU time over the whole run (all threads, evaluations, checkpoints and method overheads such as SSD's "
        "clustering included), steadier under load. Neither says anything about GPU speed: the methods pay in large "
        "matrix products on a GPU (BENCHMARKS.md).",
        "",
        f"## Pre-training, {steps} steps (dense also at {', '.join(DENSE_NAMES[f] for f in BUDGETS if f != 1.0)})",
        "",
        "Every run follows the warmup-stable-decay schedule. Dense at 0.5x, 1x, 1.5x and 2x the steps is one 2x run "
        "with a decay branched off at each other budget; its runs make dense's frontier (validation loss against "
        "cost). A method's *speed-up at equal quality* is the cost dense needs, on that frontier (interpolated "
        "linearly in log cost), to reach the method's final validation loss, over the method's cost; `<=` marks a "
        "method worse than dense's smallest budget (an upper bound), `>=` one better than its largest (a lower "
        "bound). On the CPU the time column is a demonstration of the comparison, not a prediction of GPU speed.",
        "",
        *table(summaries, "dense", iso),
        "",
        "![dense's frontier and the methods](frontier.png)",
        "",
        f"![loss curves](loss.png)  \nThe shaded stretch is SSD's sparse phase (steps {round(SSD_WINDOW[0] * steps)}"
        f"-{round(SSD_WINDOW[1] * steps)}, {ssd_experts} experts, top-{ssd_top_k}). The right panel has one point "
        "per run, its final validation loss: a loss in the middle of one cosine schedule does not compare with the "
        "end of another.",
        "",
        f"## Continuing the dense model for {continue_steps} steps: dense, SAT (omission 0.5, ladder) and upcycled "
        "(4 experts, top-2, every other layer)",
        "",
        *table(cont, "dense-continued"),
        "",
        "![continuation](continuation.png)",
        "",
        *(["## What a method did not do", "", *said, ""] if said else []),
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
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    print("\n".join(table(summaries, "dense", iso) + [""] + table(cont, "dense-continued") + [""] + said))
    print(f"demo: report in {report}, loss curves in {out / 'loss.png'} and {out / 'continuation.png'}")
    return report
