"""Shared fixtures: one tiny prepared corpus per test session, a tiny training config, and a way to interrupt a
run right after a checkpoint."""
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels' tests run through Triton's interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One tile configuration per kernel: autotuning every test's shapes over all of them took minutes on the GPU.
os.environ.setdefault("SPARSETRAIN_KERNEL_TUNING", "off")

from sparsetrain import config
from sparsetrain.data.prepare import prepare


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A few hundred kB of the standard library, BPE vocabulary 512: seconds to prepare. 422,205 bytes: the
    documents the fixture has always held (before --max-bytes cut inside a document, the limit of 400 kB read the
    last one whole)."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare("stdlib", out, vocab_size=512, max_bytes=422_205, val_fraction=0.05, progress=False)
    return out


def tiny_config(data_dir, **train):
    """A model small enough that a CPU step takes milliseconds."""
    raw = {
        "model": {"preset": "tiny", "n_layer": 2, "d_model": 64, "n_head": 4, "d_ff": 256, "max_seq_len": 64},
        "data": {"dir": str(data_dir)},
        "train": {"steps": 12, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6,
                  "eval_tokens": 2048, "checkpoint_every": 6, "log_every": 1, "progress": False, **train},
        "method": {"name": "dense"},
    }
    return raw


@pytest.fixture
def make_config(tiny_data):
    def make(method=None, model=None, **train):
        raw = tiny_config(tiny_data, **train)
        if method:
            raw["method"] = method
        if model:
            raw["model"].update(model)
        return config.from_dict(raw)

    return make


@pytest.fixture
def interrupt_after_checkpoint(monkeypatch):
    """`with interrupt_after_checkpoint(6): train(...)`: the run stops (KeyboardInterrupt) right after writing its
    step-6 checkpoint, as a run killed there would."""
    import sparsetrain.training.loop as train_mod

    real = train_mod.save_checkpoint

    @contextlib.contextmanager
    def interrupt(at_step: int):
        def save_then_die(run_dir, step, **kw):
            path = real(run_dir, step, **kw)
            if step == at_step:
                raise KeyboardInterrupt
            return path

        monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(train_mod, "save_checkpoint", real)

    return interrupt
