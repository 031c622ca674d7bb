"""The iso-loss speed-up (issue 19): how much sooner a method reaches the validation loss that dense reaches.

Dense is trained at several budgets; its runs give points (cost, final validation loss), cost being wall-clock
seconds (compilation excluded) or counted FLOPs. Those points make the dense frontier:

- The envelope. Points are sorted by cost and a point is kept only if its loss is lower than that of every cheaper
  point. A dense run that got worse with more budget is noise or overfitting, not what dense can do; it is dropped
  from the frontier (and kept in `Frontier.dropped`, so the plot still shows it).
- Interpolation. Between adjacent envelope points the loss is taken as linear in log(cost): over a factor of a few
  in compute the loss falls roughly linearly in log compute, so the straight line on a log-x plot is what is read.
  The cost dense needs to reach a loss L is read off that line, and the speed-up is that cost over the method's.
- No silent extrapolation. A method whose loss is above (worse than) dense's cheapest point is "below the
  frontier": dense reaches that loss for at most its cheapest cost, so only an upper bound is given (cheapest dense
  cost / method cost), with the loss gap to that point. A method whose loss is lower than dense's most expensive
  point is "beyond the frontier": a lower bound (largest dense cost / method cost), with its loss gain.

Reads numbers and draws (matplotlib's Figure renders PNG with Agg and leaves pyplot's global backend alone); no
torch.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from sparsetrain.plots import run_series

# The costs a run carries, with their axis label and the scale the axis shows them in (as report.py draws them).
COST_KEYS = {"wallclock": ("wall-clock s (compilation excluded)", 1.0), "flops": ("counted training TFLOPs", 1e-12)}


@dataclass(frozen=True)
class IsoLoss:
    """One method against the dense frontier at equal validation loss."""
    status: str  # "on": within the frontier's loss range; "below": worse than dense's cheapest; "beyond": better
    speedup: float  # dense cost at the method's loss / the method's cost; a bound unless status is "on"
    bound: str  # "exact", "upper bound" (below) or "lower bound" (beyond)
    dense_cost: float  # the interpolated dense cost ("on"), else the cost of the frontier's nearest end
    method_cost: float
    loss: float  # the method's final validation loss
    loss_gap: float  # (loss - nearest end's loss) / that loss: > 0 worse (below), < 0 better (beyond), 0 on

    def label(self) -> str:
        """The speed-up as shown: 1.31x exact, <= 0.85x below the frontier, >= 2.10x beyond it."""
        return {"exact": "", "upper bound": "<= ", "lower bound": ">= "}[self.bound] + f"{self.speedup:.2f}x"


def _check_point(cost: Any, loss: Any, what: str) -> tuple[float, float]:
    try:
        cost, loss = float(cost), float(loss)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: cost and validation loss must be numbers, got {cost!r}, {loss!r}") from None
    if not cost > 0 or math.isinf(cost):  # `not >` also catches NaN
        raise ValueError(f"{what}: cost must be a positive finite number, got {cost}")
    if not math.isfinite(loss):
        raise ValueError(f"{what}: validation loss must be finite, got {loss}")
    return cost, loss


class Frontier:
    """Dense's validation loss against cost: the lower-left envelope of `points` [(cost, loss), ...]."""

    def __init__(self, points: list[tuple[float, float]]):
        if len(points) < 2:
            raise ValueError(f"a dense frontier needs at least 2 dense runs (budgets), got {len(points)}")
        pts = sorted(_check_point(c, loss, f"dense point {i}") for i, (c, loss) in enumerate(points))
        self.envelope: list[tuple[float, float]] = []
        self.dropped: list[tuple[float, float]] = []
        for cost, loss in pts:  # at equal cost the lower loss sorts first and the other is dropped
            if not self.envelope or loss < self.envelope[-1][1]:
                self.envelope.append((cost, loss))
            else:
                self.dropped.append((cost, loss))
        if len(self.envelope) < 2:
            raise ValueError(f"dense got no better with more budget ({pts}): the envelope keeps one point, which "
                             "is no frontier to interpolate on")

    @property
    def loss_range(self) -> tuple[float, float]:
        """(lowest loss: the largest budget's, highest loss: the smallest budget's)."""
        return self.envelope[-1][1], self.envelope[0][1]

    def cost_to_reach(self, loss: float) -> float | None:
        """The cost dense needs to reach `loss`, log-linear between envelope points; None outside the loss range."""
        low, high = self.loss_range
        if not low <= loss <= high:
            return None
        # Losses fall along the envelope: search their negatives, which rise, for the segment holding `loss`.
        i = max(1, bisect_left([-point[1] for point in self.envelope], -loss))
        (c0, l0), (c1, l1) = self.envelope[i - 1], self.envelope[i]
        t = (l0 - loss) / (l0 - l1)
        return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))

    def iso_speedup(self, loss: float, cost: float) -> IsoLoss:
        """A method that reached `loss` at `cost`, against dense at the same loss."""
        cost, loss = _check_point(cost, loss, "method")
        (c_min, l_high), (c_max, l_low) = self.envelope[0], self.envelope[-1]
        if loss > l_high:  # dense reaches this loss for no more than its cheapest run
            return IsoLoss("below", c_min / cost, "upper bound", c_min, cost, loss, (loss - l_high) / l_high)
        if loss < l_low:  # dense would need more than its largest run
            return IsoLoss("beyond", c_max / cost, "lower bound", c_max, cost, loss, (loss - l_low) / l_low)
        dense = self.cost_to_reach(loss)
        return IsoLoss("on", dense / cost, "exact", dense, cost, loss, 0.0)


def _cost_key(cost_key: str) -> str:
    if cost_key not in COST_KEYS:
        raise ValueError(f"cost_key must be one of {sorted(COST_KEYS)}, got {cost_key!r}")
    return cost_key


def frontier_of(dense_runs: list[dict[str, Any]], cost_key: str) -> Frontier:
    """The frontier of dense runs (dicts with "val_loss" and the cost under `cost_key`), one point per run."""
    key = _cost_key(cost_key)
    return Frontier([(r[key], r["val_loss"]) for r in dense_runs])


def compare(dense_runs: list[dict[str, Any]], method_runs: list[dict[str, Any]],
            cost_key: str) -> dict[str, IsoLoss]:
    """Each method run's name -> its iso-loss result against the dense runs' frontier, in `cost_key`."""
    front = frontier_of(dense_runs, cost_key)
    names = [r["name"] for r in method_runs]
    if len(set(names)) < len(names):
        raise ValueError(f"method runs need distinct names (results are keyed by them), got {names}")
    out = {}
    for r in method_runs:
        try:
            out[r["name"]] = front.iso_speedup(r["val_loss"], r[cost_key])
        except ValueError as e:
            raise ValueError(f"method run {r['name']!r}: {e}") from None
    return out


def plot_frontier(dense_runs: list[dict[str, Any]], method_runs: list[dict[str, Any]], cost_key: str, path: Path,
                  title: str, xlabel: str | None = None) -> None:
    """Dense's frontier (envelope points on their interpolation line, dropped runs hollow, each dense run's curve
    faint) with every method's curve and final point, loss against cost on a log axis, into a PNG. `xlabel`
    replaces the cost's usual axis label."""
    front = frontier_of(dense_runs, cost_key)
    results = compare(dense_runs, method_runs, cost_key)
    usual, scale = COST_KEYS[cost_key]
    xlabel = xlabel or usual
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for _, xs, ys in _curves(dense_runs, cost_key, scale):
        ax.plot(xs, ys, color="grey", alpha=0.35, lw=1)
    # A straight segment on a log-x axis is exactly the log-linear interpolation.
    env, dropped = list(zip(*front.envelope)), list(zip(*front.dropped))
    ax.plot([c * scale for c in env[0]], env[1], "o-", color="black", label="dense frontier (log-linear)")
    if dropped:
        ax.plot([c * scale for c in dropped[0]], dropped[1], "o", color="black", markerfacecolor="none",
                label="dense, off the envelope (dropped)")
    for (label, xs, ys), r in zip(_curves(method_runs, cost_key, scale), method_runs):
        line, = ax.plot(xs, ys, lw=1.2, alpha=0.8)
        ax.plot([r[cost_key] * scale], [r["val_loss"]], "*", ms=12, color=line.get_color(),
                label=f"{label}: {results[label].label()} at equal loss")
    ax.set_xscale("log")
    # Frontiers span a factor of a few: plain numbers at 1, 2, 5 of each decade, not 10^0 alone.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda x, _: f"{x:g}" if round(x / 10 ** math.floor(math.log10(x))) in (2, 5) else ""))
    ax.set(xlabel=xlabel, ylabel="validation loss", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _curves(runs: list[dict[str, Any]], cost_key: str, scale: float):
    """(name, costs, losses) of each run's curve, leaving out the points a log axis cannot show (a continuation's
    start at cost 0)."""
    out = []
    for label, xs, ys in run_series({r["name"]: r.get("curve", []) for r in runs}, cost_key, "val_loss", scale):
        kept = [(x, y) for x, y in zip(xs, ys) if x > 0]
        out.append((label, [x for x, _ in kept], [y for _, y in kept]))
    return out


def plot_speedups(results: dict[str, IsoLoss], targets: dict[str, float], path: Path) -> bool:
    """Bars of iso-loss speed-ups, one per comparison/method (the keys of `results`), each one's target (the same
    key in `targets`, if any) marked; bounds hatched and labelled "<=" / ">=". False if nothing to draw."""
    if not results:
        return False
    names = list(results)
    fig = Figure(figsize=(max(5.0, 1.3 * len(names) + 2), 4.5))
    ax = fig.subplots()
    marked = False  # one legend entry for all the targets
    for x, name in enumerate(names):
        r = results[name]
        bounded = r.bound != "exact"
        ax.bar(x, r.speedup, color="tab:orange", alpha=0.6 if bounded else 1.0, hatch="//" if bounded else None,
               edgecolor="black")
        ax.annotate(r.label(), (x, r.speedup), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")
        if name in targets:
            ax.hlines(targets[name], x - 0.4, x + 0.4, color="tab:red", lw=2.5, label=None if marked else "target")
            marked = True
    ax.axhline(1.0, color="grey", lw=1, ls="--", label="dense (1.0x)")
    ax.set_xticks(range(len(names)), names, fontsize=8, rotation=20, ha="right")
    ax.set(ylabel="x dense at equal validation loss", title="iso-loss speed-up over dense (hatched: a bound)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
