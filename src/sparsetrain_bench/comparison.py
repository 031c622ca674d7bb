"""A comparison's numbers from its runs' results: ratios to the dense run of the methods' budget (`compare`), each
method's speed-up at equal quality against the dense frontier (`iso_loss`, read by `sparsetrain.frontier`), and one
comparison from a part split over GPUs run at once (`merge_split`). Numbers only: no training, no torch."""
from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

from sparsetrain.errors import UserError
from sparsetrain.frontier import compare as iso_compare

COSTS = ("wallclock", "flops")
PER_CONTENDER = ("moe_inference",)  # a part's results keyed by contender, merged with the contenders


def compare(contenders: list[dict[str, Any]], peak: float | None, baseline: str = "dense") -> None:
    """Ratios to the baseline (when this process ran it: a part split over GPUs may hold only methods), and MFU of
    the counted FLOPs over `peak` (None: unknown, a CPU run), in place."""
    base = next((c for c in contenders if c["name"] == baseline), None)
    for c in contenders:
        c["mfu"] = c["flops"] / c["wallclock"] / peak if peak else None
        if c.get("role") == "base" or base is None:
            continue
        c["val_gap"] = (c["val_loss"] - base["val_loss"]) / base["val_loss"]
        c["speedup"] = base["wallclock"] / c["wallclock"]
        c["speedup_raw"] = base["train_time"] / c["train_time"]
        c["flops_ratio"] = base["flops"] / c["flops"]


def iso_loss(contenders: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each method's speed-up at equal quality against the contenders with role "frontier", per cost (wall-clock,
    counted FLOPs); also stored in each method's result as "iso_<cost>", with the names of its frontier's runs
    ("frontier": a part may hold several frontiers, one per group)."""
    dense = [c for c in contenders if c.get("role") == "frontier"]
    methods = [c for c in contenders if c.get("role") not in ("frontier", "base")]
    if not dense:  # a part split over GPUs: this process ran methods only (`merge_split` reads them off later)
        return {}
    for c in methods:
        c["frontier"] = [d["name"] for d in dense]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    by_name = {c["name"]: c for c in methods}
    for cost in COSTS:
        for name, result in iso_compare(dense, methods, cost).items():
            out.setdefault(name, {})[cost] = asdict(result) | {"label": result.label()}
            by_name[name][f"iso_{cost}"] = result.label()
    return out


def has_frontier(result: dict[str, Any]) -> bool:
    return any(c.get("role") == "frontier" for c in result.get("contenders", []))


# What makes two pre-training comparisons share one dense frontier: the same model, tokens, steps and schedule.
SAME_FRONTIER_KEYS = ("steps", "batch_size", "seq_len", "lr", "seed", "schedule", "decay_fraction", "warmup_steps",
                      "eval_tokens", "init_from")


def frontier_for(result: dict[str, Any], frontier: dict[str, Any]) -> bool:
    """Whether `frontier` (a result holding a dense frontier, maybe of another part) is the frontier of `result`'s
    methods: its run at the methods' budget trained the same model on the same tokens with the same schedule."""
    dense = next((c for c in frontier["contenders"] if c.get("role") == "frontier" and c["name"] == "dense"), None)
    methods = [c for c in result.get("contenders", []) if c.get("role") not in ("frontier", "base")]
    if dense is None or not methods:
        return False

    def key(c: dict[str, Any]) -> tuple:
        cfg = c["config"]
        return (cfg["model"], cfg["data"]["dir"], [cfg["train"].get(k) for k in SAME_FRONTIER_KEYS])

    return all(key(m) == key(dense) for m in methods)


def _distinct_contenders(results: list[dict[str, Any]]) -> None:
    """Each process of a split part ran other contenders (the continuation parts' base aside)."""
    names = [c["name"] for r in results for c in r.get("contenders", []) if c.get("role") != "base"]
    if len(set(names)) != len(names):
        raise UserError(f"{results[0]['part']}: a contender appears in more than one result ({sorted(names)}); each "
                        "process of a split part runs other contenders (--contenders)")


def self_contained(result: dict[str, Any]) -> bool:
    """Whether every method of `result` was read off a frontier trained in the same process (hsa-attention split
    by sequence length: each process a whole comparison)."""
    names = {c["name"] for c in result.get("contenders", [])}
    methods = [c for c in result.get("contenders", []) if c.get("role") not in ("frontier", "base")]
    return bool(methods) and all(c.get("frontier") and set(c["frontier"]) <= names for c in methods)


def merge_whole(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Processes that each ran whole comparisons of one part (`self_contained`), as one result: their contenders and
    speed-ups side by side, each still against its own process's frontier (no calibration needed)."""
    _distinct_contenders(results)
    commands = [r.get("command") for r in results]
    merged = copy.deepcopy(results[0]) | {"merged_from": commands, "command": " & ".join(commands)}
    merged["contenders"] = [copy.deepcopy(c) for r in results for c in r["contenders"]]
    merged["iso_loss"] = {k: v for r in results for k, v in copy.deepcopy(r.get("iso_loss", {})).items()}
    merged["notes"] = list(dict.fromkeys(n for r in results for n in r.get("notes", [])))
    merged["notes"].append("Run as separate processes, each a whole comparison against its own frontier: "
                           + "; ".join(f"{', '.join(c['name'] for c in r['contenders'])} on "
                                       f"{r.get('calibration', {}).get('device', '?')}" for r in results) + ".")
    return merged


def merge_split(results: list[dict[str, Any]], frontier_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """One part run as several processes (`--contenders`, e.g. the frontier on one GPU and the methods on another,
    at once) as one result: every contender in the GPU time of the process that trained the frontier, by the ratio
    of the two processes' calibrations (`runs.calibrate`), then the ratios to dense and the speed-ups at equal
    quality of the whole comparison. A contender's own-GPU times stay beside ("wallclock_own_gpu").
    `frontier_from`: where no process of this part trained the frontier, another part's that `frontier_for` these
    methods (ssd-pretrain's and mst-pretrain's are the same runs); only its frontier runs are taken."""
    holders = [r for r in results if has_frontier(r)]
    if not holders and frontier_from is not None:
        ref, own = frontier_from, results[0]
    elif len(holders) == 1:
        ref = own = holders[0]
    else:
        raise UserError(f"{results[0]['part']}: {len(holders)} of the {len(results)} results hold the dense "
                        "frontier; merge one frontier with the processes that ran the methods")
    others = [r for r in results if r is not ref]
    _distinct_contenders(results)
    from_ref = [c for c in ref["contenders"] if ref is own or c.get("role") == "frontier"]
    contenders = copy.deepcopy(from_ref)
    taken = [(ref["calibration"], [c["name"] for c in from_ref if c.get("role") != "base"])]  # for the note
    for r in others:
        factor = ref["calibration"]["step_s"] / r["calibration"]["step_s"]
        taken.append((r["calibration"], []))
        for c in r["contenders"]:
            if c.get("role") == "base":
                continue  # the continuation parts' base: the frontier's process holds its own
            taken[-1][1].append(c["name"])
            c = copy.deepcopy(c)
            c["wallclock_own_gpu"], c["calibration_factor"] = c["wallclock"], factor
            c["wallclock"] *= factor
            c["train_time"] *= factor
            for point in c["curve"]:
                for key in ("wallclock", "train_time"):
                    if key in point:
                        point[key] *= factor
            contenders.append(c)
    commands = [r.get("command") for r in (ref, *others)]
    merged = copy.deepcopy(own) | {"contenders": contenders, "merged_from": commands, "command": " & ".join(commands)}
    for r in others:  # results kept per contender beside the runs (ssd-pretrain's MoE inference)
        for key in PER_CONTENDER:
            if key in r:
                merged[key] = {**merged.get(key, {}), **copy.deepcopy(r[key])}
    compare(merged["contenders"], ref["env"].get("peak_flops"))
    merged["iso_loss"] = iso_loss(merged["contenders"])
    merged.setdefault("notes", []).append(
        "Split over processes, run at once: " + "; ".join(
            f"{', '.join(names)} on {c['device']} (CUDA_VISIBLE_DEVICES={c['cuda_visible_devices'] or '-'}, "
            f"calibration step {1000 * c['step_s']:.1f} ms)" for c, names in taken)
        + ". Methods trained beside the frontier are put in its GPU's time by the ratio of the calibrations."
        + ("" if ref is own else f" The frontier is {ref['part']}'s (the same model, tokens, steps and schedule)."))
    return merged
