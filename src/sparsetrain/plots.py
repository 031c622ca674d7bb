"""Tables and line charts of run records: a Markdown table, a run's metrics.jsonl, loss curves into a PNG. Used by
the demo and by the benchmark report; reads JSON and draws, no torch."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec or "" for str); a missing or None value is "-"."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = [("-" if r.get(k) is None else format(r[k], fmt) if fmt else str(r[k])) for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[tuple[str, list[float], list[float]]]  # (label, xs, ys)
    marker: str = ""
    drawstyle: str = "default"  # "steps-post" for schedules: a value holds until the next one
    spans: list[tuple[float, float, str]] = field(default_factory=list)  # (x from, x to, label): shaded stretches
    note: str = ""  # a line under the title: what the panel does and does not compare


def plot_panels(panels: list[Panel], path: Path, ncols: int = 2) -> None:
    """Line charts, `ncols` to a row, into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for label, xs, ys in p.series:
            ax.plot(xs, ys, marker=p.marker or None, drawstyle=p.drawstyle, label=label)
        for x0, x1, label in p.spans:
            ax.axvspan(x0, x1, color="grey", alpha=0.15, label=label)
        ax.set(xlabel=p.xlabel, ylabel=p.ylabel, title=p.title + (f"\n{p.note}" if p.note else ""))
        ax.grid(alpha=0.3)
        if p.series or p.spans:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_series(runs: dict[str, list[dict[str, Any]]], x: str, y: str, x_scale: float = 1.0):
    """(label, xs, ys) of each run's records that hold `y`."""
    out = []
    for name, rows in runs.items():
        pts = [r for r in rows if r.get(y) is not None and r.get(x) is not None]
        out.append((name, [r[x] * x_scale for r in pts], [r[y] for r in pts]))
    return out
