"""The MST method: its options, the three-phase sparsity schedule, the masks (weight level) or kept units (neuron
level) with their updates, hybrid sparse attention windows, FLOPs and checkpoints."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import sparsetrain.nn.attention_masks as attention_masks
from sparsetrain.errors import UserError
from sparsetrain.methods.base import Method, RunInfo
from sparsetrain.methods.frozen import FrozenSlices, moments
from sparsetrain.methods.mst.topology import erk_densities, next_active, round_half_up, sparse_weights
from sparsetrain.methods.shards import local, local_part, local_view, whole
from sparsetrain.methods.units import (at_fixed_address, keep_count, same_on_all_ranks, unit_count, unit_module,
                                       unit_params, unit_slices)
from sparsetrain.nn.model import ModelArgs, Transformer, flops_per_token

GRANULARITIES = ("weight", "neuron")
GROWS = ("rigl", "set", "mixed")
DENSITIES = ("auto", "erk", "uniform")
ATTENTIONS = ("none",) + attention_masks.KINDS


@dataclass
class MSTOptions:
    granularity: str = "weight"  # weight (unstructured masks) | neuron (FFN neurons and kv-head groups, sliced GEMMs)
    sparsity: float = 0.9  # the ultra-sparsification target, in [0, 1)
    final_sparsity: float = 0.0  # the target restoration reaches, in [0, sparsity]
    warmup_end: float = 0.1  # fraction of training at which the warm-up ramp (dense to `sparsity`) ends
    restore_start: float = 0.75  # fraction at which restoration starts
    restore_end: float = 0.9  # fraction at which restoration reaches `final_sparsity` (held to the end)
    update_every: int = 100  # dT: steps between topology updates
    zeta: float = 0.3  # initial share of active weights (units) exchanged per update, decaying by cosine
    update_end: float = 1.0  # fraction of training where the exchanged share reaches 0 (the authors': the end)
    grow: str = "mixed"  # rigl (dense-gradient magnitude) | set (random) | mixed (3/4 gradient, 1/4 random)
    density: str = "auto"  # per-layer densities: erk | uniform; auto = erk for weights, uniform for neurons
    sparsify_embeddings: bool = False  # weight: also mask the token embedding and the output layer
    neuron_multiple: int = 64  # neuron: kept FFN neurons per layer rounded to a multiple (GEMM-friendly shapes)
    neuron_heads: bool = True  # neuron: omit kv-head groups too (else FFN neurons only)
    attention: str = "none"  # none | local | strided | hybrid (local or strided)
    window: int = 128  # local band: a query sees itself and the window - 1 keys before it (the authors': 128)
    stride: int = 128  # strided: a query sees keys a multiple of stride back (the authors': 128)
    attention_layers: list[int] = field(default_factory=list)  # layers with sparse attention; [] = all
    attention_start: float = 0.1  # fraction of training where sparse attention starts
    attention_end: float = 0.75  # fraction where it ends (dense causal attention from there)
    seed: int = 0  # seeds random growth



class MST(Method):
    name = "mst"
    Options = MSTOptions

    def __init__(self, options: MSTOptions, args: ModelArgs, seq_len: int):
        super().__init__(options, args, seq_len)
        self.weights = sparse_weights(args, options.sparsify_embeddings) if options.granularity == "weight" else []
        self.kinds = ["ffn", "head"] if options.neuron_heads else ["ffn"]
        L = args.n_layer
        self.attention_layers = sorted({i % L for i in options.attention_layers}) or list(range(L))
        self.generator: torch.Generator | None = None
        # weight granularity: one boolean mask per entry of self.weights (True = active), and its parameter.
        self.masks: list[torch.Tensor] = []
        self.params: list[torch.Tensor] = []
        self._full: list[bool] = []  # mask is all True: nothing to apply
        self._dense_grads: dict[int, torch.Tensor] = {}
        self._collect = False  # read by the gradient hooks: accumulate the dense gradient on this step
        self._hooks: list = []
        # neuron granularity: kept units [n_layer, n] per kind ("ffn", "head"), and per layer their indices
        # (None = all kept) and the omitted ones, cached between updates (no host sync per step).
        self.units: dict[str, torch.Tensor] = {}
        self._kept_idx: dict[str, list[torch.Tensor | None]] = {}
        self._kept_buffers: dict[tuple[str, int], torch.Tensor] = {}  # where each layer's kept indices live
        self._omitted_idx: dict[str, list[torch.Tensor | None]] = {}
        self._held: dict[str, list[list[tuple[int, torch.Tensor, torch.Tensor]] | None]] = {}
        self._unit_maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # unit of each input row, proj column
        self._grow_scores: dict[str, list[torch.Tensor]] = {}  # gradient norms per unit on dense update steps
        self._dense_step = False
        self._frozen: FrozenSlices | None = None
        self._keep_cache: dict[float, tuple[int, ...]] = {}

    # --- options ------------------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, o: MSTOptions, args: ModelArgs, seq_len: int) -> None:
        for key, allowed in [("granularity", GRANULARITIES), ("grow", GROWS), ("density", DENSITIES),
                             ("attention", ATTENTIONS)]:
            if getattr(o, key) not in allowed:
                raise UserError(f"unknown method.{key} '{getattr(o, key)}'; choose one of {', '.join(allowed)}")
        if not 0 <= o.sparsity < 1:
            raise UserError(f"method.sparsity={o.sparsity} is outside [0, 1); it is the share of weights removed")
        if not 0 <= o.final_sparsity <= o.sparsity:
            raise UserError(f"method.final_sparsity={o.final_sparsity} must be in [0, method.sparsity={o.sparsity}]: "
                            "restoration lowers the sparsity")
        bounds = [("warmup_end", o.warmup_end), ("restore_start", o.restore_start), ("restore_end", o.restore_end)]
        for key, value in bounds:
            if not 0 <= value <= 1:
                raise UserError(f"method.{key}={value} must be a fraction of training in [0, 1]")
        for (a, va), (b, vb) in zip(bounds, bounds[1:]):
            if va > vb:
                raise UserError(f"method.{a}={va} comes after method.{b}={vb}: the phases overlap; "
                                "order them warmup_end <= restore_start <= restore_end")
        if o.update_every < 1:
            raise UserError(f"method.update_every must be at least 1, got {o.update_every}")
        if not 0 <= o.zeta <= 1:
            raise UserError(f"method.zeta={o.zeta} must be in [0, 1]; it is the share of weights exchanged")
        if not 0 < o.update_end <= 1:
            raise UserError(f"method.update_end={o.update_end} must be a fraction of training in (0, 1]")
        if o.granularity == "neuron" and o.density == "erk":
            raise UserError("method.density=erk applies to granularity=weight; neuron granularity keeps the same "
                            "share of units in every layer (density=uniform or auto)")
        if o.neuron_multiple < 1:
            raise UserError(f"method.neuron_multiple must be at least 1, got {o.neuron_multiple}")
        if o.attention != "none":
            attention_masks.check(o.attention, seq_len, o.window, o.stride)
        bad = [i for i in o.attention_layers if not -args.n_layer <= i < args.n_layer]
        if bad:
            raise UserError(f"method.attention_layers has {bad}, outside the model's {args.n_layer} layers; "
                            f"use indices in [{-args.n_layer}, {args.n_layer - 1}]")
        if not 0 <= o.attention_start <= o.attention_end <= 1:
            raise UserError(f"method.attention_start={o.attention_start} and attention_end={o.attention_end} must "
                            "satisfy 0 <= attention_start <= attention_end <= 1")

    # --- schedule (pure functions of the step) ------------------------------------------------------------------
    def _steps(self) -> int:
        if not self.total_steps or self.total_steps <= 0:
            raise RuntimeError("MST needs the run's optimizer steps (RunInfo.total_steps), given to start()")
        return self.total_steps

    def target(self, step: int) -> float:
        """The target sparsity of the schedule at `step` (what an update at `step` builds)."""
        o = self.options
        p = step / self._steps()
        if p < o.warmup_end:
            return o.sparsity * p / o.warmup_end
        if p < o.restore_start:
            return o.sparsity
        if p < o.restore_end:
            progress = (p - o.restore_start) / (o.restore_end - o.restore_start)
            return o.sparsity + (o.final_sparsity - o.sparsity) * progress
        return o.final_sparsity

    def phase(self, step: int) -> str:
        p = step / self._steps()
        return "warmup" if p < self.options.warmup_end else "ultra" if p < self.options.restore_start else "restoration"

    def drop_fraction(self, step: int) -> float:
        """zeta(t): the share of active weights (units) an update at `step` exchanges, cosine-decayed."""
        end = self.options.update_end * self._steps()
        if step >= end:
            return 0.0
        return self.options.zeta / 2 * (1 + math.cos(math.pi * step / end))

    def _phase_ends(self) -> list[int]:
        """The first steps of the held levels (the end of warm-up and of restoration): update steps whatever dT is,
        so that a dT longer than a ramp still reaches `sparsity` and `final_sparsity` where the schedule says."""
        T, o = self._steps(), self.options
        return sorted({s for s in (math.ceil(o.warmup_end * T), math.ceil(o.restore_end * T)) if 0 < s < T})

    def _on_grid(self, step: int) -> bool:
        return 0 < step < self._steps() and (step % self.options.update_every == 0 or step in self._phase_ends())

    def is_update(self, step: int) -> bool:
        """A topology update follows this step: on the dT grid (or at a phase end), and there is something to
        exchange or to reach."""
        if not self._on_grid(step):
            return False
        return self.drop_fraction(step) > 0 or self.target(step) != self.target(self.topology_step(step))

    def topology_step(self, step: int) -> int:
        """The step whose target built the topology that `step` computes with (0: the first topology): the last
        grid step before it (an update there that changed nothing leaves that target in force all the same)."""
        last = 0 if step <= 0 else (step - 1) // self.options.update_every * self.options.update_every
        return max([last] + [s for s in self._phase_ends() if s < step])

    def dense_gradient_step(self, step: int) -> bool:
        """This step needs the gradient of inactive weights (units): its update grows by gradient."""
        return self.options.grow != "set" and self.is_update(step)

    def attention_on(self, step: int) -> bool:
        o = self.options
        return o.attention != "none" and o.attention_start * self._steps() <= step < o.attention_end * self._steps()

    def keep_counts(self, sparsity: float) -> tuple[int, ...]:
        """Active weights per entry of `self.weights` at an overall target sparsity (at least one per layer)."""
        if sparsity not in self._keep_cache:
            shapes = [w.shape for w in self.weights]
            if self.options.density == "uniform":
                densities = [1 - sparsity] * len(shapes)
            else:
                densities = erk_densities(shapes, sparsity)
            self._keep_cache[sparsity] = tuple(
                min(a * b, max(1, round_half_up(dens * a * b))) for dens, (a, b) in zip(densities, shapes)
            )
        return self._keep_cache[sparsity]

    def unit_keep(self, kind: str, sparsity: float) -> int:
        """Kept FFN neurons (kind 'ffn') or kv-head groups ('head') per layer at a target sparsity (at least one)."""
        n, multiple = unit_count(self.args, kind), self.options.neuron_multiple if kind == "ffn" else 1
        return keep_count(n, sparsity, multiple) or min(multiple, n)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, model: Transformer, optimizer: torch.optim.Optimizer, run: RunInfo) -> None:
        """Ready the masks' machinery; a fresh run also takes its first topology here (the target at step 0, the
        largest weights kept), a resumed one from load_state_dict."""
        super().start(model, optimizer, run)
        device = model.wte.weight.device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.options.seed)
        # pruned units held under a keep mask (compiled on a GPU), see frozen.FrozenSlices
        self._frozen = FrozenSlices(optimizer, compiled=device.type == "cuda")
        fresh = run.first_step == 0
        if self.options.granularity == "weight":
            self._start_weights(model, device, fresh)
        else:
            self._start_units(device, fresh)

    def _start_weights(self, model: Transformer, device: torch.device, fresh: bool) -> None:
        self.params = [model.get_parameter(w.name) for w in self.weights]
        for w, p in zip(self.weights, self.params):
            if tuple(p.shape) != w.shape:
                raise RuntimeError(f"{w.name} has shape {tuple(p.shape)}, expected {w.shape}")
        for handle in self._hooks:
            handle.remove()
        # Autograd delivers a plain parameter's gradient to register_hook (per micro-batch, before DDP averages it);
        # FSDP2 sets the sharded parameter's .grad after its reduce-scatter, where only post-accumulate hooks run.
        self._hooks = [p.register_post_accumulate_grad_hook(self._sharded_grad_hook(j)) if isinstance(p, DTensor)
                       else p.register_hook(self._grad_hook(j)) for j, p in enumerate(self.params)]
        if fresh:
            self.masks = [torch.ones(p.shape, dtype=torch.bool, device=device) for p in self.params]
            keep = self.keep_counts(self.target(0))
            self._set_masks([self._next_mask(m.flatten(), whole(p.detach()).abs().flatten(), None, k, 0.0).view_as(m)
                             for m, p, k in zip(self.masks, self.params, keep)])

    def _set_masks(self, masks: list[torch.Tensor]) -> None:
        self.masks = masks
        self._full = [bool(m.all()) for m in self.masks]
        self._apply_masks(with_moments=True)

    def _start_units(self, device: torch.device, fresh: bool) -> None:
        self.units = {kind: torch.ones(self.args.n_layer, unit_count(self.args, kind), dtype=torch.bool, device=device)
                      for kind in self.kinds}
        self._unit_maps = {kind: self._unit_index(kind, device) for kind in self.kinds}
        self._cache_indices()
        if fresh:
            self._update_units(self.target(0), 0.0)

    # --- weight granularity -------------------------------------------------------------------------------------
    def _collect_dense_grad(self, j: int, grad: torch.Tensor) -> None:
        """On an update step that grows by gradient, sum the unmasked gradient of weight j (over micro-batches)."""
        if self._collect:
            acc = self._dense_grads.get(j)
            self._dense_grads[j] = grad.detach().clone() if acc is None else acc.add_(grad)

    def _grad_hook(self, j: int):
        def hook(grad: torch.Tensor):
            self._collect_dense_grad(j, grad)
            return None if self._full[j] else grad * self.masks[j]

        return hook

    def _sharded_grad_hook(self, j: int):
        def hook(p: torch.Tensor):  # FSDP2: p.grad is this process's piece of the reduced (averaged) gradient
            self._collect_dense_grad(j, p.grad)
            if not self._full[j]:
                local(p.grad).mul_(local_view(self.masks[j], p))

        return hook

    @torch.no_grad()
    def _apply_masks(self, with_moments: bool) -> None:
        """Zero the inactive weights (and their optimizer moments)."""
        for p, m, full in zip(self.params, self.masks, self._full):
            if full:
                continue
            m = local_view(m, p)
            local(p.detach()).mul_(m)
            if with_moments:
                for t in moments(self.optimizer, p).values():
                    local(t).mul_(m)

    def _update_weights(self, step: int) -> None:
        keep = self.keep_counts(self.target(step))
        z = self.drop_fraction(step)
        for j, p in enumerate(self.params):
            grad = self._dense_grads.get(j)
            if isinstance(grad, DTensor):
                grad = grad.full_tensor()  # FSDP2's hook saw the reduced gradient: one layer gathered at a time
            elif grad is not None and self.run.distributed:
                dist.all_reduce(grad)  # hooks see this rank's gradient, before DDP averages it
            scores = grad.abs().flatten() if grad is not None else None
            self.masks[j] = self._next_mask(self.masks[j].flatten(), whole(p.detach()).abs().flatten(), scores,
                                            keep[j], z).view_as(self.masks[j])
        self._set_masks(self.masks)

    def _next_mask(self, mask: torch.Tensor, magnitude: torch.Tensor, grad: torch.Tensor | None, keep: int,
                   z: float) -> torch.Tensor:
        new = next_active(mask, magnitude, grad, keep, z, self.options.grow, self.generator)
        # Every rank computed the same set from the same (all-reduced) numbers; rank 0 decides against tie-breaks.
        same_on_all_ranks(new.view(torch.uint8), self.run.distributed)
        return new

    # --- neuron granularity -------------------------------------------------------------------------------------
    def _slices(self, kind: str, i: int, units: torch.Tensor) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        return unit_slices(unit_module(self.model.blocks[i], kind), kind, units)

    def _unit_index(self, kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit of every input row and of every `proj` column, from the model's own index maps (built on the
        host, once)."""
        ins, out = unit_params(unit_module(self.model.blocks[0], kind), kind)
        row_unit = torch.empty(ins[0].shape[0], dtype=torch.long)
        col_unit = torch.empty(out.shape[1], dtype=torch.long)
        for u in range(self.units[kind].shape[1]):
            slices = self._slices(kind, 0, torch.tensor([u]))
            row_unit[slices[0][2]] = u
            col_unit[slices[-1][2]] = u
        return row_unit.to(device), col_unit.to(device)

    def _unit_norms(self, kind: str, i: int, grad: bool) -> torch.Tensor:
        """L2 norm per unit of its weights (or of their gradients), float32."""
        row_unit, col_unit = self._unit_maps[kind]
        ins, out = unit_params(unit_module(self.model.blocks[i], kind), kind)
        total = torch.zeros(self.units[kind].shape[1], dtype=torch.float32, device=row_unit.device)
        for p, dim, unit in [(p, 0, row_unit) for p in ins] + [(out, 1, col_unit)]:
            t = p.grad if grad else p.detach()
            if t is not None:
                sq = t.float().square()
                total.index_add_(0, unit, whole(sq.sum(1 - dim) if sq.dim() == 2 else sq))
        return total.sqrt()

    def _cache_indices(self) -> None:
        """Kept and omitted units per layer, and what each step's freeze holds: (dim, omitted index, keep mask) of
        every sliced parameter of a layer with omitted units. They change only at topology updates."""
        for kind in self.kinds:
            kept = [row.nonzero().flatten() for row in self.units[kind]]
            omitted = [(~row).nonzero().flatten() for row in self.units[kind]]
            n = self.units[kind].shape[1]
            self._kept_idx[kind] = [None if k.numel() == n else at_fixed_address(self._kept_buffers, (kind, i), k)
                                    for i, k in enumerate(kept)]
            self._omitted_idx[kind] = [None if o.numel() == 0 else o for o in omitted]
            row_unit, col_unit = self._unit_maps[kind]
            self._held[kind] = [
                None if o is None else [(dim, idx, self.units[kind][i][row_unit if dim == 0 else col_unit])
                                        for _, dim, idx in self._slices(kind, i, o)]
                for i, o in enumerate(self._omitted_idx[kind])]

    @torch.no_grad()
    def _update_units(self, sparsity: float, z: float) -> None:
        for kind in self.kinds:
            keep = self.unit_keep(kind, sparsity)
            for i in range(self.args.n_layer):
                kept = self.units[kind][i]
                grad = self._grow_scores[kind][i] if kind in self._grow_scores else None
                new = self._next_mask(kept, self._unit_norms(kind, i, grad=False), grad, keep, z)
                pruned, grown = (kept & ~new).nonzero().flatten(), (new & ~kept).nonzero().flatten()
                p, dim, idx = self._slices(kind, i, pruned)[-1]
                piece, held = local_part(p.detach(), dim, idx)
                piece.index_fill_(dim, held, 0.0)  # a pruned unit's output weights: it adds nothing from now on
                for p, dim, idx in self._slices(kind, i, pruned) + self._slices(kind, i, grown):
                    _, held = local_part(p, dim, idx)  # a moment is sharded as its parameter
                    for t in moments(self.optimizer, p).values():
                        local(t).index_fill_(dim, held, 0)
                self.units[kind][i] = new
        self._grow_scores = {}
        self._cache_indices()

    # --- per step -----------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        if self.options.granularity == "weight":
            self._collect = self.dense_gradient_step(step)
        else:
            self._dense_step = self.dense_gradient_step(step)
            for kind in self.kinds:
                for i in range(self.args.n_layer):
                    unit_module(self.model.blocks[i], kind).active = None if self._dense_step else self._kept_idx[kind][i]
        self.apply_attention(step)

    def apply_attention(self, step: int) -> None:
        """Sparse attention on the chosen layers while the schedule says so, causal SDPA (None) otherwise."""
        mask = None
        if self.attention_on(step):
            o, device = self.options, self.model.wte.weight.device
            if device.type == "cuda":
                mask = attention_masks.build_block_mask(o.attention, self.seq_len, o.window, o.stride, device,
                                                        limit=self.args.sliding_window)  # the model's own window
            else:  # FlexAttention has no backward on CPU: the same pattern as a dense mask (correct, not faster)
                mask = attention_masks.cached_dense_mask(o.attention, self.seq_len, o.window, o.stride, str(device),
                                                         limit=self.args.sliding_window)
        for i in self.attention_layers:
            self.model.blocks[i].attn.block_mask = mask

    def before_optimizer(self, step: int) -> None:
        if self.options.granularity == "weight":
            return  # the hooks have masked every gradient already
        with torch.no_grad():
            if self._dense_step:
                self._grow_scores = {kind: [self._unit_norms(kind, i, grad=True)
                                            for i in range(self.args.n_layer)] for kind in self.kinds}
            for kind in self.kinds:
                for i, held in enumerate(self._held[kind]):
                    if held is not None:
                        ins, out = unit_params(unit_module(self.model.blocks[i], kind), kind)
                        for p, (dim, idx, keep) in zip(ins + [out], held):
                            self._frozen.freeze(p, dim, idx, keep)
            self._frozen.before_step()

    def discard_step(self, step: int) -> None:
        """Drop the gradients a dense-gradient step gathered for the next topology update."""
        self._collect = False
        self._dense_grads = {}
        self._grow_scores = {}
        self._dense_step = False

    def after_optimizer(self, step: int) -> None:
        if self.options.granularity == "weight":
            self._collect = False
            with torch.no_grad():
                if self.is_update(step):
                    self._update_weights(step)
                else:
                    self._apply_masks(with_moments=False)
            self._dense_grads = {}
            return
        self._frozen.after_step()
        self.before_eval()
        if self.is_update(step):
            self._update_units(self.target(step), self.drop_fraction(step))
        self._grow_scores = {}
        self._dense_step = False

    def before_eval(self) -> None:
        """Between steps the model is dense: omitted units add exactly zero, so it computes the same function."""
        if self.options.granularity == "neuron":
            for kind in self.kinds:
                for i in range(self.args.n_layer):
                    unit_module(self.model.blocks[i], kind).active = None

    # --- accounting ---------------------------------------------------------------------------------------------
    def _attention_scores(self, step: int, parts: dict[str, float]) -> float:
        """Forward FLOPs per token of the attention scores, the sparse layers by the blocks they compute."""
        per_layer = parts["attn_scores"] / self.args.n_layer
        if not self.attention_on(step):
            return parts["attn_scores"]
        o = self.options
        frac = attention_masks.block_fraction(o.attention, self.seq_len, o.window, o.stride, self.args.sliding_window)
        sparse = len(self.attention_layers)
        return per_layer * (self.args.n_layer - sparse + sparse * frac)

    def flops_per_token(self, step: int) -> float:
        parts = flops_per_token(self.args, self.seq_len)
        scores = self._attention_scores(step, parts)
        target = self.target(self.topology_step(step))
        dense_grad = self.dense_gradient_step(step)
        if self.options.granularity == "weight":
            keep = self.keep_counts(target)
            linear = parts["attn_linear"] + parts["ffn"] + parts["head"]
            masked = sum(w.flops for w in self.weights)
            sparse = sum(w.flops * k / (w.shape[0] * w.shape[1]) for w, k in zip(self.weights, keep))
            # Forward and input gradient by density; the weight gradient too, except dense when growth needs it.
            weight_grad = masked if dense_grad else sparse
            return 3 * (linear - masked) + 2 * sparse + weight_grad + 3 * scores
        if dense_grad:  # computed dense so that every unit has a gradient
            return 3 * (parts["attn_linear"] + parts["ffn"] + parts["head"] + scores)
        ffn_keep = self.unit_keep("ffn", target) / self.args.d_ff
        head_keep = self.unit_keep("head", target) / self.args.n_kv_head if "head" in self.kinds else 1.0
        return 3 * (parts["head"] + parts["ffn"] * ffn_keep + (parts["attn_linear"] + scores) * head_keep)

    def metrics(self, step: int) -> dict[str, Any]:
        """Realised sparsity after this step's update and the target it was built for, and this step's FLOPs."""
        out: dict[str, Any] = {
            "mst_phase": self.phase(step),
            "mst_target": self.target(self.topology_step(step + 1)),
            "mst_attention": self.options.attention if self.attention_on(step) else "dense",
            "mst_flops_saved": 1 - self.flops_per_token(step) / self.dense_flops_per_token(),
        }
        if self.options.granularity == "weight":
            active = [int(m.sum()) for m in self.masks]
            sizes = [m.numel() for m in self.masks]
            out["mst_sparsity"] = 1 - sum(active) / sum(sizes)
            out["mst_layer_density"] = {w.name.removeprefix("blocks.").removesuffix(".weight"): round(a / n, 5)
                                        for w, a, n in zip(self.weights, active, sizes)}
        else:
            kept = {kind: self.units[kind].sum(1).tolist() for kind in self.kinds}
            out["mst_sparsity"] = 1 - sum(kept["ffn"]) / self.units["ffn"].numel()
            if "head" in self.kinds:
                out["mst_head_sparsity"] = 1 - sum(kept["head"]) / self.units["head"].numel()
            out["mst_layer_density"] = {f"{i}.{kind}": round(k / self.units[kind].shape[1], 5)
                                        for kind in self.kinds for i, k in enumerate(kept[kind])}
        return out

    # --- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "granularity": self.options.granularity,
            "generator": self.generator.get_state(),
            "generator_device": self.generator.device.type,
        }
        if self.options.granularity == "weight":
            state["masks"] = {w.name: m.cpu() for w, m in zip(self.weights, self.masks)}
        else:
            state["units"] = {kind: u.cpu() for kind, u in self.units.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("granularity") != self.options.granularity:
            raise UserError(f"this checkpoint was trained with method.granularity={state.get('granularity')}; "
                            "resume it with the same granularity")
        device = self.generator.device
        if state["generator_device"] != device.type:
            raise UserError(f"this checkpoint's MST sampler state is from a {state['generator_device']} run; "
                            f"resume it on {state['generator_device']}")
        if self.options.granularity == "weight":
            self._set_masks([state["masks"][w.name].to(device=device, dtype=torch.bool) for w in self.weights])
        else:
            self.units = {kind: state["units"][kind].to(device=device, dtype=torch.bool) for kind in self.kinds}
            self._cache_indices()
        self.generator.set_state(state["generator"])
