"""The iso-loss speed-up against a dense frontier (sparsetrain.frontier), on a synthetic frontier
loss = 2 + 3 / cost**0.3 at costs 1, 2, 4, 8."""
import math

import pytest

from sparsetrain.frontier import Frontier, IsoLoss, compare, plot_frontier, plot_speedups


def f(cost):
    return 2 + 3 / cost ** 0.3


COSTS = [1, 2, 4, 8]
POINTS = [(c, f(c)) for c in COSTS]


def run(name, loss, wallclock, flops, curve=True):
    r = {"name": name, "val_loss": loss, "wallclock": wallclock, "flops": flops}
    if curve:  # a start at cost 0 (as `start_point` writes), a record without val_loss, then a few evaluations
        r["curve"] = [{"step": 0, "wallclock": 0.0, "flops": 0.0, "val_loss": loss + 1.0},
                      {"step": 1, "wallclock": wallclock / 4, "flops": flops / 4},
                      {"step": 2, "wallclock": wallclock / 2, "flops": flops / 2, "val_loss": loss + 0.3},
                      {"step": 4, "wallclock": wallclock, "flops": flops, "val_loss": loss}]
    return r


def test_a_method_at_a_frontier_cost_gets_the_cost_ratio():
    front = Frontier(POINTS)
    for c in COSTS:
        r = front.iso_speedup(f(c), 0.7)
        assert r.status == "on" and r.bound == "exact" and r.loss_gap == 0.0
        assert abs(r.dense_cost - c) < 1e-9 and abs(r.speedup - c / 0.7) < 1e-9
        assert abs(front.cost_to_reach(f(c)) - c) < 1e-9


def test_between_frontier_points_the_cost_is_log_linear():
    front = Frontier(POINTS)
    # A quarter of the way down in loss from cost 2 to cost 4: log c = log 2 + 0.25 (log 4 - log 2), c = 2 * 2**0.25.
    loss = f(2) - 0.25 * (f(2) - f(4))
    expected = 2 * 2 ** 0.25
    r = front.iso_speedup(loss, 1.5)
    assert r.status == "on"
    assert abs(r.dense_cost - expected) < 1e-9 and abs(r.speedup - expected / 1.5) < 1e-9
    # ...which is the frontier's line, not the true curve's inverse
    assert abs(expected - (3 / (loss - 2)) ** (1 / 0.3)) > 1e-3
    assert r.label() == f"{expected / 1.5:.2f}x"


def test_below_and_beyond_the_frontier_give_bounds_and_the_loss_gap():
    front = Frontier(POINTS)
    below = front.iso_speedup(f(1) + 0.1, 0.5)  # worse than dense's cheapest run
    assert (below.status, below.bound, below.dense_cost) == ("below", "upper bound", 1)
    assert abs(below.speedup - 1 / 0.5) < 1e-12 and abs(below.loss_gap - 0.1 / f(1)) < 1e-12
    assert below.label() == "<= 2.00x"
    beyond = front.iso_speedup(f(8) - 0.05, 2.0)  # better than dense's largest run
    assert (beyond.status, beyond.bound, beyond.dense_cost) == ("beyond", "lower bound", 8)
    assert abs(beyond.speedup - 8 / 2.0) < 1e-12 and abs(beyond.loss_gap + 0.05 / f(8)) < 1e-12
    assert beyond.label() == ">= 4.00x"
    assert front.cost_to_reach(f(1) + 0.1) is None and front.cost_to_reach(f(8) - 0.05) is None


def test_the_envelope_drops_a_dense_run_that_got_worse_with_more_budget():
    worse = (3, f(2) + 0.01)  # more budget than cost 2, higher loss
    front = Frontier(list(reversed(POINTS)) + [worse])
    assert front.envelope == POINTS and front.dropped == [worse]
    assert abs(front.cost_to_reach(f(2) - 0.25 * (f(2) - f(4))) - 2 * 2 ** 0.25) < 1e-9
    tie = Frontier(POINTS + [(4, f(4) + 0.2)])  # the same cost twice: the lower loss stays
    assert tie.envelope == POINTS and tie.dropped == [(4, f(4) + 0.2)]


def test_compare_reads_the_cost_key():
    # FLOPs grow as cost**1.5 here, so the two keys disagree on purpose.
    dense = [run(f"dense-{c}", f(c), wallclock=c, flops=1e12 * c ** 1.5) for c in COSTS]
    methods = [run("fast", f(4), wallclock=2.0, flops=1e12 * 4.0), run("bad", f(1) + 0.5, 1.0, 1e12)]
    by_time = compare(dense, methods, "wallclock")
    by_flops = compare(dense, methods, "flops")
    assert set(by_time) == {"fast", "bad"} and isinstance(by_time["fast"], IsoLoss)
    assert abs(by_time["fast"].speedup - 4 / 2.0) < 1e-9
    assert abs(by_flops["fast"].speedup - 4 ** 1.5 / 4.0) < 1e-9
    assert by_time["bad"].status == by_flops["bad"].status == "below"
    with pytest.raises(ValueError, match="cost_key"):
        compare(dense, methods, "tokens")


def test_both_plots_write_png_files(tmp_path):
    dense = [run(f"dense-{c}", f(c), wallclock=c, flops=1e12 * c) for c in COSTS]
    dense.append(run("dense-noisy", f(2) + 0.01, wallclock=3, flops=3e12, curve=False))  # dropped: drawn hollow
    methods = [run("on", f(4), 2.0, 2e12), run("below", f(1) + 0.2, 0.5, 0.5e12),
               run("beyond", f(8) - 0.1, 4.0, 4e12, curve=False)]
    for key in ("wallclock", "flops"):
        path = tmp_path / f"frontier-{key}.png"
        plot_frontier(dense, methods, key, path, f"synthetic frontier, {key}")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    results = {f"{k}: {n}": r for k in ("wallclock", "flops") for n, r in compare(dense, methods, k).items()}
    path = tmp_path / "speedups.png"
    assert plot_speedups(results, {"wallclock: on": 1.2, "flops: on": 3.0}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert not plot_speedups({}, {}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("points, message", [
    ([(1, 3.0)], "at least 2"),
    ([], "at least 2"),
    ([(0, 3.0), (2, 2.5)], "positive"),
    ([(-1, 3.0), (2, 2.5)], "positive"),
    ([(math.nan, 3.0), (2, 2.5)], "positive"),
    ([(1, math.nan), (2, 2.5)], "finite"),
    ([(1, 3.0), (2, None)], "numbers"),
    ([(1, 2.5), (2, 3.0)], "no better"),  # the envelope keeps one point
])
def test_bad_dense_points_raise(points, message):
    with pytest.raises(ValueError, match=message):
        Frontier(points)


def test_bad_method_points_raise():
    front = Frontier(POINTS)
    with pytest.raises(ValueError, match="positive"):
        front.iso_speedup(3.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        front.iso_speedup(math.nan, 1.0)
    dense = [run(f"dense-{c}", f(c), c, c) for c in COSTS]
    with pytest.raises(ValueError, match="'m'.*finite"):
        compare(dense, [run("m", math.nan, 1.0, 1.0)], "wallclock")
    with pytest.raises(ValueError, match="distinct names"):
        compare(dense, [run("m", 3.0, 1.0, 1.0), run("m", 3.1, 1.0, 1.0)], "wallclock")
