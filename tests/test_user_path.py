"""The README's "From a Hugging Face Llama to a Mixtral" path, command by command, on a tiny model."""
import json

import torch

from sparsetrain.cli import main
from sparsetrain.training.build import load_model


def test_hf_llama_sat_upcycle_mixtral(tiny_data, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    hf.save_pretrained("hf-llama")
    commands = [
        "convert hf-import --from hf-llama --out models/llama",
        f"train --init models/llama --set data.dir={tiny_data} --set method.name=sat --set method.ffn_multiple=32 "
        "--set train.steps=10 --set train.seq_len=32 --set train.batch_size=4 --set train.eval_every=5 "
        "--set train.eval_tokens=1024 --set train.progress=false --out runs/cpt-sat",
        "convert upcycle --from runs/cpt-sat --experts 4 --top-k 2 --layers all --out models/moe",
        "train --init models/moe --set method.aux_loss_coef=0.01 --set train.steps=3 --set train.eval_every=0 "
        "--out runs/moe",
        "convert hf-export --from runs/moe --out exported/mixtral",
    ]
    for command in commands:
        assert main(command.split()) == 0, command
    rows = [json.loads(l) for l in open("runs/cpt-sat/metrics.jsonl")]
    assert rows[0]["sat_ffn_rate"] == 0.5 and rows[-1]["sat_ffn_rate"] == 0.0  # ladder down to dense at the end
    mixtral = AutoModelForCausalLM.from_pretrained("exported/mixtral")
    ours, _, _ = load_model("runs/moe")
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(mixtral(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    assert (tmp_path / "exported" / "mixtral" / "tokenizer.json").is_file()
