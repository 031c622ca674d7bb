"""Where a SAT step's time goes: before_step (selection), forward+backward, optimizer (with stash/restore).

Dense, SAT variants and MST's neuron level side by side in one process, each timed by
`sparsetrain_bench.steps.measure_steps` (built and stepped as the trainer does: compiled model on a GPU, bf16
autocast, fused AdamW with its weight-decay groups, gradient clipping, `train_step`), which times every phase at the
step's phase marks. Prints a table and writes JSON (rewritten after each contender).
("optimizer" includes clipping and the freeze of omitted slices.)

    PYTHONPATH=src python3 bench/sat_phases.py --out $OUT/sat_phases.json            # GPU, gpt2-medium
    PYTHONPATH=src python3 bench/sat_phases.py --variants wanda mst-neuron --profile $OUT/prof  # kernel tables
    PYTHONPATH=src python3 bench/sat_phases.py --device cpu --quick --out /tmp/p.json # smoke test
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsetrain_bench.steps import bench_config, measure_steps, print_table, step_arguments, step_shape, write_rows
from sparsetrain_bench.suite import MST_NEURON_STEP

# name -> SAT options (None: dense); --variants picks some, in this order.
VARIANTS = {
    "dense": None,
    "wanda": {"metric": "wanda"},
    "maxip": {"metric": "maxip"},
    "magnitude-topk": {"metric": "magnitude", "select": "topk"},
    "uniform": {"metric": "uniform"},
    "uniform-ffn-only": {"metric": "uniform", "head_rate": 0.0},
    "wanda-stats-every-10": {"metric": "wanda", "stats_every": 10},
    "uniform-no-freeze": {"metric": "uniform", "freeze_omitted": False},  # prices the freeze of omitted slices
    "uniform-stash": {"metric": "uniform", "freeze_by": "stash"},  # stash + AdamW's step + restore, compiled
    "wanda-stash": {"metric": "wanda", "freeze_by": "stash"},
    "rate-0": {"ffn_rate": 0.0, "head_rate": 0.0},  # every unit kept, the method active: its overhead floor
    "mst-neuron": MST_NEURON_STEP,  # the same sliced path, another method (a whole method section: it has a name)
}


def run(variant, *, preset, batch, seq, vocab, steps, warmup, device, compile_model, profile_to=None):
    """Dense (`variant` None), a whole method section (it has a name), or SAT with `variant`'s options at a constant
    rate: median phase times, step time; with `profile_to`, the profiler's tables of a few more steps there."""
    if variant is None:
        method = {"name": "dense"}
    elif "name" in variant:
        method = variant
    else:
        method = {"name": "sat", "schedule": "constant", "dense_final": 0.0, **variant}
    cfg = bench_config(preset, batch_size=batch, seq_len=seq, vocab_size=vocab, method=method)
    cfg.train.device = device.type
    r = measure_steps(cfg, steps=steps, warmup=warmup, compile_model=compile_model, profile_to=profile_to)
    return {"options": "dense" if variant is None else json.dumps(variant), "before_ms": r["select_ms"],
            "fwd_bwd_ms": r["fwd_bwd_ms"], "optimizer_ms": r["optimizer_ms"], "step_ms": r["step_s"] * 1e3,
            "stream_step_ms": r["stream_step_s"] * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(p)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="which contenders (dense is always first)")
    p.add_argument("--profile", metavar="DIR", help="a folder for each contender's profile (DIR/<variant>.txt: kernels "
                   "by GPU time, the step's regions by the host's)")
    p.add_argument("--out", default="bench_out/sat_phases.json")
    a = p.parse_args()
    if a.profile:
        Path(a.profile).mkdir(parents=True, exist_ok=True)
    kw = step_shape(a)
    names = ["dense"] + [v for v in a.variants if v != "dense"]
    rows = []
    for name in names:  # written as each comes: a call cut by its time limit keeps what finished
        profile = Path(a.profile) / f"{name}.txt" if a.profile else None
        rows.append({"variant": name, **run(VARIANTS[name], **kw, profile_to=profile)})
        rows[-1]["speedup"] = rows[0]["step_ms"] / rows[-1]["step_ms"]
        print(json.dumps(rows[-1]), flush=True)
        write_rows(rows, a.out, vars(a), quiet=True)
    print_table(rows, [("variant", "variant (rates 0.5)", ""), ("before_ms", "select ms", ".2f"),
                       ("fwd_bwd_ms", "fwd+bwd ms", ".2f"), ("optimizer_ms", "optimizer ms", ".2f"),
                       ("step_ms", "step ms", ".2f"), ("speedup", "speed-up", ".2f"),
                       ("stream_step_ms", "streamed step ms", ".2f")])
    write_rows(rows, a.out, vars(a))


if __name__ == "__main__":
    main()
