"""SSD: switchable sparse-dense learning (ICML 2024). Train dense; when the FFN activation pattern is stable, train
each FFN as a Mixture-of-Experts cut out of its own neurons (MoEfication); switch back to dense; repeat.

The MoE is the dense FFN, permuted. A switch to sparse clusters every FFN's d_ff neurons into E experts of
f = d_ff / E, then permutes the neurons in place so that expert e is neurons e*f .. (e+1)*f - 1: the rows of `fc`
(gate and up rows together for SwiGLU: the authors' code permuted only one of them, a bug), its bias, the columns
of `proj`, and the AdamW moments of all three. The sparse phase then computes with views of those same dense
parameters (`SSDFFN`): `fc.weight.view(E, f, d)` and `proj.weight.view(d, E, f)`, transposed into the [E, K, N]
layout of the grouped GEMMs, so gradients land in the dense parameters and the optimizer does not know about
experts. SwiGLU's gate and up blocks cannot form one [E, d, 2f] view, so they take two grouped GEMMs (the same
FLOPs, no copy). Switching back to dense costs nothing: a dense FFN with permuted neurons is the same function.

Pieces, all in this module:
- Clustering: balanced spherical k-means (every expert gets exactly f neurons) on the L2-normalised input rows
  (the gate rows for SwiGLU: the gate decides whether a neuron fires), or on the neurons' binary firing patterns
  over the probe tokens (co-activation: the cosine of two patterns is their co-firing count over the geometric
  mean of their firing counts). Re-clustering runs from the previous centroids and from a fresh seeded start and
  keeps the one with the higher mean within-cluster similarity.
- Router: centroid-based by default. Expert e's router vector is the mean of its neurons' normalised input rows,
  fixed from the switch until the next one; score = x . centroid; each token takes its top-k experts. `router =
  "trained"`: at each switch a linear router per layer is fitted (from the centroids, `router_steps` Adam steps) to
  where the probe tokens' activation mass is, and used instead (no gradient from the training loss). Gating is
  straight-through: the selected experts' outputs are summed unweighted (the sparse FFN is the dense FFN restricted
  to their neurons), and g = 1 + s - s.detach(), s the softmax over the top-k scores, carries a gradient into the
  router's input (`router_grad`; the router has no parameters of its own to train).
- Monitor: every `monitor_every` steps (a light re-clustering: `monitor_iters` k-means iterations from the last
  check's centroids; the full one runs at each switch), on a fixed probe batch (the first sequences of the first
  training batch), per layer: activation sparsity (exact zeros for relu / relu2, |a| <= activation_threshold for
  gelu / swiglu), the adjusted Rand index between this clustering and the previous check's (neurons tracked through
  permutations), and the share of activation mass (sum of |a|) that the top-k experts hold, for the best k experts
  of each token (`mass`: how well the clustering can do) and for the router's choice (`router_mass`: what the
  sparse phase keeps).
- Policy: `adaptive` stays dense until the monitor sees a stable pattern (mean ARI >= stable_ari and mean router
  mass >= stable_mass) after at least `dense_span` dense steps, then trains sparse for `sparse_span` steps, and
  repeats; the last `final_fraction` of training runs in `final_phase`. `fixed` runs sparse in given [start, end)
  fractions of training (ablations). Every sparse phase starts with a fresh clustering.
- Sparse steps compute only the chosen experts (grouped GEMMs over their rows), and experts that no token chose on
  a step keep their weights and AdamW moments (`freeze_unrouted`; AdamW would move them by momentum and decay).
  Evaluation during training is dense. FLOPs per token follow the phase (k/E of the FFN plus the router); the
  monitor's probe passes and clusterings are counted in `ssd_overhead_flops`.
- Sparse inference and conversions: `run_as_moe` runs any dense model as an MoE; `moefy_checkpoint` /
  `densify_checkpoint` write permuted / original-order model folders; `generate` samples text either way.

The method swaps the FFNs for `SSDFFN`s in `start()`, not `setup()`: a model loaded for evaluation or export stays
a plain dense Transformer (its neurons in the run's last layout, the same function). The probe batch is taken by a
one-shot forward pre-hook on the model, so the trainer needs no extra hook.

Distributed: the probe is broadcast from rank 0, and so are the clusterings and the monitor's numbers, so every rank
permutes and switches alike. Under FSDP2 (`shards`) the clustering reads each layer's gathered `fc` rows, a switch
permutes the gathered rows and keeps each process's shard, the probe runs through FSDP2's hooks, and the sparse
forward takes its expert views of the weights FSDP2 gathered for the block.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..errors import UserError
from ..model import FFN, ModelArgs, Transformer, activate, flops_per_token
from ..moe import MoEFFN, dispatch, expert_counts, group_gemm, grouped_mm
from .base import Method
from .frozen import SliceStash, moments
from .shards import index_select_, whole

SCHEDULES = ("adaptive", "fixed")
PHASES = ("dense", "sparse")
CLUSTERINGS = ("weights", "coactivation")
ROUTERS = ("centroid", "trained")
EXACT_ZERO = ("relu", "relu2")  # activations whose inactive neurons output exactly 0


@dataclass
class SSDOptions:
    experts: int = 16  # E: every FFN is cut into E experts of d_ff / E neurons
    top_k: int = 4  # experts per token in the sparse phase
    top_ratio: float = 0.0  # > 0: top_k = round(top_ratio * experts), at least 1
    schedule: str = "adaptive"  # adaptive (the monitor decides) | fixed (sparse_windows)
    sparse_windows: list[list[float]] = field(default_factory=list)  # fixed: [start, end) fractions of training
    stable_ari: float = 0.9  # adaptive: go sparse when the mean ARI of consecutive clusterings reaches this
    # ... and the router's top-k experts hold at least this share of activation mass. 0.5: gpt2-small (relu2, E=16,
    # top-4) held 0.58-0.61 once its clusterings were stable (ARI >= 0.9); 0.6 never switched (BENCHMARKS.md).
    stable_mass: float = 0.5
    sparse_span: int = 200  # adaptive: steps per sparse phase
    dense_span: int = 100  # adaptive: dense steps at least, at the start and after every sparse phase
    final_phase: str = "dense"  # adaptive: the phase of the last final_fraction of training
    final_fraction: float = 0.1
    monitor_every: int = 50  # steps between monitor checks; 0 = no monitor (fixed schedule only)
    probe_sequences: int = 8  # sequences of the first training micro-batch kept as the probe
    activation_threshold: float = 0.01  # gelu / swiglu: |a| <= this is inactive (relu / relu2: a == 0)
    cluster: str = "weights"  # weights (k-means on normalised input rows) | coactivation (firing patterns)
    cluster_iters: int = 10  # k-means iterations per start at a switch (and at the first check)
    monitor_iters: int = 3  # k-means iterations of a periodic check: from the last check's centroids only
    router_grad: bool = True  # the straight-through gate's gradient reaches the router's input
    # centroid: expert e's router vector is its neurons' mean input row | trained: a linear router fitted at every
    # switch, from the centroids, to where each probe token's activation mass is (router_steps Adam steps)
    router: str = "centroid"
    router_steps: int = 100
    freeze_unrouted: bool = True  # experts that no token chose on a step keep their weights and moments
    seed: int = 0  # fresh k-means starts


def resolve_top_k(o: SSDOptions) -> int:
    return max(1, round(o.top_ratio * o.experts)) if o.top_ratio > 0 else o.top_k


def check_options(o: SSDOptions, args: ModelArgs) -> None:
    if o.experts < 2 or args.d_ff % o.experts:
        raise UserError(f"method.experts={o.experts} must be >= 2 and divide model.d_ff={args.d_ff}")
    if not 0 <= o.top_ratio <= 1:
        raise UserError(f"method.top_ratio must be in [0, 1] (0 = use method.top_k), got {o.top_ratio}")
    k = resolve_top_k(o)
    if not 1 <= k <= o.experts:
        raise UserError(f"method.top_k={k} must be in [1, method.experts={o.experts}]")
    for key, allowed in [("schedule", SCHEDULES), ("final_phase", PHASES), ("cluster", CLUSTERINGS),
                         ("router", ROUTERS)]:
        if getattr(o, key) not in allowed:
            raise UserError(f"unknown method.{key} '{getattr(o, key)}'; choose one of {', '.join(allowed)}")
    if o.schedule == "fixed":
        check_windows(o.sparse_windows)
    elif o.sparse_windows:
        raise UserError("method.sparse_windows is read only with method.schedule = \"fixed\"; remove it or set "
                        "the schedule to fixed")
    if o.schedule == "adaptive" and o.monitor_every < 1:
        raise UserError("method.schedule = \"adaptive\" needs the monitor: set method.monitor_every >= 1")
    for key in ["monitor_every", "sparse_span", "dense_span"]:
        if getattr(o, key) < 0:
            raise UserError(f"method.{key} must be >= 0, got {getattr(o, key)}")
    if o.sparse_span < 1:
        raise UserError(f"method.sparse_span must be at least 1 step, got {o.sparse_span}")
    for key in ["probe_sequences", "cluster_iters", "monitor_iters", "router_steps"]:
        if getattr(o, key) < 1:
            raise UserError(f"method.{key} must be at least 1, got {getattr(o, key)}")
    if not -1 <= o.stable_ari <= 1:
        raise UserError(f"method.stable_ari must be in [-1, 1] (an adjusted Rand index), got {o.stable_ari}")
    if not 0 <= o.stable_mass <= 1:
        raise UserError(f"method.stable_mass must be a share in [0, 1], got {o.stable_mass}")
    if not 0 <= o.final_fraction < 1:
        raise UserError(f"method.final_fraction must be in [0, 1), got {o.final_fraction}")
    if o.activation_threshold < 0:
        raise UserError(f"method.activation_threshold must be >= 0, got {o.activation_threshold}")


def check_windows(windows: list[list[float]]) -> None:
    """Sparse windows: [start, end) pairs of training fractions, ordered, not overlapping, within [0, 1]."""
    previous_end = 0.0
    for w in windows:
        if len(w) != 2 or not 0 <= w[0] < w[1] <= 1:
            raise UserError(f"method.sparse_windows entry {w} must be [start, end) with 0 <= start < end <= 1")
        if w[0] < previous_end:
            raise UserError(f"method.sparse_windows must be ordered and not overlap; {w} starts before "
                            f"{previous_end}")
        previous_end = w[1]


# --- clustering ------------------------------------------------------------------------------------------------------
def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each of n rows to one of E clusters, exactly `capacity` rows each (n = E * capacity), greedily by similarity
    [n, E]: unassigned rows propose to their most similar cluster with room, each cluster accepts its most similar
    proposers up to its room, the rest propose again. A round either places every proposer or fills a cluster,
    so it ends within E + 1 rounds."""
    n, E = sim.shape
    labels = torch.full((n,), -1, dtype=torch.long, device=sim.device)
    room = torch.full((E,), capacity, dtype=torch.long, device=sim.device)
    free = torch.arange(n, device=sim.device)
    while free.numel():
        best, choice = sim[free].masked_fill(room == 0, float("-inf")).max(dim=1)
        order = best.argsort(descending=True, stable=True)
        order = order[choice[order].argsort(stable=True)]  # by cluster, the most similar first
        c = choice[order]
        rank = torch.arange(c.numel(), device=sim.device) - torch.searchsorted(c, c)
        accept = rank < room[c]
        labels[free[order[accept]]] = c[accept]
        room -= torch.bincount(c[accept], minlength=E)
        free = free[order[~accept]]
    return labels


def cluster_means(features: torch.Tensor, labels: torch.Tensor, experts: int) -> torch.Tensor:
    """Mean feature row of every cluster [E, D]."""
    sums = features.new_zeros(experts, features.shape[1]).index_add_(0, labels, features)
    return sums / torch.bincount(labels, minlength=experts).clamp_min(1)[:, None].to(features.dtype)


@dataclass
class Clustering:
    labels: torch.Tensor  # [n] the cluster of every row
    centroids: torch.Tensor  # [E, D] unit vectors (zero where a cluster's rows sum to zero)
    score: float  # mean cosine similarity of the rows to their centroid


def balanced_kmeans(features: torch.Tensor, experts: int, iters: int, init: torch.Tensor) -> Clustering:
    """Spherical k-means with balanced assignments on unit rows `features` [n, D], from centroids `init`."""
    capacity = features.shape[0] // experts
    centroids = init
    for _ in range(iters):
        labels = balanced_assign(features @ centroids.t(), capacity)
        centroids = F.normalize(cluster_means(features, labels, experts), dim=1)
    score = (features * centroids[labels]).sum(dim=1).mean().item()
    return Clustering(labels, centroids, score)


def cluster_neurons(features: torch.Tensor, experts: int, iters: int, seed: int,
                    warm: torch.Tensor | None = None, fresh: bool = True) -> Clustering:
    """Balanced k-means from E seeded random rows; with `warm` centroids, also from those, keeping the better
    clustering (the warm one on a tie, so a stable pattern keeps its layout). `fresh=False` with `warm`: from the
    warm centroids only (the monitor's cheap periodic check). Deterministic given the seed."""
    if warm is not None and not fresh and warm.shape == (experts, features.shape[1]):
        return balanced_kmeans(features, experts, iters, warm.to(features))
    gen = torch.Generator().manual_seed(seed)
    start = features[torch.randperm(features.shape[0], generator=gen)[:experts].to(features.device)]
    best = balanced_kmeans(features, experts, iters, start)
    if warm is not None and warm.shape == best.centroids.shape:
        from_warm = balanced_kmeans(features, experts, iters, warm.to(features))
        if from_warm.score >= best.score:
            best = from_warm
    return best


def adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> float:
    """Adjusted Rand index of two labelings of the same items (Hubert & Arabie): 1 for the same partition under
    any renaming, about 0 for independent ones. Computed from the contingency table in float64."""
    a = torch.unique(a, return_inverse=True)[1].flatten()
    b = torch.unique(b, return_inverse=True)[1].flatten()
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    table = torch.zeros(ka * kb, dtype=torch.float64, device=a.device)
    table = table.index_add_(0, a * kb + b, torch.ones_like(a, dtype=torch.float64)).view(ka, kb)

    def pairs(t):
        return (t * (t - 1) / 2).sum().item()

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    n = a.numel()
    expected = rows * cols / (n * (n - 1) / 2)
    top = (rows + cols) / 2
    if top == expected:  # both partitions trivial (one cluster, or all singletons): identical
        return 1.0
    return (index - expected) / (top - expected)


def contiguous_labels(d_ff: int, experts: int, device=None) -> torch.Tensor:
    """The layout after a switch: expert e is neurons e*f .. (e+1)*f - 1."""
    return torch.arange(d_ff, device=device) // (d_ff // experts)


# --- the FFN's neurons ---------------------------------------------------------------------------------------------
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
        self.grouped = True  # False forces the per-expert loop (a reference)
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
        of the softmax over the top-k scores backward."""
        xr = x if self.router_grad else x.detach()
        scores = F.linear(xr, self.centroids.to(xr.dtype)).float()
        top, expert_ids = scores.topk(self.top_k, dim=-1)
        s = top.softmax(dim=-1)
        with torch.no_grad():
            self.load += expert_counts(expert_ids, self.num_experts)
        return expert_ids, (s - s.detach()) + 1.0

    def use_grouped_mm(self, dtype: torch.dtype, device: torch.device) -> bool:
        """As `MoEFFN.use_grouped_mm`, for these views: their non-unit strides are d (`fc`) and d_ff (`proj`), and
        each expert starts f elements after the previous one in `proj`."""
        if not self.grouped or grouped_mm is None:
            return False
        if dtype != torch.bfloat16 and (device.type != "cpu" or torch.compiler.is_compiling()):
            return False
        align = 16 // torch.empty((), dtype=dtype).element_size()
        f = self.d_ff // self.num_experts
        return all(n % align == 0 for n in (self.fc.in_features, f))

    def expert_rows(self, xs, offs, sorted_ids, dtype) -> torch.Tensor:
        """The expert MLP of rows grouped by expert (called by `moe.dispatch`): grouped GEMMs on views of the
        dense weights (the cast to `dtype` is the one an autocast Linear makes)."""
        E, f, d = self.num_experts, self.d_ff // self.num_experts, self.fc.in_features
        grouped = self.use_grouped_mm(dtype, xs.device)
        w_in = self.fc.weight.to(dtype).view(-1, E, f, d).transpose(2, 3)  # [1 or 2 (gate, up), E, d, f]
        ids = sorted_ids.long()

        def pre_activation(part: int) -> torch.Tensor:
            h = group_gemm(xs, w_in[part], offs, grouped)
            if self.fc.bias is not None:  # added in fp32, as in MoEFFN
                h = h + self.fc.bias.float().view(-1, E, f)[part].index_select(0, ids)
            return h

        if self.activation == "swiglu":
            a = F.silu(pre_activation(0)) * pre_activation(1)  # activate(.., "swiglu") on [gate | up]
        else:
            a = activate(pre_activation(0), self.activation)
        w_out = self.proj.weight.to(dtype).view(d, E, f).permute(1, 2, 0)  # [E, f, d]
        return group_gemm(a.to(dtype), w_out, offs, grouped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparse:
            return super().forward(x)
        B, T, d = x.shape
        x2 = x.reshape(B * T, d)
        y = dispatch(x2, *self.route(x2), self.num_experts, self.expert_rows)
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


# --- the monitor ------------------------------------------------------------------------------------------------------
@dataclass
class Check:
    """One monitor check: per-layer numbers (None where not measured: no probe, or no previous clustering)."""

    sparsity: list[float | None]
    ari: list[float | None]
    mass: list[float | None]
    router_mass: list[float | None]
    flops: float = 0.0

    KEYS = ("sparsity", "ari", "mass", "router_mass")

    def mean(self, key: str) -> float | None:
        values = getattr(self, key)
        return None if any(v is None for v in values) else sum(values) / len(values)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS}


class _ProbeDone(Exception):
    """Raised by the last layer's hook: the probe needs no logits."""


class Monitor:
    """Activation sparsity and clustering stability per layer. Keeps, per layer, the last clustering (as labels of
    the *original* neurons, so a permutation in between does not change the adjusted Rand index) and its centroids
    (the warm start of the next clustering)."""

    def __init__(self, experts: int, top_k: int, *, threshold: float = 0.01, cluster: str = "weights",
                 iters: int = 10, light_iters: int = 3, router_steps: int = 0, seed: int = 0):
        self.experts, self.top_k, self.threshold = experts, top_k, threshold
        self.cluster, self.iters, self.light_iters, self.seed = cluster, iters, light_iters, seed
        self.router_steps = router_steps  # > 0: full checks with a probe also fit a linear router per layer
        self.labels: list[torch.Tensor | None] = []
        self.centroids: list[torch.Tensor | None] = []
        self.routers: list[torch.Tensor | None] = []  # [E, d] per layer, in the last clustering's expert order
        self.count = 0  # clusterings so far: part of the fresh starts' seeds

    def seed_for(self, layer: int) -> int:
        return int(np.random.SeedSequence([self.seed, layer, self.count]).generate_state(1)[0])

    def warm_from_layout(self, model: Transformer) -> None:
        """Take the model's current contiguous layout (an SSD run's or a moefied model's) as the last clustering."""
        self.labels, self.centroids = [], []
        for block in model.blocks:
            labels = contiguous_labels(block.mlp.d_ff, self.experts, block.mlp.fc.weight.device)
            self.labels.append(labels)
            self.centroids.append(F.normalize(cluster_means(neuron_rows(block.mlp), labels, self.experts), dim=1))

    @torch.no_grad()
    def check(self, model: Transformer, probe: torch.Tensor | None = None,
              order: torch.Tensor | None = None, light: bool = False) -> Check:
        """Cluster every layer and, with a probe batch [B, T], measure it. `order` [L, d_ff]: the original neuron
        at each position (None = the original order). Without a probe, clustering uses the weights. `light`: a
        layer with a previous clustering re-clusters from its centroids alone for `light_iters` iterations (a
        periodic check; k-means is most of a check's cost), else from those and a fresh start for `iters`."""
        ffns = [b.mlp for b in model.blocks]
        L = len(ffns)
        if order is None:
            order = torch.arange(ffns[0].d_ff, device=ffns[0].fc.weight.device).expand(L, -1)
        self.labels += [None] * (L - len(self.labels))
        self.centroids += [None] * (L - len(self.centroids))
        self.routers = [None] * L
        stats: dict[str, list] = {k: [None] * L for k in Check.KEYS}
        flops = 0.0
        if probe is None:
            for i, ffn in enumerate(ffns):
                flops += self._layer(i, ffn, order[i], stats, light=light)
        else:
            modes = [isinstance(f, SSDFFN) and f.sparse for f in ffns]
            # FSDP2 gathers each block's weights in hooks around its call: the probe goes through them and to the
            # end (stopping inside a block would leave its weights gathered).
            sharded = isinstance(model.wte.weight, DTensor)

            def hook(i, module, inputs, output):
                nonlocal flops
                flops += self._layer(i, ffns[i], order[i], stats, inputs[0], output, light=light)
                if i == L - 1 and not sharded:
                    raise _ProbeDone

            handles = [f.fc.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i, f in enumerate(ffns)]
            try:
                for f in ffns:  # the probe measures the dense FFN
                    if isinstance(f, SSDFFN):
                        f.sparse = False
                # One process or DDP: the eager forward, not __call__, so a compiled model's graph stays as it is.
                # FSDP2: __call__, whose hooks gather the root's weights (the blocks are compiled one by one).
                (model if sharded else model.forward)(probe)
            except _ProbeDone:
                pass
            finally:
                for h in handles:
                    h.remove()
                for f, m in zip(ffns, modes):
                    if isinstance(f, SSDFFN):
                        f.sparse = m
            parts = flops_per_token(model.args, probe.shape[1])
            flops += probe.numel() * (parts["attn_linear"] + parts["attn_scores"] + parts["ffn"]
                                      + (parts["head"] if sharded else 0.0))  # FSDP2: the probe runs to the logits
        self.count += 1
        # One host sync for the tensor-valued numbers.
        flat = [(k, i) for k in Check.KEYS for i in range(L) if torch.is_tensor(stats[k][i])]
        values = torch.stack([stats[k][i] for k, i in flat]).tolist() if flat else []
        for (k, i), v in zip(flat, values):
            stats[k][i] = v
        return Check(**stats, flops=flops)

    def _layer(self, i: int, ffn: FFN, order: torch.Tensor, stats: dict, x=None, pre=None,
               light: bool = False) -> float:
        """Cluster layer i (and measure it when the probe's FFN input `x` and pre-activation `pre` are given);
        returns the FLOPs spent. The clustering runs on the neurons in their original order, so it does not depend
        on how they are laid out."""
        E, k, d_ff = self.experts, self.top_k, ffn.d_ff
        unpermute = order.argsort()
        rows = neuron_rows(ffn)[unpermute]  # row j: original neuron j
        h = active = None
        if x is not None:
            x, pre = x.reshape(-1, x.shape[-1]).float(), pre.reshape(-1, pre.shape[-1]).float()
            h = activate(pre, ffn.activation)
            active = h > 0 if ffn.activation in EXACT_ZERO else h.abs() > self.threshold
            stats["sparsity"][i] = 1.0 - active.float().mean()
        if self.cluster == "weights" or active is None:
            features = rows
        else:  # firing patterns over the probe's tokens
            features = F.normalize(active.t()[unpermute].float(), dim=1)
        warm = self.centroids[i]
        light = light and warm is not None
        iters = self.light_iters if light else self.iters
        result = cluster_neurons(features, E, iters, self.seed_for(i), warm, fresh=not light)
        if self.labels[i] is not None:
            stats["ari"][i] = adjusted_rand_index(self.labels[i], result.labels)
        starts = 1 if light or warm is None else 2
        self.labels[i], self.centroids[i] = result.labels, result.centroids
        flops = starts * iters * 2.0 * d_ff * E * features.shape[1]
        if h is not None:
            labels = result.labels[order]  # of the neurons at their positions, as h's columns are
            mass = h.new_zeros(h.shape[0], E).index_add_(1, labels, h.abs())  # [N, E]
            total = mass.sum().clamp_min(torch.finfo(mass.dtype).tiny)
            stats["mass"][i] = mass.topk(k, dim=1).values.sum() / total
            router = cluster_means(rows, result.labels, E)  # the centroid router
            chosen = (x @ router.t()).topk(k, dim=1).indices
            stats["router_mass"][i] = mass.gather(1, chosen).sum() / total
            flops += 2.0 * h.shape[0] * E * (d_ff + x.shape[1])
            if self.router_steps and not light:
                self.routers[i] = fit_router(x, mass, router, self.router_steps)
                flops += self.router_steps * 3 * 2.0 * h.shape[0] * E * x.shape[1]
        return flops

    def positions(self, i: int, order: torch.Tensor) -> torch.Tensor:
        """The last clustering of layer i as labels of the neurons at their current positions."""
        return self.labels[i][order]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"count": self.count}
        if self.labels and all(t is not None for t in self.labels):
            state["labels"] = torch.stack(self.labels).cpu()
            state["centroids"] = torch.stack(self.centroids).cpu()
        return state

    def load_state_dict(self, state: dict[str, Any], device) -> None:
        self.count = int(state["count"])
        self.labels = [t.to(device) for t in state["labels"]] if "labels" in state else []
        self.centroids = [t.to(device) for t in state["centroids"]] if "centroids" in state else []


# --- the method -------------------------------------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SSD(Method):
    name = "ssd"
    Options = SSDOptions

    def __init__(self, options: SSDOptions, args: ModelArgs, seq_len: int):
        super().__init__(options, args, seq_len)
        o = options
        self.top_k = resolve_top_k(o)
        self.monitor = Monitor(o.experts, self.top_k, threshold=o.activation_threshold, cluster=o.cluster,
                               iters=o.cluster_iters, light_iters=o.monitor_iters,
                               router_steps=o.router_steps if o.router == "trained" else 0, seed=o.seed)
        # Training tokens per optimizer step: when the trainer sets it, the monitor's and the clustering's FLOPs are
        # folded into flops_per_token; they are always in the metric ssd_overhead_flops.
        self.tokens_per_step = 0
        self.layers: list[SSDFFN] = []
        self.order: torch.Tensor | None = None  # [L, d_ff]: the original neuron at each position
        self.phase, self.phase_start, self.window, self.switches = "dense", 0, -1, 0
        self.probe: torch.Tensor | None = None
        self.last: Check | None = None
        self.check_step = self.reported_check = -1
        self.overhead = self.overhead_total = 0.0  # FLOPs: not yet in flops_per_token / all of them
        self._probe_hook = None
        self._pending_state: dict | None = None
        self._stash: SliceStash | None = None

    @classmethod
    def validate(cls, options: SSDOptions, args: ModelArgs, seq_len: int) -> None:
        check_options(options, args)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, model: Transformer, optimizer: torch.optim.Optimizer) -> None:
        super().start(model, optimizer)
        self.layers = ssd_layers(model)
        device = self.layers[0].fc.weight.device
        if self.order is None:
            self.order = torch.arange(self.args.d_ff, device=device).repeat(self.args.n_layer, 1)
        if self._pending_state is not None:
            self._apply_state(self._pending_state, device)
            self._pending_state = None
        if self.probe is None and self._probe_hook is None:
            self._probe_hook = model.register_forward_pre_hook(self._capture_probe)

    @torch.compiler.disable
    def _capture_probe(self, module, inputs) -> None:
        """Forward pre-hook, removed after its first call: keep the first sequences of the first batch the model
        sees (rank 0's, on every rank) as the monitor's probe."""
        probe = inputs[0][: self.options.probe_sequences].detach().clone()
        if _distributed():
            dist.broadcast(probe, 0)
        self.probe = probe
        self._probe_hook.remove()
        self._probe_hook = None

    # --- policy -------------------------------------------------------------------------------------------------
    def decide(self, step: int) -> tuple[str, int]:
        """The phase of `step` and, for the fixed schedule, its sparse window (-1 = none)."""
        o, T = self.options, self.total_steps
        if o.schedule == "fixed":
            for w, (a, b) in enumerate(o.sparse_windows):
                if round(a * T) <= step < round(b * T):
                    return "sparse", w
            return "dense", -1
        if step >= round((1 - o.final_fraction) * T):
            return o.final_phase, -1
        if self.phase == "sparse":
            return ("sparse" if step - self.phase_start < o.sparse_span else "dense"), -1
        return ("sparse" if step - self.phase_start >= o.dense_span and self.stable() else "dense"), -1

    def stable(self) -> bool:
        """The last check, made in this dense phase, saw a stable pattern."""
        c = self.last
        if c is None or self.check_step < self.phase_start:
            return False
        ari, mass = c.mean("ari"), c.mean("router_mass")
        return ari is not None and mass is not None and ari >= self.options.stable_ari \
            and mass >= self.options.stable_mass

    # --- per step -----------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        phase, window = self.decide(step)
        if phase == "sparse" and (self.phase == "dense" or window != self.window):
            self.switch_to_sparse(step, window)
        elif phase == "dense" and self.phase == "sparse":
            self.switch_to_dense(step)
        if self.phase == "sparse":
            for m in self.layers:
                m.load.zero_()

    def switch_to_sparse(self, step: int, window: int = -1) -> None:
        """Re-cluster in full (warm and fresh starts), lay every FFN out expert by expert (weights and moments),
        and route with the new centroids (or the routers the check fitted: `router = "trained"`, when there was a
        probe to fit them on)."""
        self.run_check(step)
        E = self.options.experts
        for i, m in enumerate(self.layers):
            order = self.monitor.positions(i, self.order[i]).argsort(stable=True)
            permute_ffn_(m, order, self.optimizer)
            self.order[i] = self.order[i][order]
            router = self.monitor.routers[i]  # expert e is label e, before and after the permutation
            if router is None:
                router = router_centroids(m, contiguous_labels(m.d_ff, E, order.device), E)
            m.set_sparse(E, self.top_k, router, self.options.router_grad)
        self.phase, self.phase_start, self.window = "sparse", step, window
        self.switches += 1

    def switch_to_dense(self, step: int) -> None:
        for m in self.layers:
            m.sparse = False
        self.phase, self.phase_start, self.window = "dense", step, -1

    def run_check(self, step: int, light: bool = False) -> None:
        """A monitor check at `step` (before that step's update); on the probe when there is one yet."""
        # Without a probe yet (a sparse window from step 0) the clustering uses the weights.
        check = self.monitor.check(self.model, self.probe, self.order, light=light)
        if _distributed():
            check = self._same_on_all_ranks(check)
        self.last, self.check_step = check, step
        self.overhead += check.flops
        self.overhead_total += check.flops

    def _same_on_all_ranks(self, check: Check) -> Check:
        """Rank 0's clustering and numbers, so that every rank permutes and switches alike."""
        for t in self.monitor.labels + self.monitor.centroids + [r for r in self.monitor.routers if r is not None]:
            dist.broadcast(t, 0)
        packed = torch.tensor([[math.nan if v is None else v for v in getattr(check, k)] for k in Check.KEYS],
                              device=self.order.device)
        dist.broadcast(packed, 0)
        values = {k: [None if math.isnan(v) else v for v in row] for k, row in zip(Check.KEYS, packed.tolist())}
        return Check(**values, flops=check.flops)

    def after_optimizer(self, step: int) -> None:
        self._restore()
        every = self.options.monitor_every
        if every and (step + 1) % every == 0 and self.probe is not None:
            self.run_check(step + 1, light=True)

    # --- only the chosen experts are updated -------------------------------------------------------------------
    def before_optimizer(self, step: int) -> None:
        """Experts no token chose this step have zero gradients, but AdamW would still move them (momentum, weight
        decay): stash their weights and moments, put back after the step."""
        self._stash = SliceStash(self.optimizer)
        if self.phase != "sparse" or not self.options.freeze_unrouted:
            return
        loads = torch.stack([m.load for m in self.layers])
        if _distributed():
            dist.all_reduce(loads)
        idle = loads == 0
        if not bool(idle.any()):
            return
        E = self.options.experts
        f = self.args.d_ff // E
        with torch.no_grad():
            for i, m in enumerate(self.layers):
                experts = idle[i].nonzero().flatten()
                if not experts.numel():
                    continue
                neurons = (experts[:, None] * f + torch.arange(f, device=experts.device)).flatten()
                rows = m.in_rows(neurons)
                for p, dim, idx in [(m.fc.weight, 0, rows), (m.fc.bias, 0, rows), (m.proj.weight, 1, neurons)]:
                    if p is not None:
                        self._stash.save(p, dim, idx)

    def _restore(self) -> None:
        if self._stash is not None:
            self._stash.restore()
            self._stash = None

    def before_eval(self) -> None:
        """Evaluate the dense model (what training produces), also in a sparse phase."""
        if self.phase == "sparse":
            for m in self.layers:
                m.sparse = False

    def after_eval(self) -> None:
        if self.phase == "sparse":
            for m in self.layers:
                m.sparse = True

    # --- accounting ---------------------------------------------------------------------------------------------
    def phase_flops_per_token(self, phase: str) -> float:
        """Training FLOPs per token in a phase: a sparse FFN computes k of E experts, plus the router GEMM."""
        if phase == "dense":
            return self.dense_flops_per_token()
        a, E = self.args, self.options.experts
        parts = flops_per_token(a, self.seq_len)
        ffn = parts["ffn"] * self.top_k / E + a.n_layer * 2 * a.d_model * E
        return 3 * (sum(parts.values()) - parts["ffn"] + ffn)

    def flops_per_token(self, step: int) -> float:
        """The phase of the step just taken, plus the overhead since the last call spread over the step's tokens
        (when `tokens_per_step` is known)."""
        flops = self.phase_flops_per_token(self.phase)
        if self.tokens_per_step:
            flops += self.overhead / self.tokens_per_step
            self.overhead = 0.0
        return flops

    def metrics(self, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ssd_phase": self.phase,
            "ssd_switches": self.switches,
            "ssd_flops_saved": 1 - self.phase_flops_per_token(self.phase) / self.dense_flops_per_token(),
            "ssd_overhead_flops": self.overhead_total,
        }
        if self.last is not None and self.check_step != self.reported_check:
            # Each check once: per-layer lists and their means.
            self.reported_check = self.check_step
            out["ssd_check_step"] = self.check_step
            for key in Check.KEYS:
                out[f"ssd_{key}"] = self.last.mean(key)
                out[f"ssd_{key}_layers"] = [None if v is None else round(v, 4) for v in getattr(self.last, key)]
        return out

    # --- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "experts": self.options.experts, "phase": self.phase, "phase_start": self.phase_start,
            "window": self.window, "switches": self.switches, "check_step": self.check_step,
            "reported_check": self.reported_check, "overhead": self.overhead, "overhead_total": self.overhead_total,
            "neuron_order": self.order.cpu(), "monitor": self.monitor.state_dict(),
        }
        if self.probe is not None:
            state["probe"] = self.probe.cpu()
        if self.phase == "sparse":
            state["router"] = torch.stack([m.centroids for m in self.layers]).cpu()
        if self.last is not None:
            state["last"] = self.last.as_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Applied in start() (the trainer loads state before start, when the layers exist)."""
        if state["experts"] != self.options.experts:
            raise UserError(f"this checkpoint's SSD run used method.experts={state['experts']}, the config says "
                            f"{self.options.experts}; resume with the same method options")
        if self.layers:
            self._apply_state(state, self.layers[0].fc.weight.device)
        else:
            self._pending_state = state

    def _apply_state(self, state: dict[str, Any], device) -> None:
        self.phase, self.phase_start = state["phase"], int(state["phase_start"])
        self.window, self.switches = int(state["window"]), int(state["switches"])
        self.check_step, self.reported_check = int(state["check_step"]), int(state["reported_check"])
        self.overhead, self.overhead_total = float(state["overhead"]), float(state["overhead_total"])
        self.order = state["neuron_order"].to(device)
        self.monitor.load_state_dict(state["monitor"], device)
        self.probe = state["probe"].to(device) if "probe" in state else None
        last = state.get("last")
        self.last = Check(**{k: list(last[k]) for k in Check.KEYS}) if last else None
        for i, m in enumerate(self.layers):
            if self.phase == "sparse":
                m.set_sparse(self.options.experts, self.top_k, state["router"][i], self.options.router_grad)
            else:
                m.sparse = False


# --- sparse inference and conversions -----------------------------------------------------------------------------
def moefy_(model: Transformer, experts: int, clustering: list[torch.Tensor] | None = None, *, iters: int = 10,
           seed: int = 0) -> torch.Tensor:
    """Lay every FFN of a dense model out expert by expert, in place (a dense model computing the same function).
    `clustering`: per layer, the expert of every neuron at its current position; None clusters the weights,
    warm-started from the current contiguous layout (an SSD run's or a moefied model's). Returns the orders
    applied [L, d_ff] (new neuron i was neuron order[i])."""
    if experts < 2 or model.args.d_ff % experts:
        raise UserError(f"experts={experts} must be >= 2 and divide the model's d_ff={model.args.d_ff}")
    layers = ssd_layers(model)
    if clustering is None:
        monitor = Monitor(experts, 1, iters=iters, seed=seed)
        monitor.warm_from_layout(model)
        monitor.check(model)
        clustering = monitor.labels  # labels of the original neurons, and here the original order is the current one
    orders = []
    for m, labels in zip(layers, clustering):
        order = labels.to(m.fc.weight.device).argsort(stable=True)
        permute_ffn_(m, order)
        orders.append(order)
    return torch.stack(orders)


def run_as_moe(model: Transformer, top_k: int, experts: int = 16, clustering: list[torch.Tensor] | None = None,
               *, iters: int = 10, seed: int = 0, router_grad: bool = True) -> Transformer:
    """Run every FFN of a dense model as an MoE of `experts` experts, top-`top_k` per token (in place; returns the
    model). `clustering` as in `moefy_`: None clusters the weights."""
    if not 1 <= top_k <= experts:
        raise UserError(f"top-k={top_k} experts must be in [1, experts={experts}]")
    moefy_(model, experts, clustering, iters=iters, seed=seed)
    for m in ssd_layers(model):
        labels = contiguous_labels(m.d_ff, experts, m.fc.weight.device)
        m.set_sparse(experts, top_k, router_centroids(m, labels, experts), router_grad)
    return model


@torch.no_grad()
def fit_routers(model: Transformer, probe: torch.Tensor, steps: int = 100) -> Transformer:
    """Replace the centroid routers of a model run as an MoE (`run_as_moe`) with linear routers fitted, layer by
    layer, to where the activation mass of the probe tokens [B, T] is (`fit_router`); the probe runs dense."""
    layers = ssd_layers(model)
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach())) for m in layers]
    for m in layers:
        m.sparse = False
    try:
        model(probe)
    finally:
        for h in hooks:
            h.remove()
        for m in layers:
            m.sparse = True
    for m, x in zip(layers, inputs):
        x = x.reshape(-1, x.shape[-1]).float()
        h = activate(F.linear(x, m.fc.weight.float(), None if m.fc.bias is None else m.fc.bias.float()),
                     m.activation)
        labels = contiguous_labels(m.d_ff, m.num_experts, x.device)
        mass = h.new_zeros(h.shape[0], m.num_experts).index_add_(1, labels, h.abs())
        m.centroids = fit_router(x, mass, m.centroids, steps)
    return model


def run_dense(model: Transformer) -> Transformer:
    """Back to the dense FFN (the neurons stay in their expert order: the same function)."""
    for block in model.blocks:
        if isinstance(block.mlp, SSDFFN):
            block.mlp.sparse = False
    return model


def _model_folder(path: str | Path) -> tuple[Path, Path]:
    """(config.toml, the folder holding model.safetensors) of a run, checkpoint or model folder."""
    from ..checkpoint import find_weights

    cfg_path, weights = find_weights(path)
    return cfg_path, weights.parent


def stored_order(path: str | Path) -> torch.Tensor | None:
    """The neuron order [L, d_ff] stored with a model (the original neuron at each position): a moefied folder's
    `moe.safetensors` or an SSD checkpoint's method state. None: the neurons are in their original order."""
    from safetensors.torch import load_file

    folder = _model_folder(path)[1]
    for name in ("moe.safetensors", "method.safetensors"):
        if (folder / name).is_file():
            tensors = load_file(str(folder / name))
            if "neuron_order" in tensors:
                return tensors["neuron_order"]
    return None


def _dense_config(cfg) -> str:
    from .. import config as config_mod

    raw = config_mod.to_dict(cfg)
    raw["method"] = {"name": "dense"}  # a converted folder holds a plain dense model
    return config_mod.dumps(raw)


def moefy_checkpoint(src: str | Path, out: str | Path, experts: int, seed: int = 0, iters: int = 10) -> Path:
    """`convert moefy`: cluster every FFN of a run, checkpoint or model folder into `experts` experts and write a
    model folder with the neurons laid out expert by expert (config.toml, model.safetensors: a dense model), plus
    `moe.json` (the experts) and `moe.safetensors` (the original neuron at each position, for `densify`)."""
    from safetensors.torch import save_file

    from ..checkpoint import write_model_folder
    from ..train import load_model

    model, _, cfg = load_model(src)
    before = stored_order(src)
    order = moefy_(model, experts, iters=iters, seed=seed).cpu()
    if before is not None:  # relative to the source's original order
        order = before.gather(1, order)
    out = Path(out)
    write_model_folder(out, _dense_config(cfg), model.state_dict())
    save_file({"neuron_order": order.contiguous()}, str(out / "moe.safetensors"))
    (out / "moe.json").write_text(json.dumps({"experts": experts, "seed": seed, "iters": iters}) + "\n")
    return out


def densify_checkpoint(src: str | Path, out: str | Path) -> Path:
    """`convert densify`: a plain dense model folder with the neurons back in their original order (exactly the
    weights before `moefy`; for an SSD run, the order of its initialisation)."""
    from ..checkpoint import write_model_folder
    from ..train import load_model

    model, _, cfg = load_model(src)
    order = stored_order(src)
    if order is not None:
        for block, o in zip(model.blocks, order):
            permute_ffn_(block.mlp, o.argsort())
    write_model_folder(Path(out), _dense_config(cfg), model.state_dict())
    return Path(out)


def prepare_moe(model: Transformer, path: str | Path, top_k: int, experts: int | None = None) -> Transformer:
    """`eval --moe K` / `generate --moe K`: run a loaded model as an MoE. A moefied folder keeps its clustering;
    otherwise the weights are clustered (warm-started from an SSD run's layout) into `experts` experts, by
    default the SSD run's own number, else 16."""
    from .. import config as config_mod

    cfg_path, folder = _model_folder(path)
    if (folder / "moe.json").is_file():
        stored = json.loads((folder / "moe.json").read_text())["experts"]
        if experts in (None, stored):
            d_ff = model.args.d_ff
            layout = [contiguous_labels(d_ff, stored) for _ in model.blocks]
            return run_as_moe(model, top_k, stored, layout)
    if experts is None:
        method = config_mod.load(cfg_path).method
        experts = int(method.get("experts", 16)) if method.get("name") == "ssd" else 16
    return run_as_moe(model, top_k, experts)


@torch.no_grad()
def generate(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 100, top_k_sampling: int = 50,
             temperature: float = 0.8, seed: int = 0, stop_id: int | None = None) -> str:
    """Sample a continuation of `prompt` (dense or MoE mode alike; no KV cache: the model recomputes the window).
    temperature 0 = greedy; top_k_sampling 0 = the whole vocabulary. Returns the continuation's text."""
    if max_new_tokens < 0 or temperature < 0 or top_k_sampling < 0:
        raise UserError("max_new_tokens, temperature and top-k must be >= 0")
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise UserError("the prompt is empty after tokenization; pass some text with --prompt")
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], device=device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.args.max_seq_len:])[0, -1].float()
        if temperature == 0:
            nxt = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if top_k_sampling:
                kth = logits.topk(min(top_k_sampling, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
        if stop_id is not None and nxt.item() == stop_id:
            break
    model.train(was_training)
    return tokenizer.decode(idx[0, len(ids):].tolist())


def generate_both(path: str | Path, prompt: str, moe: int | None = None, experts: int | None = None,
                  device: str = "cpu", **sampling) -> dict[str, str]:
    """`sparsetrain generate`: the dense model's continuation, and with `moe` = K the same model's as an MoE with
    top-K experts (same seed), for comparison."""
    from ..data import load_tokenizer
    from ..train import load_model

    model, _, cfg = load_model(path, device)
    tokenizer = load_tokenizer(cfg.data.dir)
    meta = Path(cfg.data.dir) / "meta.json"
    stop = json.loads(meta.read_text()).get("eot_id") if meta.is_file() else None
    out = {"dense": generate(model, tokenizer, prompt, stop_id=stop, **sampling)}
    if moe:
        prepare_moe(model, path, moe, experts)
        out[f"moe_top{moe}"] = generate(model, tokenizer, prompt, stop_id=stop, **sampling)
    return out
