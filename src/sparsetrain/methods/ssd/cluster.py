"""Balanced clustering of FFN neurons into experts of equal size (spherical k-means with a capacity per cluster),
and the adjusted Rand index that says how stable a clustering is between two checks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
