"""The benchmark suite of BENCHMARK.md: named parts, each one GPU call of at most 10 minutes.

`sparsetrain bench --suite PART [--quick] [--out DIR] [--data-dir DATA]` runs one part. Every contender of a part
trains (or is timed) in the same process as its dense baseline, with the same seed, data order, batch, sequence
length and learning-rate schedule; the part writes DIR/PART.json (environment, each contender's config, summary,
validation curve and logged schedules, ratios to dense) and DIR/PART/NAME/ (each run's metrics.jsonl, summary.json,
config.toml), and prints a table. `sparsetrain report DIR/*.json` turns the JSONs into the report.

Parts (H100, gpt2-small = 124M at batch 16 x 1024 = 16,384 tokens a step, about 0.033 s a step dense, AdamW with
linear warm-up over 5% of the steps and cosine decay to 10%; every validation loss on 2,097,152 held-out tokens
(2^21: 128 full batches), the same tokens for every contender). Call times: "seen" were measured on 2026-11-23
(BENCHMARKS.md), the others are estimates from those runs' step times plus 20-40 s of torch.compile per model:

    prepare-data  DATA/code and DATA/english from .carry/{code,english}.jsonl.xz with the shared .carry/tokenizer.json;
                  the validation fraction is raised until each held-out set has >= 2^21 + 1 tokens (English: about
                  25 MB of text, ~6M tokens, so ~40% is held out); DATA/sft: the code corpus's kernel-doc pairs
                  (comment -> function, ~10,000 in the carried 200 MB) packed into rows of 1,024 tokens with the loss
                  on the functions, 5% of the pairs held out. A no-op when DATA holds all three. (seen: code and
                  English took > 50 s on a fresh machine, sft 8 s after them: give it 90 s)
    dense-step    dense step time, gpt2-small and gpt2-medium, batch 16 x 1024, vocabulary 50304, 30 timed steps
                  after 10 of warm-up.                                                                (~2 min)
    sat-step      dense vs SAT at omission 0.5 (FFN and heads, constant, no dense end), the same shape, on the issue's
                  two models: gpt2-medium and the ~1B llama preset (grouped-query attention: whole kv-head groups are
                  omitted); SAT twice: as configured by default (its stash compiled on a GPU) and with
                  `compiled_stash = false` (`sat-eager-stash`). (seen: 314 s on an H200)
    ssd-step      dense vs SSD's sparse phase (16 experts, top-4, relu2), gpt2-medium, the same shape. (seen: 122 s)
    sat-cpt       the code base (dense on code, 2,000 steps, 32.8M tokens, lr 6e-4: trained by the first of sat-cpt,
                  sat-sft and upcycle in a call and reused by the others); continual pre-training on English,
                  400 steps (6.6M tokens, lr 3e-4, seed + 1): dense vs SAT with the LORS ladder (rate 0.5), SAT
                  twice (`sat`: sampled selection, the default; `sat-topk`), all from the base. With ~3.9M English
                  training tokens the continuation sees them ~1.7 times. (seen: 255 s without sat-topk, the base's
                  84 s included; ~6 min with it)
    sat-sft       the code base; fine-tuning on DATA/sft, 300 steps of 16 rows (about 1.3 epochs of
                  the ~3,700 train rows, lr 1e-4, seed + 1): dense vs SAT with the LORS ladder (`sat`, `sat-topk`),
                  all from the base; validation loss on the held-out pairs' functions. (seen: 170 s without sat-topk,
                  with the base reused; ~4.5 min with it)
    upcycle       the code base; continuation on code (lr 3e-4, seed + 1): dense for
                  800 steps (13.1M tokens, +40% of the base), and the upcycled MoE (8 experts, top-2, every other
                  layer) for the same wall-clock: its steps = 800 x dense step time / MoE step time, both timed by
                  `measure_steps` in this process, so its cosine schedule ends where its budget does.
                  (seen: 206 s with the base reused; ~5 min without)
    ssd-pretrain  dense vs SSD from scratch on code, 2,000 steps (32.8M tokens), relu2 activation for both; then both
                  trained models run as MoEs (top-4 of 16): validation loss, FFN and prefill time, dense vs MoE.
                  (seen: 184 s at --scale 0.5; ~6 min in full)
    mst-pretrain  dense vs MST weight-level vs MST neuron-level from scratch on code, 1,200 steps (19.7M tokens).
                  (seen: 162 s at --scale 0.4; ~6-7 min in full)
    hsa-attention dense (causal SDPA) vs MST's sparse attention alone (no weight sparsity, every layer, the whole
                  run: local band of 128, and hybrid = local 128 | stride 256) at sequence 1024 x 16, 4096 x 4 and
                  8192 x 2 rows (the same tokens a step), 300 steps each: validation loss and wall-clock, ratios to
                  the dense run of each length. The kernel-level grid is bench/hsa_attention.py.
                  (seen: 433 s at --scale 0.8 on an H200)
    two-gpu       every method, 50 steps on code, one process and then `torchrun --nproc_per_node=2` (DDP and
                  FSDP2), the same global batch: each logged loss compared (a match: within 1%,
                  bf16) and the tokens/s of 2 GPUs over 1; dense also at 4x the batch in micro-batches of 16 rows
                  (`dense-accum4`: one gradient sync per 2 passes on each GPU). First the link: peer access,
                  `nvidia-smi topo -m` and all-reduce bandwidth (`sparsetrain.interconnect`). Needs a 2-GPU
                  machine (skipped otherwise); on the CPU (--quick) dense, dense-accum4 and upcycle run on 2 gloo
                  processes. Finished launches are kept in WORK/two-gpu-launches/, so a later call on the same
                  machine picks up where the last stopped (seen: 490 s cut + 371 s for 14 launches on 2 x H200, ~60 s
                  each; 21 launches now, with every method under FSDP2: three calls).
Each part prints and stores its `elapsed_s`: re-budget from those once seen.
`--scale X` multiplies every training step count of a part (for example 0.5 if a part overruns its call);
`--quick` runs the tiny preset for a few steps, on the CPU in seconds: a smoke test, not a measurement.

Wall-clock. The trainer's `train_time` is the time of the training steps (evaluation and checkpoints excluded) and
includes torch.compile: the first step of every run and each recompilation when a method changes shapes (SAT's
ladder, MST's neurons, SSD's phases). Those are fixed costs that a run of 100M+ tokens amortises and a
minutes-long benchmark does not, so each contender's "wall-clock" takes out the seconds that dynamo's compile
callbacks say were spent compiling for training steps (`CompileClock`), from the logging windows (10 steps) where
they were spent (`steady_times`). A method's own one-off work (statistics, re-clustering, topology updates) stays
in its time. Both numbers are in the JSON and the table ("wall-clock s" and "with compile s"); targets are judged on
the first, and the report shows the second beside it.

GPU calls (run tool, carry [".carry"]): `bash bench/run_parts.sh PART[:SECONDS[:SCALE]] ...` runs parts one after
the other, each under its own time limit, and packs every JSON, the runs' metrics, a log and the metrics of runs a
limit cut short into $OUT/results.tgz (a call brings back at most 8 files). DATA persists while the machine is warm;
a fresh machine needs prepare-data again (more than 50 s: give it 90 s there), so start every call with it:

    1. bash bench/run_parts.sh prepare-data:90 sat-step:480
    2. bash bench/run_parts.sh prepare-data:30 sat-cpt:400 ssd-step:150
    3. bash bench/run_parts.sh prepare-data:30 sat-sft:290 upcycle:270
    4. bash bench/run_parts.sh prepare-data:30 ssd-pretrain:290:0.5 mst-pretrain:230:0.4
    5. bash bench/run_parts.sh prepare-data:30 hsa-attention:560:0.8   (9 runs of ~55 s at full size: scaled to fit;
       dense-step, 150 s, where a call has room; the kernel grid: python3 bench/hsa_attention.py, ~3 min)
    6. on the 2-GPU kind: bash bench/run_parts.sh prepare-data:90 two-gpu:490, then at once, twice,
       bash bench/run_parts.sh prepare-data:30 two-gpu:560 (the same machine, reusing the finished launches)
    (four calls of this kind - before sat-topk was added - ran in one session's 30 minutes on 2026-11-23, machine
    start included, fired back to back: the machine stays warm only 30 s after a call, and DATA and the shared
    code base persist only while it is warm, so call 3 must follow call 2 on the same machine)
On the 2-GPU kind, two single-GPU parts can share a call, one per GPU (each compares within its own process; the
host's CPU cores are shared), with their own WORK and OUT; wait on the jobs themselves (a `pgrep -f run_parts.sh`
loop matches its own command line and waits out the call's limit, as it did once):

    OUT=$OUT bash bench/run_parts.sh prepare-data:90; mkdir -p $OUT/a $OUT/b
    CUDA_VISIBLE_DEVICES=0 OUT=$OUT/a WORK=runs/a bash bench/run_parts.sh hsa-attention:545:0.8 > $OUT/a.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 OUT=$OUT/b WORK=runs/b bash bench/run_parts.sh sat-step:470 > $OUT/b.log 2>&1 &
    wait
Still to run after 2026-11-23: calls 2-3 (the sat-topk contenders decide `select`'s default) and call 6 again (the
link measurement, dense-accum4 and sat / ssd / mst under FSDP2 are new).
    then here: tar xzf FILES_AT/results.tgz -C bench_out/NAME for each call, and
    sparsetrain report bench_out/*/*.json --out bench_out/report
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import config as config_mod
from .bench import bench_config, environment, measure_steps, median_ms, print_table
from .data import TokenData, load_tokenizer, prepare
from .errors import UserError
from .interconnect import topology
from .report import CONTENDER_COLUMNS, LINK_COLUMNS, SCHEDULE_KEYS, STEP_COLUMNS, TWO_GPU_COLUMNS, read_metrics
from .sft import prepare_sft, write_kernel_doc_jsonl
from .sources import sha256_file
from .train import TrainingData, evaluate, load_model, peak_flops, setup_runtime, train

SEED = 1337
BASE_STEPS = 2000  # the code base of the continuation parts: 32.8M tokens
MARKER = ".sparsetrain-suite"  # marks the suite's own scratch folders, the only ones it deletes
CURVE_KEYS = ("step", "tokens", "flops", "train_time", "wallclock", "loss", "val_loss", "mfu", *SCHEDULE_KEYS)


@dataclass(frozen=True)
class Shape:
    """The training shape of every run of a part."""
    preset: str
    batch_size: int
    seq_len: int
    eval_tokens: int
    log_every: int
    sft_seq_len: int  # rows of the fine-tuning data (a kernel-doc prompt alone is ~100 tokens)


FULL = Shape("gpt2-small", 16, 1024, 2**21, 10, 1024)
QUICK = Shape("tiny", 8, 64, 2048, 2, 256)


@dataclass(frozen=True)
class StepShape:
    """The shape of the step-time parts."""
    presets: tuple[str, ...]
    batch_size: int
    seq_len: int
    vocab_size: int
    steps: int
    warmup: int


STEP_FULL = StepShape(("gpt2-small", "gpt2-medium"), 16, 1024, 50304, 30, 10)
STEP_QUICK = StepShape(("tiny",), 4, 64, 512, 3, 1)


@dataclass
class Context:
    part: str
    out: Path
    data: Path
    work: Path
    carry: Path
    quick: bool
    device: str
    scale: float

    @property
    def shape(self) -> Shape:
        return QUICK if self.quick else FULL

    @property
    def cuda(self) -> bool:
        return self.device != "cpu" and torch.cuda.is_available()

    def steps(self, full: int, quick: int) -> int:
        return quick if self.quick else max(1, round(full * self.scale))


@dataclass(frozen=True)
class Part:
    summary: str
    run: Callable[[Context], dict[str, Any]]
    methods: tuple[str, ...] = ()  # methods the part trains; unregistered ones skip the part with a message
    trains: bool = True  # runs the trainer (needs prepared data and a scratch folder)


# ---------------------------------------------------------------------------------------------------------------
# data


def prepare_corpus(source: Path, out: Path, tokenizer: Path, min_val_tokens: int, val_fraction: float,
                   tries: int = 4) -> dict[str, Any]:
    """Prepare `source` into `out` with `tokenizer`, raising the validation fraction until the held-out set has
    `min_val_tokens`; an existing `out` made with the same tokenizer and a large enough held-out set is kept."""
    tok_sha = sha256_file(tokenizer)
    if (out / "meta.json").is_file():
        meta = TokenData(out).meta
        if meta["tokenizer"].get("file_sha256") != tok_sha:
            raise UserError(f"{out} was prepared with another tokenizer than {tokenizer}; delete {out} and run "
                            "prepare-data again")
        if meta["val_tokens"] >= min_val_tokens:
            print(f"prepare-data: {out} is ready ({meta['train_tokens']:,} train, {meta['val_tokens']:,} val tokens)")
            return meta
        val_fraction = max(val_fraction, meta["val_fraction"])
        shutil.rmtree(out)
    for _ in range(tries):
        meta = prepare(str(source), out, tokenizer=str(tokenizer), val_fraction=val_fraction, progress=False)
        print(f"prepare-data: {out}: {meta['train_tokens']:,} train, {meta['val_tokens']:,} val tokens "
              f"(val fraction {val_fraction:.3f})")
        if meta["val_tokens"] >= min_val_tokens:
            return meta
        # Whole documents go to val, so the share of tokens tracks the fraction; aim 15% over.
        val_fraction = min(0.9, val_fraction * 1.15 * min_val_tokens / max(1, meta["val_tokens"]))
        shutil.rmtree(out)
    raise UserError(f"{source} has too little text for a {min_val_tokens:,}-token held-out set; carry more text")


def run_prepare_data(ctx: Context) -> dict[str, Any]:
    tokenizer = ctx.carry / "tokenizer.json"
    if not tokenizer.is_file():
        raise UserError(f"no shared tokenizer at {tokenizer}; put the tokenizer.json that both corpora use there "
                        "(a prepared data dir holds one), or pass --carry DIR")
    corpora = {}
    for corpus, fraction in (("code", 0.05), ("english", 0.4)):
        source = ctx.carry / f"{corpus}.jsonl.xz"
        if not source.is_file():
            raise UserError(f"{source} not found; make it with `sparsetrain data export --source linux-source "
                            f"--subset {corpus} --out {source}` (code: add --max-bytes 200M)")
        meta = prepare_corpus(source, ctx.data / corpus, tokenizer, ctx.shape.eval_tokens + 1, fraction)
        corpora[corpus] = {k: meta[k] for k in ("train_tokens", "val_tokens", "val_fraction", "vocab_size",
                                                "text_bytes", "sha256")}
    corpora["sft"] = prepare_sft_corpus(ctx, ctx.carry / "code.jsonl.xz", tokenizer)
    return {"corpora": corpora}


def prepare_sft_corpus(ctx: Context, code: Path, tokenizer: Path) -> dict[str, Any]:
    """DATA/sft: the kernel-doc pairs of the code corpus (comment -> function), packed into rows of the suite's
    sequence length with the loss on the functions only; 5% of the pairs held out. Kept when it exists already."""
    out = ctx.data / "sft"
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("tokenizer_sha256") == sha256_file(tokenizer) and meta["seq_len"] == ctx.shape.sft_seq_len:
            print(f"prepare-data: {out} is ready ({meta['train']['sequences']:,} train rows)")
            return {k: meta[k] for k in ("train", "val", "examples_file")}
        shutil.rmtree(out)
    pairs = ctx.data / "kernel_doc.jsonl"
    counts = write_kernel_doc_jsonl(str(code), pairs, progress=False)
    meta = prepare_sft(pairs, tokenizer, out, seq_len=ctx.shape.sft_seq_len, val_fraction=0.05)
    meta["tokenizer_sha256"], meta["examples_file"] = sha256_file(tokenizer), counts
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"prepare-data: {out}: {counts['examples']:,} kernel-doc pairs -> {meta['train']['sequences']:,} train, "
          f"{meta['val']['sequences']:,} val rows")
    return {k: meta[k] for k in ("train", "val", "examples_file")}


def corpus_dir(ctx: Context, corpus: str) -> Path:
    """A prepared corpus, checked: present, and (full runs) a held-out set of at least the evaluated tokens."""
    d = ctx.data / corpus
    hint = f"run `sparsetrain bench --suite prepare-data --data-dir {ctx.data}` first"
    if not (d / "meta.json").is_file():
        raise UserError(f"{d} holds no prepared corpus; {hint}")
    meta = TokenData(d).meta
    if meta["val_tokens"] < ctx.shape.eval_tokens + 1:
        raise UserError(f"{d} has {meta['val_tokens']:,} held-out tokens, fewer than the {ctx.shape.eval_tokens:,} "
                        f"every contender is evaluated on; delete {d} and {hint}")
    return d


def sft_dir(ctx: Context) -> Path:
    d = ctx.data / "sft"
    if not (d / "meta.json").is_file():
        raise UserError(f"{d} holds no prepared SFT data; run `sparsetrain bench --suite prepare-data "
                        f"--data-dir {ctx.data}` first")
    return d


def same_tokenizer(a: Path, b: Path) -> None:
    if load_tokenizer(a).get_vocab(with_added_tokens=True) != load_tokenizer(b).get_vocab(with_added_tokens=True):
        raise UserError(f"{a} and {b} were prepared with different tokenizers; continual pre-training needs one: "
                        "prepare both with prepare-data")


# ---------------------------------------------------------------------------------------------------------------
# training runs


class CompileClock:
    """Seconds torch.compile spends compiling for training steps, from dynamo's compile callbacks.

    A compilation counts when it starts with grad enabled (a training forward) or is a deferred backward; those
    under no_grad are for evaluation, which the trainer's `train_time` leaves out already.
    """

    def __enter__(self) -> "CompileClock":
        from torch._dynamo import callback

        self.seconds, self.count, self._started = 0.0, 0, None
        self._handler = callback.callback_handler
        self._lazy_backward = callback.CallbackTrigger.LAZY_BACKWARD
        self._handler.register_start_callback(self._start)
        self._handler.register_end_callback(self._end)
        return self

    def _start(self, args) -> None:
        training = args.callback_trigger == self._lazy_backward or torch.is_grad_enabled()
        self._started = time.perf_counter() if training else None

    def _end(self, args) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.count += 1
            self._started = None

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
                  "eval_tokens": s.eval_tokens, "checkpoint_every": 0, "keep_checkpoints": 1,
                  "log_every": s.log_every, "seed": seed, "device": ctx.device, "progress": False,
                  "init_from": init_from},
        "method": method or {"name": "dense"},
    }


def train_run(ctx: Context, name: str, raw: dict[str, Any], role: str = "contender",
              run_dir: Path | None = None) -> dict[str, Any]:
    """Train one contender in the part's scratch folder (or `run_dir`); its result with the curve for the report."""
    run_dir = run_dir or ctx.work / ctx.part / name
    cfg = config_mod.from_dict(raw)
    print(f"{ctx.part}: training {name} ({cfg.method['name']}, {cfg.train.steps} steps)", flush=True)
    with CompileClock() as clock:
        summary = train(cfg, run_dir)
    records = read_metrics(run_dir)
    for r, t in zip(records, steady_times(records, clock.seconds)):
        r["wallclock"] = t
    metrics = keep_metrics(ctx, name, run_dir)
    release_memory()
    result = {
        "name": name, "role": role, "corpus": Path(raw["data"]["dir"]).name, "method": cfg.method["name"],
        "config": config_mod.to_dict(cfg), "summary": summary, "steps": summary["steps"],
        "tokens": summary["tokens"], "val_loss": summary["val_loss"], "train_time": summary["train_time"],
        "wallclock": records[-1]["wallclock"], "compile_s": clock.seconds, "compilations": clock.count,
        "flops": summary["flops"],
        "curve": [{k: r[k] for k in CURVE_KEYS if k in r} for r in records],
        "metrics": metrics, "run_dir": str(run_dir),
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
    scratch_dir(folder)
    result = train_run(ctx, "base", raw, role="base", run_dir=folder / "run") | {"part": ctx.part, "asked": asked}
    saved.write_text(json.dumps(result))
    return result


def compare(ctx: Context, contenders: list[dict[str, Any]], baseline: str = "dense") -> None:
    """Ratios to the baseline, and MFU of the counted FLOPs, in place."""
    base = next(c for c in contenders if c["name"] == baseline)
    peak = peak_flops(torch.device("cuda")) if ctx.cuda else None
    for c in contenders:
        c["mfu"] = c["flops"] / c["wallclock"] / peak if peak else None
        if c.get("role") == "base":
            continue
        c["val_gap"] = (c["val_loss"] - base["val_loss"]) / base["val_loss"]
        c["speedup"] = base["wallclock"] / c["wallclock"]
        c["speedup_raw"] = base["train_time"] / c["train_time"]
        c["flops_ratio"] = base["flops"] / c["flops"]


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


# ---------------------------------------------------------------------------------------------------------------
# parts


def run_steps(ctx: Context, methods: list[tuple[str, dict[str, Any]]], presets: tuple[str, ...] | None = None,
              model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Step time of dense and each method (label, options), side by side on each preset (random tokens: speed does
    not depend on them). The trainer's own step, timed by `measure_steps`. `presets` (full runs) and `model` options
    narrow or change the models of the step shape."""
    s = STEP_QUICK if ctx.quick else STEP_FULL
    if presets and not ctx.quick:
        s = dataclasses.replace(s, presets=presets)
    rows = []
    for preset in s.presets:
        dense = None
        for label, method in [("dense", {"name": "dense"}), *methods]:
            cfg = bench_config(preset, batch_size=s.batch_size, seq_len=s.seq_len, vocab_size=s.vocab_size,
                               method=method, model_overrides=model)
            cfg.train.device = ctx.device
            r = measure_steps(cfg, steps=s.steps, warmup=s.warmup, compile_model=ctx.cuda)
            r["method"], r["method_options"] = label, method
            dense = dense or r
            r["speedup"] = dense["step_s"] / r["step_s"]
            r["flops_ratio"] = r["dense_flops_per_token"] / r["flops_per_token"]
            rows.append(r)
            print(json.dumps(r), flush=True)
            release_memory()
    print_table(rows, STEP_COLUMNS)
    return {"rows": rows, "shape": dataclasses.asdict(s) | {"model": model or {}}}


def dense_vs_sat_from_a_base(ctx: Context, *, corpus: str, data: Path, steps: int,
                             lr: float) -> tuple[list[dict[str, Any]], float]:
    """A dense base trained on code, its validation loss on `data` (the continuation's held-out set), then dense and
    SAT (LORS) continued from it on `corpus` for the same steps: the contenders, with that loss at the head of
    every curve, and the loss. SAT runs twice: with its default selection (sampling in proportion to the score)
    and with top-k, which lost less validation loss in CPU runs of the tiny preset (+1.8% vs +3.1% after 100 steps
    of the demo's continuation, three seeds of sampling within 0.002)."""
    base = code_base(ctx)
    start = eval_run(base["run_dir"], data)
    print(f"{ctx.part}: the base model's validation loss on {data.name} before continuing: {start:.4f}")
    common = dict(corpus=corpus, steps=steps, init_from=base["run_dir"], seed=SEED + 1, lr=lr)
    dense = train_run(ctx, "dense", run_config(ctx, **common))
    sats = [train_run(ctx, name, run_config(ctx, method=method, **common))
            for name, method in (("sat", SAT_CPT), ("sat-topk", {**SAT_CPT, "select": "topk"}))]
    for c in (dense, *sats):
        start_point(c, start)
    return [base, dense, *sats], start


def run_sat_cpt(ctx: Context) -> dict[str, Any]:
    """Dense base on code, then continual pre-training on English: dense vs SAT (LORS), same tokens."""
    english = corpus_dir(ctx, "english")
    same_tokenizer(corpus_dir(ctx, "code"), english)
    contenders, start = dense_vs_sat_from_a_base(ctx, corpus="english", data=english, steps=ctx.steps(400, 16),
                                                 lr=3e-4)
    note = (f"The base model (code, {contenders[0]['steps']} steps) has English validation loss {start:.4f} before "
            "continuing: the first point of both curves.")
    return {"contenders": contenders, "start_val_loss": start, "notes": [note]}


def run_sat_sft(ctx: Context) -> dict[str, Any]:
    """Dense base on code, then fine-tuning on kernel-doc pairs (comment -> function, loss on the function):
    dense vs SAT (LORS), the same rows; validation loss on the held-out pairs' functions."""
    sft = sft_dir(ctx)
    same_tokenizer(corpus_dir(ctx, "code"), sft)
    steps = ctx.steps(300, 16)
    contenders, start = dense_vs_sat_from_a_base(ctx, corpus="sft", data=sft, steps=steps, lr=1e-4)
    meta = json.loads((sft / "meta.json").read_text())
    note = (f"Fine-tuning data: {meta['examples_file']['examples']:,} kernel-doc pairs of the code corpus in "
            f"{meta['train']['sequences']:,} train rows ({steps} steps of {ctx.shape.batch_size} rows: "
            f"{steps * ctx.shape.batch_size / meta['train']['sequences']:.1f} epochs); the base (code, "
            f"{contenders[0]['steps']} steps) starts at validation loss {start:.4f} on the held-out functions. The "
            "base may have seen some of these functions in pre-training, dense and SAT alike.")
    return {"contenders": contenders, "start_val_loss": start, "notes": [note]}


def run_upcycle(ctx: Context) -> dict[str, Any]:
    """Dense base, then dense vs upcycled continuation for the same wall-clock."""
    base = code_base(ctx)
    steps = ctx.steps(800, 16)
    common = dict(corpus="code", init_from=base["run_dir"], seed=SEED + 1, lr=3e-4)
    dense = train_run(ctx, "dense", run_config(ctx, steps=steps, **common))
    # Equal wall-clock: the MoE's schedule gets as many steps as fit in dense's time, from step times measured the
    # same way for both (the trainer's step on this device, compiled as the runs are).
    timed, q = {}, STEP_QUICK if ctx.quick else STEP_FULL
    for name, method in (("dense", None), ("upcycle", UPCYCLE)):
        cfg = config_mod.from_dict(run_config(ctx, steps=steps, method=method, **common))
        cfg.model.vocab_size = TokenData(cfg.data.dir).vocab_size
        timed[name] = measure_steps(cfg, steps=q.steps, warmup=q.warmup, compile_model=ctx.cuda)["step_s"]
        release_memory()
    moe_steps = max(1, round(steps * timed["dense"] / timed["upcycle"]))
    print(f"upcycle: step {timed['dense']:.4f} s dense, {timed['upcycle']:.4f} s MoE -> {moe_steps} MoE steps")
    moe = train_run(ctx, "upcycle", run_config(ctx, steps=moe_steps, method=UPCYCLE, **common))
    for c in (dense, moe):
        start_point(c, base["val_loss"])
    note = (f"Equal wall-clock: one step takes {timed['dense']:.4f} s dense and {timed['upcycle']:.4f} s upcycled "
            f"(measure_steps, this process), so the MoE trains {moe_steps} steps for dense's {steps}.")
    return {"contenders": [base, dense, moe], "notes": [note],
            "calibration": {"dense_step_s": timed["dense"], "moe_step_s": timed["upcycle"], "moe_steps": moe_steps}}


def run_pretrain(ctx: Context, contenders: list[tuple[str, dict[str, Any]]], model: dict[str, Any] | None = None,
                 steps: int = 2000, quick_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dense and each method from scratch on code, the same tokens. `quick_options` are added to every method's
    options under --quick (so that a run of a few steps still goes through the method's schedule)."""
    n = ctx.steps(steps, 20)
    runs = [train_run(ctx, "dense", run_config(ctx, corpus="code", steps=n, model=model))]
    for name, method in contenders:
        if ctx.quick:
            method = {**method, **(quick_options or {})}
        runs.append(train_run(ctx, name, run_config(ctx, corpus="code", steps=n, model=model, method=method)))
    return {"contenders": runs}


@torch.no_grad()
def moe_inference(ctx: Context, run_dir: str, top_k: int = 4, experts: int = 16) -> dict[str, Any]:
    """A trained model run dense and as an MoE (SSD's sparse inference, top-`top_k` of `experts`): validation loss,
    prefill time of one batch (whole model), and the FFNs' time alone on the hidden states of that batch."""
    from .methods.ssd import SSDFFN, fit_routers, prepare_moe, run_dense

    model, _, cfg = load_model(run_dir)
    rt = setup_runtime(cfg.train)
    prepare_moe(model, run_dir, top_k, experts)  # clusters; the model is an MoE from here
    model.to(rt.device).eval()
    data = TrainingData(corpus_dir(ctx, "code"), cfg.train)
    x, _ = next(iter(data.eval_batches(ctx.shape.batch_size, ctx.shape.batch_size * ctx.shape.seq_len)))
    x = x.to(rt.device)
    inputs = []  # every FFN's input on this batch (the same for both timings)
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks]
    with rt.autocast():
        model(x)
    for h in hooks:
        h.remove()
    result: dict[str, Any] = {"top_k": top_k, "experts": experts, "tokens": x.numel()}
    for mode in ("dense", "moe"):
        for b in model.blocks:
            if isinstance(b.mlp, SSDFFN):
                b.mlp.sparse = mode == "moe"
        result[f"val_loss_{mode}"] = evaluate(model, data, cfg.train, rt, None)

        def prefill():
            with rt.autocast():
                model(x)

        def ffns():
            with rt.autocast():
                for b, h in zip(model.blocks, inputs):
                    b.mlp(h)

        result[f"prefill_ms_{mode}"] = median_ms(prefill)
        result[f"ffn_ms_{mode}"] = median_ms(ffns)
    # The same MoE with linear routers fitted on training tokens (SSD's router = "trained"): the routing's share of
    # the gap. Only the routers change: the FFN time is the centroid MoE's.
    probe, _ = data.loader.next_batch()
    fit_routers(model, probe[:8].to(rt.device))
    result["val_loss_moe_trained"] = evaluate(model, data, cfg.train, rt, None)
    run_dense(model)
    result["val_gap"] = (result["val_loss_moe"] - result["val_loss_dense"]) / result["val_loss_dense"]
    result["val_gap_trained"] = (result["val_loss_moe_trained"] - result["val_loss_dense"]) / result["val_loss_dense"]
    result["prefill_speedup"] = result["prefill_ms_dense"] / result["prefill_ms_moe"]
    result["ffn_speedup"] = result["ffn_ms_dense"] / result["ffn_ms_moe"]
    del model
    release_memory()
    return result


def run_ssd_pretrain(ctx: Context) -> dict[str, Any]:
    """Dense vs SSD from scratch (relu2), then both trained models run as MoEs (top-4 of 16): SSD's inference."""
    result = run_pretrain(ctx, [("ssd", {"name": "ssd"})], model={"activation": "relu2"}, steps=2000,
                          quick_options={"schedule": "fixed", "sparse_windows": [[0.3, 0.7]]})
    result["moe_inference"] = {}
    for c in result["contenders"]:
        r = moe_inference(ctx, c["run_dir"])
        result["moe_inference"][c["name"]] = r
        print(f"ssd-pretrain: {c['name']} as MoE top-{r['top_k']}/{r['experts']}: val loss {r['val_loss_dense']:.4f} "
              f"dense, {r['val_loss_moe']:.4f} MoE ({100 * r['val_gap']:+.2f}%); FFN {r['ffn_ms_dense']:.2f} -> "
              f"{r['ffn_ms_moe']:.2f} ms ({r['ffn_speedup']:.2f}x), prefill {r['prefill_ms_dense']:.2f} -> "
              f"{r['prefill_ms_moe']:.2f} ms ({r['prefill_speedup']:.2f}x)", flush=True)
    return result


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
    import hashlib
    import subprocess
    import sys

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
    """All-reduce timings between 2 processes (`sparsetrain.interconnect` under torchrun), or the error."""
    import subprocess
    import sys

    out = ctx.work / ctx.part / "link.json"
    sizes = ["1"] if ctx.quick else [str(mb) for mb in LINK_SIZES_MB]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsetrain.interconnect", "--out", str(out), "--sizes-mb", *sizes]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"all_reduce_error": res.stderr[-2000:]}
    rows = json.loads(out.read_text())["all_reduce"]
    print_table(rows, LINK_COLUMNS)
    return {"all_reduce": rows}


# Hybrid sparse attention alone (MST with no weight sparsity): (name, pattern options) per sequence length, at the
# same tokens per step; `hybrid` is the union of a local band and a strided pattern (a stride of 128, the authors',
# hits every 128-key block, so it computes all of them: 256 skips some).
HSA_PATTERNS = [("local", {"attention": "local", "window": 128}),
                ("hybrid", {"attention": "hybrid", "window": 128, "stride": 256})]
HSA_SHAPES = {"full": ((1024, 16), (4096, 4), (8192, 2)), "quick": ((64, 8), (128, 4))}


def run_hsa(ctx: Context) -> dict[str, Any]:
    """Dense (causal SDPA) vs sparse attention patterns (FlexAttention block masks, every layer, the whole run) at
    each sequence length, the same tokens: validation loss and wall-clock, ratios to the dense run of that length."""
    steps = ctx.steps(300, 12)
    contenders = []
    for seq, batch in HSA_SHAPES["quick" if ctx.quick else "full"]:
        common = dict(corpus="code", steps=steps, seq_len=seq, batch_size=batch, model={"max_seq_len": seq})
        group = [train_run(ctx, f"dense-{seq}", run_config(ctx, **common))]
        for name, pattern in HSA_PATTERNS:
            method = {"name": "mst", "sparsity": 0.0, "final_sparsity": 0.0, "update_every": steps,
                      "attention_start": 0.0, "attention_end": 1.0, **pattern}
            if ctx.quick:
                method.update(window=16, stride=32)
            group.append(train_run(ctx, f"{name}-{seq}", run_config(ctx, method=method, **common)))
        compare(ctx, group, baseline=f"dense-{seq}")
        contenders += group
    return {"contenders": contenders, "compared": True,
            "notes": ["Each pattern's ratios are to the dense run of the same sequence length (same tokens a step)."]}


SAT_STEP = {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5, "schedule": "constant", "dense_final": 0.0}
# The freeze of omitted slices as ~800 small kernels, the default before the compiled stash was measured faster.
SAT_STEP_EAGER_STASH = {**SAT_STEP, "compiled_stash": False}
SSD_STEP = {"name": "ssd", "experts": 16, "top_k": 4, "schedule": "fixed", "sparse_windows": [[0.0, 1.0]],
            "monitor_every": 0}  # the sparse phase alone
SAT_CPT = {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5, "schedule": "ladder"}
UPCYCLE = {"name": "upcycle", "experts": 8, "top_k": 2, "layers": "every-other"}

PARTS: dict[str, Part] = {
    "prepare-data": Part("prepare DATA/code and DATA/english from the carried corpora", run_prepare_data,
                         trains=False),
    "dense-step": Part("dense training step, gpt2-small and gpt2-medium", functools.partial(run_steps, methods=[]),
                       trains=False),
    "sat-step": Part("SAT step at omission 0.5 vs dense (and with the eager stash), gpt2-medium and llama-1b",
                     functools.partial(run_steps, methods=[("sat", SAT_STEP), ("sat-eager-stash", SAT_STEP_EAGER_STASH)],
                                       presets=("gpt2-medium", "llama-1b")),
                     ("sat",), trains=False),
    "ssd-step": Part("SSD sparse-phase step (relu2, 16 experts, top-4) vs dense, gpt2-medium",
                     functools.partial(run_steps, methods=[("ssd", SSD_STEP)], presets=("gpt2-medium",),
                                       model={"activation": "relu2"}), ("ssd",), trains=False),
    "sat-cpt": Part("continual pre-training code -> English, dense vs SAT (LORS; sampled and top-k selection)",
                    run_sat_cpt, ("sat",)),
    "two-gpu": Part("every method on one GPU vs two (torchrun DDP / FSDP2), same global batch", run_two_gpus,
                    ("sat", "upcycle", "ssd", "mst")),
    "hsa-attention": Part("hybrid sparse attention alone (MST, no weight sparsity) vs dense at 1024, 4096, 8192",
                          run_hsa, ("mst",)),
    "sat-sft": Part("fine-tuning on kernel-doc pairs (comment -> function), dense vs SAT (LORS; sampled and top-k "
                    "selection)", run_sat_sft, ("sat",)),
    "upcycle": Part("dense vs upcycled continuation at equal wall-clock", run_upcycle, ("upcycle",)),
    "ssd-pretrain": Part("pre-training dense vs SSD (relu2), both then run as MoEs", run_ssd_pretrain, ("ssd",)),
    "mst-pretrain": Part("pre-training dense vs MST (weight and neuron level)",
                         functools.partial(run_pretrain,
                                           contenders=[("mst-weight", {"name": "mst", "granularity": "weight"}),
                                                       ("mst-neuron", {"name": "mst", "granularity": "neuron"})],
                                           steps=1200, quick_options={"update_every": 4}),
                         ("mst",)),
}


# ---------------------------------------------------------------------------------------------------------------
# entry point


def scratch_dir(path: Path) -> Path:
    """Empty the suite's own scratch folder `path` (refusing one it did not make) and return it."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise UserError(f"{path} is not empty and was not made by the suite; pass another --work-dir")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path


def command_line(part: str, *, out: Path, data_dir: Path, work_dir: Path, carry: Path, quick: bool, device: str,
                 scale: float) -> str:
    args = ["sparsetrain", "bench", "--suite", part]
    if quick:
        args.append("--quick")
    args += ["--out", str(out)]
    if part == "prepare-data":
        args += ["--data-dir", str(data_dir), "--carry", str(carry)]
    elif not part.endswith("-step"):
        args += ["--data-dir", str(data_dir), "--work-dir", str(work_dir)]
        if scale != 1.0:
            args += ["--scale", f"{scale:g}"]
    if device != "auto":
        args += ["--device", device]
    return shlex.join(args)


def run_part(part: str, *, out: str | Path = "bench_out", data_dir: str | Path = "data/suite",
             work_dir: str | Path = "runs/suite", carry: str | Path = ".carry", quick: bool = False,
             device: str = "auto", scale: float = 1.0) -> dict[str, Any]:
    """Run one part; writes OUT/PART.json (and OUT/PART/ for trained runs) and returns what it wrote."""
    from .methods import REGISTRY

    if part not in PARTS:
        raise UserError(f"unknown suite part '{part}'; parts: {', '.join(PARTS)}")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got '{device}'")
    if not scale > 0:
        raise UserError(f"--scale must be positive, got {scale}")
    out, data_dir, work_dir, carry = Path(out), Path(data_dir), Path(work_dir), Path(carry)
    command = command_line(part, out=out, data_dir=data_dir, work_dir=work_dir, carry=carry, quick=quick,
                           device=device, scale=scale)
    spec = PARTS[part]
    result: dict[str, Any] = {"part": part, "summary": spec.summary, "command": command, "quick": quick,
                              "env": environment(), "status": "done"}
    cuda = torch.cuda.is_available() and device != "cpu"
    result["env"]["ran_on"] = "cuda" if cuda else "cpu"
    if cuda:
        result["env"]["peak_flops"] = peak_flops(torch.device("cuda"))
    out.mkdir(parents=True, exist_ok=True)
    missing = [m for m in spec.methods if m not in REGISTRY]
    if missing:
        result["status"] = "skipped"
        result["message"] = (f"method {', '.join(repr(m) for m in missing)} is not registered in "
                             f"sparsetrain.methods.REGISTRY (have: {', '.join(sorted(REGISTRY))}); "
                             "this part runs once it is")
        print(f"{part}: skipped: {result['message']}")
    else:
        ctx = Context(part, out, data_dir, work_dir, carry, quick, device, scale)
        if spec.trains:
            scratch_dir(work_dir / part)  # run folders (checkpoints)
            scratch_dir(out / part)  # the runs' metrics, copied beside PART.json
            result["shape"] = dataclasses.asdict(ctx.shape) | {"scale": scale}
        t0 = time.perf_counter()
        result.update(spec.run(ctx))
        result["elapsed_s"] = time.perf_counter() - t0
        if result.get("contenders"):
            if not result.get("compared"):  # a part with several baselines compares its groups itself
                compare(ctx, result["contenders"])
            print_table(result["contenders"], CONTENDER_COLUMNS)
        print(f"{part}: done in {result['elapsed_s']:.0f} s")
    path = out / f"{part}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"raw numbers: {path}")
    return result
