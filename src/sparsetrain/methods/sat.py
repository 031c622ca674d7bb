"""SAT: sparsity-accelerated training. Each step computes only the more important FFN neurons and attention head groups.

Per step and per layer one kept set, shared across the batch, is chosen by an importance score (`uniform`, `magnitude`,
`wanda`, `maxip`) with `topk` or by sampling in proportion to the score; the model then multiplies by `index_select`ed
weight slices (`FFN.active`, `Attention.active`), so the GEMMs are really smaller. Omitted neurons and heads are left
exactly as they were (AdamW moves a weight with a zero gradient through momentum and weight decay): the sliced
parameters get their AdamW update under a keep mask (`frozen.FrozenSlices`), or, with `freeze_by = "stash"`, their
omitted slices and moments are stashed before `optimizer.step()` and put back after it. The omission rate follows the
ladder omission rate scheduler (LORS): a fixed rate first, then lower rates in equal steps, dense at the end.
Under FSDP2 the forward slices the gathered weights as usual; scores from sharded weights gather one vector per layer
(with rank 0's statistics), and each process freezes the part of the omitted slices its shard holds.

Scores, per FFN neuron (its `fc` rows, both gate and up for SwiGLU, and its `proj` column) and per kv-head group
(its query, key and value rows and its `proj` columns; a group carries the query heads that share its key/value):
  uniform    a uniformly random subset every step.
  magnitude  L2 norm of all the neuron's (group's) weights.
  wanda      sum over the input rows of |W_ij| * rms(x_j): the input x of a block is computed in full whatever this
             layer omits, so these statistics are complete and unbiased every step, and cost one reduction.
  maxip      running mean of |<w, x>| per neuron (the L2 norm of the gate/up pair for SwiGLU) and of the norm of
             each head's output per group. Measured on a sample of each micro-batch's sequences for the neurons
             computed that step (one small extra GEMM), or for all of them with `stats_dense_pass`. A neuron never
             measured scores twice the best measured one in its layer, so it is tried (and measured) soon.
Activation statistics are exponential moving averages with a per-entry weight (so partial updates and the first
update need no special case), gathered by forward hooks on steps where `step % stats_every == 0`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from sparsetrain.errors import UserError
from sparsetrain.methods.base import Method, RunInfo
from sparsetrain.methods.frozen import FrozenSlices, compiled
from sparsetrain.methods.shards import replicated, whole
from sparsetrain.methods.units import (KINDS, at_fixed_address, complement, fold, keep_count, layered_rows_cols,
                                       same_on_all_ranks, unit_count, unit_module, unit_params)
from sparsetrain.nn.model import ModelArgs, Transformer, flops_per_token

METRICS = ("uniform", "magnitude", "wanda", "maxip")
SELECTS = ("topk", "sample")
SCHEDULES = ("ladder", "constant", "linear")
FREEZE_BY = ("mask", "stash")


@dataclass
class SATOptions:
    ffn_rate: float = 0.5  # share of FFN neurons omitted per layer, in [0, 1)
    head_rate: float = 0.5  # share of kv-head groups omitted per layer (each with its query heads), in [0, 1)
    # wanda by default: its statistics (block inputs) are complete every step whatever was omitted, and cost no GEMM.
    metric: str = "wanda"  # uniform | magnitude | wanda | maxip
    # topk by default: it lost less validation loss than sampling in both comparisons run (BENCHMARKS.md: sat-cpt on
    # an H200; bench/sat_selection.py on the CPU). Its risk: an omitted neuron is not updated, so under a weight-only
    # metric (magnitude) it stays omitted until the ladder lowers the rate; sampling gives every neuron a chance.
    select: str = "topk"  # topk | sample (in proportion to the score, without replacement)
    ffn_multiple: int = 64  # kept neurons rounded to a multiple of this (GEMM-friendly shapes)
    head_multiple: int = 1  # kept head groups rounded to a multiple of this
    exempt_layers: list[int] = field(default_factory=list)  # layers kept dense; negative indices count from the end
    schedule: str = "ladder"  # ladder (LORS) | constant | linear
    ladder_start: float = 0.5  # fraction of training at the full rate before the ladder starts
    ladder_steps: int = 3  # lower rates between ladder_start and the dense end: rate * (1 - i / (ladder_steps + 1))
    dense_warmup: float = 0.0  # fraction of training kept dense at the start (SparseLoRA keeps ~0.1)
    dense_final: float = 0.1  # fraction of training kept dense at the end
    stats_every: int = 1  # gather activation statistics and refresh scores every this many steps
    stats_fraction: float = 0.125  # share of each micro-batch's sequences the statistics are measured on (>= 1)
    stats_decay: float = 0.9  # EMA decay of the activation statistics, per measurement
    stats_dense_pass: bool = False  # maxip: measure every neuron/group, not only those computed (extra FLOPs)
    seed: int = 0  # seeds the sampler (uniform metric, sample selection)
    # Leave omitted weights and their AdamW moments exactly as they were (the design). False lets AdamW move them
    # with their zero gradient (momentum, weight decay): an ablation that prices the stash/restore.
    freeze_omitted: bool = True
    # How: "mask" updates the sliced parameters under a keep mask (one pass, as much traffic as AdamW's own step);
    # "stash" saves the omitted slices and moments, lets AdamW step everything, and puts them back. The same values.
    freeze_by: str = "mask"  # mask | stash
    # Freeze (and score) with compiled calls: the masked update one fused pass per tensor, the stash two calls
    # (gather, scatter) instead of one per tensor. "auto": on a GPU; off on the CPU, where compiling costs more than
    # it saves on a tiny model (and the uncompiled mask is bit-identical to the stash).
    compiled_stash: bool | str = "auto"  # auto | true | false


def _ema_(total: torch.Tensor, weight: torch.Tensor, value: torch.Tensor, idx: torch.Tensor | None, decay: float):
    """total/weight is a running mean; update it with `value` at `idx` (None = everywhere), in place."""
    if idx is None:
        total.mul_(decay).add_(value, alpha=1 - decay)
        weight.mul_(decay).add_(1 - decay)
    else:
        total.index_copy_(0, idx, total.index_select(0, idx).mul_(decay).add_(value, alpha=1 - decay))
        weight.index_copy_(0, idx, weight.index_select(0, idx).mul_(decay).add_(1 - decay))


def _optimistic(total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Running means [L, n]; an entry never measured gets twice its layer's best measured mean (1 if none is)."""
    seen = weight > 0
    mean = torch.where(seen, total / weight.clamp_min(1e-30), torch.zeros_like(total))
    best = mean.amax(dim=1, keepdim=True)
    fill = torch.where(best > 0, 2 * best, torch.ones_like(best))
    return torch.where(seen, mean, fill)


def _wanda_rows(weights: list[torch.Tensor], rms: torch.Tensor) -> torch.Tensor:
    """sum_j |W_ij| rms_j for each layer's weight [rows, d] and its row of rms [L, d] -> [L, rows]."""
    return torch.stack([(w.abs() * r.to(w.dtype)).sum(1) for w, r in zip(weights, rms)])


class SAT(Method):
    name = "sat"
    Options = SATOptions

    def __init__(self, options: SATOptions, args: ModelArgs, seq_len: int):
        super().__init__(options, args, seq_len)
        L = args.n_layer
        exempt = {i % L for i in options.exempt_layers}
        self.layers = [i for i in range(L) if i not in exempt]  # the layers SAT makes sparse
        self.generator: torch.Generator | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self._kept_buffers: dict[str, torch.Tensor] = {}  # kept indices by kind, at a fixed address (CUDA graphs)
        self.scores: dict[str, torch.Tensor] = {}  # cached between refreshes (stats_every > 1)
        self.kept: dict[str, torch.Tensor | None] = {"ffn": None, "head": None}  # [len(layers), k] this step
        self.gathering = False  # read by the hooks: statistics are wanted on this step
        self._gather_ffn_now = self._gather_head_now = False
        self._frozen: FrozenSlices | None = None
        self._hooks: list = []
        self._stats_before: dict[str, torch.Tensor] | None = None

    # --- options ------------------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, o: SATOptions, args: ModelArgs, seq_len: int) -> None:
        for key, n, what in [("ffn_rate", args.d_ff, "FFN neurons"), ("head_rate", args.n_kv_head, "kv-head groups")]:
            rate = getattr(o, key)
            if not 0 <= rate < 1:
                raise UserError(f"method.{key}={rate} is outside [0, 1); it is the share of {what} left out")
            if keep_count(n, rate, 1) == 0:
                largest = (n - 0.5) / n
                raise UserError(
                    f"method.{key}={rate} keeps none of the {n} {what} per layer; use a rate of at most {largest:.4g}"
                )
        for key, allowed in [("metric", METRICS), ("select", SELECTS), ("schedule", SCHEDULES),
                             ("freeze_by", FREEZE_BY)]:
            if getattr(o, key) not in allowed:
                raise UserError(f"unknown method.{key} '{getattr(o, key)}'; choose one of {', '.join(allowed)}")
        if o.compiled_stash not in (True, False, "auto"):
            raise UserError(f"method.compiled_stash must be auto, true or false, got {o.compiled_stash!r}")
        for key in ["ffn_multiple", "head_multiple", "stats_every"]:
            if getattr(o, key) < 1:
                raise UserError(f"method.{key} must be at least 1, got {getattr(o, key)}")
        if o.ladder_steps < 0:
            raise UserError(f"method.ladder_steps must be >= 0, got {o.ladder_steps}")
        bad = [i for i in o.exempt_layers if not -args.n_layer <= i < args.n_layer]
        if bad:
            raise UserError(
                f"method.exempt_layers has {bad}, outside the model's {args.n_layer} layers; "
                f"use indices in [{-args.n_layer}, {args.n_layer - 1}]"
            )
        for key in ["ladder_start", "dense_warmup", "dense_final"]:
            if not 0 <= getattr(o, key) <= 1:
                raise UserError(f"method.{key} must be a fraction of training in [0, 1], got {getattr(o, key)}")
        if o.dense_warmup + o.dense_final > 1:
            raise UserError(
                f"method.dense_warmup + method.dense_final = {o.dense_warmup + o.dense_final} is more than all of "
                "training; make them add up to at most 1"
            )
        if o.schedule == "ladder" and not o.dense_warmup <= o.ladder_start <= 1 - o.dense_final:
            raise UserError(
                f"method.ladder_start={o.ladder_start} must lie between method.dense_warmup={o.dense_warmup} "
                f"and 1 - method.dense_final={1 - o.dense_final}"
            )
        if not 0 < o.stats_fraction <= 1:
            raise UserError(f"method.stats_fraction must be in (0, 1], got {o.stats_fraction}")
        if not 0 <= o.stats_decay < 1:
            raise UserError(f"method.stats_decay must be in [0, 1), got {o.stats_decay}")

    # --- schedule -----------------------------------------------------------------------------------------------
    def scheduled_rate(self, rate: float, step: int) -> float:
        """The omission rate in force at `step` for a configured rate (LORS, constant or linear)."""
        if not self.total_steps:
            raise RuntimeError("SAT needs the run's optimizer steps (RunInfo.total_steps), given to start()")
        o = self.options
        p = step / self.total_steps
        end = 1 - o.dense_final
        if rate == 0 or p < o.dense_warmup or p >= end:
            return 0.0
        if o.schedule == "constant":
            return rate
        if o.schedule == "linear":
            return rate * (end - p) / (end - o.dense_warmup)
        if p < o.ladder_start or o.ladder_steps == 0:
            return rate
        rung = min(int((p - o.ladder_start) / (end - o.ladder_start) * o.ladder_steps), o.ladder_steps - 1) + 1
        return rate * (1 - rung / (o.ladder_steps + 1))

    def rates(self, step: int) -> tuple[float, float]:
        return self.scheduled_rate(self.options.ffn_rate, step), self.scheduled_rate(self.options.head_rate, step)

    def keep_counts(self, step: int) -> tuple[int, int]:
        """Kept FFN neurons and kv-head groups per sparse layer at `step` (n = dense)."""
        ffn_rate, head_rate = self.rates(step)
        return (
            keep_count(self.args.d_ff, ffn_rate, self.options.ffn_multiple),
            keep_count(self.args.n_kv_head, head_rate, self.options.head_multiple),
        )

    def _gathers(self, kind: str, step: int) -> bool:
        """Statistics of `kind` are wanted on this step: the metric uses them and a sparse step may still come."""
        o = self.options
        rate = o.ffn_rate if kind == "ffn" else o.head_rate
        needs = o.metric in ("wanda", "maxip") and rate > 0 and self.layers
        return bool(needs) and step % o.stats_every == 0 and step < (1 - o.dense_final) * self.total_steps

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, model: Transformer, optimizer: torch.optim.Optimizer, run: RunInfo) -> None:
        super().start(model, optimizer, run)
        device = model.wte.weight.device
        self._compiled = self.options.compiled_stash is True or (
            self.options.compiled_stash == "auto" and device.type == "cuda")
        self._frozen = FrozenSlices(optimizer, compiled=self._compiled, masked=self.options.freeze_by == "mask")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.options.seed)
        Ls, d = len(self.layers), self.args.d_model
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
        if self.options.metric == "wanda":
            # Mean square of each input feature of the FFN and of the attention (one weight per layer: all features
            # are measured together).
            self.stats = {"ffn_in": zeros(Ls, d), "ffn_in_w": zeros(Ls, 1),
                          "attn_in": zeros(Ls, d), "attn_in_w": zeros(Ls, 1)}
        elif self.options.metric == "maxip":
            self.stats = {"ffn_ip": zeros(Ls, self.args.d_ff), "ffn_ip_w": zeros(Ls, self.args.d_ff),
                          "head_out": zeros(Ls, self.args.n_kv_head), "head_out_w": zeros(Ls, self.args.n_kv_head)}
        if device.type == "cuda":  # written by the compiled forward's hooks: CUDA graphs replay at fixed addresses
            for t in self.stats.values():
                torch._dynamo.mark_static_address(t)
        self.scores = {}
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.stats:
            for j, i in enumerate(self.layers):
                block = model.blocks[i]
                self._hooks.append(block.mlp.register_forward_hook(self._ffn_hook(j)))
                self._hooks.append(block.attn.register_forward_hook(self._attn_hook(j)))

    # --- activation statistics (forward hooks) ------------------------------------------------------------------
    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        """The first sequences of a micro-batch [B, T, d]: data order is random, so they are a fair sample."""
        return x[: max(1, math.ceil(self.options.stats_fraction * x.shape[0]))]

    def _ffn_hook(self, j: int):
        def hook(mlp, inputs, output):
            if self.gathering and self._gather_ffn_now:
                with torch.no_grad():
                    self._gather_ffn(j, mlp, self._sample(inputs[0]).flatten(0, 1))

        return hook

    def _attn_hook(self, j: int):
        def hook(attn, inputs, output):
            if self.gathering and self._gather_head_now:
                with torch.no_grad():
                    self._gather_head(j, attn, self._sample(inputs[0]), inputs[1])

        return hook

    def _gather_ffn(self, j: int, mlp, x: torch.Tensor) -> None:
        decay, s = self.options.stats_decay, self.stats
        if self.options.metric == "wanda":
            _ema_(s["ffn_in"][j], s["ffn_in_w"][j], x.float().square().mean(0), None, decay)
            return
        neurons = None if self.options.stats_dense_pass else mlp.active
        if neurons is None:
            weight, bias = mlp.fc.weight, mlp.fc.bias
        else:
            rows = mlp.in_rows(neurons)
            weight = mlp.fc.weight.index_select(0, rows)
            bias = mlp.fc.bias.index_select(0, rows) if mlp.fc.bias is not None else None
        pre = F.linear(x, weight, bias).float()
        if mlp.activation == "swiglu":
            pre = pre.view(x.shape[0], 2, -1).norm(dim=1)  # gate and up inner products together
        _ema_(s["ffn_ip"][j], s["ffn_ip_w"][j], pre.abs().mean(0), neurons, decay)

    def _gather_head(self, j: int, attn, x: torch.Tensor, rope) -> None:
        decay, s = self.options.stats_decay, self.stats
        if self.options.metric == "wanda":
            _ema_(s["attn_in"][j], s["attn_in_w"][j], x.flatten(0, 1).float().square().mean(0), None, decay)
            return
        groups = None if self.options.stats_dense_pass else attn.active
        y = attn.head_outputs(x, rope, groups)  # [B, heads, T, d]
        per_head = y.float().norm(dim=-1).mean(dim=(0, 2))
        per_group = per_head.view(-1, attn.n_head // attn.n_kv_head).mean(1)
        _ema_(s["head_out"][j], s["head_out_w"][j], per_group, groups, decay)

    # --- scores and selection -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _scores(self, kind: str) -> torch.Tensor:
        """Importance [len(layers), n] of FFN neurons (kind 'ffn') or kv-head groups (kind 'head'), float32.

        Per layer only the products over the weights; the rest runs once over the stacked layers (few launches).
        """
        metric, s = self.options.metric, self.stats
        if metric == "maxip":
            key = "ffn_ip" if kind == "ffn" else "head_out"
            return _optimistic(s[key], s[key + "_w"])
        blocks = [self.model.blocks[i] for i in self.layers]
        ins = [unit_params(unit_module(b, kind), kind)[0][0] for b in blocks]
        if metric == "wanda":
            key = "ffn_in" if kind == "ffn" else "attn_in"
            rms = torch.where(s[key + "_w"] > 0, (s[key] / s[key + "_w"].clamp_min(1e-30)).sqrt(), 1.0)
            if isinstance(ins[0], DTensor):  # each process scores its own rows: all with rank 0's statistics
                rms = same_on_all_ranks(rms, self.run.distributed)
            if self._compiled and not isinstance(ins[0], DTensor):
                rows = compiled(_wanda_rows)(ins, rms)  # |W| never materialised, every layer in one call
            else:
                rows = torch.stack([whole(torch.mv(w.abs(), replicated(w, r.to(w.dtype)))) for w, r in zip(ins, rms)])
            return fold(self.args, kind, rows.float(), None)
        outs = [unit_params(unit_module(b, kind), kind)[1] for b in blocks]
        rows = torch.stack([whole(torch.linalg.vector_norm(w, dim=1, dtype=torch.float32)) for w in ins]).square()
        cols = torch.stack([whole(torch.linalg.vector_norm(w, dim=0, dtype=torch.float32)) for w in outs]).square()
        return fold(self.args, kind, rows, cols).sqrt()

    def _select(self, kind: str, n: int, k: int, refresh: bool) -> torch.Tensor:
        """Kept indices [len(layers), k], sorted per row, one set per layer for the whole batch."""
        if self.options.metric == "uniform":
            scores = torch.rand(len(self.layers), n, generator=self.generator, device=self.generator.device)
            return scores.topk(k, dim=1).indices.sort(dim=1).values
        if refresh or kind not in self.scores:
            self.scores[kind] = self._scores(kind)
        scores = self.scores[kind]
        if self.options.select == "topk":
            kept = scores.topk(k, dim=1).indices
        else:
            # Every entry keeps a small chance, and a layer of all-zero scores samples uniformly.
            weights = scores.clamp_min(0)
            weights = weights + 1e-6 * weights.amax(dim=1, keepdim=True) + 1e-30
            kept = torch.multinomial(weights, k, replacement=False, generator=self.generator)
        return kept.sort(dim=1).values

    # --- per step -----------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        keep = dict(zip(KINDS, self.keep_counts(step)))
        refresh = step % self.options.stats_every == 0
        for kind in KINDS:
            n, k = unit_count(self.args, kind), keep[kind]
            kept = None
            if k < n and self.layers:
                kept = at_fixed_address(self._kept_buffers, kind, same_on_all_ranks(self._select(kind, n, k, refresh),
                                                                                     self.run.distributed))
            self.kept[kind] = kept
            for j, i in enumerate(self.layers):
                unit_module(self.model.blocks[i], kind).active = None if kept is None else kept[j]
        self._gather_ffn_now = self._gathers("ffn", step)
        self._gather_head_now = self._gathers("head", step)
        self.gathering = self._gather_ffn_now or self._gather_head_now
        # A step that may be discarded keeps the statistics it is about to update, to put them back.
        gathers = self.run.skip_nonfinite and self.gathering
        self._stats_before = {k: v.clone() for k, v in self.stats.items()} if gathers else None

    def discard_step(self, step: int) -> None:
        if self._stats_before is not None:
            for k, v in self._stats_before.items():
                self.stats[k].copy_(v)
        self._stats_before = None

    def before_optimizer(self, step: int) -> None:
        """Hold the omitted slices of every sliced parameter (and of its optimizer moments) through the step."""
        if not self.options.freeze_omitted:
            return
        with torch.no_grad():
            for kind in KINDS:
                if self.kept[kind] is None:
                    continue
                # the omitted units' rows and columns, and keep masks over them, found for all layers at once
                omitted = complement(self.kept[kind], unit_count(self.args, kind))
                first = unit_module(self.model.blocks[self.layers[0]], kind)
                rows, cols = layered_rows_cols(first, kind, omitted)
                ins, out = unit_params(first, kind)
                keep_rows = torch.ones(len(self.layers), ins[0].shape[0], dtype=torch.bool, device=rows.device)
                keep_cols = torch.ones(len(self.layers), out.shape[1], dtype=torch.bool, device=rows.device)
                keep_rows.scatter_(1, rows, False)
                keep_cols.scatter_(1, cols, False)
                for j, i in enumerate(self.layers):
                    ins, out = unit_params(unit_module(self.model.blocks[i], kind), kind)
                    for p in ins:
                        self._frozen.freeze(p, 0, rows[j], keep_rows[j])
                    self._frozen.freeze(out, 1, cols[j], keep_cols[j])
        self._frozen.before_step()

    def after_optimizer(self, step: int) -> None:
        """Update the held parameters under their masks, or put the stashed slices back (see frozen.FrozenSlices)."""
        if self.options.freeze_omitted:
            self._frozen.after_step()
        self._dense()

    def before_eval(self) -> None:
        self._dense()

    def _dense(self) -> None:
        """Between steps (evaluation, checkpoints) the model is dense and gathers nothing."""
        self.gathering = False
        for i in self.layers:
            self.model.blocks[i].mlp.active = None
            self.model.blocks[i].attn.active = None

    # --- accounting ---------------------------------------------------------------------------------------------
    def flops_per_token(self, step: int) -> float:
        a = self.args
        parts = flops_per_token(a, self.seq_len)
        kf, kh = self.keep_counts(step)
        L, Ls = a.n_layer, len(self.layers)
        ffn_keep = (L - Ls + Ls * kf / a.d_ff) / L
        head_keep = (L - Ls + Ls * kh / a.n_kv_head) / L
        forward = parts["head"] + parts["ffn"] * ffn_keep + (parts["attn_linear"] + parts["attn_scores"]) * head_keep
        return 3 * forward + self._stats_flops(step, kf, kh)

    def _stats_flops(self, step: int, kf: int, kh: int) -> float:
        """Forward-only FLOPs per training token of the maxip measurements (wanda's are elementwise: not counted).

        Approximate where a micro-batch is too small for `stats_fraction` of it to be whole sequences.
        """
        if self.options.metric != "maxip":
            return 0.0
        a, dense = self.args, self.options.stats_dense_pass
        flops = 0.0
        if self._gathers("ffn", step):
            neurons = a.d_ff if dense else kf
            flops += 2 * a.d_model * neurons * (2 if a.gated else 1)
        if self._gathers("head", step):
            groups = a.n_kv_head if dense else kh
            heads = groups * (a.n_head // a.n_kv_head)
            flops += 2 * a.d_model * (heads + 2 * groups) * a.head_dim + 2 * 2 * self.seq_len * heads * a.head_dim
        return self.options.stats_fraction * len(self.layers) * flops

    def metrics(self, step: int) -> dict[str, Any]:
        ffn_rate, head_rate = self.rates(step)
        return {
            "sat_ffn_rate": ffn_rate,
            "sat_head_rate": head_rate,
            "sat_flops_saved": 1 - self.flops_per_token(step) / self.dense_flops_per_token(),
        }

    # --- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": {k: v.cpu() for k, v in self.stats.items()},
            "scores": {k: v.cpu() for k, v in self.scores.items()},
            "generator": self.generator.get_state(),
            "generator_device": self.generator.device.type,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["generator_device"] != self.generator.device.type:
            raise UserError(
                f"this checkpoint's SAT sampler state is from a {state['generator_device']} run; "
                f"resume it on {state['generator_device']}"
            )
        self.generator.set_state(state["generator"])
        device = self.generator.device
        for k, v in state["stats"].items():
            self.stats[k].copy_(v)
        self.scores = {k: v.to(device) for k, v in state["scores"].items()}
