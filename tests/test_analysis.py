"""`analyze_run`: the SSD monitor's numbers over a run's checkpoints, files written, neurons followed through
permutations stored with the checkpoints."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsetrain.store.checkpoint as ckpt_mod
from sparsetrain.cli.analyze import analyze_run
from sparsetrain.errors import UserError
from sparsetrain.methods import REGISTRY
from sparsetrain.methods.ssd.method import SSD
from sparsetrain.training.loop import train


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A 12-step relu2 run with checkpoints at steps 6 and 12."""
    from conftest import tiny_config

    from sparsetrain import config

    raw = tiny_config(tiny_data)
    raw["model"]["activation"] = "relu2"
    out = tmp_path_factory.mktemp("analysis") / "run"
    train(config.from_dict(raw), out)
    return out


def test_analyze_run_writes_json_table_and_plots(run, tmp_path):
    out = tmp_path / "analysis"
    result = analyze_run(run, out, probe_tokens=256, experts=4, top_k=1)
    for name in ["analysis.json", "analysis.md", "sparsity.png", "stability.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["steps"] == [6, 12] and saved["layers"] == 2
    assert saved["probe_tokens"] == 32  # the tiny corpus's validation shard holds one window of 32
    assert saved["ari"][0] == [None, None] and all(-1 <= v <= 1 for v in saved["ari"][1])
    assert all(0 < v < 1 for row in saved["sparsity"] for v in row)  # relu2: exact zeros
    assert all(0 < r <= m <= 1 for rr, mm in zip(saved["router_mass"], saved["mass"]) for r, m in zip(rr, mm))
    assert saved["mean_sparsity"] == result["mean_sparsity"]
    table = (out / "analysis.md").read_text()
    heads = "activation sparsity | ARI of consecutive clusterings | top-1 mass (best experts) | top-1 mass (router)"
    assert f"| step | {heads} |" in table and f"| layer | {heads} |" in table and "\n| 12 |" in table
    # Default output folder: inside the run.
    analyze_run(run, probe_tokens=128, experts=4, top_k=1, plots=False)
    assert (run / "analysis" / "analysis.json").is_file()


def test_neurons_are_followed_through_a_stored_permutation(run, tmp_path, monkeypatch):
    """A checkpoint whose FFN neurons were permuted (as SSD does) and which stores the order gives the same
    numbers as the original."""
    monkeypatch.setitem(REGISTRY, "ssd", SSD)
    permuted = tmp_path / "permuted"
    shutil.copytree(run, permuted)
    last = ckpt_mod.list_checkpoints(permuted)[-1]
    weights = load_file(str(last / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(256, generator=g) for _ in range(2)])
    for i in range(2):
        for name, dim in [("fc.weight", 0), ("fc.bias", 0), ("proj.weight", 1)]:
            key = f"blocks.{i}.mlp.{name}"
            weights[key] = weights[key].index_select(dim, order[i]).contiguous()
    save_file(weights, str(last / "model.safetensors"))
    save_file({"neuron_order": order}, str(last / "method.safetensors"))
    ckpt_mod.write_manifest(last)  # a checkpoint written this way by a run would carry its checksums

    ref = analyze_run(run, tmp_path / "a", probe_tokens=256, experts=4, top_k=1, plots=False)
    got = analyze_run(permuted, tmp_path / "b", probe_tokens=256, experts=4, top_k=1, plots=False)
    assert got["ari"] == ref["ari"]
    for key in ["sparsity", "mass", "router_mass"]:
        assert sum(got[key], []) == pytest.approx(sum(ref[key], []), abs=1e-5), key
    # Without the stored order, the permuted checkpoint looks like a reshuffled clustering.
    save_file({}, str(last / "method.safetensors"))
    ckpt_mod.write_manifest(last)
    blind = analyze_run(permuted, tmp_path / "c", probe_tokens=256, experts=4, top_k=1, plots=False)
    assert max(abs(v) for v in blind["ari"][1]) < 0.2 < min(ref["ari"][1])


def test_user_errors(run, tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        analyze_run(tmp_path)
    with pytest.raises(UserError, match="divide"):
        analyze_run(run, tmp_path / "x", experts=3, top_k=1, plots=False)
    (tmp_path / "empty").mkdir()
    shutil.copy(run / "config.toml", tmp_path / "empty" / "config.toml")
    with pytest.raises(UserError, match="no complete checkpoint"):
        analyze_run(tmp_path / "empty")
