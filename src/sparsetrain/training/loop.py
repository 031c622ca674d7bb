"""The training loop: one device or many (torchrun), dense or any method, resumable exactly. Each optimizer step is
`step.train_step` (the method's hooks, micro-batches, clipping, the optimizer); around it the loop draws the batch,
sets the learning rate, and logs, evaluates and checkpoints on their schedules. A run holds its folder's lock
(`lock.py`), resumes from the newest intact checkpoint (a damaged newer one is set aside with a warning), and stops
at a non-finite loss before logging or saving anything from it (or skips such steps: train.on_nonfinite)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparsetrain.config import RunConfig
from sparsetrain.data.batches import TrainingData
from sparsetrain.errors import UserError
from sparsetrain.methods import Method, RunInfo
from sparsetrain.progress import progress_bar
from sparsetrain.store.checkpoint import (find_weights, list_checkpoints, load_latest_intact, load_weights,
                                          read_tensors, save_checkpoint, set_aside, set_rng_state)
from sparsetrain.training.build import build_model, make_optimizer
from sparsetrain.training.lock import RunLock
from sparsetrain.training.records import MetricsLog, keep_metrics_until, warn, write_config, write_summary
from sparsetrain.training.runtime import (Runtime, load_optimizer_state, model_state, no_grad_sync, optimizer_state,
                                          parallelize, peak_flops, setup_runtime, use_cuda_graphs)
from sparsetrain.training.step import StepParts, StepResult, train_step


def decay_start(tcfg) -> int:
    """The first step (counting from 0) of a "wsd" schedule's decay: steps - max(1, round(decay_fraction * steps))
    (Python's round: halves to even), and not before warm-up ends. A checkpoint `step_N` holds N trained steps, so
    the checkpoint at decay_start has trained only warm-up and stable steps."""
    return max(tcfg.warmup_steps, tcfg.steps - max(1, round(tcfg.decay_fraction * tcfg.steps)))


def lr_at(step: int, tcfg) -> float:
    """The learning rate of step `step` (counting from 0): a pure function of the step and train config.

    Both schedules warm up linearly: lr * (step + 1) / warmup_steps for step < warmup_steps. Then
    "cosine": min_lr + (lr - min_lr) * (1 + cos(pi * (step - warmup_steps) / (steps - warmup_steps))) / 2, where
    min_lr = lr * min_lr_ratio (it reaches min_lr at `steps`, one past the last step);
    "wsd": lr until decay_start(tcfg) = D, then min_lr + (lr - min_lr) * (steps - 1 - step) / (steps - D): every
    one of the steps - D decay steps is below lr and the last step (steps - 1) trains at exactly min_lr. Before D
    the value does not depend on train.steps (D never falls inside warm-up, and grows with steps), so runs that
    differ only in train.steps train the same steps up to the smaller run's D."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    min_lr = tcfg.lr * tcfg.min_lr_ratio
    if tcfg.schedule == "wsd":
        start = decay_start(tcfg)
        if step < start:
            return tcfg.lr
        return min_lr + (tcfg.lr - min_lr) * max(0, tcfg.steps - 1 - step) / max(1, tcfg.steps - start)
    span = max(1, tcfg.steps - tcfg.warmup_steps)
    progress = min(1.0, (step - tcfg.warmup_steps) / span)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tcfg.lr - min_lr)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TrainingData, tcfg, rt: Runtime, method: Method | None = None,
             max_tokens: int | None = None) -> float:
    """Mean cross-entropy over the target tokens of the validation batches (the same every time)."""
    was_training = model.training
    model.eval()
    if method is not None:
        method.before_eval()
    micro = tcfg.micro_batch_size or max(1, tcfg.batch_size // rt.world)
    total, count = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device)
    for x, y in data.eval_batches(micro, max_tokens or tcfg.eval_tokens):
        x, y = x.to(rt.device), y.to(rt.device)
        torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are all read (CUDA graphs)
        with rt.autocast():
            loss = model(x, y)
        n = (y != -100).sum()  # SFT targets without loss are -100
        total += loss.float() * n
        count += n
    if method is not None:
        method.after_eval()
    model.train(was_training)
    return (total / count).item()


def check_run_dir(out_dir: Path, resume: bool) -> None:
    has_run = (out_dir / "config.toml").exists() or (out_dir / "metrics.jsonl").exists() or list_checkpoints(out_dir)
    if resume:
        if not (out_dir / "config.toml").exists():
            raise UserError(f"--resume: {out_dir} holds no run (no config.toml); start it without --resume")
        if not list_checkpoints(out_dir):
            raise UserError(f"--resume: {out_dir} has no complete checkpoint yet; start it again without --resume "
                            "into a new --out")
    elif has_run:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it, or choose a new --out")


@dataclass
class Totals:
    """What the run has done so far; checkpoints carry it."""
    flops: float = 0.0
    train_time: float = 0.0  # seconds of training steps (evaluation and checkpoints excluded)
    tokens: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient (train.on_nonfinite = "skip")


def micro_batching(tcfg, world: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step on each process)."""
    micro = tcfg.micro_batch_size or tcfg.batch_size // world
    if micro <= 0 or tcfg.batch_size % (micro * world):
        raise UserError(f"train.batch_size={tcfg.batch_size} is not a multiple of micro_batch_size x processes "
                        f"({micro} x {world}); change train.batch_size or train.micro_batch_size")
    return micro, tcfg.batch_size // (micro * world)


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train per `cfg` into `out_dir`; returns a summary (final step, losses, timing, FLOPs). The run folder is
    locked for the run's life (one writer); everything that can fail on user input fails before anything is
    written."""
    out_dir = Path(out_dir)
    # Under torchrun the rank-0 process holds the lock for its launch (RANK is set before the process group).
    main_process = int(os.environ.get("RANK", "0")) == 0
    with RunLock(out_dir) if main_process else contextlib.nullcontext():
        return _train(cfg, out_dir, resume)


def _train(cfg: RunConfig, out_dir: Path, resume: bool) -> dict[str, Any]:
    tcfg = cfg.train
    check_run_dir(out_dir, resume)
    rt = setup_runtime(tcfg)
    data = TrainingData(cfg.data.dir, tcfg)
    data.check()
    micro, accum = micro_batching(tcfg, rt.world)
    compile_model = tcfg.compile == "true" or (tcfg.compile == "auto" and rt.device.type == "cuda")
    torch.manual_seed(tcfg.seed)
    model, method, args = build_model(cfg, data.vocab_size)
    if args.vocab_size < data.vocab_size:
        raise UserError(f"model.vocab_size={args.vocab_size} is smaller than the data's vocabulary "
                        f"({data.vocab_size}); remove model.vocab_size or raise it")
    cfg.model.vocab_size = args.vocab_size  # saved with the run, so the model can be rebuilt without the data
    cuda_graphs = use_cuda_graphs(tcfg, rt, compile_model, accum, method)
    if tcfg.init_from and not resume:
        _, weights = find_weights(tcfg.init_from)
        method.init_weights(model, read_tensors(weights), tcfg.init_from)

    # A resumed run's weights go in before sharding (FSDP2 shards the tensors it finds); its optimizer state after.
    state, damaged = load_latest_intact(out_dir) if resume else (None, [])
    start_step = state["step"] if state is not None else 0
    if start_step >= tcfg.steps:
        return finished(out_dir, start_step, tcfg.steps, rt.main)
    if state is not None:
        load_weights(model, state["model"], "in " + str(out_dir))
    model.to(rt.device)
    wrapped = parallelize(model, rt, tcfg, compile_model, cuda_graphs, method.static_shapes)
    optimizer = make_optimizer(model, tcfg, rt.device)
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
    method.start(model, optimizer, RunInfo(total_steps=tcfg.steps, tokens_per_step=tcfg.batch_size * tcfg.seq_len,
                                           world=rt.world, rank=rt.rank, parallel=tcfg.parallel,
                                           first_step=start_step, skip_nonfinite=tcfg.on_nonfinite == "skip"))
    totals = Totals()
    if state is not None:
        method.load_state_dict(state["method"])
        data.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        totals = Totals(*(state.get(f.name, 0) for f in fields(Totals)))
    if rt.distributed:
        dist.barrier()  # every process has read its checkpoint before the main one moves any aside
    if rt.main:  # the folder exists: the main process's RunLock made it
        for ckpt, why in damaged:
            warn(f"checkpoint {ckpt.name} is damaged ({why}); moved to {set_aside(ckpt).name}, resuming from step "
                 f"{start_step}")
        if state is not None:
            keep_metrics_until(out_dir, start_step)
        write_config(out_dir, cfg, start_step if state is not None else None)
        n = sum(p.numel() for p in model.parameters())
        print(f"model {cfg.model.preset} ({args.family}, {n / 1e6:.1f}M parameters), method {method.name}, "
              f"{rt.world} x {rt.device.type}, {tcfg.batch_size * tcfg.seq_len} tokens/step, "
              f"{accum} accumulation step(s){', CUDA graphs' if cuda_graphs else ''}")

    def agree(finite: torch.Tensor) -> torch.Tensor:
        if rt.distributed:
            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite.bool()

    parts = StepParts(model, wrapped, method, optimizer, tcfg.grad_clip, rt.autocast,
                      lambda last: no_grad_sync(wrapped, model, rt, tcfg, last), agree)
    return run_steps(parts, data, rt, tcfg, out_dir, start_step, totals, micro, accum, cuda_graphs)


def finished(out_dir: Path, step: int, steps: int, main: bool) -> dict[str, Any]:
    """A resume of a run that has trained all its steps: nothing to do, and nothing is changed."""
    if main:
        print(f"{out_dir} is finished: it trained {step} of train.steps={steps} steps; nothing to do (to train "
              f"further: --resume --set train.steps=N with N > {step})")
    summary = out_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {"steps": step, "run_dir": str(out_dir)}


def my_micro_batches(xs: torch.Tensor, ys: torch.Tensor, rt: Runtime, micro: int, accum: int):
    """This process's rows of the global batch, in micro-batches, each moved to the device when it is drawn.

    On a GPU the rows go through pinned memory: a copy from pageable memory waits for the GPU to finish all the
    work queued before it, so the host could never run ahead of the GPU (and every step's host time would show)."""
    mine = slice(rt.rank * micro * accum, (rt.rank + 1) * micro * accum)
    xs, ys = xs[mine], ys[mine]
    if rt.device.type == "cuda":
        xs, ys = xs.pin_memory(), ys.pin_memory()
    for x, y in zip(xs.split(micro), ys.split(micro)):
        yield x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)


class NonFinite:
    """Non-finite steps: with "stop", the first one's index kept on the device (read where the loss is read);
    with "skip", consecutive skips counted on the host."""

    def __init__(self, tcfg, rt: Runtime, out_dir: Path):
        self.tcfg, self.rt, self.out_dir = tcfg, rt, out_dir
        self.first = torch.full((), tcfg.steps, dtype=torch.int64, device=rt.device)  # steps = none yet
        self.in_a_row = 0

    def record(self, step: int, result: StepResult) -> None:
        if self.tcfg.on_nonfinite == "stop":
            self.first = torch.where(~result.finite & (self.first == self.tcfg.steps), step, self.first)
            return
        self.in_a_row = self.in_a_row + 1 if result.skipped else 0
        if self.in_a_row >= self.tcfg.max_nonfinite_skips:
            raise UserError(f"step {step + 1}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                            f"(train.max_nonfinite_skips={self.tcfg.max_nonfinite_skips}); stopped. "
                            f"{self.last_good()}; resume from it with a lower train.lr")

    def check(self) -> None:
        """Raise if a step since the last check was not finite (before anything is logged or saved from it)."""
        if self.tcfg.on_nonfinite != "stop":
            return
        if self.rt.distributed:
            dist.all_reduce(self.first, op=dist.ReduceOp.MIN)
        bad = int(self.first.item())
        if bad < self.tcfg.steps:
            raise UserError(f"step {bad + 1}: the loss or the gradient norm is not finite; stopped without writing "
                            f"a checkpoint from it. {self.last_good()}; resume from it (--resume) with a lower "
                            "train.lr, or set train.on_nonfinite = \"skip\"")

    def last_good(self) -> str:
        ckpts = list_checkpoints(self.out_dir)
        return f"The last good checkpoint is {ckpts[-1]}" if ckpts else "No checkpoint was written yet"


def run_steps(parts: StepParts, data: TrainingData, rt: Runtime, tcfg, out_dir: Path, start_step: int,
              totals: Totals, micro: int, accum: int, cuda_graphs: bool = False) -> dict[str, Any]:
    """Steps `start_step` .. `tcfg.steps`, with logging, evaluation and checkpoints; writes summary.json."""
    method = parts.method
    log = MetricsLog(out_dir, rt.main)
    peak = peak_flops(rt.device)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    bar = progress_bar(total=tcfg.steps, initial=start_step, disable=not (tcfg.progress and rt.main), unit="step")
    last_loss, last_val = float("nan"), None
    window = Totals()  # since the last log line
    loss_sum = torch.zeros((), device=rt.device)
    loss_count = 0
    nonfinite = NonFinite(tcfg, rt, out_dir)
    parts.forward.train()
    for step in range(start_step, tcfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, tcfg)
        xs, ys = data.loader.next_batch()
        result = train_step(parts, step, my_micro_batches(xs, ys, rt, micro, accum), accum, lr=lr,
                            skip_nonfinite=tcfg.on_nonfinite == "skip")
        nonfinite.record(step, result)
        if result.skipped:
            totals.skipped_steps += 1
        else:
            loss_sum += result.loss
            loss_count += 1
        step_flops = method.flops_per_token(step) * tokens_per_step
        for t in (totals, window):
            t.flops += step_flops
            t.tokens += tokens_per_step
        done = step + 1
        is_log = done % tcfg.log_every == 0 or done == tcfg.steps
        is_eval = (tcfg.eval_every and done % tcfg.eval_every == 0) or done == tcfg.steps
        is_ckpt = ((tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0) or done == tcfg.steps
                   or done in tcfg.checkpoint_at)
        if is_log or is_eval or is_ckpt:
            nonfinite.check()
            if rt.distributed:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            # synchronises: the window's time is now real
            last_loss = (loss_sum / loss_count).item() if loss_count else float("nan")
            loss_sum.zero_()
            loss_count = 0
        dt = time.perf_counter() - t0
        totals.train_time += dt
        window.train_time += dt
        if is_log or is_eval:
            record = {"step": done, "loss": last_loss, "lr": lr, "tokens_per_s": window.tokens / window.train_time,
                      "flops": totals.flops, "tokens": totals.tokens, "train_time": totals.train_time}
            if tcfg.on_nonfinite == "skip":
                record["skipped_steps"] = totals.skipped_steps
            if peak:
                record["mfu"] = window.flops / window.train_time / rt.world / peak
            record.update(method.metrics(step))
            if is_eval:
                last_val = record["val_loss"] = evaluate(parts.forward, data, tcfg, rt, method)
            log.write(record)
            bar.set_postfix(postfix(record, last_val), refresh=False)
            window = Totals()
        if is_ckpt:
            checkpoint(parts, rt, out_dir, done, data, totals, tcfg.keep_checkpoints)
        bar.update(1)
    bar.close()
    log.close()
    summary = {"steps": tcfg.steps, "loss": last_loss, "val_loss": last_val, "train_time": totals.train_time,
               "flops": totals.flops, "tokens": totals.tokens, "skipped_steps": totals.skipped_steps,
               "cuda_graphs": cuda_graphs, "run_dir": str(out_dir)}
    note = method.final_note()
    if note:
        summary["method_note"] = note
    if rt.main:
        write_summary(out_dir, summary)
        if note:
            print(f"note: {note}")
    return summary


def postfix(record: dict[str, Any], last_val: float | None) -> dict[str, str]:
    """The progress bar's numbers."""
    out = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.3g}"}
    if "mfu" in record:
        out["mfu"] = f"{100 * record['mfu']:.1f}%"
    if last_val is not None:
        out["val"] = f"{last_val:.3f}"
    return out


def checkpoint(parts: StepParts, rt: Runtime, out_dir: Path, done: int, data: TrainingData, totals: Totals,
               keep: int) -> None:
    """Gather the full state (every process takes part) and write it from the main process."""
    m_state = model_state(parts.model, rt)
    o_state = optimizer_state(parts.model, parts.optimizer, rt)
    if rt.main:
        save_checkpoint(out_dir, done, model_state=m_state, optim_state=o_state, method_state=parts.method.state_dict(),
                        extra={"loader": data.loader.state_dict(), **asdict(totals)}, keep=keep)
    if rt.distributed:
        dist.barrier()
