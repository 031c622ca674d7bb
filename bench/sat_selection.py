"""Which SAT choices cost the least validation loss: continue one dense run with dense and SAT variants for the
same steps and compare the final validation losses (ratios to the dense continuation of the same run).

A quality probe, not a speed benchmark: it runs on whatever device the trainer picks, and is meant for the CPU
with the demo's tiny model (`make demo` first makes runs/demo/dense and data/stdlib):

    PYTHONPATH=src python3 bench/sat_selection.py --out bench_out/sat_selection.json
    PYTHONPATH=src python3 bench/sat_selection.py --steps 10 --variants sat sat-topk --out /tmp/s.json  # smoke
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from sparsetrain.cli.demo import demo_config
from sparsetrain.training.loop import train
from sparsetrain_bench.steps import print_table, write_rows

SAT = {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5, "select": "sample"}  # ladder, wanda scores, sampled
VARIANTS = {
    "sat": SAT,
    "sat-seed1": {**SAT, "seed": 1},
    "sat-seed2": {**SAT, "seed": 2},
    "sat-topk": {**SAT, "select": "topk"},
    "sat-topk-magnitude": {**SAT, "select": "topk", "metric": "magnitude"},
    "sat-uniform": {**SAT, "metric": "uniform"},
    "sat-ffn-only": {**SAT, "head_rate": 0.0},
    "sat-heads-only": {**SAT, "ffn_rate": 0.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="runs/demo/dense", help="the dense run to continue")
    ap.add_argument("--data", default="data/stdlib", help="its prepared data")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", required=True, help="JSON file for the raw numbers")
    a = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="sat_selection_"))
    rows = []
    try:
        for name in ["dense", *a.variants]:
            method = {"name": "dense"} if name == "dense" else VARIANTS[name]
            # The demo's continuation settings (lr 1e-3, 5 warm-up steps), so the numbers line up with its report.
            cfg = demo_config(Path(a.data), a.steps, method, init_from=a.base, lr=1e-3, warmup_steps=5)
            cfg.train.progress = False
            summary = train(cfg, scratch / name)
            rows.append({"variant": name, "method": method, "val_loss": summary["val_loss"],
                         "flops": summary["flops"]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    dense = rows[0]
    for r in rows:
        r["val_gap"] = (r["val_loss"] - dense["val_loss"]) / dense["val_loss"]
        r["flops_ratio"] = dense["flops"] / r["flops"]
    print_table(rows, [("variant", "variant", ""), ("val_loss", "val loss", ".4f"), ("val_gap", "vs dense", "+.2%"),
                       ("flops_ratio", "FLOP reduction", ".2f")])
    write_rows(rows, a.out, meta={"base": a.base, "data": a.data, "steps": a.steps})


if __name__ == "__main__":
    main()
