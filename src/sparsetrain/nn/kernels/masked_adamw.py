"""AdamW under a keep mask in Triton: held rows are neither read nor written, every tensor in one launch.

SAT's omitted units, MST's pruned ones and SSD's unrouted experts hold whole rows or whole columns of a weight
(`methods.frozen.FrozenSlices`). The trainer's update (`frozen._adamw_under_mask`, compiled: `torch.where` per tensor,
the oracle here) reads and writes every entry of the parameter, its gradient and both moments. Here the keep mask
comes as its two factors, one per dimension (`keep[i, j] = rows[i] & cols[j]`): loads and stores are masked by the
rows (a held row's memory is never touched), and held columns, which share memory sectors with kept ones, are read
and written back unchanged (`tl.where`), as the reference does. The tensors' addresses and shapes go to the kernel
as a table, so a step's ~100 tensors cost one launch (Triton's Python launcher takes ~25 us a launch).

Not used by the trainer: its first form (one launch per tensor, held columns masked in the loads too) took 1.28x
the GPU time of torch's fused AdamW over the same tensors inside one torch.compile'd call, where the compiled
reference took 1.07x (BENCHMARKS.md, ninth round). This form is not measured yet: `bench/masked_update.py` times it
beside the reference; wire it into `FrozenSlices` only where that shows it faster.

The per-tensor scalars (bias corrections from the step count) are worked out on the device in float64 by
`adamw_scalars`, as the reference does, so the kernel reads them and never waits on the host.
"""
from __future__ import annotations

import torch

from sparsetrain.nn.kernels.moe_gemm import INTERPRET, available, triton

if triton is not None:
    import triton.language as tl

__all__ = ["available", "adamw_scalars", "kernel_applies", "update_all"]

# The columns of `adamw_scalars`, in the order the kernel reads them.
SCALARS = ("decay", "step_size", "root2", "eps", "one_minus_beta1", "beta2", "one_minus_beta2")


def adamw_scalars(steps: list[torch.Tensor], hps: torch.Tensor) -> torch.Tensor:
    """Count one more step on each tensor's `step` and return its AdamW scalars [n, len(SCALARS)] in float32.
    hps: float64 [n, 5] rows of lr, weight decay, beta1, beta2, eps (as `frozen._adamw_under_mask` takes them)."""
    for step in steps:
        step.add_(1)
    t = torch.stack([s.reshape(()) for s in steps]).double()
    lr, wd, beta1, beta2, eps = hps.unbind(1)
    return torch.stack([1 - lr * wd, lr / (1 - beta1 ** t), (1 - beta2 ** t).sqrt(), eps, 1 - beta1, beta2,
                        1 - beta2], dim=1).float()


if triton is not None:

    @triton.jit
    def _masked_adamw_kernel(table_ptr, tile_ends_ptr, n, s_ptr, N_POW2: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr):
        """One [BLOCK_R, BLOCK_C] tile of one of n tensors: AdamW where rows[i] & cols[j]. Tensor t's row of the
        table holds the addresses of its parameter, gradient, moments and keep vectors (0: none) and its [R, C];
        its tiles end at tile_ends[t]."""
        pid = tl.program_id(0)
        ts = tl.arange(0, N_POW2)
        ends = tl.load(tile_ends_ptr + ts, mask=ts < n, other=2147483647)
        t = tl.sum((ends <= pid).to(tl.int32), axis=0)
        first = tl.where(t > 0, tl.load(tile_ends_ptr + tl.maximum(t - 1, 0)), 0)
        row = table_ptr + t.to(tl.int64) * 8
        p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        rows_at, cols_at = tl.load(row + 4), tl.load(row + 5)
        R, C = tl.load(row + 6).to(tl.int32), tl.load(row + 7).to(tl.int32)
        tiles_c = tl.cdiv(C, BLOCK_C)
        r = ((pid - first) // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = ((pid - first) % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        # A held row: no memory access at all. (Flags are broadcast before they enter a mask: Triton's interpreter
        # rejects a scalar there.)
        has_rows = (tl.zeros([BLOCK_R], tl.int64) + rows_at) != 0
        keep_r = tl.load(rows_at.to(tl.pointer_type(tl.int8)) + r, mask=(r < R) & has_rows, other=1) != 0
        ok = (keep_r & (r < R))[:, None] & (c < C)[None, :]
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        p = tl.load(p_ptr + offs, mask=ok)
        g = tl.load(g_ptr + offs, mask=ok)
        m = tl.load(m_ptr + offs, mask=ok)
        v = tl.load(v_ptr + offs, mask=ok)
        scalars = s_ptr + t * 7
        decay, step_size, root2 = tl.load(scalars), tl.load(scalars + 1), tl.load(scalars + 2)
        eps, w1, beta2, w2 = tl.load(scalars + 3), tl.load(scalars + 4), tl.load(scalars + 5), tl.load(scalars + 6)
        # The reference's arithmetic, in its order: torch.lerp (weight < 0.5), then AdamW's update.
        m_new = m + w1 * (g - m)
        v_new = v * beta2 + g * g * w2
        p_new = p * decay - tl.div_rn(step_size * m_new, tl.div_rn(tl.sqrt_rn(v_new), root2) + eps)
        # held columns share memory sectors with kept ones: written back as they were
        has_cols = (tl.zeros([BLOCK_C], tl.int64) + cols_at) != 0
        keep_c = tl.load(cols_at.to(tl.pointer_type(tl.int8)) + c, mask=(c < C) & has_cols, other=1) != 0
        keep_c = keep_c[None, :]
        tl.store(p_ptr + offs, tl.where(keep_c, p_new, p), mask=ok)
        tl.store(m_ptr + offs, tl.where(keep_c, m_new, m), mask=ok)
        tl.store(v_ptr + offs, tl.where(keep_c, v_new, v), mask=ok)


def kernel_applies(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `update_all` takes these tensors: fp32, contiguous, one shape, at most two dimensions, on a device
    where the kernels run."""
    return (available(p.device) and p.dim() <= 2
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == p.shape for t in (p, g, m, v)))


def update_all(ps: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor],
               rows: list[torch.Tensor | None], cols: list[torch.Tensor | None], steps: list[torch.Tensor],
               hps: torch.Tensor) -> None:
    """AdamW of every parameter p (gradient g, moments m and v, updated in place) where rows[i] & cols[j] (bool
    vectors along dims 0 and 1; None: every one kept; a 1-D parameter takes its mask as `cols`), after counting a
    step on its `steps` tensor; `hps`: its row of lr, weight decay, beta1, beta2, eps (float64, on the device). Held
    entries are not touched. One launch for all of them (the tensors' addresses in a table)."""
    device = ps[0].device
    scalars = adamw_scalars(steps, hps)
    block_c = 16 if INTERPRET else 1024
    block_r = 2
    table, ends, total, keeps = [], [], 0, []
    for p, g, m, v, r, c in zip(ps, gs, ms, vs, rows, cols):
        assert kernel_applies(p, g, m, v)
        R, C = (1, p.numel()) if p.dim() == 1 else p.shape
        r, c = (None if f is None else f.contiguous() for f in (r, c))
        keeps += [r, c]  # alive until the launch is queued (the allocator orders reuse after it)
        table.append([t.data_ptr() for t in (p, g, m, v)] + [0 if f is None else f.data_ptr() for f in (r, c)] + [R, C])
        total += triton.cdiv(R, block_r) * triton.cdiv(C, block_c)
        ends.append(total)
    on_device = [torch.tensor(x, dtype=d) for x, d in ((table, torch.int64), (ends, torch.int32))]
    if device.type == "cuda":
        on_device = [x.pin_memory().to(device, non_blocking=True) for x in on_device]
    _masked_adamw_kernel[(total,)](*on_device, len(ps), scalars, N_POW2=triton.next_power_of_2(len(ps)),
                                   BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
