"""`convert moefy` / `convert densify`: model folders with every FFN's neurons laid out expert by expert (a dense model
that runs as an MoE without re-clustering), and back in their original order. Every conversion (these and
`convert upcycle`) carries an imported model's own tokenizer into the folder it writes."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from sparsetrain import config as config_mod
from sparsetrain.data.tokenizer_files import SPECIAL_IDS_FILE, TOKENIZER_FILES, copy_tokenizer_files
from sparsetrain.methods.ssd.ffn import permute_ffn_
from sparsetrain.methods.ssd.moefy import moefy_, stored_order
from sparsetrain.store.checkpoint import write_model_folder
from sparsetrain.training.build import load_model


def _dense_config(cfg) -> str:
    raw = config_mod.to_dict(cfg)
    raw["method"] = {"name": "dense"}  # a converted folder holds a plain dense model
    return config_mod.dumps(raw)


def moefy_checkpoint(src: str | Path, out: str | Path, experts: int, seed: int = 0, iters: int = 10) -> Path:
    """`convert moefy`: cluster every FFN of a run, checkpoint or model folder into `experts` experts and write a
    model folder with the neurons laid out expert by expert (config.toml, model.safetensors: a dense model), plus
    `moe.json` (the experts) and `moe.safetensors` (the original neuron at each position, for `densify`)."""
    model, _, cfg = load_model(src)
    before = stored_order(src)
    order = moefy_(model, experts, iters=iters, seed=seed).cpu()
    if before is not None:  # relative to the source's original order
        order = before.gather(1, order)
    out = Path(out)
    write_model_folder(out, _dense_config(cfg), model.state_dict())
    save_file({"neuron_order": order.contiguous()}, str(out / "moe.safetensors"))
    carry_tokenizer(src, out)
    (out / "moe.json").write_text(json.dumps({"experts": experts, "seed": seed, "iters": iters}) + "\n")
    return out


def densify_checkpoint(src: str | Path, out: str | Path) -> Path:
    """`convert densify`: a plain dense model folder with the neurons back in their original order (exactly the
    weights before `moefy`; for an SSD run, the order of its initialisation)."""
    model, _, cfg = load_model(src)
    order = stored_order(src)
    if order is not None:
        for block, o in zip(model.blocks, order):
            permute_ffn_(block.mlp, o.argsort())
    write_model_folder(Path(out), _dense_config(cfg), model.state_dict())
    carry_tokenizer(src, Path(out))
    return Path(out)


def carry_tokenizer(source: str | Path, out: Path) -> None:
    """A model folder that holds its own tokenizer (an imported one) passes it, and its special-token ids, to the
    folder converted from it; a run trained by the toolkit keeps pointing at its data folder's through data.dir."""
    source = Path(source)
    if (source / "tokenizer.json").is_file():
        copy_tokenizer_files(source, out, TOKENIZER_FILES + (SPECIAL_IDS_FILE,))
