"""Preparing token data: turn text into token shards with a tokenizer (trained or given), and describe the result.

A prepared data dir (nanoGPT-style flat token files):
    train.bin, val.bin   raw numpy arrays, uint16 when every token id fits (vocab <= 65536), else uint32;
                         each document's tokens are followed by the end-of-text token
    tokenizer.json       the Hugging Face `tokenizers` file that produced them
    meta.json            counts, dtype, eot_id, sha256 of the shards and where the text came from

Sources (files, folders, stdlib, site-packages, linux-source, Hugging Face datasets) live in sources.py; documents
are read in parts (documents.py) and tokenized in pieces (bpe.py), so memory stays bounded for a document of any size.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from sparsetrain import __version__
from sparsetrain.data.bpe import EOT, cuts_are_safe, pieces, train_bpe
from sparsetrain.data.sources import Source, empty_corpus, iter_documents, known_total, open_source, sha256_file
from sparsetrain.data.tokenizer_files import (SPECIAL_IDS_FILE, TOKENIZER_FILES, copy_tokenizer_files, eos_token,
                                              load_tokenizer, tokenizer_file)
from sparsetrain.errors import UserError
from sparsetrain.progress import progress_bar

MAX_VOCAB = 2**32  # ids must fit uint32
# Text per encode_batch call: 16 pieces keep 16 cores busy; memory ~ 100 bytes per character in flight.
ENCODE_BATCH_CHARS = 4 << 20
ENCODE_BATCH_PIECES = 4096


# ---------------------------------------------------------------------------------------------------------------
# prepare


def prepare(source: str, out: str | Path, *, tokenizer: str | None = None, vocab_size: int = 32768,
            val_fraction: float = 0.01, max_bytes: int | None = None, subset: str = "code",
            tokenizer_sample_bytes: int = 50_000_000, text_field: str = "text", split: str = "train",
            progress: bool = True) -> dict:
    """Tokenize `source` into `out` (train.bin, val.bin, tokenizer.json, meta.json) and return the meta dict.

    tokenizer=None trains a byte-level BPE of `vocab_size` on the first `tokenizer_sample_bytes` of text;
    tokenizer=PATH (the file, a folder holding it, or a model or run folder: its own) reuses one, and `vocab_size`
    is ignored; the settings beside it (tokenizer_config.json, ...) are copied too.

    Validation split: a document goes to val when a stable hash of its name is below `val_fraction`, so the
    split is whole documents and does not depend on the rest of the corpus. With val_fraction > 0 both splits
    are kept non-empty: with >= 2 documents, if one split came out empty the last document of the other moves
    to it; with exactly 1 document, its last `val_fraction` of tokens (at least one) become val and each part
    ends with end-of-text. meta["val_split"] says which rule applied.

    Output is built in a hidden sibling dir and renamed into place at the end: on any error `out` is untouched.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. 0.01")
    if max_bytes is not None and max_bytes <= 0:
        raise UserError(f"max_bytes must be positive, got {max_bytes}; leave it unset to read everything")
    if tokenizer is None:
        if tokenizer_sample_bytes <= 0:
            raise UserError(f"tokenizer_sample_bytes must be positive, got {tokenizer_sample_bytes}")
        _check_vocab_size(vocab_size, trained=True)
    out = Path(out).expanduser()
    _check_out(out)
    tok = tok_info = None
    eot_token = EOT
    if tokenizer is not None:  # before opening the source: fail fast, before any download
        tok, tok_info, eot_token = _load_for_prepare(tokenizer)
    src = open_source(source, subset=subset, text_field=text_field, split=split,
                      streaming=max_bytes is not None, progress=progress)

    made = _mkdirs(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if tok is None:
            sample = min(tokenizer_sample_bytes, max_bytes or tokenizer_sample_bytes)  # never beyond max_bytes
            tok, tok_info = train_bpe(src, vocab_size, sample, progress)
        vocab = _vocab_size(tok)
        _check_vocab_size(vocab, trained=False)
        dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
        eot_id = tok.token_to_id(eot_token)
        tok.save(str(tmp / "tokenizer.json"))
        if tok_info["kind"] == "loaded":  # its settings (special tokens, chat template) travel with it
            copy_tokenizer_files(Path(tok_info["path"]).parent, tmp, (*TOKENIZER_FILES[1:], SPECIAL_IDS_FILE))

        train, val, text_bytes, truncated = _write_shards(src, tok, tmp, dtype, eot_id, val_fraction, max_bytes,
                                                          progress)
        if train.docs + val.docs == 0:
            raise empty_corpus(src)
        rule = _balance_splits(train, val, val_fraction)

        meta = {
            "format": 1,
            "source": str(source),
            "source_info": src.info,  # linux-source: package, version, deb_sha256, subset
            "max_bytes": max_bytes,
            "text_bytes": text_bytes,
            "truncated_doc": truncated,  # the document max_bytes ended in: only its first bytes are in the shards
            "vocab_size": vocab,
            "dtype": dtype.name,
            "eot_id": eot_id,
            "eot_token": eot_token,
            "train_tokens": train.tokens,
            "val_tokens": val.tokens,
            "train_docs": train.docs,
            "val_docs": val.docs,
            "val_fraction": val_fraction,
            "val_split": rule,
            "skipped": dict(src.skipped),
            "sha256": {"train.bin": sha256_file(train.path), "val.bin": sha256_file(val.path)},
            "tokenizer": tok_info,
            "sparsetrain_version": __version__,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(tmp, out)
    except BaseException:  # Ctrl-C included: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        _rmdirs(made)
        raise
    return meta


def _check_vocab_size(vocab: int, trained: bool) -> None:
    if vocab > MAX_VOCAB:
        raise UserError(f"vocabulary of {vocab:,} tokens does not fit the largest token dtype (uint32, "
                        f"{MAX_VOCAB:,} ids); use a smaller vocab_size / tokenizer")
    if trained and vocab < 257:
        raise UserError(f"vocab_size {vocab} is too small for a byte-level BPE; use at least 257 "
                        "(256 bytes + <|endoftext|>)")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; pass a new --out folder or delete it")
    if out.is_dir() and any(out.iterdir()):
        what = "a prepared dataset" if (out / "meta.json").exists() else "not empty"
        raise UserError(f"output folder {out} already exists and is {what}; pass a new --out or delete it")


def _mkdirs(d: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest first) so a failed run can remove them."""
    missing = []
    while not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        m.mkdir(exist_ok=True)
    return missing


def _rmdirs(made: list[Path]) -> None:
    for d in made:
        try:
            d.rmdir()
        except OSError:
            break


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def _load_for_prepare(path: str | Path):
    """Load a tokenizer (a file, a folder holding it, or a model's: see `tokenizer_file`) and pick its end-of-text
    token: <|endoftext|>, else its eos token, else add one."""
    tok = load_tokenizer(path)
    f = tokenizer_file(path)
    eot, added = EOT, False
    if tok.token_to_id(EOT) is None:
        eos = eos_token(f.parent, tok)
        if eos is not None and tok.token_to_id(eos) is not None:
            eot = eos
        else:
            tok.add_special_tokens([EOT])
            added = True
    info = {"kind": "loaded", "path": str(f.resolve()), "file_sha256": sha256_file(f), "eot_token": eot,
            "added_eot": added}
    return tok, info, eot


def _vocab_size(tok) -> int:
    """Embedding rows needed: max id + 1 (ids of loaded tokenizers need not be dense)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


# ---------------------------------------------------------------------------------------------------------------
# shards


class _ShardWriter:
    """Appends token ids to a flat binary file, keeping counts and where the last document starts."""

    def __init__(self, path: Path, dtype: np.dtype, eot_id: int):
        self.path, self.dtype = path, dtype
        self.eot = np.array([eot_id], dtype=dtype)
        self.f = open(path, "wb")
        self.tokens = self.docs = 0
        self.doc_start = 0  # first token of the document being written
        self.last_doc_start = 0  # first token of the last finished document

    def write(self, ids) -> None:
        a = np.array(ids, dtype=self.dtype)  # numpy raises on an id that does not fit
        self.f.write(a.data)
        self.tokens += len(a)

    def end_doc(self) -> None:
        self.f.write(self.eot.data)
        self.tokens += 1
        self.docs += 1
        self.last_doc_start, self.doc_start = self.doc_start, self.tokens

    def close(self) -> None:
        self.f.close()


def _stable_unit(name: str) -> float:
    """A number in [0, 1) from a document name, the same on every machine (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def is_val(name: str, val_fraction: float) -> bool:
    return _stable_unit(name) < val_fraction


def _write_shards(src: Source, tok, tmp: Path, dtype: np.dtype, eot_id: int, val_fraction: float,
                  max_bytes: int | None, progress: bool):
    """Tokenize the documents into train.bin / val.bin in bounded memory: each document goes to the tokenizer in
    pieces (bpe.pieces; whole when the tokenizer is not one whose tokens the cuts keep), a batch of pieces at a
    time. Returns the two writers, the bytes of text read and the name of the document max_bytes cut, if any."""
    train = _ShardWriter(tmp / "train.bin", dtype, eot_id)
    val = _ShardWriter(tmp / "val.bin", dtype, eot_id)
    cut = cuts_are_safe(tok)
    batch: list[tuple[_ShardWriter, str | None]] = []  # (split, text piece); None ends the document
    batch_chars = text_bytes = 0
    truncated = None

    def flush():
        nonlocal batch_chars
        encs = iter(tok.encode_batch_fast([p for _, p in batch if p is not None], add_special_tokens=False))
        for w, piece in batch:
            if piece is None:
                w.end_doc()
            else:
                w.write(next(encs).ids)
        batch.clear()
        batch_chars = 0

    tok.encode_special_tokens = True  # a literal "<|endoftext|>" (or "</s>") inside a document is just text
    try:
        total = known_total(src, max_bytes)
        with progress_bar(total=total, desc="tokenizing", unit="B", unit_scale=True, disable=not progress) as bar:
            for doc in iter_documents(src, max_bytes, on_bytes=bar.update):
                w = val if is_val(doc.name, val_fraction) else train
                for piece in pieces(doc.parts()) if cut else [doc.text]:
                    batch.append((w, piece))
                    batch_chars += len(piece)
                    if len(batch) >= ENCODE_BATCH_PIECES or batch_chars >= ENCODE_BATCH_CHARS:
                        flush()
                batch.append((w, None))
                text_bytes += doc.nbytes
                if doc.truncated:
                    truncated = doc.name
            if batch:
                flush()
    finally:
        tok.encode_special_tokens = False
        train.close()
        val.close()
    return train, val, text_bytes, truncated


def _copy_tokens(src: Path, dtype: np.dtype, start: int, stop: int, f, chunk: int = 1 << 24) -> None:
    mm = np.memmap(src, dtype=dtype, mode="r")
    for i in range(start, stop, chunk):
        f.write(np.ascontiguousarray(mm[i:min(i + chunk, stop)]).data)
    del mm


def _balance_splits(train: _ShardWriter, val: _ShardWriter, val_fraction: float) -> str:
    """Keep both splits non-empty when val_fraction > 0 (see prepare's docstring); returns the rule used."""
    if val_fraction == 0:
        return "none"
    n_docs = train.docs + val.docs
    if n_docs >= 2 and train.docs and val.docs:
        return "hash"
    itemsize = train.dtype.itemsize
    if n_docs >= 2:  # move the last document of the full split to the empty one
        full, empty = (train, val) if val.docs == 0 else (val, train)
        with open(empty.path, "wb") as f:
            _copy_tokens(full.path, full.dtype, full.last_doc_start, full.tokens, f)
        os.truncate(full.path, full.last_doc_start * itemsize)
        empty.tokens, full.tokens = full.tokens - full.last_doc_start, full.last_doc_start
        empty.docs, full.docs = 1, full.docs - 1
        return f"hash, then the last {'train' if full is train else 'val'} document moved to the empty split"

    # One document: its tail becomes val. Both parts end with end-of-text, like two documents.
    only = train if train.docs else val
    body = only.tokens - 1
    if body < 2:
        raise UserError(f"the corpus is one document of {body} token(s), too short to split into train and val; "
                        "add text or set val_fraction=0")
    n_val = min(body - 1, max(1, round(body * val_fraction)))
    parts = {"train": (0, body - n_val), "val": (body - n_val, body)}
    for name, (a, b) in parts.items():
        with open(only.path.with_name(f"{name}.new"), "wb") as f:
            _copy_tokens(only.path, only.dtype, a, b, f)
            f.write(only.eot.data)
    for name, w in (("train", train), ("val", val)):
        os.replace(w.path.with_name(f"{name}.new"), w.path)
        w.tokens, w.docs = parts[name][1] - parts[name][0] + 1, 1
    return "single document: its last val_fraction of tokens is val"


# ---------------------------------------------------------------------------------------------------------------
# export


def train_tokenizer(sources: list[str], out_path: str | Path, *, vocab_size: int = 32768,
                    sample_bytes: int = 50_000_000, subset: str = "code", text_field: str = "text",
                    progress: bool = True) -> dict:
    """One byte-level BPE trained on an even mix of several sources (documents taken in turn from each), written
    as a tokenizer.json that `prepare(..., tokenizer=PATH)` then uses for every corpus (continual pre-training
    needs one vocabulary across domains)."""
    out_path = Path(out_path)
    if out_path.exists():
        raise UserError(f"{out_path} already exists; pass a new --out or delete it")
    opened = [open_source(s, subset=subset, text_field=text_field, progress=progress) for s in sources]

    def interleaved():
        streams = [src.docs() for src in opened]
        while streams:
            for stream in list(streams):
                doc = next(stream, None)
                if doc is None:
                    streams.remove(stream)
                else:
                    yield doc

    mix = Source(label=" + ".join(sources), info={"kind": "mix", "sources": [s.info for s in opened]},
                 docs=interleaved)
    _check_vocab_size(vocab_size, trained=True)
    tok, info = train_bpe(mix, vocab_size, sample_bytes, progress)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, out_path)
    return {**info, "sources": sources, "path": str(out_path), "sha256": sha256_file(out_path)}


def export_jsonl(source: str, out_path: str | Path, *, max_bytes: int | None = None, subset: str = "code",
                 text_field: str = "text", progress: bool = True) -> dict:
    """Write a source's documents as JSONL lines {"name": ..., "text": ...}; .xz / .gz names compress.

    The name field carries each document's identity, so prepare(<this file>, tokenizer=<data dir>) puts every
    document in the same split and gives the same shards as preparing the original source. A document is written
    part by part (bounded memory); max_bytes cuts the one it ends in (info["truncated_doc"]).
    """
    out_path = Path(out_path).expanduser()
    if out_path.exists():
        raise UserError(f"{out_path} already exists; pass a new output path or delete it")
    if max_bytes is not None and max_bytes <= 0:
        raise UserError(f"max_bytes must be positive, got {max_bytes}; leave it unset to export everything")
    src = open_source(source, subset=subset, text_field=text_field, streaming=max_bytes is not None,
                      progress=progress)
    made = _mkdirs(out_path.parent)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    docs = text_bytes = 0
    truncated = None
    try:
        suffix = out_path.suffix.lower()
        if suffix == ".xz":
            f = lzma.open(tmp, "xb", preset=6)
        elif suffix == ".gz":
            f = gzip.GzipFile(tmp, "xb", mtime=0)  # mtime=0: same input, same bytes
        else:
            f = open(tmp, "xb")
        with f, progress_bar(total=known_total(src, max_bytes), desc="exporting", unit="B", unit_scale=True,
                             disable=not progress) as bar:
            for doc in iter_documents(src, max_bytes, on_bytes=bar.update):
                # The line json.dumps({"name": ..., "text": ...}) would write, the text escaped part by part
                # (JSON escapes characters one by one, so the parts' escapes join into the whole's).
                f.write(f'{{"name": {json.dumps(doc.name, ensure_ascii=False)}, "text": "'.encode("utf-8"))
                for part in doc.parts():
                    f.write(json.dumps(part, ensure_ascii=False)[1:-1].encode("utf-8"))
                f.write(b'"}\n')
                docs += 1
                text_bytes += doc.nbytes
                if doc.truncated:
                    truncated = doc.name
        if docs == 0:
            raise empty_corpus(src)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _rmdirs(made)
        raise
    return {"source": str(source), "path": str(out_path), "source_info": src.info, "max_bytes": max_bytes,
            "docs": docs, "text_bytes": text_bytes, "truncated_doc": truncated, "file_bytes": out_path.stat().st_size,
            "sha256": sha256_file(out_path), "skipped": dict(src.skipped)}


# ---------------------------------------------------------------------------------------------------------------
# summary


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def describe(meta: dict) -> str:
    """One paragraph about a prepared dataset, for printing after prepare."""
    info = meta.get("source_info") or {}
    src = meta["source"]
    if info.get("kind") == "linux-source":
        src += f" ({info['package']} {info['version']}, {info['subset']} subset)"
    tok = meta["tokenizer"]
    if tok["kind"] == "trained":
        how = f"byte-level BPE trained on {_fmt_bytes(tok['sample_bytes'])} of it"
    else:
        how = f"loaded from {tok['path']}" + (" (end-of-text token added)" if tok.get("added_eot") else "")
    docs = meta["train_docs"] + meta["val_docs"]
    tokens = meta["train_tokens"] + meta["val_tokens"]
    per_token = meta["text_bytes"] / max(1, tokens - docs)  # end-of-text tokens carry no text
    limit = f" (first {_fmt_bytes(meta['max_bytes'])})" if meta.get("max_bytes") else ""
    if meta.get("truncated_doc"):
        limit = limit[:-1] + f"; the last document, {meta['truncated_doc']}, cut there)"
    return (f"Prepared {src}{limit}: {_fmt_bytes(meta['text_bytes'])} of text in {docs:,} documents -> "
            f"{meta['train_tokens']:,} train tokens ({meta['train_docs']:,} docs) and {meta['val_tokens']:,} val "
            f"tokens ({meta['val_docs']:,} docs), {per_token:.2f} bytes/token. Tokenizer: {how}, "
            f"vocab {meta['vocab_size']:,}, end-of-text {meta['eot_token']!r} = id {meta['eot_id']}; "
            f"stored as {meta['dtype']}.{_few_val_docs(meta)}")


# Fewer held-out documents than this may not represent the corpus (a few unusual files can dominate the loss).
FEW_VAL_DOCS = 50


def _few_val_docs(meta: dict) -> str:
    """A warning sentence when the validation split is only a few whole documents."""
    n = meta["val_docs"]
    if not 0 < n < FEW_VAL_DOCS or meta["train_docs"] < FEW_VAL_DOCS:  # a corpus of few documents has no choice
        return ""
    return (f" Only {n} validation documents: the validation loss may not represent the corpus; a larger "
            f"--val-fraction (now {meta['val_fraction']}) holds out more.")
