"""The training loop: one device or many (torchrun), dense or any method, resumable exactly.

Order of work each optimizer step (see methods/base.py for the method hooks):
    method.before_step -> micro-batches (forward, backward) -> clip -> method.before_optimizer
    -> optimizer.step -> method.after_optimizer -> log / evaluate / checkpoint
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from . import config as config_mod
from .checkpoint import (find_weights, list_checkpoints, load_checkpoint, load_weights, save_checkpoint,
                         set_rng_state)
from .config import RunConfig
from .data import BatchLoader, TokenData, eval_windows
from .errors import UserError
from .methods import Method, build_method
from .model import ModelArgs, Transformer, resolve
from .progress import progress_bar

# bf16 dense peak per GPU, for MFU (datasheet numbers, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype (fp32 = no autocast)
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def setup_runtime(tcfg) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = tcfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = cuda but no GPU is visible; use train.device = auto or cpu")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    if tcfg.dtype == "bf16" or (tcfg.dtype == "auto" and use_cuda):
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, dtype=dtype, rank=rank, world=world, local_rank=local_rank)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def lr_at(step: int, tcfg) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step. `step` counts from 0."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    span = max(1, tcfg.steps - tcfg.warmup_steps)
    progress = min(1.0, (step - tcfg.warmup_steps) / span)
    min_lr = tcfg.lr * tcfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tcfg.lr - min_lr)


def make_optimizer(model: torch.nn.Module, tcfg, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                             fused=device.type == "cuda")


def build_model(cfg: RunConfig, vocab_size: int | None) -> tuple[Transformer, Method, ModelArgs]:
    """The model with the method's structure applied (weights random)."""
    args = resolve(cfg.model, vocab_size)
    if cfg.train.seq_len > args.max_seq_len:
        raise UserError(f"train.seq_len={cfg.train.seq_len} exceeds the model's max_seq_len={args.max_seq_len}; "
                        "lower train.seq_len or raise model.max_seq_len")
    method = build_method(cfg.method, args, cfg.train.seq_len)
    model = Transformer(args)
    method.setup(model)
    return model, method, args


def load_model(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] = ()
               ) -> tuple[Transformer, Method, RunConfig]:
    """A trained model from a run folder (latest checkpoint), checkpoint folder or model folder."""
    cfg_path, weights = find_weights(path)
    cfg = config_mod.load(cfg_path, overrides)
    model, method, _ = build_model(cfg, None)
    load_weights(model, load_file(str(weights)), str(weights.parent))
    return model.to(device), method, cfg


class TrainingData:
    """The batches a run trains and evaluates on: pre-training token shards, or packed SFT rows (loss on
    responses only) when the data folder's meta.json says `kind = "sft"`."""

    def __init__(self, data_dir: str | Path, tcfg):
        meta_file = Path(data_dir) / "meta.json"
        self.sft = meta_file.is_file() and json.loads(meta_file.read_text()).get("kind") == "sft"
        self.dir, self.tcfg = Path(data_dir), tcfg
        self.val_rows = None
        if self.sft:
            from .sft import SFTLoader

            self.loader = SFTLoader(data_dir, "train", tcfg.batch_size, seed=tcfg.seed, seq_len=tcfg.seq_len)
            self.vocab_size = json.loads(meta_file.read_text())["vocab_size"]
        else:
            self.tokens = TokenData(data_dir)
            # Every process draws the same global batch and takes its rows: one GPU or many, any micro-batching,
            # the model sees the same tokens.
            self.loader = BatchLoader(self.tokens.train, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
            self.vocab_size = self.tokens.vocab_size

    def eval_batches(self, batch_size: int, max_tokens: int):
        """The same validation batches every call."""
        if self.sft:
            if self.val_rows is None:  # read once, evaluated many times
                from .sft import SFTLoader

                self.val_rows = SFTLoader(self.dir, "val", batch_size, seq_len=self.tcfg.seq_len)
            return self.val_rows.eval_batches(batch_size, max_tokens)
        return eval_windows(self.tokens.val, batch_size, self.tcfg.seq_len, max_tokens)


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


def parallelize(model: Transformer, rt: Runtime, tcfg, compile_model: bool) -> torch.nn.Module:
    """Wrap for several processes (DDP or FSDP2) and compile; the raw model stays what methods see."""
    if compile_model:
        from torch import _dynamo

        # Methods change shapes and attributes between steps (kept subsets, phases): allow a few graphs.
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    if rt.distributed and tcfg.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            if compile_model:
                block.compile()
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if compile_model:
        model.compile()
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


def no_grad_sync(wrapped: torch.nn.Module, model: Transformer, rt: Runtime, tcfg, last: bool):
    """Skip the gradient all-reduce (FSDP2: reduce-scatter) on all but the last micro-batch of an accumulation."""
    if not rt.distributed:
        return contextlib.nullcontext()
    if tcfg.parallel == "fsdp":
        # A flag, not a context: it must be on again before the last backward, or nothing is reduced this step.
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else wrapped.no_sync()


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


def model_state(model: torch.nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    if rt.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def optimizer_state(model: torch.nn.Module, optimizer, rt: Runtime) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=rt.distributed))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


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


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train per `cfg` into `out_dir`; returns a summary (final step, losses, timing, FLOPs)."""
    out_dir = Path(out_dir)
    tcfg = cfg.train
    # Everything that can fail on user input is checked before anything is written.
    check_run_dir(out_dir, resume)
    rt = setup_runtime(tcfg)
    data = TrainingData(cfg.data.dir, tcfg)
    micro = tcfg.micro_batch_size or tcfg.batch_size // rt.world
    if micro <= 0 or tcfg.batch_size % (micro * rt.world):
        raise UserError(f"train.batch_size={tcfg.batch_size} is not a multiple of micro_batch_size x processes "
                        f"({micro} x {rt.world}); change train.batch_size or train.micro_batch_size")
    accum = tcfg.batch_size // (micro * rt.world)
    torch.manual_seed(tcfg.seed)
    model, method, args = build_model(cfg, data.vocab_size)
    if args.vocab_size < data.vocab_size:
        raise UserError(f"model.vocab_size={args.vocab_size} is smaller than the data's vocabulary "
                        f"({data.vocab_size}); remove model.vocab_size or raise it")
    cfg.model.vocab_size = args.vocab_size  # saved with the run, so the model can be rebuilt without the data
    if tcfg.init_from and not resume:
        _, weights = find_weights(tcfg.init_from)
        method.init_weights(model, load_file(str(weights)), tcfg.init_from)
    loader = data.loader

    # A resumed run's weights go in before sharding (FSDP2 shards the tensors it finds); its optimizer state after.
    state = load_checkpoint(list_checkpoints(out_dir)[-1]) if resume else None
    if state is not None:
        load_weights(model, state["model"], "in " + str(out_dir))
    model.to(rt.device)
    compile_model = tcfg.compile == "true" or (tcfg.compile == "auto" and rt.device.type == "cuda")
    wrapped = parallelize(model, rt, tcfg, compile_model)
    optimizer = make_optimizer(model, tcfg, rt.device)
    method.total_steps = tcfg.steps
    method.tokens_per_step = tcfg.batch_size * tcfg.seq_len  # for methods with per-check overheads (SSD)

    start_step, flops_done, train_time, tokens_done = 0, 0.0, 0.0, 0
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
        method.load_state_dict(state["method"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        flops_done, train_time, tokens_done = state["flops"], state["train_time"], state["tokens"]
        if rt.main:  # drop what was logged after the checkpoint: those steps are trained again
            metrics = out_dir / "metrics.jsonl"
            if metrics.exists():
                kept = [l for l in metrics.read_text().splitlines() if l and json.loads(l)["step"] <= start_step]
                metrics.write_text("".join(l + "\n" for l in kept))
    elif rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(config_mod.dumps(config_mod.to_dict(cfg)))
    method.start(model, optimizer)

    log = MetricsLog(out_dir, rt.main)
    peak = peak_flops(rt.device)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    if rt.main:
        n = sum(p.numel() for p in model.parameters())
        print(f"model {cfg.model.preset} ({args.family}, {n / 1e6:.1f}M parameters), method {method.name}, "
              f"{rt.world} x {rt.device.type}, {tokens_per_step} tokens/step, {accum} accumulation step(s)")
    bar = progress_bar(total=tcfg.steps, initial=start_step, disable=not (tcfg.progress and rt.main), unit="step")
    last_loss, last_val = float("nan"), None
    window_time, window_tokens, window_flops = 0.0, 0, 0.0
    loss_sum = torch.zeros((), device=rt.device)
    loss_count = 0
    wrapped.train()
    for step in range(start_step, tcfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, tcfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        method.before_step(step)
        step_loss = torch.zeros((), device=rt.device)
        xs, ys = loader.next_batch()
        mine = slice(rt.rank * micro * accum, (rt.rank + 1) * micro * accum)
        for i, (x, y) in enumerate(zip(xs[mine].split(micro), ys[mine].split(micro))):
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            with no_grad_sync(wrapped, model, rt, tcfg, last=i == accum - 1), rt.autocast():
                loss = wrapped(x, y)
                aux = method.aux_loss(model)
                total = loss if aux is None else loss + aux
            (total / accum).backward()
            step_loss += loss.detach() / accum
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        method.before_optimizer(step)
        optimizer.step()
        method.after_optimizer(step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum += step_loss
        loss_count += 1
        step_flops = method.flops_per_token(step) * tokens_per_step
        flops_done += step_flops
        tokens_done += tokens_per_step
        window_flops += step_flops
        window_tokens += tokens_per_step
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
        train_time += dt
        window_time += dt
        if is_log or is_eval:
            record: dict[str, Any] = {
                "step": done, "loss": last_loss, "lr": lr,
                "tokens_per_s": window_tokens / window_time, "flops": flops_done, "tokens": tokens_done,
                "train_time": train_time,
            }
            if peak:
                record["mfu"] = window_flops / window_time / rt.world / peak
            record.update(method.metrics(step))
            if is_eval:
                last_val = evaluate(wrapped, data, tcfg, rt, method)
                record["val_loss"] = last_val
            log.write(record)
            postfix = {"loss": f"{last_loss:.3f}", "tok/s": f"{record['tokens_per_s']:.3g}"}
            if peak:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            if last_val is not None:
                postfix["val"] = f"{last_val:.3f}"
            bar.set_postfix(postfix, refresh=False)
            window_time, window_tokens, window_flops = 0.0, 0, 0.0
        if is_ckpt:
            m_state = model_state(model, rt)
            o_state = optimizer_state(model, optimizer, rt)
            if rt.main:
                save_checkpoint(out_dir, done, model_state=m_state, optim_state=o_state,
                                method_state=method.state_dict(),
                                extra={"loader": loader.state_dict(), "flops": flops_done, "train_time": train_time,
                                       "tokens": tokens_done},
                                keep=tcfg.keep_checkpoints)
            if rt.distributed:
                dist.barrier()
        bar.update(1)
    bar.close()
    log.close()
    summary = {"steps": tcfg.steps, "loss": last_loss, "val_loss": last_val, "train_time": train_time,
               "flops": flops_done, "tokens": tokens_done, "run_dir": str(out_dir)}
    if rt.main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
