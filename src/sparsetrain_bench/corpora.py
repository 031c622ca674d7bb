"""The suite's data: the prepare-data part (the code and English corpora as token shards with one shared tokenizer,
each with a held-out set of at least the tokens every contender is evaluated on; the kernel-doc fine-tuning rows),
the checks the training parts make on what it prepared, and uniformly random tokens for timing the trainer.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sparsetrain.data.prepare import load_tokenizer, prepare
from sparsetrain.data.sft import prepare_sft, write_kernel_doc_jsonl
from sparsetrain.data.sources import sha256_file
from sparsetrain.data.tokens import TokenData
from sparsetrain.errors import UserError
from sparsetrain_bench.context import Context


def random_tokens(out: Path, vocab_size: int, train_tokens: int, val_tokens: int, seed: int = 0) -> Path:
    """A prepared-data folder of uniformly random tokens: a step's speed does not depend on which tokens it sees (its
    loss stays near ln(vocab_size))."""
    if not 2 <= vocab_size <= 2**16:
        raise UserError(f"random tokens need a vocabulary in [2, 65536] (uint16 tokens), got {vocab_size}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(out / f"{split}.bin")
    meta = {"dtype": "uint16", "vocab_size": vocab_size, "eot_id": 0, "train_tokens": train_tokens,
            "val_tokens": val_tokens, "note": "uniformly random tokens: for speed only"}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


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
                            f"--subset {corpus} --out {source}` (code: add --max-bytes 400M)")
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
