"""A dense model run as an MoE (MoEfication): its FFNs laid out expert by expert (`moefy_`), routed top-k
(`run_as_moe`), routers fitted to a probe (`fit_routers`), back to dense; the neuron order a folder stores."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sparsetrain import config as config_mod
from sparsetrain.errors import UserError
from sparsetrain.methods.ssd.cluster import contiguous_labels
from sparsetrain.methods.ssd.ffn import SSDFFN, fit_router, permute_ffn_, router_centroids, ssd_layers
from sparsetrain.methods.ssd.monitor import Monitor
from sparsetrain.nn.model import Transformer, activate
from sparsetrain.store.checkpoint import find_weights


def moefy_(model: Transformer, experts: int, clustering: list[torch.Tensor] | None = None, *, iters: int = 10,
           seed: int = 0) -> torch.Tensor:
    """Lay every FFN of a dense model out expert by expert, in place (a dense model computing the same function).
    `clustering`: per layer, the expert of every neuron at its current position; None clusters the weights,
    warm-started from the current contiguous layout (an SSD run's or a moefied model's). Returns the orders
    applied [L, d_ff] (new neuron i was neuron order[i])."""
    if experts < 2 or model.args.d_ff % experts:
        raise UserError(f"experts={experts} must be >= 2 and divide the model's d_ff={model.args.d_ff}")
    layers = ssd_layers(model)
    if clustering is None:
        monitor = Monitor(experts, 1, iters=iters, seed=seed)
        monitor.warm_from_layout(model)
        monitor.check(model)
        clustering = monitor.labels  # labels of the original neurons, and here the original order is the current one
    orders = []
    for m, labels in zip(layers, clustering):
        order = labels.to(m.fc.weight.device).argsort(stable=True)
        permute_ffn_(m, order)
        orders.append(order)
    return torch.stack(orders)


def run_as_moe(model: Transformer, top_k: int, experts: int = 16, clustering: list[torch.Tensor] | None = None,
               *, iters: int = 10, seed: int = 0, router_grad: bool = True) -> Transformer:
    """Run every FFN of a dense model as an MoE of `experts` experts, top-`top_k` per token (in place; returns the
    model). `clustering` as in `moefy_`: None clusters the weights."""
    if not 1 <= top_k <= experts:
        raise UserError(f"top-k={top_k} experts must be in [1, experts={experts}]")
    moefy_(model, experts, clustering, iters=iters, seed=seed)
    for m in ssd_layers(model):
        labels = contiguous_labels(m.d_ff, experts, m.fc.weight.device)
        m.set_sparse(experts, top_k, router_centroids(m, labels, experts), router_grad)
    return model


@torch.no_grad()
def fit_routers(model: Transformer, probe: torch.Tensor, steps: int = 100) -> Transformer:
    """Replace the centroid routers of a model run as an MoE (`run_as_moe`) with linear routers fitted, layer by
    layer, to where the activation mass of the probe tokens [B, T] is (`fit_router`); the probe runs dense."""
    layers = ssd_layers(model)
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach())) for m in layers]
    for m in layers:
        m.sparse = False
    try:
        model(probe)
    finally:
        for h in hooks:
            h.remove()
        for m in layers:
            m.sparse = True
    for m, x in zip(layers, inputs):
        x = x.reshape(-1, x.shape[-1]).float()
        h = activate(F.linear(x, m.fc.weight.float(), None if m.fc.bias is None else m.fc.bias.float()),
                     m.activation)
        labels = contiguous_labels(m.d_ff, m.num_experts, x.device)
        mass = h.new_zeros(h.shape[0], m.num_experts).index_add_(1, labels, h.abs())
        m.centroids = fit_router(x, mass, m.centroids, steps)
    return model


def route_ffns(model: Transformer, routed: bool) -> Transformer:
    """A model run as an MoE (`run_as_moe`): its FFNs routed to their experts, or dense (the neurons stay in their
    expert order: the same function)."""
    for block in model.blocks:
        if isinstance(block.mlp, SSDFFN):
            block.mlp.sparse = routed
    return model


def run_dense(model: Transformer) -> Transformer:
    """Back to the dense FFN."""
    return route_ffns(model, False)


def _model_folder(path: str | Path) -> tuple[Path, Path]:
    """(config.toml, the folder holding model.safetensors) of a run, checkpoint or model folder."""
    cfg_path, weights = find_weights(path)
    return cfg_path, weights.parent


def stored_order(path: str | Path) -> torch.Tensor | None:
    """The neuron order [L, d_ff] stored with a model (the original neuron at each position): a moefied folder's
    `moe.safetensors` or an SSD checkpoint's method state. None: the neurons are in their original order."""
    folder = _model_folder(path)[1]
    for name in ("moe.safetensors", "method.safetensors"):
        if (folder / name).is_file():
            tensors = load_file(str(folder / name))
            if "neuron_order" in tensors:
                return tensors["neuron_order"]
    return None


def prepare_moe(model: Transformer, path: str | Path, top_k: int, experts: int | None = None) -> Transformer:
    """`eval --moe K` / `generate --moe K`: run a loaded model as an MoE. A moefied folder keeps its clustering;
    otherwise the weights are clustered (warm-started from an SSD run's layout) into `experts` experts, by
    default the SSD run's own number, else 16."""
    cfg_path, folder = _model_folder(path)
    if (folder / "moe.json").is_file():
        stored = json.loads((folder / "moe.json").read_text())["experts"]
        if experts in (None, stored):
            d_ff = model.args.d_ff
            layout = [contiguous_labels(d_ff, stored) for _ in model.blocks]
            return run_as_moe(model, top_k, stored, layout)
    if experts is None:
        method = config_mod.load(cfg_path).method
        experts = int(method.get("experts", 16)) if method.get("name") == "ssd" else 16
    return run_as_moe(model, top_k, experts)
