"""The FFN that SSD trains: a dense FFN whose neurons are laid out expert by expert, computed densely or as an MoE
through views of the same parameters (grouped GEMMs over the chosen experts' rows); permuting neurons with their
AdamW moments; the routers (centroids, or a fitted linear router)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.errors import UserError
from sparsetrain.methods.frozen import moments
from sparsetrain.methods.shards import index_select_, whole
from sparsetrain.methods.ssd.cluster import cluster_means
from sparsetrain.nn.model import FFN, Transformer
from sparsetrain.nn.moe import (MoEFFN, Plan, activated_rows, biased_rows, choose_kernel, compute_dtype, dispatch,
                                expert_counts, grouped_mm, output_rows)


def neuron_rows(ffn: FFN) -> torch.Tensor:
    """Unit input rows [d_ff, d] in fp32: the gate rows for SwiGLU, the `fc` rows otherwise."""
    return F.normalize(whole(ffn.fc.weight.detach())[: ffn.d_ff].float(), dim=1)


def router_centroids(ffn: FFN, labels: torch.Tensor, experts: int) -> torch.Tensor:
    """The centroid router [E, d]: expert e's vector is the mean of its neurons' unit input rows (not renormalised:
    its norm says how aligned the expert's neurons are)."""
    return cluster_means(neuron_rows(ffn), labels, experts)


def fit_router(x: torch.Tensor, mass: torch.Tensor, init: torch.Tensor, steps: int, lr: float = 1e-2) -> torch.Tensor:
    """A linear router [E, d] fitted on tokens `x` [N, d] to where their activation mass [N, E] is: softmax(x W^T)
    against each token's mass share over the experts (cross-entropy), from `init` (the centroids), `steps` of Adam."""
    target = mass / mass.sum(dim=1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    with torch.enable_grad():
        w = init.detach().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            loss = -(target * F.log_softmax(x @ w.t(), dim=1)).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return w.detach()


@torch.no_grad()
def permute_ffn_(ffn: FFN, order: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Reorder the neurons in place: new neuron i is old neuron order[i]. Moves `fc` rows (gate and up together),
    the `fc` bias, `proj` columns, and with them their gradients and optimizer moments. The parameters stay the
    same objects, so the optimizer's keys stay valid; the FFN computes the same function."""
    order = order.to(ffn.fc.weight.device)
    rows = ffn.in_rows(order)
    for p, dim, idx in [(ffn.fc.weight, 0, rows), (ffn.fc.bias, 0, rows), (ffn.proj.weight, 1, order)]:
        if p is None:
            continue
        for t in [p, *moments(optimizer, p).values(), *([p.grad] if p.grad is not None else [])]:
            index_select_(t, dim, idx)  # under FSDP2, each process's shard of the permuted tensor


class SSDFFN(FFN):
    """The dense FFN, switchable to an MoE of its own neurons. It adopts the dense FFN's `fc` and `proj` (no new
    parameters, the same state_dict keys); routing state lives in non-persistent buffers.

    In sparse mode, expert e is neurons e*f .. (e+1)*f - 1 (`permute_ffn_` lays them out). The dispatch is
    `moe.dispatch` (sort by expert, gather, combine), which needs only `num_experts` and `expert_rows`; the expert
    GEMMs here run on views of the dense weights."""

    def __init__(self, ffn: FFN):
        nn.Module.__init__(self)
        self.activation, self.d_ff = ffn.activation, ffn.d_ff
        self.fc, self.proj = ffn.fc, ffn.proj
        self.active = ffn.active
        self.sparse = False
        self.num_experts = self.top_k = 0
        self.router_grad = True
        self.kernel = "auto"  # how the expert GEMMs run (`moe.KERNELS`); "loop" is a reference
        self.register_buffer("centroids", None, persistent=False)  # [E, d] router vectors
        self.register_buffer("load", None, persistent=False)  # [E] assignments since the last reset

    def extra_repr(self) -> str:
        mode = f"sparse, experts={self.num_experts}, top_k={self.top_k}" if self.sparse else "dense"
        return f"d_ff={self.d_ff}, activation={self.activation}, {mode}"

    def set_sparse(self, experts: int, top_k: int, centroids: torch.Tensor, router_grad: bool = True) -> None:
        self.num_experts, self.top_k, self.router_grad = experts, top_k, router_grad
        self.centroids = centroids.to(self.fc.weight.device, torch.float32)
        self.load = torch.zeros(experts, device=self.fc.weight.device)
        self.sparse = True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts by centroid score [N, k] and their straight-through gates: exactly 1 forward, the gradient
        of the softmax over the top-k scores backward. The experts' load (which experts the step's optimizer
        updates) is counted in training passes only, not in evaluation or inference."""
        xr = x if self.router_grad else x.detach()
        scores = F.linear(xr, self.centroids.to(xr.dtype)).float()
        top, expert_ids = scores.sort(dim=-1, descending=True)  # of E values a row: one kernel, topk takes two
        top, expert_ids = top[:, : self.top_k], expert_ids[:, : self.top_k]
        s = top.softmax(dim=-1)
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.load += expert_counts(expert_ids, self.num_experts)
        return expert_ids, (s - s.detach()) + 1.0

    @property
    def d_expert(self) -> int:
        """Neurons an expert (sparse mode)."""
        return self.d_ff // self.num_experts

    def grouped_mm_ok(self, dtype: torch.dtype, device: torch.device) -> bool:
        """As `MoEFFN.grouped_mm_ok`, for these views: their non-unit strides are d (`fc`) and d_ff (`proj`), and
        each expert starts f elements after the previous one in `proj`."""
        if grouped_mm is None:
            return False
        if dtype != torch.bfloat16 and (device.type != "cpu" or torch.compiler.is_compiling()):
            return False
        align = 16 // torch.empty((), dtype=dtype).element_size()
        f = self.d_expert
        return all(n % align == 0 for n in (self.fc.in_features, f))

    def expert_rows(self, x: torch.Tensor, plan: Plan, kernel: str, weights: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The expert MLP of token rows x for every assignment of `plan` (called by `moe.dispatch`): grouped GEMMs
        on views of the dense weights (the cast to x's dtype is the one an autocast Linear makes). Slot rows out;
        given the router's `weights` (`route`'s straight-through gates, exactly 1), each token's rows summed
        (`moe.output_rows`)."""
        E, f, d = self.num_experts, self.d_expert, self.fc.in_features
        dtype = x.dtype
        # [E, d, f] views of fc's rows (gate, up: its two halves): split, not indexing, so the gradients meet again
        # in one concatenation, not a zero-filled copy per part.
        w_in = [w.view(E, f, d).transpose(1, 2) for w in self.fc.weight.to(dtype).split(self.d_ff)]
        bias = [None] * 2 if self.fc.bias is None else [b.view(E, f) for b in self.fc.bias.split(self.d_ff)]
        x, gather = plan.input(x, kernel)
        if self.activation == "swiglu":  # activate(.., "swiglu") on [gate | up]
            gate, up = (biased_rows(x, w_in[part], bias[part], plan, kernel, gather=gather) for part in (0, 1))
            a = F.silu(gate) * up
        else:
            a = activated_rows(x, w_in[0], bias[0], plan, kernel, self.activation, gather=gather)
        w_out = self.proj.weight.to(dtype).view(d, E, f).permute(1, 2, 0)  # [E, f, d]
        return output_rows(a.to(dtype), w_out, None, plan, kernel, weights, unit=True)  # `route`'s gates: all 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparse:
            return super().forward(x)
        B, T, d = x.shape
        x2 = x.reshape(B * T, d)
        kernel = choose_kernel(self, compute_dtype(x2), x2.device)
        y = dispatch(x2, *self.route(x2), self.num_experts, self.expert_rows, kernel)
        if self.proj.bias is not None:  # once per token, not once per expert
            y = y + self.proj.bias
        return y.to(x.dtype).view(B, T, d)


def ssd_layers(model: Transformer) -> list[SSDFFN]:
    """Every block's FFN as an `SSDFFN` (dense FFNs are converted in place, keeping their parameters)."""
    out = []
    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp, MoEFFN) or not isinstance(block.mlp, FFN):
            raise UserError(f"block {i} holds a {type(block.mlp).__name__}, not a dense FFN; SSD and MoE "
                            "inference need a dense model (not an upcycled one)")
        if not isinstance(block.mlp, SSDFFN):
            block.mlp = SSDFFN(block.mlp)
        out.append(block.mlp)
    return out
