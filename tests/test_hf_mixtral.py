"""Mixtral interop: an upcycled llama is a MixtralForCausalLM with the same logits, and back, exactly."""
import json

import pytest
import torch
from helpers import assert_imported_sections_rebuild, perturb
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from sparsetrain.config import ModelConfig
from sparsetrain.errors import UserError
from sparsetrain.methods.upcycle import upcycle
from sparsetrain.nn.model import FAMILY_DEFAULTS, PRESETS, ModelArgs, Transformer, resolve
from sparsetrain.nn.moe import MoEFFN
from sparsetrain.store.hf import export_hf, import_hf, import_hf_full

VOCAB, SEQ = 97, 64


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def llama(preset: str = "tiny-llama", **overrides) -> Transformer:
    values = {**FAMILY_DEFAULTS[PRESETS[preset]["family"]], **PRESETS[preset], "vocab_size": VOCAB, "max_seq_len": SEQ}
    values.setdefault("n_kv_head", values["n_head"])
    torch.manual_seed(0)
    return Transformer(ModelArgs(**{**values, **overrides}))


def upcycled(preset: str = "tiny-llama", *, model: dict | None = None, **options) -> Transformer:
    options = {"experts": 4, "top_k": 2, "layers": "all", **options}
    return perturb(upcycle(llama(preset, **(model or {})), **options))


def hf_mixtral(**overrides) -> MixtralForCausalLM:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=SEQ,
              rms_norm_eps=1e-6, rope_theta=5e5, router_aux_loss_coef=0.02, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return perturb(MixtralForCausalLM(MixtralConfig(**{**kw, **overrides}, attn_implementation="eager")))


EXPORTS = {
    "softmax_then_topk": dict(),
    "topk_then_softmax": dict(router="topk_then_softmax"),  # the same weights: renormalised top-k probabilities
    "granularity2-tied-mqa": dict(granularity=2, model=dict(tie_embeddings=True, n_kv_head=1)),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_loads_as_mixtral_with_same_logits(name, tmp_path):
    model = upcycled(**EXPORTS[name])
    export_hf(model, tmp_path / "hf")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                    output_loading_info=True)
    assert type(hf) is MixtralForCausalLM
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    moe = model.blocks[0].mlp
    assert (hf.config.num_local_experts, hf.config.num_experts_per_tok, hf.config.intermediate_size) == (
        moe.num_experts, moe.top_k, moe.d_expert)
    assert hf.config.router_jitter_noise == 0.0 and not hf.training
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
        # the routing matters: tokens go to different experts, so a wrong expert order could not pass
        picked = hf.model.layers[0].mlp.gate(torch.randn(64, model.args.d_model))[2]
    assert picked.unique().numel() == moe.num_experts


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert-files", "fused-files"])
def test_import_gives_hf_logits_and_a_config_that_rebuilds_it(fused, tmp_path):
    hf = hf_mixtral(tie_word_embeddings=fused)
    hf.save_pretrained(tmp_path / "hf", save_original_format=not fused)
    names = load_file(tmp_path / "hf/model.safetensors").keys()
    assert any("experts.gate_up_proj" in n for n in names) == fused  # both layouts on disk are tested
    model_section, method_section, model = import_hf_full(tmp_path / "hf")
    idx = tokens()
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)
    assert method_section == {
        "name": "upcycle", "experts": 4, "top_k": 2, "layers": "all", "granularity": 1,
        "router": "softmax_then_topk", "renormalize": True, "capacity_factor": 0.0, "aux_loss_coef": 0.02,
        "z_loss_coef": 0.0,
    }

    assert_imported_sections_rebuild(model_section, method_section, model, idx, expected, SEQ)

    with pytest.raises(UserError, match="import_hf_full"):  # its [model] section alone would lose the experts
        import_hf(tmp_path / "hf")


@pytest.mark.parametrize("granularity", [1, 2])
def test_round_trip_is_exact(granularity, tmp_path):
    model = upcycled(granularity=granularity)
    export_hf(model, tmp_path / "hf")
    section, method, back = import_hf_full(tmp_path / "hf")
    assert all(isinstance(b.mlp, MoEFFN) for b in back.blocks)
    # fine-grained experts come back as experts of their own width (d_ff = d_ff / G, granularity 1)
    assert resolve(ModelConfig(**section)) == back.args
    assert back.args.d_ff == model.args.d_ff // granularity
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_refuses_what_mixtral_cannot_compute(tmp_path):
    for options, message in [
        (dict(layers="every-other"), r"blocks \[0\] are not MoE layers.*layers = \"all\""),
        (dict(router="expert_choice", capacity_factor=2.0), "expert-choice routing has no Mixtral equivalent"),
        (dict(capacity_factor=1.25), "Mixtral is dropless"),
        (dict(renormalize=False), "renormalises the top-k router weights"),
        (dict(model=dict(bias=True)), "Mixtral has no biases"),
    ]:
        with pytest.raises(UserError, match=message):
            export_hf(upcycled(**options), tmp_path / "bad")
    with pytest.raises(UserError, match="gpt2-family MoE"):
        export_hf(upcycled("tiny"), tmp_path / "gpt2")
    assert not list(tmp_path.iterdir())  # nothing half-written, no temp folders


def test_import_errors(tmp_path):
    hf_mixtral().save_pretrained(tmp_path / "hf")
    config_json = json.loads((tmp_path / "hf/config.json").read_text())

    (tmp_path / "yarn").mkdir()
    (tmp_path / "yarn/config.json").write_text(json.dumps({**config_json, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}))
    with pytest.raises(UserError, match="rope scaling 'yarn'"):
        import_hf_full(tmp_path / "yarn")

    weights = load_file(tmp_path / "hf/model.safetensors")
    del weights["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(weights, tmp_path / "hf/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing weight model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight"):
        import_hf_full(tmp_path / "hf")
