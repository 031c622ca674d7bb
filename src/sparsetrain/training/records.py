"""What a run folder records besides checkpoints: metrics.jsonl (and TensorBoard), summary.json, config.toml and the
history of the configs a run was resumed with (resumes.jsonl). Everything is strict JSON (a non-finite number is
written as null), and a line torn by a kill is dropped on resume, with a warning."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from sparsetrain import config as config_mod
from sparsetrain.config import RunConfig


def strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def warn(message: str) -> None:
    sys.stderr.write(f"sparsetrain: warning: {message}\n")


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard, on the main process only."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(out_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # TensorBoard is optional at run time: metrics.jsonl holds everything
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def keep_metrics_until(out_dir: Path, step: int) -> None:
    """Drop what was logged after `step` (those steps are trained again), and a line a kill left torn."""
    metrics = out_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    kept = []
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            warn(f"{metrics}: line {n} is torn (the run was killed while writing it); dropped")
            continue
        if record["step"] <= step:
            kept.append(line)
    metrics.write_text("".join(line + "\n" for line in kept))


def write_config(out_dir: Path, cfg: RunConfig, resumed_at: int | None) -> None:
    """config.toml holds the config the run trains with now; a resume that changes it appends what changed, and
    from which step, to resumes.jsonl."""
    path = out_dir / "config.toml"
    new = config_mod.to_dict(cfg)
    if resumed_at is not None:
        old = config_mod.to_dict(config_mod.load(path))
        changed = {f"{section}.{key}": [old[section].get(key), value]
                   for section, values in new.items() for key, value in values.items()
                   if old.get(section, {}).get(key) != value}
        changed.update({f"{section}.{key}": [value, None] for section, values in old.items()
                        for key, value in values.items() if key not in new.get(section, {})})
        if not changed:
            return
        with open(out_dir / "resumes.jsonl", "a") as f:
            f.write(dumps({"step": resumed_at, "changed": changed}) + "\n")
    path.write_text(config_mod.dumps(new))


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / "summary.json").write_text(dumps(summary, indent=2))
