"""Fault injection on the tiny preset: kill -9 at random points then resume, damaged checkpoint files, two writers in
one run folder, a non-finite loss, a torn metrics line, a resume that changes the config, errors found before work."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sparsetrain import config
from sparsetrain.cli import main
from sparsetrain.nn.model import Transformer
from sparsetrain.store.checkpoint import MANIFEST, list_checkpoints
from sparsetrain.training.loop import train


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def write_config(cfg, path):
    path.write_text(config.dumps(config.to_dict(cfg)))
    return path


def cli(*args):
    return main(["train", *map(str, args)])


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsetrain: error: "), err
    return err[0]


def start_training(cfg_path, out):
    return subprocess.Popen([sys.executable, "-m", "sparsetrain.cli", "train", "--config", str(cfg_path), "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=120):
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None or condition(), proc.stderr.read()[-2000:]
        assert time.time() < end, "timed out"
        time.sleep(0.05)


# --- kill -9 ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_point_then_resume_equals_uninterrupted(make_config, tmp_path, seed):
    cfg = make_config(steps=24, checkpoint_every=1, keep_checkpoints=2, eval_every=8)
    full = tmp_path / "full"
    train(cfg, full)
    run = tmp_path / "run"
    proc = start_training(write_config(cfg, tmp_path / "c.toml"), run)
    wait_for(lambda: list_checkpoints(run), proc)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))  # while training and writing checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if list_checkpoints(run)[-1].name != "step_0000024":
        train(cfg, run, resume=True)
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(full)]
    assert same_weights(run, full)


# --- damaged checkpoints --------------------------------------------------------------------------------------
def flip_bytes(path, count=64, seed=0):
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for i in rng.sample(range(len(data) // 2, len(data)), min(count, len(data) // 2)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def finished_run(make_config, tmp_path):
    run = tmp_path / "done"
    train(make_config(), run)  # 12 steps, checkpoints at 6 and 12
    return run


@pytest.mark.parametrize("name, harm", [
    ("model.safetensors", "flip"), ("optimizer.safetensors", "flip"), ("method.safetensors", "truncate"),
    ("rng.safetensors", "truncate"), ("state.json", "flip"), ("model.safetensors", "truncate-legacy"),
    ("state.json", "garbage-legacy"),
])
def test_resume_falls_back_from_a_damaged_checkpoint(finished_run, tmp_path, capsys, name, harm):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = list_checkpoints(run)[-1]
    target = last / name
    if harm.endswith("legacy"):  # written before manifests existed: caught when it cannot be read
        (last / MANIFEST).unlink()
    if harm == "flip":
        flip_bytes(target)
    elif harm.startswith("truncate"):
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.write_text("{not json")
    capsys.readouterr()
    assert cli("--out", run, "--resume") == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint step_0000012 is damaged" in err and "resuming from step 6" in err
    assert [p.name for p in list_checkpoints(run)] == ["step_0000006", "step_0000012"]
    assert (run / "checkpoints" / ".damaged-step_0000012").is_dir()
    assert same_weights(run, finished_run)  # steps 7-12 trained again, exactly
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(finished_run)]


def test_no_intact_checkpoint_is_one_line_and_eval_of_a_damaged_one_too(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for ckpt in list_checkpoints(run):
        flip_bytes(ckpt / "model.safetensors")
    capsys.readouterr()
    assert cli("--out", run, "--resume") == 2
    assert "no intact checkpoint" in error_line(capsys)
    assert main(["eval", str(run)]) == 2
    line = error_line(capsys)
    assert "is damaged: model.safetensors does not match its checksum" in line
    assert [p.name for p in list_checkpoints(run)] == ["step_0000006", "step_0000012"]  # nothing moved or written


# --- two writers ------------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(make_config, tmp_path, capsys):
    cfg = make_config(steps=100000, checkpoint_every=5, eval_every=0, log_every=5)
    run = tmp_path / "run"
    proc = start_training(write_config(cfg, tmp_path / "c.toml"), run)
    try:
        wait_for(lambda: list_checkpoints(run), proc)
        capsys.readouterr()
        assert cli("--config", tmp_path / "c.toml", "--out", run) == 2
        assert "is in use by a running training" in error_line(capsys)
        assert cli("--out", run, "--resume") == 2
        line = error_line(capsys)
        assert f'"pid": {proc.pid}' in line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = int(list_checkpoints(run)[-1].name.split("_")[1])
    lines = len(metrics(run))
    assert cli("--out", run, "--resume", "--set", f"train.steps={step + 2}") == 0  # the dead writer's lock is free
    assert metrics(run)[-1]["step"] == step + 2 and len(metrics(run)) <= lines + 1


# --- non-finite losses ------------------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_the_run_before_any_checkpoint_from_it(make_config, tmp_path, capsys):
    cfg = write_config(make_config(steps=40, lr=1e4, checkpoint_every=1, log_every=5, eval_every=0),
                       tmp_path / "c.toml")
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli("--config", cfg, "--out", run) == 2
    line = error_line(capsys)
    assert "the loss or the gradient norm is not finite" in line and "The last good checkpoint is" in line
    for ckpt in list_checkpoints(run):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())
    assert all(r["loss"] is not None for r in metrics(run))


def test_infinite_learning_rate_is_a_config_error(make_config, tmp_path, capsys):
    cfg = write_config(make_config(), tmp_path / "c.toml")
    assert cli("--config", cfg, "--out", tmp_path / "run", "--set", "train.lr=inf") == 2
    assert "train.lr must be a finite number" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_skip_drops_one_bad_step_and_stops_after_several_in_a_row(make_config, tmp_path, monkeypatch, capsys):
    real, calls = Transformer.forward, {"n": 0}

    def nan_on_the_fifth_call(self, idx, targets=None):
        calls["n"] += 1
        loss = real(self, idx, targets)
        return loss * float("nan") if calls["n"] == 5 and targets is not None else loss

    monkeypatch.setattr(Transformer, "forward", nan_on_the_fifth_call)
    run = tmp_path / "run"
    summary = train(make_config(method={"name": "sat", "ffn_multiple": 32}, on_nonfinite="skip"), run)
    assert summary["skipped_steps"] == 1 and metrics(run)[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in weights(run).values())
    monkeypatch.setattr(Transformer, "forward", real)
    cfg = write_config(make_config(steps=40, lr=1e4, on_nonfinite="skip", max_nonfinite_skips=2), tmp_path / "c.toml")
    capsys.readouterr()
    assert cli("--config", cfg, "--out", tmp_path / "bad") == 2
    assert "2 steps in a row had a non-finite loss or gradient" in error_line(capsys)


# --- the run's record ---------------------------------------------------------------------------------------------
def test_torn_metrics_line_is_dropped_with_a_warning(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "lo')
    capsys.readouterr()
    assert cli("--out", run, "--resume", "--set", "train.steps=14") == 0
    assert "line 13 is torn" in capsys.readouterr().err
    assert [r["step"] for r in metrics(run)] == list(range(1, 15))


def test_resume_with_more_steps_records_the_change_and_a_finished_run_changes_nothing(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert cli("--out", run, "--resume", "--set", "train.steps=14") == 0
    assert config.load(run / "config.toml").train.steps == 14
    assert [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()] == [
        {"step": 12, "changed": {"train.steps": [12, 14]}}]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert cli("--out", run, "--resume") == 0
    assert "is finished: it trained 14 of train.steps=14 steps" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before

    def no_constants(name):
        raise ValueError(f"{name} in strict JSON")

    json.loads((run / "summary.json").read_text(), parse_constant=no_constants)


# --- errors before work -------------------------------------------------------------------------------------------
def test_a_too_short_validation_split_fails_before_anything_is_written(tiny_data, make_config, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    itemsize = (data / "val.bin").stat().st_size // meta["val_tokens"]
    (data / "val.bin").write_bytes((data / "val.bin").read_bytes()[: 10 * itemsize])
    meta["val_tokens"] = 10
    (data / "meta.json").write_text(json.dumps(meta))
    cfg = make_config(eval_every=0)
    cfg.data.dir = str(data)
    capsys.readouterr()
    assert cli("--config", write_config(cfg, tmp_path / "c.toml"), "--out", tmp_path / "run") == 2
    assert "val split has 10 tokens" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_that_does_not_match_the_data_fails_before_work(tiny_data, make_config, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    tok = json.loads((data / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for token in sorted(vocab, key=vocab.get)[-100:]:  # a smaller vocabulary than the data was made with
        del vocab[token]
    tok["model"]["merges"] = []
    (data / "tokenizer.json").write_text(json.dumps(tok))
    cfg = make_config()
    cfg.data.dir = str(data)
    capsys.readouterr()
    assert cli("--config", write_config(cfg, tmp_path / "c.toml"), "--out", tmp_path / "run") == 2
    assert "tokenizer.json has" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_the_lock_file_does_not_count_as_a_run(make_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("{}")
    train(make_config(steps=2, eval_every=0, checkpoint_every=0), run)
    assert os.path.exists(run / "summary.json")
