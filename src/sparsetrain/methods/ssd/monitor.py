"""SSD's monitor: on a fixed probe batch, per layer, activation sparsity, the stability of the neuron clustering
(adjusted Rand index between checks) and the share of activation mass the top-k experts hold."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from sparsetrain.methods.ssd.cluster import adjusted_rand_index, cluster_means, cluster_neurons, contiguous_labels
from sparsetrain.methods.ssd.ffn import SSDFFN, fit_router, neuron_rows
from sparsetrain.methods.ssd.options import EXACT_ZERO
from sparsetrain.nn.model import FFN, Transformer, activate, flops_per_token


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
            # FSDP2 gathers a unit of blocks' weights in hooks around their calls: the probe goes through them and to
            # the end (stopping inside a unit would leave its weights gathered).
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
                # FSDP2: __call__, whose hooks gather the weights, with whatever FSDP2 compiled (the whole forward or
                # each block) run eagerly: traced with these hooks, it would compile again at every check.
                if sharded:
                    with torch.compiler.set_stance("force_eager"):
                        model(probe)
                else:
                    model.forward(probe)
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
