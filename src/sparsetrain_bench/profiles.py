"""Reading a profiler's Chrome trace (`torch.profiler.profile(...).export_chrome_trace`): how much of a window the
GPU ran work, and where it waited for the host. Numbers only: no torch."""
from __future__ import annotations

import bisect


def gpu_busy(events: list[dict]) -> dict:
    """Kernels, the span from the first kernel's start to the last one's end, and the union of kernel intervals in
    it (ms): the share of the window in which the GPU ran a kernel."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel" and "dur" in e)
    busy, end = 0.0, 0.0
    for a, b in kernels:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    span = kernels[-1][1] - kernels[0][0] if kernels else 0.0
    return {"kernels": len(kernels), "span_ms": span / 1e3, "busy_ms": busy / 1e3,
            "busy_share": busy / span if span else None}


def _enclosing(intervals: list[tuple[float, float, str]], starts: list[float], t: float) -> str | None:
    """The name of the latest-starting interval of `intervals` (sorted by start) that contains t."""
    i = bisect.bisect_right(starts, t)
    for j in range(i - 1, max(-1, i - 400), -1):
        a, b, name = intervals[j]
        if a <= t <= b:
            return name
    return None


def idle_causes(events: list[dict]) -> dict:
    """Where the GPU waited for the host: each stretch without a kernel, memcpy or memset is charged to the
    host code that launched the work ending it - the step's region (`train_step`'s `sparsetrain.*` ranges, or
    "between steps") and the innermost CPU operation around the launch. Milliseconds over the profiled steps."""
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e.get("args", {}).get("correlation")) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    launches = {e["args"]["correlation"]: (e["ts"], e["tid"]) for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    regions, ops = [], {}
    for e in events:
        if "dur" not in e:
            continue
        if e.get("cat") == "user_annotation" and e["name"].startswith("sparsetrain."):
            regions.append((e["ts"], e["ts"] + e["dur"], e["name"][len("sparsetrain."):]))
        elif e.get("cat") == "cpu_op":
            ops.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    regions.sort()
    region_starts = [r[0] for r in regions]
    for tid in ops:
        ops[tid].sort()
    op_starts = {tid: [o[0] for o in v] for tid, v in ops.items()}
    by_region: dict[str, float] = {}
    by_op: dict[str, float] = {}
    end = gpu[0][1] if gpu else 0.0
    for a, b, corr in gpu[1:]:
        if a > end:
            gap = (a - end) / 1e3
            t, tid = launches.get(corr, (a, None))
            region = _enclosing(regions, region_starts, t) or "between steps"
            op = _enclosing(ops[tid], op_starts[tid], t) if tid in ops else None
            by_region[region] = by_region.get(region, 0.0) + gap
            key = f"{region}: {op or 'no CPU operation'}"
            by_op[key] = by_op.get(key, 0.0) + gap
        end = max(end, b)
    top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:20])
    return {"idle_ms_by_region": {k: round(v, 3) for k, v in sorted(by_region.items(), key=lambda kv: -kv[1])},
            "idle_ms_by_launching_op": {k: round(v, 3) for k, v in top.items()}}
