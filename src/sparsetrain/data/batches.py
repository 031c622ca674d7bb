"""The rows a run trains and evaluates on: pre-training token shards, or packed fine-tuning rows."""
from __future__ import annotations

import json
from pathlib import Path

from sparsetrain.data.sft import SFTLoader
from sparsetrain.data.tokens import BatchLoader, TokenData, eval_windows
from sparsetrain.errors import UserError


class TrainingData:
    """The batches a run trains and evaluates on: pre-training token shards, or packed SFT rows (loss on
    responses only) when the data folder's meta.json says `kind = "sft"`."""

    def __init__(self, data_dir: str | Path, tcfg):
        meta_file = Path(data_dir) / "meta.json"
        self.sft = meta_file.is_file() and json.loads(meta_file.read_text()).get("kind") == "sft"
        self.dir, self.tcfg = Path(data_dir), tcfg
        self.val_rows = None
        if self.sft:
            self.loader = SFTLoader(data_dir, "train", tcfg.batch_size, seed=tcfg.seed, seq_len=tcfg.seq_len)
            self.vocab_size = json.loads(meta_file.read_text())["vocab_size"]
        else:
            self.tokens = TokenData(data_dir)
            # Every process draws the same global batch and takes its rows: one GPU or many, any micro-batching,
            # the model sees the same tokens.
            self.loader = BatchLoader(self.tokens.train, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
            self.vocab_size = self.tokens.vocab_size

    def check(self) -> None:
        """What would otherwise fail later, checked before a run writes anything: the validation split holds a
        window, and the folder's tokenizer is the one its tokens were made with (its vocabulary size)."""
        self.eval_batches(1, 1)
        if self.sft or not (self.dir / "tokenizer.json").is_file():
            return
        vocab = self.tokens.tokenizer.get_vocab(with_added_tokens=True)
        if max(vocab.values()) + 1 != self.vocab_size:
            raise UserError(f"{self.dir}/tokenizer.json has {max(vocab.values()) + 1:,} token ids but the data was "
                            f"made with a vocabulary of {self.vocab_size:,}; restore its tokenizer or prepare the "
                            "data again")

    def eval_batches(self, batch_size: int, max_tokens: int):
        """The same validation batches every call."""
        if self.sft:
            if self.val_rows is None:  # read once, evaluated many times
                self.val_rows = SFTLoader(self.dir, "val", batch_size, seq_len=self.tcfg.seq_len)
            return self.val_rows.eval_batches(batch_size, max_tokens)
        return eval_windows(self.tokens.val, batch_size, self.tcfg.seq_len, max_tokens)
