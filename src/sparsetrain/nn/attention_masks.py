"""Hybrid sparse attention (MST): causal attention restricted to a local band, a stride, or their union.

    local    key k is seen by query q when 0 <= q - k < window       (the query and the window - 1 keys before it)
    strided  key k is seen by query q when q - k >= 0 and (q - k) % stride == 0
    hybrid   local or strided

A model with a sliding window of its own (Mistral) sees no key `limit` or more positions back in any pattern:
every function takes that window as `limit` (0 = none), and `causal` with a `limit` is the model's own mask.

One predicate (`allowed`) defines each pattern; it builds both the FlexAttention `BlockMask` that training uses
(`build_block_mask`, made once per pattern, length and device, then cached) and the dense boolean [T, T] mask
(`dense_mask`) that `scaled_dot_product_attention(attn_mask=...)` applies to the same effect, the reference.

FlexAttention skips whole blocks of BLOCK x BLOCK scores that the mask leaves empty and computes every other block in
full, so the work done is the number of non-empty blocks (`computed_blocks`), not the number of allowed scores. A
strided pattern with stride < 2 BLOCK hits every block on or below the diagonal (the score differences within one
block span 2 BLOCK - 1 consecutive values, so one is a multiple of the stride): it computes as much as plain causal
attention. Only the band, and strides of 2 BLOCK or more, skip work.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask

from sparsetrain.errors import UserError

KINDS = ("local", "strided", "hybrid")
BLOCK = 128  # FlexAttention's default block: the granularity at which its kernels skip work


def allowed(kind: str, q: torch.Tensor, k: torch.Tensor, window: int, stride: int, limit: int = 0) -> torch.Tensor:
    """Whether query position(s) q may attend to key position(s) k (broadcasting tensors of positions)."""
    diff = q - k
    causal = diff >= 0
    if limit:
        causal = causal & (diff < limit)
    if kind == "causal":
        return causal
    local = causal & (diff < window)
    strided = causal & (diff % stride == 0)
    if kind == "local":
        return local
    if kind == "strided":
        return strided
    if kind == "hybrid":
        return local | strided
    raise ValueError(f"unknown attention pattern '{kind}'")


def check(kind: str, seq_len: int, window: int, stride: int, where: str = "method") -> None:
    """UserError for a pattern that cannot work on sequences of `seq_len` tokens."""
    if kind not in KINDS:
        raise UserError(f"unknown {where}.attention '{kind}'; choose one of none, {', '.join(KINDS)}")
    needs = {"local": ["window"], "strided": ["stride"], "hybrid": ["window", "stride"]}[kind]
    for key in needs:
        value = window if key == "window" else stride
        if not 0 < value <= seq_len:
            raise UserError(f"{where}.{key}={value} must be in [1, train.seq_len={seq_len}]; "
                            f"lower {where}.{key} or raise train.seq_len")


def mask_mod(kind: str, window: int, stride: int, limit: int = 0):
    """The FlexAttention mask_mod of a pattern."""

    def mod(b, h, q_idx, kv_idx):
        return allowed(kind, q_idx, kv_idx, window, stride, limit)

    return mod


def dense_mask(kind: str, seq_len: int, window: int, stride: int, device=None, limit: int = 0) -> torch.Tensor:
    """The pattern as a boolean [seq_len, seq_len] mask, True where query (row) may attend to key (column)."""
    pos = torch.arange(seq_len, device=device)
    return allowed(kind, pos[:, None], pos[None, :], window, stride, limit)


@functools.lru_cache(maxsize=32)
def cached_dense_mask(kind: str, seq_len: int, window: int, stride: int, device: str, limit: int = 0) -> torch.Tensor:
    """`dense_mask`, built once per pattern and device (the CPU stand-in for a BlockMask)."""
    return dense_mask(kind, seq_len, window, stride, torch.device(device), limit)


@functools.lru_cache(maxsize=32)
def _cached_block_mask(kind: str, seq_len: int, window: int, stride: int, device: str, limit: int):
    # B = H = None: one mask broadcast over the batch and the heads (it depends on positions only).
    return create_block_mask(mask_mod(kind, window, stride, limit), None, None, seq_len, seq_len, device=device,
                             BLOCK_SIZE=BLOCK)


def build_block_mask(kind: str, seq_len: int, window: int, stride: int, device: torch.device | str, limit: int = 0):
    """The FlexAttention BlockMask of a pattern, built once per (kind, seq_len, window, stride, device, limit)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _cached_block_mask(kind, seq_len, window, stride, str(device), limit)


@functools.lru_cache(maxsize=64)
def computed_blocks(kind: str, seq_len: int, window: int, stride: int, block: int = BLOCK, limit: int = 0) -> int:
    """Blocks of block x block scores with at least one allowed score: what FlexAttention computes.

    Found per block from the range of score differences q - k it spans (every integer in [q_lo - k_hi, q_hi - k_lo]
    occurs), so it costs O((T / block)^2), not O(T^2).
    """
    n = -(-seq_len // block)
    starts = torch.arange(n, dtype=torch.int64) * block
    ends = torch.clamp(starts + block, max=seq_len) - 1
    lo = (starts[:, None] - ends[None, :]).clamp_min(0)  # smallest causal difference in block (row, col)
    hi = ends[:, None] - starts[None, :]  # largest difference
    causal = hi >= 0
    if limit:
        causal = causal & (lo < limit)
    local = causal & (lo < window)
    strided = causal & (torch.div(hi, stride, rounding_mode="floor") * stride >= lo)
    hit = {"causal": causal, "local": local, "strided": strided, "hybrid": local | strided}[kind]
    return int(hit.sum())


def block_fraction(kind: str, seq_len: int, window: int, stride: int, limit: int = 0) -> float:
    """Attention work of the pattern relative to causal attention (within `limit`), both counted in computed
    blocks."""
    return (computed_blocks(kind, seq_len, window, stride, limit=limit)
            / computed_blocks("causal", seq_len, window, stride, limit=limit))
