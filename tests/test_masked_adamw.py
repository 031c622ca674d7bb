"""The Triton masked AdamW (`nn.kernels.masked_adamw`) against the trainer's update (`frozen._adamw_under_mask`):
through Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1 there) at tiny shapes, on a GPU at real
shapes."""
import pytest
import torch

from sparsetrain.methods.frozen import _adamw_under_mask
from sparsetrain.nn.kernels import masked_adamw

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernel = pytest.mark.skipif(not masked_adamw.available(DEVICE), reason="needs a GPU, or TRITON_INTERPRET=1")


def keep_mask(p, factors):
    """The keep mask of `p`, broadcastable to it, from keep vectors by dimension (kept where every one keeps)."""
    mask = torch.ones((), dtype=torch.bool, device=p.device)
    for dim, keep in factors.items():
        shape = [1] * p.dim()
        shape[dim] = -1
        mask = mask & keep.view(shape)
    return mask


def adamw_state(shape, seed):
    """A parameter, its gradient and moments (fp32), and its step count, as after a few AdamW steps."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    p, grad, m = (torch.randn(shape, device=DEVICE, generator=g) * s for s in (0.02, 1e-3, 1e-4))
    v = torch.rand(shape, device=DEVICE, generator=g) * 1e-6
    return p, grad, m, v, torch.tensor(3.0, device=DEVICE)


@needs_kernel
@pytest.mark.parametrize("shape,factors", [
    ((37, 19), {0: 0.5}), ((19, 37), {1: 0.5}), ((23, 41), {0: 0.6, 1: 0.3}), ((45,), {0: 0.5}),
    ((16, 64), {0: 0.0}), ((33, 17), {})])
def test_kernel_equals_the_compiled_update_and_never_touches_held_entries(shape, factors):
    """Rows held, columns held, both, a bias, every row held, nothing held; odd sizes (masked tile edges). The
    update agrees with `_adamw_under_mask` (eager) to float32 rounding; held entries stay bit-identical."""
    if DEVICE.type == "cuda":
        shape = tuple(n * 97 for n in shape)  # real sizes: many tiles, edges in both dimensions
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    vectors = {dim: torch.rand(shape[dim], device=DEVICE, generator=gen) < keep for dim, keep in factors.items()}
    hp = torch.tensor([[3e-4, 0.1, 0.9, 0.95, 1e-8]], dtype=torch.float64, device=DEVICE)
    ref, new = adamw_state(shape, 0), adamw_state(shape, 0)
    before = [t.clone() for t in ref[:4]]
    _adamw_under_mask(*([t] for t in ref[:4]), [keep_mask(ref[0], vectors)], [ref[4]], hp)
    assert masked_adamw.kernel_applies(*new[:4])
    rows, cols = (vectors.get(0), vectors.get(1)) if len(shape) == 2 else (None, vectors.get(0))
    masked_adamw.update_all(*([t] for t in new[:4]), [rows], [cols], [new[4]], hp)
    assert new[4].item() == ref[4].item() == 4.0
    held = ~keep_mask(ref[0], vectors).expand(shape)
    for name, a, b, b0 in zip(("p", "g", "m", "v"), ref[:4], new[:4], before):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9, msg=name)
        assert torch.equal(b[held], b0[held]), name
    if held.all():
        return
    assert not torch.equal(new[0][~held], before[0][~held])


@needs_kernel
def test_one_launch_updates_every_tensor_by_its_own_mask_step_and_settings():
    """Tensors of different shapes, masks, step counts and learning rates in one call: each equals its own
    reference update (the table sends every tile to its tensor)."""
    scale = 97 if DEVICE.type == "cuda" else 1
    cases = [((37 * scale, 19), {0: 0.5}), ((19, 37 * scale), {1: 0.5}), ((45 * scale,), {}),
             ((23, 41), {0: 0.6, 1: 0.3}), ((5, 3), {0: 0.0})]
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    refs, news, rows, cols = [], [], [], []
    for i, (shape, factors) in enumerate(cases):
        vectors = {d: torch.rand(shape[d], device=DEVICE, generator=gen) < keep for d, keep in factors.items()}
        ref, new = adamw_state(shape, i), adamw_state(shape, i)
        ref[4].fill_(i + 1.0)
        new[4].fill_(i + 1.0)
        refs.append((ref, keep_mask(ref[0], vectors)))
        news.append(new)
        r, c = (vectors.get(0), vectors.get(1)) if len(shape) == 2 else (None, vectors.get(0))
        rows.append(r)
        cols.append(c)
    hp = torch.tensor([[3e-4 * (i + 1), 0.1, 0.9, 0.95, 1e-8] for i in range(len(cases))], dtype=torch.float64,
                      device=DEVICE)
    for i, (ref, mask) in enumerate(refs):
        _adamw_under_mask(*([t] for t in ref[:4]), [mask], [ref[4]], hp[i:i + 1])
    masked_adamw.update_all(*([new[j] for new in news] for j in range(4)), rows, cols, [new[4] for new in news], hp)
    for (ref, _), new in zip(refs, news):
        assert new[4].item() == ref[4].item()
        for a, b in zip(ref[:4], new[:4]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
