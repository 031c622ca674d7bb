"""The training step, written once: the trainer, the step benchmarks, the bench scripts and the tests all call
`train_step`, so what is timed is what trains and a method's hook order lives in one place:

    lr -> method.before_step -> per micro-batch: forward (+ method.aux_loss), backward -> clip
    -> method.before_optimizer -> optimizer.step -> method.after_optimizer -> zero_grad

Whether the step's loss and gradient norm are finite comes back as a device flag (no host sync). With
`skip_nonfinite` the step reads it before the update (one sync) and, when it is not finite, skips the update:
no optimizer step, the gradients dropped, and the method told to forget the step (`discard_step`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, NamedTuple

import torch
from torch.distributed.tensor import DTensor

from sparsetrain.methods.base import Method
from sparsetrain.nn.model import Transformer

# The phases a step passes through, in order, reported to `on_phase` (the bench scripts time them).
PHASES = ("selected", "backward", "optimizer")


def _region(name: str) -> ContextManager:
    """A named range in a profiler trace (the bench scripts charge the GPU's idle time to these); next to nothing
    when no profiler runs."""
    return torch.profiler.record_function(f"sparsetrain.{name}")


def _no_sync(last: bool) -> ContextManager:
    return contextlib.nullcontext()


@dataclass
class StepParts:
    """What one training step works on."""
    model: Transformer  # the model itself: what the method and gradient clipping see
    forward: torch.nn.Module  # what runs a batch: the model, or the model compiled and/or wrapped (DDP, FSDP2)
    method: Method
    optimizer: torch.optim.Optimizer
    grad_clip: float = 0.0  # 0: no clipping
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    # The gradient sync of a micro-batch, told whether it is the last of the step (the others skip the all-reduce).
    grad_sync: Callable[[bool], ContextManager] = _no_sync
    # Several processes: the step's finite flag made the same on all (each sees its own loss).
    agree: Callable[[torch.Tensor], torch.Tensor] = lambda finite: finite


class StepResult(NamedTuple):
    loss: torch.Tensor  # the step's mean loss, a device tensor (the auxiliary loss is trained on but not in it)
    finite: torch.Tensor  # device bool: the loss and the gradient norm (when clipping computes it) are finite
    skipped: bool  # the update was skipped (only with skip_nonfinite)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`; the total norm comes back as a plain tensor. FSDP2's gradients (DTensors
    sharded over one process group) are clipped on their local shards: the squares of each process's norm summed by
    one all-reduce, rather than DTensor dispatching every per-tensor norm and scale (host time on a small model)."""
    grads = [q.grad for q in params if q.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    meshes = {g.device_mesh for g in sharded}  # equal meshes (each fully_shard call makes its own object)
    if (not sharded or len(sharded) < len(grads) or len(meshes) > 1 or sharded[0].device_mesh.ndim != 1
            or not all(g.placements[0].is_shard() for g in sharded)):  # else torch's, on the DTensors
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    local = [g.to_local() for g in sharded]
    squared = torch.nn.utils.get_total_norm(local, norm_type=2.0).square()
    torch.distributed.all_reduce(squared, group=sharded[0].device_mesh.get_group())
    norm = squared.sqrt()
    # As clip_grad_norm_ scales (clip_grads_with_norm_ reads .grad of parameters; these are the gradients).
    torch._foreach_mul_(local, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def train_step(parts: StepParts, step: int, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int,
               *, lr: float | None = None, on_phase: Callable[[str], None] | None = None,
               skip_nonfinite: bool = False) -> StepResult:
    """One optimizer step over `count` micro-batches (inputs, targets), each on the model's device when it is
    drawn. `lr` sets every parameter group's learning rate first; `on_phase(name)` runs after each of `PHASES`."""
    p = parts
    if lr is not None:
        for group in p.optimizer.param_groups:
            group["lr"] = lr
    with _region("select"):
        p.method.before_step(step)
    if on_phase:
        on_phase("selected")
    step_loss = None
    for i, (x, y) in enumerate(micro_batches):
        # With CUDA graphs (train.cuda_graphs) the next replay may reuse the last one's outputs' memory: all read.
        torch.compiler.cudagraph_mark_step_begin()
        with p.grad_sync(i == count - 1), p.autocast(), _region("forward"):
            loss = p.forward(x, y)
            aux = p.method.aux_loss(p.model)
            total = loss if aux is None else loss + aux
        with _region("backward"):
            (total / count).backward()
        if step_loss is None:
            step_loss = torch.zeros((), device=loss.device)
        step_loss += loss.detach() / count
    if on_phase:
        on_phase("backward")
    finite = torch.isfinite(step_loss)
    if p.grad_clip > 0:
        with _region("clip"):
            norm = clip_grad_norm(list(p.model.parameters()), p.grad_clip)
            finite &= torch.isfinite(norm)
    if skip_nonfinite and not p.agree(finite).item():
        p.optimizer.zero_grad(set_to_none=True)
        p.method.discard_step(step)
        return StepResult(step_loss, finite, True)
    with _region("freeze"):
        p.method.before_optimizer(step)
    with _region("optimizer"):
        p.optimizer.step()
    with _region("unfreeze"):
        p.method.after_optimizer(step)
    p.optimizer.zero_grad(set_to_none=True)
    if on_phase:
        on_phase("optimizer")
    return StepResult(step_loss, finite, False)
