"""The language-model loss through the Triton cross-entropy against F.cross_entropy, alone and in dense's step.

Part 1, the loss alone: forward + backward (and the forward alone) of the mean cross-entropy of bf16 logits
[tokens, V] (as the model's output layer hands them over under autocast), F.cross_entropy on fp32 logits compiled
(the model's loss before) and eager, and `nn.kernels.cross_entropy` (`--blocks`: other block widths along V, each
its own row). Part 2, the trainer's dense step (`sparsetrain_bench.steps.measure_steps`: compiled, CUDA graphs,
fused AdamW) of each `--presets` model with `train.loss_kernel` = torch and triton side by side. Prints the tables
and writes JSON.

    PYTHONPATH=src python3 bench/loss_kernel.py --presets gpt2-small gpt2-medium --out $OUT/loss.json
    PYTHONPATH=src python3 bench/loss_kernel.py --device cpu --quick --out /tmp/l.json   # smoke test
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsetrain.nn.kernels import cross_entropy as ce
from sparsetrain_bench.steps import median_ms, print_table, setting_arguments, time_train_setting, write_rows


def time_loss(tokens: int, vocab: int, blocks: list[int], device: torch.device, quick: bool) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = (torch.randn(tokens, vocab, device=device, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=g)

    def reference(x, t):
        return F.cross_entropy(x.float(), t)

    contenders = {"torch eager": reference, "triton": lambda x, t: ce.cross_entropy(x, t, "triton")}
    if device.type == "cuda":
        contenders["torch compiled"] = torch.compile(reference)
    default = ce.BLOCK_V
    rows = []
    for block in [default] + [b for b in blocks if b != default]:
        ce.BLOCK_V = block  # read at each launch
        for name, loss_fn in contenders.items():
            if block != default and name != "triton":
                continue

            def step():
                logits.grad = None
                loss_fn(logits, targets).backward()

            def forward():
                with torch.no_grad():
                    loss_fn(logits, targets)

            ms = median_ms(step, warmup=1 if quick else 5, iters=2 if quick else 20)
            fwd_ms = median_ms(forward, warmup=1 if quick else 5, iters=2 if quick else 20)
            gbytes = 3 * logits.numel() * logits.element_size() / 1e9  # one read forward, a read and a write back
            rows.append({"vocab": vocab, "tokens": tokens, "contender": name if block == default else
                         f"triton, blocks of {block}", "ms": ms, "fwd_ms": fwd_ms, "min_traffic_tb_s": gbytes / ms})
    ce.BLOCK_V = default
    base = next(r["ms"] for r in rows if r["contender"] == ("torch compiled" if device.type == "cuda" else
                                                              "torch eager"))
    for r in rows:
        r["vs_torch"] = r["ms"] / base
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", nargs="+", type=int, default=[50304, 128256], help="vocabularies of the loss alone")
    p.add_argument("--blocks", nargs="+", type=int, default=[2048, 8192], help="Triton block widths to try (alone)")
    p.add_argument("--skip-steps", action="store_true", help="only the loss alone")
    setting_arguments(p, out="bench_out/loss_kernel.json")
    a = p.parse_args()
    device = torch.device(a.device)
    if not ce.available(device):
        raise SystemExit("the Triton loss needs a GPU with Triton, or TRITON_INTERPRET=1 on the CPU")
    tokens, vocabs, blocks = a.batch * a.seq, a.vocabs, a.blocks
    if a.quick:
        tokens, vocabs, blocks = 64, [300], [32]
    alone = [r for v in vocabs for r in time_loss(tokens, v, blocks, device, a.quick)]
    print_table(alone, [("vocab", "V", "d"), ("contender", "contender", ""), ("ms", "fwd+bwd ms", ".3f"),
                        ("fwd_ms", "fwd ms", ".3f"),
                        ("vs_torch", "vs torch", ".2f"), ("min_traffic_tb_s", "TB/s (3 passes)", ".2f")])
    steps = [] if a.skip_steps else time_train_setting(a, "loss_kernel", ["torch", "triton"])
    write_rows(alone + steps, a.out, vars(a))


if __name__ == "__main__":
    main()
