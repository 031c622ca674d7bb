"""The benchmark suite of BENCHMARK.md: named parts, each sized for one GPU call of at most 10 minutes; this module
holds the registry of parts (`PARTS`) and runs one (`run_part`).

`sparsetrain bench --suite PART [--quick] [--out DIR] [--data-dir DATA]` runs one part. Every contender of a part
trains (or is timed) in the same process as its dense baseline, with the same seed, data order, batch, sequence
length and learning-rate schedule; the part writes DIR/PART.json (environment, each contender's config, summary,
validation curve and logged schedules, ratios to dense) and DIR/PART/NAME/ (each run's metrics.jsonl, summary.json,
config.toml), and prints a table. `sparsetrain report DIR/*.json` turns the JSONs into the report. `--scale X`
multiplies every training step count of a part; `--quick` runs the tiny preset for a few steps, on the CPU in
seconds: a smoke test, not a measurement.

The parts live in `corpora` (prepare-data), `parts` (the training and step-time parts) and `two_gpu`, on top of
`runs` (training runs) and `context` (shapes, folders). What each part runs, and the GPU call plans: docs/suite.md.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sparsetrain.errors import UserError
from sparsetrain.methods import REGISTRY
from sparsetrain.training.runtime import peak_flops
from sparsetrain_bench.comparison import compare
from sparsetrain_bench.context import Context, scratch_dir
from sparsetrain_bench.corpora import run_prepare_data
from sparsetrain_bench.parts import (HSA_CONTENDERS, run_hsa, run_pretrain, run_sat_cpt, run_sat_sft, run_ssd_pretrain,
                                     run_steps, run_upcycle)
from sparsetrain_bench.report import CONTENDER_COLUMNS
from sparsetrain_bench.runs import calibrate, part_peak
from sparsetrain_bench.steps import environment, print_table
from sparsetrain_bench.two_gpu import run_two_gpus


@dataclass(frozen=True)
class Part:
    summary: str
    run: Callable[[Context], dict[str, Any]]
    methods: tuple[str, ...] = ()  # methods the part trains; unregistered ones skip the part with a message
    trains: bool = True  # runs the trainer (needs prepared data and a scratch folder)
    # Contenders that --contenders can pick, to split the part over GPUs ("dense": the frontier); () = no split.
    contenders: tuple[str, ...] = ()


SAT_STEP = {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5, "schedule": "constant", "dense_final": 0.0}
# Omitted slices frozen by stash + AdamW's own step + restore: the default before the masked update.
SAT_STEP_STASH = {**SAT_STEP, "freeze_by": "stash"}
# Every unit kept with the method active: its overhead floor.
SAT_STEP_RATE0 = {**SAT_STEP, "ffn_rate": 0.0, "head_rate": 0.0}
# 50% of FFN neurons and head groups from the first step to the last, no topology update in the timed steps.
MST_NEURON_STEP = {"name": "mst", "granularity": "neuron", "sparsity": 0.5, "warmup_end": 0.0, "restore_start": 1.0,
                   "restore_end": 1.0, "update_every": 10000}
SSD_STEP = {"name": "ssd", "experts": 16, "top_k": 4, "schedule": "fixed", "sparse_windows": [[0.0, 1.0]],
            "monitor_every": 0}  # the sparse phase alone
# The expert GEMMs through torch's grouped GEMM ("ssd", `auto`, runs SSD's narrow experts in Triton on a GPU).
SSD_STEP_GROUPED = {**SSD_STEP, "kernel": "grouped_mm"}

PARTS: dict[str, Part] = {
    "prepare-data": Part("prepare DATA/code and DATA/english from the carried corpora", run_prepare_data,
                         trains=False),
    "dense-step": Part("dense training step, gpt2-small and gpt2-medium", functools.partial(run_steps, methods=[]),
                       trains=False),
    "sat-step": Part("sliced steps vs dense: SAT at omission 0.5 (masked freeze, stash freeze), SAT at omission 0, "
                     "MST neuron level at 50%; gpt2-small, gpt2-medium and llama-1b",
                     functools.partial(run_steps, methods=[("sat", SAT_STEP), ("sat-stash", SAT_STEP_STASH),
                                                           ("sat-rate0", SAT_STEP_RATE0),
                                                           ("mst-neuron", MST_NEURON_STEP)],
                                       presets=("gpt2-small", "gpt2-medium", "llama-1b")),
                     ("sat", "mst"), trains=False),
    "ssd-step": Part("SSD sparse-phase step (relu2, 16 experts, top-4) vs dense, gpt2-medium; the expert GEMMs "
                     "by the default kernel (`auto`) and by torch's grouped GEMM",
                     functools.partial(run_steps, methods=[("ssd", SSD_STEP), ("ssd-grouped_mm", SSD_STEP_GROUPED)],
                                       presets=("gpt2-medium",),
                                       model={"activation": "relu2"}), ("ssd",), trains=False),
    "sat-cpt": Part("continual pre-training code -> English, dense vs SAT (LORS; top-k and sampled selection)",
                    run_sat_cpt, ("sat",), contenders=("dense", "sat", "sat-sample")),
    "two-gpu": Part("every method on one GPU vs two (torchrun DDP / FSDP2), same global batch", run_two_gpus,
                    ("sat", "upcycle", "ssd", "mst")),
    "hsa-attention": Part("hybrid sparse attention alone (MST, no weight sparsity) vs dense at 1024, 4096, 8192",
                          run_hsa, ("mst",), contenders=HSA_CONTENDERS),
    "sat-sft": Part("fine-tuning on kernel-doc pairs (comment -> function), dense vs SAT (LORS; top-k and sampled "
                    "selection)", run_sat_sft, ("sat",), contenders=("dense", "sat", "sat-sample")),
    "upcycle": Part("dense (several budgets) vs the upcycled MoE continued from the code base", run_upcycle,
                    ("upcycle",), contenders=("dense", "upcycle")),
    "ssd-pretrain": Part("pre-training dense (several budgets) vs SSD (relu2), dense and SSD then run as MoEs",
                         run_ssd_pretrain, ("ssd",), contenders=("dense", "ssd")),
    # relu2 as ssd-pretrain: the pre-training contenders share one kind of dense frontier
    "mst-pretrain": Part("pre-training dense (several budgets) vs MST (weight and neuron level), relu2",
                         functools.partial(run_pretrain,
                                           contenders=[("mst-weight", {"name": "mst", "granularity": "weight"}),
                                                       ("mst-neuron", {"name": "mst", "granularity": "neuron"})],
                                           model={"activation": "relu2"}, quick_options={"update_every": 4}),
                         ("mst",), contenders=("dense", "mst-weight", "mst-neuron")),
}


def check_selection(part: str, contenders: tuple[str, ...], budgets: tuple[float, ...]) -> None:
    """--contenders and --budgets, checked before anything runs."""
    names = PARTS[part].contenders
    if contenders and not names:
        raise UserError(f"--contenders: the part '{part}' is not split over GPUs; parts that are: "
                        f"{', '.join(p for p, spec in PARTS.items() if spec.contenders)}")
    unknown = [c for c in contenders if c not in names]
    if unknown:
        raise UserError(f"--contenders: {', '.join(unknown)} not in {part}; pick from {', '.join(names)} (dense = "
                        "its frontier)")
    if budgets and not names:
        raise UserError(f"--budgets: the part '{part}' trains no dense frontier")
    if budgets and (len(budgets) < 2 or 1.0 not in budgets or min(budgets) <= 0):
        raise UserError(f"--budgets takes two or more positive multiples of the methods' steps with 1 among them "
                        f"(dense's run at the methods' budget), got {' '.join(f'{b:g}' for b in budgets)}")


def command_line(part: str, *, out: Path, data_dir: Path, work_dir: Path, carry: Path, quick: bool, device: str,
                 scale: float, presets: tuple[str, ...] = (), contenders: tuple[str, ...] = (),
                 budgets: tuple[float, ...] = (), resume: bool = False) -> str:
    args = ["sparsetrain", "bench", "--suite", part]
    if quick:
        args.append("--quick")
    if presets and (part.endswith("-step") or PARTS[part].trains):
        args += ["--preset", *presets]
    args += ["--out", str(out)]
    if part == "prepare-data":
        args += ["--data-dir", str(data_dir), "--carry", str(carry)]
    elif not part.endswith("-step"):
        args += ["--data-dir", str(data_dir), "--work-dir", str(work_dir)]
        if scale != 1.0:
            args += ["--scale", f"{scale:g}"]
        if contenders:
            args += ["--contenders", *contenders]
        if budgets:
            args += ["--budgets", *(f"{b:g}" for b in budgets)]
        if resume:
            args.append("--resume")
    if device != "auto":
        args += ["--device", device]
    return shlex.join(args)


def run_part(part: str, *, out: str | Path = "bench_out", data_dir: str | Path = "data/suite",
             work_dir: str | Path = "runs/suite", carry: str | Path = ".carry", quick: bool = False,
             device: str = "auto", scale: float = 1.0, presets: tuple[str, ...] = (),
             contenders: tuple[str, ...] = (), budgets: tuple[float, ...] = (), resume: bool = False) -> dict[str, Any]:
    """Run one part; writes OUT/PART.json (and OUT/PART/ for trained runs) and returns what it wrote.

    `presets` replaces the models of a step part (-step), or the model of a training part (one preset); `contenders`
    runs only those of a training part (the part split over GPUs, each process with its own OUT and work folder;
    `sparsetrain report` merges the results); `budgets` sets dense's frontier (multiples of the methods' steps, 1
    among them); `resume` keeps the work folder's runs (finished ones are read back, cut ones continue from their
    last checkpoint: a comparison longer than one call)."""
    if part not in PARTS:
        raise UserError(f"unknown suite part '{part}'; parts: {', '.join(PARTS)}")
    check_selection(part, tuple(contenders), tuple(budgets))
    if presets and PARTS[part].trains and (len(presets) > 1 or part == "two-gpu"):
        raise UserError(f"--preset: the training part '{part}' takes one model preset"
                        + (" (two-gpu trains its own models)" if part == "two-gpu" else f", got {' '.join(presets)}"))
    if presets and not PARTS[part].trains and not part.endswith("-step"):
        raise UserError(f"--preset: the part '{part}' trains no model")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got '{device}'")
    if not scale > 0:
        raise UserError(f"--scale must be positive, got {scale}")
    out, data_dir, work_dir, carry = Path(out), Path(data_dir), Path(work_dir), Path(carry)
    command = command_line(part, out=out, data_dir=data_dir, work_dir=work_dir, carry=carry, quick=quick,
                           device=device, scale=scale, presets=tuple(presets), contenders=tuple(contenders),
                           budgets=tuple(budgets), resume=resume)
    spec = PARTS[part]
    result: dict[str, Any] = {"part": part, "summary": spec.summary, "command": command, "quick": quick,
                              "env": environment(), "status": "done"}
    cuda = torch.cuda.is_available() and device != "cpu"
    result["env"]["ran_on"] = "cuda" if cuda else "cpu"
    if cuda:
        result["env"]["peak_flops"] = peak_flops(torch.device("cuda"))
    out.mkdir(parents=True, exist_ok=True)
    missing = [m for m in spec.methods if m not in REGISTRY]
    if missing:
        result["status"] = "skipped"
        result["message"] = (f"method {', '.join(repr(m) for m in missing)} is not registered in "
                             f"sparsetrain.methods.REGISTRY (have: {', '.join(sorted(REGISTRY))}); "
                             "this part runs once it is")
        print(f"{part}: skipped: {result['message']}")
    else:
        ctx = Context(part, out, data_dir, work_dir, carry, quick, device, scale, tuple(presets),
                      tuple(contenders), tuple(budgets), resume)
        if spec.trains:
            scratch_dir(work_dir / part, empty=not resume)  # run folders (checkpoints)
            scratch_dir(out / part)  # the runs' metrics, copied beside PART.json
            result["shape"] = dataclasses.asdict(ctx.shape) | {"scale": scale}
        if contenders:  # split over GPUs: this GPU's speed on a fixed job, to merge the processes by
            result["selected"] = list(contenders)
            result["calibration"] = calibrate(ctx)
        t0 = time.perf_counter()
        result.update(spec.run(ctx))
        result["elapsed_s"] = time.perf_counter() - t0
        if result.get("contenders"):
            if not result.get("compared"):  # a part with several baselines compares its groups itself
                compare(result["contenders"], part_peak(ctx))
            print_table(result["contenders"], CONTENDER_COLUMNS)
        print(f"{part}: done in {result['elapsed_s']:.0f} s")
    path = out / f"{part}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"raw numbers: {path}")
    return result
