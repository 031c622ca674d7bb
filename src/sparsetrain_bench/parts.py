"""The parts that train or time contenders against dense in one process: step times (dense-step, sat-step,
ssd-step), continuation from the shared code base (sat-cpt, sat-sft, upcycle), pre-training from scratch (ssd-pretrain
with its MoE inference, mst-pretrain) and hybrid sparse attention alone (hsa-attention).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from sparsetrain.data.batches import TrainingData
from sparsetrain.methods.ssd.moefy import fit_routers, prepare_moe, route_ffns, run_dense
from sparsetrain.training.build import load_model
from sparsetrain.training.loop import evaluate
from sparsetrain.training.runtime import setup_runtime
from sparsetrain_bench.comparison import compare, iso_loss
from sparsetrain_bench.context import STEP_FULL, STEP_QUICK, Context
from sparsetrain_bench.corpora import corpus_dir, same_tokenizer, sft_dir
from sparsetrain_bench.isoloss import dense_frontier, with_wsd
from sparsetrain_bench.report import STEP_COLUMNS
from sparsetrain_bench.runs import (SEED, code_base, eval_run, part_peak, release_memory, run_config, start_point,
                                    train_run)
from sparsetrain_bench.steps import bench_config, kernel_table, measure_steps, median_ms, print_table

SAT_CPT = {"name": "sat", "ffn_rate": 0.5, "head_rate": 0.5, "schedule": "ladder"}
UPCYCLE = {"name": "upcycle", "experts": 8, "top_k": 2, "layers": "every-other"}
# Pre-training from scratch at the protocol's scale: 100M tokens a method (6,104 steps of 16 x 1024).
PROTOCOL_STEPS = 6104


def run_steps(ctx: Context, methods: list[tuple[str, dict[str, Any]]], presets: tuple[str, ...] | None = None,
              model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Step time of dense and each method (label, options), side by side on each preset (random tokens: speed does
    not depend on them). The trainer's own step, timed by `measure_steps`. `presets` (full runs; the command's
    --preset before them) and `model` options narrow or change the models of the step shape."""
    s = STEP_QUICK if ctx.quick else STEP_FULL
    if (ctx.presets or presets) and not ctx.quick:
        s = dataclasses.replace(s, presets=ctx.presets or presets)
    rows = []
    for preset in s.presets:
        dense = None
        for label, method in [("dense", {"name": "dense"}), *methods]:
            if method.get("kernel") == "triton" and not ctx.cuda:  # the interpreter takes minutes a step
                print(f"{ctx.part}: {label} skipped: the Triton kernels run on a GPU")
                continue
            cfg = bench_config(preset, batch_size=s.batch_size, seq_len=s.seq_len, vocab_size=s.vocab_size,
                               method=method, model_overrides=model)
            cfg.train.device = ctx.device
            r = measure_steps(cfg, steps=s.steps, warmup=s.warmup, compile_model=ctx.cuda)
            r["method"], r["method_options"] = label, method
            dense = dense or r
            r["speedup"] = dense["step_s"] / r["step_s"]
            r["stream_speedup"] = dense["stream_step_s"] / r["stream_step_s"]
            r["flops_ratio"] = r["dense_flops_per_token"] / r["flops_per_token"]
            rows.append(r)
            print(json.dumps(r), flush=True)
            release_memory()
    print_table(rows, STEP_COLUMNS)
    return {"rows": rows, "shape": dataclasses.asdict(s) | {"model": model or {}}}


def dense_vs_sat_from_a_base(ctx: Context, *, corpus: str, data: Path, steps: int,
                             lr: float) -> tuple[list[dict[str, Any]], float]:
    """A dense base trained on code, its validation loss on `data` (the continuation's held-out set), then SAT (LORS)
    continued from it on `corpus` and dense at four budgets around SAT's steps (the frontier, `isoloss`), all on the
    `wsd` schedule: the contenders, with that loss at the head of every curve, and the loss. SAT runs twice: with
    its default selection (top-k) and sampling in proportion to the score (`sat-sample`), the default until top-k
    lost less validation loss in both comparisons run (H200, gpt2-small: +3.4% vs +8.9% at equal steps; CPU, tiny:
    +1.8% vs +3.1%)."""
    base = code_base(ctx)
    start = eval_run(base["run_dir"], data)
    print(f"{ctx.part}: the base model's validation loss on {data.name} before continuing: {start:.4f}")
    common = dict(corpus=corpus, steps=steps, init_from=base["run_dir"], seed=SEED + 1, lr=lr)
    runs = dense_frontier(ctx, run_config(ctx, **common)) if ctx.wants("dense") else []
    runs += [train_run(ctx, name, with_wsd(run_config(ctx, method=method, **common)))
             for name, method in (("sat", SAT_CPT), ("sat-sample", {**SAT_CPT, "select": "sample"}))
             if ctx.wants(name)]
    for c in runs:
        start_point(c, start)
    return [base, *runs], start


def run_sat_cpt(ctx: Context) -> dict[str, Any]:
    """Dense base on code, then continual pre-training on English: dense vs SAT (LORS), same tokens."""
    english = corpus_dir(ctx, "english")
    same_tokenizer(corpus_dir(ctx, "code"), english)
    contenders, start = dense_vs_sat_from_a_base(ctx, corpus="english", data=english, steps=ctx.steps(400, 16),
                                                 lr=3e-4)
    note = (f"The base model (code, {contenders[0]['steps']} steps) has English validation loss {start:.4f} before "
            "continuing: the first point of every curve.")
    return {"contenders": contenders, "start_val_loss": start, "notes": [note], "iso_loss": iso_loss(contenders)}


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
    return {"contenders": contenders, "start_val_loss": start, "notes": [note], "iso_loss": iso_loss(contenders)}


def run_upcycle(ctx: Context) -> dict[str, Any]:
    """Dense base, then the upcycled MoE continued for 800 steps against dense continued at four budgets around that
    (the frontier), all on the `wsd` schedule: the MoE's speed-up at equal quality (its slower steps included)."""
    base = code_base(ctx)
    steps = ctx.steps(800, 16)
    common = dict(corpus="code", init_from=base["run_dir"], seed=SEED + 1, lr=3e-4, steps=steps)
    runs = dense_frontier(ctx, run_config(ctx, **common)) if ctx.wants("dense") else []
    if ctx.wants("upcycle"):
        runs.append(train_run(ctx, "upcycle", with_wsd(run_config(ctx, method=UPCYCLE, **common))))
    for c in runs:
        start_point(c, base["val_loss"])
    contenders = [base, *runs]
    return {"contenders": contenders, "iso_loss": iso_loss(contenders)}


def run_pretrain(ctx: Context, contenders: list[tuple[str, dict[str, Any]]], model: dict[str, Any] | None = None,
                 steps: int = PROTOCOL_STEPS, quick_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dense at four budgets (the frontier, `isoloss.dense_frontier`) and each method at the middle one, from scratch
    on code, the same tokens, all on the `wsd` schedule; each method's speed-up at equal quality ("iso_loss").
    `quick_options` are added to every method's options under --quick (so that a run of a few steps still goes
    through the method's schedule)."""
    n = ctx.steps(steps, 20)
    runs = dense_frontier(ctx, run_config(ctx, corpus="code", steps=n, model=model)) if ctx.wants("dense") else []
    for name, method in contenders:
        if not ctx.wants(name):
            continue
        if ctx.quick:
            method = {**method, **(quick_options or {})}
        raw = with_wsd(run_config(ctx, corpus="code", steps=n, model=model, method=method))
        runs.append(train_run(ctx, name, raw))
    return {"contenders": runs, "iso_loss": iso_loss(runs)}


@torch.no_grad()
def inference_times(model: torch.nn.Module, x: torch.Tensor, rt, compiled: bool,
                    cuda_graphs: bool = False, profile: bool = False) -> dict[str, float]:
    """Prefill of the batch `x` (the whole model) and its FFNs alone (on the hidden states the batch gives them), ms,
    dense and as an MoE, for a model run as an MoE (`prepare_moe` / `run_as_moe`; left as it was). As a serving
    stack runs a model: a copy in the compute dtype `rt.dtype`, end to end, without autocast (fp32 weights would be
    cast in every call, and autocast's fp32 norms would hand every FFN fp32 inputs to cast).
    `compiled`: timed compiled, as every contender (static shapes: see Method.static_shapes); each mode compiles its
    graphs in its first warm-up call. `cuda_graphs` (compiled only): each compiled call replays as one CUDA graph, as
    a serving stack runs a prefill, so neither mode pays the host's launches (an MoE FFN launches ~10 kernels, a
    dense one 3); the FFNs' inputs are marked static, so no replay copies them in (inside a prefill they are made
    in the graph). `profile`: print the profiler's table of the FFNs' kernels in each mode (where the MoE's time
    goes)."""
    model = copy.deepcopy(model).to(rt.dtype)
    inputs = []  # every FFN's input on this batch (the same for both timings)
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks]
    route_ffns(model, False)
    model(x)
    for h in hooks:
        h.remove()
    if cuda_graphs:
        for h in inputs:
            torch._dynamo.mark_static_address(h)
    mode = "reduce-overhead" if cuda_graphs else None
    timed_model = torch.compile(model, dynamic=False, mode=mode) if compiled else model
    timed_ffns = [torch.compile(b.mlp, dynamic=False, mode=mode) if compiled else b.mlp for b in model.blocks]

    def prefill():
        torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are not read again
        timed_model(x)

    def ffns():
        torch.compiler.cudagraph_mark_step_begin()
        for ffn, h in zip(timed_ffns, inputs):
            ffn(h)

    times = {}
    for mode in ("dense", "moe"):
        route_ffns(model, mode == "moe")
        times[f"prefill_ms_{mode}"] = median_ms(prefill)
        times[f"ffn_ms_{mode}"] = median_ms(ffns)
        if profile:
            print(f"the FFNs' kernels, {mode}\n{kernel_table(ffns, rows=20)}", flush=True)
    times["prefill_speedup"] = times["prefill_ms_dense"] / times["prefill_ms_moe"]
    times["ffn_speedup"] = times["ffn_ms_dense"] / times["ffn_ms_moe"]
    return times


@torch.no_grad()
def moe_inference(ctx: Context, run_dir: str, top_k: int = 4, experts: int = 16) -> dict[str, Any]:
    """A trained model run dense and as an MoE (SSD's sparse inference, top-`top_k` of `experts`): validation loss,
    prefill time of one batch (whole model), and the FFNs' time alone on the hidden states of that batch."""
    model, _, cfg = load_model(run_dir)
    rt = setup_runtime(cfg.train)
    prepare_moe(model, run_dir, top_k, experts)  # clusters; the model is an MoE from here
    model.to(rt.device).eval()
    data = TrainingData(corpus_dir(ctx, "code"), cfg.train)
    x, _ = next(iter(data.eval_batches(ctx.shape.batch_size, ctx.shape.batch_size * ctx.shape.seq_len)))
    result: dict[str, Any] = {"top_k": top_k, "experts": experts, "tokens": x.numel(), "compiled": ctx.cuda}
    result.update(inference_times(model, x.to(rt.device), rt, compiled=ctx.cuda))
    for mode in ("dense", "moe"):
        route_ffns(model, mode == "moe")
        result[f"val_loss_{mode}"] = evaluate(model, data, cfg.train, rt, None)
    # The same MoE with linear routers fitted on training tokens (SSD's router = "trained"): the routing's share of
    # the gap. Only the routers change: the FFN time is the centroid MoE's.
    probe, _ = data.loader.next_batch()
    fit_routers(model, probe[:8].to(rt.device))
    result["val_loss_moe_trained"] = evaluate(model, data, cfg.train, rt, None)
    run_dense(model)
    result["val_gap"] = (result["val_loss_moe"] - result["val_loss_dense"]) / result["val_loss_dense"]
    result["val_gap_trained"] = (result["val_loss_moe_trained"] - result["val_loss_dense"]) / result["val_loss_dense"]
    del model
    release_memory()
    return result


def run_ssd_pretrain(ctx: Context) -> dict[str, Any]:
    """Dense vs SSD from scratch (relu2), then both trained models run as MoEs (top-4 of 16): SSD's inference."""
    result = run_pretrain(ctx, [("ssd", {"name": "ssd"})], model={"activation": "relu2"},
                          quick_options={"schedule": "fixed", "sparse_windows": [[0.3, 0.7]]})
    result["moe_inference"] = {}
    for c in [c for c in result["contenders"] if c["name"] in ("dense", "ssd")]:
        r = moe_inference(ctx, c["run_dir"])
        result["moe_inference"][c["name"]] = r
        print(f"ssd-pretrain: {c['name']} as MoE top-{r['top_k']}/{r['experts']}: val loss {r['val_loss_dense']:.4f} "
              f"dense, {r['val_loss_moe']:.4f} MoE ({100 * r['val_gap']:+.2f}%); FFN {r['ffn_ms_dense']:.2f} -> "
              f"{r['ffn_ms_moe']:.2f} ms ({r['ffn_speedup']:.2f}x), prefill {r['prefill_ms_dense']:.2f} -> "
              f"{r['prefill_ms_moe']:.2f} ms ({r['prefill_speedup']:.2f}x)", flush=True)
    return result


# Hybrid sparse attention alone (MST with no weight sparsity): (name, pattern options) per sequence length, at the
# same tokens per step; `hybrid` is the union of a local band and a strided pattern (a stride of 128, the authors',
# hits every 128-key block, so it computes all of them: 256 skips some).
HSA_PATTERNS = [("local", {"attention": "local", "window": 128}),
                ("hybrid", {"attention": "hybrid", "window": 128, "stride": 256})]
HSA_SHAPES = {"full": ((1024, 16), (4096, 4), (8192, 2)), "quick": ((64, 8), (128, 4))}
# What --contenders picks: a length's frontier (dense-4096) or one pattern at one length (hybrid-4096).
HSA_CONTENDERS = tuple(f"{name}-{seq}" for shapes in HSA_SHAPES.values() for seq, _ in shapes
                       for name in ["dense", *(n for n, _ in HSA_PATTERNS)])


def run_hsa(ctx: Context) -> dict[str, Any]:
    """Dense (causal SDPA) vs sparse attention patterns (FlexAttention block masks, every layer, the whole run) at
    each sequence length, the same tokens: validation loss and wall-clock, ratios to the dense run of that length,
    and each pattern's speed-up at equal quality against dense at four budgets of that length."""
    steps = ctx.steps(300, 12)
    contenders, iso = [], {}
    for seq, batch in HSA_SHAPES["quick" if ctx.quick else "full"]:
        # --contenders picks lengths and runs by name (dense-4096: that length's frontier; local-4096, hybrid-4096):
        # the lengths can train at once on separate GPUs, each a whole comparison.
        names = [f"dense-{seq}"] + [f"{name}-{seq}" for name, _ in HSA_PATTERNS]
        if not any(ctx.wants(n) for n in names):
            continue
        common = dict(corpus="code", steps=steps, seq_len=seq, batch_size=batch, model={"max_seq_len": seq})
        group = dense_frontier(ctx, run_config(ctx, **common), prefix=names[0]) if ctx.wants(names[0]) else []
        for name, pattern in HSA_PATTERNS:
            if not ctx.wants(f"{name}-{seq}"):
                continue
            method = {"name": "mst", "sparsity": 0.0, "final_sparsity": 0.0, "update_every": steps,
                      "attention_start": 0.0, "attention_end": 1.0, **pattern}
            if ctx.quick:
                method.update(window=16, stride=32)
            group.append(train_run(ctx, f"{name}-{seq}", with_wsd(run_config(ctx, method=method, **common))))
        compare(group, part_peak(ctx), baseline=f"dense-{seq}")
        iso |= iso_loss(group)
        contenders += group
    return {"contenders": contenders, "compared": True, "iso_loss": iso,
            "notes": ["Each pattern is read against dense at its own sequence length (the same tokens a step): "
                      "ratios to the dense run of the pattern's steps, and the speed-up at equal quality against "
                      "dense at 0.5x-2x those steps."]}
