"""Where documents come from: local files, the Python stdlib or site-packages, Debian's linux-source package,
Hugging Face datasets.

Every source yields documents (name, text) in a fixed order. The name is stable across machines (a relative
path, `path:line`, a row index, or the `name` field of an exported jsonl line) because the train/val split is
a hash of it; `export_jsonl` carries it along so a re-prepared corpus splits the same way.

`iter_documents` hands each document out in parts (documents.py), so that one of any size, a single-line .txt of
many GB included, passes in bounded memory: a plain-text file is read and decoded part by part; a document of
another kind (a JSONL line, a parquet or dataset row, a member of the linux-source archive) comes whole from its
reader and is handed on in parts. max_bytes is spent while reading, and cuts the document in which it ends.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import lzma
import os
import platform
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from sparsetrain.data.documents import ARCHIVE_ERRORS, Budget, Doc, TextFile, bad_archive, decode_utf8, open_binary
from sparsetrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".c", ".h", ".rst")  # each file is one document
COMPRESSED_SUFFIXES = (".xz", ".gz")  # of text and jsonl files: x.jsonl.xz, x.txt.gz
NAMED_SOURCES = ("stdlib", "site-packages", "linux-source", "hf:NAME[:CONFIG]")

# Debian's kernel source package: a big (~800 MB of C), real-world, license-clean code corpus that any Debian
# box can fetch with apt. Pinned, so every machine tokenizes exactly the same bytes.
LINUX_SOURCE_PACKAGE = "linux-source-6.1"
LINUX_SOURCE_VERSION = "6.1.192-3"
LINUX_SOURCE_SHA256 = "5259c57ca92092da39bd2ea803046da0e3c28f2b6a11ea20f6297468188ceb67"  # 139,330,232 bytes
LINUX_SOURCE_MAX_FILE_BYTES = 1_000_000  # larger .c/.h files are generated tables, not code
# Machine-generated register definitions (~100s of MB of #defines) would swamp the real code.
LINUX_CODE_EXCLUDE = ("drivers/gpu/drm/amd/include/asic_reg/",)
LINUX_ENGLISH_EXCLUDE = ("Documentation/translations/",)
LINUX_SUBSETS = ("code", "english")


@dataclass
class Source:
    """A resolved source: call `docs()` for a fresh pass over its documents (prepare reads twice): (name, text)
    pairs, the text a str or, for a plain-text file, a TextFile that `iter_documents` reads part by part."""

    label: str  # what the user passed
    info: dict  # provenance recorded in meta.json
    docs: Callable[[], Iterator[tuple[str, str | TextFile]]]
    total_bytes: int | None = None  # for progress bars, when cheap to know
    skipped: Counter = field(default_factory=Counter)  # files left out by a lenient reader, by reason


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSETRAIN_CACHE") or Path.home() / ".cache" / "sparsetrain").expanduser()


def open_source(source: str, *, subset: str = "code", text_field: str = "text", split: str = "train",
                streaming: bool = False, progress: bool = True) -> Source:
    """Resolve a source string. Named sources win over same-named paths (write ./stdlib for a folder)."""
    source = str(source)
    if source == "stdlib":
        return _stdlib_source()
    if source == "site-packages":
        return _site_packages_source()
    if source == "linux-source":
        return _linux_source(subset, progress)
    if source.startswith("hf:"):
        return _hf_hub_source(source, text_field, split, streaming)
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_hf_dataset(path):
            return _hf_disk_source(path, text_field, split)
        return _folder_source(path, text_field)
    if path.is_file():
        return _file_source(path, text_field)
    if os.sep in source or "/" in source or Path(source).suffix:
        raise UserError(f"no such file or folder: {source}; check the path")
    raise UserError(f"unknown source {source!r}: not an existing file/folder nor one of {', '.join(NAMED_SOURCES)}; "
                    "pass a path or one of those names")


def empty_corpus(src: Source) -> UserError:
    skipped = ", ".join(f"{n} {why}" for why, n in src.skipped.items() if n)
    return UserError(f"no text found in {src.label}" + (f" (skipped: {skipped})" if skipped else "") +
                     f"; point it at files with text ({', '.join(TEXT_SUFFIXES)}, .jsonl, .parquet) "
                     "or check text_field")


def known_total(src: Source, *limits: int | None) -> int | None:
    """Bytes a progress bar over the source will reach, when its size is known."""
    if src.total_bytes is None:
        return None
    return min([src.total_bytes] + [x for x in limits if x is not None])


def iter_documents(src: Source, max_bytes: int | None = None,
                   on_bytes: Callable[[int], object] | None = None) -> Iterator[Doc]:
    """Documents with text, in order. At most max_bytes of text are read: the document in which the limit falls is
    cut there (doc.truncated) and no later one is opened. on_bytes(n) is called for every n bytes read."""
    src.skipped.clear()  # counts describe the latest pass
    budget = Budget(max_bytes)
    docs = src.docs()
    while not budget.spent():  # checked before the next document is read
        item = next(docs, None)
        if item is None:
            return
        doc = Doc(*item, budget, on_bytes)
        if doc.empty():
            doc.close()
            if not doc.truncated:  # e.g. empty __init__.py: it would only add an end-of-text token
                src.skipped["empty"] += 1
            continue
        try:
            yield doc
        finally:
            doc.close()


# ---------------------------------------------------------------------------------------------------------------
# local files


def _kind(path: Path) -> str | None:
    """'text', 'jsonl' or 'parquet' for files we can read (looking through .xz/.gz), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None  # parquet compresses internally
    if not suffixes:
        return None
    if suffixes[-1] in TEXT_SUFFIXES:
        return "text"
    if suffixes[-1] == ".jsonl":
        return "jsonl"
    if suffixes[-1] == ".parquet":
        return "parquet"
    return None


def _read_file_docs(path: Path, name: str, text_field: str, strict: bool = True,
                    skipped: Counter | None = None) -> Iterator[tuple[str, str | TextFile]]:
    """Documents of one file. Non-strict (built-in corpora) skips non-UTF-8 files instead of failing, so it reads
    a text file whole first; strict hands a TextFile on, read in parts (a bad byte is found while reading)."""
    kind = _kind(path)
    try:
        if kind == "text" and strict:
            yield name, TextFile(path)
        elif kind == "text":
            with open_binary(path) as f:
                data = f.read()  # bytes, so \r\n survives as is
            try:
                yield name, data.decode("utf-8")
            except UnicodeDecodeError:
                if skipped is None:
                    decode_utf8(data, str(path))  # raises, naming the file
                skipped["non_utf8"] += 1
        elif kind == "jsonl":
            yield from _read_jsonl(path, name, text_field)
        elif kind == "parquet":
            yield from _read_parquet(path, name, text_field)
    except ARCHIVE_ERRORS as e:
        raise bad_archive(path, e) from None


def _read_jsonl(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    with open_binary(path) as f:
        for lineno, line in enumerate(f, 1):  # binary iteration splits on b"\n" only
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                rec = json.loads(decode_utf8(line, where))
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not valid JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(rec, dict) or text_field not in rec:
                fields = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
                raise UserError(f"{where} has no {text_field!r} field (has: {fields}); "
                                "set text_field (--text-field) to the field holding the text")
            text = rec[text_field]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise UserError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string; "
                                "set text_field (--text-field) to a text field")
            # An exported corpus carries each document's original name, which fixes its train/val split.
            doc_name = rec.get("name")
            yield (doc_name if isinstance(doc_name, str) else f"{name}:{lineno}"), text


def _read_parquet(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet file ({e}); re-download or re-export it") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{path} has no column {text_field!r} (has: {', '.join(schema.names)}); "
                        "set text_field (--text-field) to the column holding the text")
    col_type = schema.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)
            or getattr(pa.types, "is_string_view", lambda t: False)(col_type)):
        raise UserError(f"{path}: column {text_field!r} has type {col_type}, not string; "
                        "set text_field (--text-field) to a text column")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield f"{name}:{row}", text or ""
            row += 1


def _walk(root: Path, include: Callable[[Path], bool]) -> list[tuple[str, Path]]:
    """(relative posix path, path) of wanted files under root, sorted by path string, hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            p = Path(dirpath, fn)
            if not fn.startswith(".") and include(p) and p.is_file():
                found.append((p.relative_to(root).as_posix(), p))
    return sorted(found)


def _folder_source(root: Path, text_field: str) -> Source:
    files = _walk(root, lambda p: _kind(p) is not None)

    def docs():
        for rel, p in files:
            yield from _read_file_docs(p, rel, text_field)

    src = Source(label=str(root), info={"kind": "folder", "path": str(root.resolve()), "files": len(files)},
                 docs=docs)
    if all(_kind(p) == "text" and p.suffix.lower() not in COMPRESSED_SUFFIXES for _, p in files):
        src.total_bytes = sum(p.stat().st_size for _, p in files)
    return src


def _file_source(path: Path, text_field: str) -> Source:
    if _kind(path) is None:
        raise UserError(f"unsupported file type for {path}; use {', '.join(TEXT_SUFFIXES)}, .jsonl, .parquet "
                        "(text and jsonl may be .xz/.gz compressed), or a folder of those")
    total = path.stat().st_size if path.suffix.lower() not in COMPRESSED_SUFFIXES + (".parquet",) else None
    return Source(label=str(path), info={"kind": "file", "path": str(path.resolve())},
                  docs=lambda: _read_file_docs(path, path.name, text_field), total_bytes=total)


# ---------------------------------------------------------------------------------------------------------------
# stdlib: the zero-download default corpus


def _stdlib_source() -> Source:
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages"}  # third-party code, differs between machines
    files = _walk(root, lambda p: p.suffix == ".py" and not excluded.intersection(p.relative_to(root).parts))
    return _python_files(files, "stdlib", {"kind": "stdlib", "python": platform.python_version(),
                                           "path": str(root), "files": len(files)})


def _python_files(files: list[tuple[str, Path]], label: str, info: dict) -> Source:
    """A source of (name, path) Python files, one document each. Files that are not UTF-8 are skipped and counted,
    not fatal: the stdlib's Lib/test/encoded_modules are so on purpose, packages ship latin-1 fixtures."""
    src = Source(label=label, info=info, docs=lambda: None)

    def docs():
        for name, p in files:
            yield from _read_file_docs(p, name, "text", strict=False, skipped=src.skipped)

    src.docs = docs
    src.total_bytes = sum(p.stat().st_size for _, p in files)
    return src


# ---------------------------------------------------------------------------------------------------------------
# site-packages: the installed third-party code, a large corpus on a machine with no internet

# The toolkit itself (never trained on, should a non-editable install put it here) and pip's editable-install hooks
# (absolute paths of one machine), each directly under a root.
SITE_PACKAGES_EXCLUDE = ("sparsetrain", "sparsetrain_bench")
EDITABLE_HOOK_PREFIX = "__editable__"


def _site_packages_roots() -> list[Path]:
    """The running interpreter's existing package folders (purelib, platlib, site's), each once, in that order."""
    paths = sysconfig.get_paths()
    # getsitepackages is missing in some virtualenv-made site.py versions
    candidates = [paths["purelib"], paths["platlib"], *getattr(site, "getsitepackages", list)()]
    roots, seen = [], set()
    for c in candidates:
        p = Path(c)
        if p.is_dir() and p.resolve() not in seen:  # lib64 is often a link to lib
            seen.add(p.resolve())
            roots.append(p)
    return roots


def _root_labels(roots: list[Path]) -> list[str]:
    """Each root's shortest trailing path that no other root ends with: `site-packages` when there is one root,
    `local/lib/python3.11/dist-packages` beside `usr/lib/python3.11/dist-packages`, so document names differ."""
    parts = [r.absolute().parts[1:] or ("root",) for r in roots]
    labels = []
    for i, mine in enumerate(parts):
        k = 1
        while k < len(mine) and any(o[-k:] == mine[-k:] for j, o in enumerate(parts) if j != i):
            k += 1
        labels.append("/".join(mine[-k:]))
    return labels


def _norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: sparsetrain_bench and Sparsetrain-Bench are one


def _site_distributions(roots: list[Path]) -> list[str]:
    """Sorted "name==version" of the distributions installed in the roots, the toolkit's own left out."""
    excluded = {_norm_dist(n) for n in SITE_PACKAGES_EXCLUDE}
    found = set()
    for d in importlib.metadata.distributions(path=[str(r) for r in roots]):  # the roots only, not all of sys.path
        name = d.metadata["Name"]  # None for a broken .dist-info
        if name and _norm_dist(name) not in excluded:
            found.add(f"{name}=={d.version}")
    return sorted(found, key=str.lower)


def _site_packages_source() -> Source:
    roots = _site_packages_roots()

    def wanted(p: Path, root: Path) -> bool:
        top = p.relative_to(root).parts[0]
        return p.suffix == ".py" and top not in SITE_PACKAGES_EXCLUDE and not top.startswith(EDITABLE_HOOK_PREFIX)

    files = []
    for root, label in zip(roots, _root_labels(roots)):
        files += [(f"{label}/{rel}", p) for rel, p in _walk(root, lambda p, root=root: wanted(p, root))]
    files.sort()  # across roots too
    if not files:
        where = ", ".join(map(str, roots)) or "none exists"
        raise UserError(f"no .py files in the site-packages of {sys.executable} ({where}); install packages into "
                        "that interpreter (pip install ...) or run sparsetrain with a Python that has some")
    info = {"kind": "site-packages", "python": platform.python_version(), "roots": [str(r) for r in roots],
            "files": len(files), "distributions": _site_distributions(roots)}
    return _python_files(files, "site-packages", info)


# ---------------------------------------------------------------------------------------------------------------
# linux-source: Debian's kernel source .deb, read in place (ar -> data.tar.xz -> linux-source-6.1.tar.xz)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_linux_source(progress: bool = True) -> tuple[Path, str]:
    """Path and sha256 of the pinned linux-source .deb in the cache, downloading it with apt-get if missing."""
    cache = cache_dir()
    pin = f"{LINUX_SOURCE_PACKAGE}={LINUX_SOURCE_VERSION}"
    deb = cache / f"{LINUX_SOURCE_PACKAGE}_{LINUX_SOURCE_VERSION}_all.deb"
    if not deb.exists():
        if shutil.which("apt-get") is None:
            raise UserError(f"linux-source needs apt-get (Debian/Ubuntu) to download {pin}; get the .deb from "
                            f"https://snapshot.debian.org/package/linux/{LINUX_SOURCE_VERSION}/ into {cache}/")
        cache.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"downloading {pin} (139 MB) into {cache} with apt-get ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:  # no half-written .deb on failure
            r = subprocess.run(["apt-get", "download", pin], cwd=tmp, capture_output=True, text=True)
            got = sorted(Path(tmp).glob("*.deb"))
            if r.returncode != 0 or not got:
                lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
                why = next((ln for ln in lines if ln.startswith("E:")), lines[-1] if lines else "no .deb written")
                raise UserError(f"`apt-get download {pin}` failed ({why}); run `apt-get update` (the version must "
                                f"be in your apt sources) or put {deb.name} into {cache}/")
            os.replace(got[0], deb)
    digest = sha256_file(deb)
    if digest != LINUX_SOURCE_SHA256:
        raise UserError(f"{deb} has sha256 {digest}, expected {LINUX_SOURCE_SHA256} for {pin}; "
                        "delete it and run again to re-download")
    return deb, digest


def _linux_source(subset: str, progress: bool) -> Source:
    if subset not in LINUX_SUBSETS:
        raise UserError(f"unknown linux-source subset {subset!r}; use one of {', '.join(LINUX_SUBSETS)}")
    deb, digest = fetch_linux_source(progress)
    src = Source(label="linux-source", info={"kind": "linux-source", "package": LINUX_SOURCE_PACKAGE,
                                             "version": LINUX_SOURCE_VERSION, "deb_sha256": digest,
                                             "subset": subset}, docs=lambda: None)
    src.docs = lambda: deb_documents(deb, subset, src.skipped)
    return src


class _Slice(io.RawIOBase):
    """Read-only view of `size` bytes of a file from its current position (one member of an ar archive)."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(memoryview(b)[: min(len(b), self.left)])
        self.left -= n
        return n


def _deb_data_tar(f, deb: Path) -> tuple[_Slice, str]:
    """Find data.tar.* in a .deb (an `ar` archive): a stream over it and its tarfile compression mode."""
    if f.read(8) != b"!<arch>\n":
        raise UserError(f"{deb} is not a .deb (ar) archive; delete it and run again")
    while len(header := f.read(60)) == 60:
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58])
        if name.startswith("data.tar"):
            comp = {"data.tar": "", "data.tar.xz": "xz", "data.tar.gz": "gz", "data.tar.bz2": "bz2"}.get(name)
            if comp is None:
                raise UserError(f"{deb} stores {name}, which Python's tarfile cannot read; use a .deb with "
                                "data.tar.xz (Debian's default)")
            return _Slice(f, size), comp
        f.seek(size + (size & 1), os.SEEK_CUR)  # members are 2-byte aligned
    raise UserError(f"{deb} has no data.tar member; delete it and run again")


def _linux_member_wanted(name: str, size: int, subset: str) -> bool:
    rel = name.split("/", 1)[1] if "/" in name else name  # drop the top folder, linux-source-6.1/
    if subset == "code":
        return (rel.endswith((".c", ".h")) and size <= LINUX_SOURCE_MAX_FILE_BYTES
                and not rel.startswith(LINUX_CODE_EXCLUDE))
    return (rel.startswith("Documentation/") and rel.endswith((".rst", ".txt"))
            and not rel.startswith(LINUX_ENGLISH_EXCLUDE))


def deb_documents(deb: Path, subset: str, skipped: Counter | None = None) -> Iterator[tuple[str, str]]:
    """Documents of a linux-source .deb, streamed (nothing unpacked to disk), in the tarball's member order.

    The pinned tarball stores its members in sorted path order (checked when pinning), so tar order is
    sorted order; sorting here would mean holding ~800 MB of text in memory.
    """
    skipped = Counter() if skipped is None else skipped
    inner_name = f"{LINUX_SOURCE_PACKAGE}.tar.xz"
    with open(deb, "rb") as f:
        data, comp = _deb_data_tar(f, deb)
        try:
            with tarfile.open(fileobj=io.BufferedReader(data, 1 << 20), mode=f"r|{comp}") as outer:
                for m in outer:
                    if not (m.isfile() and m.name.rsplit("/", 1)[-1] == inner_name):
                        continue
                    with tarfile.open(fileobj=outer.extractfile(m), mode="r|xz") as inner:
                        for im in inner:
                            if im.isfile() and _linux_member_wanted(im.name, im.size, subset):
                                raw = inner.extractfile(im).read()
                                try:
                                    yield im.name, raw.decode("utf-8")
                                except UnicodeDecodeError:  # none in the pinned version; don't fail on one
                                    skipped["non_utf8"] += 1
                    return
        except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
            raise UserError(f"{deb} is corrupt ({e}); delete it and run again") from None
    raise UserError(f"{deb} holds no {inner_name}; delete it and run again")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file())


def _hf_docs(ds, text_field: str, label: str, prefix: str) -> Iterator[tuple[str, str]]:
    cols = ds.column_names  # None for some streaming datasets
    if cols is not None and text_field not in cols:
        raise UserError(f"dataset {label} has no column {text_field!r} (has: {', '.join(cols)}); "
                        "set text_field (--text-field) to the column holding the text")
    ds = ds.select_columns([text_field])
    i = 0
    for batch in ds.iter(batch_size=1000):
        if text_field not in batch:
            raise UserError(f"dataset {label} has no column {text_field!r}; set text_field (--text-field)")
        for text in batch[text_field]:
            if text is not None and not isinstance(text, str):
                raise UserError(f"dataset {label}: column {text_field!r} holds {type(text).__name__}, not text; "
                                "set text_field (--text-field) to a text column")
            yield f"{prefix}{i}", text or ""
            i += 1


def _hf_disk_source(path: Path, text_field: str, split: str) -> Source:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a half-copied or foreign folder
        raise UserError(f"could not load the saved dataset {path} ({type(e).__name__}: {e}); re-save it with "
                        "`Dataset.save_to_disk`") from None
    prefix = ""
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"saved dataset {path} has splits {', '.join(ds)}, not {split!r}; pass one of those "
                            "as split (--split)")
        ds, prefix = ds[split], f"{split}:"
    info = {"kind": "hf-disk", "path": str(path.resolve()), "rows": len(ds)}
    if prefix:
        info["split"] = split
    return Source(label=str(path), info=info, docs=lambda: _hf_docs(ds, text_field, str(path), prefix))


def _hf_hub_source(source: str, text_field: str, split: str, streaming: bool) -> Source:
    import datasets

    name, _, config = source[3:].partition(":")
    if not name:
        raise UserError(f"bad Hugging Face source {source!r}; write hf:NAME or hf:NAME:CONFIG")
    try:
        # Streaming when only a prefix is wanted (max_bytes): no multi-GB download for "the first 200 MB".
        ds = datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    except Exception as e:  # network, unknown name/config/split: all the user's to fix
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load Hugging Face dataset {name!r} (config {config or None}, split {split!r}): "
                        f"{msg}; check the name, config and split, and that the Hub is reachable") from None
    info = {"kind": "hf", "name": name, "config": config or None, "split": split}
    return Source(label=source, info=info, docs=lambda: _hf_docs(ds, text_field, source, f"{split}:"))
