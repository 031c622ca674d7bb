"""Leaving parts of parameters exactly as they were through an optimizer step.

SAT's omitted neurons, MST's pruned units and SSD's unrouted experts get a zero gradient on a step, but AdamW
would still move them (momentum, weight decay) and decay their moments. `SliceStash` saves the slices of the
parameters and of their optimizer moments before `optimizer.step()` and puts them back after it.

Eagerly that is one gather and one scatter per tensor: with three tensors (weight, two moments) per sliced matrix,
two matrices per layer and kind, a few hundred small kernels a step. `compiled=True` gathers every slice in one
compiled call and scatters them back in another (the same values, fewer launches).

Under FSDP2 a parameter and its moments are DTensors sharded by rows: each process saves and restores the part of
the slice its shard holds (`shards.local_part`).
"""
from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor

from sparsetrain.methods.shards import local, local_part


def moments(optimizer: torch.optim.Optimizer | None, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's per-element state of `p` (AdamW: exp_avg, exp_avg_sq, max_exp_avg_sq; its `step` is one
    per tensor and is not included)."""
    if optimizer is None:
        return {}
    return {k: t for k, t in optimizer.state.get(p, {}).items() if torch.is_tensor(t) and t.shape == p.shape}


def _gather(tensors: list[torch.Tensor], dims: list[int], idxs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.index_select(d, i) for t, d, i in zip(tensors, dims, idxs)]


def _scatter(tensors: list[torch.Tensor], dims: list[int], idxs: list[torch.Tensor],
             values: list[torch.Tensor]) -> None:
    for t, d, i, v in zip(tensors, dims, idxs, values):
        t.index_copy_(d, i, v)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


class SliceStash:
    """Slices (`idx` along `dim`) of parameters and of their moments, saved and then restored. A moment the optimizer
    creates during the step is zero on the saved slices, as it was before the step.

    Eager (default): `save` gathers at once. `compiled=True`: `save` only records, `take` gathers everything recorded
    in one compiled call (call it before `optimizer.step()`), and `restore` scatters in another."""

    def __init__(self, optimizer: torch.optim.Optimizer, compiled: bool = False):
        self.optimizer, self.compiled = optimizer, compiled
        self.saved: list = []  # eager: (p, dim, idx, value, {moment: slice})
        self.pending: list = []  # compiled: (p, dim, idx), until take()
        self.batch: tuple | None = None  # compiled: what take() gathered

    @torch.no_grad()
    def save(self, p: torch.Tensor, dim: int, idx: torch.Tensor) -> None:
        if self.compiled and not isinstance(p, DTensor):  # a shard's part of a slice varies in length: eager
            self.pending.append((p, dim, idx))
            return
        piece, idx = local_part(p.detach(), dim, idx)
        saved = {k: local(t).index_select(dim, idx) for k, t in moments(self.optimizer, p).items()}
        self.saved.append((p, dim, idx, piece.index_select(dim, idx), saved))

    @torch.no_grad()
    def take(self) -> None:
        """Compiled mode: gather the recorded slices (parameters and the moments they have now)."""
        if not self.pending:
            return
        tensors, dims, idxs, had = [], [], [], []
        for p, dim, idx in self.pending:
            state = moments(self.optimizer, p)
            had.append((p, dim, idx, set(state)))
            for t in (p.detach(), *state.values()):
                tensors.append(t)
                dims.append(dim)
                idxs.append(idx)
        self.batch = (tensors, dims, idxs, _compiled(_gather)(tensors, dims, idxs), had)
        self.pending = []

    @torch.no_grad()
    def restore(self) -> None:
        if self.batch is not None:
            tensors, dims, idxs, values, had = self.batch
            _compiled(_scatter)(tensors, dims, idxs, values)
            for p, dim, idx, keys in had:  # moments the step created (the first one): zero on the slices
                for key, t in moments(self.optimizer, p).items():
                    if key not in keys:
                        t.index_fill_(dim, idx, 0)
            self.batch = None
        for p, dim, idx, value, saved in self.saved:  # idx: into the local tensors
            local(p.detach()).index_copy_(dim, idx, value)
            for key, t in moments(self.optimizer, p).items():
                if key in saved:
                    local(t).index_copy_(dim, idx, saved[key])
                else:
                    local(t).index_fill_(dim, idx, 0)
        self.saved = []

