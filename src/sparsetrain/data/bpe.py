r"""The byte-level BPE: trained, and text encoded, in bounded pieces cut where its pre-tokenizer splits anyway.

Encoding or training on a whole long document costs memory in proportion to it (a 50 MB single line took 7.5 GB to
encode, 4.2 GB to train on), so documents go to the tokenizer in pieces of about PIECE_CHARS characters.

Why the cuts change no token: the byte-level pre-tokenizer (GPT-2's, `tokenizers`' ByteLevel with use_regex) splits
text into words with the regex 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+, and
BPE merges only inside a word. `_SAFE_CUT` cuts just before a " " or "\n" that stands between two visible ASCII
characters. No alternative matches a non-whitespace character followed by whitespace, so the whole text has a word
boundary there. Before it, the piece that ends there gets the same words: their matching reads the character at the
cut at most to end a run of letters, digits or symbols, which that whitespace and the end of the piece both do (and
a \s+ run cannot reach it past the visible character). After it, the regex has no lookbehind, so the piece that
starts there gets the same words. So the pieces encode to exactly the tokens of the whole text, and the trainer
counts exactly the same words (`cuts_are_safe` says for which tokenizers this holds; the tests check it on random
text).

A document with no such cut for HARD_CUT_PIECES * PIECE_CHARS characters (megabytes without a space or a newline
between visible characters: a base64 blob, minified data, text in a script written without spaces) is cut there
anyway. Then, and only at that cut, the tokens may differ from those of the whole text: the word cut in two is
encoded as two words (a token or two more), the text still decodes to the same bytes, and it spares encoding a
multi-megabyte word in one go.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from typing import Iterable, Iterator

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparsetrain.data.sources import Source, empty_corpus, iter_documents, known_total
from sparsetrain.progress import progress_bar

EOT = "<|endoftext|>"
PIECE_CHARS = 1 << 18  # text goes to the tokenizer in pieces of about this many characters (memory ~ 100x this)
HARD_CUT_PIECES = 4  # without a safe cut for this many pieces' worth of characters, cut anyway (see above)

_SAFE_CUT = re.compile(r"(?<=[!-~])[\n ](?=[!-~])")


def pieces(parts: Iterable[str], target: int | None = None) -> Iterator[str]:
    """A document's text, given in parts of any size, as pieces of about `target` (PIECE_CHARS) characters. Each
    cut is the first _SAFE_CUT at least `target` characters into the rest of the text, else, when the next
    HARD_CUT_PIECES * target characters hold none, after them. The cuts depend on the text, not on its parts."""
    target = target or PIECE_CHARS
    hard = HARD_CUT_PIECES * target
    rest, start = "", 0
    for part in parts:
        rest, start = rest[start:] + part, 0
        while len(rest) - start > target:
            # endpos start+hard+1: a cut before start+hard, whose lookahead character is already here
            m = _SAFE_CUT.search(rest, start + target, start + hard + 1)
            if m is not None:
                cut = m.start()
            elif len(rest) > start + hard:
                cut = start + hard
            else:
                break  # the cut may be in the next part
            yield rest[start:cut]
            start = cut
    if start < len(rest):
        yield rest[start:]


def cuts_are_safe(tok: Tokenizer) -> bool:
    """True when the cuts of `pieces` cannot change the encoding: a plain byte-level BPE with GPT-2's regex and no
    prefix space (which each piece would get), whose added tokens are all special (prepare encodes them as text)."""
    cfg = json.loads(tok.to_str())
    pre = cfg.get("pre_tokenizer") or {}
    return (cfg.get("normalizer") is None and (cfg.get("model") or {}).get("type") == "BPE"
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and all(t.get("special") for t in cfg.get("added_tokens", [])))


def train_bpe(src: Source, vocab_size: int, sample_bytes: int, progress: bool) -> tuple[Tokenizer, dict]:
    """Byte-level BPE (GPT-2 style: every byte is a token, so any text round-trips) trained on the first
    sample_bytes of text (a document in which they end is cut there), fed to the trainer in pieces."""
    sample = Counter()
    with progress_bar(total=known_total(src, sample_bytes), desc="tokenizer sample", unit="B", unit_scale=True,
                      disable=not progress) as bar:
        def texts():
            for doc in iter_documents(src, sample_bytes, on_bytes=bar.update):
                yield from pieces(doc.parts())
                sample["docs"] += 1
                sample["bytes"] += doc.nbytes

        stream = texts()
        first = next(stream, None)
        if first is None:
            raise empty_corpus(src)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no prefix: exact round-trip
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(itertools.chain([first], stream), trainer)
    info = {"kind": "trained", "type": "byte-level BPE", "requested_vocab_size": vocab_size,
            "vocab_size": tok.get_vocab_size(), "sample_bytes": sample["bytes"], "sample_docs": sample["docs"],
            "tokenizers_version": tokenizers.__version__}
    return tok, info
