"""The training loop: one device or many (torchrun), dense or any method, resumable exactly. Each optimizer step is
`step.train_step` (the method's hooks, micro-batches, clipping, the optimizer); around it the loop draws the batch,
sets the learning rate, and logs, evaluates and checkpoints on their schedules."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from sparsetrain import config as config_mod
from sparsetrain.config import RunConfig
from sparsetrain.data.batches import TrainingData
from sparsetrain.errors import UserError
from sparsetrain.methods import Method, RunInfo
from sparsetrain.progress import progress_bar
from sparsetrain.store.checkpoint import (find_weights, list_checkpoints, load_checkpoint, load_weights,
                                          save_checkpoint, set_rng_state)
from sparsetrain.training.build import build_model, make_optimizer
from sparsetrain.training.runtime import (Runtime, load_optimizer_state, model_state, no_grad_sync, optimizer_state,
                                          parallelize, peak_flops, setup_runtime)
from sparsetrain.training.step import StepParts, train_step


def lr_at(step: int, tcfg) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step. `step` counts from 0."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    span = max(1, tcfg.steps - tcfg.warmup_steps)
    progress = min(1.0, (step - tcfg.warmup_steps) / span)
    min_lr = tcfg.lr * tcfg.min_lr_ratio
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


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard, on the main process only."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(out_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # TensorBoard is optional at run time: metrics.jsonl holds everything
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class Totals:
    """What the run has done so far; checkpoints carry it."""
    flops: float = 0.0
    train_time: float = 0.0  # seconds of training steps (evaluation and checkpoints excluded)
    tokens: int = 0


def micro_batching(tcfg, world: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step on each process)."""
    micro = tcfg.micro_batch_size or tcfg.batch_size // world
    if micro <= 0 or tcfg.batch_size % (micro * world):
        raise UserError(f"train.batch_size={tcfg.batch_size} is not a multiple of micro_batch_size x processes "
                        f"({micro} x {world}); change train.batch_size or train.micro_batch_size")
    return micro, tcfg.batch_size // (micro * world)


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train per `cfg` into `out_dir`; returns a summary (final step, losses, timing, FLOPs)."""
    out_dir = Path(out_dir)
    tcfg = cfg.train
    # Everything that can fail on user input is checked before anything is written.
    check_run_dir(out_dir, resume)
    rt = setup_runtime(tcfg)
    data = TrainingData(cfg.data.dir, tcfg)
    micro, accum = micro_batching(tcfg, rt.world)
    torch.manual_seed(tcfg.seed)
    model, method, args = build_model(cfg, data.vocab_size)
    if args.vocab_size < data.vocab_size:
        raise UserError(f"model.vocab_size={args.vocab_size} is smaller than the data's vocabulary "
                        f"({data.vocab_size}); remove model.vocab_size or raise it")
    cfg.model.vocab_size = args.vocab_size  # saved with the run, so the model can be rebuilt without the data
    if tcfg.init_from and not resume:
        _, weights = find_weights(tcfg.init_from)
        method.init_weights(model, load_file(str(weights)), tcfg.init_from)

    # A resumed run's weights go in before sharding (FSDP2 shards the tensors it finds); its optimizer state after.
    state = load_checkpoint(list_checkpoints(out_dir)[-1]) if resume else None
    if state is not None:
        load_weights(model, state["model"], "in " + str(out_dir))
    model.to(rt.device)
    compile_model = tcfg.compile == "true" or (tcfg.compile == "auto" and rt.device.type == "cuda")
    wrapped = parallelize(model, rt, tcfg, compile_model)
    optimizer = make_optimizer(model, tcfg, rt.device)
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
    start_step = state["step"] if state is not None else 0
    method.start(model, optimizer, RunInfo(total_steps=tcfg.steps, tokens_per_step=tcfg.batch_size * tcfg.seq_len,
                                           world=rt.world, rank=rt.rank, parallel=tcfg.parallel,
                                           first_step=start_step))
    totals = Totals()
    if state is not None:
        method.load_state_dict(state["method"])
        data.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        totals = Totals(state["flops"], state["train_time"], state["tokens"])
        if rt.main:  # drop what was logged after the checkpoint: those steps are trained again
            metrics = out_dir / "metrics.jsonl"
            if metrics.exists():
                kept = [l for l in metrics.read_text().splitlines() if l and json.loads(l)["step"] <= start_step]
                metrics.write_text("".join(l + "\n" for l in kept))
    elif rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(config_mod.dumps(config_mod.to_dict(cfg)))
    if rt.main:
        n = sum(p.numel() for p in model.parameters())
        print(f"model {cfg.model.preset} ({args.family}, {n / 1e6:.1f}M parameters), method {method.name}, "
              f"{rt.world} x {rt.device.type}, {tcfg.batch_size * tcfg.seq_len} tokens/step, "
              f"{accum} accumulation step(s)")
    parts = StepParts(model, wrapped, method, optimizer, tcfg.grad_clip, rt.autocast,
                      lambda last: no_grad_sync(wrapped, model, rt, tcfg, last))
    return run_steps(parts, data, rt, tcfg, out_dir, start_step, totals, micro, accum)


def my_micro_batches(xs: torch.Tensor, ys: torch.Tensor, rt: Runtime, micro: int, accum: int):
    """This process's rows of the global batch, in micro-batches, each moved to the device when it is drawn."""
    mine = slice(rt.rank * micro * accum, (rt.rank + 1) * micro * accum)
    for x, y in zip(xs[mine].split(micro), ys[mine].split(micro)):
        yield x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)


def run_steps(parts: StepParts, data: TrainingData, rt: Runtime, tcfg, out_dir: Path, start_step: int,
              totals: Totals, micro: int, accum: int) -> dict[str, Any]:
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
    parts.forward.train()
    for step in range(start_step, tcfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, tcfg)
        xs, ys = data.loader.next_batch()
        loss_sum += train_step(parts, step, my_micro_batches(xs, ys, rt, micro, accum), accum, lr=lr)
        loss_count += 1
        step_flops = method.flops_per_token(step) * tokens_per_step
        for t in (totals, window):
            t.flops += step_flops
            t.tokens += tokens_per_step
        done = step + 1
        is_log = done % tcfg.log_every == 0 or done == tcfg.steps
        is_eval = (tcfg.eval_every and done % tcfg.eval_every == 0) or done == tcfg.steps
        is_ckpt = (tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0) or done == tcfg.steps
        if is_log or is_eval or is_ckpt:
            if rt.distributed:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            last_loss = (loss_sum / loss_count).item()  # synchronises: the window's time is now real
            loss_sum.zero_()
            loss_count = 0
        dt = time.perf_counter() - t0
        totals.train_time += dt
        window.train_time += dt
        if is_log or is_eval:
            record = {"step": done, "loss": last_loss, "lr": lr, "tokens_per_s": window.tokens / window.train_time,
                      "flops": totals.flops, "tokens": totals.tokens, "train_time": totals.train_time}
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
               "flops": totals.flops, "tokens": totals.tokens, "run_dir": str(out_dir)}
    if rt.main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
