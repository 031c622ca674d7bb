"""Shared fixtures: one tiny prepared corpus per test session, and a tiny training config."""
import pytest

from sparsetrain import config
from sparsetrain.data import prepare


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A few hundred kB of the standard library, BPE vocabulary 512: seconds to prepare."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare("stdlib", out, vocab_size=512, max_bytes=400_000, val_fraction=0.05, progress=False)
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
