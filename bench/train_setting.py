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

from sparsetrain.config import TrainConfig, parse_value
from sparsetrain_bench.steps import setting_arguments, time_train_setting, write_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key", required=True, help="a train.KEY, e.g. residual_dtype")
    p.add_argument("--values", nargs="+", required=True, help="its values, the first the baseline")
    p.add_argument("--method", default="dense")
    p.add_argument("--method-set", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    setting_arguments(p, out="bench_out/train_setting.json")
    a = p.parse_args()
    if a.key not in TrainConfig.__dataclass_fields__:
        p.error(f"train.{a.key} is not a train setting")
    method = {"name": a.method}
    for item in a.method_set:
        if "=" not in item:
            p.error(f"--method-set takes KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        method[k.removeprefix("method.")] = parse_value(v)
    rows = time_train_setting(a, a.key, [parse_value(v) for v in a.values], method=method)
    write_rows(rows, a.out, vars(a))


if __name__ == "__main__":
    main()
