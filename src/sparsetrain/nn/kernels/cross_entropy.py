"""The language-model loss in Triton: cross-entropy straight from the low-precision logits, one pass forward.

`F.cross_entropy(logits.float(), targets)` compiled reads the bf16 logits [N, V] several times and runs a split
reduction (inductor turns its online softmax off for it), forward and backward: at GPT-2's vocabulary it was among
the longest kernels of dense's step (BENCHMARKS.md, fourteenth round, has the times). Here the forward is one read
of the logits (a running maximum and sum of exponentials per row, in fp32) that keeps each row's log-sum-exp, and
the backward one read and one write: softmax minus the one-hot target, scaled by the row's
loss gradient, in the logits' dtype. Rows whose target is `ignore_index` have loss 0 and gradient 0.

`cross_entropy_rows` is the differentiable op (per-row losses; a custom op that torch.compile traces whole);
`cross_entropy` the mean over counted rows that the model's loss is, with `F.cross_entropy` as the reference path
and oracle. The kernels run compiled on a GPU and, with TRITON_INTERPRET=1, on the CPU (tests, tiny shapes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsetrain.nn.kernels.moe_gemm import INTERPRET, available

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # the CPU wheel of torch comes without Triton: the loss then runs F.cross_entropy
    triton = None

KERNELS = ("auto", "triton", "torch")  # auto: Triton on a GPU, else torch
IGNORE_INDEX = -100  # F.cross_entropy's default: a target not counted (padding, a prompt's tokens)
BLOCK_V = 64 if INTERPRET else 4096  # logits a program reads at once, along the vocabulary
WARPS = 8


if triton is not None:

    @triton.jit
    def _loss_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, V, s_row, ignore_index, BLOCK_V: tl.constexpr):
        """Row i: lse = log(sum(exp(logits))) by a running maximum (one read of the row), loss = lse - logit[t]
        (0 where t is ignore_index)."""
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * s_row
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + v, mask=v < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(targets_ptr + row)
        counted = t != ignore_index
        valid = (t >= 0) & (t < V)  # a target outside the vocabulary: a NaN loss (F.cross_entropy would assert)
        x_t = tl.load(base + t, mask=counted & valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(counted, tl.where(valid, lse - x_t, float("nan")), 0.0))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _loss_grad_kernel(logits_ptr, targets_ptr, lse_ptr, dloss_ptr, dlogits_ptr, V, s_row, s_drow, s_dloss,
                          ignore_index, BLOCK_V: tl.constexpr):
        """dlogits[i] = dloss[i] * (softmax(logits[i]) - onehot(t)), 0 where t is ignore_index."""
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * s_row
        out = dlogits_ptr + row.to(tl.int64) * s_drow
        t = tl.load(targets_ptr + row)
        lse = tl.load(lse_ptr + row)
        g = tl.where(t != ignore_index, tl.load(dloss_ptr + row * s_dloss).to(tl.float32), 0.0)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + v, mask=v < V, other=0.0).to(tl.float32)
            d = tl.exp(x - lse) * g - tl.where(v == t, g, 0.0)
            tl.store(out + v, d.to(dlogits_ptr.dtype.element_ty), mask=v < V)

    @triton_op("sparsetrain::cross_entropy_rows", mutates_args=())
    def _cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        N, V = logits.shape
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        wrap_triton(_loss_kernel)[(N,)](logits, targets, loss, lse, V, logits.stride(0), ignore_index,
                                        BLOCK_V=BLOCK_V, num_warps=WARPS)
        return loss, lse

    @triton_op("sparsetrain::cross_entropy_rows_grad", mutates_args=())
    def _cross_entropy_rows_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                                 dloss: torch.Tensor, ignore_index: int) -> torch.Tensor:
        N, V = logits.shape
        dlogits = torch.empty(N, V, dtype=logits.dtype, device=logits.device)
        wrap_triton(_loss_grad_kernel)[(N,)](logits, targets, lse, dloss, dlogits, V, logits.stride(0),
                                             dlogits.stride(0), dloss.stride(0), ignore_index,
                                             BLOCK_V=BLOCK_V, num_warps=WARPS)
        return dlogits

    def _setup_context(ctx, inputs, output):
        logits, targets, ignore_index = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.ignore_index = ignore_index

    def _backward(ctx, dloss, _):
        logits, targets, lse = ctx.saved_tensors
        return _cross_entropy_rows_grad(logits, targets, lse, dloss, ctx.ignore_index), None, None

    _cross_entropy_rows.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N], log-sum-exp [N]), both fp32, of logits [N, V] (rows with a unit stride along V) against targets
    [N] (int64): the loss differentiable in the logits, 0 where the target is `ignore_index`."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _cross_entropy_rows(logits, targets.contiguous(), ignore_index)


def choose(kernel: str, device: torch.device) -> str:
    """"triton" or "torch" for the loss on `device`: `auto` takes Triton on a GPU (not under the interpreter on the
    CPU: correct but slow)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown loss kernel {kernel!r}: one of {', '.join(KERNELS)}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" and available(device) else "torch"
    return kernel


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, kernel: str = "auto",
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The mean cross-entropy over the rows whose target is not `ignore_index` (NaN when there are none, as
    `F.cross_entropy`), of logits [..., V] against targets [...]. `kernel`: `KERNELS`."""
    logits2d, targets1d = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if choose(kernel, logits.device) == "torch":
        return F.cross_entropy(logits2d.float(), targets1d, ignore_index=ignore_index)
    loss, _ = cross_entropy_rows(logits2d, targets1d, ignore_index)
    return loss.sum() / (targets1d != ignore_index).sum()
