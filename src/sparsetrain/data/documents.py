"""A document read in parts: bounded memory for a document of any size, and a byte budget spent while reading.

A source (sources.py) gives each document's text as a str, or, for a plain-text file, as a TextFile read and
decoded part by part. `Doc` hands either out in parts of at most PART_BYTES UTF-8 bytes and charges what it reads
to a `Budget` (max_bytes) shared by all documents of a pass: the document in which the budget ends is cut there.
"""

from __future__ import annotations

import codecs
import gzip
import lzma
import zlib
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

from sparsetrain.errors import UserError

PART_BYTES = 4 << 20  # documents are read and handed on in parts of at most this much text

ARCHIVE_ERRORS = (lzma.LZMAError, gzip.BadGzipFile, zlib.error, EOFError)


def open_binary(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def not_utf8(where: str, offset: int) -> UserError:
    return UserError(f"{where} is not UTF-8 text (bad byte at offset {offset}); convert it "
                     "(e.g. `iconv -t UTF-8`) or remove it from the corpus")


def bad_archive(path: Path, e: Exception) -> UserError:
    return UserError(f"{path} is not a valid {path.suffix} file ({e}); re-download or re-compress it")


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(where, e.start) from None


class TextFile:
    """A plain-text file (maybe .xz/.gz), read part by part and decoded as UTF-8 across the parts' boundaries,
    so that a file of any size, a single huge line included, passes in bounded memory. Opened at the first read."""

    def __init__(self, path: Path):
        self.path, self.f = path, None
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.offset = 0  # bytes taken from the file so far

    def read(self, nbytes: int) -> tuple[str, int]:
        """(text, its UTF-8 size): at most nbytes; "" at the end of the file, or when nbytes cannot hold the
        next character."""
        held = len(self.decoder.getstate()[0])  # the start of a character cut by the previous read
        if nbytes <= held:
            return "", 0
        data = self._io(lambda f: f.read(nbytes - held))
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:  # e.start counts from the held bytes
            raise not_utf8(str(self.path), self.offset - held + e.start) from None
        self.offset += len(data)
        return text, held + len(data) - len(self.decoder.getstate()[0])

    def more(self) -> bool:
        return bool(self.decoder.getstate()[0]) or bool(self._io(lambda f: f.peek(1)))

    def _io(self, op):
        """op(the open file), a damaged .xz/.gz a UserError."""
        try:
            if self.f is None:
                self.f = open_binary(self.path)
            return op(self.f)
        except ARCHIVE_ERRORS as e:
            raise bad_archive(self.path, e) from None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class _Text:
    """A document already in memory, handed out in parts like a TextFile."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def read(self, nbytes: int) -> tuple[str, int]:
        part = self.text[self.pos:self.pos + nbytes]  # nbytes characters hold at least nbytes UTF-8 bytes
        size = len(part)
        if not part.isascii():
            raw = part.encode("utf-8")
            if len(raw) > nbytes:
                part = raw[:nbytes].decode("utf-8", "ignore")  # drops only the character the limit cuts
            size = len(part.encode("utf-8"))
        self.pos += len(part)
        return part, size

    def more(self) -> bool:
        return self.pos < len(self.text)

    def close(self) -> None:
        pass


class Budget:
    """Bytes of text left to read in one pass over a source (None: no limit)."""

    def __init__(self, max_bytes: int | None):
        self.left = max_bytes

    def take(self, nbytes: int) -> int:
        return nbytes if self.left is None else min(nbytes, self.left)

    def spend(self, nbytes: int) -> None:
        if self.left is not None:
            self.left -= nbytes

    def spent(self) -> bool:
        return self.left is not None and self.left <= 0


class Doc:
    """One document: `parts()` yields its text (once) in parts of at most PART_BYTES UTF-8 bytes; `text` is all of
    it at once. `nbytes` counts the bytes read so far (what max_bytes counts); `truncated` says that the budget
    ended inside it, so that only its first nbytes were read. The first part is read on creation."""

    def __init__(self, name: str, text: str | TextFile, budget: Budget,
                 on_bytes: Callable[[int], object] | None = None):
        self.name = name
        self._reader = text if isinstance(text, TextFile) else _Text(text)
        self._budget, self._on_bytes = budget, on_bytes
        self.nbytes, self.truncated = 0, False
        self._next = self._read()

    def empty(self) -> bool:
        """No text could be read (an empty document, or one whose first character the budget could not hold)."""
        return self.nbytes == 0

    def _read(self) -> str:
        n = self._budget.take(PART_BYTES)
        part, nbytes = self._reader.read(n) if n > 0 else ("", 0)
        self.nbytes += nbytes
        self._budget.spend(nbytes)
        if nbytes and self._on_bytes is not None:
            self._on_bytes(nbytes)
        if not part and self._reader.more():  # the budget ends inside this document
            self.truncated = True
            self._budget.left = 0  # nothing more: not even a shorter character of the next document
        return part

    def parts(self) -> Iterator[str]:
        part, self._next = self._next, ""
        while part:
            yield part
            part = self._read()

    @cached_property
    def text(self) -> str:
        return "".join(self.parts())

    def close(self) -> None:
        self._reader.close()
