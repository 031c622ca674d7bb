"""Builders shared by tests: a seeded tiny model, a method, the trainer's AdamW groups, random token batches, the
trainer's call order by hand, and parameter noise for the interop tests."""
import torch

from sparsetrain.config import ModelConfig
from sparsetrain.model import build


def seeded_model(preset: str, vocab_size: int, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build(ModelConfig(preset=preset, vocab_size=vocab_size, **overrides))


def make_method(cls, model, seq_len: int, total_steps: int, **options):
    """A method of class `cls` for `model` with `options`, told the run's length (as the trainer tells it)."""
    method = cls.from_config({"name": cls.name, **options}, model.args, seq_len)
    method.total_steps = total_steps
    return method


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
    """The trainer's call order, by hand: (losses, optimizer). `start`: set the method up and start it first;
    `micro_batches` > 1 splits every batch (hooks see an accumulation); `check(step, phase)` runs after backward
    ('grad') and after the step ('after')."""
    optimizer = optimizer or make_optimizer(model)
    if method is not None and start:
        method.setup(model)
        method.start(model, optimizer)
    losses = []
    for step, (x, y) in enumerate(data, start=first_step):
        if method:
            method.before_step(step)
        loss = 0.0
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            part = model(xs, ys) / micro_batches
            part.backward()
            loss += part.item()
        if check:
            check(step, "grad")
        if method:
            method.before_optimizer(step)
        optimizer.step()
        if method:
            method.after_optimizer(step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if check:
            check(step, "after")
    return losses, optimizer
