"""`sparsetrain report`: merge the raw JSON of benchmark-suite parts into one markdown report and its plots.

The report's table holds every target of BENCHMARK.md's "Targets in force", the value measured for it, whether it
is met, and the command that produced it ("not measured" when that part's JSON is not among the inputs). Plots:
validation loss against wall-clock and against counted FLOPs for every trained contender, step speed-ups as bars,
and the sparsity schedules (SAT's omission rates, MST's sparsity) that the runs logged.

This module reads JSON and draws; it needs neither torch nor a GPU (the drawing itself is sparsetrain.plots).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sparsetrain.errors import UserError
from sparsetrain.frontier import IsoLoss, plot_frontier, plot_speedups
from sparsetrain.plots import Panel, markdown_table, plot_panels, run_series
from sparsetrain_bench.comparison import frontier_for, has_frontier, merge_split, merge_whole, self_contained

# Logged per-step values that are schedules worth drawing, with their axis labels. A method that logs another
# schedule adds its key here (the suite keeps these keys in each run's curve).
SCHEDULE_KEYS = {
    "sat_ffn_rate": "SAT FFN omission rate",
    "sat_head_rate": "SAT head omission rate",
    "mst_target": "MST target sparsity",
    "mst_sparsity": "MST realised sparsity",
    "mst_head_sparsity": "MST head-group sparsity",
    "ssd_flops_saved": "SSD share of FLOPs saved (> 0: sparse phase)",
}

# Table columns: (key, header, format spec).
CONTENDER_COLUMNS = [
    ("name", "contender", ""), ("steps", "steps", "d"), ("tokens", "tokens", ",d"), ("val_loss", "val loss", ".4f"),
    ("val_gap", "vs dense", "+.2%"), ("wallclock", "wall-clock s", ".1f"), ("train_time", "with compile s", ".1f"),
    ("speedup", "speed-up", ".2f"), ("flops", "FLOPs", ".3g"), ("flops_ratio", "FLOP reduction", ".2f"),
    ("mfu", "MFU (counted FLOPs)", ".1%"), ("iso_wallclock", "at equal quality (wall-clock)", ""),
    ("iso_flops", "at equal quality (FLOPs)", ""),
]
STEP_COLUMNS = [
    ("preset", "model", ""), ("method", "method", ""), ("batch_size", "batch", "d"), ("seq_len", "seq", "d"),
    ("step_s", "step s", ".4f"), ("tokens_per_s", "tokens/s", ",.0f"), ("speedup", "speed-up vs dense", ".2f"),
    ("stream_step_s", "streamed step s", ".4f"), ("stream_speedup", "streamed speed-up", ".2f"),
    ("select_ms", "select ms", ".1f"), ("fwd_bwd_ms", "fwd+bwd ms", ".1f"), ("optimizer_ms", "optimizer ms", ".1f"),
    ("flops_ratio", "FLOP reduction", ".2f"), ("mfu", "MFU (dense FLOPs)", ".1%"), ("memory_gb", "mem GB", ".1f"),
]

TWO_GPU_COLUMNS = [
    ("method", "method", ""), ("parallel", "parallel", ""), ("steps", "steps", "d"), ("batch_size", "batch", "d"),
    ("max_loss_gap", "largest loss gap", ".2%"), ("loss_match", "losses match", ""),
    ("tokens_per_s_1", "tokens/s 1 GPU", ",.0f"), ("tokens_per_s_2", "tokens/s 2 GPUs", ",.0f"),
    ("scaling", "scaling", ".2f"),
]

LINK_COLUMNS = [("size_mb", "all-reduce MB", "d"), ("ms", "ms", ".2f"), ("algbw_gb_s", "algorithm GB/s", ".1f"),
                ("busbw_gb_s", "bus GB/s", ".1f")]

MOE_INFERENCE_COLUMNS = [
    ("model", "trained as", ""), ("val_loss_dense", "val loss dense", ".4f"),
    ("val_loss_moe", "val loss as MoE", ".4f"), ("val_gap", "gap", "+.2%"),
    ("val_loss_moe_trained", "val loss as MoE, fitted routers", ".4f"), ("val_gap_trained", "gap, fitted routers", "+.2%"),
    ("ffn_ms_dense", "FFN ms dense", ".2f"), ("ffn_ms_moe", "FFN ms MoE", ".2f"), ("ffn_speedup", "FFN speed-up", ".2f"),
    ("prefill_ms_dense", "prefill ms dense", ".2f"), ("prefill_ms_moe", "prefill ms MoE", ".2f"),
    ("prefill_speedup", "prefill speed-up", ".2f"),
]

CORPUS_COLUMNS = [
    ("corpus", "corpus", ""), ("text_bytes", "text bytes", ",d"), ("train_tokens", "train tokens", ",d"),
    ("val_tokens", "held-out tokens", ",d"), ("val_fraction", "held-out fraction", ".3f"),
    ("vocab_size", "vocabulary", ",d"),
]


# ---------------------------------------------------------------------------------------------------------------
# targets


def _check_mfu(part: dict) -> tuple[str, bool | None]:
    need = {"gpt2-small": 0.45, "gpt2-medium": 0.50}
    rows = [r for r in part.get("rows", []) if r["method"] == "dense"]
    text = ", ".join(f"{r['preset']} " + (f"{r['mfu']:.1%}" if r.get("mfu") is not None else "no MFU (peak unknown)")
                     for r in rows)
    got = {r["preset"]: r.get("mfu") for r in rows}
    if set(need) - set(got) or any(got[p] is None for p in need):
        return text, None
    return text, all(got[p] >= v for p, v in need.items())


def _check_step_speedup(*methods: str, minimum: float) -> Callable[[dict], tuple[str, bool | None]]:
    """Each named method's step speed-up on each model; met when one method meets it on every model. Names after
    the first are variants a part may hold (e.g. `sat-eager-stash`)."""
    def check(part: dict) -> tuple[str, bool | None]:
        found = {m: rows for m in methods if (rows := [r for r in part.get("rows", []) if r["method"] == m])}
        if not found:
            return f"no {methods[0]} rows", None
        text = "; ".join((f"{m}: " if len(found) > 1 else "")
                         + ", ".join(f"{r['preset']} {r['speedup']:.2f}x" for r in rows) for m, rows in found.items())
        return text, any(all(r["speedup"] >= minimum for r in rows) for rows in found.values())
    return check


def _check_moe_inference(part: dict) -> tuple[str, bool | None]:
    r = part.get("moe_inference", {}).get("ssd")
    if r is None:
        return "no 'ssd' MoE inference result", None
    text = (f"FFN {r['ffn_speedup']:.2f}x, prefill {r['prefill_speedup']:.2f}x as top-{r['top_k']} of {r['experts']}, "
            f"val loss {r['val_gap']:+.2%} vs the same model dense")
    return text, r["ffn_speedup"] >= 2.0 and r["val_gap"] <= 0.02


def _check_two_gpus(part: dict) -> tuple[str, bool | None]:
    rows = part.get("scaling", [])
    if not rows:
        return "no runs", None
    text = ", ".join(f"{r['method']} {r['parallel']} " + ("failed" if r.get("error") else f"{r['scaling']:.2f}x"
                     + ("" if r["loss_match"] else " (losses differ)")) for r in rows)
    return text, all(not r.get("error") and r["scaling"] >= 1.8 and r["loss_match"] for r in rows)


# Issue 19's targets, speed-up at equal validation loss: (part, method, cost) -> minimum.
ISO_TARGETS = {("ssd-pretrain", "ssd", "wallclock"): 1.2, ("mst-pretrain", "mst-neuron", "wallclock"): 1.2,
               ("mst-pretrain", "mst-weight", "flops"): 3.0, ("sat-cpt", "sat", "wallclock"): 1.3,
               ("sat-cpt", "sat-sample", "wallclock"): 1.3, ("sat-sft", "sat", "wallclock"): 1.25,
               ("sat-sft", "sat-sample", "wallclock"): 1.25, ("upcycle", "upcycle", "wallclock"): 1.2,
               **{("hsa-attention", f"{p}-{t}", "wallclock"): m for p in ("local", "hybrid")
                  for t, m in ((4096, 1.2), (8192, 1.4))}}
COST_WORDS = {"wallclock": "wall-clock", "flops": "counted FLOPs"}


def _iso_text(r: dict) -> str:
    where = {"on": "on dense's frontier",
             "below": f"below dense's frontier (val loss {r['loss_gap']:+.2%} vs its smallest budget)",
             "beyond": f"beyond dense's frontier (val loss {r['loss_gap']:+.2%} vs its largest budget)"}[r["status"]]
    return f"{r['label']} {where}"


def _check_iso(*methods: str, cost: str, minimum: float) -> Callable[[dict], tuple[str, bool | None]]:
    """A method's speed-up at equal quality in `cost` (the other cost beside it); met when it is at least `minimum`,
    exactly or as a lower bound (an upper bound never meets a target). Names after the first are variants a part
    may hold (e.g. `sat-sample`): met when one of them meets it."""
    other = "flops" if cost == "wallclock" else "wallclock"

    def check(part: dict) -> tuple[str, bool | None]:
        found = [(m, iso) for m in methods if (iso := part.get("iso_loss", {}).get(m))]
        if not found:
            return f"no {methods[0]} iso-loss result", None
        text = "; ".join((f"{m}: " if len(found) > 1 else "") + f"{_iso_text(iso[cost])} in {COST_WORDS[cost]}; "
                         f"{iso[other]['label']} in {COST_WORDS[other]}" for m, iso in found)
        return text, any(iso[cost]["bound"] != "upper bound" and iso[cost]["speedup"] >= minimum for _, iso in found)
    return check


@dataclass(frozen=True)
class Target:
    what: str
    target: str
    part: str | None  # the suite part that measures it; None: measured elsewhere (see `elsewhere`)
    check: Callable[[dict], tuple[str, bool | None]] | None = None
    elsewhere: str = ""


# BENCHMARK.md, "Targets in force", in its order.
TARGETS = [
    Target("dense step, MFU at 124M / 350M", ">= 45% / >= 50%", "dense-step", _check_mfu),
    Target("SAT step at omission 0.5", ">= 1.6x", "sat-step",
           _check_step_speedup("sat", "sat-stash", "sat-eager-stash", "sat-compiled-stash", minimum=1.6)),
    Target("SAT continual pre-training (code -> English): speed-up at equal quality, wall-clock", ">= 1.3x",
           "sat-cpt", _check_iso("sat", "sat-sample", cost="wallclock", minimum=1.3)),
    Target("SAT fine-tuning (kernel-doc pairs): speed-up at equal quality, wall-clock", ">= 1.25x", "sat-sft",
           _check_iso("sat", "sat-sample", cost="wallclock", minimum=1.25)),
    Target("SSD sparse-phase step (E=16, top-4)", ">= 1.4x", "ssd-step", _check_step_speedup("ssd", minimum=1.4)),
    Target("SSD pre-training (relu2): speed-up at equal quality, wall-clock", ">= 1.2x", "ssd-pretrain",
           _check_iso("ssd", cost="wallclock", minimum=1.2)),
    Target("SSD model run as MoE, FFN speed at val loss within 2%", ">= 2x", "ssd-pretrain", _check_moe_inference),
    Target("MoE layer time vs equal-FLOP dense FFN, d >= 1024", "within 1.25x", None,
           elsewhere="by bench/moe_layer.py, see BENCHMARKS.md"),
    Target("Upcycled MoE vs dense continuation: speed-up at equal quality, wall-clock", ">= 1.2x", "upcycle",
           _check_iso("upcycle", cost="wallclock", minimum=1.2)),
    Target("MST weight level, pre-training: speed-up at equal quality, counted FLOPs", ">= 3x", "mst-pretrain",
           _check_iso("mst-weight", cost="flops", minimum=3.0)),
    Target("MST neuron level, pre-training: speed-up at equal quality, wall-clock", ">= 1.2x", "mst-pretrain",
           _check_iso("mst-neuron", cost="wallclock", minimum=1.2)),
    Target("MST hybrid sparse attention alone at sequence 4096: speed-up at equal quality, wall-clock", ">= 1.2x",
           "hsa-attention", _check_iso("local-4096", "hybrid-4096", cost="wallclock", minimum=1.2)),
    Target("MST hybrid sparse attention alone at sequence 8192: speed-up at equal quality, wall-clock", ">= 1.4x",
           "hsa-attention", _check_iso("local-8192", "hybrid-8192", cost="wallclock", minimum=1.4)),
    Target("Two GPUs (2 x H200, torchrun) vs one, every method", ">= 1.8x tokens/s", "two-gpu", _check_two_gpus),
]


def evaluate_targets(parts: dict[str, dict]) -> list[dict[str, str]]:
    """One row per target: what, target, measured, met, command."""
    rows = []
    for t in TARGETS:
        row = {"what": t.what, "target": t.target, "measured": "not measured", "met": "-", "command": "-"}
        part = parts.get(t.part) if t.part else None
        if t.part is None:
            row["measured"] = f"not measured ({t.elsewhere})"
        elif part is not None:
            row["command"] = f"`{part['command']}`"
            if part["status"] == "skipped":
                row["measured"] = f"not measured: {part['message']}"
            else:
                measured, met = t.check(part)
                row["measured"] = measured
                row["met"] = ("quick run, not a measurement" if part.get("quick")
                              else "-" if met is None else "yes" if met else "**no**")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# plots


def loss_panels(parts: dict[str, dict]) -> list[Panel]:
    """Per trained part: validation loss vs wall-clock (compilation excluded) and vs counted FLOPs."""
    panels = []
    for name, part in parts.items():
        runs = {c["name"]: c["curve"] for c in part.get("contenders", []) if c.get("role") != "base"}
        if not runs:
            continue
        corpus = next(c["corpus"] for c in part["contenders"] if c.get("role") != "base")
        ylabel = f"validation loss ({corpus})"
        panels.append(Panel(f"{name}: loss vs wall-clock", "wall-clock s (compilation excluded)", ylabel,
                            run_series(runs, "wallclock", "val_loss"), marker="o"))
        panels.append(Panel(f"{name}: loss vs FLOPs", "counted training TFLOPs", ylabel,
                            run_series(runs, "flops", "val_loss", 1e-12), marker="o"))
    return panels


def plot_steps(parts: dict[str, dict], path: Path) -> bool:
    """Bars: each method's step speed-up over dense, and every row's MFU when known. False if nothing to draw."""
    rows = [(name, r) for name, p in parts.items() for r in p.get("rows", [])]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    sped = [(f"{r['preset']}\n{r['method']}", r["speedup"]) for _, r in rows if r["method"] != "dense"]
    ax = axes[0]
    if sped:
        ax.bar([s[0] for s in sped], [s[1] for s in sped], color="tab:orange")
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set(title="step speed-up vs dense (same process)", ylabel="x dense")
    with_mfu = [(f"{r['preset']}\n{r['method']}", r["mfu"]) for _, r in rows if r.get("mfu") is not None]
    ax = axes[1]
    if with_mfu:
        ax.bar([m[0] for m in with_mfu], [100 * m[1] for m in with_mfu], color="tab:blue")
    else:
        ax.text(0.5, 0.5, "no MFU: no GPU peak known (CPU run)", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="MFU (dense FLOPs)", ylabel="%")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def schedule_panels(parts: dict[str, dict]) -> list[Panel]:
    """One panel per logged schedule key, a line per run that logged it, against the fraction of training."""
    panels = []
    for key, label in SCHEDULE_KEYS.items():
        series = []
        for pname, part in parts.items():
            for c in part.get("contenders", []):
                pts = [r for r in c.get("curve", []) if r.get(key) is not None]
                if pts:  # a record at step s holds the value of step s - 1 (0-based), in force from there
                    series.append((f"{pname}: {c['name']}", [(r["step"] - 1) / c["steps"] for r in pts],
                                   [r[key] for r in pts]))
        if series:
            panels.append(Panel(label, "fraction of training", label, series, drawstyle="steps-post"))
    return panels


# ---------------------------------------------------------------------------------------------------------------
# the report


def load_results(paths: list[Path]) -> dict[str, dict]:
    """Part name -> its JSON. Results of one part split over GPUs (`--contenders`) are merged into one comparison
    (`comparison.merge_split`); otherwise a later file of the same part replaces an earlier one."""
    parts, split = {}, {}
    for p in paths:
        p = Path(p)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"{p} does not exist; pass the PART.json files written by `sparsetrain bench --suite`")
        except ValueError as e:
            raise UserError(f"{p} is not JSON ({e}); pass the PART.json files written by `sparsetrain bench --suite`")
        if not isinstance(data, dict) or "part" not in data or "status" not in data:
            raise UserError(f"{p} is not a suite result (no 'part'/'status'); pass files written by "
                            "`sparsetrain bench --suite PART`")
        if data.get("selected"):
            split.setdefault(data["part"], []).append(data)
        parts[data["part"]] = data
    for part, results in split.items():
        if len(results) > 1 and all(self_contained(r) for r in results):
            parts[part] = merge_whole(results)
            continue
        if any(has_frontier(r) for r in results):
            if len(results) > 1:
                parts[part] = merge_split(results)
            continue
        # Methods alone: the frontier of another part that trained the same dense runs (the pre-training parts).
        donor = next((r for rs in split.values() for r in rs if has_frontier(r) and frontier_for(results[0], r)), None)
        parts[part] = merge_split(results, frontier_from=donor) if donor else results[-1]
    return parts


def link_lines(link: dict) -> list[str]:
    """The two-gpu part's view of the link between the GPUs: peer access, all-reduce bandwidth, the topology."""
    lines = []
    topo = link.get("topology", {})
    if topo.get("peer_access"):
        lines += ["Peer access between the GPUs: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                                              for k, v in topo["peer_access"].items()) + ".", ""]
    if link.get("all_reduce"):
        lines += ["All-reduce of float32 between the 2 processes (`sparsetrain_bench.interconnect`):", "",
                  markdown_table(link["all_reduce"], LINK_COLUMNS), ""]
    elif link.get("all_reduce_error"):
        lines += [f"The all-reduce timing failed: `{link['all_reduce_error'].strip().splitlines()[-1]}`", ""]
    if topo.get("nvidia_smi_topo"):
        lines += ["`nvidia-smi topo -m`:", "", "```", topo["nvidia_smi_topo"], "```", ""]
    return lines


def _env_line(part: dict) -> str:
    env = part.get("env", {})
    device = env.get("device", "CPU") if env.get("ran_on", "cuda") == "cuda" else "CPU"
    return f"{device}, torch {env.get('torch', '?')}, {env.get('date', '?')}"


def plot_iso(parts: dict[str, dict], out_dir: Path) -> list[tuple[str, str]]:
    """Per frontier of a part (one, or one per group such as hsa's sequence lengths): dense's frontier with its
    methods, against wall-clock and against counted FLOPs; then one bar chart of every speed-up at equal quality,
    with the targets marked."""
    figures, bars, targets = [], {}, {}
    seen: dict[str, int] = {}  # a method name in several parts (sat in sat-cpt and sat-sft) is labelled with its part
    for part in parts.values():
        for method in part.get("iso_loss") or {}:
            seen[method] = seen.get(method, 0) + 1
    for name, part in parts.items():
        if not part.get("iso_loss"):
            continue
        runs = {c["name"]: c for c in part["contenders"]}
        groups: dict[tuple[str, ...], list[dict]] = {}
        for c in part["contenders"]:
            if c.get("frontier"):
                groups.setdefault(tuple(c["frontier"]), []).append(c)
        for i, (frontier, methods) in enumerate(groups.items()):
            dense = [runs[n] for n in frontier]
            tag = f"{name}-{i + 1}" if len(groups) > 1 else name
            for cost in ("wallclock", "flops"):
                file = f"{tag}-frontier-{cost}.png"
                plot_frontier(dense, methods, cost, out_dir / file, f"{tag}: dense's frontier ({COST_WORDS[cost]})")
                figures.append((f"{tag}: speed-up at equal quality, {COST_WORDS[cost]}", file))
        for method, iso in part["iso_loss"].items():
            for cost in ("wallclock", "flops"):
                key = f"{method if seen[method] == 1 else f'{name}: {method}'}\n{COST_WORDS[cost]}"
                bars[key] = IsoLoss(**{k: v for k, v in iso[cost].items() if k != "label"})
                if (name, method, cost) in ISO_TARGETS:
                    targets[key] = ISO_TARGETS[(name, method, cost)]
    if plot_speedups(bars, targets, out_dir / "iso-loss.png"):
        figures.insert(0, ("speed-ups at equal quality, targets marked", "iso-loss.png"))
    return figures


def write_report(paths: list[Path], out_dir: Path) -> Path:
    """report.md (+ loss.png, steps.png, schedules.png when there is something to draw) in `out_dir`."""
    parts = load_results(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# sparsetrain benchmark report", "",
             "Protocol: BENCHMARK.md. Ratios are to the dense run of the same part, measured in the same process. "
             "Wall-clock is the training steps' time with compilation (first steps and recompilations) taken out; "
             "the time with it is in each part's table.", "",
             "## Targets in force", "",
             "| what | target | measured | met | command |", "|---|---|---|---|---|"]
    for r in evaluate_targets(parts):
        lines.append(f"| {r['what']} | {r['target']} | {r['measured']} | {r['met']} | {r['command']} |")
    lines.append("")

    trained = {n: p for n, p in parts.items() if p.get("contenders")}
    figures = []
    loss = loss_panels(trained)
    if loss:
        plot_panels(loss, out_dir / "loss.png")
        figures.append(("validation loss", "loss.png"))
    if plot_steps(parts, out_dir / "steps.png"):
        figures.append(("step speed-ups", "steps.png"))
    figures += plot_iso(parts, out_dir)
    sched = schedule_panels(trained)
    if sched:
        plot_panels(sched, out_dir / "schedules.png")
        figures.append(("sparsity schedules", "schedules.png"))
    if figures:
        lines += ["## Plots", ""] + [f"![{alt}]({f})" for alt, f in figures] + [""]

    lines += ["## Parts", ""]
    for name, part in parts.items():
        lines += [f"### {name}", "", f"`{part['command']}` ({_env_line(part)})", ""]
        if part["status"] == "skipped":
            lines += [f"Skipped: {part['message']}", ""]
            continue
        if part.get("quick"):
            lines += ["Quick run (tiny model, few steps): a smoke test, not a measurement.", ""]
        if part.get("contenders"):
            lines += [markdown_table(part["contenders"], CONTENDER_COLUMNS), ""]
        if part.get("iso_loss"):
            steps = {c["name"]: c["steps"] for c in part["contenders"]}
            frontier = {c["name"]: c["frontier"] for c in part["contenders"] if c.get("frontier")}
            lines += ["Speed-up at equal quality, each method against its dense frontier:", "",
                      *[f"- {m} (dense at " + ", ".join(f"{steps[d]}" for d in frontier[m]) + " steps): "
                        f"{_iso_text(iso['wallclock'])} in wall-clock; {_iso_text(iso['flops'])} in counted FLOPs"
                        for m, iso in part["iso_loss"].items()], ""]
        if part.get("rows"):
            lines += [markdown_table(part["rows"], STEP_COLUMNS), ""]
        if part.get("scaling"):
            lines += [markdown_table(part["scaling"], TWO_GPU_COLUMNS), ""]
            failed = [f"{r['method']} ({r['parallel']}) failed: `{r['error'].strip().splitlines()[-1]}`"
                      for r in part["scaling"] if r.get("error")]
            lines += [*failed, ""] if failed else []
            lines += link_lines(part.get("link", {}))
        if part.get("moe_inference"):
            rows = [{"model": name, **r} for name, r in part["moe_inference"].items()]
            k = rows[0]
            lines += [f"Each trained model run as an MoE (top-{k['top_k']} of {k['experts']} experts) against itself "
                      "dense:", "", markdown_table(rows, MOE_INFERENCE_COLUMNS), ""]
        if part.get("corpora"):
            corpora = dict(part["corpora"])
            sft = corpora.pop("sft", None)
            lines += [markdown_table([{"corpus": k, **v} for k, v in corpora.items()], CORPUS_COLUMNS), ""]
            if sft:  # rows of prompt + response, not a token stream: its own sentence
                lines += [f"sft: {sft['examples_file']['examples']:,} kernel-doc pairs in {sft['train']['sequences']:,} "
                          f"train and {sft['val']['sequences']:,} held-out rows ({sft['train']['loss_tokens']:,} / "
                          f"{sft['val']['loss_tokens']:,} response tokens).", ""]
        for note in part.get("notes", []):
            lines += [note, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
