"""Building what a run trains: the model with its method's structure, the optimizer, and a trained model loaded back
from a run, checkpoint or model folder."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsetrain import config as config_mod
from sparsetrain.config import RunConfig
from sparsetrain.errors import UserError
from sparsetrain.methods import Method, build_method
from sparsetrain.nn.model import ModelArgs, Transformer, resolve
from sparsetrain.store.checkpoint import find_weights, load_weights


def make_optimizer(model: torch.nn.Module, tcfg, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                             fused=device.type == "cuda")


def build_model(cfg: RunConfig, vocab_size: int | None) -> tuple[Transformer, Method, ModelArgs]:
    """The model with the method's structure applied (weights random)."""
    args = resolve(cfg.model, vocab_size)
    if cfg.train.seq_len > args.max_seq_len:
        raise UserError(f"train.seq_len={cfg.train.seq_len} exceeds the model's max_seq_len={args.max_seq_len}; "
                        "lower train.seq_len or raise model.max_seq_len")
    method = build_method(cfg.method, args, cfg.train.seq_len)
    model = Transformer(args)
    model.loss_kernel = cfg.train.loss_kernel
    model.attention_kernel = cfg.train.attention_kernel
    model.low_precision_residual = cfg.train.residual_dtype != "fp32"  # applies under autocast only
    method.setup(model)
    return model, method, args


def load_model(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] = ()
               ) -> tuple[Transformer, Method, RunConfig]:
    """A trained model from a run folder (latest checkpoint), checkpoint folder or model folder."""
    cfg_path, weights = find_weights(path)
    cfg = config_mod.load(cfg_path, overrides)
    model, method, _ = build_model(cfg, None)
    load_weights(model, load_file(str(weights)), str(weights.parent))
    return model.to(device), method, cfg
