"""`sparsetrain analyze RUN_DIR`: the activation study of the SSD paper, on any run's saved checkpoints.

For every checkpoint, on one fixed probe batch (the first `probe_tokens` tokens of the run's validation data), per
layer: the activation sparsity, the adjusted Rand index between this checkpoint's neuron clustering and the previous
checkpoint's, and the share of activation mass held by the top-k experts (best k per token, and the centroid
router's k). The numbers are the SSD monitor's (`methods.ssd.Monitor`), so the analysis of a run and its training-time
monitor agree. Neurons are followed through SSD's permutations by the order stored in each checkpoint.

Writes into OUT (default RUN_DIR/analysis): `analysis.json` (everything), `analysis.md` (tables), `sparsity.png` and
`stability.png` (per layer, against the training step). The trainer keeps `train.keep_checkpoints` checkpoints
(2 by default): raise it for a run meant to be studied.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparsetrain import config as config_mod
from sparsetrain.data.batches import TrainingData
from sparsetrain.errors import UserError
from sparsetrain.methods.ssd.moefy import stored_order
from sparsetrain.methods.ssd.monitor import Check, Monitor
from sparsetrain.store.checkpoint import list_checkpoints
from sparsetrain.training.build import load_model


def probe_batch(cfg, probe_tokens: int) -> torch.Tensor:
    """Validation windows of the run's data spread over its split, probe_tokens tokens at most: [B, seq_len]."""
    return torch.cat([x for x, _ in TrainingData(cfg.data.dir, cfg.train).eval_batches(64, probe_tokens)])


def analyze_run(run_dir: str | Path, out_dir: str | Path | None = None, probe_tokens: int = 4096,
                experts: int = 16, top_k: int = 4, *, activation_threshold: float = 0.01, cluster: str = "weights",
                cluster_iters: int = 10, seed: int = 0, device: str = "auto", plots: bool = True) -> dict[str, Any]:
    """Measure every saved checkpoint of `run_dir`; write analysis.json, analysis.md and the plots; return the
    results (what analysis.json holds)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.toml); pass the --out folder of a training run")
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise UserError(f"{run_dir} has no complete checkpoint; train it (train.checkpoint_every) first")
    if probe_tokens < 1 or experts < 2 or not 1 <= top_k <= experts:
        raise UserError(f"need probe_tokens >= 1, experts >= 2 and 1 <= top_k <= experts; got {probe_tokens}, "
                        f"{experts}, {top_k}")
    if cluster not in ("weights", "coactivation"):
        raise UserError(f"unknown cluster '{cluster}'; choose weights or coactivation")
    cfg = config_mod.load(run_dir / "config.toml")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    probe = probe_batch(cfg, probe_tokens).to(dev)
    monitor = Monitor(experts, top_k, threshold=activation_threshold, cluster=cluster, iters=cluster_iters, seed=seed)

    steps, checks = [], []
    for ckpt in ckpts:
        model, _, _ = load_model(ckpt, dev)
        if model.args.d_ff % experts:
            raise UserError(f"experts={experts} does not divide the model's d_ff={model.args.d_ff}; choose a divisor")
        order = stored_order(ckpt)
        checks.append(monitor.check(model, probe, None if order is None else order.to(dev)))
        steps.append(int(ckpt.name.split("_")[-1]))
        activation, layers = model.args.activation, model.args.n_layer

    result = {
        "run": str(run_dir), "experts": experts, "top_k": top_k, "probe_tokens": probe.numel(),
        "activation": activation, "activation_threshold": activation_threshold, "cluster": cluster,
        "layers": layers, "steps": steps,
        **{key: [getattr(c, key) for c in checks] for key in Check.KEYS},  # [checkpoint][layer]
        **{f"mean_{key}": [c.mean(key) for c in checks] for key in Check.KEYS},
    }
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "analysis.md").write_text(markdown(result))
    if plots:
        plot(result, out)
    return result


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def headers(top_k: int) -> dict[str, str]:
    """The words for each measure, the same in the tables' heads and the plots' titles."""
    return {"sparsity": "activation sparsity", "ari": "ARI of consecutive clusterings",
            "mass": f"top-{top_k} mass (best experts)", "router_mass": f"top-{top_k} mass (router)"}


# The plots' y axes: what each measure is a share or an index of.
Y_LABELS = {"sparsity": "share of inactive neurons", "ari": "adjusted Rand index",
            "mass": "share of |activation|", "router_mass": "share of |activation|"}


def table(r: dict[str, Any]) -> list[str]:
    """The means over layers at each checkpoint, as markdown table lines."""
    heads = headers(r["top_k"])
    lines = ["| step | " + " | ".join(heads[k] for k in Check.KEYS) + " |", "| ---: | ---: | ---: | ---: | ---: |"]
    for i, step in enumerate(r["steps"]):
        lines.append(f"| {step} | " + " | ".join(_fmt(r[f"mean_{k}"][i]) for k in Check.KEYS) + " |")
    return lines


def markdown(r: dict[str, Any]) -> str:
    sparsity_rule = "a == 0" if r["activation"] in ("relu", "relu2") else f"|a| <= {r['activation_threshold']}"
    lines = [
        f"# Activation analysis of {r['run']}",
        "",
        f"{r['layers']} layers, {r['activation']} (inactive: {sparsity_rule}), probe of {r['probe_tokens']} "
        f"validation tokens, {r['experts']} experts by {r['cluster']} clustering, top-{r['top_k']}.",
        "ARI: adjusted Rand index between the clusterings of consecutive checkpoints. Mass: share of |activation| "
        "held by each token's best top-k experts; router mass: by the centroid router's top-k.",
        "",
        *table(r),
    ]
    lines += ["", f"Per layer at step {r['steps'][-1]}:", "",
              "| layer | " + " | ".join(headers(r["top_k"])[k] for k in Check.KEYS) + " |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for layer in range(r["layers"]):
        lines.append(f"| {layer} | " + " | ".join(_fmt(r[k][-1][layer]) for k in Check.KEYS) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], out: Path) -> None:
    """sparsity.png: sparsity per layer; stability.png: ARI and top-k mass per layer; against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, L = r["steps"], r["layers"]
    colors = plt.cm.viridis([i / max(1, L - 1) for i in range(L)])

    heads = headers(r["top_k"])

    def lines(ax, key):
        for layer in range(L):
            pts = [(s, v[layer]) for s, v in zip(steps, r[key]) if v[layer] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[layer], label=f"layer {layer}")
        ax.set(title=heads[key], xlabel="step", ylabel=Y_LABELS[key])
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines(ax, "sparsity")
    ax.legend(fontsize="small", ncol=max(1, L // 12))
    fig.tight_layout()
    fig.savefig(out / "sparsity.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key in zip(axes, ["ari", "mass", "router_mass"]):
        lines(ax, key)
    axes[0].legend(fontsize="small", ncol=max(1, L // 12))
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=120)
    plt.close(fig)
