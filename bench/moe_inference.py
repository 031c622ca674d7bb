"""A model run as an MoE for inference (SSD's sparse inference) against the same model dense: prefill and FFN time.

The model is built from a preset (relu2, as SSD trains it), its FFNs clustered into experts and routed top-k by
their centroids (`run_as_moe`: what `eval --moe K` runs), and timed on random tokens, compiled on a GPU: the prefill
of one batch (the whole model) and the FFNs alone on the hidden states that batch gives them, dense and as an MoE,
side by side in one process, in bf16 end to end as a serving stack runs it (`parts.inference_times`). Speed does not depend on what the model learned except through how evenly tokens
spread over experts: random weights spread them about evenly, a trained model less so (the `ssd-pretrain` suite
part times the trained models the same way, with their validation losses).

    PYTHONPATH=src python3 bench/moe_inference.py --preset gpt2-medium --kernels auto triton --cuda-graphs false true \
        --out $OUT/moe_inference.json
    PYTHONPATH=src python3 bench/moe_inference.py --device cpu --quick --out /tmp/mi.json   # smoke test
"""
from __future__ import annotations

import argparse
import itertools

import torch

from sparsetrain.methods.ssd.moefy import run_as_moe
from sparsetrain.nn.model import Transformer, resolve
from sparsetrain.nn.moe import KERNELS
from sparsetrain.training.runtime import Runtime
from sparsetrain_bench.parts import inference_times
from sparsetrain_bench.steps import bench_config, print_table, step_arguments, step_shape, write_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(p)
    p.add_argument("--experts", type=int, nargs="+", default=[16])
    p.add_argument("--top-k", type=int, nargs="+", default=[4])
    p.add_argument("--kernels", nargs="+", default=["auto"], choices=KERNELS,
                   help="how the experts' GEMMs run (method.kernel), each its own row")
    p.add_argument("--cuda-graphs", nargs="+", default=["false"], choices=["false", "true"],
                   help="time the compiled calls replayed as CUDA graphs too, each its own row")
    p.add_argument("--profile", action="store_true", help="print the profiler's table of the FFNs' kernels (GPU)")
    p.add_argument("--out", default="bench_out/moe_inference.json")
    a = p.parse_args()
    kw = step_shape(a)
    device = kw["device"]
    cfg = bench_config(kw["preset"], batch_size=kw["batch"], seq_len=kw["seq"], vocab_size=kw["vocab"],
                       method={"name": "dense"}, model_overrides={"activation": "relu2"})
    rt = Runtime(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    x = torch.randint(0, kw["vocab"], (kw["batch"], kw["seq"]), device=device)
    rows = []
    for experts, top_k, kernel, graphs in itertools.product(a.experts, a.top_k, a.kernels, a.cuda_graphs):
        torch.manual_seed(0)
        model = Transformer(resolve(cfg.model)).to(device).eval()
        run_as_moe(model, top_k, experts)
        for block in model.blocks:
            block.mlp.kernel = kernel
        graphs = graphs == "true" and kw["compile_model"] and device.type == "cuda"
        rows.append({"preset": kw["preset"], "experts": experts, "top_k": top_k, "kernel": kernel,
                     "cuda_graphs": graphs, "tokens": x.numel(),
                     **inference_times(model, x, rt, compiled=kw["compile_model"], cuda_graphs=graphs,
                                      profile=a.profile and device.type == "cuda")})
        write_rows(rows, a.out, vars(a), quiet=True)
        del model
        torch._dynamo.reset()  # each model compiles from cold
    print_table(rows, [("experts", "experts", "d"), ("top_k", "top-k", "d"), ("kernel", "kernel", ""),
                       ("cuda_graphs", "CUDA graphs", ""),
                       ("prefill_ms_dense", "prefill dense ms", ".2f"), ("prefill_ms_moe", "prefill MoE ms", ".2f"),
                       ("prefill_speedup", "prefill speed-up", ".2f"), ("ffn_ms_dense", "FFNs dense ms", ".2f"),
                       ("ffn_ms_moe", "FFNs MoE ms", ".2f"), ("ffn_speedup", "FFN speed-up", ".2f")])
    write_rows(rows, a.out, vars(a))


if __name__ == "__main__":
    main()
