"""Fine-tuning end to end: JSONL -> `data sft` -> train (dense and SAT) -> eval, loss on responses only."""
import json

import pytest

from sparsetrain.cli import main


@pytest.fixture
def sft_data(tiny_data, tmp_path):
    rows = [{"prompt": f"def add_{i}(a, b):", "response": f"    return a + b + {i}"} for i in range(60)]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    assert main(["data", "sft", "--source", str(src), "--tokenizer", str(tiny_data), "--out", str(out),
                 "--seq-len", "32", "--val-fraction", "0.1"]) == 0
    return out


@pytest.mark.parametrize("method", ["dense", "sat"])
def test_finetune_runs_and_learns(sft_data, tmp_path, capsys, method):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[model]\npreset = "tiny"\nn_layer = 2\nd_model = 64\nd_ff = 256\nmax_seq_len = 64\n'
        f'[data]\ndir = "{sft_data}"\n'
        "[train]\nsteps = 30\nbatch_size = 8\nseq_len = 32\nlr = 3e-3\nwarmup_steps = 2\neval_every = 15\n"
        "eval_tokens = 4096\nprogress = false\ncheckpoint_every = 30\n"
        f'[method]\nname = "{method}"\n' + ("ffn_multiple = 32\n" if method == "sat" else "")
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"] == pytest.approx(evals[1])


def test_sft_missing_field_names_the_line(tiny_data, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "only a prompt"}\n')
    assert main(["data", "sft", "--source", str(src), "--tokenizer", str(tiny_data), "--out",
                 str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: missing field 'response'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
