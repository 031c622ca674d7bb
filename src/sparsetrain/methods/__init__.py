"""Methods by name. Each lives in one module of this package; `base.Method` is the seam they implement."""
from __future__ import annotations

from typing import Any

from sparsetrain.errors import UserError
from sparsetrain.methods.base import Dense, Method, RunInfo
from sparsetrain.methods.mst import MST
from sparsetrain.methods.sat import SAT
from sparsetrain.methods.ssd.method import SSD
from sparsetrain.methods.upcycle import Upcycle
from sparsetrain.nn.model import ModelArgs

REGISTRY: dict[str, type[Method]] = {"dense": Dense, "sat": SAT, "upcycle": Upcycle, "ssd": SSD, "mst": MST}


def build_method(method_cfg: dict[str, Any], args: ModelArgs, seq_len: int) -> Method:
    name = method_cfg.get("name", "dense")
    if name not in REGISTRY:
        raise UserError(f"unknown method.name '{name}'; methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name].from_config(method_cfg, args, seq_len)

__all__ = ["REGISTRY", "Dense", "Method", "RunInfo", "build_method"]
