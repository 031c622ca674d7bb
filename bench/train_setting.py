"""The trainer's step with one train setting at several values, side by side in one process.

Dense's step, or a method's (`--method` with `--method-set` options), of each `--presets` model
(`sparsetrain_bench.steps.measure_steps`: compiled, CUDA graphs where they apply, fused AdamW, random tokens) for each
value of train.`--key`; speed-ups against the first value of the same model. Prints the table and writes JSON.

    PYTHONPATH=src python3 bench/train_setting.py --key residual_dtype --values fp32 bf16 --out $OUT/residual.json
    PYTHONPATH=src python3 bench/train_setting.py --key residual_dtype --values fp32 bf16 --method sat \\
        --method-set metric=wanda --presets gpt2-medium
    PYTHONPATH=src python3 bench/train_setting.py --device cpu --quick --key loss_kernel --values torch auto \\
        --out /tmp/t.json   # smoke test
"""
from __future__ import annotations

import argparse

import torch

from sparsetrain.config import TrainConfig, parse_value
from sparsetrain_bench.steps import time_train_setting, write_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key", required=True, help="a train.KEY, e.g. residual_dtype")
    p.add_argument("--values", nargs="+", required=True, help="its values, the first the baseline")
    p.add_argument("--presets", nargs="+", default=["gpt2-small", "gpt2-medium"])
    p.add_argument("--method", default="dense")
    p.add_argument("--method-set", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes, few steps, eager (smoke test)")
    p.add_argument("--out", default="bench_out/train_setting.json")
    a = p.parse_args()
    if a.key not in TrainConfig.__dataclass_fields__:
        p.error(f"train.{a.key} is not a train setting")
    method = {"name": a.method}
    for item in a.method_set:
        if "=" not in item:
            p.error(f"--method-set takes KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        method[k.removeprefix("method.")] = parse_value(v)
    rows = time_train_setting(["tiny"] if a.quick else a.presets, a.key, [parse_value(v) for v in a.values],
                              device=torch.device(a.device), quick=a.quick, batch=a.batch, seq=a.seq,
                              steps=a.steps, warmup=a.warmup, method=method)
    write_rows(rows, a.out, vars(a))


if __name__ == "__main__":
    main()
