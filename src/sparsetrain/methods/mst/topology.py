"""The weight masks' topology, pure functions of their inputs: which weights are sparse, how dense each layer is
(ERK or uniform), and the next active set of a mask after pruning by magnitude and growing by gradient or at random."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sparsetrain.nn.model import ModelArgs

MIXED_GRADIENT_SHARE = 0.75  # mixed growth: 3 parts by gradient to 1 at random, as the authors' code


class SparseWeight(NamedTuple):
    name: str  # parameter name in the Transformer
    shape: tuple[int, int]  # (n_out, n_in); an embedding is (vocab, d_model)
    flops: int  # forward FLOPs per token when dense (0 for an embedding lookup that is not also the output layer)


def sparse_weights(args: ModelArgs, embeddings: bool) -> list[SparseWeight]:
    """The weights that weight-granular MST masks: every linear layer of the blocks, and the embeddings if asked."""
    d, hd = args.d_model, args.head_dim
    shapes = {
        "attn.qkv": ((args.n_head + 2 * args.n_kv_head) * hd, d),
        "attn.proj": (d, args.n_head * hd),
        "mlp.fc": (args.d_ff * (2 if args.gated else 1), d),
        "mlp.proj": (d, args.d_ff),
    }
    out = [SparseWeight(f"blocks.{i}.{key}.weight", shape, 2 * shape[0] * shape[1])
           for i in range(args.n_layer) for key, shape in shapes.items()]
    if embeddings:
        vd = (args.vocab_size, d)
        # A tied embedding is the output layer too: one parameter, one mask, the output layer's FLOPs.
        out.append(SparseWeight("wte.weight", vd, 2 * vd[0] * vd[1] if args.tie_embeddings else 0))
        if not args.tie_embeddings:
            out.append(SparseWeight("lm_head.weight", vd, 2 * vd[0] * vd[1]))
    return out


def erk_densities(shapes: list[tuple[int, int]], sparsity: float) -> list[float]:
    """Erdos-Renyi densities: proportional to (n_in + n_out) / (n_in n_out), scaled so that the layers together keep
    (1 - sparsity) of their weights. While some layer would pass density 1, the one with the largest raw density is
    made dense and the others rescaled (RigL's procedure)."""
    sizes = [a * b for a, b in shapes]
    if sparsity <= 0:
        return [1.0] * len(shapes)
    raw = [(a + b) / (a * b) for a, b in shapes]
    budget = (1 - sparsity) * sum(sizes)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        if not rest:
            return [1.0] * len(shapes)
        scale = (budget - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in rest)
        over = [i for i in rest if scale * raw[i] > 1]
        if not over:
            return [1.0 if i in dense else scale * raw[i] for i in range(len(shapes))]
        dense.add(max(over, key=lambda i: raw[i]))


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor."""
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        out[scores.topk(k, sorted=False).indices] = True
    return out


def next_active(mask: torch.Tensor, magnitude: torch.Tensor, grad: torch.Tensor | None, keep: int, z: float,
                grow: str, generator: torch.Generator) -> torch.Tensor:
    """One layer's next active set (1-D bool, `keep` entries): prune the smallest-magnitude active entries,
    max(floor(z * active), active - keep) of them, then grow among the inactive ones until `keep` are active, by
    largest gradient magnitude (rigl), at random (set), or 3/4 by gradient and the rest at random (mixed).

    An entry pruned and grown back in the same update simply stays (as in RigL); only entries that were inactive
    before the update are new.
    """
    active = int(mask.sum())
    survivors = active - min(active, max(int(z * active), active - keep))
    new = _top(torch.where(mask, magnitude.float(), -1.0), survivors)
    n_grow = keep - survivors
    if n_grow > 0:
        n_grad = {"rigl": n_grow, "set": 0, "mixed": int(MIXED_GRADIENT_SHARE * n_grow)}[grow]
        if n_grad:
            if grad is None:
                raise RuntimeError("MST growth by gradient needs the dense gradient of this update step")
            new |= _top(torch.where(new, -1.0, grad.float()), n_grad)
        if n_grow > n_grad:
            noise = torch.rand(new.shape, generator=generator, device=new.device)
            new |= _top(torch.where(new, -1.0, noise), n_grow - n_grad)
    return new


