"""The models users bring: Llama 3.x (llama3 / linear rope scaling, head_dim other than hidden / heads), Qwen2 (q/k/v
biases only, tied embeddings, a sliding window), Mistral and Mixtral (a sliding window). Each against transformers
itself on a tiny random model: logits equal after import and after export, configs that rebuild the model exactly,
one-line refusals for what stays unsupported, and damaged folders refused in one line."""
import dataclasses
import json

import pytest
import torch
from helpers import assert_imported_sections_rebuild, perturb
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import sparsetrain.nn.attention_masks as am
from sparsetrain.config import ModelConfig
from sparsetrain.errors import UserError
from sparsetrain.nn.model import FAMILY_DEFAULTS, PRESETS, ModelArgs, Transformer, resolve
from sparsetrain.store.hf import export_hf, import_hf_full

VOCAB, SEQ, WINDOW = 97, 48, 8  # the window is well inside the sequence: it changes the logits
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=SEQ, rms_norm_eps=1e-6, bos_token_id=None,
            eos_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

FAMILIES = {
    # Llama 3.x: llama3 rope scaling with heads wider than hidden / heads
    "llama3-head_dim": (LlamaConfig, LlamaForCausalLM, dict(head_dim=24, rope_theta=5e5, rope_scaling=LLAMA3_ROPE)),
    "llama-linear-rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2-tied-head_dim": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_theta=1e6,
                                                               head_dim=24)),
    "qwen2-window": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                         max_window_layers=0)),
    "mistral-window-head_dim": (MistralConfig, MistralForCausalLM, dict(sliding_window=WINDOW, head_dim=32)),
    "mixtral-window": (MixtralConfig, MixtralForCausalLM, dict(sliding_window=WINDOW, num_local_experts=4,
                                                               num_experts_per_tok=2, intermediate_size=48)),
}


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_model(name: str, **overrides):
    config_cls, model_cls, kw = FAMILIES[name]
    torch.manual_seed(0)
    return perturb(model_cls(config_cls(**{**BASE, **kw, **overrides}, attn_implementation="eager")))


@pytest.mark.parametrize("name", FAMILIES)
def test_import_and_export_give_hf_logits(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    model_section, method_section, model = import_hf_full(tmp_path / "hf")
    idx = tokens()
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)

    assert_imported_sections_rebuild(model_section, method_section, model, idx, expected, SEQ)

    export_hf(model, tmp_path / "out")
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                                      output_loading_info=True)
    assert type(back) is type(hf)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx).logits, expected, atol=1e-5, rtol=1e-5)
    # and back again: the same weights, bit for bit
    again = import_hf_full(tmp_path / "out")[2].state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, feature", [("llama3-head_dim", dict(rope_scaling=None)),
                                           ("llama-linear-rope", dict(rope_scaling=None)),
                                           ("mistral-window-head_dim", dict(sliding_window=None)),
                                           ("qwen2-window", dict(use_sliding_window=False))])
def test_each_feature_changes_the_logits(name, feature):
    """The comparisons above would pass for a feature that had no effect at this size: it has one."""
    idx = tokens()
    with torch.no_grad():
        assert not torch.allclose(hf_model(name)(idx).logits, hf_model(name, **feature)(idx).logits, atol=1e-3)


def test_qkv_bias_rows_follow_the_kept_head_groups():
    """SAT / MST neuron slicing with Qwen2's q/k/v biases: computing the kept groups with sliced weights and biases
    is the full attention without the omitted groups' outputs."""
    torch.manual_seed(0)
    args = ModelArgs(**{**FAMILY_DEFAULTS["llama"], **PRESETS["tiny-llama"], "vocab_size": VOCAB,
                        "max_seq_len": SEQ, "n_kv_head": 2, "qkv_bias": True, "head_dim": 24, "sliding_window": 8})
    model = perturb(Transformer(args))
    attn, rope = model.blocks[0].attn, (model.rope_cos, model.rope_sin)
    x = torch.randn(2, SEQ, args.d_model, generator=torch.Generator().manual_seed(0))
    kept = torch.tensor([1])
    _, cols = attn.group_rows(kept)
    with torch.no_grad():
        heads = attn.head_outputs(x, rope)  # [B, H, T, d]: all groups
        per_group = args.n_head // args.n_kv_head
        only_kept = heads[:, 1 * per_group:2 * per_group].transpose(1, 2).reshape(2, SEQ, -1)
        expected = torch.nn.functional.linear(only_kept, attn.proj.weight[:, cols], attn.proj.bias)
        attn.active = kept
        torch.testing.assert_close(attn(x, rope), expected, atol=1e-5, rtol=1e-5)
    assert attn.qkv.bias is not None and attn.proj.bias is None


def test_method_masks_keep_the_models_window():
    """MST's attention patterns on a model with its own window: never a key beyond the window."""
    T, limit = 64, 8
    own = am.dense_mask("causal", T, 0, 1, limit=limit)
    assert torch.equal(own, am.dense_mask("local", T, limit, 1))
    for kind, window, stride in [("local", 16, 1), ("strided", 1, 5), ("hybrid", 4, 6)]:
        mask = am.dense_mask(kind, T, window, stride, limit=limit)
        assert torch.equal(mask, am.dense_mask(kind, T, window, stride) & own)
        blocks = am.computed_blocks(kind, 512, window, stride, block=32, limit=40)
        full = am.dense_mask(kind, 512, window, stride, limit=40).view(16, 32, 16, 32).any(dim=(1, 3))
        assert blocks == int(full.sum())


def test_default_models_are_unchanged():
    """The new keys default to off: an old preset resolves to the args it always had, and runs the causal path."""
    args = resolve(ModelConfig(preset="tiny-llama", vocab_size=VOCAB))
    assert (args.head_dim, args.qkv_bias, args.rope_scaling, args.sliding_window) == (32, False, "none", 0)
    assert Transformer(args).blocks[0].attn.sliding_window == 0


def test_refusals_name_the_feature(tmp_path):
    def refused(name: str, change: dict, message: str, base: str = "llama3-head_dim"):
        hf_model(base).config.save_pretrained(tmp_path / name)
        values = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**values, **change}))
        with pytest.raises(UserError, match=message) as e:
            import_hf_full(tmp_path / name)
        assert "\n" not in str(e.value)

    refused("dynamic", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "rope scaling 'dynamic'")
    refused("longrope", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope scaling 'longrope'")
    refused("half-bias", {"attention_bias": True, "mlp_bias": False}, "attention_bias=True with mlp_bias=False")
    refused("some-layers", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                            "layer_types": None}, "sliding window on some layers only", base="qwen2-tied-head_dim")
    refused("gelu", {"hidden_act": "gelu"}, "hidden_act 'gelu'", base="mistral-window-head_dim")

    # Exports that no Hugging Face architecture computes
    torch.manual_seed(0)
    llama = ModelArgs(**{**FAMILY_DEFAULTS["llama"], **PRESETS["tiny-llama"], "vocab_size": VOCAB,
                         "max_seq_len": SEQ})
    with pytest.raises(UserError, match="sliding window with biases"):
        export_hf(Transformer(dataclasses.replace(llama, bias=True, qkv_bias=True, sliding_window=8)), tmp_path / "x")
    gpt2 = ModelArgs(**{**FAMILY_DEFAULTS["gpt2"], **PRESETS["tiny"], "vocab_size": VOCAB, "n_kv_head": 4})
    with pytest.raises(UserError, match="no GPT-2 equivalent"):
        export_hf(Transformer(dataclasses.replace(gpt2, sliding_window=8)), tmp_path / "y")
    for key, value, message in [("rope_scaling", "yarn", "unknown model.rope_scaling 'yarn'"),
                                ("head_dim", 15, "head_dim=15 must be positive"),
                                ("rope_low_freq_factor", 4.0, "rope_low_freq_factor < model.rope_high_freq_factor")]:
        extra = {"rope_scaling": "llama3"} if key == "rope_low_freq_factor" else {}
        with pytest.raises(UserError, match=message):
            resolve(ModelConfig(preset="tiny-llama", vocab_size=VOCAB, **{key: value, **extra}))
    with pytest.raises(UserError, match="needs rotary positions"):
        resolve(ModelConfig(preset="tiny", vocab_size=VOCAB, rope_scaling="linear", rope_factor=2.0))


def test_llama_with_mlp_and_output_biases_exports_zero_qkv_biases(tmp_path):
    """bias without qkv_bias (biases on the output projection and MLP only): Llama with attention_bias, whose q/k/v
    biases are zeros - the same function."""
    torch.manual_seed(0)
    args = ModelArgs(**{**FAMILY_DEFAULTS["llama"], **PRESETS["tiny-llama"], "vocab_size": VOCAB,
                        "max_seq_len": SEQ, "bias": True, "qkv_bias": False})
    model = perturb(Transformer(args))
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf) is LlamaForCausalLM and not hf.model.layers[0].self_attn.q_proj.bias.any()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens()).logits, model(tokens()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("damage", ["truncated", "header", "config", "config-not-object", "index", "bin"])
def test_damaged_folders_are_one_line_errors(damage, tmp_path):
    """Issue 15: a damaged Hugging Face folder is a one-line error naming the file and the fix, no traceback."""
    folder = tmp_path / "hf"
    hf = hf_model("qwen2-tied-head_dim")
    hf.save_pretrained(folder, **({"max_shard_size": "50KB"} if damage == "index" else {}))
    weights = folder / "model.safetensors"
    if damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        named = "model.safetensors"
    elif damage == "header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32
        weights.write_bytes(bytes(data))
        named = "model.safetensors"
    elif damage == "config":
        (folder / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 6')
        named = "config.json"
    elif damage == "config-not-object":
        (folder / "config.json").write_text("[1, 2]")
        named = "config.json"
    elif damage == "index":
        (folder / "model.safetensors.index.json").write_bytes(b"\x00\x01garbage")
        named = "model.safetensors.index.json"
    else:
        tensors = load_file(weights)
        weights.unlink()
        torch.save(tensors, folder / "pytorch_model.bin")
        (folder / "pytorch_model.bin").write_bytes((folder / "pytorch_model.bin").read_bytes()[:1000])
        named = "pytorch_model.bin"
    with pytest.raises(UserError) as e:
        import_hf_full(folder)
    message = str(e.value)
    assert named in message and "\n" not in message
    assert any(fix in message for fix in ("re-download", "re-save", "re-export")), message
