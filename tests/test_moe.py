"""MoEFFN: grouped GEMMs against the per-expert loop and a dense reference, routers, capacity, losses."""
import pytest
import torch

from sparsetrain.nn.model import activate
from sparsetrain.nn.moe import MoEFFN, capacity_keep, load_balancing_loss, router_z_loss, token_choice


def make(activation="swiglu", bias=False, experts=6, top_k=2, **kw) -> MoEFFN:
    torch.manual_seed(0)
    m = MoEFFN(32, 16, experts, top_k, activation, bias=bias, **kw)
    with torch.no_grad():
        if bias:
            m.in_bias.normal_()
            m.out_bias.normal_()
    return m


def reference(m: MoEFFN, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then each token's chosen outputs summed with their weights."""
    E = m.num_experts
    h = torch.einsum("nd,edf->enf", x, m.w_in)
    if m.in_bias is not None:
        h = h + m.in_bias.view(E, 1, -1)
    y = torch.einsum("enf,efd->end", activate(h, m.activation), m.w_out)
    if m.out_bias is not None:
        y = y + m.out_bias.view(E, 1, -1)
    chosen = y[ids, torch.arange(x.shape[0])[:, None]]  # [N, k, d]
    return (chosen * weights.unsqueeze(-1)).sum(dim=1)


def grads(m, x, ids, weights, grouped):
    m.kernel = "grouped_mm" if grouped else "loop"
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    y = m.experts(x, ids, weights)
    y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
    return [y, x.grad, weights.grad] + [p.grad for p in m.parameters() if p.grad is not None]


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_loop_with_empty_experts_and_uneven_loads(activation, bias, dtype):
    m = make(activation, bias).to(dtype)
    assert m.grouped_mm_ok(dtype, torch.device("cpu"))
    N = 40
    x = torch.randn(N, 32, dtype=dtype)
    # Loads 40, 0, 37, 0, 0, 3: uneven, and experts 1, 3, 4 get no token.
    ids = torch.stack([torch.zeros(N, dtype=torch.long), torch.full((N,), 2)], dim=1)
    ids[:3, 1] = 5
    weights = torch.rand(N, 2)
    a, b = grads(m, x, ids, weights, True), grads(m, x, ids, weights, False)
    assert len(a) == len(b) == (7 if bias else 5)
    tol = dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, **tol)
    w_in_grad = a[3]
    assert torch.all(w_in_grad[[1, 3, 4]] == 0)  # experts without tokens get exactly zero gradient
    assert torch.all(w_in_grad[[0, 2, 5]].abs().sum((1, 2)) > 0)
    if dtype == torch.float32:
        torch.testing.assert_close(a[0], reference(m, x, ids, weights), atol=1e-5, rtol=1e-5)


def test_forward_matches_reference_through_the_router():
    m = make("gelu", bias=True, experts=8, top_k=3)
    x = torch.randn(2, 10, 32)
    logits = m.router_logits(x.view(-1, 32))
    ids, weights, _ = token_choice(logits, 3, "softmax_then_topk", True)
    torch.testing.assert_close(m(x).view(-1, 32), reference(m, x.view(-1, 32), ids, weights), atol=1e-5, rtol=1e-5)


def test_routers():
    logits = torch.randn(50, 6)
    ids, w, probs = token_choice(logits, 2, "softmax_then_topk", renormalize=False)
    torch.testing.assert_close(w, probs.gather(1, ids))
    assert torch.equal(ids, logits.topk(2).indices)
    _, w, _ = token_choice(logits, 2, "softmax_then_topk", renormalize=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    ids2, w2, _ = token_choice(logits, 2, "topk_then_softmax", renormalize=False)
    assert torch.equal(ids2, ids)
    torch.testing.assert_close(w2, logits.gather(1, ids).softmax(-1))
    torch.testing.assert_close(w2, w)  # the same function, written two ways


def test_expert_choice_gives_every_expert_exactly_its_capacity():
    m = make("gelu", bias=True, experts=4, top_k=2, router="expert_choice", capacity_factor=1.5)
    x = torch.randn(2, 20, 32)
    C = m.capacity(40)
    assert C == 30  # 1.5 * 40 * 2 / 4
    y = m(x)
    token_ids = m.routing["token_ids"]
    assert token_ids.shape == (4, C)
    assert all(len(set(row.tolist())) == C for row in token_ids)  # C distinct tokens per expert
    # Against the dense reference: each token gets the weighted outputs of the experts that took it.
    probs = m.router_logits(x.view(-1, 32)).softmax(-1)
    E, N = 4, 40
    taken = torch.zeros(N, E)
    taken[token_ids.flatten(), torch.arange(E).repeat_interleave(C)] = 1
    full = reference(m, x.view(-1, 32), torch.arange(E).expand(N, E), probs * taken)
    torch.testing.assert_close(y.view(-1, 32), full, atol=1e-5, rtol=1e-5)
    stats = m.stats()
    torch.testing.assert_close(stats["load"], torch.full((E,), 0.25))
    torch.testing.assert_close(stats["dropped"], 1 - (taken.sum(1) > 0).float().mean())


def test_capacity_keep_priority():
    # Capacity 2: expert 0 is the first choice of tokens 0, 1, 2 and the second choice of token 3.
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    keep = capacity_keep(ids, 3, capacity=2)
    # First choices of tokens 0 and 1 fill expert 0; token 2's first choice and token 3's second are dropped.
    # Expert 1 gets the first choice of token 3 before the second choices of tokens 0 and 1, so token 1's drops.
    assert keep.tolist() == [[True, True], [True, False], [False, True], [True, False]]


def test_dropped_tokens_pass_through_the_residual():
    m = make("swiglu", experts=4, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 10.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(1, 64, 32)
    x[0, :, 0] = x[0, :, 0].abs()
    y = m(x)[0]
    C = m.capacity(64)
    assert C == 8
    keep = m.routing["keep"][:, 0]
    assert keep.sum() == C and keep[:C].all()  # the first C tokens in order fill the expert
    assert torch.all(y[~keep] == 0)  # dropped: the layer adds nothing, x passes through the residual
    assert y[keep].abs().sum(-1).gt(0).all()
    torch.testing.assert_close(m.stats()["dropped"], torch.tensor(1 - C / 64))


def test_aux_loss_on_a_hand_made_routing():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    probs = logits.softmax(-1)
    counts = torch.tensor([2.0, 1.0, 1.0])  # top-1 choices: 0, 1, 2, 0
    f = counts / 4
    P = probs.mean(0)
    torch.testing.assert_close(load_balancing_loss(probs, counts), 3 * (f * P).sum())
    torch.testing.assert_close(router_z_loss(logits), (logits.exp().sum(-1).log() ** 2).mean())
    # Balanced routing and uniform probabilities give exactly 1.
    torch.testing.assert_close(load_balancing_loss(torch.full((6, 3), 1 / 3), torch.full((3,), 4.0)), torch.tensor(1.0))

    m = MoEFFN(3, 8, 3, 1, "gelu", aux_loss_coef=0.1, z_loss_coef=0.01)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(3))
    m(logits.view(1, 4, 3))
    expected = 0.1 * 3 * (f * P).sum() + 0.01 * router_z_loss(logits)
    torch.testing.assert_close(m.aux_loss, expected)
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0  # the loss trains the router
    s = m.stats()
    torch.testing.assert_close(s["load"], f)
    torch.testing.assert_close(s["entropy"], -(probs * probs.log()).sum(-1).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # per-expert loop, grouped GEMMs
def test_compiled_layer_sets_its_loss(dtype):
    """The loss is a module attribute set inside forward: it must come out of a compiled graph with its gradient,
    and the compiled backward must equal eager's."""
    m = make("swiglu", experts=4, top_k=2).to(dtype)
    x = torch.randn(2, 8, 32, requires_grad=True, dtype=dtype)
    results = []
    for layer in (m, torch.compile(m, backend="aot_eager", fullgraph=True)):
        m.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        (y.float().square().sum() + m.aux_loss).backward()
        results.append([y, m.aux_loss.detach(), x.grad] + [p.grad for p in m.parameters()])
    assert results[1][1] > 0
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_autocast_runs_experts_in_bf16():
    m = make("gelu", bias=True)
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float32  # the layer returns x's dtype
    torch.testing.assert_close(y, m(x), atol=5e-2, rtol=5e-2)
