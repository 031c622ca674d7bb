"""`sparsetrain generate`: a trained model's continuation of a prompt, dense and (with --moe K) run as an MoE."""
from __future__ import annotations

import json
from pathlib import Path

from sparsetrain.data.prepare import load_tokenizer
from sparsetrain.methods.ssd.moefy import prepare_moe
from sparsetrain.nn.generate import generate
from sparsetrain.training.build import load_model


def generate_both(path: str | Path, prompt: str, moe: int | None = None, experts: int | None = None,
                  device: str = "cpu", **sampling) -> dict[str, str]:
    """`sparsetrain generate`: the dense model's continuation, and with `moe` = K the same model's as an MoE with
    top-K experts (same seed), for comparison."""
    model, _, cfg = load_model(path, device)
    tokenizer = load_tokenizer(cfg.data.dir)
    meta = Path(cfg.data.dir) / "meta.json"
    stop = json.loads(meta.read_text()).get("eot_id") if meta.is_file() else None
    out = {"dense": generate(model, tokenizer, prompt, stop_id=stop, **sampling)}
    if moe:
        prepare_moe(model, path, moe, experts)
        out[f"moe_top{moe}"] = generate(model, tokenizer, prompt, stop_id=stop, **sampling)
    return out
