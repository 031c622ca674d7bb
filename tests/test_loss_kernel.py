"""The Triton cross-entropy (`nn.kernels.cross_entropy`) against F.cross_entropy on fp32 logits, its reference: on
the CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU) at tiny shapes, on a
GPU at the model's shapes, compiled."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from conftest import tiny_config  # noqa: E402

from sparsetrain import config  # noqa: E402
from sparsetrain.errors import UserError  # noqa: E402
from sparsetrain.nn.kernels import cross_entropy as ce  # noqa: E402
from sparsetrain.training import runtime  # noqa: E402
from sparsetrain.training.build import build_model  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not ce.available(DEVICE), reason="needs a GPU, or TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="real shapes need a GPU")


def loss_and_grad(logits, targets, kernel):
    x = logits.detach().clone().requires_grad_()
    loss = ce.cross_entropy(x, targets, kernel) if kernel else F.cross_entropy(x.float(), targets)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_equal_f_cross_entropy(dtype):
    """A vocabulary of several blocks and a ragged last one, rows whose target is ignored (loss and gradient 0),
    targets on both edges of the vocabulary, and rows that are a strided slice of a wider tensor."""
    torch.manual_seed(0)
    V = 3 * ce.BLOCK_V + 17
    wide = (torch.randn(9, V + 5, device=DEVICE) * 4).to(dtype)
    logits = wide[:, :V]  # row stride V + 5
    targets = torch.randint(0, V, (9,), device=DEVICE)
    targets[[1, 6]] = ce.IGNORE_INDEX
    targets[0], targets[2] = 0, V - 1
    loss, grad = loss_and_grad(logits, targets, "triton")
    ref_loss, ref_grad = loss_and_grad(logits, targets, None)
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    # The reference's fp32 gradient rounds to the logits' dtype as it reaches them; so does the kernel's.
    tol = dict(rtol=0, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)
    assert grad[[1, 6]].abs().max() == 0


def test_masked_vocabulary_entries():
    """-inf logits (a vocabulary masked off), a row whose finite logits sit far below zero, and a row all -inf
    but its target: the loss and log-sum-exp as the reference."""
    V = 2 * ce.BLOCK_V + 5
    logits = torch.randn(4, V, device=DEVICE) * 3
    logits[0, 1::2] = float("-inf")
    logits[1] -= 1e3
    logits[2] = float("-inf")
    logits[2, 7] = 0.5
    targets = torch.tensor([4, V - 1, 7, ce.IGNORE_INDEX], device=DEVICE)
    loss, lse = ce.cross_entropy_rows(logits, targets)
    # Row 1's loss is a difference of two numbers near -1000: float32 spacing there is 6e-5.
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, reduction="none"), rtol=1e-6, atol=2e-4)
    torch.testing.assert_close(lse, logits.logsumexp(-1))


def test_rows_and_log_sum_exp():
    """Per-row losses as F.cross_entropy's reduction='none', and the log-sum-exp a by-product without a gradient."""
    torch.manual_seed(1)
    logits = torch.randn(5, 2 * ce.BLOCK_V, device=DEVICE, requires_grad=True)
    targets = torch.tensor([3, ce.IGNORE_INDEX, 0, 7, 2 * ce.BLOCK_V - 1], device=DEVICE)
    loss, lse = ce.cross_entropy_rows(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach(), targets, reduction="none"))
    torch.testing.assert_close(lse, logits.detach().logsumexp(-1))
    assert loss.requires_grad and not lse.requires_grad


def test_a_target_outside_the_vocabulary_is_a_nan_loss_not_a_stray_read():
    logits = torch.randn(3, 40, device=DEVICE)
    loss, _ = ce.cross_entropy_rows(logits, torch.tensor([1, 40, ce.IGNORE_INDEX], device=DEVICE))
    assert loss[0].isfinite() and loss[1].isnan() and loss[2] == 0


def test_every_target_ignored_is_nan_as_the_reference():
    logits = torch.randn(3, 40, device=DEVICE)
    targets = torch.full((3,), ce.IGNORE_INDEX, device=DEVICE)
    assert ce.cross_entropy(logits, targets, "triton").isnan()
    assert F.cross_entropy(logits, targets).isnan()


def test_the_model_loss_and_its_gradients_through_either_kernel(tiny_data):
    """The trainer's setting reaches the model; a tiny model's loss and every gradient agree between the kernels."""
    cfg = config.from_dict(tiny_config(tiny_data, loss_kernel="triton"))
    model, _, args = build_model(cfg, 512)
    assert model.loss_kernel == "triton"
    model.to(DEVICE)
    idx = torch.randint(0, args.vocab_size, (2, 16), device=DEVICE)
    results = {}
    for kernel in ("triton", "torch"):
        model.zero_grad()
        model.loss_kernel = kernel
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results[kernel] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-6, atol=1e-6)
    for name, g in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_loss_kernel_settings_are_user_errors(tiny_data, monkeypatch):
    with pytest.raises(UserError, match="train.loss_kernel must be auto, triton or torch"):
        config.from_dict(tiny_config(tiny_data, loss_kernel="fast"))
    cfg = config.from_dict(tiny_config(tiny_data))
    cfg.train.loss_kernel, cfg.train.device = "triton", "cpu"
    monkeypatch.setattr(ce, "available", lambda device: False)  # a CPU run without the interpreter
    with pytest.raises(UserError, match="train.loss_kernel = \"triton\" needs a GPU"):
        runtime.setup_runtime(cfg.train)


@gpu
@pytest.mark.parametrize("V", [50304, 128256])
def test_real_shapes_bf16_compiled(V):
    """16 x 1024 tokens of GPT-2's (padded) and Llama 3's vocabularies, bf16 logits, the op compiled."""
    torch.manual_seed(0)
    logits = (torch.randn(16384, V, device=DEVICE) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (16384,), device=DEVICE)
    targets[::97] = ce.IGNORE_INDEX
    loss, grad = loss_and_grad(logits, targets, None)
    fast = torch.compile(lambda x, t: ce.cross_entropy(x, t, "triton"))
    x = logits.clone().requires_grad_()
    out = fast(x, targets)
    out.backward()
    torch.testing.assert_close(out, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.float(), grad.float(), rtol=1e-2, atol=1e-6)
