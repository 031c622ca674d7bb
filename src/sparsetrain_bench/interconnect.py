"""How fast the GPUs of this machine talk: what the two-gpu benchmark needs to explain its scaling.

DDP all-reduces every gradient once a step and FSDP2 gathers and scatters every block, so a run on two GPUs scales
only when that traffic hides behind the compute. `topology()` says how the GPUs are linked (peer access, the
`nvidia-smi topo -m` matrix); run this module under torchrun to time all-reduces between the processes:

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m sparsetrain_bench.interconnect --out link.json

Bus bandwidth is NCCL-tests' convention: bytes x 2 (n - 1) / n / time, comparable across process counts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SIZES_MB = (16, 64, 256)


def topology() -> dict[str, Any]:
    """Peer access between every pair of visible GPUs and `nvidia-smi topo -m` (where there is one)."""
    info: dict[str, Any] = {"gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    n = info["gpus"]
    info["peer_access"] = {f"{a}->{b}": torch.cuda.can_device_access_peer(a, b)
                           for a in range(n) for b in range(n) if a != b}
    info["nccl_env"] = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    if shutil.which("nvidia-smi"):
        res = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True)
        info["nvidia_smi_topo"] = res.stdout.strip() or res.stderr.strip()
    return info


def time_all_reduce(sizes_mb: tuple[int, ...] = SIZES_MB, iters: int = 10) -> list[dict[str, Any]]:
    """Median time of a float32 all-reduce of each size among the processes of the group; one row per size."""
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    n = dist.get_world_size()
    rows = []
    for mb in sizes_mb:
        x = torch.ones(mb * 2**20 // 4, device=device)
        times = []
        for i in range(iters + 2):  # two of warm-up
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        assert x[0].item() == n ** (iters + 2)  # every process's ones summed, each time
        s = statistics.median(times)
        rows.append({"size_mb": mb, "ms": 1e3 * s, "algbw_gb_s": mb * 2**20 / s / 1e9,
                     "busbw_gb_s": mb * 2**20 * 2 * (n - 1) / n / s / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the timings (written by the first process)")
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=list(SIZES_MB))
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error("run it under torchrun: python -m torch.distributed.run --standalone --nproc_per_node=2 "
                 "-m sparsetrain_bench.interconnect --out FILE")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rows = time_all_reduce(tuple(a.sizes_mb), a.iters)
        if dist.get_rank() == 0:
            result = {"processes": dist.get_world_size(), "backend": dist.get_backend(), "all_reduce": rows}
            Path(a.out).write_text(json.dumps(result, indent=2))
            for r in rows:
                print(f"all-reduce {r['size_mb']} MB: {r['ms']:.2f} ms, bus {r['busbw_gb_s']:.1f} GB/s", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
