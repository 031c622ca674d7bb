"""A method's step inside a training run against the step benchmark's step: does the benchmark predict the run?

Each contender, in one process: its step timed by `sparsetrain_bench.steps.measure_steps` (random batches, as the
step parts time it), then a short run of the trainer itself (`training.loop.train`, the same config) on random tokens,
its step time read from the logged windows (the median window: compile and periodic work such as topology updates
stand out as slow windows and are counted apart). Ratios to dense of the same process, for both.

    PYTHONPATH=src python3 bench/step_in_training.py --preset gpt2-small --contenders dense sat mst-neuron \\
        --out $OUT/step_in_training.json
    PYTHONPATH=src python3 bench/step_in_training.py --device cpu --quick --out /tmp/s.json   # smoke test
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch._dynamo.utils import counters

from sparsetrain import config as config_mod
from sparsetrain.plots import read_metrics
from sparsetrain.training import loop
from sparsetrain.training.loop import train
from sparsetrain.training.step import train_step as step_module_train_step
from sparsetrain_bench.corpora import random_tokens
from sparsetrain_bench.profiles import gpu_busy, idle_causes
from sparsetrain_bench.runs import release_memory
from sparsetrain_bench.steps import bench_config, measure_steps, print_table, step_arguments, step_shape, write_rows
from sparsetrain_bench.suite import MST_NEURON_STEP, SAT_STEP, SSD_STEP

CONTENDERS = {
    "dense": {"name": "dense"},
    "sat": SAT_STEP,  # omission 0.5, constant
    "sat-ladder": {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5},  # the continual pre-training default (LORS)
    "mst-neuron": MST_NEURON_STEP,  # 50% from the first step
    "mst-neuron-run": {"name": "mst", "granularity": "neuron"},  # the pre-training default schedule
    "ssd-sparse": SSD_STEP,
}


def windows(run_dir: Path) -> list[tuple[int, float]]:
    """(steps, seconds) of each logged window of a run."""
    out, step, t = [], 0, 0.0
    for r in read_metrics(run_dir):
        if "train_time" in r and r["step"] > step:
            out.append((r["step"] - step, r["train_time"] - t))
            step, t = r["step"], r["train_time"]
    return out


def profile_run(cfg, run_dir: Path, out: Path, *, first: int, steps: int) -> None:
    """Train with the profiler on `steps` steps from `first` (compiled by then): their CPU operations (host time)
    and kernels as tables, a Chrome trace, and the share of the window in which the GPU ran a kernel."""
    prof = torch.profiler.profile(schedule=torch.profiler.schedule(wait=first - 1, warmup=1, active=steps, repeat=1),
                                  record_shapes=False)

    def stepped(*args, **kwargs):  # the trainer's step, with the profiler told each step's end
        result = step_module_train_step(*args, **kwargs)
        prof.step()
        return result

    with prof, mock.patch.object(loop, "train_step", stepped):
        train(cfg, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    (out / "tables.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=40) + "\n"
                                    + averages.table(sort_by="self_device_time_total", row_limit=40))
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    text = trace.read_text()
    trace.unlink()
    events = json.loads(text)["traceEvents"]
    (out / "gpu_busy.json").write_text(json.dumps({"steps": steps, **gpu_busy(events), **idle_causes(events)},
                                                  indent=1))
    with gzip.open(f"{trace}.gz", "wt") as f:
        f.write(text)


class GraphRecords(logging.Handler):
    """Counts CUDA-graph re-recordings (torch's debug log of them), keeping the first reasons."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count, self.reasons = 0, []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "Re-recording" in text:
            self.count += 1
            if len(self.reasons) < 3:
                self.reasons.append(text[:400])

    def __enter__(self):
        self.logger = logging.getLogger("torch._inductor.cudagraph_trees")
        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def run(name: str, *, preset, batch, seq, vocab, steps, warmup, device, compile_model, train_steps, data, work,
        sync_debug: bool = False, profile: Path | None = None, cuda_graphs: str = "auto"):
    method = CONTENDERS[name]
    model = {"activation": "relu2"} if method["name"] == "ssd" else None
    cfg = bench_config(preset, batch_size=batch, seq_len=seq, vocab_size=vocab, method=method, model_overrides=model)
    cfg.train.device = device.type
    cfg.train.cuda_graphs = cuda_graphs
    if profile is not None:
        (profile / name).mkdir(parents=True, exist_ok=True)
    bench = measure_steps(cfg, steps=steps, warmup=warmup, compile_model=compile_model,
                          profile_to=profile / name / "bench_table.txt" if profile is not None else None)
    release_memory()
    raw = config_mod.to_dict(cfg)
    raw["data"]["dir"] = str(data)
    raw["train"].update(steps=train_steps, log_every=10 if train_steps >= 50 else 2, eval_every=0,
                        checkpoint_every=0, warmup_steps=max(1, train_steps // 20), eval_tokens=batch * seq,
                        compile="true" if compile_model else "false")
    run_dir = work / name
    cfg = config_mod.from_dict(raw)
    if sync_debug and device.type == "cuda":  # torch warns at every operation that waits for the GPU
        torch.cuda.set_sync_debug_mode("warn")
    skips = counters["inductor"]["cudagraph_skips"]
    try:
        with GraphRecords() as records:
            if profile is None:
                train(cfg, run_dir)
            else:
                profile_run(cfg, run_dir, profile / name, first=train_steps // 2, steps=10)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    release_memory()
    w = windows(run_dir)[1:]  # the first window holds the first compilation
    per_step = [s / n for n, s in w]
    median = statistics.median(per_step)
    slow = [(n, s) for n, s in w if s / n > 1.5 * median]
    return {"contender": name, "cuda_graphs": bench["cuda_graphs"], "bench_step_ms": bench["step_s"] * 1e3,
            "bench_stream_ms": bench["stream_step_s"] * 1e3,
            "select_ms": bench["select_ms"], "fwd_bwd_ms": bench["fwd_bwd_ms"], "optimizer_ms": bench["optimizer_ms"],
            "run_median_ms": median * 1e3, "run_mean_ms": 1e3 * sum(s for _, s in w) / sum(n for n, _ in w),
            "slow_windows": len(slow), "slow_excess_s": sum(s - median * n for n, s in slow),
            "train_steps": train_steps, "run_graph_rerecords": records.count, "rerecord_reasons": records.reasons,
            "run_graph_skips": counters["inductor"]["cudagraph_skips"] - skips}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(p, preset="gpt2-small")
    p.add_argument("--vocab-size", dest="vocab", type=int, default=32768)
    p.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=["dense", "sat", "mst-neuron"])
    p.add_argument("--train-steps", type=int, default=300, help="steps of each training run")
    p.add_argument("--sync-debug", action="store_true",
                   help="warn (with the line) at every operation of the training runs that waits for the GPU")
    p.add_argument("--profile", metavar="DIR", help="profile 10 steps from the middle of each training run (tables, a "
                   "Chrome trace, the GPU's busy share) and the step benchmark's last window (a table)")
    p.add_argument("--cuda-graphs", choices=["auto", "false"], default="auto",
                   help="train.cuda_graphs of both the benchmark and the run (auto: on for one GPU)")
    p.add_argument("--out", default="bench_out/step_in_training.json")
    a = p.parse_args()
    kw = step_shape(a)
    train_steps = 8 if a.quick else a.train_steps
    names = ["dense"] + [c for c in a.contenders if c != "dense"]
    with tempfile.TemporaryDirectory(prefix="step-in-training-") as tmp:
        tokens = (train_steps + 2) * kw["batch"] * (kw["seq"] + 1) + 1
        data = random_tokens(Path(tmp) / "data", kw["vocab"], tokens, max(4096, tokens // 50))
        rows = []
        for n in names:  # each row as it comes: a call cut by its time limit keeps what finished
            r = run(n, **kw, train_steps=train_steps, data=data, work=Path(tmp) / "runs", sync_debug=a.sync_debug,
                    profile=Path(a.profile) if a.profile else None, cuda_graphs=a.cuda_graphs)
            r["bench_speedup"] = (rows or [r])[0]["bench_stream_ms"] / r["bench_stream_ms"]
            r["run_speedup"] = (rows or [r])[0]["run_median_ms"] / r["run_median_ms"]
            rows.append(r)
            print(json.dumps(r), flush=True)
            write_rows(rows, a.out, {"shape": {k: str(v) for k, v in kw.items()}, "train_steps": train_steps})
    print_table(rows, [("contender", "contender", ""), ("bench_step_ms", "bench step ms (synced)", ".1f"),
                       ("bench_stream_ms", "bench step ms (streamed)", ".1f"), ("bench_speedup", "bench speed-up", ".2f"),
                       ("run_median_ms", "run step ms (median window)", ".1f"),
                       ("run_speedup", "run speed-up", ".2f"), ("run_mean_ms", "run mean ms", ".1f"),
                       ("slow_windows", "slow windows", "d"), ("slow_excess_s", "their excess s", ".1f")])


if __name__ == "__main__":
    main()
