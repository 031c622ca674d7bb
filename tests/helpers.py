"""Builders shared by tests: a seeded tiny model, a method, the trainer's AdamW groups, random token batches, the
trainer's call order by hand, and parameter noise for the interop tests."""
import dataclasses

import torch

from sparsetrain import config
from sparsetrain.config import ModelConfig
from sparsetrain.methods import Dense, RunInfo, build_method
from sparsetrain.nn.model import Transformer, build, resolve
from sparsetrain.training.step import StepParts, train_step


def seeded_model(preset: str, vocab_size: int, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build(ModelConfig(preset=preset, vocab_size=vocab_size, **overrides))


def make_method(cls, model, seq_len: int, total_steps: int, **options):
    """A method of class `cls` for `model` with `options`. It knows the run's length already (the trainer tells it at
    `start`): a test may ask for its schedule before starting it, and `start` below passes the same run on."""
    method = cls.from_config({"name": cls.name, **options}, model.args, seq_len)
    method.run = RunInfo(total_steps=total_steps)
    return method


def start(method, model, optimizer, first_step: int = 0):
    """`method.start` as the trainer calls it, with the run `make_method` gave the method (starting at
    `first_step`: > 0 for a resumed run, whose state is loaded after this)."""
    method.start(model, optimizer, dataclasses.replace(method.run, first_step=first_step))


def make_optimizer(model, lr: float = 1e-2):
    """AdamW with the trainer's two groups: weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr)


def random_batch(vocab_size: int, rows: int, seq_len: int, generator: torch.Generator):
    """(inputs, targets) [rows, seq_len] of uniform random tokens."""
    t = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=generator)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def random_batches(n: int, vocab_size: int, rows: int, seq_len: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [random_batch(vocab_size, rows, seq_len, g) for _ in range(n)]


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter (in eval mode), so that norm gains and biases differ from 1 and 0, experts stop
    being copies and routers route: a swapped mapping shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module.eval()


def train_by_hand(model, method, data, optimizer=None, *, first_step: int = 0, start: bool = True,
                  micro_batches: int = 1, check=None):
    """The trainer's step (`train_step`) on the uncompiled fp32 model: (losses, optimizer). `start`: set the method
    up and start it first; `micro_batches` > 1 splits every batch (hooks see an accumulation); `check(step, phase)`
    runs after backward ('grad') and after the step ('after')."""
    optimizer = optimizer or make_optimizer(model)
    method = method or Dense(None, model.args, 0)
    if start:
        method.setup(model)
        method.start(model, optimizer, dataclasses.replace(method.run, first_step=first_step))
    parts = StepParts(model, model, method, optimizer)
    phases = {"backward": "grad", "optimizer": "after"}
    losses = []
    for step, (x, y) in enumerate(data, start=first_step):
        def on_phase(name, step=step):
            if check and name in phases:
                check(step, phases[name])
        result = train_step(parts, step, zip(x.chunk(micro_batches), y.chunk(micro_batches)), micro_batches,
                            on_phase=on_phase)
        losses.append(result.loss.item())
    return losses, optimizer


def assert_imported_sections_rebuild(model_section, method_section, model, idx, expected, seq_len):
    """What `convert hf-import` writes (config.toml's [model] and [method]) rebuilds the same model: the same args
    (every key survives the config round trip) and the same logits."""
    cfg = config.from_dict({"model": model_section, "method": method_section, "train": {"seq_len": seq_len}})
    args = resolve(cfg.model)
    assert args == model.args
    fresh = Transformer(args)
    build_method(cfg.method, args, seq_len).setup(fresh)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(idx), expected, atol=1e-5, rtol=1e-5)
