"""Hybrid sparse attention: FlexAttention (local, strided, hybrid) against causal SDPA, forward + backward time.

Every contender is compiled and runs in bf16 on the same q, k, v [B, heads, T, head_dim] (B = tokens / T). `flex
causal` is FlexAttention with a plain causal mask: the gap between it and SDPA is the kernel's own cost, the gap
between it and a sparse pattern is what skipping blocks buys. `blocks` is the share of the causal blocks
(128 x 128) a pattern computes: the FLOP ratio that MST counts. `err` is the largest difference of the output and
of the query gradient from SDPA applied with the same mask as a dense boolean `attn_mask` (the reference).

    python bench/hsa_attention.py --out bench_out/hsa_attention.json      # the grid on a GPU
    python bench/hsa_attention.py --device cpu --quick                     # a smoke test (forward only: no
                                                                           # FlexAttention backward on CPU)
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from torch.utils.benchmark import Timer

import sparsetrain.nn.attention_masks as am
from sparsetrain_bench.steps import write_rows


def timed_ms(fn, min_run_time: float) -> float:
    """Median milliseconds of `fn()` (torch.utils.benchmark synchronises CUDA and repeats until min_run_time)."""
    fn()
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def step(attend, q, k, v, gy, backward: bool):
    """One forward (+ backward) of `attend(q, k, v)`."""
    def run():
        if not backward:
            with torch.no_grad():
                return attend(q, k, v)
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(gy)
    return run


def max_error(attend, q, k, v, gy, mask: torch.Tensor, backward: bool) -> float:
    """Largest difference from SDPA with the dense mask: the output and (on a GPU) the query gradient."""
    def outputs(fn):
        qq = q.detach().clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            out = fn(qq, k.detach(), v.detach())
            if not backward:
                return [out.float()]
            out.backward(gy)
        return [out.detach().float(), qq.grad.float()]

    ref = outputs(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask))
    got = outputs(attend)
    return max((x - y).abs().max().item() for x, y in zip(got, ref))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes, forward only on CPU (a smoke test)")
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch: B = tokens / seq (at least 1)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, nargs="+", default=[128, 256], help="local band widths")
    p.add_argument("--stride", type=int, nargs="+", default=[128, 256], help="strides")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per contender")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    backward = device.type == "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.quick:
        a.seq, a.tokens, a.heads, a.head_dim, a.window, a.stride, a.min_run_time = [256, 512], 512, 2, 16, [64], \
            [64], 0.05
    torch._dynamo.config.cache_size_limit = 64
    # On a GPU everything is compiled; the CPU smoke test runs FlexAttention eagerly (compiling costs seconds each).
    if device.type == "cuda":
        sdpa = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        flex = torch.compile(flex_attention)
    else:
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        flex = flex_attention
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    rows = []
    for T in a.seq:
        B = max(1, a.tokens // T)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, a.heads, T, a.head_dim, device=device, dtype=dtype, generator=g)
                   .requires_grad_(backward) for _ in range(3))
        gy = torch.randn(B, a.heads, T, a.head_dim, device=device, dtype=dtype, generator=g)
        sdpa_ms = timed_ms(step(sdpa, q, k, v, gy, backward), a.min_run_time)
        patterns = [("causal", 0, 0)] + [("local", w, 0) for w in a.window] + [("strided", 0, s) for s in a.stride]
        patterns += [("hybrid", w, s) for w in a.window for s in a.stride]
        for kind, window, stride in patterns:
            if window > T or stride > T:
                continue
            block_mask = am.build_block_mask(kind, T, max(window, 1), max(stride, 1), device)

            def attend(qq, kk, vv, block_mask=block_mask):
                return flex(qq, kk, vv, block_mask=block_mask)

            ms = timed_ms(step(attend, q, k, v, gy, backward), a.min_run_time)
            mask = am.dense_mask(kind, T, max(window, 1), max(stride, 1), device=device)
            row = dict(seq=T, batch=B, kind=kind, window=window or None, stride=stride or None,
                       blocks=am.block_fraction(kind, T, max(window, 1), max(stride, 1)), sdpa_ms=sdpa_ms,
                       flex_ms=ms, speedup=sdpa_ms / ms, err=max_error(attend, q, k, v, gy, mask, backward))
            rows.append(row)
            print_row(row, header=len(rows) == 1)

    what = "fwd+bwd" if backward else "forward only"
    print(f"\nFlexAttention vs causal SDPA, {what}, {a.heads} heads x {a.head_dim}, {dtype} (speedup > 1: flex faster)")
    for i, r in enumerate(rows):
        print_row(r, header=i == 0)
    if a.out:
        write_rows(rows, a.out, dict(ran_on=device.type, dtype=str(dtype), backward=backward, tokens=a.tokens,
                                     heads=a.heads, head_dim=a.head_dim, argv=sys.argv[1:] if argv is None else argv))
    return rows


def print_row(r: dict, header: bool):
    if header:
        print(f"{'seq':>5} {'B':>3} {'pattern':>8} {'window':>6} {'stride':>6} {'blocks':>6} {'sdpa ms':>8} "
              f"{'flex ms':>8} {'speedup':>7} {'err':>8}")
    print(f"{r['seq']:>5} {r['batch']:>3} {r['kind']:>8} {r['window'] or '-':>6} {r['stride'] or '-':>6} "
          f"{r['blocks']:>6.3f} {r['sdpa_ms']:>8.3f} {r['flex_ms']:>8.3f} {r['speedup']:>7.2f} {r['err']:>8.1e}",
          flush=True)


if __name__ == "__main__":
    main()
