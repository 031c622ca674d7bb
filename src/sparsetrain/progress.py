"""Progress bars: live on a terminal, one line every 30 s in a log file (so CI and GPU logs stay readable)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(**kwargs) -> tqdm:
    kwargs.setdefault("mininterval", 1.0 if sys.stderr.isatty() else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)
