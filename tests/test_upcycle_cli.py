"""Upcycling end to end: dense run -> `convert upcycle` -> eval (same loss) -> train from it; and
`method.name = "upcycle"` with `train.init_from` a dense run upcycles at start."""
import json

import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.nn.moe import MoEFFN
from sparsetrain.training.build import load_model
from sparsetrain.training.loop import train


@pytest.fixture
def dense_run(make_config, tmp_path):
    run = tmp_path / "dense"
    train(make_config(steps=6, eval_every=0, checkpoint_every=0), run)
    return run


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_convert_upcycle_keeps_the_function_then_trains(dense_run, tmp_path, capsys):
    up = tmp_path / "up"
    assert main(["convert", "upcycle", "--from", str(dense_run), "--out", str(up), "--experts", "4",
                 "--top-k", "2", "--layers", "all"]) == 0
    model, method, cfg = load_model(up)
    assert method.name == "upcycle" and all(isinstance(b.mlp, MoEFFN) for b in model.blocks)
    dense, _, _ = load_model(dense_run)
    x = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    assert main(["eval", str(dense_run)]) == 0
    a = last_json(capsys)
    assert main(["eval", str(up)]) == 0
    b = last_json(capsys)
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    # Train the upcycled folder: its config (method upcycle) is the default config.
    run = tmp_path / "moe_run"
    assert main(["train", "--init", str(up), "--out", str(run), "--set", "train.steps=3",
                 "--set", "train.eval_every=0", "--set", "train.progress=false"]) == 0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert "moe_load_imbalance" in rows[-1] and rows[-1]["step"] == 3
    # Active FLOPs: top-2 of 4 experts of full width, so more than dense per token.
    assert rows[-1]["flops"] > 0


def test_init_from_dense_with_upcycle_method(dense_run, make_config, tmp_path):
    cfg = make_config(steps=2, eval_every=0, checkpoint_every=0, init_from=str(dense_run), lr=1e-12,
                      warmup_steps=0, weight_decay=0.0,
                      method={"name": "upcycle", "experts": 4, "top_k": 2, "layers": [1], "aux_loss_coef": 0.0,
                              "z_loss_coef": 0.0})
    run = tmp_path / "moe"
    train(cfg, run)
    moe, _, _ = load_model(run)
    dense, _, _ = load_model(dense_run)
    assert isinstance(moe.blocks[1].mlp, MoEFFN) and not isinstance(moe.blocks[0].mlp, MoEFFN)
    x = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(moe(x), dense(x), atol=1e-4, rtol=1e-4)


def test_bad_upcycle_cli(dense_run, tmp_path, capsys):
    assert main(["convert", "upcycle", "--from", str(dense_run), "--out", str(tmp_path / "u"),
                 "--experts", "4", "--top-k", "5"]) == 2
    assert not (tmp_path / "u").exists()
    assert main(["convert", "upcycle", "--from", str(dense_run), "--out", str(tmp_path / "u"),
                 "--layers", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("sparsetrain: error:") for e in err)


def test_llama_upcycle_export_mixtral_and_back(make_config, tmp_path, capsys):
    """A user's path: dense llama run -> upcycle (every layer) -> Mixtral folder transformers loads -> import."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "llama"
    train(make_config(steps=4, eval_every=0, checkpoint_every=0, model={"preset": "tiny-llama", "n_kv_head": 2}),
          run)
    up = tmp_path / "up"
    assert main(["convert", "upcycle", "--from", str(run), "--out", str(up), "--experts", "4", "--top-k", "2",
                 "--layers", "all", "--drop-rate", "0.25"]) == 0
    hf_dir = tmp_path / "mixtral"
    assert main(["convert", "hf-export", "--from", str(up), "--out", str(hf_dir)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(hf).__name__ == "MixtralForCausalLM"
    ours, _, _ = load_model(up)
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    back = tmp_path / "back"
    assert main(["convert", "hf-import", "--from", str(hf_dir), "--out", str(back)]) == 0
    again, method, _ = load_model(back)
    assert method.name == "upcycle"
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), atol=1e-5, rtol=1e-5)
