"""Hugging Face interop: load Llama, Qwen2, Mistral, Mixtral and GPT-2 folders into our `Transformer`, and back
(`hf_config` maps the configs and says what is refused).

Loading reads config.json and the weight files directly (safetensors, or pytorch_model.bin through
`torch.load(weights_only=True)`), so it does not import transformers. Both directions share one name map:
each of our parameters is one Hugging Face tensor, or several concatenated along the output rows
(llama q|k|v into `attn.qkv`, gate|up into `mlp.fc`). GPT-2's Conv1D stores weights [in, out]: transposed.
Our RoPE already uses the half-split (rotate_half) layout of HF Llama, so q/k rows need no permutation. Qwen2 and
Mistral use Llama's tensor names; Qwen2 adds q/k/v biases.

Mixtral is Llama with an MoE in every layer, which is what upcycling a llama-family model with `layers = "all"`
makes. Its router is ours with `softmax_then_topk` and renormalised weights (softmax over all experts, top-k,
divide by their sum); `topk_then_softmax` computes the same weights (softmax over the k largest logits =
renormalised top-k probabilities), so both export. Mixtral is dropless and has no biases, no dense layers and no
expert choice: those refuse to export. Files use the per-expert layout that `save_pretrained` writes and every
transformers version loads (`block_sparse_moe.gate`, `experts.{e}.w1|w3|w2` = gate|up|down, each [out, in]);
our stacked `w_in [E, d, 2f]` is then all experts' w1|w3 rows concatenated and transposed per expert. Import also
takes the fused in-memory layout of transformers 5 (`mlp.gate`, `mlp.experts.gate_up_proj|down_proj`).

The tokenizer travels with the model: import copies the Hugging Face folder's tokenizer files and special-token ids
into the model folder; export copies the model's tokenizer into the Hugging Face folder and fills the ids.
A damaged folder (unreadable config.json, truncated or corrupted weights) is a one-line error naming the file.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparsetrain import config as config_mod
from sparsetrain.data.tokenizer_files import (SPECIAL_IDS_FILE, copy_tokenizer_files, eos_token, load_tokenizer,
                                              special_ids, vocab_entries)
from sparsetrain.errors import UserError
from sparsetrain.nn.model import FFN, ModelArgs, Transformer
from sparsetrain.nn.moe import MoEFFN, moe_for, replace_ffns
from sparsetrain.store.checkpoint import write_model_folder
from sparsetrain.store.hf_config import (gpt2_args, hf_config, llama_args, mixtral_method, mixtral_moe, model_section,
                                         model_type, read_json)

EOS_TOKEN = "<|endoftext|>"
SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

# Buffers that older checkpoints saved next to the weights; they carry no learned state.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

# One entry per parameter of ours: (our name, [(HF name, rows)], transposed). `rows` is the HF tensor's share of
# the concatenated dim 0 (None when a single tensor maps whole). `transposed`: HF holds the last two dims swapped;
# a stacked [E, a, b] parameter is then the HF tensors concatenated into [E * b, a], expert after expert.
NameMap = list[tuple[str, list[tuple[str, int | None]], bool]]


def name_map(args: ModelArgs, gpt2_prefix: str = "transformer.", experts: int = 0,
             d_expert: int | None = None) -> NameMap:
    """Our parameter names -> Hugging Face tensor names, for every parameter (tied lm_head excluded). With
    `experts`, every llama block's MLP is a Mixtral MoE of that many experts of width `d_expert` (default d_ff)."""
    entries: NameMap = []
    if args.family == "gpt2":
        p = gpt2_prefix
        entries += [("wte.weight", [(f"{p}wte.weight", None)], False),
                    ("wpe.weight", [(f"{p}wpe.weight", None)], False)]
        for i in range(args.n_layer):
            h = f"{p}h.{i}."
            for ours, theirs, is_linear in [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                            ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
                                            ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]:
                entries.append((f"blocks.{i}.{ours}.weight", [(f"{h}{theirs}.weight", None)], is_linear))
                entries.append((f"blocks.{i}.{ours}.bias", [(f"{h}{theirs}.bias", None)], False))
        entries += [("norm.weight", [(f"{p}ln_f.weight", None)], False),
                    ("norm.bias", [(f"{p}ln_f.bias", None)], False)]
    else:
        q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
        entries.append(("wte.weight", [("model.embed_tokens.weight", None)], False))
        for i in range(args.n_layer):
            h = f"model.layers.{i}."
            linears = [
                ("attn.qkv", [(f"{h}self_attn.q_proj", q), (f"{h}self_attn.k_proj", kv), (f"{h}self_attn.v_proj", kv)]),
                ("attn.proj", [(f"{h}self_attn.o_proj", None)]),
            ]
            if experts:
                f, m = d_expert or args.d_ff, f"{h}block_sparse_moe."
                entries += [
                    (f"blocks.{i}.mlp.router.weight", [(f"{m}gate.weight", None)], False),
                    (f"blocks.{i}.mlp.w_in",
                     [(f"{m}experts.{e}.{w}.weight", f) for e in range(experts) for w in ("w1", "w3")], True),
                    (f"blocks.{i}.mlp.w_out", [(f"{m}experts.{e}.w2.weight", args.d_model) for e in range(experts)],
                     True),
                ]
            else:
                linears += [("mlp.fc", [(f"{h}mlp.gate_proj", args.d_ff), (f"{h}mlp.up_proj", args.d_ff)]),
                            ("mlp.proj", [(f"{h}mlp.down_proj", None)])]
            for ours, parts in linears:
                entries.append((f"blocks.{i}.{ours}.weight", [(f"{n}.weight", r) for n, r in parts], False))
                # q/k/v biases with `qkv_bias` (Qwen2), and with `bias` too: Llama's attention_bias covers q/k/v/o
                if args.bias or (ours == "attn.qkv" and args.qkv_bias):
                    entries.append((f"blocks.{i}.{ours}.bias", [(f"{n}.bias", r) for n, r in parts], False))
            entries.append((f"blocks.{i}.norm1.weight", [(f"{h}input_layernorm.weight", None)], False))
            entries.append((f"blocks.{i}.norm2.weight", [(f"{h}post_attention_layernorm.weight", None)], False))
        entries.append(("norm.weight", [("model.norm.weight", None)], False))
    if not args.tie_embeddings:
        entries.append(("lm_head.weight", [("lm_head.weight", None)], False))
    return entries


# ---------------------------------------------------------------------------------------------------- import


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, by name, from whichever of the four standard layouts the folder holds."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            files = [folder / name]
            break
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no weight_map; re-download or re-save the model")
            files = [folder / f for f in sorted(set(weight_map.values()))]
            break
    else:
        raise UserError(f"{folder} has no weights (model.safetensors, sharded model-*.safetensors with "
                        "model.safetensors.index.json, or pytorch_model.bin); point at a saved Hugging Face model")
    tensors = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"weight shard {f} is listed in the index but missing; re-download the model")
        tensors.update(_read_weights(f))
    return tensors


def _read_weights(f: Path) -> dict[str, torch.Tensor]:
    try:
        if f.suffix == ".safetensors":
            return load_file(f)
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and torch raise many types for a damaged file
        detail = " ".join(str(e).split())[:120]  # one line, whatever the library said
        raise UserError(f"{f} cannot be read ({type(e).__name__}: {detail}); the file is damaged or incomplete: "
                        "re-download or re-save the model") from None


def _per_expert_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral weights in the fused layout of transformers 5 (`save_original_format=False`) renamed and split into
    the per-expert layout of the name map; other tensors pass through."""
    out = {}
    for name, t in tensors.items():
        prefix, _, leaf = name.partition(".mlp.")
        m = f"{prefix}.block_sparse_moe."
        if leaf == "gate.weight":
            out[f"{m}gate.weight"] = t
        elif leaf == "experts.gate_up_proj":  # [E, 2f, d]: rows [gate | up] per expert
            for e, (w1, w3) in enumerate(x.chunk(2) for x in t):
                out[f"{m}experts.{e}.w1.weight"], out[f"{m}experts.{e}.w3.weight"] = w1, w3
        elif leaf == "experts.down_proj":  # [E, d, f]
            for e, w2 in enumerate(t):
                out[f"{m}experts.{e}.w2.weight"] = w2
        else:
            out[name] = t
    return out


def import_hf_full(folder: str | Path) -> tuple[dict, dict, Transformer]:
    """Load a local Hugging Face llama, qwen2, mistral, mixtral or gpt2 causal LM; return its `[model]` and
    `[method]` sections (`{"name": "dense"}`, or upcycling's options that rebuild Mixtral's MoE layers) and our
    model (fp32)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; point at a folder saved by save_pretrained or export_hf")
    config = read_json(folder / "config.json")
    family = model_type(config, folder)
    try:
        args = gpt2_args(config, folder) if family == "gpt2" else llama_args(config, family, folder)
        method = mixtral_method(config) if family == "mixtral" else {"name": "dense"}
    except KeyError as e:
        raise UserError(f"{folder}/config.json lacks {e}, which a {family} config needs; fix or re-save it") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{folder}/config.json has a value of the wrong type ({e}); fix or re-save it") from None

    tensors = _load_tensors(folder)
    # saved from GPT2Model (the original hub `gpt2` files): no "transformer." prefix
    prefix = "" if "transformer.wte.weight" not in tensors and "wte.weight" in tensors else "transformer."
    model = Transformer(args)
    experts = 0
    if family == "mixtral":
        # the structure a run folder rebuilds from the [method] section (upcycling's, every layer)
        replace_ffns(model, list(range(args.n_layer)), lambda: moe_for(
            args, experts=method["experts"], top_k=method["top_k"], router=method["router"],
            renormalize=method["renormalize"], capacity_factor=method["capacity_factor"],
            aux_loss_coef=method["aux_loss_coef"], z_loss_coef=method["z_loss_coef"]))
        tensors, experts = _per_expert_layout(tensors), method["experts"]
    params = dict(model.named_parameters())
    entries = name_map(args, prefix, experts)
    assert {e[0] for e in entries} == set(params), "name_map out of sync with model.Transformer"

    with torch.no_grad():
        for ours, parts, transposed in entries:
            missing = [n for n, _ in parts if n not in tensors]
            if missing:
                raise UserError(f"{folder}: missing weight {missing[0]} (needed for {ours}); the checkpoint is "
                                f"incomplete or does not match its config.json")
            value = torch.cat([tensors.pop(n) for n, _ in parts])
            shape = params[ours].shape
            hf_shape = (*shape[:-2], shape[-1], shape[-2]) if transposed else shape
            flat = (math.prod(hf_shape[:-1]), hf_shape[-1]) if len(hf_shape) > 1 else hf_shape
            if value.shape != flat:
                raise UserError(f"{folder}: weight for {ours} has shape {tuple(value.shape)}, config.json implies "
                                f"{flat}; the checkpoint does not match its config")
            value = value.view(hf_shape)
            params[ours].copy_(value.transpose(-1, -2) if transposed else value)
    if args.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some files store the tied head too; HF ignores it as well
    unexpected = [n for n in tensors if not n.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise UserError(f"{folder}: weights with no place in a {family} model: {', '.join(unexpected[:3])}"
                        f"{' ...' if len(unexpected) > 3 else ''}; the architecture has parts sparsetrain lacks")
    return model_section(args), method, model


def import_hf(folder: str | Path) -> tuple[dict, Transformer]:
    """Load a local Hugging Face dense causal LM; return its `[model]` section and our model (fp32)."""
    model_section_, method, model = import_hf_full(folder)
    if method["name"] != "dense":
        raise UserError(f"{folder} holds a Mixture-of-Experts model, which a [model] section alone cannot rebuild; "
                        "import it with import_hf_full, which also returns its [method] section")
    return model_section_, model


# ---------------------------------------------------------------------------------------------------- export


def hf_state_dict(model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names (Mixtral's for a model with MoE layers), as separate contiguous CPU
    tensors of `dtype`."""
    for i, block in enumerate(model.blocks):
        if type(block.mlp) not in (FFN, MoEFFN):
            raise UserError(f"block {i} has a {type(block.mlp).__name__} MLP, which Hugging Face llama/gpt2/mixtral "
                            "cannot hold; convert the model back to dense FFNs before exporting")
    moe = mixtral_moe(model)
    args = model.args
    params = dict(model.named_parameters())
    out = {}
    experts, d_expert = (moe.num_experts, moe.d_expert) if moe is not None else (0, None)
    for ours, parts, transposed in name_map(args, experts=experts, d_expert=d_expert):
        if ours in params:
            value = params[ours].detach()
        else:  # a bias HF has and we lack (GPT-2's; Llama's q/k/v with attention_bias): zeros, the same function
            weight = params[ours.removesuffix(".bias") + ".weight"]
            value = torch.zeros(weight.shape[0], dtype=weight.dtype)  # Linear [out, in] or LayerNorm [d]
        if transposed:  # [E, a, b] -> [E * b, a]: experts' HF tensors one after another
            value = value.transpose(-1, -2)
            value = value.reshape(-1, value.shape[-1])
        rows = [r for _, r in parts]
        pieces = value.split(rows) if len(parts) > 1 else [value]
        for (name, _), piece in zip(parts, pieces):
            # a copy per tensor: safetensors refuses views that share storage
            out[name] = piece.to(device="cpu", dtype=dtype, copy=True).contiguous()
    return out


def export_hf(model: Transformer, folder: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors) that transformers loads as is."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{folder} already exists and is not empty; export into a new folder or remove it first")
    dtype = dtype or next(model.parameters()).dtype
    config = hf_config(model.args, dtype, mixtral_moe(model))
    tensors = hf_state_dict(model, dtype)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        os.replace(tmp, folder)  # atomic; replaces an empty folder, fails on a folder filled meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer(src_dir: str | Path, dst_folder: str | Path) -> None:
    """Copy a tokenizer (tokenizer.json and the settings beside it; a minimal tokenizer_config.json when it has
    none) into an exported folder, and fill config.json's unset special-token ids: the model's own
    (special_tokens.json, from its Hugging Face import), else `<|endoftext|>` as eos and bos (the end of every
    training document), else the eos token of its settings, so that generation stops where documents ended."""
    src, dst = Path(src_dir), Path(dst_folder)
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{src} has no tokenizer.json; point at the prepared data folder or a tokenizer folder")
    if not dst.is_dir():
        raise UserError(f"{dst} is not a folder; export the model first, then copy its tokenizer")
    tok = load_tokenizer(src)
    copy_tokenizer_files(src, dst)
    ids = {k: v for k, v in special_ids(src).items() if k in SPECIAL_KEYS}
    eot = tok.token_to_id(EOS_TOKEN)
    if not ids and eot is not None:
        ids = {"bos_token_id": eot, "eos_token_id": eot}
    elif not ids and eos_token(src, tok) is not None:
        ids = {"eos_token_id": tok.token_to_id(eos_token(src, tok))}
    if not (src / "tokenizer_config.json").is_file():
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if eot is not None:
            tok_config |= {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN}
        (dst / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")

    config_path = dst / "config.json"
    if ids and config_path.is_file():
        config = read_json(config_path)
        config |= {k: v for k, v in ids.items() if v is not None and config.get(k) is None}
        config_path.write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- folders


def hf_special_ids(folder: Path) -> dict:
    """bos/eos/pad ids of a Hugging Face folder: config.json's, overridden by generation_config.json's (what
    `generate` stops on: often a list of eos ids)."""
    ids = {}
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            values = read_json(folder / name)
            ids |= {k: values[k] for k in SPECIAL_KEYS if values.get(k) is not None}
    return ids


def import_to_folder(source: str | Path, out: str | Path) -> list[str]:
    """`convert hf-import`: a model folder with config.toml, model.safetensors, the Hugging Face folder's tokenizer
    files and its special-token ids; written whole or not at all. Returns the tokenizer files copied."""
    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; pass a new --out folder or delete it")
    model_section_, method, model = import_hf_full(source)
    if (source / "tokenizer.json").is_file():
        tok = load_tokenizer(source)  # a damaged tokenizer is refused here, not at the first eval
        if vocab_entries(tok) > model.args.vocab_size:
            raise UserError(f"{source}/tokenizer.json has {vocab_entries(tok):,} ids, the model "
                            f"{model.args.vocab_size:,} embeddings; the folder mixes two models")
    seq_len = min(config_mod.TrainConfig.seq_len, model.args.max_seq_len)
    # no data folder yet: a relative default (data/stdlib) would point at whatever the user's current folder holds
    raw = config_mod.to_dict(config_mod.from_dict({"model": model_section_, "method": method, "data": {"dir": ""},
                                                   "train": {"seq_len": seq_len}}))
    stage = out.parent / f".{out.name}.import"
    if stage.exists():
        shutil.rmtree(stage)
    try:
        write_model_folder(stage, config_mod.dumps(raw), model.state_dict())
        copied = copy_tokenizer_files(source, stage)
        ids = hf_special_ids(source)
        if ids:
            (stage / SPECIAL_IDS_FILE).write_text(json.dumps(ids, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return copied


def tokenizer_note(copied: list[str]) -> str:
    """What `convert hf-import` says about the tokenizer it copied (or could not)."""
    if "tokenizer.json" in copied:
        return f"with its tokenizer ({', '.join(copied)})"
    missing = "no tokenizer.json" + (f" (only {', '.join(copied)})" if copied else "")
    return (f"without a usable tokenizer: the folder has {missing}; save one there with transformers' "
            "tokenizer.save_pretrained and import again, or pass --tokenizer to eval, generate and data prepare")
