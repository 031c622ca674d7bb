"""The `sparsetrain` command. User mistakes (UserError) print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from sparsetrain.config import PRESET_NAMES
from sparsetrain.errors import UserError

CONFIG_KEYS_HELP = ("the keys a user reaches for first are in README.md, section Training; every key, with a comment, "
                    "in the dataclasses of src/sparsetrain/config.py; a method's own keys in its section of README.md "
                    "and its Options dataclass in src/sparsetrain/methods/")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless it has none (None, a flag's False) or the help says it in
    words (a default that depends on something else)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _command(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def _size(text: str) -> int:
    """'200M', '1.5G', '500k' or a plain number of bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9}
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (use e.g. 200M, 1G or a number of bytes)")


def cmd_data_prepare(a) -> None:
    from sparsetrain.data.prepare import describe, prepare

    meta = prepare(a.source, a.out, tokenizer=a.tokenizer, vocab_size=a.vocab_size, val_fraction=a.val_fraction,
                   max_bytes=a.max_bytes, subset=a.subset, text_field=a.text_field, split=a.split)
    print(describe(meta))


def cmd_data_export(a) -> None:
    from sparsetrain.data.prepare import export_jsonl

    info = export_jsonl(a.source, a.out, max_bytes=a.max_bytes, subset=a.subset, text_field=a.text_field)
    print(f"wrote {a.out}: {json.dumps(info)}")


def cmd_data_tokenizer(a) -> None:
    from sparsetrain.data.prepare import train_tokenizer

    info = train_tokenizer(a.source, a.out, vocab_size=a.vocab_size, sample_bytes=a.sample_bytes, subset=a.subset,
                           text_field=a.text_field)
    print(f"wrote {a.out}: {json.dumps(info)}")


def cmd_data_sft(a) -> None:
    from sparsetrain.data.sft import prepare_sft

    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; pass a new --out folder or delete it")
    meta = prepare_sft(a.source, a.tokenizer, out, prompt_field=a.prompt_field, response_field=a.response_field,
                       seq_len=a.seq_len, val_fraction=a.val_fraction)
    print(f"wrote {out}: {meta['train']['sequences']} train and {meta['val']['sequences']} validation rows of {a.seq_len} tokens")


def cmd_data_kernel_doc(a) -> None:
    from sparsetrain.data.sft import write_kernel_doc_jsonl

    out = Path(a.out)
    if out.exists():
        raise UserError(f"{out} already exists; pass a new --out file or delete it")
    counts = write_kernel_doc_jsonl(a.source, out, max_examples=a.max_examples, max_bytes=a.max_bytes,
                                    max_response_chars=a.max_response_chars)
    print(f"wrote {out}: {counts['examples']:,} prompt/response pairs from {counts['documents']:,} files")


def cmd_train(a) -> None:
    from sparsetrain import config
    from sparsetrain.training.loop import train

    out = Path(a.out)
    cfg_path = a.config
    if a.resume:
        cfg_path = cfg_path or out / "config.toml"
    elif a.init:
        from sparsetrain.store.checkpoint import find_weights

        init_cfg, _ = find_weights(a.init)
        cfg_path = cfg_path or init_cfg
    if cfg_path is None:
        raise UserError("pass --config FILE.toml (for example configs/tiny.toml)")
    overrides = list(a.set or [])
    if a.init:
        overrides.append(f'train.init_from="{a.init}"')
    cfg = config.load(cfg_path, overrides)
    summary = train(cfg, out, resume=a.resume)
    import torch.distributed as dist

    if dist.is_initialized():
        rank = dist.get_rank()
        dist.barrier()  # every rank done with its collectives before the group goes (a gloo teardown race)
        dist.destroy_process_group()
        if rank != 0:
            return
    if summary.get("val_loss") is not None:
        print(f"done: {summary['steps']} steps, val_loss {summary['val_loss']:.4f}, run in {out}")


def cmd_eval(a) -> None:
    from sparsetrain.cli.generate import model_tokenizer_for
    from sparsetrain.data.batches import TrainingData
    from sparsetrain.data.tokenizer_files import load_tokenizer, model_tokenizer, same_vocabulary
    from sparsetrain.training.build import load_model
    from sparsetrain.training.loop import evaluate
    from sparsetrain.training.runtime import setup_runtime

    model, method, cfg = load_model(a.run, overrides=a.set or [])
    data_dir = a.data or cfg.data.dir
    if not data_dir:
        raise UserError(f"{a.run} names no data folder (data.dir is empty, as for an imported model); pass --data "
                        f"DIR, a folder made by `sparsetrain data prepare --tokenizer {a.run}`")
    data = TrainingData(data_dir, cfg.train)
    if data.vocab_size > model.args.vocab_size:
        raise UserError(f"{data_dir} holds token ids up to {data.vocab_size - 1:,}, the model at {a.run} has "
                        f"{model.args.vocab_size:,} embeddings: the data was made with another tokenizer; prepare it "
                        f"with --tokenizer {a.run}")
    # the data must speak the model's tokenizer (--tokenizer, else its own): equal sizes do not make equal ids
    if (a.tokenizer or model_tokenizer(a.run)) and (Path(data_dir) / "tokenizer.json").is_file():
        model_tok, model_tok_json = model_tokenizer_for(a.run, model.args.vocab_size, a.tokenizer)
        if not same_vocabulary(model_tok, load_tokenizer(data_dir)):
            raise UserError(f"{data_dir} was tokenized with another tokenizer than the model's ({model_tok_json}); "
                            f"prepare it with --tokenizer {a.tokenizer or a.run}")
    if a.moe:
        from sparsetrain.methods.ssd.moefy import prepare_moe  # SSD: the dense model run as an MoE with top-K experts

        prepare_moe(model, a.run, a.moe, a.experts)
    rt = setup_runtime(cfg.train)
    model.to(rt.device)
    loss = evaluate(model, data, cfg.train, rt, None if a.moe else method, max_tokens=a.tokens)
    result = {"val_loss": loss, "perplexity": math.exp(min(loss, 50))}
    if a.moe:
        result["moe_top_k"] = a.moe
    print(json.dumps(result))


def cmd_convert_hf_import(a) -> None:
    from sparsetrain.store.hf import import_to_folder, tokenizer_note

    copied = import_to_folder(a.source, a.out)
    print(f"imported {a.source} into {a.out} {tokenizer_note(copied)}")


def cmd_generate(a) -> None:
    from sparsetrain.cli.generate import generate_both

    texts = generate_both(a.run, a.prompt, a.moe, a.experts, a.device, tokenizer=a.tokenizer, data=a.data,
                          max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k_sampling=a.top_k,
                          seed=a.seed)
    for name, text in texts.items():
        print(f"--- {name}\n{a.prompt}{text}")


def cmd_analyze(a) -> None:
    from sparsetrain.cli.analyze import analyze_run

    result = analyze_run(a.run, a.out, a.probe_tokens, a.experts, a.top_k, activation_threshold=a.threshold,
                         cluster=a.cluster, device=a.device)
    out = Path(a.out) if a.out else Path(a.run) / "analysis"
    print((out / "analysis.md").read_text())
    print(f"analysis of {len(result['steps'])} checkpoint(s) in {out} (analysis.json, analysis.md, plots)")


def cmd_convert_moefy(a) -> None:
    from sparsetrain.cli.convert import moefy_checkpoint

    out = moefy_checkpoint(a.source, a.out, a.experts, a.seed)
    print(f"moefied {a.source} into {out} ({a.experts} experts per FFN); run it as an MoE: "
          f"sparsetrain eval {out} --moe K")


def cmd_convert_densify(a) -> None:
    from sparsetrain.cli.convert import densify_checkpoint

    out = densify_checkpoint(a.source, a.out)
    print(f"densified {a.source} into {out}")


def cmd_convert_hf_export(a) -> None:
    import torch

    from sparsetrain.cli.generate import model_tokenizer_for
    from sparsetrain.data.tokenizer_files import model_tokenizer
    from sparsetrain.store.hf import copy_tokenizer, export_hf
    from sparsetrain.training.build import load_model

    model, _, _ = load_model(a.source)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    # the model's own tokenizer (--tokenizer, an imported model's, its run's data folder's), checked before writing
    tok_json = model_tokenizer_for(a.source, model.args.vocab_size, a.tokenizer)[1] if (
        a.tokenizer or model_tokenizer(a.source)) else None
    export_hf(model, a.out, dtype=dtype)
    if tok_json is None:
        print(f"exported {a.source} to {a.out} without a tokenizer ({a.source} has none; --tokenizer DIR adds one)")
        return
    copy_tokenizer(tok_json.parent, a.out)
    print(f"exported {a.source} to {a.out} with the tokenizer of {tok_json.parent}")


def _layers(text: str):
    """'every-other', 'all' or a comma-separated list of block indices."""
    if text in ("every-other", "all"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes every-other, all or indices like 1,3,5; got '{text}'")


def cmd_convert_upcycle(a) -> None:
    from sparsetrain import config
    from sparsetrain.cli.convert import carry_tokenizer
    from sparsetrain.methods import build_method
    from sparsetrain.methods.upcycle import moe_layers
    from sparsetrain.store.checkpoint import write_model_folder
    from sparsetrain.training.build import load_model

    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; pass a new --out folder or delete it")
    model, method, cfg = load_model(a.source)
    if method.name == "upcycle":
        raise UserError(f"{a.source} is already a Mixture-of-Experts; upcycle a dense model")
    given = {"experts": a.experts, "top_k": a.top_k, "layers": a.layers, "granularity": a.granularity,
             "drop_rate": a.drop_rate, "router": a.router, "capacity_factor": a.capacity_factor, "seed": a.seed}
    # Options not given take UpcycleOptions' defaults.
    upcycler = build_method({"name": "upcycle", **{k: v for k, v in given.items() if v is not None}}, model.args,
                            cfg.train.seq_len)
    upcycler.convert(model)
    cfg.method = upcycler.options_dict()
    write_model_folder(out, config.dumps(config.to_dict(cfg)), model.state_dict())
    carry_tokenizer(a.source, out)
    n_moe = len(moe_layers(model))
    o = upcycler.options
    print(f"upcycled {a.source}: {n_moe} of {model.args.n_layer} FFNs are now {o.experts} experts, top-{o.top_k}; "
          f"wrote {out}. Train it with: sparsetrain train --init {out} --out RUN_DIR")


def cmd_bench(a) -> None:
    if a.suite:
        from sparsetrain_bench.suite import PARTS, run_part

        # "all": every part in turn (on a machine without a per-call limit), then the report.
        parts = list(PARTS) if a.suite == "all" else [a.suite]
        for part in parts:
            run_part(part, out=a.out or "bench_out", data_dir=a.data_dir, work_dir=a.work_dir, carry=a.carry,
                     quick=a.quick, device=a.device, scale=a.scale, presets=tuple(a.preset or ()),
                     contenders=tuple(a.contenders or ()), budgets=tuple(a.budgets or ()), resume=a.resume)
        if a.suite == "all":
            from sparsetrain_bench.report import write_report

            out = Path(a.out or "bench_out")
            print(f"report: {write_report([out / f'{p}.json' for p in parts], out / 'report')}")
        return
    if a.contenders or a.budgets or a.resume:
        raise UserError("--contenders, --budgets and --resume go with --suite PART (a training part of the suite)")
    a.out = a.out or "bench_out/dense.json"
    a.preset = a.preset or ["gpt2-small", "gpt2-medium"]
    from sparsetrain.config import apply_overrides
    from sparsetrain_bench.steps import run_dense_bench, run_method_bench

    def section(name: str, items: list[str] | None) -> dict:
        """`--model-set KEY=VALUE` (or model.KEY=VALUE) items as the config reads `--set` ones."""
        prefixed = [i if i.startswith(name + ".") else f"{name}.{i}" for i in items or []]
        return apply_overrides({}, prefixed).get(name, {})

    overrides = section("model", a.model_set)
    if a.method != "dense":
        run_method_bench(a.preset, [{"name": a.method, **section("method", a.method_set)}],
                         batch_size=a.batch_size, micro_batch_size=a.micro_batch_size, seq_len=a.seq_len,
                         steps=a.steps, vocab_size=a.vocab_size, out=a.out, compile_model=not a.no_compile,
                         model_overrides=overrides)
        return
    run_dense_bench(presets=a.preset, batch_size=a.batch_size, micro_batch_size=a.micro_batch_size,
                    seq_len=a.seq_len, steps=a.steps, vocab_size=a.vocab_size, out=a.out,
                    compile_model=not a.no_compile, model_overrides=overrides)


def cmd_report(a) -> None:
    from sparsetrain_bench.report import write_report

    path = write_report([Path(p) for p in a.results], Path(a.out))
    print(f"report: {path}")


def cmd_demo(a) -> None:
    from sparsetrain.cli.demo import run_demo

    run_demo(Path(a.out), data_dir=Path(a.data), steps=a.steps, max_bytes=a.max_bytes, continue_steps=a.continue_steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsetrain",
        description="Train transformers faster by exploiting sparsity (SAT, sparse upcycling, SSD, MST), measured "
                    "against a dense baseline. `sparsetrain demo` shows every method on CPU in a few minutes.")
    sub = p.add_subparsers(dest="command", required=True)
    add_data_commands(sub)
    add_run_commands(sub)
    add_convert_commands(sub)
    add_benchmark_commands(sub)
    return p


def add_reading_options(parser, max_bytes: bool = True) -> None:
    """How a source's text is read: the options `data prepare`, `export` and `tokenizer` share."""
    if max_bytes:
        parser.add_argument("--max-bytes", type=_size, help="read at most this much text, e.g. 200M (default: all)")
    parser.add_argument("--subset", default="code", choices=["code", "english"], help="for linux-source")
    parser.add_argument("--text-field", default="text", help="for .jsonl, .parquet and datasets")


def add_data_commands(sub) -> None:
    data = _command(sub, "data", help="prepare token shards").add_subparsers(dest="data_command", required=True)
    prep = _command(data, "prepare", help="text -> train.bin / val.bin / meta.json / tokenizer.json")
    prep.add_argument("--source", required=True,
                      help="a file or folder (.txt .jsonl .parquet, .xz/.gz), stdlib, site-packages, "
                           "linux-source, a saved Hugging Face dataset folder, or hf:NAME[:CONFIG]")
    prep.add_argument("--out", required=True, help="the data folder to write (new or empty)")
    prep.add_argument("--tokenizer", help="a tokenizer.json or a folder holding one: a data, run or model folder "
                      "(default: train a byte-level BPE of --vocab-size on the text)")
    prep.add_argument("--vocab-size", type=int, default=32768,
                      help="entries of the trained BPE (the README's stdlib example and the demo use 4096)")
    prep.add_argument("--val-fraction", type=float, default=0.01,
                      help="share of whole documents held out for validation, chosen by a hash of their names")
    add_reading_options(prep)
    prep.add_argument("--split", default="train", help="for hf:NAME")
    prep.set_defaults(func=cmd_data_prepare)
    exp = _command(data, "export", help="write a source's documents as (xz-compressed) JSONL")
    exp.add_argument("--source", required=True, help="the same forms as `data prepare --source`")
    exp.add_argument("--out", required=True, help="e.g. corpus.jsonl.xz")
    add_reading_options(exp)
    exp.set_defaults(func=cmd_data_export)

    tk = _command(data, "tokenizer", help="train one byte-level BPE on an even mix of several sources")
    tk.add_argument("--source", action="append", required=True, help="repeat for each source (same forms as prepare)")
    tk.add_argument("--out", required=True, help="the tokenizer.json to write")
    tk.add_argument("--vocab-size", type=int, default=32768, help="entries of the BPE")
    tk.add_argument("--sample-bytes", type=_size, default=_size("50M"), help="text to train on, all sources together")
    add_reading_options(tk, max_bytes=False)
    tk.set_defaults(func=cmd_data_tokenizer)

    sft = _command(data, "sft", help="prompt/response or chat JSONL -> packed fine-tuning rows (loss on responses)")
    sft.add_argument("--source", required=True, help="a .jsonl file: prompt/response fields or chat `messages`")
    sft.add_argument("--tokenizer", required=True, help="a tokenizer.json, or a folder holding one (data or model)")
    sft.add_argument("--out", required=True, help="the data folder to write (new or empty)")
    sft.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (train with the same seq_len)")
    sft.add_argument("--prompt-field", default="prompt", help="the JSONL field holding the prompt")
    sft.add_argument("--response-field", default="response", help="the JSONL field holding the response")
    sft.add_argument("--val-fraction", type=float, default=0.05, help="share of the rows held out for validation")
    sft.set_defaults(func=cmd_data_sft)

    kd = _command(data, "kernel-doc", help="a prompt/response JSONL from C sources: kernel-doc comment -> function")
    kd.add_argument("--source", required=True, help="linux-source, or C files (a folder, file or JSONL of them)")
    kd.add_argument("--out", required=True, help="the .jsonl to write (then `data sft` packs it)")
    kd.add_argument("--max-examples", type=int, default=0, help="stop after this many pairs (0 = all)")
    kd.add_argument("--max-bytes", type=_size, help="read at most this much source text (default: all)")
    kd.add_argument("--max-response-chars", type=int, default=2000, help="leave out longer functions")
    kd.set_defaults(func=cmd_data_kernel_doc)


def add_run_commands(sub) -> None:
    tr = _command(sub, "train", help="train a model", epilog=f"Config keys (--config, --set): {CONFIG_KEYS_HELP}.")
    tr.add_argument("--config", help="TOML config, e.g. configs/tiny.toml (default with --resume: RUN_DIR/config.toml; "
                    "with --init: that folder's config)")
    tr.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="override a config key, e.g. train.steps=400 or method.name=ssd (repeatable; the keys: see "
                         "below)")
    tr.add_argument("--out", required=True, help="run folder")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--init", help="start from the weights of a run, checkpoint or converted model folder")
    tr.set_defaults(func=cmd_train)

    ev = _command(sub, "eval", help="validation loss and perplexity of a run or model folder")
    ev.add_argument("run", help="a run, checkpoint or model folder")
    ev.add_argument("--data", help="prepared data folder (default: the run's data.dir; an imported model has none)")
    ev.add_argument("--tokenizer", help="the model's tokenizer (a folder holding tokenizer.json; default: the model's "
                    "own), which the data must have been prepared with")
    ev.add_argument("--tokens", type=int, help="validation tokens (default: train.eval_tokens)")
    ev.add_argument("--moe", type=int, metavar="K", help="run every FFN as an MoE with top-K experts (SSD)")
    ev.add_argument("--experts", type=int, help="with --moe: experts per FFN (default: the run's, else 16)")
    ev.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="override a key of the run's config, e.g. train.seq_len=128")
    ev.set_defaults(func=cmd_eval)

    ge = _command(sub, "generate", help="sample text from a run or model folder (dense, and as an MoE with --moe)")
    ge.add_argument("run", help="a run, checkpoint or model folder")
    ge.add_argument("--prompt", required=True, help="the text to continue")
    ge.add_argument("--tokenizer", help="a folder holding tokenizer.json (default: the model's own: an imported "
                    "model's, or the run's data folder's)")
    ge.add_argument("--data", help="a prepared data folder whose tokenizer to use")
    ge.add_argument("--moe", type=int, metavar="K", help="also generate with every FFN run as a top-K MoE (SSD)")
    ge.add_argument("--experts", type=int, help="with --moe: experts per FFN (default: the run's, else 16)")
    ge.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate")
    ge.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    ge.add_argument("--top-k", type=int, default=50, help="sample among the K likeliest tokens (0 = all)")
    ge.add_argument("--seed", type=int, default=0, help="sampling seed")
    ge.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ge.set_defaults(func=cmd_generate)

    an = _command(sub, "analyze", help="activation sparsity and stability over a run's checkpoints (the SSD study)")
    an.add_argument("run", help="a run folder with checkpoints")
    an.add_argument("--out", help="folder for analysis.json/.md and plots (default: RUN/analysis)")
    an.add_argument("--probe-tokens", type=int, default=4096, help="validation tokens each checkpoint is probed on")
    an.add_argument("--experts", type=int, default=16, help="experts each FFN is clustered into")
    an.add_argument("--top-k", type=int, default=4, help="experts per token when measuring the captured mass")
    an.add_argument("--threshold", type=float, default=0.01, help="|activation| below this counts as zero (smooth)")
    an.add_argument("--cluster", default="weights", choices=["weights", "coactivation"],
                    help="cluster neurons by their input weights or by their firing on the probe")
    an.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    an.set_defaults(func=cmd_analyze)


def add_convert_commands(sub) -> None:
    conv = _command(sub, "convert", help="convert models").add_subparsers(dest="convert_command", required=True)
    hi = _command(conv, "hf-import", help="a local Hugging Face Llama / Qwen2 / Mistral / Mixtral / GPT-2 folder -> "
                  "a sparsetrain model folder, with its tokenizer")
    hi.add_argument("--from", dest="source", required=True, help="the Hugging Face model folder")
    hi.add_argument("--out", required=True, help="the model folder to write")
    hi.set_defaults(func=cmd_convert_hf_import)
    he = _command(conv, "hf-export", help="a sparsetrain run or model folder -> a Hugging Face folder")
    he.add_argument("--from", dest="source", required=True, help="a run, checkpoint or model folder")
    he.add_argument("--out", required=True, help="the Hugging Face folder to write")
    he.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights' dtype")
    he.add_argument("--tokenizer", help="a folder holding tokenizer.json (default: the model's own)")
    he.set_defaults(func=cmd_convert_hf_export)

    up = _command(conv, "upcycle", help="a dense run or model folder -> a Mixture-of-Experts model folder")
    up.add_argument("--from", dest="source", required=True, help="a dense run, checkpoint or model folder")
    up.add_argument("--out", required=True, help="the model folder to write")
    # No defaults here: an option not given takes upcycling's own (methods.upcycle.UpcycleOptions), which also
    # checks the values.
    up.add_argument("--experts", type=int, help="experts per MoE layer (default: 8)")
    up.add_argument("--top-k", type=int, help="experts per token (default: 2)")
    up.add_argument("--layers", type=_layers, help="every-other, all, or e.g. 1,3,5 (default: every-other)")
    up.add_argument("--granularity", type=int, help="split each FFN into G shards (fine-grained experts; default: 1)")
    up.add_argument("--drop-rate", type=float, help="Drop-Upcycling: share of neurons re-initialised (default: 0)")
    up.add_argument("--router", help="softmax_then_topk (default), topk_then_softmax or expert_choice")
    up.add_argument("--capacity-factor", type=float, help="token choice: 0 = dropless (default: 0); expert_choice needs one, e.g. 2.0")
    up.add_argument("--seed", type=int, help="seed of the router and of Drop-Upcycling (default: 0)")
    up.set_defaults(func=cmd_convert_upcycle)

    mo = _command(conv, "moefy", help="cluster every FFN into experts (SSD's MoEfication) -> a model folder")
    mo.add_argument("--from", dest="source", required=True, help="a dense run, checkpoint or model folder")
    mo.add_argument("--out", required=True, help="the model folder to write")
    mo.add_argument("--experts", type=int, default=16, help="experts per FFN")
    mo.add_argument("--seed", type=int, default=0, help="k-means seed")
    mo.set_defaults(func=cmd_convert_moefy)
    dn = _command(conv, "densify", help="a moefied folder -> the dense model with its neurons in the original order")
    dn.add_argument("--from", dest="source", required=True, help="a folder written by `convert moefy`")
    dn.add_argument("--out", required=True, help="the model folder to write")
    dn.set_defaults(func=cmd_convert_densify)


def add_benchmark_commands(sub) -> None:
    be = _command(sub, "bench", help="training-step speed on the GPU (tokens/s, MFU), a method against dense")
    be.add_argument("--preset", nargs="+", choices=PRESET_NAMES, metavar="PRESET",
                    help=f"model presets to time, one or more of: {', '.join(PRESET_NAMES)} (default gpt2-small "
                    "gpt2-medium; with a --suite step part: its own models; with a training part: its one model, e.g. "
                    "sat-cpt at gpt2-medium)")
    be.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    be.add_argument("--micro-batch-size", type=int, default=0, help="0 = the whole batch in one pass")
    be.add_argument("--model-set", action="append", metavar="model.KEY=VALUE", help="override a model key")
    be.add_argument("--method", default="dense", help="time this method side by side with dense")
    be.add_argument("--method-set", action="append", metavar="method.KEY=VALUE", help="a method option")
    be.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    be.add_argument("--steps", type=int, default=30, help="timed steps (after warm-up)")
    be.add_argument("--vocab-size", type=int, default=50304, help="vocabulary of the random tokens and the model")
    be.add_argument("--no-compile", action="store_true", help="time the eager model (torch.compile is the default)")
    be.add_argument("--out", help="a JSON file (default bench_out/dense.json); with --suite a folder (default bench_out)")
    be.add_argument("--suite", metavar="PART", help="one part of the benchmark suite: prepare-data, dense-step, "
                    "sat-step, ssd-step, sat-cpt, sat-sft, upcycle, ssd-pretrain, mst-pretrain, hsa-attention, "
                    "two-gpu, or all (see docs/suite.md)")
    be.add_argument("--quick", action="store_true", help="with --suite: tiny model, few steps (a CPU smoke test)")
    be.add_argument("--data-dir", default="data/suite", help="with --suite: prepared corpora DIR/code, DIR/english")
    be.add_argument("--work-dir", default="runs/suite", help="with --suite: scratch run folders (checkpoints)")
    be.add_argument("--carry", default=".carry",
                    help="with --suite prepare-data: code.jsonl.xz, english.jsonl.xz and tokenizer.json")
    be.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="with --suite")
    be.add_argument("--scale", type=float, default=1.0, help="with --suite: multiply a part's training steps")
    be.add_argument("--contenders", nargs="+", metavar="NAME",
                    help="with --suite: run only these contenders of a training part (dense = its frontier), to "
                    "split it over GPUs run at once; `sparsetrain report` merges the processes' results")
    be.add_argument("--budgets", nargs="+", type=float, metavar="X",
                    help="with --suite: dense's frontier budgets in multiples of the methods' steps, 1 among them "
                    "(default 0.5 1 1.5 2)")
    be.add_argument("--resume", action="store_true",
                    help="with --suite: keep the part's run folders from an earlier call: finished runs are read back, "
                    "runs its time limit cut continue from their last checkpoint")
    be.set_defaults(func=cmd_bench)

    rp = _command(sub, "report", help="merge benchmark-suite results (PART.json) into report.md and plots")
    rp.add_argument("results", nargs="+", help="PART.json files written by `sparsetrain bench --suite`")
    rp.add_argument("--out", default="bench_out/report", help="folder for report.md and the plots")
    rp.set_defaults(func=cmd_report)

    de = _command(sub, "demo", help="the main job: prepare the stdlib corpus, train the tiny model, write a report")
    de.add_argument("--out", default="runs/demo", help="folder for the runs and report.md (replaced)")
    de.add_argument("--data", default="data/stdlib", help="the corpus folder (prepared on the first run, then reused)")
    de.add_argument("--steps", type=int, default=100, help="pre-training steps per method")
    de.add_argument("--continue-steps", type=int, help="steps of the dense/SAT/upcycled continuation (default: "
                    "steps/2)")
    de.add_argument("--max-bytes", type=_size, default=_size("8M"), help="stdlib text to prepare (bytes)")
    de.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        sys.stderr.write(f"sparsetrain: error: {e}\n")  # one write: under torchrun every process says it
        return 2
    except KeyboardInterrupt:
        print("sparsetrain: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
