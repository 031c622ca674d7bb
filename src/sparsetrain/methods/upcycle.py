"""Sparse upcycling (Komatsuzaki et al., ICLR 2023): turn a trained dense model into a Mixture-of-Experts.

Chosen blocks' FFNs become `MoEFFN`s whose experts are copies of the dense FFN; the router is new (normal,
std 0.02); everything else is kept. Options from later work:

- Granularity G (fine-grained upcycling): the FFN's f neurons are cut into G shards of f/G; expert e copies
  shard e % G, so the experts form E/G "virtual groups" of one copy of every shard each (experts
  g*G .. g*G+G-1 are group g). The G experts of a group start with the same router row, so their logits tie
  and top-k (k a multiple of G) picks whole groups: every shard is chosen k/G times.
- Output scale, so the MoE starts as the dense FFN. Per token, a shard's copies receive total routing weight
  w_s, and MoE(x) = sum_s w_s * scale * shard_s(x). With renormalised top-k weights (or top-k-then-softmax)
  the k weights sum to 1 and are spread over the shards equally (whole groups, each holding every shard), so
  w_s = 1/G exactly and scale = G gives MoE(x) = FFN(x) exactly. Without renormalisation the weights do not sum
  to a constant; we use the expectation at init, when the logits are near 0 and every probability is about 1/E:
  w_s ~ (k/G)/E, scale = E*G/k (the "weight scaling" of NVIDIA's upcycling study). Expert choice: a token is
  taken by capacity_factor*k experts on average, scale = E*G/(capacity_factor*k); neither is exact.
  The scale multiplies each expert's w_out; the output bias b is shared by the k chosen experts, so each
  expert's copy is b*scale/G (= b when renormalised).
- Drop-Upcycling (R = drop_rate): in every expert a random R share of its neurons (their w_in columns, gate
  and up, their w_out rows and input biases) is re-drawn from a normal with the mean and std of that expert's
  matrix (each of gate, up, down, bias separately), breaking the symmetry of identical experts.

`every-other` replaces layers 1, 3, 5, ... (0-based), as the paper. The trainer builds a fresh optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import sparsetrain.nn.moe as nn_moe
from sparsetrain.errors import UserError
from sparsetrain.methods.base import Method, RunInfo
from sparsetrain.nn.model import ModelArgs, Transformer, flops_per_token
from sparsetrain.nn.moe import KERNELS, ROUTERS, MoEFFN, balance_loss, moe_for
from sparsetrain.store.checkpoint import load_weights


@dataclass
class UpcycleOptions:
    experts: int = 8
    top_k: int = 2  # experts per token; for expert_choice, the average (capacity = capacity_factor*tokens*k/E)
    layers: str | list[int] = "every-other"  # "every-other" | "all" | a list of 0-based block indices
    granularity: int = 1  # G: experts are copies of one of G shards of the dense FFN
    drop_rate: float = 0.0  # Drop-Upcycling: share of each expert's neurons re-initialised
    router: str = "softmax_then_topk"  # softmax_then_topk | topk_then_softmax | expert_choice
    renormalize: bool = True  # softmax_then_topk: top-k weights sum to 1 (exact upcycling)
    capacity_factor: float = 0.0  # token choice: 0 = dropless; expert_choice: required (2.0 in the paper)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    seed: int = 0  # router init and Drop-Upcycling's choice of neurons
    kernel: str = "auto"  # how the expert GEMMs run: auto | triton | grouped_mm | loop (nn.moe.KERNELS)


def moe_layers(model: Transformer) -> list[MoEFFN]:
    return [b.mlp for b in model.blocks if isinstance(b.mlp, MoEFFN)]


def resolve_layers(layers: str | list[int], n_layer: int) -> list[int]:
    if layers == "every-other":
        return list(range(1, n_layer, 2))
    if layers == "all":
        return list(range(n_layer))
    if isinstance(layers, str):
        raise UserError(f"method.layers must be \"every-other\", \"all\" or a list of block indices, got '{layers}'")
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad or not layers or len(set(layers)) != len(layers):
        raise UserError(
            f"method.layers={layers} must be distinct block indices in [0, {n_layer - 1}], at least one"
        )
    return sorted(layers)


def check_options(o: UpcycleOptions, args: ModelArgs) -> None:
    if o.experts < 2:
        raise UserError(f"method.experts must be >= 2, got {o.experts}")
    if not 1 <= o.top_k <= o.experts:
        raise UserError(f"method.top_k must be in [1, method.experts={o.experts}], got {o.top_k}")
    if o.granularity < 1 or args.d_ff % o.granularity or o.experts % o.granularity:
        raise UserError(
            f"method.granularity={o.granularity} must divide model.d_ff={args.d_ff} and method.experts={o.experts}"
        )
    if o.router not in ROUTERS:
        raise UserError(f"unknown method.router '{o.router}'; choose one of {', '.join(ROUTERS)}")
    if o.router != "expert_choice" and o.top_k % o.granularity:
        raise UserError(
            f"method.top_k={o.top_k} must be a multiple of method.granularity={o.granularity} so that every "
            "shard of the dense FFN is chosen (virtual-group init)"
        )
    if not 0.0 <= o.drop_rate < 1.0:
        raise UserError(f"method.drop_rate must be in [0, 1), got {o.drop_rate}")
    if o.capacity_factor < 0:
        raise UserError(f"method.capacity_factor must be >= 0 (0 = dropless), got {o.capacity_factor}")
    if o.router == "expert_choice" and o.capacity_factor <= 0:
        raise UserError("method.router = \"expert_choice\" needs method.capacity_factor > 0 (the paper used 2.0)")
    if o.aux_loss_coef < 0 or o.z_loss_coef < 0:
        raise UserError("method.aux_loss_coef and method.z_loss_coef must be >= 0")
    if o.kernel not in KERNELS:
        raise UserError(f"unknown method.kernel '{o.kernel}'; choose one of {', '.join(KERNELS)}")
    resolve_layers(o.layers, args.n_layer)


def output_scale(o: UpcycleOptions) -> float:
    """The factor on each expert's output that makes the MoE equal the dense FFN at init (module docstring)."""
    E, k, G = o.experts, o.top_k, o.granularity
    if o.router == "expert_choice":
        return E * G / (o.capacity_factor * k)
    if o.router == "topk_then_softmax" or o.renormalize:
        return float(G)
    return E * G / k


def make_moe(args: ModelArgs, o: UpcycleOptions) -> MoEFFN:
    moe = moe_for(args, experts=o.experts, top_k=o.top_k, granularity=o.granularity, router=o.router,
                  renormalize=o.renormalize, capacity_factor=o.capacity_factor, aux_loss_coef=o.aux_loss_coef,
                  z_loss_coef=o.z_loss_coef)
    moe.kernel = o.kernel
    return moe


def replace_ffns(model: Transformer, o: UpcycleOptions) -> list[int]:
    """Put fresh MoE layers of the right shape in the chosen blocks (blocks that already hold an MoE are left
    alone). Returns the chosen block indices."""
    chosen = resolve_layers(o.layers, model.args.n_layer)
    nn_moe.replace_ffns(model, chosen, lambda: make_moe(model.args, o))
    return chosen


@torch.no_grad()
def redraw_(w: torch.Tensor, idx: torch.Tensor, dim: int, gen: torch.Generator) -> None:
    """Re-draw the slices `idx` along `dim` of `w` from normal(mean(w), std(w))."""
    mean, std = w.float().mean().item(), w.float().std().item()
    shape = list(w.shape)
    shape[dim] = idx.numel()
    fresh = torch.randn(shape, generator=gen) * std + mean
    w.index_copy_(dim, idx.to(w.device), fresh.to(device=w.device, dtype=w.dtype))


@torch.no_grad()
def fill_from_dense(moe: MoEFFN, ffn, o: UpcycleOptions, gen: torch.Generator) -> None:
    """Experts = scaled copies of the dense FFN's shards, virtual-group router, then Drop-Upcycling."""
    E, G, f = o.experts, o.granularity, ffn.d_ff
    fs = f // G
    gated = ffn.activation == "swiglu"
    scale = output_scale(o)
    for e in range(E):
        neurons = torch.arange((e % G) * fs, (e % G + 1) * fs, device=ffn.fc.weight.device)
        rows = ffn.in_rows(neurons)  # [gate | up] rows for swiglu, in the layout MoEFFN expects
        moe.w_in[e].copy_(ffn.fc.weight.index_select(0, rows).t())
        moe.w_out[e].copy_(ffn.proj.weight.index_select(1, neurons).t() * scale)
        if moe.in_bias is not None:
            moe.in_bias.view(E, -1)[e].copy_(ffn.fc.bias.index_select(0, rows))
            moe.out_bias.view(E, -1)[e].copy_(ffn.proj.bias * (scale / G))
    groups = torch.randn(E // G, moe.d_model, generator=gen) * 0.02
    moe.router.weight.copy_(groups.repeat_interleave(G, dim=0))

    n_drop = round(o.drop_rate * fs)
    if n_drop == 0:
        return
    for e in range(E):
        idx = torch.randperm(fs, generator=gen)[:n_drop]
        w_in = moe.w_in[e]
        for part in (w_in[:, :fs], w_in[:, fs:]) if gated else (w_in,):
            redraw_(part, idx, 1, gen)
        redraw_(moe.w_out[e], idx, 0, gen)
        if moe.in_bias is not None:
            b = moe.in_bias.view(E, -1)[e]
            for part in (b[:fs], b[fs:]) if gated else (b,):
                redraw_(part, idx, 0, gen)


def upcycle(
    model: Transformer,
    *,
    experts: int,
    top_k: int,
    layers: str | list[int] = "every-other",
    granularity: int = 1,
    drop_rate: float = 0.0,
    router: str = "softmax_then_topk",
    renormalize: bool = True,
    capacity_factor: float = 0.0,
    aux_loss_coef: float = 0.01,
    z_loss_coef: float = 0.001,
    seed: int = 0,
) -> Transformer:
    """Upcycle `model` in place (and return it): the chosen blocks' dense FFNs become MoE layers whose experts
    are copies of them. With renormalised top-k weights and drop_rate 0 the model computes what it did before."""
    o = UpcycleOptions(experts, top_k, layers, granularity, drop_rate, router, renormalize, capacity_factor,
                       aux_loss_coef, z_loss_coef, seed)
    check_options(o, model.args)
    dense = {i: model.blocks[i].mlp for i in resolve_layers(o.layers, model.args.n_layer)}
    for i, ffn in dense.items():
        if isinstance(ffn, MoEFFN):
            raise UserError(f"block {i} is already a Mixture-of-Experts; upcycle a dense model")
    replace_ffns(model, o)
    gen = torch.Generator().manual_seed(seed)
    for i, ffn in dense.items():
        fill_from_dense(model.blocks[i].mlp, ffn, o, gen)
    return model


class Upcycle(Method):
    """Train an upcycled MoE. `setup` builds the MoE structure (a checkpoint is then loaded over it); `convert`
    fills it from a dense model's weights (`upcycle` with these options)."""

    name = "upcycle"
    cuda_graphs = True
    # Compiled with symbolic sizes (a second batch shape, e.g. evaluation's), inductor failed on the MoE layer on the
    # GPU, with or without CUDA graphs: "CantSplit: 4 not divisible by 4*(((64*s24 + 2047)//2048))".
    static_shapes = True
    Options = UpcycleOptions

    @classmethod
    def validate(cls, options: UpcycleOptions, args: ModelArgs, seq_len: int) -> None:
        check_options(options, args)

    def setup(self, model: Transformer) -> None:
        replace_ffns(model, self.options)
        self.model = model

    def start(self, model: Transformer, optimizer: torch.optim.Optimizer, run: RunInfo) -> None:
        super().start(model, optimizer, run)
        nn_moe.check_kernel(self.options.kernel, model.wte.weight.device)

    def convert(self, model: Transformer) -> Transformer:
        """Upcycle a dense model with this method's options (before `setup`, which then leaves it as it is)."""
        o = self.options
        upcycle(model, experts=o.experts, top_k=o.top_k, layers=o.layers, granularity=o.granularity,
                drop_rate=o.drop_rate, router=o.router, renormalize=o.renormalize,
                capacity_factor=o.capacity_factor, aux_loss_coef=o.aux_loss_coef, z_loss_coef=o.z_loss_coef,
                seed=o.seed)
        self.model = model
        return model

    def init_weights(self, model: Transformer, state: dict[str, torch.Tensor], source: str) -> None:
        """An upcycled checkpoint loads as it is; a dense one is upcycled here with this method's options."""
        if any(".mlp.w_in" in k for k in state):
            load_weights(model, state, source)
            return
        dense = Transformer(model.args)
        load_weights(dense, state, source)
        model.load_state_dict(self.convert(dense).state_dict())
        self.model = model

    def aux_loss(self, model: Transformer) -> torch.Tensor | None:
        """The layers' losses summed. On several ranks, f_e of the load-balancing loss counts the assignments of
        every rank (one all-reduce of the counts): each rank's loss is then E * sum_e f_e(global) * P_e(local), and
        the averaged gradients are those of one process with the whole batch (the z-loss is a mean: it averages
        the same way by itself)."""
        layers = [m for m in moe_layers(model) if m.aux_loss is not None]
        if not layers:
            return None
        balanced = [m for m in layers if m.balance is not None]
        if not (balanced and self.run.distributed):
            return torch.stack([m.aux_loss for m in layers]).sum()
        counts = torch.stack([m.balance[0] for m in balanced])
        dist.all_reduce(counts)
        total = torch.stack([m.z_part for m in layers]).sum()
        for m, c in zip(balanced, counts):
            total = total + m.aux_loss_coef * balance_loss(m.balance[1], c)
        return total

    def flops_per_token(self, step: int) -> float:
        """Active FLOPs: in an MoE layer, the experts a token visits (k of width f/G; capacity_factor*k on average
        for expert choice; tokens over capacity are still multiplied) and the router GEMM replace the dense FFN."""
        a, o = self.args, self.options
        parts = flops_per_token(a, self.seq_len)
        n_moe = len(resolve_layers(o.layers, a.n_layer))
        dense_ffn = parts["ffn"] / a.n_layer
        visits = o.capacity_factor * o.top_k if o.router == "expert_choice" else o.top_k
        moe_ffn = visits * dense_ffn / o.granularity + 2 * a.d_model * o.experts
        return 3 * (sum(parts.values()) + n_moe * (moe_ffn - dense_ffn))

    def metrics(self, step: int) -> dict[str, float]:
        layers = [m for m in moe_layers(self.model) if m.routing is not None] if self.model is not None else []
        if not layers:
            return {}
        rows = []
        for m in layers:
            s = m.stats()
            rows.append(torch.stack([s["load"].max() / s["load"].mean(), s["dropped"], s["entropy"], s["lb_loss"],
                                     s["z_loss"], m.aux_loss.detach().float()]))
        rows = torch.stack(rows)
        summary = torch.cat([rows[:, :5].mean(dim=0), rows[:, 5].sum()[None]])
        imbalance, dropped, entropy, lb, z, aux = summary.tolist()  # one host sync
        return {
            "moe_load_imbalance": imbalance,  # max / mean expert load, mean over MoE layers
            "moe_dropped": dropped,
            "moe_router_entropy": entropy,
            "moe_lb_loss": lb,
            "moe_z_loss": z,
            "moe_aux_loss": aux,  # weighted, summed over layers: what the training loss gets
        }
