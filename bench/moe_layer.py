"""MoE FFN layer vs a dense FFN of equal active FLOPs: forward + backward time.

Each expert is f_e = ffn_mult * d / k wide, so a token's k experts do the work of one dense FFN of width
ffn_mult * d (the dense contender). Both run in bf16 on the same input; the MoE includes its router, losses,
statistics and dispatch. `ms`: wall time of the layer's step alone, CUDA events after warm-up, median of many
steps (launch overhead included: a lone layer can wait on the CPU). `gpu`: the sum of the step's kernel times
(profiler), what the layer costs inside a model step that keeps the GPU busy. `gemm ms`: the expert MLP alone
on a fixed routing (its two GEMMs, with the gathers and scatters of its rows, and the activation; forward +
backward; compiled as the layer is), so moe - gemm is what routing, planning, losses and the combine cost.
`plan ms` / `sort ms`: planning a routing by the Triton counting sort / by a stable sort, the GPU time of their
kernels (CPU: wall time). `--kernels` gives one contender per way of running the expert GEMMs
(`sparsetrain.nn.moe.KERNELS`). Modes: eager, torch.compile, and torch.compile with
CUDA graphs (no launch overhead).

    python bench/moe_layer.py --out bench_out/moe_layer.json           # the full grid on a GPU
    python bench/moe_layer.py --device cpu --quick                     # a smoke test
"""
from __future__ import annotations

import argparse
import sys

import torch

from sparsetrain.nn.model import FFN, ModelArgs
from sparsetrain.nn.moe import MoEFFN, routing_plan
from sparsetrain_bench.steps import kernel_ms, kernel_table, median_ms, write_rows


def dense_ffn(d: int, width: int, activation: str) -> FFN:
    args = ModelArgs(family="gpt2", n_layer=1, n_head=1, n_kv_head=1, d_model=d, d_ff=width, vocab_size=1,
                     max_seq_len=1, activation=activation, norm_eps=1e-5, rope_theta=1e4, tie_embeddings=False,
                     bias=False)
    return FFN(args)


def train_step(module: torch.nn.Module, layer, x: torch.Tensor, gy: torch.Tensor):
    """One forward + backward of `layer` (maybe compiled) whose parameters live in `module`."""
    def run():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        y = layer(x)
        aux = getattr(module, "aux_loss", None)
        if aux is not None:
            torch.autograd.backward([y, aux], [gy, torch.ones_like(aux)])
        else:
            y.backward(gy)
    return run


def gemm_only_step(moe: MoEFFN, x: torch.Tensor, kernel: str, compile_kw: dict | None):
    """The expert MLP of one routing of `x` (its two GEMMs with the rows' gathers and scatters, activation),
    forward + backward, without router, planning or combine; compiled as the layer is (`compile_kw`)."""
    expert_rows = moe.expert_rows if compile_kw is None else torch.compile(moe.expert_rows, **compile_kw)
    x2 = x.detach().reshape(-1, x.shape[-1]).clone().requires_grad_(True)
    with torch.no_grad():
        ids, _ = moe.route(x2)
        plan = routing_plan(ids, moe.num_experts, fused=kernel == "triton")
    gy = torch.randn(ids.numel(), moe.d_model, device=x.device, dtype=x.dtype)

    def run():
        for p in moe.parameters():
            p.grad = None
        x2.grad = None
        expert_rows(x2, plan, kernel).backward(gy)
    return run


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (a smoke test)")
    p.add_argument("--d", type=int, nargs="+", default=[768, 1024, 2048])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16], help="the issue-17 grid by default")
    p.add_argument("--top-k", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (the input is [tokens/seq, seq, d])")
    p.add_argument("--ffn-mult", type=int, default=4, help="dense width / d; expert width = ffn_mult * d / k")
    p.add_argument("--activation", default="gelu", choices=["gelu", "relu", "relu2", "swiglu"])
    p.add_argument("--modes", nargs="+", default=["compile"], choices=["eager", "compile", "cudagraphs"],
                   help="cudagraphs = torch.compile(mode='reduce-overhead'): no launch overhead")
    p.add_argument("--kernels", nargs="+", default=["triton", "grouped_mm"],
                   help="how the MoE's expert GEMMs run (sparsetrain.nn.moe.KERNELS), one contender each")
    p.add_argument("--profile", action="store_true", help="print each contender's CUDA kernel table")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args(argv)
    if a.quick:
        a.d, a.experts, a.top_k, a.tokens, a.seq, a.warmup, a.iters = [64], [4], [1, 2], 512, 128, 1, 3
        a.modes, a.kernels = ["eager"], ["grouped_mm", "loop"]
    device = torch.device(a.device)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    compile_kw = {"eager": None, "compile": {}, "cudagraphs": {"mode": "reduce-overhead"}}
    timed_kernels = device.type == "cuda"

    rows = []
    for d in a.d:
        x = torch.randn(a.tokens // a.seq, a.seq, d, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn_like(x)
        width = a.ffn_mult * d
        dense = dense_ffn(d, width, a.activation).to(device, dtype)
        for mode in a.modes:
            kw = compile_kw[mode]
            torch._dynamo.reset()
            layer = dense if kw is None else torch.compile(dense, **kw)
            step = train_step(dense, layer, x, gy)
            dense_ms = median_ms(step, warmup=a.warmup, iters=a.iters, cuda=device.type == "cuda")
            dense_kernel_ms = kernel_ms(step) if timed_kernels else None
            if a.profile and timed_kernels:
                print(f"dense d={d} {mode}\n{kernel_table(step)}", flush=True)
            for E in a.experts:
                for k in a.top_k:
                    if k > E or width % k:
                        continue
                    for kernel in a.kernels:
                        row = moe_row(a, d, E, k, kernel, mode, x, gy, device, dtype, kw, dense_ms, dense_kernel_ms)
                        rows.append(row)
                        print_row(row, header=len(rows) == 1)

    print("\nMoE layer fwd+bwd time / dense FFN of equal active FLOPs (ratio < 1: MoE faster)")
    for i, r in enumerate(rows):
        print_row(r, header=i == 0)
    if a.out:
        write_rows(rows, a.out, dict(ran_on=device.type, tokens=a.tokens, dtype="bf16", activation=a.activation,
                                     argv=sys.argv[1:] if argv is None else argv))
    return rows


def moe_row(a, d, E, k, kernel, mode, x, gy, device, dtype, kw, dense_ms, dense_kernel_ms) -> dict:
    """One MoE contender timed against the dense numbers of the same width."""
    width = a.ffn_mult * d
    moe = MoEFFN(d, width // k, E, k, a.activation).to(device, dtype)
    moe.kernel = kernel
    torch._dynamo.reset()
    layer = moe if kw is None else torch.compile(moe, **kw)
    step = train_step(moe, layer, x, gy)
    cuda = device.type == "cuda"
    moe_ms = median_ms(step, warmup=a.warmup, iters=a.iters, cuda=cuda)
    gemm_ms = median_ms(gemm_only_step(moe, x, kernel, kw), warmup=a.warmup, iters=a.iters, cuda=cuda)
    row = dict(d=d, experts=E, top_k=k, expert_width=width // k, dense_width=width, mode=mode, kernel=kernel,
               dense_ms=dense_ms, moe_ms=moe_ms, ratio=moe_ms / dense_ms, gemm_ms=gemm_ms)
    with torch.no_grad():  # planning alone: the counting-sort kernels and the stable sort, their kernels' GPU time
        ids, _ = moe.route(x.detach().reshape(-1, d))
    for fused in (True, False) if cuda else (False,):
        plan = lambda: routing_plan(ids, E, fused=fused)  # noqa: E731
        row["plan_ms" if fused else "sort_plan_ms"] = (kernel_ms(plan) if cuda else
                                                        median_ms(plan, warmup=a.warmup, iters=a.iters, cuda=False))
    if dense_kernel_ms is not None:
        row.update(dense_kernel_ms=dense_kernel_ms, moe_kernel_ms=kernel_ms(step))
        row["kernel_ratio"] = row["moe_kernel_ms"] / dense_kernel_ms
        if a.profile:
            print(f"moe d={d} E={E} k={k} {kernel} {mode}\n{kernel_table(step)}", flush=True)
    return row


def print_row(r: dict, header: bool):
    if header:
        print(f"{'d':>5} {'E':>3} {'k':>2} {'f_e':>5} {'kernel':>10} {'mode':>10} {'dense ms':>9} {'moe ms':>8} "
              f"{'ratio':>6} {'gemm ms':>8} {'dense gpu':>9} {'moe gpu':>8} {'ratio':>6} {'plan ms':>7} {'sort ms':>7}")
    gpu = (f"{r['dense_kernel_ms']:>9.3f} {r['moe_kernel_ms']:>8.3f} {r['kernel_ratio']:>6.2f}"
           if "kernel_ratio" in r else f"{'-':>9} {'-':>8} {'-':>6}")
    print(f"{r['d']:>5} {r['experts']:>3} {r['top_k']:>2} {r['expert_width']:>5} {r['kernel']:>10} {r['mode']:>10} "
          f"{r['dense_ms']:>9.3f} {r['moe_ms']:>8.3f} {r['ratio']:>6.2f} {r['gemm_ms']:>8.3f} {gpu} "
          f"{r.get('plan_ms', float('nan')):>7.3f} {r['sort_plan_ms']:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
