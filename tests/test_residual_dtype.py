"""The residual stream in autocast's dtype (`train.residual_dtype`, auto = bf16 under bf16 autocast): what flows
between blocks is bf16 under autocast (on the GPU where there is one) and the loss stays within bf16 rounding of the
fp32 stream's; without autocast nothing changes; bad settings are one-line errors before anything runs."""
import pytest
import torch
from conftest import tiny_config

from sparsetrain import config
from sparsetrain.errors import UserError
from sparsetrain.training import runtime
from sparsetrain.training.build import build_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def block_input_dtypes(model, idx):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)) for b in model.blocks]
    loss = model(idx[:, :-1], idx[:, 1:])
    for h in hooks:
        h.remove()
    return loss, seen


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_residual_under_autocast(tiny_data, family):
    raw = tiny_config(tiny_data, dtype="bf16")
    raw["model"]["family"] = family
    model, _, args = build_model(config.from_dict(raw), 512)
    assert model.low_precision_residual  # auto
    model.to(DEVICE)
    idx = torch.randint(0, args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = {}
    for low in (False, True):
        model.low_precision_residual = low
        model.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss, dtypes = block_input_dtypes(model, idx)
        loss.backward()
        assert set(dtypes) == {torch.bfloat16 if low else torch.float32}
        results[low] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters())
    torch.testing.assert_close(results[True][0], results[False][0], rtol=2e-2, atol=2e-2)
    for name, g in results[False][1].items():
        cos = torch.nn.functional.cosine_similarity(results[True][1][name].flatten(), g.flatten(), dim=0)
        assert cos > 0.95, name


def test_without_autocast_the_setting_changes_nothing(tiny_data):
    model, _, args = build_model(config.from_dict(tiny_config(tiny_data)), 512)
    assert model.low_precision_residual  # auto: it would apply under autocast
    idx = torch.randint(0, args.vocab_size, (2, 17))
    losses = []
    for low in (False, True):
        model.low_precision_residual = low
        losses.append(block_input_dtypes(model, idx))
    assert torch.equal(losses[0][0], losses[1][0]) and set(losses[1][1]) == {torch.float32}


def test_bad_residual_settings_are_user_errors(tiny_data):
    with pytest.raises(UserError, match="train.residual_dtype must be auto, fp32 or bf16"):
        config.from_dict(tiny_config(tiny_data, residual_dtype="fp16"))
    with pytest.raises(UserError, match="needs bf16 autocast: set train.dtype = bf16"):
        config.from_dict(tiny_config(tiny_data, dtype="fp32", residual_dtype="bf16"))
    cfg = config.from_dict(tiny_config(tiny_data, residual_dtype="bf16", device="cpu"))  # dtype auto: fp32 here
    with pytest.raises(UserError, match="this run computes in fp32 on cpu"):
        runtime.setup_runtime(cfg.train)
    cfg.train.residual_dtype = "auto"  # follows the compute dtype: no error
    assert runtime.setup_runtime(cfg.train).dtype == torch.float32
