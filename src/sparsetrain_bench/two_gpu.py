"""The two-gpu part: every method in one process and then in two under torchrun (DDP, FSDP2), the same global batch,
each a fresh `sparsetrain train` process whose finished launch is kept, so that a later call on the same machine picks
up where a time limit cut the last one short; first the link between the GPUs (`sparsetrain_bench.interconnect`).
"""
from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from sparsetrain import config as config_mod
from sparsetrain.data.tokens import TokenData
from sparsetrain.plots import read_metrics
from sparsetrain_bench.context import Context
from sparsetrain_bench.interconnect import topology
from sparsetrain_bench.report import LINK_COLUMNS, TWO_GPU_COLUMNS
from sparsetrain_bench.runs import run_config
from sparsetrain_bench.steps import print_table

# Two GPUs: each method at the step shape of the quality parts, one process and then torchrun (DDP, and FSDP2 where
# the method supports it), the same global batch; (name, method, model options, parallel modes).
TWO_GPU_RUNS = [
    ("dense", {"name": "dense"}, {}, ("ddp", "fsdp")),
    # 4x the global batch in micro-batches of the usual size: one all-reduce for 4 (1 GPU) or 2 (each of 2 GPUs)
    # forward/backward passes, how data parallelism hides its traffic when the link is slow.
    ("dense-accum4", {"name": "dense"}, {}, ("ddp", "fsdp")),
    ("sat", {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5, "schedule": "constant", "dense_final": 0.0}, {},
     ("ddp", "fsdp")),
    ("upcycle", {"name": "upcycle", "experts": 8, "top_k": 2, "layers": "every-other"}, {}, ("ddp", "fsdp")),
    ("ssd", {"name": "ssd", "schedule": "fixed", "sparse_windows": [[0.2, 1.0]], "monitor_every": 0},
     {"activation": "relu2"}, ("ddp", "fsdp")),
    ("mst-weight", {"name": "mst", "granularity": "weight", "update_every": 10}, {}, ("ddp", "fsdp")),
    ("mst-neuron", {"name": "mst", "granularity": "neuron", "update_every": 10}, {}, ("ddp", "fsdp")),
]
LINK_SIZES_MB = (16, 64, 256, 512)  # gpt2-small's fp32 gradients are ~444 MB: DDP all-reduces them in buckets
LOSS_MATCH = 0.01  # bf16: largest relative difference of a logged loss between 1 and 2 GPUs counted as a match


def launch(ctx: Context, raw: dict[str, Any], run_dir: Path, processes: int) -> list[dict[str, Any]]:
    """`sparsetrain train` in a fresh process (`processes` > 1: under torchrun); its metrics records.

    A finished launch is kept in WORK/two-gpu-launches/ (outside the part's scratch folder), keyed by its config,
    the corpus's tokens and the process count: 21 launches do not fit one ten-minute call, so a second call on the
    same warm machine picks up where a time limit cut the first one short."""
    asked = {"config": raw, "processes": processes, "data": TokenData(Path(raw["data"]["dir"])).meta.get("sha256")}
    key = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]
    kept = ctx.work / "two-gpu-launches" / f"{run_dir.name}-{key}.json"
    if kept.is_file():
        print(f"two-gpu: {run_dir.name} already ran: reusing {kept}", flush=True)
        return json.loads(kept.read_text())
    config_path = run_dir.with_suffix(".toml")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(config_mod.dumps(raw))
    train_cmd = ["-m", "sparsetrain.cli", "train", "--config", str(config_path), "--out", str(run_dir)]
    if processes == 1:
        cmd = [sys.executable, *train_cmd]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               *train_cmd]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise LaunchFailed(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    records = read_metrics(run_dir)
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(records))
    return records


class LaunchFailed(Exception):
    """A training process of the two-gpu part exited with an error (its stderr's end in the message)."""


def run_two_gpus(ctx: Context) -> dict[str, Any]:
    """Every method on one GPU and on two (torchrun), the same global batch: losses step by step and tokens/s.
    A method whose launch fails gets a row with the error, and the others still run."""
    if not ctx.quick and (not ctx.cuda or torch.cuda.device_count() < 2):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        message = f"two-gpu needs a machine with 2 GPUs (this one has {gpus})"
        print(f"two-gpu: skipped: {message}")
        return {"status": "skipped", "message": message}
    link = {"topology": topology(), **measure_link(ctx)}
    steps = ctx.steps(50, 8)
    runs = TWO_GPU_RUNS if not ctx.quick else [r for r in TWO_GPU_RUNS if r[0] in ("dense", "dense-accum4", "upcycle")]
    rows = []
    for name, method, model, modes in runs:
        accum = 4 if name.endswith("-accum4") else 1
        raw = run_config(ctx, corpus="code", steps=steps, method=method, model=model, evals=0,
                         batch_size=accum * ctx.shape.batch_size)
        # accum4: micro-batches of the usual batch on every GPU (4 passes on one, 2 on each of two); otherwise
        # the batch is split between the GPUs (0: batch / processes).
        raw["train"].update(log_every=ctx.shape.log_every // 2 or 1, warmup_steps=max(1, steps // 10),
                            micro_batch_size=ctx.shape.batch_size if accum > 1 else 0)
        for mode in modes:
            print(f"two-gpu: {name}, 1 vs 2 processes ({mode})", flush=True)
            row = {"method": name, "parallel": mode, "steps": steps, "batch_size": raw["train"]["batch_size"]}
            try:
                one = launch(ctx, raw, ctx.work / ctx.part / f"{name}-1", 1)
                two = launch(ctx, {**raw, "train": {**raw["train"], "parallel": mode}},
                             ctx.work / ctx.part / f"{name}-2-{mode}", 2)
            except LaunchFailed as e:
                print(f"two-gpu: {name} ({mode}) failed: {e}", flush=True)
                rows.append(row | {"loss_match": False, "error": str(e)})
                continue
            gaps = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(one, two)]
            # Throughput: the median logging window after the first two (compilation).
            tps = [statistics.median([r["tokens_per_s"] for r in rs[2:]] or [rs[-1]["tokens_per_s"]])
                   for rs in (one, two)]
            rows.append(row | {"max_loss_gap": max(gaps), "loss_match": max(gaps) <= LOSS_MATCH,
                               "tokens_per_s_1": tps[0], "tokens_per_s_2": tps[1], "scaling": tps[1] / tps[0],
                               "losses_1": [r["loss"] for r in one], "losses_2": [r["loss"] for r in two]})
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("losses")}), flush=True)
    print_table(rows, TWO_GPU_COLUMNS)
    return {"scaling": rows, "loss_match_tolerance": LOSS_MATCH, "link": link}


def measure_link(ctx: Context) -> dict[str, Any]:
    """All-reduce timings between 2 processes (`sparsetrain_bench.interconnect` under torchrun), or the error."""
    out = ctx.work / ctx.part / "link.json"
    sizes = ["1"] if ctx.quick else [str(mb) for mb in LINK_SIZES_MB]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsetrain_bench.interconnect", "--out", str(out), "--sizes-mb", *sizes]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"all_reduce_error": res.stderr[-2000:]}
    rows = json.loads(out.read_text())["all_reduce"]
    print_table(rows, LINK_COLUMNS)
    return {"all_reduce": rows}

