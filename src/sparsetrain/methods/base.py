"""The seam every sparsity method plugs into, and `dense`, the baseline that implements it by doing nothing.

The trainer calls, in this order:
    setup(model)                      structure only (replace modules); also run when a model is loaded for eval
    init_weights(model, state)        a fresh run from `train.init_from` (upcycling fills its experts here)
    start(model, optimizer)           once, before the first step (also after a resume, after the state is loaded)
    per step:
        before_step(step)             choose what this step computes (neurons, heads, experts, masks, phase)
        forward/backward (+ aux_loss(model) added to the loss)
        before_optimizer(step)        after gradients are ready (and clipped): mask gradients, stash omitted state
        optimizer.step()
        after_optimizer(step)         restore omitted state, re-apply weight masks, update topology
    before_eval() / after_eval()      around each evaluation on the validation shard
    flops_per_token(step)             training FLOPs per token of that step, as the method computed it
    metrics(step)                     extra numbers for metrics.jsonl
    state_dict() / load_state_dict()  tensors and JSON-able values for checkpoints
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import load_weights
from ..config import fill_dataclass
from ..model import ModelArgs, Transformer, flops_per_token


@dataclass
class DenseOptions:
    pass


class Method:
    name = "dense"
    Options = DenseOptions

    def __init__(self, options, args: ModelArgs, seq_len: int):
        self.options = options
        self.args = args
        self.seq_len = seq_len
        self.total_steps = 0  # set by the trainer before start(): schedules need the length of training
        self.tokens_per_step = 0  # set by the trainer too: spreads a method's occasional work over tokens
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

    def start(self, model: Transformer, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    # --- per step ------------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        pass

    def aux_loss(self, model: Transformer) -> torch.Tensor | None:
        return None

    def before_optimizer(self, step: int) -> None:
        pass

    def after_optimizer(self, step: int) -> None:
        pass

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

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Dense(Method):
    """The baseline: every parameter, every step."""
