"""The models users bring, trained with every method that applies and handed back: `convert hf-import` of a tiny
random Llama 3.x / Qwen2 / Mistral / Mixtral built by transformers, a few steps of `train --init` with each method,
`convert hf-export`, and the exported folder loaded by transformers gives the trained model's logits."""
import pytest
import torch
from helpers import perturb
from test_hf_families import LLAMA3_ROPE, WINDOW
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from sparsetrain.cli import main
from sparsetrain.errors import UserError
from sparsetrain.store.hf import export_hf
from sparsetrain.training.build import load_model

VOCAB, SEQ = 512, 32  # the vocabulary of the tiny_data fixture; SEQ > WINDOW: the window matters in training
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=1e-6)
FAMILIES = {
    "llama3": (LlamaConfig, LlamaForCausalLM, dict(head_dim=24, rope_scaling=LLAMA3_ROPE)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, use_sliding_window=True,
                                                  sliding_window=WINDOW, max_window_layers=0)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=WINDOW, head_dim=24)),
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(sliding_window=WINDOW, num_local_experts=4,
                                                        num_experts_per_tok=2, intermediate_size=48)),
}
METHODS = {
    "dense": "method.name=dense",
    # every step sparse: half the neurons and head groups, sliced with their q/k/v bias rows
    "sat": "method.name=sat method.ffn_rate=0.5 method.head_rate=0.5 method.schedule=constant method.ffn_multiple=16 "
           "method.dense_final=0.0",
    # sparse from the second step to the end, units pruned and regrown every step
    "mst-neuron": "method.name=mst method.granularity=neuron method.sparsity=0.5 method.final_sparsity=0.5 "
                  "method.neuron_multiple=16 method.update_every=1 method.warmup_end=0.25",
    # the local band (16) meets the model's own window (8): the window wins
    "mst-weight-local": "method.name=mst method.sparsity=0.5 method.update_every=2 method.attention=local "
                        "method.window=16 method.attention_start=0.0 method.attention_end=1.0",
    "ssd": "method.name=ssd method.experts=4 method.top_k=2 method.schedule=fixed method.sparse_windows=[[0.25,0.75]] "
           "method.monitor_every=0",
    "upcycle": "method.name=upcycle method.experts=4 method.top_k=2 method.layers=all",
}
TRAIN = ("train.steps=4 train.batch_size=4 train.seq_len=32 train.eval_every=0 train.eval_tokens=256 "
         "train.checkpoint_every=0 train.lr=3e-3 train.warmup_steps=1 train.progress=false")
CASES = [(f, m) for f in ("llama3", "qwen2", "mistral") for m in METHODS] + [("mixtral", "continue")]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each family saved by transformers and imported once: {name: (HF class, model folder)}."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (config_cls, model_cls, kw) in FAMILIES.items():
        torch.manual_seed(0)
        hf = perturb(model_cls(config_cls(**{**BASE, **kw})))
        hf.save_pretrained(root / f"hf-{name}")
        assert main(["convert", "hf-import", "--from", str(root / f"hf-{name}"), "--out", str(root / name)]) == 0
        out[name] = (model_cls, root / name)
    return out


@pytest.mark.parametrize("family, method", CASES)
def test_train_with_each_method_then_export(family, method, imported, tiny_data, tmp_path):
    model_cls, folder = imported[family]
    sets = [f"data.dir={tiny_data}", *TRAIN.split(), *METHODS.get(method, "").split()]
    run = tmp_path / "run"
    assert main(["train", "--init", str(folder), "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    trained, _, _ = load_model(run)
    before, _, _ = load_model(folder)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), before.parameters()))  # it trained

    if family == "qwen2" and method == "upcycle":  # Mixtral has no q/k/v biases: refused, nothing written
        assert main(["convert", "hf-export", "--from", str(run), "--out", str(tmp_path / "hf")]) == 2
        assert not (tmp_path / "hf").exists()
        with pytest.raises(UserError, match="Mixtral has no biases"):
            export_hf(trained, tmp_path / "hf")
        return
    assert main(["convert", "hf-export", "--from", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf) is (MixtralForCausalLM if method == "upcycle" else model_cls)
    x = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, trained.eval()(x), atol=1e-5, rtol=1e-5)
