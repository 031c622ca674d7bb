"""Where an MoE training step's time goes: SSD's sparse phase and an upcycled model against dense, per kernel.

Dense and the MoE contenders side by side in one process, each timed by `sparsetrain_bench.steps.measure_steps` (the
trainer's own step: compiled model, bf16 autocast, fused AdamW, clipping), with the expert GEMMs in each kernel of
`sparsetrain.nn.moe.KERNELS` asked for. `--profile DIR` writes the torch profiler's kernel table of each contender
(DIR/<contender>.txt), the profile a missed target needs. Prints a table and writes JSON.

    PYTHONPATH=src python3 bench/moe_step.py --preset gpt2-medium --activation relu2 --contenders ssd \\
        --out $OUT/ssd_step.json                                        # SSD's sparse phase, 16 experts top-4
    PYTHONPATH=src python3 bench/moe_step.py --preset gpt2-small --contenders upcycle --kernels auto \\
        --cuda-graphs auto false --out $OUT/upcycle_step.json           # with and without CUDA graphs
    PYTHONPATH=src python3 bench/moe_step.py --device cpu --quick --out /tmp/m.json   # smoke test
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sparsetrain_bench.steps import bench_config, measure_steps, print_table, step_arguments, step_shape, write_rows
from sparsetrain_bench.suite import SSD_STEP

UPCYCLE_STEP = {"name": "upcycle", "experts": 8, "top_k": 2, "layers": "every-other"}
METHODS = {"ssd": SSD_STEP, "upcycle": UPCYCLE_STEP}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(p)
    p.add_argument("--activation", help="the model's activation (SSD's step runs relu2); default: the preset's")
    p.add_argument("--contenders", nargs="+", choices=list(METHODS), default=["ssd"])
    p.add_argument("--kernels", nargs="+", default=["auto", "grouped_mm", "triton"])
    p.add_argument("--cuda-graphs", nargs="+", choices=["auto", "false"], default=["auto"],
                   help="train.cuda_graphs of the MoE contenders, each value its own contender (dense: auto)")
    p.add_argument("--profile", help="a folder for each contender's kernel table")
    p.add_argument("--out", default="bench_out/moe_step.json")
    a = p.parse_args()
    shape = step_shape(a)
    model = {"activation": a.activation} if a.activation else None
    if a.profile:
        Path(a.profile).mkdir(parents=True, exist_ok=True)
    launched = len(a.cuda_graphs) > 1  # then labels say which run replayed graphs
    contenders = [("dense", {"name": "dense"}, "auto")] + [
        (f"{name}-{kernel}" + (f"-graphs-{graphs}" if launched else ""), {**METHODS[name], "kernel": kernel}, graphs)
        for name in a.contenders for kernel in a.kernels for graphs in a.cuda_graphs]
    if a.quick:
        contenders = [(n, {**m, "experts": 4, "top_k": 2} if m["name"] == "ssd" else m, g) for n, m, g in contenders]
    rows = []
    for label, method, graphs in contenders:
        cfg = bench_config(shape["preset"], batch_size=shape["batch"], seq_len=shape["seq"],
                           vocab_size=shape["vocab"], method=method, model_overrides=model)
        cfg.train.device = shape["device"].type
        cfg.train.cuda_graphs = graphs
        profile = Path(a.profile) / f"{label}.txt" if a.profile else None
        r = measure_steps(cfg, steps=shape["steps"], warmup=shape["warmup"], compile_model=shape["compile_model"],
                          profile_to=profile)
        r["contender"] = label
        r["speedup"] = rows[0]["step_s"] / r["step_s"] if rows else 1.0
        r["stream_speedup"] = rows[0]["stream_step_s"] / r["stream_step_s"] if rows else 1.0
        r["flops_ratio"] = r["dense_flops_per_token"] / r["flops_per_token"]
        rows.append(r)
        print(label, {k: r[k] for k in ("step_s", "stream_step_s", "fwd_bwd_ms", "optimizer_ms", "cuda_graphs")},
              flush=True)
        write_rows(rows, a.out, vars(a), quiet=True)  # a call cut by its time limit keeps what finished
    print_table(rows, [("contender", "contender", ""), ("step_s", "step s", ".4f"),
                       ("stream_step_s", "streamed s", ".4f"), ("speedup", "speed-up", ".2f"),
                       ("stream_speedup", "streamed", ".2f"), ("flops_ratio", "dense/method FLOPs", ".2f"),
                       ("fwd_bwd_ms", "fwd+bwd ms", ".1f"), ("optimizer_ms", "optimizer ms", ".1f"),
                       ("mfu_method", "MFU (active)", ".1%"), ("cuda_graphs", "CUDA graphs", "")])
    write_rows(rows, a.out, vars(a))


if __name__ == "__main__":
    main()
