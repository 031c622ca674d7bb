"""Hugging Face interop: same logits as transformers in both directions, exact round trips, clear errors."""
import json

import pytest
import torch
from helpers import perturb
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sparsetrain.config import ModelConfig
from sparsetrain.errors import UserError
from sparsetrain.nn.model import FAMILY_DEFAULTS, PRESETS, ModelArgs, Transformer, resolve
from sparsetrain.store.hf import copy_tokenizer, export_hf, import_hf

VOCAB, SEQ = 97, 64


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_llama(**overrides) -> LlamaForCausalLM:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=SEQ, rms_norm_eps=1e-6, rope_theta=5e5,
              bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return perturb(LlamaForCausalLM(LlamaConfig(**{**kw, **overrides}, attn_implementation="eager")))


def hf_gpt2(**overrides) -> GPT2LMHeadModel:
    kw = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return perturb(GPT2LMHeadModel(GPT2Config(**{**kw, **overrides}, attn_implementation="eager")))


def ours(preset: str, **overrides) -> Transformer:
    values = {**FAMILY_DEFAULTS[PRESETS[preset]["family"]], **PRESETS[preset], "vocab_size": VOCAB, "max_seq_len": SEQ}
    values.setdefault("n_kv_head", values["n_head"])
    torch.manual_seed(0)
    return perturb(Transformer(ModelArgs(**{**values, **overrides})))


HF_MODELS = {
    "llama-gqa": lambda: hf_llama(),
    "llama-mqa-tied-bias": lambda: hf_llama(num_key_value_heads=1, tie_word_embeddings=True,
                                            attention_bias=True, mlp_bias=True),
    "gpt2": lambda: hf_gpt2(),
    "gpt2-relu-untied": lambda: hf_gpt2(activation_function="relu", n_inner=96, layer_norm_epsilon=1e-6,
                                        tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", HF_MODELS)
def test_import_gives_hf_logits(name, tmp_path):
    hf = HF_MODELS[name]()
    hf.save_pretrained(tmp_path)
    section, model = import_hf(tmp_path)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    assert (model.lm_head.weight is model.wte.weight) == hf.config.tie_word_embeddings
    assert resolve(ModelConfig(**section)) == model.args


def test_import_sharded_safetensors(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded/model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    one, sharded = import_hf(tmp_path / "one")[1].state_dict(), import_hf(tmp_path / "sharded")[1].state_dict()
    assert all(torch.equal(one[k], sharded[k]) for k in one)


def test_import_bare_gpt2_bin_with_legacy_buffers(tmp_path):
    """The original hub gpt2 layout: GPT2Model keys without 'transformer.', plus causal-mask buffers."""
    hf = hf_gpt2()
    hf.config.save_pretrained(tmp_path)
    weights = dict(hf.transformer.state_dict())
    weights["h.0.attn.bias"] = torch.ones(1, 1, SEQ, SEQ).tril()
    weights["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    _, model = import_hf(tmp_path)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


OUR_MODELS = {
    "tiny": lambda: ours("tiny"),
    "tiny-llama": lambda: ours("tiny-llama"),
    "llama-tied-bias": lambda: ours("tiny-llama", tie_embeddings=True, bias=True, n_kv_head=1, rope_theta=5e5),
    "gpt2-relu-untied-nobias": lambda: ours("tiny", activation="relu", tie_embeddings=False, bias=False, d_ff=96),
}


@pytest.mark.parametrize("name", OUR_MODELS)
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
    model = OUR_MODELS[name]()
    export_hf(model, tmp_path / "hf")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                    output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".hf.tmp-*"))


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_round_trip_is_exact(preset, tmp_path):
    model = ours(preset)
    export_hf(model, tmp_path / "hf")
    section, back = import_hf(tmp_path / "hf")
    assert resolve(ModelConfig(**section)) == model.args == back.args
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_dtype(tmp_path):
    model = ours("tiny-llama")
    export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "hf/model.safetensors").values()} == {torch.bfloat16}
    _, back = import_hf(tmp_path / "hf")  # fp32 again, each weight rounded once to bf16
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.bfloat16().float()), k


def test_copy_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hello", "world", "<|endoftext|>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="hello"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    (tmp_path / "data").mkdir()
    tok.save(str(tmp_path / "data/tokenizer.json"))

    export_hf(ours("tiny"), tmp_path / "hf")
    copy_tokenizer(tmp_path / "data", tmp_path / "hf")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert loaded.eos_token == "<|endoftext|>"
    assert loaded.eos_token_id == config["eos_token_id"] == config["bos_token_id"] == 2
    assert loaded("world hello")["input_ids"] == tok.encode("world hello").ids
    with pytest.raises(UserError, match="tokenizer.json"):
        copy_tokenizer(tmp_path / "nowhere", tmp_path / "hf")


def write_config(folder, **config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_import_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path / "missing")
    with pytest.raises(UserError, match="model_type 'phi3'"):
        import_hf(write_config(tmp_path / "phi3", model_type="phi3"))

    hf_llama().save_pretrained(tmp_path / "llama")
    config = json.loads((tmp_path / "llama/config.json").read_text())
    config.pop("rope_parameters", None)
    for name, change, message in [
        ("rope", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope scaling 'dynamic'"),
        ("yarn", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope scaling 'yarn'"),
        ("partial", dict(partial_rotary_factor=0.5), "partial rotary embeddings"),
        ("act", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        ("bias", dict(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
    ]:
        with pytest.raises(UserError, match=message):
            import_hf(write_config(tmp_path / name, **{**config, **change}))

    with pytest.raises(UserError, match="no weights"):
        import_hf(write_config(tmp_path / "noweights", **config))
    weights = load_file(tmp_path / "llama/model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "llama/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing weight model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf(tmp_path / "llama")


def test_export_errors_leave_folders_untouched(tmp_path):
    target = tmp_path / "full"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_hf(ours("tiny"), target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"

    with pytest.raises(UserError, match="relu2.*no GPT-2 equivalent"):
        export_hf(ours("tiny", activation="relu2"), tmp_path / "relu2")
    with pytest.raises(UserError, match="no LlamaForCausalLM equivalent"):
        export_hf(ours("tiny-llama", activation="gelu", d_ff=96), tmp_path / "gelu-llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written, no temp folders
