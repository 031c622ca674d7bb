"""Hugging Face interop: load `LlamaForCausalLM` / `GPT2LMHeadModel` / `MixtralForCausalLM` folders into our
`Transformer`, and back.

Loading reads config.json and the weight files directly (safetensors, or pytorch_model.bin through
`torch.load(weights_only=True)`), so it does not import transformers. Both directions share one name map:
each of our parameters is one Hugging Face tensor, or several concatenated along the output rows
(llama q|k|v into `attn.qkv`, gate|up into `mlp.fc`). GPT-2's Conv1D stores weights [in, out]: transposed.
Our RoPE already uses the half-split (rotate_half) layout of HF Llama, so q/k rows need no permutation.

Mixtral is Llama with an MoE in every layer, which is what upcycling a llama-family model with `layers = "all"`
makes. Its router is ours with `softmax_then_topk` and renormalised weights (softmax over all experts, top-k,
divide by their sum); `topk_then_softmax` computes the same weights (softmax over the k largest logits =
renormalised top-k probabilities), so both export. Mixtral is dropless and has no biases, no dense layers and no
expert choice: those refuse to export. Files use the per-expert layout that `save_pretrained` writes and every
transformers version loads (`block_sparse_moe.gate`, `experts.{e}.w1|w3|w2` = gate|up|down, each [out, in]);
our stacked `w_in [E, d, 2f]` is then all experts' w1|w3 rows concatenated and transposed per expert. Import also
takes the fused in-memory layout of transformers 5 (`mlp.gate`, `mlp.experts.gate_up_proj|down_proj`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from sparsetrain.errors import UserError
from sparsetrain.nn.model import FFN, ModelArgs, Transformer
from sparsetrain.nn.moe import MoEFFN, moe_for, replace_ffns

EOS_TOKEN = "<|endoftext|>"

# Hugging Face activation names that compute exactly one of ours (GPT-2 family).
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
OUR_TO_GPT2_ACTIVATION = {"gelu": "gelu_new", "relu": "relu"}

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
                if args.bias:
                    entries.append((f"blocks.{i}.{ours}.bias", [(f"{n}.bias", r) for n, r in parts], False))
            entries.append((f"blocks.{i}.norm1.weight", [(f"{h}input_layernorm.weight", None)], False))
            entries.append((f"blocks.{i}.norm2.weight", [(f"{h}post_attention_layernorm.weight", None)], False))
        entries.append(("norm.weight", [("model.norm.weight", None)], False))
    if not args.tie_embeddings:
        entries.append(("lm_head.weight", [("lm_head.weight", None)], False))
    return entries


# ---------------------------------------------------------------------------------------------------- import


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-download or re-export the model") from None


def _family(config: dict, folder: Path) -> str:
    model_type = config.get("model_type")
    if model_type is None:
        archs = config.get("architectures") or []
        model_type = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2",
                      "MixtralForCausalLM": "mixtral"}.get(archs[0] if archs else "")
    if model_type not in ("llama", "gpt2", "mixtral"):
        raise UserError(f"{folder}/config.json has model_type '{model_type}', which is not supported; sparsetrain "
                        "imports llama (LlamaForCausalLM), gpt2 (GPT2LMHeadModel) and mixtral (MixtralForCausalLM)")
    return model_type


def _unsupported(folder: Path, what: str) -> UserError:
    return UserError(f"{folder}: {what} is not supported by sparsetrain's model; pick a model without it")


def _llama_args(c: dict, folder: Path) -> ModelArgs:
    if c.get("hidden_act", "silu") != "silu":
        raise _unsupported(folder, f"llama hidden_act '{c['hidden_act']}' (only silu)")
    # transformers >= 5 nests theta and type in rope_parameters; older versions use rope_theta / rope_scaling.
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _unsupported(folder, f"rope scaling '{rope_type}'")
    attention_bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise _unsupported(folder, f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (one bias flag for both)")
    d, n_head = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, d // n_head) or d % n_head:
        raise _unsupported(folder, f"head_dim={c.get('head_dim')} with hidden_size={d}, heads={n_head}")
    return ModelArgs(
        family="llama", n_layer=c["num_hidden_layers"], n_head=n_head,
        n_kv_head=c.get("num_key_value_heads") or n_head, d_model=d, d_ff=c["intermediate_size"],
        vocab_size=c["vocab_size"], max_seq_len=c.get("max_position_embeddings", 2048), activation="swiglu",
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), bias=bool(attention_bias),
    )


def _mixtral_method(c: dict, args: ModelArgs, folder: Path) -> dict:
    """The `[method]` section that rebuilds a Mixtral's MoE layers: upcycling's structure with Mixtral's router."""
    window = c.get("sliding_window")
    if window is not None and window < args.max_seq_len:
        raise _unsupported(folder, f"sliding-window attention (sliding_window={window})")
    return {
        "name": "upcycle", "experts": c["num_local_experts"], "top_k": c["num_experts_per_tok"], "layers": "all",
        "granularity": 1, "router": "softmax_then_topk", "renormalize": True, "capacity_factor": 0.0,
        # the same knob, not the same loss: HF pools the load-balancing statistics over all layers
        "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.001)),
        "z_loss_coef": 0.0,  # Mixtral trains without a router z-loss
    }


def _gpt2_args(c: dict, folder: Path) -> ModelArgs:
    act = c.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise _unsupported(folder, f"gpt2 activation_function '{act}' (supported: {', '.join(GPT2_ACTIVATIONS)})")
    if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
        raise _unsupported(folder, "gpt2 attention scaling other than 1/sqrt(head_dim)")
    if c.get("add_cross_attention"):
        raise _unsupported(folder, "gpt2 cross-attention")
    d = c["n_embd"]
    return ModelArgs(
        family="gpt2", n_layer=c["n_layer"], n_head=c["n_head"], n_kv_head=c["n_head"], d_model=d,
        d_ff=c.get("n_inner") or 4 * d, vocab_size=c["vocab_size"], max_seq_len=c.get("n_positions", 1024),
        activation=GPT2_ACTIVATIONS[act], norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), rope_theta=10000.0,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)), bias=True,
    )


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, by name, from whichever of the four standard layouts the folder holds."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            files = [folder / name]
            break
        index = folder / f"{name}.index.json"
        if index.is_file():
            files = [folder / f for f in sorted(set(_read_json(index)["weight_map"].values()))]
            break
    else:
        raise UserError(f"{folder} has no weights (model.safetensors, sharded model-*.safetensors with "
                        "model.safetensors.index.json, or pytorch_model.bin); point at a saved Hugging Face model")
    tensors = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"weight shard {f} is listed in the index but missing; re-download the model")
        if f.suffix == ".safetensors":
            tensors.update(load_file(f))
        else:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    return tensors


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


def model_section(args: ModelArgs) -> dict:
    """`[model]` config keys that `resolve` turns back into exactly `args`."""
    return {"preset": "tiny" if args.family == "gpt2" else "tiny-llama", **asdict(args)}


def import_hf_full(folder: str | Path) -> tuple[dict, dict, Transformer]:
    """Load a local Hugging Face llama, gpt2 or mixtral causal LM; return its `[model]` and `[method]` sections
    (`{"name": "dense"}`, or upcycling's options that rebuild Mixtral's MoE layers) and our model (fp32)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; point at a folder saved by save_pretrained or export_hf")
    config = _read_json(folder / "config.json")
    family = _family(config, folder)
    try:
        args = _gpt2_args(config, folder) if family == "gpt2" else _llama_args(config, folder)
        method = _mixtral_method(config, args, folder) if family == "mixtral" else {"name": "dense"}
    except KeyError as e:
        raise UserError(f"{folder}/config.json lacks {e}, which a {family} config needs; fix or re-save it") from None

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
    """Load a local Hugging Face llama or gpt2 causal LM; return its `[model]` section and our model (fp32)."""
    model_section_, method, model = import_hf_full(folder)
    if method["name"] != "dense":
        raise UserError(f"{folder} holds a Mixture-of-Experts model, which a [model] section alone cannot rebuild; "
                        "import it with import_hf_full, which also returns its [method] section")
    return model_section_, model


# ---------------------------------------------------------------------------------------------------- export


def mixtral_moe(model: Transformer) -> MoEFFN | None:
    """None for a model without MoE layers; else one of its MoE layers, after checking that every layer is an MoE
    that MixtralForCausalLM computes exactly (UserError naming what it cannot hold, and the fix)."""
    moes = {i: b.mlp for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEFFN)}
    if not moes:
        return None
    args = model.args
    if args.family != "llama" or args.activation != "swiglu":
        raise UserError(f"a {args.family}-family MoE with activation '{args.activation}' has no Hugging Face "
                        "equivalent (Mixtral is llama-family with SwiGLU experts); export a swiglu llama model")
    dense = [i for i in range(args.n_layer) if i not in moes]
    if dense:
        raise UserError(f"blocks {dense} are not MoE layers, but MixtralForCausalLM has an MoE in every layer; "
                        "upcycle with method.layers = \"all\" (convert upcycle --layers all) to export to Mixtral")
    if args.bias:
        raise UserError("Mixtral has no biases; export a llama model with model.bias = false")
    settings = {(m.num_experts, m.top_k, m.d_expert, m.router_type, m.renormalize, m.capacity_factor)
                for m in moes.values()}
    if len(settings) > 1:
        raise UserError("the MoE layers differ in experts, top_k, width or router, but Mixtral has one setting for "
                        "all layers; export a model upcycled with one set of options")
    moe = moes[0]
    if moe.router_type == "expert_choice":
        raise UserError("expert-choice routing has no Mixtral equivalent (each Mixtral token picks its top-k "
                        "experts); export a model trained with method.router = \"softmax_then_topk\"")
    if moe.router_type == "softmax_then_topk" and not moe.renormalize:
        raise UserError("Mixtral renormalises the top-k router weights to sum to 1, this model does not; export a "
                        "model trained with method.renormalize = true")
    if moe.capacity_factor > 0:
        raise UserError(f"Mixtral is dropless, this model drops tokens over capacity_factor={moe.capacity_factor}; "
                        "export a model trained with method.capacity_factor = 0")
    return moe


def hf_config(args: ModelArgs, dtype: torch.dtype, moe: MoEFFN | None = None) -> dict:
    """A LlamaConfig / GPT2Config dict for `args` (a MixtralConfig one with `moe`, a checked `mixtral_moe`),
    readable by transformers 4.x and 5.x."""
    dtype_name = str(dtype).removeprefix("torch.")
    if moe is not None:
        config = {key: value for key, value in hf_config(args, dtype).items()
                  if key not in ("attention_bias", "mlp_bias", "pretraining_tp")}  # llama-only keys
        return config | {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "intermediate_size": moe.d_expert,
            "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "sliding_window": None,
            # the same knob, not the same loss: HF pools the load-balancing statistics over all layers, and adds
            # the loss only with output_router_logits; our router z-loss has no counterpart
            "router_aux_loss_coef": moe.aux_loss_coef, "output_router_logits": False, "router_jitter_noise": 0.0,
        }
    if args.family == "llama":
        if args.activation != "swiglu":
            raise UserError(f"a llama-family model with activation '{args.activation}' has no LlamaForCausalLM "
                            "equivalent (its MLP is always gated SiLU); export a swiglu model")
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": args.vocab_size, "hidden_size": args.d_model, "intermediate_size": args.d_ff,
            "num_hidden_layers": args.n_layer, "num_attention_heads": args.n_head,
            "num_key_value_heads": args.n_kv_head, "head_dim": args.head_dim, "hidden_act": "silu",
            "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
            # the 4.x spelling; 5.x converts it into rope_parameters on load
            "rope_theta": args.rope_theta, "rope_scaling": None,
            "attention_bias": args.bias, "mlp_bias": args.bias, "attention_dropout": 0.0,
            "tie_word_embeddings": args.tie_embeddings, "initializer_range": 0.02, "pretraining_tp": 1,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
            "torch_dtype": dtype_name, "dtype": dtype_name, "use_cache": True,
        }
    if args.activation not in OUR_TO_GPT2_ACTIVATION:
        raise UserError(f"activation '{args.activation}' has no GPT-2 equivalent (GPT2Config knows gelu_new and "
                        "relu); export a gelu or relu model")
    if args.n_kv_head != args.n_head:
        raise UserError(f"a gpt2-family model with n_kv_head={args.n_kv_head} < n_head={args.n_head} has no GPT-2 "
                        "equivalent (GPT-2 has no grouped-query attention)")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": args.vocab_size, "n_positions": args.max_seq_len, "n_embd": args.d_model,
        "n_layer": args.n_layer, "n_head": args.n_head, "n_inner": args.d_ff,
        "activation_function": OUR_TO_GPT2_ACTIVATION[args.activation], "layer_norm_epsilon": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        # our model has no dropout: keep HF fine-tuning of the export the same function
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "torch_dtype": dtype_name, "dtype": dtype_name, "use_cache": True,
    }


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
        else:  # a bias-free gpt2-family model: GPT-2 always has biases, and zeros compute the same function
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
    """Copy `tokenizer.json` (and `tokenizer_config.json`, or write a minimal one) into an exported folder.

    When the tokenizer has `<|endoftext|>`, it is named the eos (and bos) token, and config.json's still-unset
    bos/eos ids are filled with its id so generation stops where training documents ended.
    """
    src, dst = Path(src_dir), Path(dst_folder)
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{src} has no tokenizer.json; point at the prepared data folder or a tokenizer folder")
    if not dst.is_dir():
        raise UserError(f"{dst} is not a folder; export the model first, then copy its tokenizer")
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")

    eos_id = Tokenizer.from_file(str(src / "tokenizer.json")).token_to_id(EOS_TOKEN)
    if (src / "tokenizer_config.json").is_file():
        shutil.copyfile(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    else:
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if eos_id is not None:
            tok_config |= {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN}
        (dst / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")

    config_path = dst / "config.json"
    if eos_id is not None and config_path.is_file():
        config = _read_json(config_path)
        for key in ("bos_token_id", "eos_token_id"):
            if config.get(key) is None:
                config[key] = eos_id
        config_path.write_text(json.dumps(config, indent=2) + "\n")
