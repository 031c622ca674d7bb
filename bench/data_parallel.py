"""Data-parallel step speed: each method's trainer step on one GPU and under torchrun on several (DDP, FSDP2), side
by side in one call; the scaling is tokens/s over the same method's one-GPU tokens/s at the same rows per GPU.

Every contender is a fresh process (torchrun for several GPUs) running `sparsetrain_bench.steps.measure_steps`, which
builds, wraps (training.runtime.parallelize) and steps the model exactly as the trainer does, on random tokens.
`--before` adds, for DDP, the wrapping this project used before issue 14 (the model compiled, then wrapped in DDP
with default buckets), so the change is measured in the same call; `--ddp-graphs` adds DDP with CUDA graphs.

    PYTHONPATH=src python3 bench/data_parallel.py --presets gpt2-small --methods dense --rows 16 8 \\
        --parallel ddp fsdp --fsdp-units 0 1 --before --out $OUT/data_parallel.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sparsetrain_bench import steps as steps_mod
from sparsetrain_bench.steps import bench_config, measure_steps, print_table, write_rows
from sparsetrain_bench.two_gpu import TWO_GPU_RUNS

# MST's sparsity held at 50% from the first step and its topology updated every 100 steps (the default): the quality
# parts' ramp and updates every 10 steps put updates (and, with the ramp, new shapes) in half of the streamed windows
# of these ~50 steps, so the medians measured the updates (each a dense-gradient step, and a CUDA-graph re-recording
# until MST kept its indices at fixed addresses), not the step.
MST_HELD = {"sparsity": 0.5, "warmup_end": 0.0, "restore_start": 1.0, "restore_end": 1.0, "update_every": 100}
METHODS = {name: ({**method, **MST_HELD} if method["name"] == "mst" else method, model)
           for name, method, model, _ in TWO_GPU_RUNS if not name.endswith("accum4")}
COLUMNS = [("preset", "model", ""), ("method", "method", ""), ("parallel", "parallel", ""),
           ("processes", "GPUs", "d"), ("rows", "rows/GPU", "d"), ("stream_step_s", "step s", ".4f"),
           ("stream_tokens_per_s", "tokens/s", ",.0f"), ("scaling", "vs 1 GPU", ".2f"), ("vs_ddp", "vs DDP", ".2f"),
           ("step_s", "synced step s", ".4f"),
           ("memory_gb", "mem GB", ".1f"), ("error", "error", "")]


def compiled_then_wrapped(model, rt, tcfg, compile_model):
    """The wrapping before issue 14, kept to measure against: compile the model, then wrap it in DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if compile_model:
        model.compile()
    return DDP(model, device_ids=[rt.device.index]) if rt.distributed else model


def worker(spec: dict, out: Path) -> None:
    method, model = METHODS[spec["method"]]
    cfg = bench_config(spec["preset"], batch_size=spec["rows"], seq_len=spec["seq_len"],
                       vocab_size=spec["vocab_size"], method=method, model_overrides=model)
    cfg.train.parallel = spec["parallel"] or "ddp"
    cfg.train.fsdp_blocks_per_unit = spec.get("fsdp_units", 0)
    cfg.train.fsdp_reshard_after_forward = spec.get("reshard", True)
    if spec.get("graphs"):
        cfg.train.cuda_graphs = "true"
    if spec.get("before"):
        steps_mod.parallelize = compiled_then_wrapped
    mode = (f"{spec['parallel'] or 'one'}{spec.get('fsdp_units', '')}{'' if spec.get('reshard', True) else '-kept'}"
            f"{'-graphs' if spec.get('graphs') else ''}")
    profile = spec.get("profile") and (Path(spec["profile"]) /
                                       f"profile-{spec['method']}-{spec['rows']}rows-{mode}-{spec['processes']}.txt")
    r = measure_steps(cfg, steps=spec["steps"], warmup=spec["warmup"], profile_to=profile)
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(r))


def launch(spec: dict, scratch: Path, profile_dir: str | None = None) -> dict:
    out = scratch / f"row{len(list(scratch.iterdir()))}.json"
    if profile_dir:
        spec = spec | {"profile": str(Path(profile_dir).resolve())}
    me = [str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--out", str(out)]
    if spec["processes"] == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={spec['processes']}", *me]
    print(f"data-parallel: {spec}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    row = dict(spec)
    if res.returncode != 0 or not out.is_file():
        row["error"] = res.stderr.strip().splitlines()[-1][:200] if res.stderr.strip() else f"exit {res.returncode}"
        print(res.stderr[-3000:], flush=True)
        return row
    return row | json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["gpt2-small"])
    ap.add_argument("--methods", nargs="+", default=["dense"], choices=sorted(METHODS))
    ap.add_argument("--parallel", nargs="+", default=["ddp"], choices=["ddp", "fsdp"])
    ap.add_argument("--rows", nargs="+", type=int, default=[16], help="rows of --seq-len tokens per GPU")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--before", action="store_true", help="also DDP as wrapped before issue 14")
    ap.add_argument("--fsdp-units", nargs="+", type=int, default=[0], metavar="BLOCKS",
                    help="FSDP2 contenders with these train.fsdp_blocks_per_unit (0: auto; the model's blocks or "
                         "more: one unit, the model compiled whole)")
    ap.add_argument("--fsdp-reshard", nargs="+", choices=["true", "false"], default=["true"],
                    help="FSDP2 contenders with these train.fsdp_reshard_after_forward (false: weights kept gathered "
                         "from forward to backward)")
    ap.add_argument("--ddp-graphs", action="store_true",
                    help="also DDP with train.cuda_graphs=true (the graph's pieces between buckets replayed)")
    ap.add_argument("--no-one-gpu", action="store_true", help="skip the one-GPU contenders (no 'vs 1 GPU' column)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--profile", metavar="DIR", help="write the torch profiler's table of each contender here")
    ap.add_argument("--out", default="data_parallel.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker), Path(a.out))
    if a.profile:
        Path(a.profile).mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() or torch.cuda.device_count() < a.gpus:
        sys.exit(f"data_parallel: needs {a.gpus} GPUs, this machine has "
                 f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    rows = []

    def keep(row: dict) -> None:
        """A finished contender: printed, and the raw file rewritten (a call cut by its time limit keeps the rows
        that finished)."""
        rows.append(row)
        print(json.dumps({k: row.get(k) for k, _, _ in COLUMNS}), flush=True)
        write_rows(rows, a.out, meta=vars(a), quiet=True)

    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            for method in a.methods:
                for n in a.rows:
                    common = dict(preset=preset, method=method, rows=n, seq_len=a.seq_len, vocab_size=a.vocab_size,
                                  steps=a.steps, warmup=a.warmup, profile=bool(a.profile))
                    one = {"error": "not run"}
                    if not a.no_one_gpu:
                        one = launch(common | {"processes": 1, "parallel": None}, Path(tmp), a.profile)
                        keep(one)
                    ddp = None
                    contenders = [(mode, False, 0, True, False) for mode in a.parallel if mode != "fsdp"]
                    contenders += [("ddp", False, 0, True, True)] if a.ddp_graphs and "ddp" in a.parallel else []
                    contenders += [("fsdp", False, units, reshard == "true", False) for units in a.fsdp_units
                                   for reshard in a.fsdp_reshard if "fsdp" in a.parallel]
                    contenders += [("ddp", True, 0, True, False)] if a.before and "ddp" in a.parallel else []
                    for mode, before, units, reshard, graphs in contenders:
                        r = launch(common | {"processes": a.gpus, "parallel": mode, "before": before,
                                             "fsdp_units": units, "reshard": reshard, "graphs": graphs},
                                   Path(tmp), a.profile)
                        if before:
                            r["parallel"] = "ddp (before)"
                        elif graphs:
                            r["parallel"] = "ddp, CUDA graphs"
                        elif mode == "fsdp":
                            r["parallel"] = (f"fsdp ({units} blocks a unit" if units else "fsdp (auto") + \
                                (")" if reshard else ", kept gathered)")
                        if "error" not in r and "error" not in one:
                            r["scaling"] = r["stream_tokens_per_s"] / one["stream_tokens_per_s"]
                        if mode == "ddp" and not before and not graphs and "error" not in r:
                            ddp = r
                        if (mode == "fsdp" or graphs) and ddp is not None and "error" not in r:
                            r["vs_ddp"] = r["stream_tokens_per_s"] / ddp["stream_tokens_per_s"]
                        keep(r)
    print_table(rows, COLUMNS)
    write_rows(rows, a.out, meta=vars(a))


if __name__ == "__main__":
    main()
