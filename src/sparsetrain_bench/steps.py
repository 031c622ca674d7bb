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
from torch.autograd import DeviceType

from sparsetrain import config as config_mod
from sparsetrain.methods import RunInfo
from sparsetrain.nn.model import flops_per_token
from sparsetrain.plots import markdown_table
from sparsetrain.training.build import build_model, make_optimizer
from sparsetrain.training.runtime import no_grad_sync, parallelize, peak_flops, setup_runtime, use_cuda_graphs
from sparsetrain.training.step import StepParts, train_step


def measure_steps(cfg: config_mod.RunConfig, *, steps: int = 30, warmup: int = 10,
                  compile_model: bool = True, window: int = 5, profile_to: str | Path | None = None) -> dict[str, Any]:
    """Time one optimizer step (batch_size x seq_len tokens per process) for `cfg`, two ways:

    `step_s`: the median of single steps, each waited for (the host's work before a step is exposed);
    `stream_step_s`: the median over windows of `window` steps run back to back, as the trainer runs them (it waits
    for the GPU only when it logs), divided by `window`.

    Under torchrun every process steps its own batch and `tokens_per_s` counts all of them. `profile_to`: a file for
    the torch profiler's tables of `window` more steps (kernels by GPU time, then ops and regions by the host's time;
    under torchrun one file per process)."""
    tcfg = cfg.train
    rt = setup_runtime(tcfg)
    torch.manual_seed(tcfg.seed)
    model, method, args = build_model(cfg, None)
    model.to(rt.device)
    micro = tcfg.micro_batch_size or tcfg.batch_size
    accum = tcfg.batch_size // micro
    cuda_graphs = use_cuda_graphs(tcfg, rt, compile_model, accum, method)
    wrapped = parallelize(model, rt, tcfg, compile_model, cuda_graphs, method.static_shapes)
    optimizer = make_optimizer(model, tcfg, rt.device)
    n_windows = max(3, steps // (2 * window))
    total = warmup + steps + (n_windows + 1) * window
    method.start(model, optimizer, RunInfo(total_steps=total, tokens_per_step=tcfg.batch_size * tcfg.seq_len,
                                           world=rt.world, rank=rt.rank, parallel=tcfg.parallel))
    parts = StepParts(model, wrapped, method, optimizer, tcfg.grad_clip, rt.autocast)
    if rt.distributed and accum > 1:
        parts.grad_sync = lambda last: no_grad_sync(wrapped, model, rt, tcfg, last)
    gen = torch.Generator(device=rt.device).manual_seed(rt.rank)

    def random_micro_batches():
        for _ in range(accum):
            x = torch.randint(0, args.vocab_size, (micro, tcfg.seq_len + 1), device=rt.device, generator=gen)
            yield x[:, :-1], x[:, 1:]

    cuda = rt.device.type == "cuda"

    def mark() -> Any:
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed(a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if cuda else b - a

    def timed(first: int, count: int, marks: list | None = None) -> float:
        """Seconds for `count` steps from `first`, run back to back; `marks` collects the phase marks."""
        start = mark()
        for s in range(first, first + count):
            on_phase = (lambda name: marks.append(mark())) if marks is not None else None
            train_step(parts, s, random_micro_batches(), accum, on_phase=on_phase)
        end = mark()
        if cuda:
            end.synchronize()
        if marks is not None:
            marks.insert(0, start)
        return elapsed(start, end)

    t_compile = time.perf_counter()
    timed(0, warmup)
    warmup_s = time.perf_counter() - t_compile
    times, flops, phases = [], [], []
    for s in range(warmup, warmup + steps):
        marks: list = []
        times.append(timed(s, 1, marks))
        phases.append([elapsed(a, b) for a, b in zip(marks, marks[1:])])
        flops.append(method.flops_per_token(s))
    first = warmup + steps
    windows = [timed(first + i * window, window) / window for i in range(n_windows)]
    step_s, stream_s = statistics.median(times), statistics.median(windows)
    if profile_to:
        with torch.profiler.profile() as prof:
            timed(first + n_windows * window, window)
        path = Path(profile_to)
        path = path.with_name(f"{path.stem}.rank{rt.rank}{path.suffix}") if rt.distributed else path
        table = prof.key_averages().table
        text = table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=80)
        if cuda:  # and where the host's time goes (the step's regions, FSDP2's hooks, the ops that launch)
            text += "\n\nBy the host's time:\n" + table(sort_by="cpu_time_total", row_limit=45)
            # The table cuts names at 55 characters; a library GEMM's name holds its tiles and layouts.
            kernels = sorted((e for e in prof.key_averages() if e.device_type == DeviceType.CUDA),
                             key=lambda e: -e.self_device_time_total)[:20]
            text += "\n\nThe 20 longest kernels, full names (us a call, calls):\n" + "\n".join(
                f"{e.self_device_time_total / max(e.count, 1):9.1f} {e.count:6d}  {e.key}" for e in kernels)
        path.write_text(text)
    tokens = tcfg.batch_size * tcfg.seq_len
    dense_fpt = 3 * sum(flops_per_token(args, tcfg.seq_len).values())
    peak = peak_flops(rt.device)
    out = {
        "preset": cfg.model.preset, "method": method.name, "params": sum(p.numel() for p in model.parameters()),
        "processes": rt.world, "parallel": tcfg.parallel if rt.distributed else None,
        "batch_size": tcfg.batch_size, "micro_batch_size": micro, "cuda_graphs": cuda_graphs, "seq_len": tcfg.seq_len,
        "step_s": step_s,
        "step_s_min": min(times), "step_s_max": max(times), "stream_step_s": stream_s,
        "tokens_per_s": rt.world * tokens / step_s, "stream_tokens_per_s": rt.world * tokens / stream_s,
        "flops_per_token": statistics.mean(flops), "dense_flops_per_token": dense_fpt, "warmup_s": warmup_s,
        "memory_gb": torch.cuda.max_memory_allocated(rt.device) / 1e9 if cuda else None,
    }
    # Where a (waited-for) step's time goes, by train_step's phases: before_step (a method's selection),
    # forward + backward, clipping + optimizer (with a method's freeze).
    for name, j in (("select_ms", 0), ("fwd_bwd_ms", 1), ("optimizer_ms", 2)):
        out[name] = statistics.median(p[j] for p in phases) * 1e3
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


def profiled(fn, steps: int = 5):
    """The profiler's record of `steps` calls of `fn` (after one call outside it), CUDA activity only."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_ms(fn, steps: int = 5) -> float:
    """GPU time of one call of `fn`: the sum of its kernels' (and copies') durations, gaps left out. This is what
    `fn` costs inside a step that keeps the GPU busy, where its launches overlap other work."""
    events = [e for e in profiled(fn, steps).key_averages() if e.device_type == DeviceType.CUDA]
    return sum(e.self_device_time_total for e in events) / steps / 1e3


def kernel_table(fn, steps: int = 5, rows: int = 14) -> str:
    """The profiler's table of the CUDA kernels of `fn`, most time first."""
    return profiled(fn, steps).key_averages().table(sort_by="self_cuda_time_total", row_limit=rows,
                                                    max_name_column_width=60)


def bench_config(preset: str, *, batch_size: int, seq_len: int, vocab_size: int, micro_batch_size: int = 0,
                 method: dict | None = None, model_overrides: dict | None = None) -> config_mod.RunConfig:
    raw = {
        "model": {"preset": preset, "vocab_size": vocab_size, **(model_overrides or {})},
        "train": {"batch_size": batch_size, "micro_batch_size": micro_batch_size, "seq_len": seq_len,
                  "progress": False},
        "method": method or {"name": "dense"},
    }
    return config_mod.from_dict(raw)


def step_arguments(parser, preset: str = "gpt2-medium") -> None:
    """The step shape of a bench script's contenders (`step_shape` reads them back)."""
    parser.add_argument("--preset", default=preset)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, no compile (smoke test)")


def step_shape(a) -> dict[str, Any]:
    """preset, batch, seq, vocab, steps, warmup, device and compile_model from `step_arguments`' options (--quick: a
    tiny model on few steps, eager)."""
    device = torch.device(a.device)
    shape = dict(preset=a.preset, batch=a.batch, seq=a.seq, vocab=a.vocab, steps=a.steps, warmup=a.warmup,
                 device=device, compile_model=device.type == "cuda")
    if a.quick:
        shape.update(preset="tiny", batch=4, seq=64, vocab=512, steps=2, warmup=1, compile_model=False)
    return shape


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format). Prints the Markdown table the report writes, and returns it."""
    text = markdown_table(rows, columns)
    print(text)
    return text


def write_rows(rows: list[dict[str, Any]], out: str | Path, meta: dict[str, Any] | None = None,
               quiet: bool = False) -> None:
    """The raw numbers of a benchmark, with the environment they were taken in (and the benchmark's own settings,
    `meta`). `quiet`: without saying where (a benchmark that rewrites its file after every contender)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": environment(), **({"meta": meta} if meta else {}), "rows": rows}, indent=2))
    if not quiet:
        print(f"raw numbers: {path}")


def environment() -> dict[str, Any]:
    env = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def setting_arguments(parser, out: str) -> None:
    """The options `time_train_setting` reads (models, step shape, device, smoke test) and the JSON file."""
    parser.add_argument("--presets", nargs="+", default=["gpt2-small", "gpt2-medium"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps, eager (smoke test)")
    parser.add_argument("--out", default=out)


def time_train_setting(a, key: str, values: list, method: dict | None = None) -> list[dict]:
    """The trainer's step (dense, or `method`) of each of `a.presets` (`setting_arguments`' options) with
    train.`key` at each of `values`, side by side in this process; speed-up against the first value of the same
    preset. `a.quick`: a tiny model and shapes, eager (smoke test)."""
    device, quick = torch.device(a.device), a.quick
    batch, seq, steps, warmup = a.batch, a.seq, a.steps, a.warmup
    presets = ["tiny"] if quick else a.presets
    rows = []
    for preset in presets:
        for value in values:
            cfg = bench_config(preset, batch_size=2 if quick else batch, seq_len=16 if quick else seq,
                               vocab_size=512 if quick else 50304, method=method)
            cfg.train.device = device.type
            setattr(cfg.train, key, value)
            config_mod.validate(cfg)
            r = measure_steps(cfg, steps=2 if quick else steps, warmup=1 if quick else warmup,
                              compile_model=device.type == "cuda" and not quick)
            r["contender"] = f"{preset}, {key} {value}"
            first = next((x for x in rows if x["preset"] == preset), r)
            r["speedup"] = first["step_s"] / r["step_s"]
            r["stream_speedup"] = first["stream_step_s"] / r["stream_step_s"]
            rows.append(r)
            print(r["contender"], {k: r.get(k) for k in ("step_s", "stream_step_s", "mfu")}, flush=True)
    if rows:
        print_table(rows, [("contender", "contender", ""), ("method", "method", ""), ("step_s", "step s", ".4f"),
                           ("stream_step_s", "streamed s", ".4f"), ("speedup", "speed-up", ".3f"),
                           ("stream_speedup", "streamed", ".3f"), ("mfu", "MFU", ".1%"),
                           ("cuda_graphs", "CUDA graphs", "")])
    return rows


def run_method_bench(presets: list[str], methods: list[dict[str, Any]], *, batch_size: int, seq_len: int,
                     steps: int, vocab_size: int, out: str, micro_batch_size: int = 0, compile_model: bool = True,
                     model_overrides: dict | None = None) -> list[dict[str, Any]]:
    """Dense and each of `methods` on the same model and batch, one after the other in this process; ratios to
    dense."""
    rows = []
    for preset in presets:
        dense_step = dense_stream = None
        for contender in [{"name": "dense"}, *methods]:
            cfg = bench_config(preset, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=seq_len,
                               vocab_size=vocab_size, model_overrides=model_overrides, method=contender)
            r = measure_steps(cfg, steps=steps, compile_model=compile_model)
            r["method_options"] = contender
            dense_step = dense_step or r["step_s"]
            dense_stream = dense_stream or r["stream_step_s"]
            r["speedup"] = dense_step / r["step_s"]
            r["stream_speedup"] = dense_stream / r["stream_step_s"]
            r["flops_ratio"] = r["dense_flops_per_token"] / r["flops_per_token"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    print_table(rows, [("preset", "model", ""), ("method", "method", ""), ("batch_size", "batch", "d"),
                       ("seq_len", "seq", "d"), ("step_s", "step s", ".4f"), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("speedup", "speed-up vs dense", ".2f"), ("stream_speedup", "streamed speed-up", ".2f"),
                       ("flops_ratio", "FLOP reduction", ".2f"),
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
