"""What this process holds of a parameter that FSDP2 sharded.

FSDP2 (`fully_shard`) turns each parameter, and the AdamW moments made for it, into a DTensor split along dim 0 into
`torch.chunk` pieces, one per process. The forward and backward see whole weights (gathered per unit of blocks), but
methods that score, freeze, zero or mask parts of parameters between steps work on these pieces: the helpers below find
a process's piece of a tensor and of an index set, and gather small results (per-layer score vectors) whole.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate


def shard_dim(t: torch.Tensor) -> int | None:
    """The dimension FSDP2 split `t` along (None: a plain or replicated tensor, whole on this process)."""
    if not isinstance(t, DTensor):
        return None
    if len(t.placements) != 1:  # train.parallelize shards over one mesh dimension; HSDP or TP would need more here
        raise RuntimeError(f"a slice of a DTensor on a {len(t.placements)}-dimensional mesh; expected FSDP2's one")
    placement = t.placements[0]
    return placement.dim if placement.is_shard() else None


def shard_offset(t: DTensor) -> int:
    """Where this process's piece starts along the shard dimension: FSDP2 splits as `torch.chunk` does."""
    n, world, rank = t.shape[shard_dim(t)], t.device_mesh.size(), t.device_mesh.get_local_rank()
    return min(rank * math.ceil(n / world), n)


def local_part(t: torch.Tensor, dim: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor this process holds of `t` and the entries of `idx` (along `dim`) in it, as indices into it.

    A plain tensor is whole here. A DTensor sharded along `dim` holds [offset, offset + its length) of it; the
    entries outside are another process's (finding them syncs with the host).
    """
    if not isinstance(t, DTensor):
        return t, idx
    piece = t.to_local()
    if shard_dim(t) != dim % t.dim():
        return piece, idx
    offset = shard_offset(t)
    held = (idx >= offset) & (idx < offset + piece.shape[dim])
    return piece, idx[held] - offset


def local_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The piece of a whole tensor `t` that matches this process's shard of `like` (all of `t` if `like` is whole)."""
    dim = shard_dim(like)
    if dim is None:
        return t
    return t.narrow(dim, shard_offset(like), like.to_local().shape[dim])


def local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of `t` (all of a plain tensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def index_select_(t: torch.Tensor, dim: int, idx: torch.Tensor) -> None:
    """t = t.index_select(dim, idx), in place, for `idx` a permutation along `dim`."""
    if not isinstance(t, DTensor):
        t.copy_(t.index_select(dim, idx))
    elif shard_dim(t) != dim % t.dim():  # each process holds whole lines along dim: it permutes its own
        piece = local(t)
        piece.copy_(piece.index_select(dim, idx))
    else:  # the permutation crosses shards: permute the gathered whole, keep this process's piece
        t.to_local().copy_(local_view(t.full_tensor().index_select(dim, idx), t))


def replicated(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`x`, the same on every process, as an operand for `weight`: a replicated DTensor when FSDP2 shards it."""
    if isinstance(weight, DTensor):
        return DTensor.from_local(x, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim, run_check=False)
    return x


def whole(x: torch.Tensor) -> torch.Tensor:
    """`x` whole on every process: a DTensor gathered (or reduced, if partial), a plain tensor as it is."""
    return x.full_tensor() if isinstance(x, DTensor) else x
