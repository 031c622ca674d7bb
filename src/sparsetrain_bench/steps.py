"""Step-speed benchmarks on the GPU: the training step of the trainer, timed side by side in one process.

`measure_steps` builds a model and method through the trainer's own path (build_model, make_optimizer,
parallelize) and times the trainer's own step (`training.step.train_step`) on random tokens with CUDA events after
warm-up.
Every benchmark compares contenders measured in the same call and reports ratios to dense.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sparsetrain import config as config_mod
from sparsetrain.methods import RunInfo
from sparsetrain.nn.model import flops_per_token
from sparsetrain.plots import markdown_table
from sparsetrain.training.build import build_model, make_optimizer
from sparsetrain.training.runtime import parallelize, peak_flops, setup_runtime
from sparsetrain.training.step import StepParts, train_step


def measure_steps(cfg: config_mod.RunConfig, *, steps: int = 30, warmup: int = 10,
                  compile_model: bool = True) -> dict[str, Any]:
    """Median time of one optimizer step (batch_size x seq_len tokens, one device) for `cfg`."""
    tcfg = cfg.train
    rt = setup_runtime(tcfg)
    torch.manual_seed(tcfg.seed)
    model, method, args = build_model(cfg, None)
    model.to(rt.device)
    wrapped = parallelize(model, rt, tcfg, compile_model)
    optimizer = make_optimizer(model, tcfg, rt.device)
    method.start(model, optimizer, RunInfo(total_steps=warmup + steps, tokens_per_step=tcfg.batch_size * tcfg.seq_len))
    parts = StepParts(model, wrapped, method, optimizer, tcfg.grad_clip, rt.autocast)
    micro = tcfg.micro_batch_size or tcfg.batch_size
    accum = tcfg.batch_size // micro
    gen = torch.Generator(device=rt.device).manual_seed(0)

    def random_micro_batches():
        for _ in range(accum):
            x = torch.randint(0, args.vocab_size, (micro, tcfg.seq_len + 1), device=rt.device, generator=gen)
            yield x[:, :-1], x[:, 1:]

    def one_step(step: int) -> None:
        train_step(parts, step, random_micro_batches(), accum)

    cuda = rt.device.type == "cuda"
    t_compile = time.perf_counter()
    for s in range(warmup):
        one_step(s)
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t_compile
    times, flops = [], []
    for s in range(warmup, warmup + steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            one_step(s)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            one_step(s)
            times.append(time.perf_counter() - t0)
        flops.append(method.flops_per_token(s))
    step_s = statistics.median(times)
    tokens = tcfg.batch_size * tcfg.seq_len
    dense_fpt = 3 * sum(flops_per_token(args, tcfg.seq_len).values())
    peak = peak_flops(rt.device)
    out = {
        "preset": cfg.model.preset, "method": method.name, "params": sum(p.numel() for p in model.parameters()),
        "batch_size": tcfg.batch_size, "micro_batch_size": micro, "seq_len": tcfg.seq_len, "step_s": step_s,
        "step_s_min": min(times), "step_s_max": max(times), "tokens_per_s": tokens / step_s,
        "flops_per_token": statistics.mean(flops), "dense_flops_per_token": dense_fpt, "warmup_s": warmup_s,
        "memory_gb": torch.cuda.max_memory_allocated(rt.device) / 1e9 if cuda else None,
    }
    # MFU counts the model's dense FLOPs (6N + 12LdT); "hfu_method" the FLOPs the method actually computed.
    if peak:
        out["mfu"] = dense_fpt * tokens / step_s / peak
        out["mfu_method"] = out["flops_per_token"] * tokens / step_s / peak
    del parts, wrapped, model, optimizer
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)
    return out


def median_ms(fn, *, warmup: int = 3, iters: int = 20, cuda: bool | None = None) -> float:
    """Median milliseconds of `fn()` over `iters` calls after `warmup`: CUDA events around each call on a GPU
    (`cuda` defaults to whether one is present), perf_counter on the CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_config(preset: str, *, batch_size: int, seq_len: int, vocab_size: int, micro_batch_size: int = 0,
                 method: dict | None = None, model_overrides: dict | None = None) -> config_mod.RunConfig:
    raw = {
        "model": {"preset": preset, "vocab_size": vocab_size, **(model_overrides or {})},
        "train": {"batch_size": batch_size, "micro_batch_size": micro_batch_size, "seq_len": seq_len,
                  "progress": False},
        "method": method or {"name": "dense"},
    }
    return config_mod.from_dict(raw)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format). Prints the Markdown table the report writes, and returns it."""
    text = markdown_table(rows, columns)
    print(text)
    return text


def write_rows(rows: list[dict[str, Any]], out: str | Path, meta: dict[str, Any] | None = None) -> None:
    """The raw numbers of a benchmark, with the environment they were taken in (and the benchmark's own settings,
    `meta`)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": environment(), **({"meta": meta} if meta else {}), "rows": rows}, indent=2))
    print(f"raw numbers: {path}")


def environment() -> dict[str, Any]:
    env = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def run_method_bench(presets: list[str], methods: list[dict[str, Any]], *, batch_size: int, seq_len: int,
                     steps: int, vocab_size: int, out: str, micro_batch_size: int = 0, compile_model: bool = True,
                     model_overrides: dict | None = None) -> list[dict[str, Any]]:
    """Dense and each of `methods` on the same model and batch, one after the other in this process; ratios to
    dense."""
    rows = []
    for preset in presets:
        dense_step = None
        for contender in [{"name": "dense"}, *methods]:
            cfg = bench_config(preset, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=seq_len,
                               vocab_size=vocab_size, model_overrides=model_overrides, method=contender)
            r = measure_steps(cfg, steps=steps, compile_model=compile_model)
            r["method_options"] = contender
            dense_step = dense_step or r["step_s"]
            r["speedup"] = dense_step / r["step_s"]
            r["flops_ratio"] = r["dense_flops_per_token"] / r["flops_per_token"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    print_table(rows, [("preset", "model", ""), ("method", "method", ""), ("batch_size", "batch", "d"),
                       ("seq_len", "seq", "d"), ("step_s", "step s", ".4f"), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("speedup", "speed-up vs dense", ".2f"), ("flops_ratio", "FLOP reduction", ".2f"),
                       ("mfu", "MFU (dense FLOPs)", ".3f"), ("memory_gb", "mem GB", ".1f")])
    write_rows(rows, out)
    return rows


def run_dense_bench(presets: list[str], *, batch_size: int, seq_len: int, steps: int, vocab_size: int,
                    out: str, micro_batch_size: int = 0, compile_model: bool = True,
                    model_overrides: dict | None = None) -> list[dict[str, Any]]:
    rows = []
    for preset in presets:
        cfg = bench_config(preset, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=seq_len,
                           vocab_size=vocab_size, model_overrides=model_overrides)
        r = measure_steps(cfg, steps=steps, compile_model=compile_model)
        r["model_overrides"] = model_overrides or {}
        rows.append(r)
        print(json.dumps(r), flush=True)
    print_table(rows, [("preset", "model", ""), ("params", "params", ",d"), ("batch_size", "batch", "d"),
                       ("micro_batch_size", "micro", "d"),
                       ("seq_len", "seq", "d"), ("step_s", "step s", ".4f"), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("mfu", "MFU", ".3f"), ("memory_gb", "mem GB", ".1f")])
    write_rows(rows, out)
    return rows
