"""frozen.FrozenSlices: the masked AdamW update holds omitted slices exactly and updates the rest as AdamW does."""
import copy

import pytest
import torch

from sparsetrain.methods.frozen import FrozenSlices, SliceStash


def setup(seed=0, optimizer=torch.optim.AdamW):
    """Three parameters (rows, columns, a bias) of a module stepped twice by AdamW (moments exist), and gradients
    for a third step."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(12, 5)), torch.nn.Parameter(torch.randn(5, 12)),
              torch.nn.Parameter(torch.randn(12))]
    opt = optimizer([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                    lr=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if _ < 2:
            opt.step()
    return params, opt


OMITTED = [(0, torch.tensor([1, 4, 7])), (1, torch.tensor([0, 2, 11])), (0, torch.tensor([3, 4]))]


def step(params, opt, how, compiled=False):
    """One optimizer step holding OMITTED: "stash" (SliceStash), "mask" (FrozenSlices)."""
    if how == "stash":
        stash = SliceStash(opt)
        for p, (dim, idx) in zip(params, OMITTED):
            stash.save(p, dim, idx)
        opt.step()
        stash.restore()
        return
    frozen = FrozenSlices(opt, compiled=compiled)
    for p, (dim, idx) in zip(params, OMITTED):
        frozen.freeze(p, dim, idx)
    assert len(frozen.keep) == (3 if how == "mask" else 0)
    frozen.before_step()
    assert all(p.grad is None for p in frozen.keep)
    opt.step()
    frozen.after_step()


def snapshot(params, opt):
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]


def test_masked_update_is_bit_identical_to_stash_step_restore():
    a, opt_a = setup()
    b, opt_b = setup()
    before = snapshot(a, opt_a)
    step(a, opt_a, "stash")
    step(b, opt_b, "mask")
    for (pa, sa), (pb, sb), (p0, s0), (dim, idx) in zip(snapshot(a, opt_a), snapshot(b, opt_b), before, OMITTED):
        assert torch.equal(pa, pb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert sb["step"].item() == s0["step"].item() + 1
        # omitted entries untouched, kept ones moved
        assert torch.equal(pb.index_select(dim, idx), p0.index_select(dim, idx))
        assert torch.equal(sb["exp_avg"].index_select(dim, idx), s0["exp_avg"].index_select(dim, idx))
        assert not torch.equal(pb, p0)


def test_compiled_masked_update_matches_the_reference_within_rounding():
    a, opt_a = setup()
    b, opt_b = setup()
    before = snapshot(a, opt_a)
    step(a, opt_a, "mask")
    step(b, opt_b, "mask", compiled=True)
    for (pa, sa), (pb, sb), (p0, s0), (dim, idx) in zip(snapshot(a, opt_a), snapshot(b, opt_b), before, OMITTED):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7)
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-8)
        assert torch.equal(pb.index_select(dim, idx), p0.index_select(dim, idx))
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sb[k].index_select(dim, idx), s0[k].index_select(dim, idx))


def test_two_freezes_of_one_parameter_hold_both():
    params, opt = setup()
    p = params[0]
    before = p.detach().clone()
    frozen = FrozenSlices(opt, compiled=False)
    frozen.freeze(p, 0, torch.tensor([2]))
    frozen.freeze(p, 1, torch.tensor([3]))
    frozen.before_step()
    opt.step()
    frozen.after_step()
    assert torch.equal(p[2], before[2]) and torch.equal(p[:, 3], before[:, 3])
    assert not torch.equal(p[0, 0], before[0, 0])


@pytest.mark.parametrize("case", ["first-step", "sgd", "off"])
def test_where_the_mask_does_not_apply_the_stash_holds(case):
    """A parameter without moments yet (its first step), an optimizer other than AdamW, or masked=False: stashed,
    and still held exactly."""
    if case == "first-step":
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(12, 5))]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        params[0].grad = torch.randn(12, 5)
    else:
        params, opt = setup(optimizer=torch.optim.AdamW if case == "off" else torch.optim.SGD)
        params = params[:1]
    before = params[0].detach().clone()
    frozen = FrozenSlices(opt, compiled=False, masked=case != "off")
    frozen.freeze(params[0], 0, torch.tensor([1, 4]))
    assert not frozen.keep
    frozen.before_step()
    opt.step()
    frozen.after_step()
    assert torch.equal(params[0][[1, 4]], before[[1, 4]])
    assert not torch.equal(params[0][0], before[0])


def test_held_grads_are_released():
    params, opt = setup()
    frozen = FrozenSlices(opt, compiled=False)
    model_like = copy.copy(params)
    for p, (dim, idx) in zip(model_like, OMITTED):
        frozen.freeze(p, dim, idx)
    frozen.before_step()
    opt.step()
    frozen.after_step()
    assert not frozen.keep and not frozen.grads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's fused AdamW and compiled update")
def test_on_the_gpu_the_compiled_masked_update_matches_fused_adamw_at_real_shapes():
    """gpt2-medium's sliced matrices (rows and columns), fused AdamW, three steps with half the rows (columns)
    omitted each: the compiled masked update trains what stash + fused step + restore trains, within float32
    rounding (its arithmetic is its own, not the fused kernel's)."""
    shapes = [((4096, 1024), 0), ((1024, 4096), 1), ((3072, 1024), 0), ((1024, 1024), 1)]
    runs = []
    for how in ("stash", "mask"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s, _ in shapes]
        opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, fused=True)
        for k in range(4):
            gen = torch.Generator(device="cuda").manual_seed(k)
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-3
            if k == 0:
                opt.step()  # the moments exist from here
                continue
            idx = [torch.randperm(p.shape[d], device="cuda", generator=gen)[: p.shape[d] // 2].sort().values
                   for p, (_, d) in zip(params, shapes)]
            frozen = FrozenSlices(opt, compiled=True, masked=how == "mask")
            for p, (_, d), i in zip(params, shapes, idx):
                frozen.freeze(p, d, i)
            assert len(frozen.keep) == (len(params) if how == "mask" else 0)
            frozen.before_step()
            opt.step()
            frozen.after_step()
        runs.append(snapshot(params, opt))
    for (pa, sa), (pb, sb) in zip(*runs):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-7)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-9)
