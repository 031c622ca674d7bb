"""Causal attention through each SDPA backend, alone and in dense's step (`train.attention_kernel`).

Part 1, attention alone: forward + backward of causal SDPA in bf16 on q, k, v cut from one qkv projection output
(the model's layout: strided heads), each backend on its own (`sdpa_kernel([backend])`), at each `--presets` model's
heads and `--seqs` lengths; the largest error of the output and of each input's gradient against the math backend on
fp32 copies, and which backend PyTorch's own order picks. Part 2, the trainer's dense step
(`sparsetrain_bench.steps.measure_steps`: compiled, CUDA graphs, fused AdamW) of each preset with
`train.attention_kernel` = torch (PyTorch's own pick) and flash side by side (`--kernels`). Prints the tables and
writes JSON.

    PYTHONPATH=src python3 bench/attention_kernel.py --presets gpt2-small gpt2-medium --out $OUT/attention.json
    PYTHONPATH=src python3 bench/attention_kernel.py --device cpu --quick --out /tmp/a.json   # smoke test
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparsetrain.nn.model import resolve
from sparsetrain_bench.steps import (bench_config, median_ms, print_table, setting_arguments, time_train_setting,
                                     write_rows)

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_inputs(batch: int, seq: int, n_head: int, n_kv: int, d: int, device: torch.device, dtype):
    """q, k, v [B, heads, T, d] as the model makes them: views of one projection output, heads strided."""
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(batch, seq, (n_head + 2 * n_kv) * d, device=device, generator=g).to(dtype).requires_grad_()
    return qkv


def split_heads(qkv: torch.Tensor, n_head: int, n_kv: int, d: int):
    B, T, _ = qkv.shape
    q, k, v = qkv.split([n_head * d, n_kv * d, n_kv * d], dim=-1)
    return (q.view(B, T, n_head, d).transpose(1, 2), k.view(B, T, n_kv, d).transpose(1, 2),
            v.view(B, T, n_kv, d).transpose(1, 2))


def attend(qkv, n_head, n_kv, d, backends):
    q, k, v = split_heads(qkv, n_head, n_kv, d)
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_head != n_kv)


def default_choice(qkv, n_head, n_kv, d) -> str:
    """The backend PyTorch's own order picks for these inputs."""
    q, k, v = split_heads(qkv, n_head, n_kv, d)
    chosen = torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=n_head != n_kv)
    return next((name for name, b in BACKENDS.items() if int(b) == chosen), str(chosen))


def time_attention(preset: str, seq: int, batch: int, device: torch.device, quick: bool) -> list[dict]:
    args = resolve(bench_config(preset, batch_size=batch, seq_len=seq, vocab_size=512).model)
    n_head, n_kv, d = args.n_head, args.n_kv_head, args.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    qkv = attention_inputs(batch, seq, n_head, n_kv, d, device, dtype)
    grad = torch.randn(batch, n_head, seq, d, device=device, dtype=dtype)
    reference_in = qkv.detach().float().requires_grad_()
    reference = attend(reference_in, n_head, n_kv, d, [SDPBackend.MATH])
    reference.backward(grad.float())
    chosen = default_choice(qkv, n_head, n_kv, d)
    # Causal attention: half of QK^T and of PV forward, twice that backward (dS, dQ, dK, dV: 2.5x the forward).
    flops = 3.5 * 2 * 2 * batch * n_head * seq * seq * d / 2
    rows = []
    for name, backend in BACKENDS.items():
        if device.type == "cpu" and name in ("cudnn", "efficient"):
            continue
        if name == "math" and device.type == "cuda":
            continue  # the reference; far slower, and its [B, H, T, T] scores would not fit at every shape

        def step():
            qkv.grad = None
            attend(qkv, n_head, n_kv, d, [backend]).backward(grad)

        try:
            step()
        except RuntimeError as e:  # the backend cannot serve these inputs
            rows.append({"preset": preset, "seq": seq, "backend": name, "error": str(e).splitlines()[0][:120]})
            continue
        out_err = (attend(qkv, n_head, n_kv, d, [backend]).float() - reference).abs().max().item()
        grad_err = (qkv.grad.float() - reference_in.grad).abs().max().item()
        ms = median_ms(step, warmup=1 if quick else 5, iters=2 if quick else 20)
        rows.append({"preset": preset, "seq": seq, "heads": f"{n_head}/{n_kv}x{d}", "backend": name,
                     "torch_default": chosen, "ms": ms, "tflops": flops / ms / 1e9, "out_err": out_err,
                     "grad_err": grad_err})
    timed = [r for r in rows if "ms" in r]
    base = next((r["ms"] for r in timed if r["backend"] == chosen), timed[0]["ms"] if timed else None)
    for r in timed:
        r["vs_default"] = r["ms"] / base
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alone-presets", nargs="+", default=["gpt2-small", "gpt2-medium", "llama-1b"])
    p.add_argument("--seqs", nargs="+", type=int, default=[1024, 4096], help="lengths of attention alone")
    p.add_argument("--kernels", nargs="+", default=["torch", "flash"], help="train.attention_kernel in the steps")
    p.add_argument("--skip-steps", action="store_true", help="only attention alone")
    setting_arguments(p, out="bench_out/attention_kernel.json")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda":
        print(f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(device)}, "
              f"capability {torch.cuda.get_device_capability(device)}", flush=True)
    alone_presets, seqs = a.alone_presets, a.seqs
    if a.quick:
        alone_presets, seqs = ["tiny"], [32]
    alone = []
    for preset in alone_presets:
        for seq in seqs:
            batch = 1 if a.quick else max(1, a.batch * a.seq // seq)  # the same tokens at every length
            alone += time_attention(preset, seq, batch, device, a.quick)
    print_table([r for r in alone if "ms" in r], [
        ("preset", "model", ""), ("seq", "T", "d"), ("heads", "heads", ""), ("backend", "backend", ""),
        ("torch_default", "torch picks", ""), ("ms", "fwd+bwd ms", ".3f"), ("vs_default", "vs torch's pick", ".2f"),
        ("tflops", "TFLOP/s", ".0f"), ("out_err", "out max err", ".2e"), ("grad_err", "grad max err", ".2e")])
    for r in alone:
        if "error" in r:
            print(f"{r['preset']} T={r['seq']} {r['backend']}: cannot run ({r['error']})")
    steps = [] if a.skip_steps else time_train_setting(a, "attention_kernel", a.kernels)
    write_rows(alone + steps, a.out, vars(a))


if __name__ == "__main__":
    main()
