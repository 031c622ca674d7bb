"""A prepared-data folder of uniformly random tokens, for timing the trainer end to end (its data path included)
where no corpus travels: a step's speed does not depend on which tokens it sees, only its loss does (it stays near
ln(vocab)).

    python3 bench/random_tokens.py --out data/random-tokens                # 12M train tokens, vocabulary 32768
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/random-tokens")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--train-tokens", type=int, default=12_000_000)
    p.add_argument("--val-tokens", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if not 2 <= a.vocab_size <= 2**16:
        raise SystemExit(f"random_tokens: --vocab-size must be in [2, 65536] (uint16 tokens), got {a.vocab_size}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    for split, n in (("train", a.train_tokens), ("val", a.val_tokens)):
        rng.integers(0, a.vocab_size, n, dtype=np.uint16).tofile(out / f"{split}.bin")
    meta = {"dtype": "uint16", "vocab_size": a.vocab_size, "eot_id": 0, "train_tokens": a.train_tokens,
            "val_tokens": a.val_tokens, "note": "uniformly random tokens (bench/random_tokens.py): for speed only"}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {out}: {a.train_tokens:,} train and {a.val_tokens:,} validation tokens")


if __name__ == "__main__":
    main()
