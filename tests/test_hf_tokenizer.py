"""The tokenizer travels with the model: `convert hf-import` keeps the Hugging Face tokenizer and its special-token ids,
and `eval`, `generate`, `data prepare --tokenizer MODEL` and `hf-export` use the model's own tokenizer, never another
one (a model without one is a one-line error naming the option)."""
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sparsetrain import config
from sparsetrain.cli import main
from sparsetrain.cli.generate import generate_both
from sparsetrain.data.tokenizer_files import load_tokenizer, stop_ids
from sparsetrain.nn.generate import generate
from sparsetrain.training.build import load_model

VOCAB = 320  # embeddings; the tokenizer has fewer ids, as Hugging Face models often do
TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
        "for i in range(10):\n    print(i * i)\n", "class Point:\n    x: int\n    y: int\n"]


@pytest.fixture
def hf_folder(tmp_path):
    """A Hugging Face Llama folder as users bring it: weights, config, its own tokenizer (<s>, </s>), and a
    generation config with two eos ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXT * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<eot>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "hf-llama"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=1))
    hf.generation_config.eos_token_id = [1, 2]
    hf.save_pretrained(folder)
    return folder


@pytest.fixture
def texts(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text("".join(TEXT[(i + j) % 4] for j in range(8)))
    return folder


def run(*args: str) -> int:
    return main([str(a) for a in args])


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsetrain: error:") and "\n" not in err, err
    assert all(n in err for n in needles), err
    return err


def test_import_keeps_the_tokenizer_and_names_no_data(hf_folder, tmp_path, capsys):
    assert run("convert", "hf-import", "--from", hf_folder, "--out", tmp_path / "model") == 0
    assert "with its tokenizer" in capsys.readouterr().out
    model = tmp_path / "model"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (model / name).read_bytes() == (hf_folder / name).read_bytes()
    # generation_config.json's eos ids (what transformers' generate stops on) win over config.json's
    assert json.loads((model / "special_tokens.json").read_text()) == {"bos_token_id": 0, "eos_token_id": [1, 2]}
    assert config.load(model / "config.toml").data.dir == ""  # no relative default pointing anywhere
    assert stop_ids(model / "tokenizer.json", load_tokenizer(model)) == [1, 2]


def test_eval_generate_and_prepare_use_the_models_tokenizer(hf_folder, texts, tiny_data, tmp_path, monkeypatch,
                                                           capsys):
    # From a folder whose data/stdlib holds another (bigger) tokenizer: the old default must not leak in.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_data, tmp_path / "data/stdlib")
    assert run("convert", "hf-import", "--from", hf_folder, "--out", "models/llama") == 0
    capsys.readouterr()

    texts_out = generate_both("models/llama", "def add(", max_new_tokens=5, temperature=0)
    model, _, _ = load_model("models/llama")
    expected = generate(model, load_tokenizer(hf_folder), "def add(", max_new_tokens=5, temperature=0, stop_id=[1, 2])
    assert texts_out["dense"] == expected

    assert run("eval", "models/llama", "--tokens", "256") == 2
    one_line_error(capsys, "--data", "data.dir is empty")
    assert run("eval", "models/llama", "--data", "data/stdlib", "--tokens", "256") == 2
    one_line_error(capsys, "another tokenizer", "--tokenizer models/llama")

    assert run("data", "prepare", "--source", texts, "--tokenizer", "models/llama", "--val-fraction", "0.2",
               "--out", "data/mine") == 0
    assert load_tokenizer("data/mine").get_vocab() == load_tokenizer(hf_folder).get_vocab()
    assert (tmp_path / "data/mine/tokenizer_config.json").is_file()  # the settings travel with it
    capsys.readouterr()
    assert run("eval", "models/llama", "--data", "data/mine", "--tokens", "256") == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0


def test_a_model_without_a_tokenizer_is_told_to_pass_one(hf_folder, texts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_folder / name, bare / name)
    assert run("convert", "hf-import", "--from", bare, "--out", "models/bare") == 0
    assert "without a usable tokenizer" in capsys.readouterr().out
    assert run("generate", "models/bare", "--prompt", "def") == 2
    one_line_error(capsys, "without a tokenizer", "--tokenizer")
    assert run("data", "prepare", "--source", texts, "--tokenizer", "models/bare", "--out", "data/x") == 2
    one_line_error(capsys, "--tokenizer")
    # the option works, and someone else's tokenizer (more ids than the model has embeddings) is refused
    assert run("generate", "models/bare", "--prompt", "def", "--tokenizer", hf_folder, "--max-new-tokens", "3") == 0
    capsys.readouterr()
    big = tmp_path / "big"
    big.mkdir()
    tok = load_tokenizer(hf_folder)
    tok.add_tokens([f"extra{i}" for i in range(VOCAB)])
    tok.save(str(big / "tokenizer.json"))
    assert run("generate", "models/bare", "--prompt", "def", "--tokenizer", big) == 2
    one_line_error(capsys, "not this model's tokenizer")
    assert run("convert", "hf-export", "--from", "models/bare", "--out", "out-big", "--tokenizer", big) == 2
    one_line_error(capsys, "not this model's tokenizer")
    assert not (tmp_path / "out-big").exists()  # refused before anything was written
    assert run("convert", "hf-export", "--from", "models/bare", "--out", "out-bare") == 0
    assert "without a tokenizer" in capsys.readouterr().out


def test_export_carries_the_models_tokenizer(hf_folder, texts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("convert", "hf-import", "--from", hf_folder, "--out", "models/llama") == 0
    assert run("convert", "hf-export", "--from", "models/llama", "--out", "exported/direct") == 0
    # and after training on data prepared with the model's tokenizer (the run's tokenizer is its data folder's)
    assert run("data", "prepare", "--source", texts, "--tokenizer", "models/llama", "--val-fraction", "0.2",
               "--out", "data/mine") == 0
    assert run("train", "--init", "models/llama", "--set", "data.dir=data/mine", "--set", "train.steps=2",
               "--set", "train.batch_size=2", "--set", "train.seq_len=32", "--set", "train.eval_tokens=128",
               "--set", "train.progress=false", "--out", "runs/cpt") == 0
    assert run("convert", "hf-export", "--from", "runs/cpt", "--out", "exported/trained") == 0

    original = AutoTokenizer.from_pretrained(hf_folder)
    for folder in ("exported/direct", "exported/trained"):
        tok = AutoTokenizer.from_pretrained(folder)
        hf_config = json.loads((tmp_path / folder / "config.json").read_text())
        assert hf_config["bos_token_id"] == 0 and hf_config["eos_token_id"] in ([1, 2], 1)
        assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
        assert tok("def add(a, b)")["input_ids"] == original("def add(a, b)")["input_ids"]
        hf = AutoModelForCausalLM.from_pretrained(folder)
        out = hf.generate(**tok("def add(", return_tensors="pt"), max_new_tokens=3, do_sample=False)
        assert out.shape[1] >= 4  # transformers' generate runs on the export (it failed with a foreign tokenizer)


def test_conversions_carry_the_imported_models_tokenizer(hf_folder, tmp_path, capsys):
    """upcycle, moefy and densify of an imported model write folders that generate with its own tokenizer."""
    model = tmp_path / "model"
    assert run("convert", "hf-import", "--from", hf_folder, "--out", model) == 0
    own = (model / "tokenizer.json").read_bytes()
    assert run("convert", "upcycle", "--from", model, "--out", tmp_path / "up", "--experts", "4", "--top-k", "2") == 0
    assert run("convert", "moefy", "--from", model, "--out", tmp_path / "moe", "--experts", "4") == 0
    assert run("convert", "densify", "--from", tmp_path / "moe", "--out", tmp_path / "dense") == 0
    for name in ("up", "moe", "dense"):
        assert (tmp_path / name / "tokenizer.json").read_bytes() == own
        assert json.loads((tmp_path / name / "special_tokens.json").read_text()) == \
            json.loads((model / "special_tokens.json").read_text())
        capsys.readouterr()
        assert run("generate", tmp_path / name, "--prompt", "def add", "--max-new-tokens", "3") == 0
