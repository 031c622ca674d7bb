"""The masked AdamW of sliced weights (`methods.frozen.FrozenSlices`, SAT's and MST's held units) against torch's
fused AdamW over the same tensors, in one process: what holding half of every block matrix costs over a plain step.

The tensors are gpt2's four matrices per block (qkv, o, fc, proj) at a preset's widths and depth, in fp32 as the
trainer keeps them (llama's grouped-query and gated layouts are not modelled), half of each matrix's units held (rows
of fc and qkv, columns of proj and o, the layout SAT and MST slice). Contenders:
  fused      torch.optim.AdamW(fused=True).step() over every tensor (what dense's step does)
  masked     the compiled masked update as the trainer runs it (inductor, one pass over every entry of each tensor)
`ms`: wall time of one update, launches included; `GPU ms`: its kernels' time alone (profiler), what it costs in a
training step whose host runs ahead of the GPU. (Inductor's combo kernels and a Triton update that never touched held
rows, contenders before, were 2.4x and 1.19x the masked update's GPU time: BENCHMARKS.md.)

    PYTHONPATH=src python3 bench/masked_update.py --preset gpt2-medium --out $OUT/masked_update.json
    PYTHONPATH=src python3 bench/masked_update.py --device cpu --quick --out /tmp/m.json   # smoke test
"""
from __future__ import annotations

import argparse

import torch

from sparsetrain.methods.frozen import _adamw_under_mask
from sparsetrain.nn.model import PRESETS
from sparsetrain_bench.steps import kernel_ms, median_ms, print_table, write_rows

COLUMNS = [("contender", "contender", ""), ("tensors", "tensors", "d"), ("ms", "ms", ".3f"),
           ("vs_fused", "vs fused AdamW", ".2f"), ("gpu_ms", "GPU ms", ".3f"), ("gpu_vs_fused", "GPU vs fused", ".2f")]


def block_matrices(preset: str, layers: int, device: torch.device) -> list[tuple[torch.Tensor, int]]:
    """(weight, sliced dim) of gpt2's four block matrices at `preset`'s widths, `layers` blocks, in fp32."""
    d, f = PRESETS[preset]["d_model"], PRESETS[preset]["d_ff"]
    shapes = [((3 * d, d), 0), ((f, d), 0), ((d, f), 1), ((d, d), 1)]
    return [(torch.randn(s, device=device) * 0.02, dim) for _ in range(layers) for s, dim in shapes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-medium", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="two blocks of the tiny preset, few iterations")
    p.add_argument("--out", default="bench_out/masked_update.json")
    a = p.parse_args()
    device = torch.device(a.device)
    preset = "tiny" if a.quick else a.preset
    mats = block_matrices(preset, 2 if a.quick else PRESETS[preset]["n_layer"], device)
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(w) for w, _ in mats]
    grads = [torch.randn(w.shape, device=device, generator=gen) * 1e-3 for w, _ in mats]
    keeps = []
    for w, dim in mats:
        shape = [1, 1]
        shape[dim] = -1
        keeps.append((torch.rand(w.shape[dim], device=device, generator=gen) < 0.5).view(shape))
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    for q, g in zip(params, grads):
        q.grad = g
    opt.step()  # the moments exist, as after a run's first step
    ps = [q.detach() for q in params]
    ms = [opt.state[q]["exp_avg"] for q in params]
    vs = [opt.state[q]["exp_avg_sq"] for q in params]
    steps = [opt.state[q]["step"] for q in params]
    state = ps + ms + vs + steps
    saved = [t.clone() for t in state]

    def reset():
        for t, s in zip(state, saved):
            t.copy_(s)

    g0 = opt.param_groups[0]
    hp = torch.tensor([[g0["lr"], g0["weight_decay"], *g0["betas"], g0["eps"]]] * len(ps), dtype=torch.float64,
                      device=device)
    iters = 3 if a.quick else 30
    rows = [{"contender": "fused", "tensors": len(ps), "ms": median_ms(opt.step, warmup=2, iters=iters)}]
    if device.type == "cuda":  # the kernels' own time, launches left out (a step's GPU runs ahead of its host)
        rows[0]["gpu_ms"] = kernel_ms(opt.step)
    masked = torch.compile(_adamw_under_mask, dynamic=False)

    def update():
        masked(ps, grads, ms, vs, keeps, steps, hp)

    reset()
    rows.append({"contender": "masked", "tensors": len(ps), "ms": median_ms(update, warmup=2, iters=iters)})
    if device.type == "cuda":
        rows[-1]["gpu_ms"] = kernel_ms(update)
    for r in rows:
        r["vs_fused"] = r["ms"] / rows[0]["ms"]
        if "gpu_ms" in r:
            r["gpu_vs_fused"] = r["gpu_ms"] / rows[0]["gpu_ms"]
    print_table(rows, COLUMNS)
    write_rows(rows, a.out, meta=vars(a))


if __name__ == "__main__":
    main()
