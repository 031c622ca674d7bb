"""Reading prepared token data: the shards of a data dir as memmaps, and reproducible, resumable batches of windows."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sparsetrain.data.prepare import load_tokenizer
from sparsetrain.errors import UserError


class TokenData:
    """A prepared data dir: meta (dict), train / val token memmaps, vocab_size, eot_id."""

    def __init__(self, dir: str | Path):
        if str(dir) == "":  # an imported model's config names no data (Path("") would be the current folder)
            raise UserError("data.dir is not set (a model imported from Hugging Face names no data); pass "
                            "--set data.dir=DIR, a folder made by `sparsetrain data prepare --tokenizer MODEL_DIR`")
        self.dir = Path(dir).expanduser()
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{self.dir} is not a prepared dataset (no meta.json); run "
                            f"`sparsetrain data prepare --out {self.dir} ...` first")
        try:
            self.meta = json.loads(meta_path.read_text())
            dtype = np.dtype(self.meta["dtype"])
            self.vocab_size = int(self.meta["vocab_size"])
            self.eot_id = int(self.meta["eot_id"])
            counts = int(self.meta["train_tokens"]), int(self.meta["val_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta_path} is damaged ({e!r}); run `sparsetrain data prepare` again") from None
        self.train = self._open("train", dtype, counts[0])
        self.val = self._open("val", dtype, counts[1])

    def _open(self, split: str, dtype: np.dtype, n: int) -> np.ndarray:
        path = self.dir / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
            raise UserError(f"{path} is missing or has the wrong size (meta.json says {n:,} tokens); "
                            "run `sparsetrain data prepare` again")
        # np.memmap cannot map an empty file (val_fraction=0)
        return np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype)

    @property
    def tokenizer(self):
        return load_tokenizer(self.dir)


class BatchLoader:
    """Random windows of seq_len+1 tokens from a 1-D token array, reproducible by seed, resumable.

    Batch i is a pure function of (seed, rank, i): resuming only restores the counter i, and each rank draws
    its own windows. Windows may cross document boundaries (the end-of-text token marks them).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or seq_len < 1 or seed < 0:
            raise UserError(f"batch_size and seq_len must be >= 1 and seed >= 0, got {batch_size}, {seq_len}, "
                            f"{seed}; fix the train config")
        if len(tokens) < seq_len + 1:
            raise UserError(f"corpus has {len(tokens):,} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                            "prepare more text or lower train.seq_len")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0  # batches drawn so far
        self._window = np.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.step += 1
        return _xy(self.tokens, starts, self._window)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise UserError(f"the checkpoint's data loader used seed {state['seed']}, this run uses {self.seed}; "
                            "resume with the same seed")
        self.step = int(state["step"])


def _xy(tokens: np.ndarray, starts: np.ndarray, window: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.from_numpy(tokens[starts[:, None] + window].astype(np.int64))
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows spread evenly over the whole of `tokens`, up to max_tokens targets (at least one
    window), in batches of batch_size (the last may be smaller). The same tokens every call.

    Spread, not consecutive from the start: the validation split is whole documents one after the other, and the
    first max_tokens of it can be a handful of files unlike the rest (the stdlib's first val tokens were half
    code-page tables). When every window fits they tile the split from its start, consecutive."""
    if len(tokens) < seq_len + 1:  # checked here, not on first next(), so callers fail at setup
        raise UserError(f"val split has {len(tokens):,} tokens, fewer than seq_len+1 = {seq_len + 1}; prepare "
                        "with a larger val_fraction or more text, or lower train.seq_len")
    fit = (len(tokens) - 1) // seq_len  # windows that fit side by side
    n = max(1, min(max_tokens // seq_len, fit))
    # Window i starts at slot floor(i * fit / n): n of the `fit` slots, evenly spaced, first at 0.
    starts = (np.arange(n, dtype=np.int64) * fit // n) * seq_len
    window = np.arange(seq_len + 1)

    def batches():
        for b in range(0, n, batch_size):
            yield _xy(tokens, starts[b:b + batch_size], window)

    return batches()
