import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import sparsetrain.store.checkpoint as ckpt_mod
from sparsetrain.cli import main
from sparsetrain.errors import UserError
from sparsetrain.training.build import load_model
from sparsetrain.training.loop import lr_at, train


def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run):
    return load_file(str(ckpt_mod.list_checkpoints(run)[-1] / "model.safetensors"))


def test_training_lowers_loss_and_logs(make_config, tmp_path):
    run = tmp_path / "run"
    summary = train(make_config(steps=40, eval_every=20, checkpoint_every=20), run)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["val_loss"] < evals[0]["val_loss"]
    for key in ["step", "loss", "lr", "tokens_per_s", "flops", "tokens", "train_time"]:
        assert key in rows[-1]
    # FLOPs are cumulative and counted per step by the method (dense: constant per token).
    assert rows[-1]["flops"] == pytest.approx(40 * rows[0]["flops"])
    assert (run / "config.toml").is_file() and (run / "summary.json").is_file() and (run / "tb").is_dir()
    assert summary["val_loss"] == evals[-1]["val_loss"]
    assert summary["cuda_graphs"] is False  # auto: only on a GPU
    assert len(ckpt_mod.list_checkpoints(run)) == 2


METHODS = {
    "dense": {"name": "dense"},
    "sat": {"name": "sat", "ffn_multiple": 32},
    "upcycle": {"name": "upcycle", "experts": 4, "top_k": 2},
    "ssd": {"name": "ssd", "experts": 4, "top_k": 2, "schedule": "fixed", "sparse_windows": [[0.25, 0.75]],
            "monitor_every": 3},
    "mst": {"name": "mst", "update_every": 2},
    "mst-neuron": {"name": "mst", "granularity": "neuron", "update_every": 2, "neuron_multiple": 32},
}


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted(make_config, tmp_path, interrupt_after_checkpoint, method):
    make = lambda: make_config(method=METHODS[method])  # noqa: E731
    full = tmp_path / "full"
    train(make(), full)

    # Interrupt right after the step-6 checkpoint, then resume.
    part = tmp_path / "part"  # killed right after the step-6 checkpoint, then resumed
    with interrupt_after_checkpoint(6):
        train(make(), part)
    train(make(), part, resume=True)

    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 13))  # no duplicated steps in the log
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    wa, wb = final_weights(full), final_weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_while_writing_checkpoint_resumes_from_last_complete(make_config, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(make_config(checkpoint_every=4), full)

    real = ckpt_mod.save_model_weights
    calls = {"n": 0}

    def dies_on_second(state, path):
        calls["n"] += 1
        if calls["n"] == 2:
            real(state, path)
            raise KeyboardInterrupt  # killed mid-checkpoint: weights written, the rest not
        real(state, path)

    run = tmp_path / "run"
    monkeypatch.setattr(ckpt_mod, "save_model_weights", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(checkpoint_every=4), run)
    monkeypatch.setattr(ckpt_mod, "save_model_weights", real)
    assert [p.name for p in ckpt_mod.list_checkpoints(run)] == ["step_0000004"]
    train(make_config(checkpoint_every=4), run, resume=True)
    assert [r["loss"] for r in metrics(full)] == [r["loss"] for r in metrics(run)]


def test_gradient_accumulation_matches_full_batch(make_config, tmp_path):
    train(make_config(steps=3, eval_every=0, checkpoint_every=0), tmp_path / "a")
    train(make_config(steps=3, eval_every=0, checkpoint_every=0, micro_batch_size=2), tmp_path / "b")
    la = [r["loss"] for r in metrics(tmp_path / "a")]
    lb = [r["loss"] for r in metrics(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-4)


def test_lr_schedule():
    from sparsetrain.config import TrainConfig

    t = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(100, t) == pytest.approx(0.1)
    assert lr_at(55, t) == pytest.approx(0.55)


def test_existing_run_refused_without_resume(make_config, tmp_path):
    run = tmp_path / "run"
    train(make_config(steps=2, eval_every=0, checkpoint_every=0), run)
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(UserError, match="already holds a run"):
        train(make_config(steps=2), run)
    assert sorted(p.name for p in run.rglob("*")) == before
    with pytest.raises(UserError, match="no complete checkpoint|no run"):
        train(make_config(steps=2), tmp_path / "empty", resume=True)


def test_bad_inputs_leave_nothing(make_config, tmp_path):
    cfg = make_config(steps=2)
    cfg.data.dir = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="data prepare"):
        train(cfg, tmp_path / "r1")
    assert not (tmp_path / "r1").exists()
    with pytest.raises(UserError, match="micro_batch_size"):
        train(make_config(batch_size=8, micro_batch_size=3), tmp_path / "r2")
    assert not (tmp_path / "r2").exists()
    with pytest.raises(UserError, match="seq_len"):
        train(make_config(seq_len=128), tmp_path / "r3")
    assert not (tmp_path / "r3").exists()


def test_init_from_other_shape_is_refused(make_config, tmp_path):
    src = tmp_path / "src"
    train(make_config(steps=2, eval_every=0, checkpoint_every=0), src)
    cfg = make_config(steps=2, init_from=str(src), model={"d_ff": 128})
    with pytest.raises(UserError, match="another model shape"):
        train(cfg, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    # Same shape: the run starts from those weights.
    train(make_config(steps=1, init_from=str(src), lr=1e-12, warmup_steps=0, eval_every=0, checkpoint_every=0,
                      weight_decay=0.0), tmp_path / "ok")
    a, b = final_weights(src), final_weights(tmp_path / "ok")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cli_train_eval_and_errors(tiny_data, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[model]\npreset = "tiny"\nn_layer = 1\nd_model = 64\nd_ff = 128\nmax_seq_len = 64\n'
        f'[data]\ndir = "{tiny_data}"\n'
        "[train]\nsteps = 3\nbatch_size = 4\nseq_len = 32\neval_every = 0\neval_tokens = 1024\nprogress = false\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    assert main(["eval", str(run)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["val_loss"] > 0 and out["perplexity"] > 1
    # Resume with more steps continues the same run.
    assert main(["train", "--out", str(run), "--resume", "--set", "train.steps=5"]) == 0
    assert metrics(run)[-1]["step"] == 5
    # User mistakes: exit 2, one line on stderr, no traceback.
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 2
    assert main(["train", "--config", str(cfg), "--set", "train.stepz=3", "--out", str(tmp_path / "x")]) == 2
    assert main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("sparsetrain: error:") for line in err)
    assert "train.stepz" in err[1]


def test_hf_export_import_cli(tiny_data, make_config, tmp_path):
    run = tmp_path / "run"
    train(make_config(steps=2, eval_every=0, checkpoint_every=0), run)
    assert main(["convert", "hf-export", "--from", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["convert", "hf-import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    model, _, _ = load_model(tmp_path / "back")
    orig, _, _ = load_model(run)
    x = torch.randint(0, 512, (2, 16))
    assert torch.allclose(model(x), orig(x), atol=1e-5)


FSDP_VARIANTS = {
    "fsdp": {"parallel": "fsdp"},  # auto: one unit of every block, the model sharded at its root alone
    "fsdp-blocks": {"parallel": "fsdp", "fsdp_blocks_per_unit": 1},
    "fsdp-grouped": {"parallel": "fsdp", "fsdp_blocks_per_unit": 2},
    "fsdp-kept": {"parallel": "fsdp", "fsdp_blocks_per_unit": 1, "fsdp_reshard_after_forward": False},
}


@pytest.mark.parametrize("method, parallel", [("dense", "ddp"), ("dense", "fsdp"), ("dense", "fsdp-grouped"),
                                              ("sat", "fsdp-blocks"), ("mst-neuron", "fsdp-blocks"), ("ssd", "fsdp"),
                                              ("ssd", "fsdp-kept")])
def test_two_processes_match_one(make_config, tiny_data, tmp_path, method, parallel):
    """torchrun with 2 gloo processes at the same global batch trains what one process trains, and resumes.
    fsdp-grouped: five blocks in FSDP2 units of two (the last unit one block). fsdp-kept: gathered weights kept
    from forward to backward (SSD's probes and permutations between steps must not read stale copies). fsdp: the
    default on CPU, one unit of every block (the model sharded at its root alone); fsdp-blocks: block by block."""
    model = {"n_layer": 5} if parallel == "fsdp-grouped" else None
    one = tmp_path / "one"
    train(make_config(method=METHODS[method], model=model, steps=4, eval_every=0, checkpoint_every=0), one)
    cfg = tmp_path / "c.toml"
    from sparsetrain import config

    units = FSDP_VARIANTS.get(parallel, {"parallel": parallel})
    raw = config.to_dict(make_config(method=METHODS[method], model=model, steps=4, eval_every=0, checkpoint_every=2,
                                     **units))
    cfg.write_text(config.dumps(raw))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsetrain.cli", "train", "--config", str(cfg), "--out", str(two)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    la = [r["loss"] for r in metrics(one)]
    lb = [r["loss"] for r in metrics(two)]
    assert la == pytest.approx(lb, rel=1e-4)
    # The checkpoint holds full weights, loadable on one process.
    w = final_weights(two)
    assert w["wte.weight"].shape == (512, 64)
    # Resume on two processes from the step-2 checkpoint (the step-4 one removed): the same last two steps.
    again = tmp_path / "again"
    shutil.copytree(two, again)
    shutil.rmtree(again / "checkpoints" / "step_0000004")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsetrain.cli", "train", "--out", str(again), "--resume"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["loss"] for r in metrics(again)] == lb
    wa = final_weights(again)
    assert all(torch.equal(w[k], wa[k]) for k in w)


@pytest.mark.parametrize("method, parallel", [
    ("dense-accum", "ddp"), ("dense-accum", "fsdp"),
    ("sat", "ddp"), ("sat", "fsdp"), ("sat-magnitude", "fsdp"), ("sat-maxip", "fsdp"), ("sat-accum", "fsdp"),
    ("upcycle", "ddp"), ("upcycle", "fsdp"), ("upcycle-accum", "ddp"), ("upcycle-accum", "fsdp"),
    ("ssd", "ddp"), ("ssd", "fsdp"), ("ssd-accum", "fsdp"),
    ("mst", "ddp"), ("mst", "fsdp"), ("mst-accum", "ddp"), ("mst-accum", "fsdp"), ("mst-neuron", "ddp"),
    ("mst-neuron", "fsdp"), ("upcycle-triton", "fsdp"), ("ssd-triton", "fsdp"),
])
def test_every_method_on_two_processes_matches_one(make_config, tmp_path, method, parallel):
    """Each method under torchrun with 2 gloo processes at the same global batch: the same losses and final weights
    as one process (its random choices, selections, clusterings and masks agree across ranks; under FSDP2 each
    process scores from sharded weights and freezes the omitted slices of its own shards)."""
    from sparsetrain import config

    options = {"sat-magnitude": {**METHODS["sat"], "metric": "magnitude", "select": "topk"},
               "sat-maxip": {**METHODS["sat"], "metric": "maxip"},
               # wanda's statistics come from the micro-batches a process sees, and every process scores with rank
               # 0's: with accumulation, one process's statistics (all rows) and two's (rank 0's half) differ a
               # little, and top-k turns a little at a near-tie into another kept neuron; sampling does not.
               "sat-accum": {**METHODS["sat"], "select": "sample"},
               # The balance loss counts expert loads over one micro-batch of every rank: with accumulation, one
               # process and two group different rows into a micro-batch, so it is a different loss; without it
               # (and the router z-loss) the MoE trains the same.
               "upcycle-accum": {**METHODS["upcycle"], "aux_loss_coef": 0.0, "z_loss_coef": 0.0},
               # The Triton expert GEMMs (through Triton's interpreter on the CPU) on FSDP2's gathered weights.
               "upcycle-triton": {**METHODS["upcycle"], "kernel": "triton"},
               # SSD's sparse phase (every step) through them: `auto`'s choice on a GPU for its narrow experts.
               "ssd-triton": {**METHODS["ssd"], "kernel": "triton", "sparse_windows": [[0.0, 1.0]]},
               }.get(method) or METHODS[method.removesuffix("-accum")]
    # -accum: micro-batches of 2 rows, gradients accumulated over backward passes (without a sync but the last).
    micro = {"micro_batch_size": 2} if method.endswith("-accum") else {}

    # The interpreter is slow: fewer steps of a narrower model.
    steps, model = (3, {"d_model": 32, "n_head": 2, "d_ff": 64}) if method.endswith("-triton") else (8, None)

    def make(**kw):
        return make_config(method=options, steps=steps, model=model, eval_every=0, checkpoint_every=0, **micro, **kw)

    one = tmp_path / "one"
    train(make(), one)
    cfg = tmp_path / "c.toml"
    cfg.write_text(config.dumps(config.to_dict(make(parallel=parallel))))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsetrain.cli", "train", "--config", str(cfg), "--out", str(two)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["loss"] for r in metrics(one)] == pytest.approx([r["loss"] for r in metrics(two)], rel=1e-4)
    wa, wb = final_weights(one), final_weights(two)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=lambda m: k + m)


def test_compiled_training_really_compiles_and_matches_eager(make_config, tmp_path):
    """train.compile=true must compile (some torch releases make `module.compile()` a no-op) and train the same."""
    from torch._dynamo.utils import counters

    small = {"n_layer": 1, "d_model": 32, "n_head": 2, "d_ff": 64}
    train(make_config(steps=3, eval_every=0, checkpoint_every=0, model=small), tmp_path / "eager")
    counters.clear()
    train(make_config(steps=3, eval_every=0, checkpoint_every=0, compile="true", model=small), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1
    a = [r["loss"] for r in metrics(tmp_path / "eager")]
    b = [r["loss"] for r in metrics(tmp_path / "compiled")]
    assert a == pytest.approx(b, rel=1e-4)


COMPILED_PARALLEL = {
    # The model compiled around its DDP module, gradients accumulated over micro-batches (no_sync reached through
    # the compiled wrapper).
    "ddp-accum": ({"n_layer": 1}, {"steps": 3, "eval_every": 0, "micro_batch_size": 2}, {"parallel": "ddp"}),
    # FSDP2 with three blocks in units of two: each block and the output layer's loss compiled, an evaluation (a
    # forward without a backward) between steps.
    "fsdp-units": ({"n_layer": 3}, {"steps": 4, "eval_every": 2}, {"parallel": "fsdp", "fsdp_blocks_per_unit": 2}),
    # FSDP2's default on CPU: one unit of every block, the model's forward compiled whole.
    "fsdp-whole": ({"n_layer": 2}, {"steps": 4, "eval_every": 2}, {"parallel": "fsdp"}),
}


@pytest.mark.parametrize("case", sorted(COMPILED_PARALLEL))
def test_compiled_two_processes_match_one(make_config, tmp_path, case):
    """train.compile=true under torchrun with 2 gloo processes trains the losses (and evaluates the validation
    losses) of one eager process."""
    from sparsetrain import config

    layers, shape, parallel = COMPILED_PARALLEL[case]
    small = {"d_model": 32, "n_head": 2, "d_ff": 64, **layers}

    def make(**kw):
        return make_config(checkpoint_every=0, model=small, **shape, **kw)

    train(make(), tmp_path / "one")
    cfg = tmp_path / "c.toml"
    cfg.write_text(config.dumps(config.to_dict(make(compile="true", **parallel))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsetrain.cli", "train", "--config", str(cfg), "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], rel=1e-4)
    evals = [r["val_loss"] for r in one if "val_loss" in r]
    assert evals == pytest.approx([r["val_loss"] for r in two if "val_loss" in r], rel=1e-4)
    assert len(evals) == (2 if shape["eval_every"] else 1)  # every evaluation (and the final one) compared
