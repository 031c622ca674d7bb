"""Speed-up at equal quality (issue 19): dense trained at several budgets makes the frontier each method is read
against (`sparsetrain.frontier`, through `comparison.iso_loss`: how much wall-clock, and how many counted FLOPs,
dense needs to reach a method's final validation loss, over what the method spent).

The budgets are 0.5x, 1x, 1.5x and 2x the contenders' steps (a part's --budgets changes them), trained as one
warmup-stable-decay trunk of the largest with a decay branched off at each other (`sparsetrain.training.budgets`):
about 2.6 runs of the contenders' length instead of 5. Every contender uses the same schedule family (`wsd`, the same decay fraction).

A branch's wall-clock is the trunk's up to the branch point (its compilation taken out, as for every contender) plus
the branch's own steps; its FLOPs likewise.
"""
from __future__ import annotations

import json
import shutil
from typing import Any

import numpy as np

from sparsetrain import config as config_mod
from sparsetrain.plots import read_metrics
from sparsetrain.training.budgets import branch_folder, budget_configs
from sparsetrain.training.budgets import with_wsd as cfg_with_wsd
from sparsetrain.training.loop import train
from sparsetrain_bench.context import Context
from sparsetrain_bench.runs import (COMPILE_FILE, CURVE_KEYS, RUN_FILE, CompileClock, read_back, run_result, run_state,
                                    steady_times, train_run)

BUDGETS = (0.5, 1.0, 1.5, 2.0)  # dense's budgets, in multiples of the contenders' steps


def with_wsd(raw: dict[str, Any]) -> dict[str, Any]:
    """A contender's raw config on the frontier's schedule family."""
    return config_mod.to_dict(cfg_with_wsd(config_mod.from_dict(raw)))


def budget_name(fraction: float, prefix: str = "dense") -> str:
    """The frontier's run at the contenders' own budget keeps the plain name (the equal-step baseline)."""
    return prefix if fraction == 1.0 else f"{prefix}-{fraction:g}x"


def dense_frontier(ctx: Context, raw: dict[str, Any], prefix: str = "dense") -> list[dict[str, Any]]:
    """Dense at each budget (fractions of raw's steps: the part's --budgets, else `BUDGETS`), the largest trained as
    the trunk (`training.budgets`), each other one resumed from its checkpoint. Results in budget order, role
    "frontier", named after `prefix`."""
    configs, starts = budget_configs(config_mod.from_dict(raw), ctx.budgets or BUDGETS)
    largest = max(configs)
    trunk = train_run(ctx, budget_name(largest, prefix), config_mod.to_dict(configs[largest]), role="frontier")
    runs = [branch(ctx, trunk, budget_name(f, prefix), configs[f], starts[f]) for f in configs if f != largest]
    return [*runs, trunk]


def branch(ctx: Context, trunk: dict[str, Any], name: str, cfg: config_mod.RunConfig, start: int) -> dict[str, Any]:
    """`cfg`'s budget resumed from the trunk's checkpoint at `start`. Its wall-clock: the trunk's up to `start`
    (compilation taken out, as for every contender) plus its own steps'; its FLOPs likewise (the checkpoint's)."""
    run_dir = ctx.work / ctx.part / name
    raw = config_mod.to_dict(cfg)
    state = run_state(ctx, run_dir, raw)  # a branch cut short starts again from the trunk: it is short
    if state == "done":
        summary, clock = read_back(ctx, name, run_dir)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        branch_folder(trunk["run_dir"], run_dir, start)
        (run_dir / COMPILE_FILE).unlink(missing_ok=True)  # the trunk's, copied: the branch counts its own
        (run_dir / RUN_FILE).write_text(json.dumps(raw))
        print(f"{ctx.part}: training {name} (dense, {cfg.train.steps} steps: the trunk's first {start}, then its "
              "own decay)", flush=True)
        with CompileClock(run_dir / COMPILE_FILE) as clock:
            summary = train(cfg, run_dir, resume=True)
    records = read_metrics(run_dir)
    trunk_curve = trunk["curve"]
    at = [0, *[r["step"] for r in trunk_curve]]
    # The trunk's cumulative times at the branch point (interpolated between its logged steps).
    t0 = float(np.interp(start, at, [0.0, *[r["train_time"] for r in trunk_curve]]))
    w0 = float(np.interp(start, at, [0.0, *[r["wallclock"] for r in trunk_curve]]))
    own = [r for r in records if r["step"] > start]
    shifted = [{"step": r["step"] - start, "train_time": r["train_time"] - t0} for r in own]
    for r, t in zip(own, steady_times(shifted, clock.seconds)):
        r["wallclock"] = w0 + t
    curve = [r for r in trunk_curve if r["step"] <= start] + [{k: r[k] for k in CURVE_KEYS if k in r} for r in own]
    return run_result(ctx, name, "frontier", cfg, summary, curve, run_dir, trunk["compile_s"] + clock.seconds,
                      trunk["compilations"] + clock.count,
                      trunk["graph_recording_s"] + clock.recording_seconds) | {"branched_at": start}
