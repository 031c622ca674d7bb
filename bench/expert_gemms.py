"""The expert GEMMs of an MoE layer one by one, against the dense GEMM of equal FLOPs: where the layer's time goes.

For each shape (d, experts E, top-k, expert width f; N tokens, N*k rows, routed by a random router, `--skew`
favouring the first experts as a trained router may; each row records the busiest expert's rows over the mean's),
the four GEMMs of the expert MLP that carry its FLOPs, each beside the cuBLAS GEMM of a dense FFN of width k*f doing
the same work:
  fwd1   token rows x [N, d] -> sorted rows h [N*k, f]        (dense: x @ W1)
  fwd2   sorted rows h -> slot rows y [N*k, d]                 (dense: H @ W2)
  wgrad1 dW1[e] = x[rows of e]^T @ dh[rows of e]              (dense: x^T @ dH)
  wgrad2 dW2[e] = h[rows of e]^T @ dy[rows of e]              (dense: H^T @ dY)
  wgrad2c  wgrad2 as training runs it through the Triton kernels: dy read in token rows [N, d] and scaled by the
         rows' combine weights (`expert_output`'s backward)
  dgrad2 dy (slot rows) @ w2[e]^T -> sorted rows              (dense: dY @ W2^T)
  dgrad1 dh (sorted rows) @ w1[e]^T -> slot rows              (dense: dH @ W1^T)
Contenders:
  grouped_mm          torch's grouped GEMM on sorted copies, the copies not counted (`copy` rows: their cost)
  triton              this project's kernels (`nn.kernels.moe_gemm`), rows gathered / scattered inside, autotuned
  triton cfg ...      the Triton kernel at one tile configuration (`--sweep`); "short": the kernel for depths up to
                      256 (`_rows_short_k_kernel`), which `triton` takes at those depths
  triton sorted       the weight-gradient kernel on sorted copies (no gather in the kernel)
  triton chunk C      the weight-gradient kernel with C rows a chunk (`--sweep`; `triton`: `weight_grad_chunk`'s)
Times are `triton.testing.do_bench_cudagraph` medians (each call replayed as a CUDA graph: GPU time, no host launches);
`vs dense` = time / the dense GEMM's.

    PYTHONPATH=src python3 bench/expert_gemms.py --shapes 768:8:2 1024:16:4 --sweep --out $OUT/expert_gemms.json
    PYTHONPATH=src python3 bench/expert_gemms.py --shapes 1024:16:4:256 --skew 1 --sweep   # skewed like SSD's routing
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/expert_gemms.py --device cpu --quick   # smoke test
"""
from __future__ import annotations

import argparse

import torch
import triton

from sparsetrain.nn.kernels import moe_gemm
from sparsetrain.nn.moe import group_gemm, grouped_mm, routing_plan
from sparsetrain_bench.steps import median_ms, print_table, write_rows

COLUMNS = [("shape", "d:E:k:f", ""), ("gemm", "GEMM", ""), ("contender", "contender", ""), ("ms", "ms", ".4f"),
           ("tflops", "TFLOP/s", ".0f"), ("vs_dense", "vs dense", ".2f"), ("max_err", "max rel err", ".1e")]
ROWS_SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=64, GROUP_M=g, num_warps=w, num_stages=s)
              for m, n, g, w, s in [(128, 128, 8, 8, 3), (128, 256, 8, 8, 3), (128, 256, 100_000, 8, 3)]]
SHORT_SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
               for m, n, w, s in [(128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 3), (64, 256, 8, 2),
                                  (128, 256, 8, 1), (64, 64, 4, 4)]]
WGRAD_SWEEP = [dict(BLOCK_K=k, BLOCK_N=n, BLOCK_R=r, num_warps=w, num_stages=s)
               for k, n, r, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
                                     (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3)]]
GEMMS = ("fwd1", "fwd2", "dgrad2", "dgrad1", "wgrad1", "wgrad2", "wgrad2c")
CHUNK_SWEEP = [512, 1024, 2048, 4096, 8192]  # rows a chunk of the weight gradient


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """'d:E:k' (f = 4d/k) or 'd:E:k:f'."""
    parts = [int(v) for v in text.split(":")]
    if len(parts) == 3:
        parts.append(4 * parts[0] // parts[2])
    if len(parts) != 4:
        raise SystemExit(f"a shape is d:E:k or d:E:k:f, not {text!r}")
    return tuple(parts)


def timer(device: torch.device, quick: bool):
    if quick or device.type != "cuda":
        return lambda fn: median_ms(fn, warmup=1, iters=2, cuda=False)
    import triton.testing
    return lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100)  # replayed: no host time in the numbers


def bench_shape(d: int, E: int, k: int, f: int, tokens: int, sweep: bool, time_ms,
                device: torch.device, dtype: torch.dtype, skew: float = 0.0, gemms: tuple[str, ...] = GEMMS
                ) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d, device=device, dtype=dtype, generator=g)
    router = torch.randn(d, E, device=device, dtype=dtype, generator=g)
    logits = (x @ router).float()
    # skew: expert e's logits shifted by skew * std * (1 - 2e / (E - 1)), from +skew std (expert 0) to -skew std
    logits += skew * logits.std() * torch.linspace(1, -1, E, device=device)
    expert_ids = logits.topk(k, dim=-1).indices
    plan = routing_plan(expert_ids, E, fused=moe_gemm.available(device))
    order, offs = plan.order, plan.offs
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    load = (counts.max() / counts.float().mean()).item()
    w1 = torch.randn(E, d, f, device=device, dtype=dtype, generator=g) / d ** 0.5
    w2 = torch.randn(E, f, d, device=device, dtype=dtype, generator=g) / f ** 0.5
    x_sorted = x.index_select(0, (order // k).long())
    h = grouped_mm(x_sorted, w1, offs=offs) if device.type == "cuda" else moe_gemm.expert_gemm(
        x_sorted, w1, order, offs, k, gather=False, scatter=False)
    dh = torch.randn_like(h)
    dy_slot = torch.randn(tokens * k, d, device=device, dtype=dtype, generator=g)
    dy_sorted = dy_slot.index_select(0, order.long())
    combine = torch.rand(tokens * k, device=device, dtype=dtype, generator=g)  # weights in slot layout
    # Dense FFN of width k*f: the same FLOPs per GEMM.
    W1 = torch.randn(d, k * f, device=device, dtype=dtype, generator=g)
    W2 = torch.randn(k * f, d, device=device, dtype=dtype, generator=g)
    H = torch.randn(tokens, k * f, device=device, dtype=dtype, generator=g)
    dY = torch.randn(tokens, d, device=device, dtype=dtype, generator=g)
    flops = 2 * tokens * d * k * f
    shape = f"{d}:{E}:{k}:{f}"
    rows: list[dict] = []
    # The oracle: one fp32 GEMM per expert on sorted copies.
    ends = offs.tolist()
    groups = list(zip([0] + ends[:-1], ends))
    references = {
        "fwd1": group_gemm(x_sorted.float(), w1.float(), offs, grouped=False),
        "fwd2": group_gemm(h.float(), w2.float(), offs, grouped=False).index_select(0, plan.inverse.long()),
        "dgrad1": group_gemm(dh.float(), w1.float().transpose(1, 2), offs, grouped=False).index_select(
            0, plan.inverse.long()),
        "dgrad2": group_gemm(dy_sorted.float(), w2.float().transpose(1, 2), offs, grouped=False),
        "wgrad1": torch.stack([x_sorted[a:b].float().t() @ dh[a:b].float() for a, b in groups]),
        "wgrad2": torch.stack([h[a:b].float().t() @ dy_sorted[a:b].float() for a, b in groups]),
    }
    scale = combine.float().index_select(0, order.long())[:, None]
    dy_combined = dY.float().index_select(0, (order // k).long()) * scale
    references["wgrad2c"] = torch.stack([h[a:b].float().t() @ dy_combined[a:b] for a, b in groups])

    def add(gemm: str, contender: str, fn, dense_ms: float | None = None):
        if gemm not in gemms:
            return None
        try:
            out = fn()
        except triton.runtime.errors.OutOfResources as e:  # a sweep's tile too big for this GPU
            print(f"{shape} {gemm} {contender}: {e}", flush=True)
            return None
        ms = time_ms(fn)
        err = None
        if contender != "dense" and not contender.startswith("copy"):
            ref = references[gemm]
            err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        row = {"shape": shape, "gemm": gemm, "contender": contender, "ms": ms, "tflops": flops / ms / 1e9,
               "vs_dense": None if dense_ms is None else ms / dense_ms, "max_err": err, "max_load": load}
        rows.append(row)
        return ms

    def tiles(gemm: str, dense_ms: float, configs: list[dict], label: str, launch, *args, **kw):
        """One row per tile configuration of `configs` (when sweeping): `launch(*args, config=..., **kw)`."""
        for cfg in configs if sweep else []:
            add(gemm, f"{label} {tag(cfg)}", lambda c=cfg: launch(*args, config=c, **kw), dense_ms)

    gm = device.type == "cuda"
    short = f in moe_gemm.SHORT_K
    rows_at, grad_at = moe_gemm.launch_rows, moe_gemm.launch_weight_grad
    # fwd1: token rows in, sorted rows out.
    dense = add("fwd1", "dense", lambda: x @ W1)
    if gm:
        add("fwd1", "grouped_mm", lambda: grouped_mm(x_sorted, w1, offs=offs), dense)
        add("fwd1", "copy (gather x)", lambda: x.index_select(0, (order // k).long()), dense)
    add("fwd1", "triton", lambda: moe_gemm.expert_gemm(x, w1, order, offs, k, gather=True, scatter=False), dense)
    tiles("fwd1", dense, ROWS_SWEEP, "triton", rows_at, x, w1, order, offs, k, True, False, short=False)
    # fwd2: sorted rows in, slot rows out.
    dense = add("fwd2", "dense", lambda: H @ W2)
    if gm:
        add("fwd2", "grouped_mm", lambda: grouped_mm(h, w2, offs=offs).index_select(0, plan.inverse.long()), dense)
    add("fwd2", "triton", lambda: moe_gemm.expert_gemm(h, w2, order, offs, k, gather=False, scatter=True), dense)
    tiles("fwd2", dense, ROWS_SWEEP, "triton", rows_at, h, w2, order, offs, k, False, True, short=False)
    tiles("fwd2", dense, SHORT_SWEEP if short else [], "triton short", rows_at, h, w2, order, offs, k, False, True,
          short=True)
    # dgrad2: dy (slot layout) in, sorted rows out, against w2^T; dgrad1: dh (sorted) in, slot rows out, w1^T.
    w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
    dense = add("dgrad2", "dense", lambda: dY @ W2.t())
    if gm:
        add("dgrad2", "grouped_mm", lambda: grouped_mm(dy_sorted, w2t, offs=offs), dense)
    add("dgrad2", "triton", lambda: moe_gemm.expert_gemm(dy_slot, w2t, order, offs, 1, gather=True, scatter=False),
        dense)
    dense = add("dgrad1", "dense", lambda: H @ W1.t())
    if gm:
        add("dgrad1", "grouped_mm", lambda: grouped_mm(dh, w1t, offs=offs).index_select(0, plan.inverse.long()),
            dense)
    add("dgrad1", "triton", lambda: moe_gemm.expert_gemm(dh, w1t, order, offs, 1, gather=False, scatter=True), dense)
    for label, configs, whole in (("triton", ROWS_SWEEP, False), ("triton short", SHORT_SWEEP, True)):
        tiles("dgrad1", dense, configs if short else [], label, rows_at, dh, w1t, order, offs, 1, False, True,
              short=whole)
    # wgrad1: x (token layout) and dh (sorted).
    dense = add("wgrad1", "dense", lambda: x.t() @ H)
    if gm:
        add("wgrad1", "grouped_mm", lambda: grouped_mm(x_sorted.t(), dh, offs=offs), dense)
    add("wgrad1", "triton", lambda: moe_gemm.expert_weight_grad(x, dh, order, offs, k, x_gather=True,
                                                                 dy_gather=False), dense)
    add("wgrad1", "triton sorted", lambda: moe_gemm.expert_weight_grad(x_sorted, dh, order, offs, 1, x_gather=False,
                                                                        dy_gather=False), dense)
    tiles("wgrad1", dense, WGRAD_SWEEP, "triton", grad_at, x, dh, order, offs, k, True, False)
    for c in CHUNK_SWEEP if sweep else []:
        add("wgrad1", f"triton chunk {c}", lambda c=c: grad_at(x, dh, order, offs, k, True, False, chunk=c), dense)
    # wgrad2: h (sorted) and dy (slot layout).
    dense = add("wgrad2", "dense", lambda: H.t() @ dY)
    if gm:
        add("wgrad2", "grouped_mm", lambda: grouped_mm(h.t(), dy_sorted, offs=offs), dense)
        add("wgrad2", "copy (gather dy)", lambda: dy_slot.index_select(0, order.long()), dense)
    add("wgrad2", "triton", lambda: moe_gemm.expert_weight_grad(h, dy_slot, order, offs, 1, x_gather=False,
                                                                 dy_gather=True), dense)
    tiles("wgrad2", dense, WGRAD_SWEEP, "triton", grad_at, h, dy_slot, order, offs, 1, False, True)
    for c in CHUNK_SWEEP if sweep else []:
        add("wgrad2", f"triton chunk {c}", lambda c=c: grad_at(h, dy_slot, order, offs, 1, False, True, chunk=c),
            dense)
    # wgrad2c: h (sorted) and dY (token layout), scaled by the combine weights.
    dense = add("wgrad2c", "dense", lambda: H.t() @ dY)
    add("wgrad2c", "triton", lambda: grad_at(h, dY, order, offs, 1, False, True, k, combine), dense)
    tiles("wgrad2c", dense, WGRAD_SWEEP, "triton", grad_at, h, dY, order, offs, 1, False, True, k, combine)
    for c in CHUNK_SWEEP if sweep else []:
        add("wgrad2c", f"triton chunk {c}", lambda c=c: grad_at(h, dY, order, offs, 1, False, True, k, combine,
                                                                 chunk=c), dense)
    return rows


def tag(cfg: dict) -> str:
    dims = "x".join(str(v) for key, v in cfg.items() if key.startswith("BLOCK"))
    group = "" if "GROUP_M" not in cfg else " g-all" if cfg["GROUP_M"] >= 100_000 else f" g{cfg['GROUP_M']}"
    return f"{dims}{group} w{cfg['num_warps']} s{cfg['num_stages']}"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, two timed calls (a smoke test)")
    p.add_argument("--shapes", nargs="+", default=["768:8:2", "1024:16:4", "1024:16:4:256"],
                   help="d:E:k (expert width 4d/k) or d:E:k:f")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--sweep", action="store_true", help="also each tile configuration and chunk size of the sweep "
                   "lists")
    p.add_argument("--skew", type=float, default=0.0, help="favour the first experts: their router logits shifted "
                   "by up to +-SKEW standard deviations (0: the random router's own balance)")
    p.add_argument("--gemms", nargs="+", choices=GEMMS, default=list(GEMMS), help="time only these GEMMs")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if not moe_gemm.available(device):
        raise SystemExit("the Triton kernels need a GPU with Triton, or TRITON_INTERPRET=1 on the CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [parse_shape(s) for s in a.shapes]
    tokens = a.tokens
    if a.quick:
        shapes, tokens = [(32, 4, 2, 32)], 64
        global ROWS_SWEEP, SHORT_SWEEP, WGRAD_SWEEP, CHUNK_SWEEP
        ROWS_SWEEP = [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=g, num_warps=1, num_stages=1) for g in (1, 2)]
        SHORT_SWEEP = [dict(BLOCK_M=32, BLOCK_N=32, num_warps=1, num_stages=1)]
        WGRAD_SWEEP = [dict(BLOCK_K=32, BLOCK_N=32, BLOCK_R=32, num_warps=1, num_stages=1)]
        CHUNK_SWEEP = [16, 64]
    time_ms = timer(device, a.quick)
    rows = []
    for d, E, k, f in shapes:
        rows += bench_shape(d, E, k, f, tokens, a.sweep, time_ms, device, dtype, a.skew, tuple(a.gemms))
        print(f"{d}:{E}:{k}:{f}: the busiest expert takes {rows[-1]['max_load']:.2f}x the mean share of rows")
        print_table([r for r in rows if r["shape"] == f"{d}:{E}:{k}:{f}"], COLUMNS)
    if a.out:
        write_rows(rows, a.out, meta=vars(a))
    return rows


if __name__ == "__main__":
    main()
