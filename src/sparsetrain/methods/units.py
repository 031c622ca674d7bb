"""Units of structured sparsity, shared by SAT and MST's neuron level: an FFN neuron (kind "ffn": its `fc` rows -
gate and up for SwiGLU - with their bias entries, and its `proj` column) or a kv-head group (kind "head": its query,
key and value rows, each group's query heads adjacent, and the `proj` columns of those query heads). Which module a
kind lives in, its parameters, where a unit's slices are, per-unit sums of per-row values, how many units a rate
keeps, where the kept indices live, and the one decision every process must share."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from sparsetrain.nn.model import ModelArgs

KINDS = ("ffn", "head")


def at_fixed_address(buffers: dict, key: Any, kept: torch.Tensor) -> torch.Tensor:
    """`kept` (unit indices a module's `active` will read) copied into `buffers[key]`, a new buffer only when the
    shape changes: CUDA graphs replay reading `active` at the address they recorded, and re-record when it moves."""
    buffer = buffers.get(key)
    if buffer is None or buffer.shape != kept.shape:
        buffer = buffers[key] = torch.empty_like(kept)
    return buffer.copy_(kept)


def unit_count(args: ModelArgs, kind: str) -> int:
    """Units per layer: d_ff neurons or n_kv_head groups."""
    return args.d_ff if kind == "ffn" else args.n_kv_head


def unit_module(block: torch.nn.Module, kind: str) -> torch.nn.Module:
    """The module of a block that holds the units (its `active` selects the computed ones)."""
    return block.mlp if kind == "ffn" else block.attn


def unit_params(module: torch.nn.Module, kind: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(input-side parameters whose rows belong to units - weight, then bias if any -, `proj` weight whose columns
    do)."""
    layer_in = module.fc if kind == "ffn" else module.qkv
    ins = [layer_in.weight] + ([layer_in.bias] if layer_in.bias is not None else [])
    return ins, module.proj.weight


def unit_rows_cols(module: torch.nn.Module, kind: str, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input rows and `proj` columns of the given units, from the module's own index maps."""
    if kind == "ffn":
        return module.in_rows(units), units
    return module.group_rows(units)


def unit_slices(module: torch.nn.Module, kind: str, units: torch.Tensor) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(parameter, dim, index) of every slice that belongs to the given units, input rows first, `proj` last."""
    ins, out = unit_params(module, kind)
    rows, cols = unit_rows_cols(module, kind, units)
    return [(p, 0, rows) for p in ins] + [(out, 1, cols)]


def layered_rows_cols(module: torch.nn.Module, kind: str, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`unit_rows_cols` for L layers at once: units [L, m] (the same count in every layer) -> input rows [L, *] and
    `proj` columns [L, *], with one layer's index maps (the layers share their shapes)."""
    L = units.shape[0]
    rows, cols = unit_rows_cols(module, kind, units.flatten())
    if kind == "ffn":  # [gate | up] blocks, each in (layer, neuron) order
        return rows.view(-1, L, units.shape[1]).transpose(0, 1).flatten(1), units
    kv = (rows.numel() - cols.numel()) // 2  # [q | k | v] blocks, each in (layer, group) order
    q, k, v = rows.split([cols.numel(), kv, kv])
    return torch.cat([q.view(L, -1), k.view(L, -1), v.view(L, -1)], dim=1), cols.view(L, -1)


def fold(args: ModelArgs, kind: str, rows: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """Sum per-row values of `fc` / `qkv` (and per-column values of `proj`), [L, rows], per unit -> [L, units].

    `fc` rows are [gate | up] for SwiGLU; `qkv` rows are [q heads | k heads | v heads], a group's query heads
    adjacent, and `proj` columns follow the query heads.
    """
    L = rows.shape[0]
    if kind == "ffn":
        per_neuron = rows.view(L, -1, args.d_ff).sum(1)
        return per_neuron if cols is None else per_neuron + cols
    K = args.n_kv_head
    q, k, v = rows.split([args.n_head * args.head_dim, K * args.head_dim, K * args.head_dim], dim=1)
    per_group = q.view(L, K, -1).sum(2) + k.view(L, K, -1).sum(2) + v.view(L, K, -1).sum(2)
    return per_group if cols is None else per_group + cols.view(L, K, -1).sum(2)


def keep_count(n: int, rate: float, multiple: int) -> int:
    """Units kept of n at an omission rate: round((1 - rate) n) to a multiple, within [min(multiple, n), n].

    Rounding is half-up, not Python's half-to-even, so counts are what the docs say. 0 means the rate keeps nothing.
    """
    if rate <= 0:
        return n
    k = math.floor((1 - rate) * n + 0.5)
    if k == 0:
        return 0
    k = math.floor(k / multiple + 0.5) * multiple
    return min(n, max(k, min(multiple, n)))


def complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted indices in [0, n) not in each row of `kept` [L, k] -> [L, n - k], without a host sync."""
    omitted = torch.ones(kept.shape[0], n, dtype=torch.uint8, device=kept.device)
    omitted.scatter_(1, kept, 0)
    # A stable descending sort puts the ones (omitted) first, in index order.
    return omitted.argsort(dim=1, descending=True, stable=True)[:, : n - kept.shape[1]]


def same_on_all_ranks(decision: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Statistics are gathered per process, but every process must compute the same units: rank 0 decides."""
    if distributed:
        dist.broadcast(decision, src=0)
    return decision
