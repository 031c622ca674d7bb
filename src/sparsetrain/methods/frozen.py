"""Leaving parts of parameters exactly as they were through an optimizer step.

SAT's omitted neurons, MST's pruned units and SSD's unrouted experts get a zero gradient on a step, but AdamW
would still move them (momentum, weight decay) and decay their moments. `SliceStash` saves the slices of the
parameters and of their optimizer moments before `optimizer.step()` and puts them back after it.
"""
from __future__ import annotations

import torch


def moments(optimizer: torch.optim.Optimizer | None, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's per-element state of `p` (AdamW: exp_avg, exp_avg_sq, max_exp_avg_sq; its `step` is one
    per tensor and is not included)."""
    if optimizer is None:
        return {}
    return {k: t for k, t in optimizer.state.get(p, {}).items() if torch.is_tensor(t) and t.shape == p.shape}


class SliceStash:
    """Slices (`idx` along `dim`) of parameters and of their moments, saved and then restored. A moment the optimizer
    creates during the step is zero on the saved slices, as it was before the step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.saved: list = []

    @torch.no_grad()
    def save(self, p: torch.Tensor, dim: int, idx: torch.Tensor) -> None:
        saved = {k: t.index_select(dim, idx) for k, t in moments(self.optimizer, p).items()}
        self.saved.append((p, dim, idx, p.detach().index_select(dim, idx), saved))

    @torch.no_grad()
    def restore(self) -> None:
        for p, dim, idx, value, saved in self.saved:
            p.index_copy_(dim, idx, value)
            for key, t in moments(self.optimizer, p).items():
                if key in saved:
                    t.index_copy_(dim, idx, saved[key])
                else:
                    t.index_fill_(dim, idx, 0)
        self.saved = []
