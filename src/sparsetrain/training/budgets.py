"""Dense at several budgets from one run: a warmup-stable-decay (`wsd`) trunk of the largest budget, with a decay
branched off at each other. A `wsd` learning rate does not depend on train.steps before its decay starts, so the
trunk's checkpoint at a budget's `decay_start`, resumed with that budget's train.steps, trains exactly what a run of
that budget trains (tests/test_schedule.py). Budgets 0.5x-2x cost ~2.6 runs of the middle one instead of 5.

What the speed-up-at-equal-quality comparison (`sparsetrain.frontier`) reads dense's frontier from: the demo and
the benchmark suite both train it this way.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from sparsetrain.config import RunConfig
from sparsetrain.errors import UserError
from sparsetrain.training.loop import decay_start

WSD = {"schedule": "wsd", "decay_fraction": 0.2}  # the frontier's schedule family: every contender uses it too


def with_wsd(cfg: RunConfig) -> RunConfig:
    """`cfg` on the frontier's schedule (a copy)."""
    cfg = copy.deepcopy(cfg)
    for key, value in WSD.items():
        setattr(cfg.train, key, value)
    return cfg


def budget_configs(cfg: RunConfig, fractions: tuple[float, ...]) -> tuple[dict[float, RunConfig], dict[float, int]]:
    """Each budget's config (`cfg` on `wsd` with train.steps = fraction x cfg's steps) and the step its decay starts
    at. The largest is the trunk: it checkpoints at every other budget's decay start and keeps those checkpoints."""
    configs, starts = {}, {}
    for f in sorted(fractions):
        configs[f] = with_wsd(cfg)
        configs[f].train.steps = max(2, round(f * cfg.train.steps))
        starts[f] = decay_start(configs[f].train)
        if starts[f] >= configs[f].train.steps:
            raise UserError(f"a budget of {configs[f].train.steps} steps ends inside its warm-up "
                            f"(train.warmup_steps = {cfg.train.warmup_steps}); train longer or warm up shorter")
    largest = max(configs)
    points = sorted({starts[f] for f in configs if f != largest})
    trunk = configs[largest].train
    trunk.checkpoint_at = points
    # None is deleted before its branch: every checkpoint of the trunk is kept (its own cadence's too).
    cadence = trunk.steps // trunk.checkpoint_every if trunk.checkpoint_every else 0
    trunk.keep_checkpoints = max(trunk.keep_checkpoints, len(points) + cadence + 1)
    return configs, starts


def branch_folder(trunk_dir: str | Path, run_dir: str | Path, start: int) -> None:
    """A copy of the trunk's run folder holding only its checkpoint at `start`, for a `resume` of another budget."""
    keep = f"step_{start:07d}"

    def later_checkpoints(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n.startswith("step_") and n != keep] if Path(folder).name == "checkpoints" else []

    if not (Path(trunk_dir) / "checkpoints" / keep).is_dir():
        raise FileNotFoundError(f"{trunk_dir} has no checkpoint at step {start} to branch from")
    shutil.copytree(trunk_dir, run_dir, ignore=later_checkpoints)
