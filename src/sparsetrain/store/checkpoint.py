"""Checkpoints and model folders, in safetensors, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/step_0000100/` holding
    model.safetensors       the weights (full, unsharded)
    optimizer.safetensors   optimizer moments, keyed by parameter name
    method.safetensors      the method's tensors (may be empty)
    state.json              step, data loader position, RNG states, optimizer hyper-parameters, method values
    manifest.json           every other file's size and checksum (blake2b), written last
It is written into a `.tmp` sibling and renamed into place, so a run killed mid-write leaves the previous
checkpoint as the latest complete one; the manifest catches what the rename cannot (bytes changed or lost on disk
afterwards). A *model folder* (what `convert` writes) is `config.toml` + `model.safetensors` (+ its manifest).
Folders written before manifests existed load unchecked; a file that cannot be read is still a one-line error.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sparsetrain.errors import UserError

STEP_PREFIX = "step_"
MANIFEST = "manifest.json"
DAMAGED_PREFIX = ".damaged-"  # a damaged checkpoint set aside by a resume (hidden from list_checkpoints)


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)  # fast and in the standard library
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Size and checksum of every file of `folder`; written last, so a folder that matches it is whole."""
    files = {f.name: {"bytes": f.stat().st_size, "blake2b": _digest(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def damage(folder: Path, names: Iterable[str] | None = None) -> str | None:
    """What is wrong with a checkpoint or model folder by its manifest, or None (intact, or written before
    manifests existed). `names`: check only these files."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {name: (int(v["bytes"]), v["blake2b"]) for name, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, (size, digest) in expected.items():
        if names is not None and name not in names:
            continue
        f = Path(folder) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size:,} bytes, its manifest says {size:,}"
        if _digest(f) != digest:
            return f"{name} does not match its checksum"
    return None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a one-line error naming it when it cannot be read (truncated, bad header)."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types, OSError and others for damaged files
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]}); the file is damaged or "
                        "incomplete: use another checkpoint or write it again") from None


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_model_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    # Tied weights appear under two names; safetensors refuses shared storage, so store each name's own copy.
    out, seen = {}, {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if ptr in seen else v.contiguous()
        seen[ptr] = k
    save_file(out, str(path))


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Separate a nested state into flat tensors (for safetensors) and JSON-able values."""
    tensors, values = {}, {}
    for k, v in state.items():
        key = f"{prefix}{k}"  # "/" separates levels: parameter names hold dots
        if isinstance(v, torch.Tensor):
            tensors[key] = v
        elif isinstance(v, dict):
            t, j = split_state(v, key + "/")
            tensors.update(t)
            values.update(j)
        else:
            values[key] = v
    return tensors, values


def join_state(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flat, v in list(tensors.items()) + list(values.items()):
        parts = flat.split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def save_checkpoint(run_dir: Path, step: int, *, model_state: dict, optim_state: dict, method_state: dict,
                    extra: dict[str, Any], keep: int) -> Path:
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{STEP_PREFIX}{step:07d}"
    tmp = ckpt_root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_weights(model_state, tmp / "model.safetensors")
    opt_tensors, opt_values = split_state(optim_state)
    save_file(_contiguous_cpu(opt_tensors), str(tmp / "optimizer.safetensors"))
    m_tensors, m_values = split_state(method_state)
    save_file(_contiguous_cpu(m_tensors), str(tmp / "method.safetensors"))
    rng = rng_state()
    rng_tensors = {"torch": rng["torch"]}
    if "cuda" in rng:
        rng_tensors.update({f"cuda{i}": s for i, s in enumerate(rng["cuda"])})
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    py_state = rng["python"]
    np_state = rng["numpy"]
    state = {
        "step": step,
        "optimizer": opt_values,
        "method": m_values,
        "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
        **extra,
    }
    (tmp / "state.json").write_text(json.dumps(state))
    write_manifest(tmp)
    for f in tmp.iterdir():  # flush before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Everything a checkpoint holds; a one-line error when it is damaged (by its manifest or unreadable)."""
    reason = damage(ckpt)
    if reason is not None:
        raise UserError(f"checkpoint {ckpt} is damaged: {reason}")
    try:
        state = json.loads((ckpt / "state.json").read_text())
        py, npy = state["rng"]["python"], state["rng"]["numpy"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {ckpt} is damaged: state.json cannot be read ({e!r})") from None
    rng_t = read_tensors(ckpt / "rng.safetensors")
    rng = {
        "python": (py[0], tuple(py[1]), py[2]),
        "numpy": (npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]),
        "torch": rng_t["torch"],
    }
    cuda = [rng_t[k] for k in sorted((k for k in rng_t if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda:
        rng["cuda"] = cuda
    state["rng"] = rng
    state["model"] = read_tensors(ckpt / "model.safetensors")
    state["optimizer"] = join_state(read_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    state["method"] = join_state(read_tensors(ckpt / "method.safetensors"), state["method"])
    return state


def load_latest_intact(run_dir: Path) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """The newest checkpoint of a run that loads and matches its manifest, and the newer ones that do not, with
    what is wrong with each; a one-line error when none is intact."""
    damaged = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(ckpt), damaged
        except UserError as e:
            damaged.append((ckpt, str(e).removeprefix(f"checkpoint {ckpt} is damaged: ")))
    detail = "; ".join(f"{c.name}: {why}" for c, why in damaged)
    raise UserError(f"--resume: no intact checkpoint in {run_dir} ({detail}); start the run again into a new --out")


def set_aside(ckpt: Path) -> Path:
    """Move a damaged checkpoint out of the run's list (kept, not deleted: the bytes may still matter to someone)."""
    aside = ckpt.parent / f"{DAMAGED_PREFIX}{ckpt.name}"
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(ckpt, aside)
    return aside


def find_weights(path: str | Path) -> tuple[Path, Path]:
    """(config.toml, model.safetensors) for a run folder (latest checkpoint), a checkpoint or a model folder; a
    one-line error when the weights do not match the folder's manifest."""
    cfg_path, weights = _find_weights(Path(path))
    reason = damage(weights.parent, [weights.name])
    if reason is not None:
        raise UserError(f"{weights.parent} is damaged: {reason}; use an earlier checkpoint of the run or write the "
                        "folder again")
    return cfg_path, weights


def _find_weights(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run folder, a checkpoint folder or a converted model folder")
    if (path / "model.safetensors").is_file() and (path / "config.toml").is_file():
        return path / "config.toml", path / "model.safetensors"
    if (path / "model.safetensors").is_file() and (path.parent.parent / "config.toml").is_file():
        return path.parent.parent / "config.toml", path / "model.safetensors"
    ckpts = list_checkpoints(path)
    if ckpts and (path / "config.toml").is_file():
        return path / "config.toml", ckpts[-1] / "model.safetensors"
    raise UserError(f"{path} holds no model: expected a run folder with checkpoints, a checkpoint folder or a "
                    "folder with config.toml and model.safetensors")


def write_model_folder(out: Path, config_toml: str, model_state: dict[str, torch.Tensor]) -> None:
    """Write config.toml + model.safetensors atomically; refuses a non-empty `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; pass a new --out folder or delete it")
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "config.toml").write_text(config_toml)
    save_model_weights(model_state, tmp / "model.safetensors")
    write_manifest(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, model has {tuple(own[wrong[0]].shape)}")
        raise UserError(f"checkpoint {source} is from another model shape ({detail}); "
                        "use the config it was trained with (model.preset and overrides, method)")
    model.load_state_dict(state)
