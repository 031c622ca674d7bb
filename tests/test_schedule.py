"""The learning-rate schedules (train.schedule): cosine as it always was, warmup-stable-decay (wsd) with its decay
start on a whole step, their validation, and wsd's point: a checkpoint of a long wsd trunk at a shorter budget's
decay start, resumed with that budget's train.steps, trains exactly what a run of that budget trains."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sparsetrain import config
from sparsetrain.cli import main
from sparsetrain.config import TrainConfig
from sparsetrain.errors import UserError
from sparsetrain.store.checkpoint import list_checkpoints
from sparsetrain.training.loop import decay_start, lr_at, train


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run):
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


def wsd(**kw):
    return TrainConfig(**{"steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1, "schedule": "wsd",
                          "decay_fraction": 0.2, **kw})


def test_wsd_warms_up_holds_and_decays_linearly_to_min_lr():
    t = wsd()
    assert decay_start(t) == 80  # 100 - round(0.2 * 100)
    assert [lr_at(s, t) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(lr_at(s, t) == 1.0 for s in range(10, 80))  # the stable phase: exactly lr
    decay = [lr_at(s, t) for s in range(80, 100)]
    assert decay == pytest.approx([0.1 + 0.9 * (99 - s) / 20 for s in range(80, 100)])
    assert decay[0] < 1.0 and decay[-1] == 0.1  # every decay step below lr; the last step exactly at min_lr
    steps = [b - a for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([-0.9 / 20] * 19)  # linear
    assert lr_at(100, t) == 0.1 and lr_at(150, t) == 0.1  # past the end: min_lr


@pytest.mark.parametrize("kw,start", [
    ({"steps": 10, "decay_fraction": 0.25, "warmup_steps": 2}, 8),  # round(2.5) = 2 (halves to even)
    ({"steps": 10, "decay_fraction": 0.35, "warmup_steps": 2}, 6),  # round(3.5) = 4
    ({"steps": 10, "decay_fraction": 0.01, "warmup_steps": 2}, 9),  # at least one decay step
    ({"steps": 100, "decay_fraction": 1.0}, 10),  # all of it decays: from the end of warm-up
    ({"steps": 5, "decay_fraction": 0.2, "warmup_steps": 8}, 8),  # warm-up longer than the run: no decay
])
def test_wsd_decay_start(kw, start):
    t = wsd(**kw)
    assert decay_start(t) == start
    if start < t.steps:
        assert lr_at(start - 1, t) == t.lr and lr_at(start, t) < t.lr
        assert lr_at(t.steps - 1, t) == t.lr * t.min_lr_ratio


def test_wsd_before_decay_start_does_not_depend_on_steps():
    for fraction in (0.1, 0.2, 0.25, 0.5, 1.0):
        for t1 in range(1, 60):
            short = wsd(steps=t1, decay_fraction=fraction)
            if decay_start(short) >= t1:  # warm-up as long as the run: no decay to branch at
                continue
            for t2 in range(t1 + 1, 80):
                long = wsd(steps=t2, decay_fraction=fraction)
                assert decay_start(long) >= decay_start(short)
                assert all(lr_at(s, short) == lr_at(s, long) for s in range(decay_start(short)))


def test_cosine_unchanged():
    t = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert t.schedule == "cosine"

    def before(step):  # lr_at as it was before train.schedule existed
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        min_lr = t.lr * t.min_lr_ratio
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - min_lr)

    for step in (0, 5, 9, 10, 33, 55, 80, 99, 100, 120):
        assert lr_at(step, t) == before(step)
    assert lr_at(55, t) == pytest.approx(0.55) and lr_at(100, t) == pytest.approx(0.1)


@pytest.mark.parametrize("train,match", [
    ({"schedule": "linear"}, "train.schedule must be cosine or wsd, got 'linear'"),
    ({"decay_fraction": 0}, r"train.decay_fraction must be in \(0, 1\]"),
    ({"decay_fraction": 1.5}, r"train.decay_fraction must be in \(0, 1\]"),
    ({"decay_fraction": -0.1}, r"train.decay_fraction must be in \(0, 1\]"),
    ({"decay_fraction": float("nan")}, "train.decay_fraction must be a finite number"),
    ({"decay_fraction": "a lot"}, "train.decay_fraction must be float"),
])
def test_bad_schedule_values(train, match):
    with pytest.raises(UserError, match=match):
        config.from_dict({"train": train})
    assert config.from_dict({"train": {"schedule": "wsd", "decay_fraction": 1}}).train.decay_fraction == 1.0


def test_wsd_branch_equals_a_run_of_that_budget(make_config, tmp_path):
    """A 20-step wsd trunk's checkpoint at step 8 (decay_start of 10 steps), resumed with --set train.steps=10
    (through the CLI, as a user would), gives the losses, learning rates, validation losses and final weights of a
    fresh 10-step run, bit for bit."""
    short_steps, long_steps = 10, 20
    make = lambda steps: make_config(steps=steps, schedule="wsd", decay_fraction=0.2,  # noqa: E731
                                     checkpoint_every=8, keep_checkpoints=3, eval_every=4)
    branch_at = decay_start(make(short_steps).train)
    assert branch_at == 8 and decay_start(make(long_steps).train) == 16

    trunk = tmp_path / "trunk"
    train(make(long_steps), trunk)
    assert [p.name for p in list_checkpoints(trunk)] == ["step_0000008", "step_0000016", "step_0000020"]

    branch = tmp_path / "branch"
    shutil.copytree(trunk, branch)
    for ckpt in list_checkpoints(branch):
        if int(ckpt.name.split("_")[1]) > branch_at:
            shutil.rmtree(ckpt)
    assert main(["train", "--out", str(branch), "--resume", "--set", f"train.steps={short_steps}"]) == 0

    fresh = tmp_path / "fresh"
    train(make(short_steps), fresh)

    keys = ("step", "loss", "lr", "val_loss")
    got = [{k: r.get(k) for k in keys} for r in metrics(branch)]
    want = [{k: r.get(k) for k in keys} for r in metrics(fresh)]
    assert [r["step"] for r in got] == list(range(1, short_steps + 1))
    assert got == want
    assert [r["step"] for r in want if r.get("val_loss") is not None] == [4, 8, 10]
    wa, wb = final_weights(branch), final_weights(fresh)
    assert list_checkpoints(branch)[-1].name == list_checkpoints(fresh)[-1].name == "step_0000010"
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # The trunk itself went on at full lr past step 8: the branch really decayed where the trunk did not.
    trunk_lr = {r["step"]: r["lr"] for r in metrics(trunk)}
    assert trunk_lr[9] == 3e-3 and want[8]["lr"] < 3e-3 and want[-1]["lr"] == pytest.approx(3e-4)


def test_a_frontier_trunk_checkpoints_at_its_branch_points_and_keeps_them(make_config):
    """Budgets whose decay starts share no common divisor (6,104 steps: 2,442, 4,883) checkpoint there, not every
    step; each is kept until its branch."""
    from sparsetrain.training.budgets import budget_configs

    configs, starts = budget_configs(make_config(steps=6104, warmup_steps=305, checkpoint_every=0), (0.5, 1.0, 1.5))
    trunk = configs[1.5].train
    assert starts == {0.5: 2442, 1.0: 4883, 1.5: 7325}
    assert trunk.checkpoint_at == [2442, 4883] and trunk.checkpoint_every == 0 and trunk.keep_checkpoints >= 3
    assert configs[0.5].train.checkpoint_at == []
