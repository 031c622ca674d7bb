"""The seam every sparsity method plugs into, and `dense`, the baseline that implements it by doing nothing.

The trainer calls, in this order:
    setup(model)                      structure only (replace modules); also run when a model is loaded for eval
    init_weights(model, state)        a fresh run from `train.init_from` (upcycling fills its experts here)
    start(model, optimizer, run)      once, before the first step, with what the method must know of the run
                                      (`RunInfo`: its length, tokens per step, processes, where it starts)
    load_state_dict(state)            a resumed run: after start, with the model's and optimizer's state in place
    per step:
        before_step(step)             choose what this step computes (neurons, heads, experts, masks, phase)
        forward/backward (+ aux_loss(model) added to the loss)
        before_optimizer(step)        after gradients are ready (and clipped): mask gradients, stash omitted state
        optimizer.step()
        after_optimizer(step)         restore omitted state, re-apply weight masks, update topology
        discard_step(step)            instead of the three above when the step's loss or gradients were not finite
                                      and its update is skipped (train.on_nonfinite = "skip")
    before_eval() / after_eval()      around each evaluation on the validation shard
    flops_per_token(step)             training FLOPs per token of that step, as the method computed it
    metrics(step)                     extra numbers for metrics.jsonl
    final_note()                      at the end: why the method never did its work (printed, in summary.json)
    state_dict() / load_state_dict()  tensors and JSON-able values for checkpoints
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from sparsetrain.config import fill_dataclass
from sparsetrain.nn.model import ModelArgs, Transformer, flops_per_token
from sparsetrain.store.checkpoint import load_weights


@dataclass(frozen=True)
class RunInfo:
    """What a method knows of the run it trains in, given at `start`."""
    total_steps: int = 0  # optimizer steps of the whole run: schedules are fractions of it
    tokens_per_step: int = 0  # 0: unknown; spreads a method's occasional work over the tokens (SSD's checks)
    world: int = 1  # processes (torchrun); methods that decide something decide it the same on every one
    rank: int = 0
    parallel: str = "ddp"  # ddp | fsdp: how the model is split over the processes (when world > 1)
    first_step: int = 0  # > 0: a resumed run, whose state comes next through load_state_dict
    skip_nonfinite: bool = False  # a step may be discarded (discard_step) instead of updated

    @property
    def distributed(self) -> bool:
        return self.world > 1


@dataclass
class DenseOptions:
    pass


class Method:
    name = "dense"
    Options = DenseOptions
    # Run and checked under CUDA graphs (train.cuda_graphs; tests/test_cuda_graphs.py on a GPU). Module attributes
    # the compiled forward reads (kept indices, statistics) must then stay at one address from step to step.
    cuda_graphs = True
    # Compiled with static shapes (each new shape, e.g. an evaluation batch, compiles its own graph, where by default
    # the second shape makes the sizes symbolic): for models whose kernels inductor fails to compile symbolically.
    static_shapes = False

    def __init__(self, options, args: ModelArgs, seq_len: int):
        self.options = options
        self.args = args
        self.seq_len = seq_len
        self.run = RunInfo()  # replaced by start()
        self.model: Transformer | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def from_config(cls, method_cfg: dict[str, Any], args: ModelArgs, seq_len: int) -> "Method":
        values = {k: v for k, v in method_cfg.items() if k != "name"}
        options = fill_dataclass(cls.Options, values, "method")
        cls.validate(options, args, seq_len)
        return cls(options, args, seq_len)

    @classmethod
    def validate(cls, options, args: ModelArgs, seq_len: int) -> None:
        """Raise UserError for option values that cannot work with this model."""

    def options_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.options)}

    # --- structure and lifecycle -------------------------------------------------------------------------------
    def setup(self, model: Transformer) -> None:
        self.model = model

    def init_weights(self, model: Transformer, state: dict[str, torch.Tensor], source: str) -> None:
        """Start a run from the weights of another (`train.init_from`); by default they must match exactly."""
        load_weights(model, state, source)

    def start(self, model: Transformer, optimizer: torch.optim.Optimizer, run: RunInfo) -> None:
        """Ready to train `model` with `optimizer` (weights loaded; sharded and on its device)."""
        self.model, self.optimizer, self.run = model, optimizer, run

    @property
    def total_steps(self) -> int:
        return self.run.total_steps

    # --- per step ------------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        pass

    def aux_loss(self, model: Transformer) -> torch.Tensor | None:
        return None

    def before_optimizer(self, step: int) -> None:
        pass

    def after_optimizer(self, step: int) -> None:
        pass

    def discard_step(self, step: int) -> None:
        """The step's update is skipped (its loss or gradients were not finite): forget what its forward and
        backward gathered (statistics, gradients kept for later), so nothing non-finite outlives the step."""

    # --- accounting ---------------------------------------------------------------------------------------------
    def dense_flops_per_token(self) -> float:
        """Training FLOPs per token of the dense model (forward + backward = 3x forward)."""
        return 3 * sum(flops_per_token(self.args, self.seq_len).values())

    def flops_per_token(self, step: int) -> float:
        return self.dense_flops_per_token()

    def before_eval(self) -> None:
        """Put the model in the state it is evaluated in (for example: every neuron computed)."""

    def after_eval(self) -> None:
        """Undo `before_eval` so training continues where it was."""

    def metrics(self, step: int) -> dict[str, Any]:
        return {}

    def final_note(self) -> str | None:
        """At the end of a run: one line saying the method never did what it is for (SSD never went sparse), with
        the reason in numbers; None when it did. The trainer prints it and puts it in summary.json, so a run that
        trained densely throughout is not mistaken for the method's result."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output; called after `start`."""


class Dense(Method):
    """The baseline: every parameter, every step."""
