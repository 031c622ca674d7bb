"""Supervised fine-tuning data: prompt/response or chat JSONL, tokenized and packed into fixed-length rows.

Each JSONL line is one example, either `{"prompt": ..., "response": ...}` (field names configurable) or Hugging Face
chat format `{"messages": [{"role": ..., "content": ...}, ...]}`. An example is rendered as turns

    [bos] <|role|>\n content eos   <|role|>\n content eos   ...

(a prompt/response pair is a user turn then an assistant turn) and the loss goes on the content and closing eos of
assistant turns only. Examples are packed whole, in order, into rows of seq_len + 1 tokens (inputs are a row's first
seq_len tokens, targets its last seq_len) and the rest of a row is padding without loss. An example longer than a row
is cut to the row; one left with no loss token is dropped. Packed examples see the ones before them in their row
(plain causal attention), as in pre-training.

Written: `sft_train.npz` and `sft_val.npz` (`tokens` [rows, seq_len + 1], `mask` [rows, seq_len + 1]: loss on that
token as a target), `meta.json`, and a copy of `tokenizer.json`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from sparsetrain.data.prepare import load_tokenizer
from sparsetrain.data.sources import iter_documents, open_source
from sparsetrain.errors import UserError
from sparsetrain.progress import progress_bar

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


def _special(tokenizer: Tokenizer, name: str | None, candidates: tuple[str, ...], what: str) -> int | None:
    if name:
        token_id = tokenizer.token_to_id(name)
        if token_id is None:
            raise UserError(f"{what} token '{name}' is not in the tokenizer's vocabulary; pass one that is")
        return token_id
    for candidate in candidates:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    return None


def read_examples(jsonl_path: str | Path, prompt_field: str = "prompt", response_field: str = "response"):
    """Every example as a list of (role, content) turns; any bad line is a UserError naming its line number."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise UserError(f"SFT data file {path} not found; pass a JSONL file of prompt/response or chat examples")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            examples.append(_turns(row, where, prompt_field, response_field))
    if not examples:
        raise UserError(f"SFT data file {path} holds no examples; add one JSON object per line")
    return examples


def _turns(row: dict, where: str, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise UserError(f"{where}: 'messages' must be a list of {{\"role\": str, \"content\": str}} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the chat has no assistant turn, so nothing to learn; add one or drop the line")
        return [(m["role"], m["content"]) for m in messages]
    for field in (prompt_field, response_field):
        if field not in row:
            raise UserError(
                f"{where}: missing field '{field}'; each line needs '{prompt_field}' and '{response_field}' "
                "(or a chat 'messages' list)"
            )
        if not isinstance(row[field], str):
            raise UserError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
    return [("user", row[prompt_field]), ("assistant", row[response_field])]


def encode(examples, tokenizer: Tokenizer, eos_id: int, bos_id: int | None) -> list[tuple[list[int], list[bool]]]:
    """Token ids and loss mask of each example (the mask is True on assistant content and its eos)."""
    headers = sorted({role for turns in examples for role, _ in turns})
    header_ids = dict(zip(headers, (e.ids for e in tokenizer.encode_batch(
        [f"<|{role}|>\n" for role in headers], add_special_tokens=False))))
    contents = tokenizer.encode_batch([c for turns in examples for _, c in turns], add_special_tokens=False)
    out, at = [], 0
    for turns in examples:
        ids, mask = ([bos_id], [False]) if bos_id is not None else ([], [])
        for role, _ in turns:
            body = contents[at].ids + [eos_id]
            at += 1
            ids += header_ids[role] + body
            mask += [False] * len(header_ids[role]) + [role == "assistant"] * len(body)
        out.append((ids, mask))
    return out


def pack(encoded, row_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Whole examples, in order, into rows of `row_len` tokens; returns tokens, mask and counts."""
    rows, masks = [], []
    row, row_mask = [], []
    truncated = dropped = 0

    def flush():
        if row:
            rows.append(row + [pad_id] * (row_len - len(row)))
            masks.append(row_mask + [False] * (row_len - len(row_mask)))

    for ids, mask in encoded:
        if len(ids) > row_len:
            ids, mask = ids[:row_len], mask[:row_len]
            truncated += 1
            if not any(mask[1:]):  # the first token of a row is never a target
                dropped += 1
                continue
        if len(row) + len(ids) > row_len:
            flush()
            row, row_mask = [], []
        row += ids
        row_mask += mask
    flush()
    tokens = np.array(rows, dtype=np.int64).reshape(-1, row_len)
    loss = np.array(masks, dtype=bool).reshape(-1, row_len)
    counts = {"examples": len(encoded) - dropped, "truncated": truncated, "dropped": dropped,
              "sequences": len(rows), "loss_tokens": int(loss[:, 1:].sum())}
    return tokens, loss, counts


def prepare_sft(jsonl_path: str | Path, tokenizer_path: str | Path, out_dir: str | Path, *,
                prompt_field: str = "prompt", response_field: str = "response", seq_len: int = 1024,
                val_fraction: float = 0.05, seed: int = 1337, eos_token: str | None = None,
                bos_token: str | None = None) -> dict[str, Any]:
    """Tokenize and pack a JSONL file into `out_dir`; returns the meta written to meta.json. Nothing is written
    unless every line is valid."""
    if seq_len <= 0:
        raise UserError(f"seq_len must be positive, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tokenizer = load_tokenizer(tokenizer_path)
    eos_id = _special(tokenizer, eos_token, EOS_NAMES, "eos")
    if eos_id is None:
        raise UserError(f"the tokenizer has none of {', '.join(EOS_NAMES)}; name its end-of-text token with eos_token")
    bos_id = _special(tokenizer, bos_token, BOS_NAMES, "bos")
    examples = read_examples(jsonl_path, prompt_field, response_field)

    # Split whole examples (not rows), in a seeded order.
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = int(round(val_fraction * len(examples)))
    if val_fraction > 0 and len(examples) >= 2:
        n_val = min(max(n_val, 1), len(examples) - 1)
    splits = {"val": sorted(order[:n_val].tolist()), "train": sorted(order[n_val:].tolist())}

    encoded = encode(examples, tokenizer, eos_id, bos_id)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    packed = {name: pack([encoded[i] for i in idx], seq_len + 1, eos_id) for name, idx in splits.items()}
    if packed["train"][2]["sequences"] == 0:
        raise UserError("no training example survives packing (every one lost its response); raise seq_len")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, (tokens, mask, _) in packed.items():
        np.savez(out / f"sft_{name}.npz", tokens=tokens.astype(dtype), mask=mask)
    tokenizer.save(str(out / "tokenizer.json"))
    meta = {
        "kind": "sft",
        "source": str(Path(jsonl_path).resolve()),
        "tokenizer": "tokenizer.json",
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "eos_id": eos_id,
        "bos_id": bos_id,
        "prompt_field": prompt_field,
        "response_field": response_field,
        "seed": seed,
        **{name: counts for name, (_, _, counts) in packed.items()},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --- a prompt/response set from documented C functions ----------------------------------------------------------
KERNEL_DOC_PROMPT = "Write the C function that this kernel-doc comment documents.\n\n"


def kernel_doc_pairs(text: str, max_response_chars: int = 2000) -> list[tuple[str, str]]:
    """(prompt, response) pairs from the kernel-doc comments of a C file: a comment that opens with `/**` alone on
    its line and names a function (` * name() - summary` or ` * name - summary`) right above that function's
    definition. The prompt is the comment's text, the response the definition (signature to its closing `}` at
    column 0). Definitions longer than `max_response_chars` are left out (they would not fit a training row)."""
    lines = text.split("\n")
    pairs, i = [], 0
    while i < len(lines):
        if lines[i] != "/**":
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "*/" and lines[end].startswith(" *"):
            end += 1
        if end >= len(lines) or lines[end].strip() != "*/":
            i = end
            continue
        doc = [line[3:] if line.startswith(" * ") else line[2:] for line in lines[i + 1:end]]
        head = doc[0].strip() if doc else ""
        name = head.split(" - ", 1)[0].strip().removesuffix("()") if " - " in head else ""
        sig_end = end + 1
        while sig_end < len(lines) and sig_end - end <= 6 and lines[sig_end] != "{" and ";" not in lines[sig_end]:
            sig_end += 1
        if (name.isidentifier() and sig_end < len(lines) and lines[sig_end] == "{"
                and f"{name}(" in " ".join(lines[end + 1:sig_end])):
            body_end = sig_end + 1
            while body_end < len(lines) and lines[body_end] != "}":
                body_end += 1
            response = "\n".join(lines[end + 1:body_end + 1])
            if body_end < len(lines) and len(response) <= max_response_chars:
                pairs.append((KERNEL_DOC_PROMPT + "\n".join(doc).strip(), response))
            i = body_end + 1
        else:
            i = end + 1
    return pairs


def write_kernel_doc_jsonl(source: str, out: str | Path, *, max_examples: int = 0, max_bytes: int | None = None,
                           max_response_chars: int = 2000, progress: bool = True) -> dict[str, int]:
    """Every kernel-doc pair of a source of C files (`linux-source`, or a file/folder/JSONL of them) as
    prompt/response JSONL (`data kernel-doc`); stops after `max_examples` pairs (0 = all). Written atomically."""
    out = Path(out)
    src = open_source(source, subset="code", progress=progress)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"documents": 0, "examples": 0}
    with (tmp.open("w", encoding="utf-8") as f,
          progress_bar(desc="kernel-doc pairs", unit="ex", disable=not progress) as pbar):
        for doc in iter_documents(src, max_bytes):
            counts["documents"] += 1
            pairs = kernel_doc_pairs(doc.text, max_response_chars)
            if max_examples:
                pairs = pairs[: max_examples - counts["examples"]]
            for prompt, response in pairs:
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
            counts["examples"] += len(pairs)
            pbar.update(len(pairs))
            if max_examples and counts["examples"] >= max_examples:
                break
    if counts["examples"] == 0:
        tmp.unlink()
        raise UserError(f"{source} holds no kernel-doc comment above a function definition; pass C sources")
    tmp.replace(out)
    return counts


class SFTLoader:
    """Batches of packed SFT rows: `next_batch()` -> (x, y) int64 [batch_size, seq_len], y = -100 where no loss.

    Like the pre-training loader it draws the global batch (the trainer gives each process its rows), reproducible
    by seed: rows in a seeded random order, a new order each epoch, batches running on across epoch ends.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", batch_size: int = 16, *, seed: int = 1337,
                 seq_len: int | None = None):
        data_dir = Path(data_dir)
        file = data_dir / f"sft_{split}.npz"
        if not file.is_file():
            raise UserError(f"no SFT {split} data at {file}; prepare it with prepare_sft (sparsetrain data sft)")
        meta = json.loads((data_dir / "meta.json").read_text())
        self.seq_len = meta["seq_len"]
        if seq_len is not None and seq_len != self.seq_len:
            raise UserError(f"the SFT data in {data_dir} is packed for seq_len={self.seq_len}, not {seq_len}; "
                            f"set train.seq_len={self.seq_len} or prepare it again")
        with np.load(file) as arrays:
            tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
            mask = torch.from_numpy(arrays["mask"])
        if tokens.shape[0] == 0:
            raise UserError(f"the SFT {split} split in {data_dir} is empty; prepare it with more examples "
                            "(or val_fraction > 0 for a validation split)")
        self.x = tokens[:, :-1].contiguous()
        self.y = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX).contiguous()
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked, need = [], self.batch_size
        while need:
            take = self._order[self.pos: self.pos + need]
            picked.append(take)
            need -= take.numel()
            self.pos += take.numel()
            if self.pos == self._order.numel():
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        rows = torch.cat(picked)
        return self.x[rows], self.y[rows]

    def eval_batches(self, batch_size: int, max_tokens: int):
        """The first rows in stored order, up to max_tokens input tokens (at least one row): the same every call."""
        n = min(self.x.shape[0], max(1, max_tokens // self.seq_len))
        for start in range(0, n, batch_size):
            yield self.x[start: min(start + batch_size, n)], self.y[start: min(start + batch_size, n)]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise UserError(f"the checkpoint's data loader used seed {state['seed']}, this run uses {self.seed}; "
                            "resume with the same seed")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)
