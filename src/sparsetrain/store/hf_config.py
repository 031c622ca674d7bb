"""Hugging Face config.json <-> our `ModelArgs`: which architectures and variants compute exactly what our model
computes, and a one-line refusal, naming the feature, for the rest.

Architectures (model_type): `llama`, `qwen2` (biases on q/k/v only), `mistral` (a sliding window over all layers),
`mixtral` (Mistral with an MoE in every layer) and `gpt2`. The llama-family variants: rotary scaling `linear` and
`llama3` (Llama 3.1+), `head_dim` other than hidden_size / heads, tied embeddings, GQA/MQA. Exports pick the
architecture that holds the model: Llama, else Qwen2 (q/k/v biases only), else Mistral (a window, no biases), and
Mixtral for a model with an MoE in every layer. Configs are written in the spelling transformers 4.x reads
(`rope_theta` + `rope_scaling`), which 5.x converts into `rope_parameters` on load.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from sparsetrain.errors import UserError
from sparsetrain.nn.model import ModelArgs, Transformer
from sparsetrain.nn.moe import MoEFFN

# Hugging Face activation names that compute exactly one of ours (GPT-2 family).
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
OUR_TO_GPT2_ACTIVATION = {"gelu": "gelu_new", "relu": "relu"}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2", "MixtralForCausalLM": "mixtral",
                 "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
LLAMA_LIKE = ("llama", "qwen2", "mistral", "mixtral")
ROPE_TYPES = ("default", "linear", "llama3")


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a one-line error naming the file (bad JSON, not text, not an object)."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-download or re-export the model") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, not a JSON object; re-download or re-export the "
                        "model")
    return value


def model_type(config: dict, folder: Path) -> str:
    kind = config.get("model_type")
    if kind is None:
        archs = config.get("architectures") or []
        kind = ARCHITECTURES.get(archs[0] if archs else "")
    if kind not in (*LLAMA_LIKE, "gpt2"):
        raise UserError(f"{folder}/config.json has model_type '{kind}', which is not supported; sparsetrain imports "
                        f"{', '.join(f'{v} ({k})' for k, v in ARCHITECTURES.items())}")
    return kind


def unsupported(folder: Path, what: str) -> UserError:
    return UserError(f"{folder}: {what} is not supported by sparsetrain's model; pick a model without it")


def _rope(c: dict, folder: Path) -> dict:
    """ModelArgs' rotary keys from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise unsupported(folder, "rotary parameters that differ by layer type")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise unsupported(folder, f"rope scaling '{rope_type}' (supported: {', '.join(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise unsupported(folder, f"partial rotary embeddings (partial_rotary_factor={partial})")
    out = {"rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))}
    if rope_type == "default":
        return out
    out |= {"rope_scaling": rope_type, "rope_factor": float(rope["factor"])}
    if rope_type == "llama3":
        # as transformers reads it: a top-level original_max_position_embeddings first, then the rope dict's
        original = c.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        out |= {"rope_low_freq_factor": float(rope["low_freq_factor"]),
                "rope_high_freq_factor": float(rope["high_freq_factor"]),
                "rope_original_max_seq_len": int(original or c.get("max_position_embeddings", 2048))}
    return out


def _window(c: dict, kind: str, folder: Path) -> int:
    """The sliding window over all layers (0 = none), as transformers applies it to each architecture."""
    if kind in ("mistral", "mixtral"):
        return int(c.get("sliding_window") or 0)
    if kind != "qwen2" or not c.get("use_sliding_window"):
        return 0  # Llama has no window; Qwen2 has one only with use_sliding_window
    window = c.get("sliding_window")
    n_layer, first = c["num_hidden_layers"], c.get("max_window_layers", 28)
    types = c.get("layer_types") or ["sliding_attention" if window is not None and i >= first else "full_attention"
                                     for i in range(n_layer)]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return 0
    if len(sliding) < n_layer:
        raise unsupported(folder, f"a sliding window on some layers only (layers {sliding[0]}..{sliding[-1]} of "
                                  f"{n_layer}, max_window_layers={first})")
    return int(window)


def _biases(c: dict, kind: str, folder: Path) -> tuple[bool, bool]:
    """(bias, qkv_bias): Llama's attention_bias covers q/k/v/o and mlp_bias the MLP; Qwen2 has q/k/v biases only."""
    if kind == "qwen2":
        return False, True
    if kind != "llama":
        return False, False
    attention_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise unsupported(folder, f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (biases on the "
                                  "attention and not the MLP, or the reverse)")
    return attention_bias, attention_bias


def llama_args(c: dict, kind: str, folder: Path) -> ModelArgs:
    """ModelArgs of a llama, qwen2, mistral or mixtral config (family llama)."""
    if c.get("hidden_act", "silu") != "silu":
        raise unsupported(folder, f"{kind} hidden_act '{c['hidden_act']}' (only silu)")
    d, n_head = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim")
    if not head_dim and d % n_head:
        raise unsupported(folder, f"hidden_size={d} not divisible by num_attention_heads={n_head} without head_dim")
    bias, qkv_bias = _biases(c, kind, folder)
    return ModelArgs(
        family="llama", n_layer=c["num_hidden_layers"], n_head=n_head,
        n_kv_head=c.get("num_key_value_heads") or n_head, d_model=d, d_ff=c["intermediate_size"],
        vocab_size=c["vocab_size"], max_seq_len=c.get("max_position_embeddings", 2048), activation="swiglu",
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        bias=bias, qkv_bias=qkv_bias, head_dim=head_dim or d // n_head, sliding_window=_window(c, kind, folder),
        **_rope(c, folder),
    )


def mixtral_method(c: dict) -> dict:
    """The `[method]` section that rebuilds a Mixtral's MoE layers: upcycling's structure with Mixtral's router."""
    return {
        "name": "upcycle", "experts": c["num_local_experts"], "top_k": c["num_experts_per_tok"], "layers": "all",
        "granularity": 1, "router": "softmax_then_topk", "renormalize": True, "capacity_factor": 0.0,
        # the same knob, not the same loss: HF pools the load-balancing statistics over all layers
        "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.001)),
        "z_loss_coef": 0.0,  # Mixtral trains without a router z-loss
    }


def gpt2_args(c: dict, folder: Path) -> ModelArgs:
    act = c.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise unsupported(folder, f"gpt2 activation_function '{act}' (supported: {', '.join(GPT2_ACTIVATIONS)})")
    if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
        raise unsupported(folder, "gpt2 attention scaling other than 1/sqrt(head_dim)")
    if c.get("add_cross_attention"):
        raise unsupported(folder, "gpt2 cross-attention")
    d = c["n_embd"]
    return ModelArgs(
        family="gpt2", n_layer=c["n_layer"], n_head=c["n_head"], n_kv_head=c["n_head"], d_model=d,
        d_ff=c.get("n_inner") or 4 * d, vocab_size=c["vocab_size"], max_seq_len=c.get("n_positions", 1024),
        activation=GPT2_ACTIVATIONS[act], norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), rope_theta=10000.0,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)), bias=True,
    )


def model_section(args: ModelArgs) -> dict:
    """`[model]` config keys that `resolve` turns back into exactly `args`."""
    return {"preset": "tiny" if args.family == "gpt2" else "tiny-llama", **asdict(args)}


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
    if args.bias or args.qkv_bias:
        raise UserError("Mixtral has no biases; export a llama model with model.bias = false and model.qkv_bias = "
                        "false")
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


def _rope_config(args: ModelArgs) -> dict:
    scaling = None
    if args.rope_scaling != "none":
        scaling = {"rope_type": args.rope_scaling, "factor": args.rope_factor}
        if args.rope_scaling == "llama3":
            scaling |= {"low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_max_seq_len or args.max_seq_len}
    return {"rope_theta": args.rope_theta, "rope_scaling": scaling}


def _llama_architecture(args: ModelArgs) -> str:
    """Which Hugging Face architecture computes this llama-family model (UserError when none does)."""
    if args.activation != "swiglu":
        raise UserError(f"a llama-family model with activation '{args.activation}' has no LlamaForCausalLM "
                        "equivalent (its MLP is always gated SiLU); export a swiglu model")
    if args.qkv_bias and not args.bias:
        return "qwen2"  # q/k/v biases only; with or without a window
    if args.sliding_window:
        if args.bias:
            raise UserError("a sliding window with biases has no Hugging Face equivalent (Mistral has no biases, "
                            "Qwen2 only q/k/v ones); export a model with model.bias = false")
        return "mistral"
    return "llama"  # attention_bias = mlp_bias = bias; q/k/v biases that we lack are zeros in the export


def hf_config(args: ModelArgs, dtype: torch.dtype, moe: MoEFFN | None = None) -> dict:
    """A Llama / Qwen2 / Mistral / GPT-2 config dict for `args` (a Mixtral one with `moe`, a checked
    `mixtral_moe`), readable by transformers 4.x and 5.x."""
    dtype_name = str(dtype).removeprefix("torch.")
    common = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "torch_dtype": dtype_name,
              "dtype": dtype_name, "use_cache": True, "initializer_range": 0.02,
              "vocab_size": args.vocab_size, "tie_word_embeddings": args.tie_embeddings}
    if args.family == "llama":
        kind = "mixtral" if moe is not None else _llama_architecture(args)
        config = common | {
            "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral":
                               "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}[kind]], "model_type": kind,
            "hidden_size": args.d_model, "intermediate_size": args.d_ff, "num_hidden_layers": args.n_layer,
            "num_attention_heads": args.n_head, "num_key_value_heads": args.n_kv_head, "head_dim": args.head_dim,
            "hidden_act": "silu", "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
            "attention_dropout": 0.0, **_rope_config(args),
        }
        window = args.sliding_window or None
        if kind == "llama":
            return config | {"attention_bias": args.bias, "mlp_bias": args.bias, "pretraining_tp": 1}
        if kind == "qwen2":  # the window on every layer: max_window_layers = 0
            return config | {"use_sliding_window": window is not None, "sliding_window": window,
                             "max_window_layers": 0, "layer_types": [
                                 "sliding_attention" if window else "full_attention"] * args.n_layer}
        if kind == "mistral":
            return config | {"sliding_window": window}
        return config | {
            "intermediate_size": moe.d_expert, "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "sliding_window": window,
            # the same knob, not the same loss: HF pools the load-balancing statistics over all layers, and adds
            # the loss only with output_router_logits; our router z-loss has no counterpart
            "router_aux_loss_coef": moe.aux_loss_coef, "output_router_logits": False, "router_jitter_noise": 0.0,
        }
    if args.activation not in OUR_TO_GPT2_ACTIVATION:
        raise UserError(f"activation '{args.activation}' has no GPT-2 equivalent (GPT2Config knows gelu_new and "
                        "relu); export a gelu or relu model")
    if args.n_kv_head != args.n_head:
        raise UserError(f"a gpt2-family model with n_kv_head={args.n_kv_head} < n_head={args.n_head} has no GPT-2 "
                        "equivalent (GPT-2 has no grouped-query attention)")
    if args.head_dim * args.n_head != args.d_model or args.sliding_window:
        raise UserError("a gpt2-family model with model.head_dim other than d_model / n_head or a sliding window "
                        "has no GPT-2 equivalent; export a model without them")
    return common | {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_positions": args.max_seq_len, "n_embd": args.d_model,
        "n_layer": args.n_layer, "n_head": args.n_head, "n_inner": args.d_ff,
        "activation_function": OUR_TO_GPT2_ACTIVATION[args.activation], "layer_norm_epsilon": args.norm_eps,
        # our model has no dropout: keep HF fine-tuning of the export the same function
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
    }
