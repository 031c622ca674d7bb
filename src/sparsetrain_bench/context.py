"""What every part of the suite runs with: the training shapes (full and `--quick`), the part's `Context` (its folders,
device and `--scale`), and the scratch folders the suite empties, marked so that it never deletes one it did not make.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsetrain.errors import UserError

MARKER = ".sparsetrain-suite"  # marks the suite's own scratch folders, the only ones it deletes


@dataclass(frozen=True)
class Shape:
    """The training shape of every run of a part."""
    preset: str
    batch_size: int
    seq_len: int
    eval_tokens: int
    log_every: int
    sft_seq_len: int  # rows of the fine-tuning data (a kernel-doc prompt alone is ~100 tokens)


FULL = Shape("gpt2-small", 16, 1024, 2**21, 10, 1024)
QUICK = Shape("tiny", 8, 64, 2048, 2, 256)


@dataclass(frozen=True)
class StepShape:
    """The shape of the step-time parts."""
    presets: tuple[str, ...]
    batch_size: int
    seq_len: int
    vocab_size: int
    steps: int
    warmup: int


STEP_FULL = StepShape(("gpt2-small", "gpt2-medium"), 16, 1024, 50304, 30, 10)
STEP_QUICK = StepShape(("tiny",), 4, 64, 512, 3, 1)


@dataclass
class Context:
    part: str
    out: Path
    data: Path
    work: Path
    carry: Path
    quick: bool
    device: str
    scale: float
    presets: tuple[str, ...] = ()  # --preset: the models of a step part, the model of a training part
    contenders: tuple[str, ...] = ()  # --contenders: run only these of the part ("dense": its frontier); () = all
    budgets: tuple[float, ...] = ()  # --budgets: dense's frontier budgets (multiples of the methods'); () = default
    resume: bool = False  # --resume: keep the run folders, read finished runs back and continue cut ones

    def wants(self, name: str) -> bool:
        """Whether this process runs contender `name` (a part split over GPUs runs some of them in each)."""
        return not self.contenders or name in self.contenders

    @property
    def shape(self) -> Shape:
        """The training shape; a training part's --preset replaces the model (SAT's continuation at gpt2-medium)."""
        if self.quick:
            return QUICK
        return dataclasses.replace(FULL, preset=self.presets[0]) if self.presets else FULL

    @property
    def cuda(self) -> bool:
        return self.device != "cpu" and torch.cuda.is_available()

    def steps(self, full: int, quick: int) -> int:
        return quick if self.quick else max(1, round(full * self.scale))


def scratch_dir(path: Path, empty: bool = True) -> Path:
    """The suite's own scratch folder `path`, emptied (refusing one it did not make; `empty=False`: kept as it is)."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise UserError(f"{path} is not empty and was not made by the suite; pass another --work-dir")
        if not empty:
            return path
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path
