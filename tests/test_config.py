import pytest

from sparsetrain import config
from sparsetrain.errors import UserError


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\npreset = "tiny"\n[train]\nsteps = 5\n[method]\nname = "dense"\n')
    cfg = config.load(p, ["train.lr=0.01", "train.steps=7", 'model.activation="relu"', "data.dir=x/y"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and cfg.model.activation == "relu"
    assert cfg.data.dir == "x/y" and cfg.method == {"name": "dense"}


def test_int_accepted_for_float_and_round_trip(tmp_path):
    cfg = config.from_dict({"train": {"lr": 1}})
    assert isinstance(cfg.train.lr, float)
    text = config.dumps(config.to_dict(cfg))
    p = tmp_path / "c.toml"
    p.write_text(text)
    assert config.load(p) == cfg


@pytest.mark.parametrize("raw,match", [
    ({"train": {"stepz": 1}}, "unknown config key 'train.stepz'"),
    ({"train": {"steps": "many"}}, "train.steps must be int"),
    ({"train": {"steps": 1.5}}, "train.steps must be int"),
    ({"train": {"steps": 0}}, "must be positive"),
    ({"trian": {}}, "unknown config section"),
    ({"train": {"device": "tpu"}}, "train.device"),
    ({"model": {"tie_embeddings": "yes"}}, "model.tie_embeddings must be bool"),
    ({"train": {"fsdp_blocks_per_unit": -1}}, "train.fsdp_blocks_per_unit must be 0"),
])
def test_bad_values(raw, match):
    with pytest.raises(UserError, match=match):
        config.from_dict(raw)


def test_bad_set_and_file(tmp_path):
    with pytest.raises(UserError, match="section.key=value"):
        config.load(None, ["steps=3"])
    with pytest.raises(UserError, match="not found"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(UserError, match="not valid TOML"):
        config.load(bad)


@pytest.mark.parametrize("blocks, per_unit, fits, sizes", [
    (12, 0, False, [3, 3, 3, 3]), (24, 0, False, [6, 6, 6, 6]), (5, 0, False, [2, 2, 1]), (2, 0, False, [1, 1]),
    (12, 0, True, [12]), (5, 2, True, [2, 2, 1]), (4, 9, False, [4]), (3, 1, True, [1, 1, 1])])
def test_fsdp_units_group_consecutive_blocks(blocks, per_unit, fits, sizes):
    from sparsetrain.training.runtime import fsdp_units

    units = fsdp_units(list(range(blocks)), per_unit, whole_fits=fits)
    assert [len(u) for u in units] == sizes
    assert [b for u in units for b in u] == list(range(blocks))  # every block once, in order


def test_the_whole_model_is_one_fsdp_unit_while_a_quarter_of_the_gpu_holds_it(monkeypatch):
    """Gathered bf16 weights, their bf16 gradients and the fp32 copy they are reduced in: 8 bytes a parameter, within
    a quarter of the GPU's memory; off a GPU (gloo), always."""
    import types

    import torch

    from sparsetrain.training.runtime import Runtime, gathered_model_fits

    model = torch.nn.Linear(100, 10, bias=False)  # 1,000 parameters: 8,000 bytes gathered
    gpu = Runtime(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    for memory, fits in [(32_000, True), (31_999, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, m=memory: types.SimpleNamespace(
            total_memory=m))
        assert gathered_model_fits(model, gpu) == fits
    assert gathered_model_fits(model, Runtime(device=torch.device("cpu"), dtype=torch.float32))
