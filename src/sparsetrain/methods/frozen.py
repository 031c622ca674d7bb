"""Leaving parts of parameters exactly as they were through an optimizer step.

SAT's omitted neurons, MST's pruned units and SSD's unrouted experts get a zero gradient on a step, but AdamW
would still move them (momentum, weight decay) and decay their moments. Two ways to hold them:

`FrozenSlices` (masked): the optimizer steps every other parameter, and these get one AdamW update under a keep
mask: the omitted entries and their moments are never written. On a GPU that is one compiled pass over each tensor,
as much memory traffic as the optimizer's own step; the reference (`compiled=False`) runs torch's own AdamW on
copies and keeps their kept entries, so it is bit-identical to stash + step + restore.

`SliceStash`: saves the slices of the parameters and of their optimizer moments before `optimizer.step()` and puts
them back after it. `FrozenSlices` falls back to it where the mask does not apply (a parameter's first step, an
optimizer other than AdamW).

Eagerly that is one gather and one scatter per tensor: with three tensors (weight, two moments) per sliced matrix,
two matrices per layer and kind, a few hundred small kernels a step. `compiled=True` gathers every slice in one
compiled call and scatters them back in another (the same values, fewer launches).

Under FSDP2 a parameter and its moments are DTensors sharded by rows: each process updates its own rows under its
part of the mask, or saves and restores the part of the slice its shard holds (`shards.local_part`).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam

from sparsetrain.methods.shards import local, local_part, shard_dim, shard_offset


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
def compiled(fn):
    """`fn` compiled once (static shapes: each distinct set of shapes compiles its own graph)."""
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
        self.batch = (tensors, dims, idxs, compiled(_gather)(tensors, dims, idxs), had)
        self.pending = []

    @torch.no_grad()
    def restore(self) -> None:
        if self.batch is not None:
            tensors, dims, idxs, values, had = self.batch
            compiled(_scatter)(tensors, dims, idxs, values)
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



def _adamw_under_mask(ps, gs, ms, vs, keeps, steps, hps) -> None:
    """AdamW (decoupled weight decay, no amsgrad) of each parameter where `keep`, the old values elsewhere.
    hps: float64 [n, 5] rows of lr, weight decay, beta1, beta2, eps: the per-tensor scalars are worked out in
    float64, as torch's AdamW does on the host (1 - 0.999 in float32 is off by 1e-5). Compiled: one pass per tensor."""
    for p, g, m, v, keep, step, hp in zip(ps, gs, ms, vs, keeps, steps, hps.unbind(0)):
        lr, wd, beta1, beta2, eps = hp.unbind(0)
        step.add_(1)
        t = step.double()
        decay, step_size = (1 - lr * wd).float(), (lr / (1 - beta1 ** t)).float()
        root2, eps = (1 - beta2 ** t).sqrt().float(), eps.float()
        m_new = torch.lerp(m, g, (1 - beta1).float())
        v_new = v * beta2.float() + g * g * (1 - beta2).float()
        p_new = p * decay - step_size * m_new / (v_new.sqrt() / root2 + eps)
        p.copy_(torch.where(keep, p_new, p))
        m.copy_(torch.where(keep, m_new, m))
        v.copy_(torch.where(keep, v_new, v))


def _adamw_reference(group: dict[str, Any], ps, gs, ms, vs, keeps, steps) -> None:
    """The same update through torch's own AdamW (the group's settings: fused, foreach) on copies: bit-identical to
    an unmasked step on the kept entries."""
    copies = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    adam(copies[0], gs, copies[1], copies[2], [], steps, foreach=group["foreach"], capturable=group["capturable"],
         differentiable=False, fused=group["fused"], decoupled_weight_decay=True, amsgrad=False,
         beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"],
         eps=group["eps"], maximize=False)
    for olds, news in zip((ps, ms, vs), copies):
        for old, new, keep in zip(olds, news, keeps):
            old.copy_(torch.where(keep, new, old))


class FrozenSlices:
    """Slices (`idx` along `dim`) of parameters held exactly as they were through an AdamW step, under a mask where
    it applies (see the module's docstring), else by `SliceStash`.

    Each step: freeze(...) for each slice, then before_step() just before `optimizer.step()` (it takes the masked
    parameters' gradients away, so the optimizer skips them), then after_step() just after (it updates them under
    their masks and restores what was stashed). One instance serves every step of a run."""

    def __init__(self, optimizer: torch.optim.Optimizer, compiled: bool, masked: bool = True):
        self.optimizer, self.compiled, self.masked = optimizer, compiled, masked
        self.stash = SliceStash(optimizer, compiled=compiled)
        self.keep: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> keep mask, broadcastable to it
        self.grads: list[torch.Tensor] = []
        self.group_of = {id(q): i for i, g in enumerate(optimizer.param_groups) for q in g["params"]}

    def _maskable(self, p: torch.Tensor) -> bool:
        state = self.optimizer.state.get(p, {})
        if not (self.masked and isinstance(self.optimizer, torch.optim.AdamW)
                and p.grad is not None and {"exp_avg", "exp_avg_sq", "step"} <= state.keys()):
            return False  # a first step (no moments yet) goes through the stash
        group = self.optimizer.param_groups[self.group_of[id(p)]]
        if group["amsgrad"] or group["maximize"] or group["differentiable"]:
            return False
        # The compiled update counts steps on the parameter's device (fused AdamW), the reference anywhere.
        return not self.compiled or state["step"].device == p.device

    @torch.no_grad()
    def freeze(self, p: torch.Tensor, dim: int, idx: torch.Tensor | None, keep: torch.Tensor | None = None) -> None:
        """Hold `p`'s entries at `idx` along `dim`. `keep`: the same as a boolean vector along `dim` (False at
        `idx`), when the caller has it (saves building it); with `keep`, `idx` may be None: it is then found (a host
        sync) only where the stash needs it."""
        if not self._maskable(p):
            self.stash.save(p, dim, (~keep).nonzero().flatten() if idx is None else idx)
            return
        if keep is None:
            keep = torch.ones(p.shape[dim], dtype=torch.bool, device=p.device).index_fill_(0, idx, False)
        if isinstance(p, DTensor) and shard_dim(p) == dim % p.dim():  # this process's rows of the mask
            keep = keep.narrow(0, shard_offset(p), p.to_local().shape[dim])
        shape = [1] * p.dim()
        shape[dim] = -1
        keep = keep.view(shape)
        self.keep[p] = keep if p not in self.keep else self.keep[p] & keep

    @torch.no_grad()
    def before_step(self) -> None:
        self.stash.take()
        for p in self.keep:
            self.grads.append(p.grad)
            p.grad = None  # the optimizer skips a parameter without a gradient

    @torch.no_grad()
    def after_step(self) -> None:
        self.stash.restore()
        if self.keep:
            if self.compiled:
                self._compiled_update()
            else:
                for group, items in self._by_group().items():
                    _adamw_reference(self.optimizer.param_groups[group], *zip(*items))
        self.keep, self.grads = {}, []

    def _by_group(self) -> dict[int, list[tuple]]:
        """(parameter, gradient, exp_avg, exp_avg_sq, keep, step) of the masked parameters, by optimizer group;
        FSDP2's DTensors as this process's shards (the keep masks are of those already)."""
        out: dict[int, list[tuple]] = {}
        for (p, keep), grad in zip(self.keep.items(), self.grads):
            s = self.optimizer.state[p]
            member = (local(p.detach()), local(grad), local(s["exp_avg"]), local(s["exp_avg_sq"]), keep,
                      local(s["step"]))
            out.setdefault(self.group_of[id(p)], []).append(member)
        return out

    def _compiled_update(self) -> None:
        items, hps = [], []
        for group, members in self._by_group().items():
            g = self.optimizer.param_groups[group]
            items += members
            hps += [[float(g["lr"]), g["weight_decay"], g["betas"][0], g["betas"][1], g["eps"]]] * len(members)
        device = items[0][0].device
        hp = torch.tensor(hps, dtype=torch.float64)
        hp = hp.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else hp.to(device)
        ps, gs, ms, vs, keeps, steps = (list(t) for t in zip(*items))
        compiled(_adamw_under_mask)(ps, gs, ms, vs, keeps, steps, hp)
