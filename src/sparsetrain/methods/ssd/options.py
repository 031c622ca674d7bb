"""SSD's options and their checks: the schedule (adaptive or fixed windows), the experts, the monitor, the router."""
from __future__ import annotations

from dataclasses import dataclass, field

from sparsetrain.errors import UserError
from sparsetrain.nn.model import ModelArgs
from sparsetrain.nn.moe import KERNELS

SCHEDULES = ("adaptive", "fixed")
PHASES = ("dense", "sparse")
CLUSTERINGS = ("weights", "coactivation")
ROUTERS = ("centroid", "trained")
EXACT_ZERO = ("relu", "relu2")  # activations whose inactive neurons output exactly 0


@dataclass
class SSDOptions:
    experts: int = 16  # E: every FFN is cut into E experts of d_ff / E neurons
    top_k: int = 4  # experts per token in the sparse phase
    top_ratio: float = 0.0  # > 0: top_k = round(top_ratio * experts), at least 1
    schedule: str = "adaptive"  # adaptive (the monitor decides) | fixed (sparse_windows)
    sparse_windows: list[list[float]] = field(default_factory=list)  # fixed: [start, end) fractions of training
    stable_ari: float = 0.9  # adaptive: go sparse when the mean ARI of consecutive clusterings reaches this
    # ... and the router's top-k experts hold at least this share of activation mass. 0.5: gpt2-small (relu2, E=16,
    # top-4) held 0.58-0.61 once its clusterings were stable (ARI >= 0.9); 0.6 never switched (BENCHMARKS.md).
    stable_mass: float = 0.5
    sparse_span: int = 200  # adaptive: steps per sparse phase
    dense_span: int = 100  # adaptive: dense steps at least, at the start and after every sparse phase
    final_phase: str = "dense"  # adaptive: the phase of the last final_fraction of training
    final_fraction: float = 0.1
    monitor_every: int = 50  # steps between monitor checks; 0 = no monitor (fixed schedule only)
    probe_sequences: int = 8  # sequences of the first training micro-batch kept as the probe
    activation_threshold: float = 0.01  # gelu / swiglu: |a| <= this is inactive (relu / relu2: a == 0)
    cluster: str = "weights"  # weights (k-means on normalised input rows) | coactivation (firing patterns)
    cluster_iters: int = 10  # k-means iterations per start at a switch (and at the first check)
    monitor_iters: int = 3  # k-means iterations of a periodic check: from the last check's centroids only
    router_grad: bool = True  # the straight-through gate's gradient reaches the router's input
    # centroid: expert e's router vector is its neurons' mean input row | trained: a linear router fitted at every
    # switch, from the centroids, to where each probe token's activation mass is (router_steps Adam steps)
    router: str = "centroid"
    router_steps: int = 100
    freeze_unrouted: bool = True  # experts that no token chose on a step keep their weights and moments
    seed: int = 0  # fresh k-means starts
    kernel: str = "auto"  # how the sparse phase's expert GEMMs run: auto | triton | grouped_mm | loop


def resolve_top_k(o: SSDOptions) -> int:
    return max(1, round(o.top_ratio * o.experts)) if o.top_ratio > 0 else o.top_k


def check_options(o: SSDOptions, args: ModelArgs) -> None:
    if o.experts < 2 or args.d_ff % o.experts:
        raise UserError(f"method.experts={o.experts} must be >= 2 and divide model.d_ff={args.d_ff}")
    if not 0 <= o.top_ratio <= 1:
        raise UserError(f"method.top_ratio must be in [0, 1] (0 = use method.top_k), got {o.top_ratio}")
    k = resolve_top_k(o)
    if not 1 <= k <= o.experts:
        raise UserError(f"method.top_k={k} must be in [1, method.experts={o.experts}]")
    for key, allowed in [("schedule", SCHEDULES), ("final_phase", PHASES), ("cluster", CLUSTERINGS),
                         ("router", ROUTERS), ("kernel", KERNELS)]:
        if getattr(o, key) not in allowed:
            raise UserError(f"unknown method.{key} '{getattr(o, key)}'; choose one of {', '.join(allowed)}")
    if o.schedule == "fixed":
        check_windows(o.sparse_windows)
    elif o.sparse_windows:
        raise UserError("method.sparse_windows is read only with method.schedule = \"fixed\"; remove it or set "
                        "the schedule to fixed")
    if o.schedule == "adaptive" and o.monitor_every < 1:
        raise UserError("method.schedule = \"adaptive\" needs the monitor: set method.monitor_every >= 1")
    for key in ["monitor_every", "sparse_span", "dense_span"]:
        if getattr(o, key) < 0:
            raise UserError(f"method.{key} must be >= 0, got {getattr(o, key)}")
    if o.sparse_span < 1:
        raise UserError(f"method.sparse_span must be at least 1 step, got {o.sparse_span}")
    for key in ["probe_sequences", "cluster_iters", "monitor_iters", "router_steps"]:
        if getattr(o, key) < 1:
            raise UserError(f"method.{key} must be at least 1, got {getattr(o, key)}")
    if not -1 <= o.stable_ari <= 1:
        raise UserError(f"method.stable_ari must be in [-1, 1] (an adjusted Rand index), got {o.stable_ari}")
    if not 0 <= o.stable_mass <= 1:
        raise UserError(f"method.stable_mass must be a share in [0, 1], got {o.stable_mass}")
    if not 0 <= o.final_fraction < 1:
        raise UserError(f"method.final_fraction must be in [0, 1), got {o.final_fraction}")
    if o.activation_threshold < 0:
        raise UserError(f"method.activation_threshold must be >= 0, got {o.activation_threshold}")


def check_windows(windows: list[list[float]]) -> None:
    """Sparse windows: [start, end) pairs of training fractions, ordered, not overlapping, within [0, 1]."""
    previous_end = 0.0
    for w in windows:
        if len(w) != 2 or not 0 <= w[0] < w[1] <= 1:
            raise UserError(f"method.sparse_windows entry {w} must be [start, end) with 0 <= start < end <= 1")
        if w[0] < previous_end:
            raise UserError(f"method.sparse_windows must be ordered and not overlap; {w} starts before "
                            f"{previous_end}")
        previous_end = w[1]


# --- clustering ------------------------------------------------------------------------------------------------------
