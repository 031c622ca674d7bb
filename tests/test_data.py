"""Tests for sparsetrain.data / sparsetrain.data.sources: tiny corpora in tmp_path, a 300-token vocabulary."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import random
import string
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsetrain.data.bpe as bpe
import sparsetrain.data.documents as documents
import sparsetrain.data.prepare as data
import sparsetrain.data.sources as sources
from sparsetrain.data.prepare import EOT, describe, export_jsonl, is_val, load_tokenizer, prepare, train_tokenizer
from sparsetrain.data.sources import iter_documents, open_source
from sparsetrain.data.tokens import BatchLoader, TokenData, eval_windows
from sparsetrain.errors import UserError

VOCAB = 300

# Varied text: unicode, CRLF, tabs, trailing spaces, blank lines, and a literal end-of-text string.
CORPUS = {
    "a.txt": "hello world\nthe quick brown fox jumps over the lazy dog\n",
    "b.md": "# Title\n\nSome *markdown* with émojis 🎉 and 日本語.\r\nWindows line\r\n",
    "c.py": "def f(x):\n\treturn x + 1  \n\n\nprint(f(2))\n",
    "d.c": "int main(void) {\n    return 0;\n}\n",
    "e.h": "#define X 1\n#define Y 2\n",
    "f.rst": "Heading\n=======\n\nA paragraph of text that mentions <|endoftext|> literally.\n",
    "sub/g.txt": "nested document number g\n",
    "sub/h.txt": "nested document number h, with   spaces   \n",
    "sub/deeper/i.py": "import os\nprint(os.getcwd())\n",
    "j.txt": "another plain text file about foxes and dogs\n",
    "k.txt": "k " * 50 + "\n",
    "l.md": "- list item one\n- list item two\n",
}


def write_corpus(root, files=CORPUS):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8"))  # bytes: keep \r\n as written
    return root


def split_docs(tokens: np.ndarray, eot_id: int) -> list[list[int]]:
    ids = tokens.tolist()
    assert not ids or ids[-1] == eot_id, "a shard must end with end-of-text"
    docs, cur = [], []
    for t in ids:
        if t == eot_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def decoded_docs(out, split="train") -> list[str]:
    td = TokenData(out)
    tok = load_tokenizer(out)
    return [tok.decode(d, skip_special_tokens=False) for d in split_docs(getattr(td, split), td.eot_id)]


def shards(out) -> tuple[bytes, bytes]:
    return (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes()


def prep(source, out, **kw):
    kw.setdefault("vocab_size", VOCAB)
    kw.setdefault("progress", False)
    return prepare(str(source), out, **kw)


# ---------------------------------------------------------------------------------------------------------------
# prepare: round trip, split, determinism


def test_prepare_round_trip(tmp_path):
    src = write_corpus(tmp_path / "corpus")
    (src / ".hidden.txt").write_text("hidden files are skipped\n")
    (src / "notes.csv").write_text("unsupported,files,are,skipped\n")
    (src / "empty.txt").write_text("")  # empty documents are skipped
    out = tmp_path / "out"
    meta = prep(src, out, val_fraction=0.3)

    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB
    tok = load_tokenizer(out)
    assert meta["eot_id"] == tok.token_to_id(EOT)
    for name in ("train.bin", "val.bin"):
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()

    # Documents come back intact, in sorted path order, each in the split its name hashes to.
    names = sorted(CORPUS)
    want_val = [n for n in names if is_val(n, 0.3)]
    assert 0 < len(want_val) < len(names) and meta["val_split"] == "hash"
    assert decoded_docs(out, "train") == [CORPUS[n] for n in names if n not in want_val]
    assert decoded_docs(out, "val") == [CORPUS[n] for n in want_val]
    assert (meta["train_docs"], meta["val_docs"]) == (len(names) - len(want_val), len(want_val))
    td = TokenData(out)
    assert (len(td.train), len(td.val)) == (meta["train_tokens"], meta["val_tokens"])
    assert meta["skipped"] == {"empty": 1}
    assert meta["text_bytes"] == sum(len(t.encode()) for t in CORPUS.values())
    assert "12 documents" in describe(meta)


def test_literal_end_of_text_is_not_a_boundary(tmp_path):
    out = tmp_path / "out"
    meta = prep(write_corpus(tmp_path / "c", {"x.txt": "a <|endoftext|> b\n", "y.txt": "c\n"}), out,
                val_fraction=0)
    assert int((TokenData(out).train == meta["eot_id"]).sum()) == 2  # one per document, none from the text
    assert decoded_docs(out) == ["a <|endoftext|> b\n", "c\n"]


def test_prepare_is_deterministic_and_split_is_stable(tmp_path):
    src = write_corpus(tmp_path / "corpus")
    prep(src, tmp_path / "a", val_fraction=0.3)
    prep(src, tmp_path / "b", val_fraction=0.3)
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()

    # Adding documents does not move existing ones between splits (the split is a hash of each name).
    more = {f"more/{i}.txt": f"extra document {i}\n" for i in range(20)}
    write_corpus(src, more)
    prep(src, tmp_path / "c", val_fraction=0.3)
    val_before, val_after = set(decoded_docs(tmp_path / "a", "val")), set(decoded_docs(tmp_path / "c", "val"))
    assert val_after & set(CORPUS.values()) == val_before
    assert val_after - val_before == {t for n, t in more.items() if is_val(n, 0.3)}


def test_both_splits_get_a_document(tmp_path):
    # With val_fraction=0.01 neither name hashes into val: the last train document moves there.
    files = {"one.txt": "first document\n", "two.txt": "second document\n"}
    assert not any(is_val(n, 0.01) for n in files)
    meta = prep(write_corpus(tmp_path / "c", files), tmp_path / "out", val_fraction=0.01)
    assert (meta["train_docs"], meta["val_docs"]) == (1, 1)
    assert decoded_docs(tmp_path / "out", "train") == ["first document\n"]
    assert decoded_docs(tmp_path / "out", "val") == ["second document\n"]
    assert "moved" in meta["val_split"]

    # With val_fraction=0.99 both hash into val: the last val document moves to train.
    assert all(is_val(n, 0.99) for n in files)
    meta = prep(tmp_path / "c", tmp_path / "out2", val_fraction=0.99)
    assert decoded_docs(tmp_path / "out2", "train") == ["second document\n"]
    assert decoded_docs(tmp_path / "out2", "val") == ["first document\n"]


def test_single_document_tail_is_val(tmp_path):
    text = "".join(f"line {i} of the only document\n" for i in range(200))
    (tmp_path / "one.txt").write_text(text)
    # A loaded tokenizer with val_fraction=0, for the reference encoding of the whole document.
    whole = prep(tmp_path / "one.txt", tmp_path / "whole", val_fraction=0)
    assert whole["val_tokens"] == 0 and len(TokenData(tmp_path / "whole").val) == 0
    meta = prep(tmp_path / "one.txt", tmp_path / "split", val_fraction=0.1, tokenizer=str(tmp_path / "whole"))
    assert "single document" in meta["val_split"]
    td, ref = TokenData(tmp_path / "split"), TokenData(tmp_path / "whole")
    body = ref.train[:-1]
    n_val = round(len(body) * 0.1)
    assert len(td.val) == n_val + 1 and len(td.train) == len(body) - n_val + 1
    assert np.array_equal(np.concatenate([td.train[:-1], td.val[:-1]]), body)
    assert td.train[-1] == td.val[-1] == td.eot_id

    (tmp_path / "tiny.txt").write_text("a")
    with pytest.raises(UserError, match="one document of 1 token.*val_fraction=0"):
        prep(tmp_path / "tiny.txt", tmp_path / "tiny", val_fraction=0.1, tokenizer=str(tmp_path / "whole"))
    assert not (tmp_path / "tiny").exists()


def test_long_documents_are_cut_without_changing_tokens(tmp_path, monkeypatch):
    # Indented lines, trailing spaces and blank lines: only some newlines are safe cut points.
    lines = [f"{'    ' * (i % 3)}x{i} = call(y{i}, 'str {i}'){'  ' * (i % 5 == 0)}" if i % 7 else ""
             for i in range(400)]
    text = "\n".join(lines) + "\n\n}\nend\n"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "big.py").write_text(text)
    (tmp_path / "c" / "small.txt").write_text("small\n")
    ref = prep(tmp_path / "c", tmp_path / "ref", val_fraction=0)

    pieces = list(bpe.pieces([text], target=100))
    assert len(pieces) > 20 and "".join(pieces) == text
    tok = load_tokenizer(tmp_path / "ref")
    assert bpe.cuts_are_safe(tok)
    assert sum((tok.encode(p).ids for p in pieces), []) == tok.encode(text).ids

    monkeypatch.setattr(bpe, "PIECE_CHARS", 100)
    monkeypatch.setattr(data, "ENCODE_BATCH_PIECES", 7)  # flush mid-document too
    prep(tmp_path / "c", tmp_path / "cut", val_fraction=0, tokenizer=str(tmp_path / "ref"))
    assert shards(tmp_path / "cut") == shards(tmp_path / "ref")
    assert ref["train_docs"] == 2


def _one_line(n_bytes: int, seed: int = 0) -> str:
    """Random words on one line (no newline to cut at): contractions, digits, unicode, runs of spaces, tabs, a
    literal end-of-text, punctuation glued to words and standing alone."""
    rng = random.Random(seed)
    words = ["the", "fox's", "don't", "café", "日本語", "x1", "42", "3.14", "(call)", "a-b", "it'll", "Ünïcode",
             "🎉", EOT, "...", "’quoted’", "\t", "  ", "é", "'s", "snake_case", "//", "\u00a0", "Z"]
    out, size = [], 0
    while size < n_bytes:
        w = rng.choice(words) + rng.choice([" ", " ", " ", "", "  "])
        out.append(w)
        size += len(w.encode())
    return "".join(out)


def test_single_line_document_is_cut_without_changing_tokens(tmp_path, monkeypatch):
    text = _one_line(30_000)
    assert "\n" not in text
    (tmp_path / "line.txt").write_bytes(text.encode())
    prep(tmp_path / "line.txt", tmp_path / "ref", val_fraction=0)  # shorter than a piece: tokenized whole
    tok = load_tokenizer(tmp_path / "ref")
    tok.encode_special_tokens = True  # as prepare encodes: the literal end-of-text is text
    whole = tok.encode(text).ids
    assert TokenData(tmp_path / "ref").train[:-1].tolist() == whole

    pieces = list(bpe.pieces([text], target=100))
    assert len(pieces) > 100 and "".join(pieces) == text and max(map(len, pieces)) < 4 * 100
    assert sum((tok.encode(p).ids for p in pieces), []) == whole
    # The cuts depend on the text, not on the parts it is read in.
    assert list(bpe.pieces([text[i:i + 777] for i in range(0, len(text), 777)], target=100)) == pieces

    # Trained and encoded in pieces, read in parts that end inside multi-byte characters: the same tokenizer
    # (the trainer counted the same words) and the same tokens.
    monkeypatch.setattr(bpe, "PIECE_CHARS", 100)
    monkeypatch.setattr(documents, "PART_BYTES", 1001)
    monkeypatch.setattr(data, "ENCODE_BATCH_PIECES", 7)
    prep(tmp_path / "line.txt", tmp_path / "cut", val_fraction=0)
    for f in ("tokenizer.json", "train.bin"):
        assert (tmp_path / "cut" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()


def test_safe_cuts_keep_the_tokens_of_any_text(monkeypatch):
    # Random strings over characters that stress the pre-tokenizer's regex (contractions, unicode spaces and
    # letters, \r\n, runs of whitespace); only safe cuts (no hard ones): tokens equal the whole text's.
    monkeypatch.setattr(bpe, "HARD_CUT_PIECES", 10**9)
    tok = _bare_tokenizer([EOT])
    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "a", "Zz", "é", "日", "1", "23", "'", "s", "'s", "'ll", "!",
                "-", "🎉", "\u00a0", "\u3000", "\x1c", "\u0301", "_"]
    cuts = 0
    for _ in range(600):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        pieces = list(bpe.pieces([text], target=rng.randint(1, 8)))
        cuts += len(pieces) - 1
        assert "".join(pieces) == text
        assert sum((tok.encode(p).ids for p in pieces), []) == tok.encode(text).ids, repr(text)
    assert cuts > 400


def test_text_without_a_safe_cut_is_cut_anyway():
    text = "x" * 1000 + " tail"
    pieces = list(bpe.pieces([text], target=100))
    assert [len(p) for p in pieces] == [400, 400, 200, 5] and "".join(pieces) == text  # " tail": a safe cut
    tok = _bare_tokenizer([EOT])
    assert tok.decode(sum((tok.encode(p).ids for p in pieces), [])) == text  # tokens may differ, text does not


def _limited(src, limit, **kw) -> tuple[str, int, bool]:
    """Text, bytes and truncation of the documents read from src with max_bytes=limit."""
    texts, nbytes, cut = [], 0, False
    for doc in iter_documents(open_source(str(src), progress=False, **kw), limit):
        texts.append(doc.text)
        nbytes += doc.nbytes
        cut = doc.truncated
    return "".join(texts), nbytes, cut


def test_max_bytes_cuts_a_document_of_every_kind(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = "日本 ab\r\n" * 300  # 3300 bytes, 3-byte characters to cut inside
    raw, line = text.encode(), json.dumps({"text": text}).encode() + b"\n"
    (tmp_path / "t.txt").write_bytes(raw)
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "t.txt.xz").write_bytes(lzma.compress(raw))
    (tmp_path / "j.jsonl").write_bytes(line)
    (tmp_path / "j.jsonl.gz").write_bytes(gzip.compress(line))
    pq.write_table(pa.table({"text": [text]}), tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"text": [text]}).save_to_disk(str(tmp_path / "ds"))
    for name in ("t.txt", "t.txt.gz", "t.txt.xz", "j.jsonl", "j.jsonl.gz", "p.parquet", "ds"):
        for limit in (2, 5, 1000, 3299):
            got, nbytes, cut = _limited(tmp_path / name, limit)
            assert got == raw[:limit].decode("utf-8", "ignore"), (name, limit)  # a cut character is left out
            assert nbytes == len(got.encode()) <= limit and cut == bool(got), (name, limit)
        assert _limited(tmp_path / name, 3300) == (text, 3300, False)


def test_max_bytes_reads_no_further(tmp_path, monkeypatch):
    """max_bytes bounds what is read from the files (each pass: tokenizer sample, shards), not only what is kept."""
    reads: list[list[int]] = []  # bytes returned by each read, per opened file

    class Counted:
        def __init__(self, f):
            self.f, self.n = f, []
            reads.append(self.n)

        def read(self, n):
            data = self.f.read(n)
            self.n.append(len(data))
            return data

        def peek(self, n):
            return self.f.peek(n)

        def close(self):
            self.f.close()

    real_open = documents.open_binary
    monkeypatch.setattr(documents, "open_binary", lambda path: Counted(real_open(path)))
    monkeypatch.setattr(documents, "PART_BYTES", 4096)

    # One huge document (a single line): cut at the limit.
    big = _one_line(300_000)
    (tmp_path / "big.txt").write_bytes(big.encode())
    meta = prep(tmp_path / "big.txt", tmp_path / "out", val_fraction=0, max_bytes=10_000)
    assert len(reads) == 2 and all(sum(n) <= 10_000 for n in reads)  # sample pass, shard pass
    assert 10_000 - 4 < meta["text_bytes"] <= 10_000 and meta["tokenizer"]["sample_bytes"] == meta["text_bytes"]
    assert meta["truncated_doc"] == "big.txt" and "the last document, big.txt, cut there" in describe(meta)
    assert decoded_docs(tmp_path / "out") == [big.encode()[:meta["text_bytes"]].decode()]

    # Many small documents: the one the limit falls in is cut, and no later one is opened.
    reads.clear()
    files = {f"d{i:02}.txt": f"{i:02} " + "w" * 97 + "\n" for i in range(50)}  # 101 bytes each
    write_corpus(tmp_path / "many", files)
    meta = prep(tmp_path / "many", tmp_path / "out2", val_fraction=0, max_bytes=1060)
    assert len(reads) == 2 * 11 and sum(map(sum, reads)) == 2 * 1060
    assert (meta["text_bytes"], meta["train_docs"], meta["truncated_doc"]) == (1060, 11, "d10.txt")
    assert decoded_docs(tmp_path / "out2") == [files[f"d{i:02}.txt"] for i in range(10)] + [files["d10.txt"][:50]]

    # export and the tokenizer's sample (`data tokenizer --sample-bytes`) share the reading.
    reads.clear()
    info = export_jsonl(str(tmp_path / "big.txt"), tmp_path / "big.jsonl", max_bytes=5_000, progress=False)
    assert sum(reads[0]) <= 5_000 and info["truncated_doc"] == "big.txt" and info["docs"] == 1
    exported = json.loads((tmp_path / "big.jsonl").read_text())
    assert exported == {"name": "big.txt", "text": big.encode()[:info["text_bytes"]].decode()}
    reads.clear()
    info = train_tokenizer([str(tmp_path / "big.txt")], tmp_path / "tok.json", vocab_size=300, sample_bytes=3_000,
                           progress=False)
    assert sum(reads[0]) <= 3_000 and 3_000 - 4 < info["sample_bytes"] <= 3_000


def test_a_bad_byte_is_found_while_reading_in_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "PART_BYTES", 1001)
    good = "ü" * 2500  # parts end inside characters
    (tmp_path / "bad.txt").write_bytes(good.encode() + b"\xff" + b"x" * 3000)
    with pytest.raises(UserError, match=r"bad.txt is not UTF-8 text \(bad byte at offset 5000\)"):
        docs_of(tmp_path / "bad.txt")
    (tmp_path / "cut.txt").write_bytes(good.encode() + "ü".encode()[:1])  # ends inside a character
    with pytest.raises(UserError, match=r"cut.txt is not UTF-8 text \(bad byte at offset 5000\)"):
        docs_of(tmp_path / "cut.txt")
    assert _limited(tmp_path / "cut.txt", 5000) == (good, 5000, True)  # the bad tail is never read


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_a_huge_single_line_prepares_in_bounded_memory(tmp_path):
    """Peak memory follows the piece and batch sizes, not the document. A 4.8 MB single line of random words took
    +1.1 GB when it was encoded, and trained on, whole (the code before the cut at spaces); in pieces of 16k
    characters and batches of 256k it takes ~+40 MB. Measured in a fresh process as its peak resident memory
    (VmHWM: ru_maxrss would carry pytest's own peak across fork and exec) above what the imports took."""
    rng = random.Random(0)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in range(5000)]
    text = " ".join(rng.choices(vocab, k=800_000))
    (tmp_path / "line.txt").write_text(text)
    code = textwrap.dedent("""
        import re, sys
        import sparsetrain.data.bpe as bpe, sparsetrain.data.prepare as prep

        def peak_mb():
            return int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) // 1024

        bpe.PIECE_CHARS, prep.ENCODE_BATCH_CHARS = 1 << 14, 1 << 18
        base = peak_mb()
        prep.prepare(sys.argv[1], sys.argv[2], vocab_size=1024, progress=False)
        print(peak_mb() - base)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "line.txt"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    growth_mb = int(r.stdout.split()[-1])
    print(f"peak memory growth {growth_mb} MB preparing a {len(text) / 1e6:.1f} MB single line")
    assert growth_mb < 200


# ---------------------------------------------------------------------------------------------------------------
# sources


def docs_of(source, **kw):
    return [(d.name, d.text) for d in iter_documents(open_source(str(source), progress=False, **kw))]


def test_jsonl_parquet_and_compressed_files(tmp_path):
    lines = [{"text": "first"}, {"name": "named-doc", "text": "second"}, {"text": "", "other": 1},
             {"text": None}, {"text": "fifth", "name": 5}]
    raw = ("\n".join(json.dumps(x) for x in lines) + "\n\n").encode()
    (tmp_path / "d.jsonl").write_bytes(raw)
    want = [("d.jsonl:1", "first"), ("named-doc", "second"), ("d.jsonl:5", "fifth")]
    assert docs_of(tmp_path / "d.jsonl") == want
    (tmp_path / "d.jsonl.xz").write_bytes(lzma.compress(raw))
    assert docs_of(tmp_path / "d.jsonl.xz") == [(n.replace("d.jsonl", "d.jsonl.xz"), t) for n, t in want]
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress("gzipped text\r\n".encode()))
    assert docs_of(tmp_path / "t.txt.gz") == [("t.txt.gz", "gzipped text\r\n")]
    (tmp_path / "t.txt.xz").write_bytes(lzma.compress(b"xz text"))
    assert docs_of(tmp_path / "t.txt.xz") == [("t.txt.xz", "xz text")]

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["p0", None, "p2"], "n": [1, 2, 3]}), tmp_path / "p.parquet")
    assert docs_of(tmp_path / "p.parquet", text_field="body") == [("p.parquet:0", "p0"), ("p.parquet:2", "p2")]
    with pytest.raises(UserError, match="no column 'text'.*body"):
        docs_of(tmp_path / "p.parquet")

    # A folder mixes them all, in sorted path order; nested paths are relative to the folder.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.txt").write_text("z")
    (tmp_path / "p.parquet").unlink()  # its text column is "body"
    names = [n for n, _ in docs_of(tmp_path)]
    assert names == ["d.jsonl:1", "named-doc", "d.jsonl:5", "d.jsonl.xz:1", "named-doc", "d.jsonl.xz:5",
                     "sub/z.txt", "t.txt.gz", "t.txt.xz"]

    # End to end through prepare, from the compressed jsonl.
    meta = prep(tmp_path / "d.jsonl.xz", tmp_path / "out", val_fraction=0)
    assert decoded_docs(tmp_path / "out") == ["first", "second", "fifth"] and meta["train_docs"] == 3


def test_saved_hf_dataset_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta", None, "gamma"], "label": [0, 1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert docs_of(tmp_path / "ds") == [("0", "alpha"), ("1", "beta"), ("3", "gamma")]

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"content": ["t0"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert docs_of(tmp_path / "dd", split="test", text_field="content") == [("test:0", "t0")]
    with pytest.raises(UserError, match="splits train, test, not 'valid'"):
        docs_of(tmp_path / "dd", split="valid")
    with pytest.raises(UserError, match="no column 'text'"):
        docs_of(tmp_path / "dd", split="test")

    meta = prep(tmp_path / "ds", tmp_path / "out", val_fraction=0)
    assert decoded_docs(tmp_path / "out") == ["alpha", "beta", "gamma"]
    assert meta["source_info"]["kind"] == "hf-disk"


def test_hf_hub_source(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": ["hub doc one", "hub doc two"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert docs_of("hf:org/corpus:en", split="validation") == [("validation:0", "hub doc one"),
                                                               ("validation:1", "hub doc two")]
    assert calls == [("org/corpus", "en", "validation", False)]
    meta = prep("hf:org/corpus", tmp_path / "out", val_fraction=0, max_bytes=10**6)
    assert calls[-1] == ("org/corpus", None, "train", True)  # max_bytes: stream instead of downloading it all
    assert decoded_docs(tmp_path / "out") == ["hub doc one", "hub doc two"]
    assert meta["source_info"] == {"kind": "hf", "name": "org/corpus", "config": None, "split": "train"}

    def failing(*a, **kw):
        raise FileNotFoundError("Dataset 'nope' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(UserError, match="could not load Hugging Face dataset 'nope'.*doesn't exist"):
        open_source("hf:nope")


def test_stdlib_source(tmp_path):
    names = [n for n, _ in docs_of("stdlib")]
    assert names == sorted(names) and all(n.endswith(".py") for n in names) and len(names) > 100
    assert not any("site-packages" in n for n in names)
    meta = prep("stdlib", tmp_path / "out", max_bytes=200_000)
    docs = meta["train_docs"] + meta["val_docs"]
    # max_bytes is read and no more: the first documents, the last one cut where the limit falls.
    first = [t for _, t in docs_of("stdlib")[:docs]]
    assert 200_000 - 4 < meta["text_bytes"] <= 200_000 < sum(len(t.encode()) for t in first)  # a char may not fit
    assert sum(len(t.encode()) for t in first[:-1]) < 200_000
    assert meta["truncated_doc"] == docs_of("stdlib")[docs - 1][0]
    assert meta["train_tokens"] > 1000 and meta["val_docs"] >= 1


def names_only(monkeypatch, src) -> list[str]:
    """Every document name of a source of files, none of them read (all of site-packages takes a while)."""
    monkeypatch.setattr(sources, "_read_file_docs", lambda path, name, *a, **kw: iter([(name, "")]))
    return [n for n, _ in src.docs()]


def test_site_packages_source(monkeypatch):
    src = open_source("site-packages", progress=False)
    assert src.info["kind"] == "site-packages" and src.info["roots"] and src.info["files"] > 100
    assert src.total_bytes > 1_000_000
    dists = src.info["distributions"]
    assert any(d.startswith(("numpy==", "torch==")) for d in dists) and dists == sorted(set(dists), key=str.lower)
    assert not any(d.lower().startswith("sparsetrain") for d in dists)  # its dist-info is there, its code is not
    names = names_only(monkeypatch, src)
    assert len(names) == src.info["files"] and names == sorted(set(names))
    assert all(n.endswith(".py") for n in names)
    assert not any("sparsetrain/" in n or "sparsetrain_bench/" in n for n in names)


def test_site_packages_max_bytes():
    docs = [(d.name, d.text, d.truncated) for d in iter_documents(open_source("site-packages"), max_bytes=200_000)]
    names = [n for n, _, _ in docs]
    assert len(docs) > 1 and names == sorted(set(names))
    # max_bytes is read and no more: the first documents, the last one cut where the limit falls.
    assert [cut for _, _, cut in docs] == [False] * (len(docs) - 1) + [True]
    assert 200_000 - 4 < sum(len(t.encode()) for _, t, _ in docs) <= 200_000  # a char may not fit


def test_site_packages_roots_names_and_exclusions(tmp_path, monkeypatch):
    roots = [tmp_path / "a" / "site-packages", tmp_path / "b" / "site-packages"]
    for root in roots:
        write_corpus(root, {"pkg/__init__.py": "x = 1\n", "pkg/m.py": "y = 2\n", "top.py": "z = 3\n",
                            "pkg/data.txt": "not python\n", "sparsetrain/core.py": "own code\n",
                            "sparsetrain_bench/run.py": "own code\n", "__editable___sparsetrain_finder.py": "p\n",
                            "fakepkg-1.2.dist-info/METADATA": "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.2\n",
                            "sparsetrain-0.1.0.dist-info/METADATA":
                                "Metadata-Version: 2.1\nName: sparsetrain\nVersion: 0.1.0\n"})
    (roots[1] / "pkg" / "latin1.py").write_bytes("s = 'caf\u00e9'\n".encode("latin-1"))
    monkeypatch.setattr(sources, "_site_packages_roots", lambda: roots)
    src = open_source("site-packages")
    assert src.info["roots"] == [str(r) for r in roots] and src.info["files"] == 7
    assert src.info["distributions"] == ["fakepkg==1.2"]  # once, though in both roots; the toolkit's left out
    assert src.total_bytes == 3 * 6 + 3 * 6 + len("s = 'caf\u00e9'\n")
    # Both roots end in site-packages: the names say a/ and b/, so none repeats.
    assert docs_of("site-packages") == [(f"{r}/site-packages/{f}", t) for r in "ab"
                                        for f, t in [("pkg/__init__.py", "x = 1\n"), ("pkg/m.py", "y = 2\n"),
                                                     ("top.py", "z = 3\n")]]
    list(iter_documents(src))
    assert src.skipped["non_utf8"] == 1  # skipped, not failed
    assert sources._root_labels([roots[0]]) == ["site-packages"]


def test_site_packages_without_python_files(tmp_path, monkeypatch):
    write_corpus(tmp_path / "site-packages", {"README.txt": "no code here\n"})
    monkeypatch.setattr(sources, "_site_packages_roots", lambda: [tmp_path / "site-packages"])
    with pytest.raises(UserError, match="no .py files in the site-packages.*install packages"):
        open_source("site-packages")
    monkeypatch.setattr(sources, "_site_packages_roots", lambda: [])
    with pytest.raises(UserError, match="none exists"):
        open_source("site-packages")


# ---------------------------------------------------------------------------------------------------------------
# linux-source, from a small synthetic .deb laid out like Debian's


def _tar_xz(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tf.addfile(info, io.BytesIO(members[name]))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.c"
            tf.addfile(info)
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, body in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    return out


LINUX_FILES = {
    "kernel/fork.c": b"int fork(void) { return 0; }\n",
    "include/linux/list.h": b"struct list_head { void *next; };\n",
    "drivers/gpu/drm/amd/include/asic_reg/gc/gc_10.h": b"#define REG 0x1\n",  # excluded: generated
    "drivers/huge_table.c": b"/* big */" + b"0," * 600_000,  # excluded: over 1 MB
    "drivers/latin1.c": "/* caf\xe9 */\n".encode("latin-1"),  # not UTF-8: skipped and counted
    "Makefile": b"obj-y += fork.o\n",
    "Documentation/process/howto.rst": b"How to do kernel development\n",
    "Documentation/admin-guide/README.txt": b"Read me.\n",
    "Documentation/conf.py": b"# sphinx config\n",
    "Documentation/translations/it_IT/howto.rst": b"Come fare\n",
}


def make_linux_deb(cache):
    inner = _tar_xz({f"linux-source-6.1/{k}": v for k, v in LINUX_FILES.items()},
                    symlink="linux-source-6.1/kernel/link.c")
    data_tar = _tar_xz({"./usr/share/doc/linux-source-6.1/copyright": b"GPL-2\n",
                        "./usr/src/linux-source-6.1.tar.xz": inner})
    cache.mkdir(parents=True, exist_ok=True)
    deb = cache / f"linux-source-6.1_{sources.LINUX_SOURCE_VERSION}_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({"./control": b"x"}),
                         "data.tar.xz": data_tar}))
    return deb


def test_linux_source_from_deb(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    deb = make_linux_deb(cache)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(cache))
    monkeypatch.setattr(sources, "LINUX_SOURCE_SHA256", digest)

    code = docs_of("linux-source", subset="code")
    assert code == [("linux-source-6.1/include/linux/list.h", "struct list_head { void *next; };\n"),
                    ("linux-source-6.1/kernel/fork.c", "int fork(void) { return 0; }\n")]
    english = [n for n, _ in docs_of("linux-source", subset="english")]
    assert english == ["linux-source-6.1/Documentation/admin-guide/README.txt",
                       "linux-source-6.1/Documentation/process/howto.rst"]
    with pytest.raises(UserError, match="unknown linux-source subset 'rust'"):
        open_source("linux-source", subset="rust")

    meta = prep("linux-source", tmp_path / "out", val_fraction=0)
    assert meta["source_info"] == {"kind": "linux-source", "package": "linux-source-6.1",
                                   "version": sources.LINUX_SOURCE_VERSION, "deb_sha256": digest, "subset": "code"}
    assert meta["skipped"] == {"non_utf8": 1}
    assert decoded_docs(tmp_path / "out") == [t for _, t in code]
    assert "linux-source-6.1 6.1" in describe(meta)

    # A .deb that does not match the pinned sha256 is refused, and nothing is written.
    monkeypatch.setattr(sources, "LINUX_SOURCE_SHA256", "0" * 64)
    with pytest.raises(UserError, match="has sha256 .*delete it and run again"):
        prep("linux-source", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()

    # Not cached and no apt-get: say where to put the .deb.
    deb.unlink()
    monkeypatch.setattr(sources.shutil, "which", lambda cmd: None)
    with pytest.raises(UserError, match="needs apt-get.*snapshot.debian.org"):
        open_source("linux-source")


# ---------------------------------------------------------------------------------------------------------------
# export -> re-prepare, loaded tokenizers


def test_export_then_prepare_gives_the_same_shards(tmp_path):
    src = write_corpus(tmp_path / "corpus")
    prep(src, tmp_path / "ref", val_fraction=0.3)
    info = export_jsonl(str(src), tmp_path / "corpus.jsonl.xz", progress=False)
    assert info["docs"] == len(CORPUS)
    with lzma.open(tmp_path / "corpus.jsonl.xz") as f:
        first = json.loads(f.readline())
    assert first == {"name": "a.txt", "text": CORPUS["a.txt"]}

    prep(tmp_path / "corpus.jsonl.xz", tmp_path / "from_jsonl", tokenizer=str(tmp_path / "ref"), val_fraction=0.3)
    prep(src, tmp_path / "from_src", tokenizer=str(tmp_path / "ref" / "tokenizer.json"), val_fraction=0.3)
    assert shards(tmp_path / "from_jsonl") == shards(tmp_path / "from_src") == shards(tmp_path / "ref")

    # max_bytes: the export holds the same leading documents as a direct prepare with max_bytes.
    export_jsonl(str(src), tmp_path / "head.jsonl", max_bytes=100, progress=False)
    prep(tmp_path / "head.jsonl", tmp_path / "head_jsonl", tokenizer=str(tmp_path / "ref"), val_fraction=0.3)
    prep(src, tmp_path / "head_src", tokenizer=str(tmp_path / "ref"), val_fraction=0.3, max_bytes=100)
    assert shards(tmp_path / "head_jsonl") == shards(tmp_path / "head_src")

    with pytest.raises(UserError, match="already exists"):
        export_jsonl(str(src), tmp_path / "head.jsonl", progress=False)
    with pytest.raises(UserError, match="no text found"):
        export_jsonl(str(tmp_path / "ref"), tmp_path / "none.jsonl.gz", progress=False)  # .bin/.json only
    assert not (tmp_path / "none.jsonl.gz").exists()


def _bare_tokenizer(special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(CORPUS.values()), trainers.BpeTrainer(
        vocab_size=280, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_loaded_tokenizer_end_of_text(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", {"x.txt": "a b c\n", "y.txt": "hello </s> world\n"})

    # No <|endoftext|> and no eos in a config: one is added, after the existing ids.
    bare = _bare_tokenizer([])
    bare.save(str(tmp_path / "bare.json"))
    meta = prep(corpus, tmp_path / "out1", tokenizer=str(tmp_path / "bare.json"), val_fraction=0)
    assert meta["tokenizer"]["added_eot"] and meta["eot_token"] == EOT
    assert meta["eot_id"] == bare.get_vocab_size() and meta["vocab_size"] == bare.get_vocab_size() + 1
    assert load_tokenizer(tmp_path / "out1").token_to_id(EOT) == meta["eot_id"]
    assert decoded_docs(tmp_path / "out1") == ["a b c\n", "hello </s> world\n"]

    # A model folder whose tokenizer_config.json names an eos token: that token ends documents.
    model = tmp_path / "model"
    model.mkdir()
    _bare_tokenizer(["<s>", "</s>"]).save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    meta = prep(corpus, tmp_path / "out2", tokenizer=str(model), val_fraction=0)
    assert meta["eot_token"] == "</s>" and meta["eot_id"] == 1 and not meta["tokenizer"]["added_eot"]
    # The literal "</s>" in y.txt is text, so exactly one eos per document.
    assert int((TokenData(tmp_path / "out2").train == 1).sum()) == 2
    assert decoded_docs(tmp_path / "out2") == ["a b c\n", "hello </s> world\n"]


# ---------------------------------------------------------------------------------------------------------------
# bad input: a UserError naming the problem, and nothing left behind


def _bad_inputs(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    write_corpus(tmp_path / "empty_files", {"a.txt": "", "b.md": ""})
    write_corpus(tmp_path / "mixed", {"good.txt": "fine\n"})
    (tmp_path / "mixed" / "bad.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "broken.txt.xz").write_bytes(b"not xz at all")
    return {
        "missing path": (dict(source=tmp_path / "nope.txt"), "no such file or folder: .*nope.txt"),
        "unknown source": (dict(source="wikipedia"), "unknown source 'wikipedia'"),
        "empty folder": (dict(source=tmp_path / "empty_dir"), "no text found"),
        "empty files": (dict(source=tmp_path / "empty_files"), r"no text found .*skipped: 2 empty"),
        "not utf-8": (dict(source=tmp_path / "mixed"), r"bad.txt is not UTF-8"),
        "bad json": (dict(source=tmp_path / "bad.jsonl"), r"bad.jsonl line 2 is not valid JSON"),
        "no field": (dict(source=tmp_path / "nofield.jsonl"), r"nofield.jsonl line 1 has no 'text' field"),
        "bad json, loaded tokenizer": (dict(source=tmp_path / "bad.jsonl", tokenizer="LOADED"),
                                       r"bad.jsonl line 2 is not valid JSON"),
        "unsupported file": (dict(source=tmp_path / "data.csv"), "unsupported file type"),
        "corrupt xz": (dict(source=tmp_path / "broken.txt.xz"), r"broken.txt.xz is not a valid .xz file"),
        "vocab too large": (dict(source=tmp_path / "mixed", vocab_size=2**32 + 1), "does not fit"),
        "vocab too small": (dict(source=tmp_path / "mixed", vocab_size=100), "at least 257"),
        "val_fraction": (dict(source=tmp_path / "mixed", val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
        "no tokenizer": (dict(source=tmp_path / "mixed", tokenizer=str(tmp_path / "nope")), "no tokenizer.json"),
    }


BAD_CASES = ["missing path", "unknown source", "empty folder", "empty files", "not utf-8", "bad json", "no field",
             "bad json, loaded tokenizer", "unsupported file", "corrupt xz", "vocab too large", "vocab too small",
             "val_fraction", "no tokenizer"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_and_leaves_nothing(tmp_path, case):
    kw, pattern = _bad_inputs(tmp_path)[case]
    if kw.get("tokenizer") == "LOADED":
        _bare_tokenizer([EOT]).save(str(tmp_path / "tok.json"))
        kw["tokenizer"] = str(tmp_path / "tok.json")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "new" / "out"  # its parent does not exist yet either
    with pytest.raises(UserError, match=pattern) as e:
        prep(kw.pop("source"), out, **kw)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out, no parent, no temp dir


def test_refuses_existing_output(tmp_path):
    src = write_corpus(tmp_path / "corpus", {"a.txt": "some text here\n", "b.txt": "more text\n"})
    prep(src, tmp_path / "out")
    before = shards(tmp_path / "out")
    with pytest.raises(UserError, match="already exists and is a prepared dataset; pass a new --out or delete it"):
        prep(src, tmp_path / "out")
    assert shards(tmp_path / "out") == before
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    prep(src, tmp_path / "empty")
    assert shards(tmp_path / "empty") == before


def test_token_data_errors(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset.*sparsetrain data prepare"):
        TokenData(tmp_path / "nowhere")
    prep(write_corpus(tmp_path / "c", {"a.txt": "text text\n", "b.txt": "more\n"}), tmp_path / "out")
    with open(tmp_path / "out" / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match="train.bin is missing or has the wrong size"):
        TokenData(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# batches


def test_batch_loader_reproducible_per_rank_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = BatchLoader(tokens, 4, 16, seed=7), BatchLoader(tokens, 4, 16, seed=7)
    xs = [a.next_batch() for _ in range(5)]
    for x, y in xs:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)  # y is x shifted by one
        assert int(y.max()) < len(tokens)
    for x, y in xs:
        x2, y2 = b.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(BatchLoader(tokens, 4, 16, seed=8).next_batch()[0], xs[0][0])
    assert not torch.equal(BatchLoader(tokens, 4, 16, seed=7, rank=1, world_size=2).next_batch()[0], xs[0][0])

    # Resume: state after 3 batches, loaded into a fresh loader, continues with batches 4 and 5.
    c = BatchLoader(tokens, 4, 16, seed=7)
    for _ in range(3):
        c.next_batch()
    state = json.loads(json.dumps(c.state_dict()))
    d = BatchLoader(tokens, 4, 16, seed=7)
    d.load_state_dict(state)
    for x, _ in xs[3:]:
        assert torch.equal(d.next_batch()[0], x)
    with pytest.raises(UserError, match="seed 7, this run uses 8"):
        BatchLoader(tokens, 4, 16, seed=8).load_state_dict(state)


def test_batch_loader_works_on_memmap_and_edges(tmp_path):
    prep(write_corpus(tmp_path / "c"), tmp_path / "out", val_fraction=0.3)
    td = TokenData(tmp_path / "out")
    x, y = BatchLoader(td.train, 8, 32, seed=0).next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < td.vocab_size
    exact = np.arange(17)  # exactly seq_len+1 tokens: the one window
    assert torch.equal(BatchLoader(exact, 2, 16, seed=0).next_batch()[0], torch.arange(16).repeat(2, 1))
    with pytest.raises(UserError, match="corpus has 16 tokens, fewer than seq_len\\+1 = 17; prepare more text"):
        BatchLoader(np.arange(16), 2, 16, seed=0)


def test_eval_windows_spread_over_the_split():
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(eval_windows(tokens, batch_size=2, seq_len=10, max_tokens=50))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 10), (2, 10), (1, 10)]  # 5 windows, last batch partial
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(y, x + 1)  # each target is the next token
    # 5 of the 9 slots that fit, evenly spaced from the start to the end of the split, none overlapping
    assert x[:, 0].tolist() == [0, 10, 30, 50, 70]
    again = list(eval_windows(tokens, batch_size=2, seq_len=10, max_tokens=50))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    # Every slot fits: the windows tile the split from its start (9 full windows fit in 100 tokens).
    every = torch.cat([x for x, _ in eval_windows(tokens, 4, 10, 10**6)])
    assert torch.equal(every.flatten(), torch.arange(90))
    assert sum(len(x) for x, _ in eval_windows(tokens, 4, 10, 3)) == 1  # at least one window
    with pytest.raises(UserError, match="val split has 10 tokens"):
        eval_windows(tokens[:10], 4, 10, 100)


def test_eval_windows_reach_the_last_documents():
    """A split whose first documents are unlike the rest (the stdlib's code-page tables): a budget of a tenth of
    it reads tokens from every tenth of it, not only from the first documents."""
    tokens = np.arange(10_001, dtype=np.int64)
    starts = torch.cat([x[:, 0] for x, _ in eval_windows(tokens, 8, 100, 1000)])
    assert len(starts) == 10
    assert sorted(set((starts // 1000).tolist())) == list(range(10))


def test_describe_says_when_the_held_out_documents_are_few():
    meta = {"source": "stdlib", "source_info": {}, "tokenizer": {"kind": "trained", "sample_bytes": 8_000_000},
            "train_docs": 673, "val_docs": 17, "train_tokens": 2_000_000, "val_tokens": 60_000,
            "text_bytes": 8_000_000, "max_bytes": None, "truncated_doc": None, "vocab_size": 4096,
            "eot_token": "<|endoftext|>", "eot_id": 0, "dtype": "uint16", "val_fraction": 0.02}
    assert "Only 17 validation documents" in describe(meta) and "--val-fraction (now 0.02)" in describe(meta)
    assert "Only" not in describe({**meta, "val_docs": 60})
    assert "Only" not in describe({**meta, "train_docs": 40, "val_docs": 1})  # a tiny corpus has no choice
