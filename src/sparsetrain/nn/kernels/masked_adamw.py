"""AdamW under a keep mask in Triton: held rows are neither read nor written.

SAT's omitted units, MST's pruned ones and SSD's unrouted experts hold whole rows or whole columns of a weight
(`methods.frozen.FrozenSlices`). The trainer's update (`frozen._adamw_under_mask`, compiled: `torch.where` per tensor,
the oracle here) reads and writes every entry of the parameter, its gradient and both moments. Here the keep mask
comes as its two factors, one per dimension (`keep[i, j] = rows[i] & cols[j]`): loads and stores are masked by the
rows (a held row's memory is never touched; the mask is constant along a row, so the accesses stay vectorised), and
held columns, which share memory sectors with kept ones, are read and written back unchanged (`tl.where`), as the
reference does.

Not used by the trainer: in its first form (columns masked in the loads too, every tensor's launch inside one
torch.compile'd call) it took 1.28x the GPU time of torch's fused AdamW over the same tensors, where the compiled
reference took 1.07x (BENCHMARKS.md, ninth round). `bench/masked_update.py` times it
beside the reference; wire it into `FrozenSlices` only where that shows it faster.

The per-tensor scalars (bias corrections from the step count) are worked out on the device in float64 by
`adamw_scalars`, as the reference does, so the kernel reads them and never waits on the host. `update_all` updates a
list of tensors, one launch each.
"""
from __future__ import annotations

import torch

from sparsetrain.nn.kernels.moe_gemm import INTERPRET, available, triton

if triton is not None:
    import triton.language as tl
    from torch.library import wrap_triton

__all__ = ["available", "adamw_scalars", "masked_adamw_", "update_all"]

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
    def _masked_adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, rows_ptr, cols_ptr, s_ptr, R, C,
                             ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """One [BLOCK_R, BLOCK_C] tile of a contiguous [R, C] parameter: AdamW where rows[i] & cols[j]."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        r_ok = r < R
        if ROWS:
            r_ok = r_ok & (tl.load(rows_ptr + r, mask=r_ok, other=0) != 0)
        ok = r_ok[:, None] & (c < C)[None, :]  # held rows: no memory access at all
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        p = tl.load(p_ptr + offs, mask=ok)
        g = tl.load(g_ptr + offs, mask=ok)
        m = tl.load(m_ptr + offs, mask=ok)
        v = tl.load(v_ptr + offs, mask=ok)
        decay, step_size, root2 = tl.load(s_ptr), tl.load(s_ptr + 1), tl.load(s_ptr + 2)
        eps, w1, beta2, w2 = tl.load(s_ptr + 3), tl.load(s_ptr + 4), tl.load(s_ptr + 5), tl.load(s_ptr + 6)
        # The reference's arithmetic, in its order: torch.lerp (weight < 0.5), then AdamW's update.
        m_new = m + w1 * (g - m)
        v_new = v * beta2 + g * g * w2
        p_new = p * decay - tl.div_rn(step_size * m_new, tl.div_rn(tl.sqrt_rn(v_new), root2) + eps)
        if COLS:  # held columns written back as they were
            keep = (tl.load(cols_ptr + c, mask=c < C, other=0) != 0)[None, :]
            p_new, m_new, v_new = tl.where(keep, p_new, p), tl.where(keep, m_new, m), tl.where(keep, v_new, v)
        tl.store(p_ptr + offs, p_new, mask=ok)
        tl.store(m_ptr + offs, m_new, mask=ok)
        tl.store(v_ptr + offs, v_new, mask=ok)


def kernel_applies(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `masked_adamw_` takes these tensors: fp32, contiguous, one shape, at most two dimensions, on a device
    where the kernels run."""
    return (available(p.device) and p.dim() <= 2
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == p.shape for t in (p, g, m, v)))


def masked_adamw_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None,
                  cols: torch.Tensor | None, scalars: torch.Tensor) -> None:
    """AdamW of `p` (and its moments m, v) in place where rows[i] & cols[j] (bool vectors along dims 0 and 1; None:
    every one kept); held entries are not touched. A 1-D parameter takes its mask as `cols`. `scalars`: its row of
    `adamw_scalars` (float32, on p's device)."""
    if p.dim() == 1:
        p, g, m, v = (t.view(1, -1) for t in (p, g, m, v))
    R, C = p.shape
    block_c = min(triton.next_power_of_2(C), 16 if INTERPRET else 1024)
    block_r = max(1, (16 if INTERPRET else 2048) // block_c)
    unread = None if rows is not None and cols is not None else torch.ones(1, dtype=torch.bool, device=p.device)
    flags = [unread if f is None else f.contiguous() for f in (rows, cols)]
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
    wrap_triton(_masked_adamw_kernel)[grid](p, g, m, v, *flags,
                               scalars, R, C, ROWS=rows is not None, COLS=cols is not None,
                               BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)


def update_all(ps: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor],
               rows: list[torch.Tensor | None], cols: list[torch.Tensor | None], steps: list[torch.Tensor],
               hps: torch.Tensor) -> None:
    """`masked_adamw_` of every tensor (its keep factors in `rows` / `cols`, its step count in `steps`, its row of
    lr, weight decay, beta1, beta2, eps in `hps`), after counting the step."""
    scalars = adamw_scalars(steps, hps)
    for i, (p, g, m, v, r, c) in enumerate(zip(ps, gs, ms, vs, rows, cols)):
        masked_adamw_(p, g, m, v, r, c, scalars[i])
