"""A prepared-data folder of uniformly random tokens, for timing the trainer end to end (its data path included)
where no corpus travels: a step's speed does not depend on which tokens it sees, only its loss does (it stays near
ln(vocab)).

    python3 bench/random_tokens.py --out data/random-tokens                # 12M train tokens, vocabulary 32768
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sparsetrain.errors import UserError
from sparsetrain_bench.corpora import random_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/random-tokens")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--train-tokens", type=int, default=12_000_000)
    p.add_argument("--val-tokens", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    try:
        out = random_tokens(Path(a.out), a.vocab_size, a.train_tokens, a.val_tokens, a.seed)
    except UserError as e:
        raise SystemExit(str(e))
    print(f"wrote {out}: {a.train_tokens:,} train and {a.val_tokens:,} validation tokens")


if __name__ == "__main__":
    main()
