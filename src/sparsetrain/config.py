"""Run configuration: dataclasses per section, read from TOML, overridden by `--set section.key=value`.

Every key is checked against its dataclass, so a typo or a wrong type is a one-line error, not a silent default.
The `[method]` section holds `name` plus the method's own keys, which the method validates with its own dataclass.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsetrain.errors import UserError

# The names of nn/model.py's PRESETS, here so that `sparsetrain bench --help` lists them without importing torch
# (tests/test_cli_help.py keeps the two equal).
PRESET_NAMES = ("tiny", "tiny-llama", "gpt2-small", "gpt2-medium", "llama-1b")


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | tiny-llama | gpt2-small | gpt2-medium | llama-1b (see model.PRESETS)
    # Everything below overrides the preset when set (0, "" or None = take it from the preset).
    family: str = ""  # gpt2 | llama
    n_layer: int = 0
    n_head: int = 0
    n_kv_head: int = 0  # grouped-query attention (llama); 0 = n_head
    d_model: int = 0
    d_ff: int = 0
    vocab_size: int = 0  # 0 = the prepared data's vocabulary
    max_seq_len: int = 0
    activation: str = ""  # gelu | relu | relu2 | swiglu
    norm_eps: float = 0.0
    rope_theta: float = 0.0
    tie_embeddings: bool | None = None
    bias: bool | None = None
    # Variants that imported models bring (Llama 3.x, Qwen2, Mistral); the defaults leave all of them off.
    head_dim: int = 0  # width of one head; 0 = d_model / n_head
    qkv_bias: bool | None = None  # biases on q/k/v only (Qwen2); None = the same as `bias`
    rope_scaling: str = ""  # none | linear | llama3: rotary frequencies stretched for a longer context
    rope_factor: float = 0.0  # linear, llama3: the stretch (0 = 1, none)
    rope_low_freq_factor: float = 0.0  # llama3 (0 = 1)
    rope_high_freq_factor: float = 0.0  # llama3 (0 = 4)
    rope_original_max_seq_len: int = 0  # llama3: the context of pre-training (0 = max_seq_len)
    sliding_window: int = 0  # a query sees itself and the sliding_window - 1 keys before it (Mistral); 0 = all


@dataclass
class DataConfig:
    dir: str = "data/stdlib"  # made by `sparsetrain data prepare`


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step, over all GPUs and accumulation steps
    micro_batch_size: int = 0  # sequences per forward pass on one device; 0 = batch_size / world size
    seq_len: int = 256
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up to lr over the first warmup_steps steps
    # The learning rate after warm-up (training/loop.py's lr_at): "cosine" decays from lr to lr * min_lr_ratio over
    # all the remaining steps; "wsd" (warmup-stable-decay) holds lr, then decays linearly over the last
    # decay_fraction of the steps, from step decay_start = steps - max(1, round(decay_fraction * steps)) (Python's
    # round; not before warm-up ends), so that the last step trains at exactly lr * min_lr_ratio. Before decay_start
    # a wsd schedule does not depend on train.steps: a checkpoint at another budget's decay_start, resumed with that
    # train.steps, trains what a run of that budget trains.
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: the fraction of train.steps that decays, in (0, 1]
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 100  # 0 = only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation (the same tokens every time)
    checkpoint_every: int = 100  # 0 = only at the end
    checkpoint_at: list[int] = field(default_factory=list)  # steps that checkpoint as well (a frontier trunk's)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    compile: str = "auto"  # auto (on for GPU) | true | false
    # Replay the compiled forward and backward as CUDA graphs (torch.compile's "reduce-overhead"): the host launches
    # a graph instead of hundreds of kernels, which a sliced method's step needs to keep the GPU busy. auto: on where
    # it applies (compiled, one CUDA process, one micro-batch a step, a method run under them: Method.cuda_graphs);
    # true: also under DDP.
    cuda_graphs: str = "auto"  # auto | true | false
    # The loss: "triton" reads the low-precision logits once forward and once backward (nn/kernels/cross_entropy.py);
    # "torch" is F.cross_entropy on fp32 logits (the reference); auto: Triton on a GPU, torch on the CPU.
    loss_kernel: str = "auto"  # auto | triton | torch
    # Causal attention's SDPA backend, a preference (shapes it cannot serve fall back): "torch" is PyTorch's own
    # order (cuDNN first on Hopper GPUs with cuDNN >= 9.15.1, else FlashAttention-2); "cudnn" asks for cuDNN's
    # kernels (at query lengths that are multiples of 128), "flash" for FlashAttention-2's.
    attention_kernel: str = "torch"  # torch | cudnn | flash
    # The residual stream between blocks: "bf16" casts it once after the embeddings (as torchtitan and Megatron-LM
    # carry it: the norms, residual adds and their gradients move half the bytes; the norms still compute in fp32);
    # "fp32" leaves it in the embeddings' dtype, as autocast does. auto: bf16 under bf16 autocast, else fp32.
    residual_dtype: str = "auto"  # auto | fp32 | bf16
    parallel: str = "ddp"  # ddp | fsdp, when started by torchrun with more than one process
    # FSDP2: consecutive blocks sharded as one unit (one all-gather, one reduce-scatter, one set of hooks for them);
    # 0 = auto: ceil(n_layer / 4) blocks a unit (four units at most). 1 shards block by block (the fewest bytes
    # gathered at once).
    fsdp_blocks_per_unit: int = 0
    # FSDP2: free each unit's gathered weights after its forward and gather them again for its backward (ZeRO-3);
    # false keeps them from forward to backward (no all-gather in the backward, the whole model gathered meanwhile).
    fsdp_reshard_after_forward: bool = True
    progress: bool = True
    init_from: str = ""  # a run, checkpoint or model folder whose weights start this run (fresh optimizer)
    # A non-finite loss or gradient norm: "stop" the run (checked where the loss is read anyway: no extra host sync)
    # or "skip" the step's update (checked every step: one host sync a step), at most max_nonfinite_skips in a row.
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 3


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "dense"})


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, str, bool, X | None, list[X]); ints pass as floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}; write it as [a, b, ...]")
        return [coerce(v, args[0], where) for v in value] if args else value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:
        return value
    raise UserError(f"{where} must be {_type_name(tp)}, got {value!r}; fix the value in the config or --set")


def fill_dataclass(cls, values: dict, section: str):
    """Build dataclass `cls` from `values`, rejecting unknown keys and wrong types with a named error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise UserError(
                f"unknown config key '{section}.{key}'; known keys in [{section}]: {', '.join(sorted(known))}"
            )
    kwargs = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """A `--set` value: TOML syntax when it parses (numbers, true/false, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set expects section.key=value, got '{item}' (for example --set train.steps=500)")
        path, value = item.split("=", 1)
        section, key = path.strip().split(".", 1)
        if section not in SECTIONS and section != "method":
            raise UserError(f"unknown config section '{section}' in --set {item}; sections: model, data, train, method")
        raw.setdefault(section, {})[key.strip()] = parse_value(value.strip())
    return raw


def from_dict(raw: dict) -> RunConfig:
    for section in raw:
        if section not in SECTIONS and section != "method":
            raise UserError(f"unknown config section [{section}]; sections: model, data, train, method")
    parts = {name: fill_dataclass(cls, dict(raw.get(name, {})), name) for name, cls in SECTIONS.items()}
    method = dict(raw.get("method", {}))
    method.setdefault("name", "dense")
    cfg = RunConfig(method=method, **parts)
    validate(cfg)
    return cfg


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found; pass an existing TOML file, e.g. configs/tiny.toml")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None
    return from_dict(apply_overrides(raw, list(overrides)))


def validate(cfg: RunConfig) -> None:
    t = cfg.train
    positive = ["steps", "batch_size", "seq_len", "log_every", "keep_checkpoints", "eval_tokens"]
    for key in positive:
        if getattr(t, key) <= 0:
            raise UserError(f"train.{key} must be positive, got {getattr(t, key)}")
    for key in ["micro_batch_size", "eval_every", "checkpoint_every", "warmup_steps", "grad_clip", "weight_decay"]:
        if getattr(t, key) < 0:
            raise UserError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    for f in dataclasses.fields(t):
        value = getattr(t, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"train.{f.name} must be a finite number, got {value}")
    if any(step <= 0 for step in t.checkpoint_at):
        raise UserError(f"train.checkpoint_at takes positive step numbers, got {t.checkpoint_at}")
    if not t.lr > 0:
        raise UserError(f"train.lr must be positive, got {t.lr}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"train.on_nonfinite must be stop or skip, got '{t.on_nonfinite}'")
    if t.max_nonfinite_skips < 1:
        raise UserError(f"train.max_nonfinite_skips must be at least 1, got {t.max_nonfinite_skips}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"train.device must be auto, cpu or cuda, got '{t.device}'")
    if t.dtype not in ("auto", "bf16", "fp32"):
        raise UserError(f"train.dtype must be auto, bf16 or fp32, got '{t.dtype}'")
    if t.compile not in ("auto", "true", "false"):
        raise UserError(f"train.compile must be auto, true or false, got '{t.compile}'")
    if t.cuda_graphs not in ("auto", "true", "false"):
        raise UserError(f"train.cuda_graphs must be auto, true or false, got '{t.cuda_graphs}'")
    if t.loss_kernel not in ("auto", "triton", "torch"):
        raise UserError(f"train.loss_kernel must be auto, triton or torch, got '{t.loss_kernel}'")
    if t.residual_dtype not in ("auto", "fp32", "bf16"):
        raise UserError(f"train.residual_dtype must be auto, fp32 or bf16, got '{t.residual_dtype}'")
    if t.residual_dtype == "bf16" and t.dtype == "fp32":
        raise UserError("train.residual_dtype = bf16 needs bf16 autocast: set train.dtype = bf16 (or auto on a GPU)")
    if t.attention_kernel not in ("torch", "cudnn", "flash"):
        raise UserError(f"train.attention_kernel must be torch, cudnn or flash, got '{t.attention_kernel}'")
    if t.parallel not in ("ddp", "fsdp"):
        raise UserError(f"train.parallel must be ddp or fsdp, got '{t.parallel}'")
    if t.fsdp_blocks_per_unit < 0:
        raise UserError(f"train.fsdp_blocks_per_unit must be 0 (auto) or a positive number of blocks, "
                        f"got {t.fsdp_blocks_per_unit}")
    if t.schedule not in ("cosine", "wsd"):
        raise UserError(f"train.schedule must be cosine or wsd, got '{t.schedule}'")
    if not 0 < t.decay_fraction <= 1:
        raise UserError(f"train.decay_fraction must be in (0, 1] (the fraction of train.steps that decays), "
                        f"got {t.decay_fraction}")


def to_dict(cfg: RunConfig) -> dict:
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    out["method"] = dict(cfg.method)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps(raw: dict) -> str:
    """TOML for a dict of flat sections (None values are left out: they mean 'default')."""
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
