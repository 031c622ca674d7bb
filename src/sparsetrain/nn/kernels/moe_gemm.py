"""Grouped GEMMs for Mixture-of-Experts layers in Triton: rows are gathered and results scattered inside the GEMM.

A layer with N tokens and top-k routing has N*k assignments ("rows"), held in one of three layouts:
    token   [N, K]      row t is a token (an assignment reads row slot // k)
    slot    [N*k, K]    row t*k + j is token t's j-th choice (the router's output order)
    sorted  [N*k, K]    rows grouped by expert: sorted row r is slot order[r]; group e ends at offs[e]
`routing_plan` makes (order, inverse, offs, sorted_ids) from the expert ids by a counting sort (stable, no host
sync): one kernel counts each chunk's ids per expert, a cumulative sum places the chunks, a second kernel places the
ids. `expert_gemm(x, w, order, offs, k, ...)` multiplies every sorted row by its expert's weight w[e] ([E, K, N],
any strides: stacked experts or views of a dense FFN), reading its input row through `order` (gather) and writing
its output row through `order` (scatter) where asked, so no permuted copy of the activations is ever made. Its
backward is two kernels of the same kind: the input gradient is the same GEMM against w^T with the roles of gather
and scatter swapped (a token's k copies summed afterwards, no atomics), the weight gradient a GEMM per expert over
its rows, cut into chunks of rows that the grid spreads over the GPU whatever the routing's skew
(`_weight_grad_kernel`, then `_chunk_sum_kernel`). Without autograd, `expert_gemm_activated` adds the expert's bias
and applies the activation to the accumulator before it is written (the first GEMM of a forward-only pass: the
pre-activation is never stored). `expert_output` is the second GEMM with the weighted sum of each token's k rows as
one autograd unit: its backward reads the output gradient's token rows in place and computes the combine weights'
gradient in the input gradient's epilogue, so the forward's slot rows are not kept.

The kernels run compiled on a GPU and, with TRITON_INTERPRET=1, on the CPU (slowly: the tests use tiny shapes).
`moe.group_gemm` with GatherRows is the reference these are tested against.
"""
from __future__ import annotations

import os
from typing import Optional  # (a custom op's schema is read from its annotations: the long-supported spelling)

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # the CPU wheel of torch comes without Triton: the layers then use the reference path
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what tl.dot multiplies (fp32 in full precision)
ROWS_BLOCK_K = 32 if INTERPRET else 64  # one depth for every config: the host knows whether K needs masks
PLAN_CELLS = 8192  # ids x experts a planning program compares at once
SHORT_K = (16, 32, 64, 128, 256)  # depths the rows GEMM takes whole (`_rows_short_k_kernel`)
MIN_BLOCK_N = 32  # no config of `_rows_kernel` has narrower column tiles


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: a CUDA GPU with Triton, or the CPU under Triton's interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def _precision(x: torch.Tensor) -> str:
    """fp32 operands are multiplied in full fp32 ("ieee", as the reference does), not TF32."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _configs(configs: list[dict], interpret: list[dict]):
    """Autotuning candidates: `configs` on a GPU (only the first with SPARSETRAIN_KERNEL_TUNING=off: the tests,
    where every new shape would compile and time them all); tiny blocks under the interpreter (tl.dot needs
    >= 16)."""
    chosen = interpret if INTERPRET else configs[:1] if os.environ.get("SPARSETRAIN_KERNEL_TUNING") == "off" \
        else configs
    return [triton.Config({k: v for k, v in c.items() if k not in ("warps", "stages")},
                          num_warps=c.get("warps", 4), num_stages=c.get("stages", 3)) for c in chosen]


if triton is not None:

    @triton.jit
    def _count_kernel(ids_ptr, counts_ptr, n, chunks, E: tl.constexpr, E_POW2: tl.constexpr,
                      BLOCK: tl.constexpr):
        """counts[e, c]: how many of chunk c's BLOCK ids are e."""
        c = tl.program_id(0)
        idx = c * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + idx, mask=idx < n, other=-1)
        experts = tl.arange(0, E_POW2)
        counts = tl.sum((ids[None, :] == experts[:, None]).to(tl.int32), axis=1)
        tl.store(counts_ptr + experts * chunks + c, counts, mask=experts < E)

    @triton.jit
    def _place_kernel(ids_ptr, starts_ptr, order_ptr, inverse_ptr, sorted_ids_ptr, n, chunks, E: tl.constexpr,
                      E_POW2: tl.constexpr, BLOCK: tl.constexpr):
        """Chunk c's ids go to their experts' places: the chunk's start in its expert's group (`starts[e, c]`, all
        earlier experts and earlier chunks before it) plus the id's rank among the chunk's ids of that expert."""
        c = tl.program_id(0)
        idx = c * BLOCK + tl.arange(0, BLOCK)
        ok = idx < n
        ids = tl.load(ids_ptr + idx, mask=ok, other=-1)
        experts = tl.arange(0, E_POW2)
        hits = (ids[None, :] == experts[:, None]).to(tl.int32)  # [E_POW2, BLOCK]
        starts = tl.load(starts_ptr + experts * chunks + c, mask=experts < E, other=0)
        pos = tl.sum(hits * (starts[:, None] + tl.cumsum(hits, axis=1) - 1), axis=0)
        tl.store(order_ptr + pos, idx, mask=ok)
        tl.store(inverse_ptr + idx, pos, mask=ok)
        tl.store(sorted_ids_ptr + pos, ids, mask=ok)

    # torch.compile finds what a kernel writes by following each store's address back through the values it is
    # made of; a helper's result leads back to every pointer the helper was given, and each of those would count as
    # written (and be copied on every call). So the kernels load routing data (offs, order) in their own bodies and
    # give helpers values, not pointers, wherever the result reaches a store's address.
    @triton.jit
    def _chunk_counts(ends, starts, E: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
        """Each expert's count of CHUNK-row chunks [E_POW2] and where its chunks end in the run of all experts'
        chunks, from the experts' group `ends` and `starts` ([E_POW2], loaded from offs)."""
        experts = tl.arange(0, E_POW2)
        chunks = tl.where(experts < E, (ends - starts + CHUNK - 1) // CHUNK, 0)
        return chunks, tl.cumsum(chunks, axis=0)

    @triton.jit
    def _expert_chunk(ends, starts, c, E: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
        """Chunk `c` of the sorted rows: (its expert, its rows [first, end), how many chunks there are). Chunks
        never straddle two experts: each expert's rows are cut into its own CHUNK-row chunks (`_chunk_counts`); a
        grid's spare chunks (one per expert at most) are those at or past the count."""
        chunks, chunk_ends = _chunk_counts(ends, starts, E, E_POW2, CHUNK)
        e = tl.sum((chunk_ends <= c).to(tl.int32), axis=0)
        mine = tl.arange(0, E_POW2) == e
        first = tl.sum(tl.where(mine, starts, 0), axis=0) + (c - tl.sum(tl.where(mine, chunk_ends - chunks, 0),
                                                                          axis=0)) * CHUNK
        end = tl.minimum(tl.sum(tl.where(mine, ends, 0), axis=0), first + CHUNK)
        return e, first, end, tl.max(chunk_ends, axis=0)

    @triton.jit
    def _expert_tile(ends, starts, pid_m, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
        """Row tile `pid_m` of the sorted rows (`_expert_chunk` with BLOCK_M-row chunks): (its expert, its rows
        [BLOCK_M], which of them are the expert's, how many tiles there are)."""
        e, first, end, tiles = _expert_chunk(ends, starts, pid_m, E, E_POW2, BLOCK_M)
        r = first + tl.arange(0, BLOCK_M)
        return e, r, r < end, tiles

    @triton.jit
    def _through(order_ptr, r, ok, THROUGH: tl.constexpr, div):
        """Where sorted rows r live in the other layout: order[r] // div (slot rows; token rows with div = k) where
        THROUGH, else r itself."""
        if THROUGH:
            rows = tl.load(order_ptr + r, mask=ok, other=0) // div
        else:
            rows = r
        return rows

    @triton.jit
    def _epilogue(acc, b_ptr, e, n, N, sbe, sbn, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
        """The fp32 accumulator plus the expert's bias, through the activation (`EPILOGUES`), where asked."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + e.to(tl.int64) * sbe + n * sbn, mask=n < N, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:  # gelu, tanh approximation: 1 + tanh(u) = 2 - 2 / (exp(2u) + 1)
            u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        elif ACT == 2:  # relu
            acc = tl.maximum(acc, 0.0)
        elif ACT == 3:  # relu2
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        return acc

    @triton.jit
    def _store(y_ptr, acc, dst, ok, n, N, sym, syn):
        """Store a tile of rows at output rows dst."""
        tl.store(y_ptr + dst.to(tl.int64)[:, None] * sym + n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=ok[:, None] & (n < N)[None, :])

    @triton.jit
    def _gate_terms(g, a, scale):
        """For a tile g of the gradient of a combined GEMM's unweighted output rows (`expert_output`), the tile a of
        its inputs and the rows' combine weights: (each row's <g, a> over the tile's columns, g weighted)."""
        return tl.sum(g * a.to(tl.float32), axis=1), g * scale.to(tl.float32)[:, None]

    @triton.autotune(
        configs=_configs(
            [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=ROWS_BLOCK_K, GROUP_M=8, warps=8, stages=3),
             dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=ROWS_BLOCK_K, GROUP_M=8, warps=4, stages=4),
             dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=ROWS_BLOCK_K, GROUP_M=8, warps=8, stages=3),
             dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=ROWS_BLOCK_K, GROUP_M=8, warps=8, stages=4),
             dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=ROWS_BLOCK_K, GROUP_M=8, warps=8, stages=3),
             dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=ROWS_BLOCK_K, GROUP_M=8, warps=4, stages=4)],
            [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=ROWS_BLOCK_K, GROUP_M=2, warps=1, stages=1)]),
        key=["K", "N", "E", "GATE_GRAD"],
    )
    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, y_ptr, order_ptr, offs_ptr, b_ptr, cw_ptr, a_ptr, dg_ptr, rows, K, N, div,
                     sxm, sxk, swe, swk, swn, sym, syn, sbe, sbn, sam, san,
                     E: tl.constexpr, E_POW2: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
                     GATE_GRAD: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """y[dst(r)] = act(x[src(r)] @ w[e(r)] + b[e(r)]) for the sorted rows r of one [BLOCK_M, BLOCK_N] tile (bias
        and activation only where asked). Programs run through the tiles GROUP_M row tiles at a time, every column
        tile of those rows before the next rows, so a row tile is read from L2 by its column tiles."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(rows, BLOCK_M) + E, tl.cdiv(N, BLOCK_N)
        group_rows = tl.minimum(tiles_m - (pid // (GROUP_M * tiles_n)) * GROUP_M, GROUP_M)
        pid_m = (pid // (GROUP_M * tiles_n)) * GROUP_M + (pid % (GROUP_M * tiles_n)) % group_rows
        pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
        experts = tl.arange(0, E_POW2)
        ends = tl.load(offs_ptr + experts, mask=experts < E, other=0)
        starts = tl.load(offs_ptr + experts - 1, mask=(experts > 0) & (experts < E), other=0)
        e, r, in_group, tiles = _expert_tile(ends, starts, pid_m, E, E_POW2, BLOCK_M)
        if pid_m >= tiles:
            return
        slot = tl.load(order_ptr + r, mask=in_group, other=0)
        src = slot // div if GATHER else r
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + src.to(tl.int64)[:, None] * sxm + kk[None, :] * sxk
        b_ptrs = w_ptr + e.to(tl.int64) * swe + kk[:, None] * swk + n[None, :] * swn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=in_group[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=(n < N)[None, :], other=0.0)
            else:
                k_ok = (k0 + kk) < K
                a = tl.load(a_ptrs, mask=in_group[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & (n < N)[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * sxk
            b_ptrs += BLOCK_K * swk
        acc = _epilogue(acc, b_ptr, e, n, N, sbe, sbn, HAS_BIAS, ACT)
        if GATE_GRAD:  # one partial dot per column tile: summed on the host side, in a fixed order
            a_tile = tl.load(a_ptr + r.to(tl.int64)[:, None] * sam + n[None, :] * san,
                             mask=in_group[:, None] & (n < N)[None, :], other=0.0)
            dots, acc = _gate_terms(acc, a_tile, tl.load(cw_ptr + slot, mask=in_group, other=0.0))
            tl.store(dg_ptr + pid_n * rows + slot, dots, mask=in_group)
        _store(y_ptr, acc, slot if SCATTER else r, in_group, n, N, sym, syn)

    @triton.autotune(
        configs=_configs(
            [dict(BLOCK_M=128, BLOCK_N=128, warps=8, stages=2),
             dict(BLOCK_M=128, BLOCK_N=64, warps=8, stages=3),
             dict(BLOCK_M=64, BLOCK_N=128, warps=4, stages=3),
             dict(BLOCK_M=64, BLOCK_N=256, warps=8, stages=2)],
            [dict(BLOCK_M=32, BLOCK_N=32, warps=1, stages=1)]),
        key=["K", "N", "E", "GATE_GRAD"],
    )
    @triton.jit
    def _rows_short_k_kernel(x_ptr, w_ptr, y_ptr, order_ptr, offs_ptr, b_ptr, cw_ptr, a_ptr, dg_ptr, rows, N, div,
                             sxm, sxk, swe, swk, swn, sym, syn, sbe, sbn, sam, san,
                             K: tl.constexpr, E: tl.constexpr, E_POW2: tl.constexpr, GATHER: tl.constexpr,
                             SCATTER: tl.constexpr, GATE_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                             HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """`_rows_kernel` for a short K (a power of 2 up to 256: the second GEMM of narrow experts, and the input
        gradient of the first): a program loads its BLOCK_M rows once, whole, and sweeps every column tile, one
        [BLOCK_M, K] x [K, BLOCK_N] product each. The sweep is the pipelined loop, so the next weight tiles load
        while this one's output is stored: with a K loop of a few steps per tile, a tile's start and end would be
        mostly latency."""
        experts = tl.arange(0, E_POW2)
        ends = tl.load(offs_ptr + experts, mask=experts < E, other=0)
        starts = tl.load(offs_ptr + experts - 1, mask=(experts > 0) & (experts < E), other=0)
        e, r, in_group, tiles = _expert_tile(ends, starts, tl.program_id(0), E, E_POW2, BLOCK_M)
        if tl.program_id(0) >= tiles:
            return
        slot = tl.load(order_ptr + r, mask=in_group, other=0)
        src = slot // div if GATHER else r
        dst = slot if SCATTER else r
        kk = tl.arange(0, K)
        a = tl.load(x_ptr + src.to(tl.int64)[:, None] * sxm + kk[None, :] * sxk, mask=in_group[:, None], other=0.0)
        w_e = w_ptr + e.to(tl.int64) * swe + kk[:, None] * swk
        dots = tl.zeros([BLOCK_M], dtype=tl.float32)
        if GATE_GRAD:
            scale = tl.load(cw_ptr + slot, mask=in_group, other=0.0)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            b = tl.load(w_e + n[None, :] * swn, mask=(n < N)[None, :], other=0.0)
            acc = tl.dot(a, b, input_precision=PRECISION)
            acc = _epilogue(acc, b_ptr, e, n, N, sbe, sbn, HAS_BIAS, ACT)
            if GATE_GRAD:
                a_tile = tl.load(a_ptr + r.to(tl.int64)[:, None] * sam + n[None, :] * san,
                                 mask=in_group[:, None] & (n < N)[None, :], other=0.0)
                tile_dots, acc = _gate_terms(acc, a_tile, scale)
                dots += tile_dots
            _store(y_ptr, acc, dst, in_group, n, N, sym, syn)
        if GATE_GRAD:
            tl.store(dg_ptr + slot, dots, mask=in_group)

    @triton.autotune(
        configs=_configs(
            [dict(BLOCK_K=128, BLOCK_N=128, BLOCK_R=64, warps=8, stages=3),
             dict(BLOCK_K=128, BLOCK_N=128, BLOCK_R=64, warps=4, stages=4),
             dict(BLOCK_K=128, BLOCK_N=256, BLOCK_R=64, warps=8, stages=3),
             dict(BLOCK_K=256, BLOCK_N=128, BLOCK_R=64, warps=8, stages=3),
             dict(BLOCK_K=128, BLOCK_N=256, BLOCK_R=32, warps=8, stages=4)],
            [dict(BLOCK_K=32, BLOCK_N=32, BLOCK_R=32, warps=1, stages=1)]),
        key=["K", "N", "E", "DY_SCALE", "CHUNK"],
    )
    @triton.jit
    def _weight_grad_kernel(x_ptr, dy_ptr, part_ptr, order_ptr, offs_ptr, cw_ptr, K, N, div, dy_div,
                            sxm, sxk, sdm, sdn,
                            E: tl.constexpr, E_POW2: tl.constexpr, X_GATHER: tl.constexpr, DY_GATHER: tl.constexpr,
                            DY_SCALE: tl.constexpr, PRECISION: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """part[c] = x[rows of chunk c]^T @ dy[rows of chunk c] in fp32: one [BLOCK_K, BLOCK_N] tile of one chunk
        (`_expert_chunk`) per program, the rows read through `order` where the operand is not in sorted layout
        (dy's row order[r] // dy_div), dy's rows scaled by their slots' combine weights where DY_SCALE.
        `_chunk_sum_kernel` adds each expert's chunks. Chunks, not experts, make the grid: an expert with many
        rows is as many programs, so a skewed routing (a few experts taking most rows) does not leave one
        program per tile running long after the others."""
        pid = tl.program_id(0)
        experts = tl.arange(0, E_POW2)
        ends = tl.load(offs_ptr + experts, mask=experts < E, other=0)
        starts = tl.load(offs_ptr + experts - 1, mask=(experts > 0) & (experts < E), other=0)
        c = tl.program_id(1)
        _, first, end, chunks = _expert_chunk(ends, starts, c, E, E_POW2, CHUNK)
        if c >= chunks:
            return
        n_tiles = tl.cdiv(N, BLOCK_N)
        kk = (pid // n_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for r0 in range(first, end, BLOCK_R):
            r = r0 + rr
            ok = r < end
            xs = _through(order_ptr, r, ok, X_GATHER, div)
            if DY_SCALE:  # the slot gives both dy's row and the scale: one load of order
                slot = tl.load(order_ptr + r, mask=ok, other=0)
                ds = slot // dy_div
            else:
                ds = _through(order_ptr, r, ok, DY_GATHER, dy_div)
            a = tl.load(x_ptr + xs.to(tl.int64)[None, :] * sxm + kk[:, None] * sxk,
                        mask=ok[None, :] & (kk < K)[:, None], other=0.0)
            b = tl.load(dy_ptr + ds.to(tl.int64)[:, None] * sdm + n[None, :] * sdn,
                        mask=ok[:, None] & (n < N)[None, :], other=0.0)
            if DY_SCALE:
                scale = tl.load(cw_ptr + slot, mask=ok, other=0.0)
                b = (b.to(tl.float32) * scale.to(tl.float32)[:, None]).to(b.dtype)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        part_ptrs = part_ptr + c.to(tl.int64) * K * N + kk[:, None] * N + n[None, :]
        tl.store(part_ptrs, acc, mask=(kk < K)[:, None] & (n < N)[None, :])

    @triton.jit
    def _chunk_sum_kernel(part_ptr, dw_ptr, offs_ptr, KN,
                          E: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """dw[e] = the sum of expert e's chunk partials, in chunk order (deterministic); zeros for an expert
        without rows. dw is contiguous [E, K, N]; a program sums BLOCK entries of one expert."""
        e = tl.program_id(1)
        experts = tl.arange(0, E_POW2)
        ends = tl.load(offs_ptr + experts, mask=experts < E, other=0)
        starts = tl.load(offs_ptr + experts - 1, mask=(experts > 0) & (experts < E), other=0)
        chunks, chunk_ends = _chunk_counts(ends, starts, E, E_POW2, CHUNK)
        mine = experts == e
        first = tl.sum(tl.where(mine, chunk_ends - chunks, 0), axis=0)
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < KN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        ptrs = part_ptr + first.to(tl.int64) * KN + idx
        for _ in range(tl.sum(tl.where(mine, chunks, 0), axis=0)):
            acc += tl.load(ptrs, mask=ok, other=0.0)
            ptrs += KN
        tl.store(dw_ptr + e.to(tl.int64) * KN + idx, acc.to(dw_ptr.dtype.element_ty), mask=ok)

    @triton_op("sparsetrain::routing_plan", mutates_args=())
    def _routing_plan(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
        ids = expert_ids.reshape(-1).to(torch.int32)
        n, E = ids.numel(), num_experts
        e_pow2 = triton.next_power_of_2(E)
        block = max(16, PLAN_CELLS // e_pow2)  # a chunk's [E, BLOCK] hit matrix stays in registers
        chunks = triton.cdiv(n, block)
        counts = torch.empty(E, chunks, dtype=torch.int32, device=ids.device)
        wrap_triton(_count_kernel)[(chunks,)](ids, counts, n, chunks, E=E, E_POW2=e_pow2, BLOCK=block)
        flat = counts.view(-1)
        starts = (flat.cumsum(0, dtype=torch.int32) - flat).view(E, chunks)  # expert-major: stable
        offs = counts.sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        order = torch.empty(n, dtype=torch.int32, device=ids.device)
        inverse = torch.empty_like(order)
        sorted_ids = torch.empty_like(order)
        wrap_triton(_place_kernel)[(chunks,)](ids, starts, order, inverse, sorted_ids, n, chunks, E=E,
                                              E_POW2=e_pow2, BLOCK=block)
        return order, inverse, offs, sorted_ids

    def _launcher(kernel, config: dict | None):
        """`kernel` through its autotuner, as an op traced by torch.compile calls it; or, given `config` (a tile
        configuration, with num_warps and num_stages), the kernel itself at that configuration (tile sweeps)."""
        return wrap_triton(kernel) if config is None else kernel.fn

    def launch_rows(x, w, order, offs, div, gather, scatter, bias=None, act=0, gate_grad=None, *, short=None,
                    config=None):
        """The rows GEMM (`expert_gemm`'s forward, no autograd): `_rows_short_k_kernel` where K is one of `SHORT_K`
        (or as `short` says), else `_rows_kernel`; autotuned, or at the tile `config`. Given `gate_grad` =
        (weights [rows] in slot layout, a [rows, N] sorted), x is the output gradient of a combined GEMM
        (`expert_output`) and the result (a's gradient, the weights' in fp32)."""
        E, K, N = w.shape
        rows = order.numel()
        y = x.new_empty(rows, N)
        # Pointers a launch does not read are given some tensor (w or y).
        b, sb = (w, (0, 0)) if bias is None else (bias, bias.stride())
        cw, a = (w, y) if gate_grad is None else gate_grad
        short = K in SHORT_K if short is None else short
        # The weights' gradient in partial sums, one per column tile (of at least MIN_BLOCK_N columns) of a row.
        dg = y if gate_grad is None else torch.zeros(1 if short else triton.cdiv(N, MIN_BLOCK_N), rows,
                                                     dtype=torch.float32, device=x.device)
        strides = (x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1), *sb,
                   a.stride(0), a.stride(1))
        flags = dict(E=E, E_POW2=triton.next_power_of_2(E), GATHER=gather, SCATTER=scatter,
                     GATE_GRAD=gate_grad is not None, PRECISION=_precision(x), HAS_BIAS=bias is not None, ACT=act,
                     **(config or {}))
        pointers = (x, w, y, order, offs, b, cw, a, dg)
        if short:
            _launcher(_rows_short_k_kernel, config)[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) + E,)](
                *pointers, rows, N, div, *strides, K=K, **flags)
        else:
            def grid(meta):
                return (triton.cdiv(rows, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),

            even_k = K % (config or {}).get("BLOCK_K", ROWS_BLOCK_K) == 0
            _launcher(_rows_kernel, config)[grid](*pointers, rows, K, N, div, *strides, EVEN_K=even_k, **flags)
        return y if gate_grad is None else (y, dg.sum(dim=0))

    def weight_grad_chunk(rows: int, experts: int) -> int:
        """Rows per chunk of the weight gradient (`_weight_grad_kernel`): an expert's mean share of the rows,
        rounded up to a power of 2, at least 256: a balanced routing makes one chunk an expert, a skewed one more
        for the experts that take more (half the share was slower with a routing as skewed as SSD's: BENCHMARKS.md,
        thirteenth round). The chunks' fp32 partials, (rows / chunk + E) x K x N, are held while the gradient is
        summed: at most twice the layer's expert weights in fp32 (rows / chunk <= E)."""
        return max(256, triton.next_power_of_2(triton.cdiv(rows, experts)))

    def launch_weight_grad(x, dy, order, offs, div, x_gather, dy_gather, dy_div=1, dy_weights=None, *,
                           config=None, chunk=None):
        """`expert_weight_grad`, autotuned or at the tile `config`; dy's rows read as order[r] // dy_div where
        gathered, and scaled by their slots' `dy_weights` where given. Rows in chunks of `chunk` (default:
        `weight_grad_chunk`), each chunk's product in fp32, summed per expert in a second kernel."""
        E, K, N = offs.numel(), x.shape[1], dy.shape[1]
        rows = order.numel()
        chunk = chunk or weight_grad_chunk(rows, E)
        parts = x.new_empty(triton.cdiv(rows, chunk) + E, K, N, dtype=torch.float32)
        dw = x.new_empty(E, K, N)
        E_POW2 = triton.next_power_of_2(E)

        def grid(meta):
            return triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]), parts.shape[0]

        _launcher(_weight_grad_kernel, config)[grid](
            x, dy, parts, order, offs, parts if dy_weights is None else dy_weights, K, N, div, dy_div,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), E=E, E_POW2=E_POW2,
            X_GATHER=x_gather, DY_GATHER=dy_gather, DY_SCALE=dy_weights is not None, PRECISION=_precision(x),
            CHUNK=chunk, **(config or {}))
        block = 256 if INTERPRET else 1024
        wrap_triton(_chunk_sum_kernel)[(triton.cdiv(K * N, block), E)](
            parts, dw, offs, K * N, E=E, E_POW2=E_POW2, CHUNK=chunk, BLOCK=block)
        return dw

    @triton_op("sparsetrain::expert_gemm", mutates_args=())
    def _expert_gemm(x: torch.Tensor, w: torch.Tensor, order: torch.Tensor, offs: torch.Tensor, div: int,
                     gather: bool, scatter: bool) -> torch.Tensor:
        return launch_rows(x, w, order, offs, div, gather, scatter)

    @triton_op("sparsetrain::expert_gemm_activated", mutates_args=())
    def _expert_gemm_activated(x: torch.Tensor, w: torch.Tensor, order: torch.Tensor, offs: torch.Tensor,
                               div: int, gather: bool, bias: Optional[torch.Tensor], activation: int) -> torch.Tensor:
        return launch_rows(x, w, order, offs, div, gather, False, bias, activation)

    @triton_op("sparsetrain::expert_output", mutates_args=())
    def _expert_output(a: torch.Tensor, w: torch.Tensor, order: torch.Tensor, offs: torch.Tensor, k: int,
                       weights: torch.Tensor, bias: Optional[torch.Tensor], unit: bool) -> torch.Tensor:
        y = launch_rows(a, w, order, offs, k, False, True, bias).view(-1, k, w.shape[-1]).float()  # slot rows
        return (y if unit else y * weights.view(-1, k, 1).float()).sum(dim=1)

    @triton_op("sparsetrain::expert_output_grad", mutates_args=())
    def _expert_output_grad(dy: torch.Tensor, w: torch.Tensor, a: torch.Tensor, order: torch.Tensor,
                            offs: torch.Tensor, k: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_rows(dy, w.transpose(1, 2), order, offs, k, True, False, gate_grad=(weights, a))

    @triton_op("sparsetrain::expert_weight_grad", mutates_args=())
    def _expert_weight_grad(x: torch.Tensor, dy: torch.Tensor, order: torch.Tensor, offs: torch.Tensor, div: int,
                            x_gather: bool, dy_gather: bool, dy_div: int = 1,
                            dy_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return launch_weight_grad(x, dy, order, offs, div, x_gather, dy_gather, dy_div, dy_weights)

    def _in_layout_of(w: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
        """The weight gradient dw (contiguous) in w's dtype and layout. SSD's experts are strided views of its dense
        weights: a gradient in another layout would reach the parameter transposed, and AccumulateGrad would copy it
        again, eagerly (BENCHMARKS.md, thirteenth round); compiled, this copy fuses with the cast to fp32."""
        if dw.dtype == w.dtype and dw.stride() == w.stride():
            return dw
        return torch.empty_like(w).copy_(dw)

    def _output_setup_context(ctx, inputs, output):
        a, w, order, offs, k, weights, bias, unit = inputs
        ctx.save_for_backward(a, w, order, offs, weights)
        ctx.k, ctx.unit = k, unit

    def _output_backward(ctx, dy):
        """With g_r = dy[token] @ w[e]^T the gradient of sorted row r's unweighted output: a's gradient is the
        weighted g_r, the combine weight's <g_r, a_r> (= <dy[token], y_r>: no output rows kept), both in the input
        gradient GEMM's epilogue; w's gradient reads dy's token rows scaled by the weights
        (unless they are all 1: `unit`)."""
        a, w, order, offs, weights = ctx.saved_tensors
        dy = dy.to(a.dtype)
        da, dweights = _expert_output_grad(dy, w, a, order, offs, ctx.k, weights)
        dw = _expert_weight_grad(a, dy, order, offs, 1, False, True, ctx.k, None if ctx.unit else weights)
        return da, _in_layout_of(w, dw), None, None, None, dweights.to(weights.dtype), None, None

    _expert_output.register_autograd(_output_backward, setup_context=_output_setup_context)

    def _setup_context(ctx, inputs, output):
        x, w, order, offs, div, gather, scatter = inputs
        ctx.save_for_backward(x, w, order, offs)
        ctx.div, ctx.gather, ctx.scatter = div, gather, scatter

    def _backward(ctx, dy):
        x, w, order, offs = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # The same GEMM against w^T: read dy where y was written, write where x was read (in slot layout).
            dx = _expert_gemm(dy, w.transpose(1, 2), order, offs, 1, ctx.scatter, ctx.gather)
            if ctx.gather and ctx.div > 1:  # token layout: sum each token's k copies (fp32, deterministic)
                dx = dx.view(-1, ctx.div, dx.shape[-1]).sum(dim=1, dtype=torch.float32).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = _in_layout_of(w, expert_weight_grad(x, dy, order, offs, ctx.div, x_gather=ctx.gather,
                                                     dy_gather=ctx.scatter))
        return dx, dw, None, None, None, None, None

    _expert_gemm.register_autograd(_backward, setup_context=_setup_context)


def routing_plan(expert_ids: torch.Tensor, num_experts: int):
    """(order, inverse, offs, sorted_ids), all int32: `order[r]` the slot of sorted row r (stable: slot order within
    an expert), `inverse` its inverse, `offs[e]` the end of expert e's group, `sorted_ids[r]` row r's expert."""
    return _routing_plan(expert_ids, num_experts)


# Activations the first GEMM can apply in its epilogue (forward only), by the kernel's code for them.
EPILOGUES = {"gelu": 1, "relu": 2, "relu2": 3}


def expert_gemm_activated(x: torch.Tensor, w: torch.Tensor, order: torch.Tensor, offs: torch.Tensor, k: int, *,
                          gather: bool, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """activation(row @ w[e] + bias[e]) for every sorted row, in sorted layout: the bias ([E, N], any strides) and
    the activation (`EPILOGUES`) applied to the fp32 accumulator before it is written, so the pre-activation is
    never stored. Forward only: no autograd (evaluation, inference)."""
    return _expert_gemm_activated(x, w, order, offs, k, gather, bias, EPILOGUES[activation])


def expert_output(a: torch.Tensor, w: torch.Tensor, order: torch.Tensor, offs: torch.Tensor, k: int,
                  weights: torch.Tensor, *, bias: torch.Tensor | None = None, unit: bool = False) -> torch.Tensor:
    """sum_j weights[t*k + j] * (a[r] @ w[e] + bias[e]) over token t's k sorted rows r: an MoE FFN's second GEMM
    with the combine, token rows [N, w.shape[2]] in fp32 out (a sorted [N*k, K], weights [N*k] in slot layout,
    contiguous). Differentiable in a, w and weights (the bias only without autograd), and the backward needs no
    output rows: the weights' gradient comes from the epilogue of a's (`_output_backward`). (The combine as atomic
    adds in the GEMM's stores, no slot rows written, was slower: BENCHMARKS.md, eleventh round.)
    `unit`: the caller vouches that every weight is exactly 1 (straight-through gates: SSD's), so no product scales
    by them, forward or in w's gradient: the same result, bit for bit, and the weights still get their gradient."""
    if bias is not None and torch.is_grad_enabled() and bias.requires_grad:
        raise ValueError("expert_output has no gradient for the bias: add it apart in training")
    return _expert_output(a, w, order, offs, k, weights, bias, unit)


def expert_gemm(x: torch.Tensor, w: torch.Tensor, order: torch.Tensor, offs: torch.Tensor, k: int, *,
                gather: bool, scatter: bool) -> torch.Tensor:
    """Sorted row r times w[its expert] -> [N*k, w.shape[2]]. `gather`: x is in token layout (read row order[r] //
    k), else sorted; `scatter`: the output is in slot layout (row r written to order[r]), else sorted. Differentiable
    in x and w."""
    return _expert_gemm(x, w, order, offs, k, gather, scatter)


def expert_weight_grad(x: torch.Tensor, dy: torch.Tensor, order: torch.Tensor, offs: torch.Tensor, k: int, *,
                       x_gather: bool, dy_gather: bool) -> torch.Tensor:
    """dw [E, K, N]: every expert's rows of x (token layout read through `order` where `x_gather`, else sorted)
    times its rows of dy (slot layout where `dy_gather`, else sorted), summed."""
    return _expert_weight_grad(x, dy, order, offs, k, x_gather, dy_gather)
