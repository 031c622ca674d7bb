"""Training runs of the suite's parts: a contender's config, its training and result (the curve for the report, the
metrics copied beside the part's JSON), the code base that the continuation parts share, and ratios to the baseline.

Wall-clock. The trainer's `train_time` is the time of the training steps (evaluation and checkpoints excluded) and
includes torch.compile: the first step of every run and each recompilation when a method changes shapes (SAT's
ladder, MST's neurons, SSD's phases). Those are fixed costs that a run of 100M+ tokens amortises and a
minutes-long benchmark does not, so each contender's "wall-clock" takes out the seconds that dynamo's compile
callbacks say were spent compiling for training steps (`CompileClock`), from the logging windows (10 steps) where
they were spent (`steady_times`). A method's own one-off work (statistics, re-clustering, topology updates) stays
in its time. Both numbers are in the JSON and the table ("wall-clock s" and "with compile s"); targets are judged on
the first, and the report shows the second beside it.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo import callback as dynamo_callback

from sparsetrain import config as config_mod
from sparsetrain.data.batches import TrainingData
from sparsetrain.data.tokens import TokenData
from sparsetrain.plots import read_metrics
from sparsetrain.store.checkpoint import list_checkpoints
from sparsetrain.training.build import load_model
from sparsetrain.training.loop import evaluate, train
from sparsetrain.training.runtime import peak_flops, setup_runtime
from sparsetrain_bench.context import Context, scratch_dir
from sparsetrain_bench.corpora import corpus_dir, sft_dir
from sparsetrain_bench.report import SCHEDULE_KEYS
from sparsetrain_bench.steps import bench_config, measure_steps

SEED = 1337
BASE_STEPS = 2000  # the code base of the continuation parts: 32.8M tokens
# A suite run checkpoints every CHECKPOINT_STEPS steps (--quick: twice) and keeps two: a call cut by its time limit
# continues there in the next (--resume), and the run folder says what it trained (RUN_FILE: its config; COMPILE_FILE:
# its compilations so far).
CHECKPOINT_STEPS = 1000
RUN_FILE, COMPILE_FILE = "suite_run.json", "compile_clock.json"
CALIBRATION_VOCAB = 32768  # the suite tokenizer's: the calibration is the same job on every GPU
CURVE_KEYS = ("step", "tokens", "flops", "train_time", "wallclock", "loss", "val_loss", "mfu", *SCHEDULE_KEYS)


def _records_inference_graph() -> bool:
    """Whether the CUDA graph being recorded is an inference graph (an evaluation's, compiled under no_grad).

    The callback does not say; torch's graph trees know each compiled function's mode, and the recording frame
    (`CUDAGraphTreeManager.record_function`) holds the function. Not found: counted as training."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "record_function" and "function_id" in frame.f_locals:
            modes = getattr(frame.f_locals.get("self"), "id_to_mode", {})
            mode = modes.get(frame.f_locals["function_id"])
            return getattr(mode, "name", None) == "INFERENCE"
        frame = frame.f_back
    return False


class CompileClock:
    """Seconds torch.compile spends compiling for training steps, from dynamo's compile callbacks.

    A compilation counts when it starts with grad enabled (a training forward) or is a deferred backward; those
    under no_grad are for evaluation, which the trainer's `train_time` leaves out already. With CUDA graphs
    (`train.cuda_graphs`) the recording of each new graph is compiling too (the callbacks report it); grad is
    disabled while a training graph records (inside autograd), so a recording counts unless its graph is an
    inference graph (an evaluation's). `recording_seconds` holds their part of `seconds`.
    """

    def __init__(self, path: Path | None = None, seconds: float = 0.0, count: int = 0,
                 recording_seconds: float = 0.0):
        """`path`: a file the running totals are written to after each compilation (a run cut short keeps them);
        `seconds`, `count`, `recording_seconds`: the totals of the run's earlier segments (a resumed run)."""
        self.path, self.seconds, self.count, self.recording_seconds = path, seconds, count, recording_seconds

    def __enter__(self) -> "CompileClock":
        self._started = None
        self._handler = dynamo_callback.callback_handler
        triggers = dynamo_callback.CallbackTrigger
        self._lazy_backward = triggers.LAZY_BACKWARD
        self._recording = getattr(triggers, "CUDAGRAPH_RECORDING", None)
        self._handler.register_start_callback(self._start)
        self._handler.register_end_callback(self._end)
        return self

    def _start(self, args) -> None:
        training = (args.callback_trigger == self._lazy_backward or torch.is_grad_enabled()
                    or (args.callback_trigger == self._recording and not _records_inference_graph()))
        self._started = time.perf_counter() if training else None

    def _end(self, args) -> None:
        if self._started is not None:
            spent = time.perf_counter() - self._started
            self.seconds += spent
            self.count += 1
            if args.callback_trigger == self._recording:
                self.recording_seconds += spent
            self._started = None
            if self.path is not None and self.path.parent.is_dir():
                self.path.write_text(json.dumps({"seconds": self.seconds, "count": self.count,
                                                 "recording_seconds": self.recording_seconds}))

    @classmethod
    def saved(cls, path: Path) -> dict[str, float]:
        """The totals a clock wrote to `path` (none: zero)."""
        return json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "count": 0}

    def __exit__(self, *exc) -> None:
        self._handler.remove_start_callback(self._start)
        self._handler.remove_end_callback(self._end)


def steady_times(records: list[dict[str, Any]], compile_s: float, spike: float = 2.0) -> list[float]:
    """Cumulative training time at each record with `compile_s` seconds of compilation taken out where it was spent.

    Compilation shows as logging windows (between consecutive records) whose per-step time is over `spike` x the
    median per-step time of the next three windows. Their excess over that median is taken out, scaled down so that
    no more than `compile_s` is taken out in all: a method's own one-off work (re-clustering, topology updates)
    stays in its time.
    """
    steps = [0] + [r["step"] for r in records]
    times = [0.0] + [r["train_time"] for r in records]
    n = [steps[i + 1] - steps[i] for i in range(len(records))]
    spent = [times[i + 1] - times[i] for i in range(len(records))]
    excess = []
    for i in range(len(records)):
        after = [spent[j] / n[j] for j in range(i + 1, min(i + 4, len(records)))]
        ref = statistics.median(after) if after else spent[i] / n[i]
        excess.append(max(0.0, spent[i] - ref * n[i]) if spent[i] > spike * ref * n[i] else 0.0)
    total = sum(excess)
    scale = min(1.0, compile_s / total) if total > 0 else 0.0
    out, t = [], 0.0
    for s, e in zip(spent, excess):
        t += s - e * scale
        out.append(t)
    return out


def release_memory() -> None:
    """Between runs: drop compiled graphs (every contender compiles from cold) and free cached GPU memory."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_config(ctx: Context, *, corpus: str, steps: int, method: dict | None = None, model: dict | None = None,
               init_from: str = "", seed: int = SEED, lr: float = 6e-4, evals: int = 4,
               seq_len: int | None = None, batch_size: int | None = None) -> dict[str, Any]:
    s = ctx.shape
    return {
        "model": {"preset": s.preset, **(model or {})},
        "data": {"dir": str(sft_dir(ctx) if corpus == "sft" else corpus_dir(ctx, corpus))},
        "train": {"steps": steps, "batch_size": batch_size or s.batch_size, "lr": lr,
                  "seq_len": seq_len or (s.sft_seq_len if corpus == "sft" else s.seq_len),
                  "warmup_steps": max(1, steps // 20), "eval_every": steps // evals if evals else 0,
                  "eval_tokens": s.eval_tokens, "keep_checkpoints": 2,
                  "checkpoint_every": max(1, steps // 2) if ctx.quick else CHECKPOINT_STEPS,
                  "log_every": s.log_every, "seed": seed, "device": ctx.device, "progress": False,
                  "init_from": init_from},
        "method": method or {"name": "dense"},
    }


def run_state(ctx: Context, run_dir: Path, raw: dict[str, Any]) -> str:
    """What to do with a contender's run folder: "fresh" (train from the start; a folder of another config or without
    a checkpoint is emptied), "resume" (--resume: continue from its last checkpoint) or "done" (--resume: it trained
    every step of this config)."""
    if not run_dir.exists():
        return "fresh"
    saved = run_dir / RUN_FILE
    same = ctx.resume and saved.is_file() and json.loads(saved.read_text()) == json.loads(json.dumps(raw))
    summary = run_dir / "summary.json"
    if same and summary.is_file() and json.loads(summary.read_text()).get("steps") == raw["train"]["steps"]:
        return "done"
    if same and list_checkpoints(run_dir):
        return "resume"
    if ctx.resume:
        print(f"{ctx.part}: {run_dir.name}: " + ("no checkpoint yet" if same else "another config") + ": trained again")
    shutil.rmtree(run_dir)
    return "fresh"


def read_back(ctx: Context, name: str, run_dir: Path) -> tuple[dict[str, Any], CompileClock]:
    """A run finished in an earlier call (--resume): its summary and its compilation totals."""
    print(f"{ctx.part}: {name}: finished in an earlier call, read back", flush=True)
    return (json.loads((run_dir / "summary.json").read_text()),
            CompileClock(**CompileClock.saved(run_dir / COMPILE_FILE)))


def train_run(ctx: Context, name: str, raw: dict[str, Any], role: str = "contender",
              run_dir: Path | None = None) -> dict[str, Any]:
    """Train one contender in the part's scratch folder (or `run_dir`); its result with the curve for the report.
    With --resume a finished run is read back and a cut one continues from its last checkpoint (its compilations
    summed over its segments)."""
    run_dir = run_dir or ctx.work / ctx.part / name
    cfg = config_mod.from_dict(raw)
    state = run_state(ctx, run_dir, raw)
    clock_file = run_dir / COMPILE_FILE
    if state == "done":
        summary, clock = read_back(ctx, name, run_dir)
    else:
        print(f"{ctx.part}: training {name} ({cfg.method['name']}, {cfg.train.steps} steps"
              + (", resumed" if state == "resume" else "") + ")", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_FILE).write_text(json.dumps(raw))
        prior = CompileClock.saved(clock_file) if state == "resume" else {}
        with CompileClock(clock_file, **prior) as clock:
            summary = train(cfg, run_dir, resume=state == "resume")
    records = read_metrics(run_dir)
    for r, t in zip(records, steady_times(records, clock.seconds)):
        r["wallclock"] = t
    curve = [{k: r[k] for k in CURVE_KEYS if k in r} for r in records]
    return run_result(ctx, name, role, cfg, summary, curve, run_dir, clock.seconds, clock.count,
                      clock.recording_seconds)


def run_result(ctx: Context, name: str, role: str, cfg: config_mod.RunConfig, summary: dict[str, Any],
               curve: list[dict[str, Any]], run_dir: Path, compile_s: float, compilations: int,
               recording_s: float) -> dict[str, Any]:
    """A trained run's result for the part's JSON and the report (its metrics copied beside the JSON); frees the
    run's compiled graphs and GPU memory. `recording_s`: the part of `compile_s` spent recording CUDA graphs."""
    metrics = keep_metrics(ctx, name, run_dir)
    release_memory()
    result = {
        "name": name, "role": role, "corpus": Path(cfg.data.dir).name, "method": cfg.method["name"],
        "config": config_mod.to_dict(cfg), "summary": summary, "steps": summary["steps"],
        "tokens": summary["tokens"], "val_loss": summary["val_loss"], "train_time": summary["train_time"],
        "wallclock": curve[-1]["wallclock"], "compile_s": compile_s, "compilations": compilations,
        "graph_recording_s": recording_s,
        "flops": summary["flops"], "curve": curve, "metrics": metrics, "run_dir": str(run_dir),
    }
    print(f"{ctx.part}: {name}: val loss {result['val_loss']:.4f}, {result['wallclock']:.1f} s "
          f"({result['train_time']:.1f} s with compilation)", flush=True)
    return result


def keep_metrics(ctx: Context, name: str, run_dir: Path) -> str:
    """Copy a run's metrics, summary and config beside the part's JSON (OUT/PART/NAME/); the metrics' path there,
    relative to OUT (what a result's "metrics" holds)."""
    kept = ctx.out / ctx.part / name
    kept.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "summary.json", "config.toml"):
        shutil.copy2(run_dir / f, kept / f)
    return str((kept / "metrics.jsonl").relative_to(ctx.out))


def code_base(ctx: Context) -> dict[str, Any]:
    """The dense model on code that sat-cpt, sat-sft and upcycle continue from, trained once per work folder: the
    next of those parts in the same call (same config, seed, data and scale) reuses it instead of training it again
    (WORK/base-code/, outside the parts' own scratch folders)."""
    raw = run_config(ctx, corpus="code", steps=ctx.steps(BASE_STEPS, 24), evals=0)
    # The same config on the same tokens: a corpus prepared again at the same path is another base.
    asked = {"config": raw, "data": TokenData(corpus_dir(ctx, "code")).meta.get("sha256")}
    folder = ctx.work / "base-code"
    saved = folder / "result.json"
    if saved.is_file():
        result, asked = json.loads(saved.read_text()), json.loads(json.dumps(asked))
        if result["asked"] == asked and Path(result["run_dir"]).is_dir():
            print(f"{ctx.part}: reusing the code base of {result['part']} ({result['run_dir']})", flush=True)
            result["metrics"] = keep_metrics(ctx, "base", Path(result["run_dir"]))
            return result | {"reused": True}
    scratch_dir(folder, empty=not ctx.resume)  # --resume: a base a call's limit cut continues
    result = train_run(ctx, "base", raw, role="base", run_dir=folder / "run") | {"part": ctx.part, "asked": asked}
    saved.write_text(json.dumps(result))
    return result


def part_peak(ctx: Context) -> float | None:
    return peak_flops(torch.device("cuda")) if ctx.cuda else None


def calibrate(ctx: Context) -> dict[str, Any]:
    """The GPU's speed on a fixed job, for contenders of one comparison trained on different GPUs at once: the dense
    step of the part's model and shape, eager (no compile to pay for), median of 30 steps. A method trained on
    another GPU is put in the frontier's GPU time by the ratio of the two calibrations (`isoloss.merge_split`)."""
    s = ctx.shape
    cfg = bench_config(s.preset, batch_size=s.batch_size, seq_len=s.seq_len, vocab_size=CALIBRATION_VOCAB,
                       method={"name": "dense"})
    cfg.train.device = ctx.device
    r = measure_steps(cfg, steps=3 if ctx.quick else 30, warmup=1 if ctx.quick else 5, compile_model=False)
    release_memory()
    gpu = torch.cuda.get_device_name() if ctx.cuda else "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    print(f"{ctx.part}: calibration on {gpu} (CUDA_VISIBLE_DEVICES={visible or 'unset'}): dense {s.preset} eager "
          f"step {1000 * r['step_s']:.1f} ms", flush=True)
    return {"step_s": r["step_s"], "preset": s.preset, "device": gpu, "cuda_visible_devices": visible,
            "compiled": False, "steps": 3 if ctx.quick else 30}


def eval_run(run_dir: str, data: Path) -> float:
    """Validation loss of a trained run on a prepared folder's held-out set (the same tokens the contenders see)."""
    model, method, cfg = load_model(run_dir)
    rt = setup_runtime(cfg.train)
    model.to(rt.device)
    meta = json.loads((data / "meta.json").read_text())
    if meta.get("kind") == "sft":
        cfg.train.seq_len = meta["seq_len"]  # fine-tuning rows have their own length
    loss = evaluate(model, TrainingData(data, cfg.train), cfg.train, rt, method)
    del model
    release_memory()
    return loss


def start_point(c: dict[str, Any], val_loss: float) -> None:
    """Put the starting model's validation loss at zero time and FLOPs at the head of a continuation's curve."""
    c["curve"].insert(0, {"step": 0, "tokens": 0, "flops": 0.0, "train_time": 0.0, "wallclock": 0.0,
                          "val_loss": val_loss})
