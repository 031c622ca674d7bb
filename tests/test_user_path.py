"""The README's "From a Hugging Face Llama to a Mixtral" path, read from README.md and run command by command as
written (the two `train` lines with fewer, smaller steps), in a fresh folder holding what the path assumes:
`hf-llama` (a tiny random Llama saved by transformers, with its own tokenizer) and `my-texts/`."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sparsetrain.cli import main
from sparsetrain.training.build import load_model

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## From a Hugging Face Llama to a Mixtral, as a user would"
# What the test adds to the two `train` lines: fewer and smaller steps (the defaults, 200 steps of 16 x 256 tokens,
# take minutes on a busy CPU). Everything else runs as the README writes it.
SHORTER = ["--set", "train.steps=12", "--set", "train.batch_size=4", "--set", "train.eval_tokens=2048", "--set",
           "train.log_every=1"]
TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
        "for i in range(10):\n    print(i * i)\n", "class Point:\n    x: int\n    y: int\n"]


def readme_commands() -> list[str]:
    """The command lines of the section's first bash block."""
    section = README.read_text().split(SECTION, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def make_hf_llama(folder: Path) -> None:
    """A Llama as users bring it, tiny: weights, config and its own tokenizer. Shaped for the defaults the path
    trains with (sequences of 256, SAT keeping multiples of 64 FFN neurons)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXT * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=0, eos_token_id=1)).save_pretrained(folder)


def test_readme_hf_llama_sat_upcycle_mixtral(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_hf_llama(tmp_path / "hf-llama")
    (tmp_path / "my-texts").mkdir()
    for i in range(40):  # a few thousand tokens a document: the held-out one holds a window of 256
        (tmp_path / "my-texts" / f"doc{i:02d}.txt").write_text("".join(TEXT[(i + j) % 4] for j in range(60)))
    commands = readme_commands()
    assert [c.split()[:3] for c in commands[:2]] == [["sparsetrain", "convert", "hf-import"],
                                                     ["sparsetrain", "data", "prepare"]]
    for command in commands:
        words = shlex.split(command, comments=True)
        if words[0] == "sparsetrain":
            assert main(words[1:] + (SHORTER if words[1] == "train" else [])) == 0, command
        else:  # the last line: transformers loads the export in a fresh interpreter
            assert words[0] == "python", command
            done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True)
            assert done.returncode == 0 and "MixtralForCausalLM" in done.stdout, done.stderr
    rows = [json.loads(line) for line in open("runs/cpt-sat/metrics.jsonl")]
    assert rows[0]["sat_ffn_rate"] == 0.5 and rows[-1]["sat_ffn_rate"] == 0.0  # ladder down to dense at the end
    mixtral = AutoModelForCausalLM.from_pretrained("exported/mixtral")
    ours, _, _ = load_model("runs/moe")
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(mixtral(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    assert (tmp_path / "exported" / "mixtral" / "tokenizer.json").is_file()
