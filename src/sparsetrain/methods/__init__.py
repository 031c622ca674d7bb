"""Methods by name. Each lives in one module of this package; `base.Method` is the seam they implement."""
from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..model import ModelArgs
from .base import Dense, Method
from .mst import MST
from .sat import SAT
from .ssd import SSD
from .upcycle import Upcycle

REGISTRY: dict[str, type[Method]] = {"dense": Dense, "sat": SAT, "upcycle": Upcycle, "ssd": SSD, "mst": MST}


def build_method(method_cfg: dict[str, Any], args: ModelArgs, seq_len: int) -> Method:
    name = method_cfg.get("name", "dense")
    if name not in REGISTRY:
        raise UserError(f"unknown method.name '{name}'; methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name].from_config(method_cfg, args, seq_len)
