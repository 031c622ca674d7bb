"""The Triton MoE kernels (`nn.kernels.moe_gemm`) against the reference paths: on the CPU through Triton's
interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU) at tiny shapes, on a GPU at real shapes."""
import pytest
import torch

pytest.importorskip("triton")
from test_moe import make  # noqa: E402
from test_ssd import as_moe, grads, make_model, ssd_layers, tokens  # noqa: E402

from sparsetrain.nn.kernels import moe_gemm  # noqa: E402
from sparsetrain.nn.moe import MoEFFN, choose_kernel, expert_linear, routing_plan  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not moe_gemm.available(DEVICE), reason="needs a GPU, or TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="real shapes need a GPU")


def routing(kind: str, N: int, E: int, k: int, seed: int = 0) -> torch.Tensor:
    """Expert ids [N, k] (distinct per token): `uneven` leaves experts empty, `one_expert` sends every token's
    first choice to expert 0, `all` is k = E."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    if kind == "uneven":  # experts 1 and 3 get nothing, expert 0 most
        ids = torch.stack([torch.randperm(E - 2, generator=g)[:k] for _ in range(N)])
        ids = torch.tensor([e for e in range(E) if e not in (1, 3)])[ids]
        ids[: N // 2, 0] = 0
        ids[: N // 2, 1:] = torch.where(ids[: N // 2, 1:] == 0, 2, ids[: N // 2, 1:])
    elif kind == "one_expert":
        ids[:, 0] = 0
        ids[:, 1:] = torch.where(ids[:, 1:] == 0, ids[:, :1].roll(1, 0) + 1, ids[:, 1:]) % E
        ids = ids[:, :1]
    return ids.to(DEVICE)


@pytest.mark.parametrize("kind,E,k", [("uneven", 8, 2), ("one_expert", 4, 1), ("all", 4, 4), ("random", 64, 8)])
def test_plan_is_the_stable_sort(kind, E, k):
    ids = routing(kind, 120 if DEVICE.type == "cpu" else 5000, E, k)
    fused, ref = routing_plan(ids, E, fused=True), routing_plan(ids, E, fused=False)
    for name in ("order", "inverse", "offs", "sorted_ids"):
        assert torch.equal(getattr(fused, name).long(), getattr(ref, name).long()), name


@pytest.mark.parametrize("gather,scatter", [(True, False), (False, True), (True, True), (False, False)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("K,M", [(24, 40), (32, 16)])
def test_expert_gemm_and_its_gradients_equal_the_loop(gather, scatter, k, K, M):
    """Odd widths (masks on every edge), an empty expert, one transposed (strided) weight; depths of a power of two
    (32 forward, 16 in the input gradient) go through the short-depth kernel."""
    torch.manual_seed(0)
    N, E = 21, 5
    ids = routing("random", N, E, k)
    ids[ids == 3] = 4 if k == 1 else ids[ids == 3]
    plans = {"triton": routing_plan(ids, E, fused=True), "loop": routing_plan(ids, E, fused=False)}
    x = torch.randn(N if gather else N * k, K, device=DEVICE)
    w = torch.randn(E, M, K, device=DEVICE).transpose(1, 2)  # [E, K, M], not contiguous
    dy = torch.randn(N * k, M, device=DEVICE)
    out = {}
    for kernel, plan in plans.items():
        xi, wi = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = expert_linear(xi, wi, plan, kernel, gather=gather, scatter=scatter)
        y.backward(dy)
        out[kernel] = (y, xi.grad, wi.grad)
    for a, b in zip(out["triton"], out["loop"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [16, 64, None])
@pytest.mark.parametrize("x_gather,dy_gather", [(True, False), (False, True)])
def test_weight_gradient_in_chunks_equals_each_experts_sum(chunk, x_gather, dy_gather):
    """The weight gradient sums each expert's rows in chunks (programs of the grid), then the chunks in order: an
    expert with 70 of the 180 rows (five chunks of 16), empty experts, chunks shorter than a row block (16), the
    default chunk; against x[rows of e]^T @ dy[rows of e] per expert."""
    torch.manual_seed(0)
    N, E, k, K, M = 90, 5, 2, 24, 40
    ids = routing("uneven", N, E, k)  # experts 1 and 3 empty, expert 0 the most rows
    plan = routing_plan(ids, E, fused=True)
    order, offs = plan.order, plan.offs
    x = torch.randn(N if x_gather else N * k, K, device=DEVICE)
    dy = torch.randn(N * k, M, device=DEVICE)
    dw = moe_gemm.launch_weight_grad(x, dy, order, offs, k if x_gather else 1, x_gather, dy_gather, chunk=chunk)
    src = (order.long() // k) if x_gather else torch.arange(N * k, device=DEVICE)
    dst = order.long() if dy_gather else torch.arange(N * k, device=DEVICE)
    starts = [0] + offs.long().tolist()[:-1]
    for e, (a, b) in enumerate(zip(starts, offs.long().tolist())):
        want = x[src[a:b]].T @ dy[dst[a:b]]
        torch.testing.assert_close(dw[e], want, atol=1e-4, rtol=1e-4, msg=f"expert {e}")


@pytest.mark.parametrize("activation,bias,kind,E,k", [
    ("swiglu", False, "uneven", 8, 2), ("gelu", True, "one_expert", 4, 1), ("relu2", False, "all", 4, 4)])
def test_moe_layer_through_the_kernels_equals_the_loop(activation, bias, kind, E, k):
    m = make(activation, bias, experts=E, top_k=k).to(DEVICE)
    N = 24
    x = torch.randn(N, 32, device=DEVICE)
    ids, weights = routing(kind, N, E, k), torch.rand(N, k, device=DEVICE)
    results = {}
    for kernel in ("triton", "loop"):
        m.kernel = kernel
        m.zero_grad(set_to_none=True)
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = m.experts(xi, ids, wi)
        y.backward(torch.randn_like(y, generator=torch.Generator(DEVICE.type).manual_seed(1)))
        results[kernel] = [y, xi.grad, wi.grad] + [p.grad for p in m.parameters() if p.grad is not None]
    assert len(results["triton"]) == len(results["loop"]) == (7 if bias else 5)
    for a, b in zip(results["triton"], results["loop"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation,bias,kind,E,k", [
    ("gelu", True, "uneven", 8, 2), ("relu2", False, "all", 4, 4), ("relu", True, "one_expert", 4, 1)])
def test_forward_only_epilogue_equals_the_loop(activation, bias, kind, E, k, monkeypatch):
    """Without autograd the first GEMM adds the bias and applies the activation in its epilogue, the second adds
    its bias and combines each token's rows (each kernel called once): the layer's output equals the loop's."""
    m = make(activation, bias, experts=E, top_k=k).to(DEVICE)
    N = 24
    x = torch.randn(N, 32, device=DEVICE)
    ids, weights = routing(kind, N, E, k), torch.rand(N, k, device=DEVICE)
    calls, combined = [], []
    fused, fused_combine = moe_gemm.expert_gemm_activated, moe_gemm.expert_output
    monkeypatch.setattr(moe_gemm, "expert_gemm_activated", lambda *a, **kw: calls.append(kw) or fused(*a, **kw))
    monkeypatch.setattr(moe_gemm, "expert_output",
                        lambda *a, **kw: combined.append(kw) or fused_combine(*a, **kw))
    out = {}
    with torch.no_grad():
        for kernel in ("triton", "loop"):
            m.kernel = kernel
            out[kernel] = m.experts(x, ids, weights)
    assert [c["activation"] for c in calls] == [activation] and (calls[0]["bias"] is not None) == bias
    assert len(combined) == 1 and (combined[0]["bias"] is not None) == bias
    torch.testing.assert_close(out["triton"], out["loop"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("K,bias", [(32, True), (24, False)])
def test_combined_gemm_equals_weighted_slot_rows(K, bias):
    """The second GEMM with the combine in it (short depth 32 and masked depth 24, an empty expert, a strided
    weight, a bias): each token's k rows weighted and summed, as the slot rows of the plain GEMM give them."""
    torch.manual_seed(0)
    N, E, k, M = 21, 5, 3, 40
    ids = routing("random", N, E, k)
    plan = routing_plan(ids, E, fused=True)
    a = torch.randn(N * k, K, device=DEVICE)  # sorted rows
    w = torch.randn(E, M, K, device=DEVICE).transpose(1, 2)
    b = torch.randn(E, M, device=DEVICE) if bias else None
    weights = torch.rand(N, k, device=DEVICE)
    y = moe_gemm.expert_output(a, w, plan.order, plan.offs, k, weights.flatten(), bias=b)
    slots = expert_linear(a, w, routing_plan(ids, E, fused=False), "loop", gather=False, scatter=True)
    if bias:
        slots = slots + b[ids.flatten()]
    assert y.dtype == torch.float32 and y.shape == (N, M)
    torch.testing.assert_close(y, (slots.view(N, k, M) * weights.unsqueeze(-1)).sum(dim=1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d", [32, 24])
def test_combined_gemm_gradients_equal_autograd_of_the_reference(d):
    """The combined second GEMM's backward (the rows' gradient and the combine weights' from one GEMM's epilogue,
    the weight gradient reading token rows scaled by the weights) against autograd of slot rows and a weighted
    sum; d = 32 runs the input-gradient GEMM in the short-depth kernel, d = 24 in the general one."""
    torch.manual_seed(0)
    N, E, k, f = 21, 5, 3, 40
    ids = routing("uneven", N, E, k)
    plan, ref_plan = routing_plan(ids, E, fused=True), routing_plan(ids, E, fused=False)
    a = torch.randn(N * k, f, device=DEVICE)
    w = torch.randn(E, d, f, device=DEVICE).transpose(1, 2)  # [E, f, d], strided
    weights = torch.rand(N, k, device=DEVICE)
    dy = torch.randn(N, d, device=DEVICE)
    out = {}
    for name in ("kernel", "reference"):
        ai, wi, gi = a.clone().requires_grad_(), w.detach().clone().requires_grad_(), weights.clone().requires_grad_()
        if name == "kernel":
            y = moe_gemm.expert_output(ai, wi, plan.order, plan.offs, k, gi.flatten())
        else:
            slots = expert_linear(ai, wi, ref_plan, "loop", gather=False, scatter=True).view(N, k, d)
            y = (slots * gi.unsqueeze(-1)).sum(dim=1)
        y.backward(dy)
        out[name] = (y, ai.grad, wi.grad, gi.grad)
    for x, ref in zip(out["kernel"], out["reference"]):
        torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)


def test_unit_combine_weights_change_nothing():
    """`unit` (every weight exactly 1, as SSD's straight-through gates are) skips the products by the weights: the
    output and all three gradients are bit-identical to the weighted path with weights of 1; a weight other than 1
    is then ignored (the caller's promise), so the flag must not be given for real router weights."""
    torch.manual_seed(0)
    N, E, k, f, d = 21, 5, 3, 40, 32
    ids = routing("uneven", N, E, k)
    plan = routing_plan(ids, E, fused=True)
    a, w = torch.randn(N * k, f, device=DEVICE), torch.randn(E, f, d, device=DEVICE)
    dy = torch.randn(N, d, device=DEVICE)
    out = {}
    for unit in (False, True):
        ai, wi = a.clone().requires_grad_(), w.clone().requires_grad_()
        gi = torch.ones(N * k, device=DEVICE, requires_grad=True)
        y = moe_gemm.expert_output(ai, wi, plan.order, plan.offs, k, gi, unit=unit)
        y.backward(dy)
        out[unit] = (y, ai.grad, wi.grad, gi.grad)
    for x, ref in zip(out[True], out[False]):
        assert torch.equal(x, ref)
    wi = w.clone().requires_grad_()
    y = moe_gemm.expert_output(a, wi, plan.order, plan.offs, k, torch.full((N * k,), 0.5, device=DEVICE), unit=True)
    y.backward(dy)
    assert torch.equal(y, out[True][0]) and torch.equal(wi.grad, out[True][2])


def test_capacity_drops_through_the_kernels():
    m = make("gelu", experts=4, top_k=2, capacity_factor=0.5).to(DEVICE)
    x = torch.randn(2, 12, 32, device=DEVICE)
    out = {}
    for kernel in ("triton", "loop"):
        m.kernel = kernel
        m.zero_grad(set_to_none=True)
        y = m(x)
        (y.square().sum() + m.aux_loss).backward()
        out[kernel] = [y] + [p.grad for p in m.parameters()]
    assert m.stats()["dropped"] > 0
    for a, b in zip(out["triton"], out["loop"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset,activation", [("tiny", "relu2"), ("tiny-llama", "swiglu")])
def test_ssd_views_through_the_kernels(preset, activation):
    """SSD's experts are strided views of the dense weights: the kernels take them as they are."""
    moe, _ = as_moe(make_model(preset, activation, n_layer=1).to(DEVICE), top_k=2)
    x, y = (t.to(DEVICE) for t in tokens(n=2))
    out = {}
    for kernel in ("triton", "loop"):
        for m in ssd_layers(moe):
            m.kernel = kernel
        out[kernel] = (moe(x, y).item(), grads(moe, x, y))
    assert out["triton"][0] == pytest.approx(out["loop"][0], abs=1e-5)
    for name, g in out["loop"][1].items():
        torch.testing.assert_close(out["triton"][1][name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("preset,activation", [("tiny", "relu2"), ("tiny-llama", "swiglu")])
def test_ssd_weight_gradients_arrive_in_the_parameters_layout(preset, activation):
    """The kernels hand back each expert weight's gradient in the layout of the view it was given, so the gradient
    that reaches each of SSD's dense weights has the parameter's own strides (else AccumulateGrad copies it)."""
    moe, _ = as_moe(make_model(preset, activation, n_layer=1).to(DEVICE), top_k=2)
    m = ssd_layers(moe)[0]
    m.kernel = "triton"
    seen = {}
    for name, p in (("fc", m.fc.weight), ("proj", m.proj.weight)):
        p.register_hook(lambda g, name=name: seen.setdefault(name, g.stride()) and None)
    x, y = (t.to(DEVICE) for t in tokens(n=2))
    moe(x, y).backward()
    assert seen == {"fc": m.fc.weight.stride(), "proj": m.proj.weight.stride()}


def test_ssd_views_forward_only_through_the_epilogue():
    """SSD's model run as an MoE for evaluation (gpt2 family: biases on the FFN views): the Triton path with the
    epilogue gives the loop's loss."""
    moe, _ = as_moe(make_model("tiny", "relu2", n_layer=1).to(DEVICE), top_k=2)
    assert ssd_layers(moe)[0].fc.bias is not None
    x, y = (t.to(DEVICE) for t in tokens(n=2))
    losses = {}
    with torch.no_grad():
        for kernel in ("triton", "loop"):
            for m in ssd_layers(moe):
                m.kernel = kernel
            losses[kernel] = moe(x, y).item()
    assert losses["triton"] == pytest.approx(losses["loop"], abs=1e-5)


def test_kernel_choice():
    m = make("gelu")
    assert choose_kernel(m, torch.float32, torch.device("cpu")) == "grouped_mm"
    m.kernel = "fast"
    with pytest.raises(ValueError, match="unknown MoE kernel 'fast'"):
        choose_kernel(m, torch.float32, torch.device("cpu"))
    m.kernel = "triton"
    with pytest.raises(ValueError, match="not torch.float64: choose kernel 'loop'"):
        choose_kernel(m, torch.float64, DEVICE)


def test_auto_takes_triton_for_forward_only_passes_and_narrow_experts_on_a_gpu(monkeypatch):
    """`auto` on a GPU in bf16: the Triton kernels without autograd (evaluation, inference) and in training for
    narrow experts (SSD's), grouped_mm in training for wide ones; on a CPU grouped_mm."""
    m = make("gelu")
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(moe_gemm, "available", lambda device: device.type == "cuda")
    monkeypatch.setattr(type(m), "grouped_mm_ok", lambda self, dtype, device: True)
    m.d_expert = 3072  # upcycled gpt2-small's experts
    assert choose_kernel(m, torch.bfloat16, gpu) == "grouped_mm"
    with torch.no_grad():
        assert choose_kernel(m, torch.bfloat16, gpu) == "triton"
        assert choose_kernel(m, torch.float32, gpu) == "grouped_mm"  # Triton's auto path: bf16 and fp16 only
        assert choose_kernel(m, torch.bfloat16, cpu) == "grouped_mm"
    m.d_expert = 256  # SSD's at gpt2-medium (16 experts)
    assert choose_kernel(m, torch.bfloat16, gpu) == "triton"
    assert choose_kernel(m, torch.float32, gpu) == "grouped_mm"
    assert choose_kernel(m, torch.bfloat16, cpu) == "grouped_mm"
    moe, _ = as_moe(make_model("tiny", "relu2", n_layer=1), top_k=2)
    layer = ssd_layers(moe)[0]
    assert layer.d_expert == layer.d_ff // layer.num_experts


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@gpu
@pytest.mark.parametrize("d,E,k,f,activation,kind", [
    (768, 8, 2, 1536, "gelu", "random"), (1024, 16, 4, 512, "swiglu", "uneven"), (768, 64, 8, 384, "relu2", "random"),
    (768, 8, 1, 3072, "gelu", "one_expert"), (512, 4, 4, 512, "gelu", "all"),
    (1024, 16, 4, 256, "relu2", "uneven")])  # SSD's experts at gpt2-medium: the short-depth kernel
def test_real_shapes_bf16_compiled_against_the_fp32_loop(d, E, k, f, activation, kind):
    """The compiled layer in bf16 through the kernels (no graph break: fullgraph) against the per-expert loop in
    fp32, outputs and every gradient within bf16 rounding."""
    torch._dynamo.reset()  # each case compiles anew: the cases together would pass dynamo's recompile limit
    torch.manual_seed(0)
    m = MoEFFN(d, f, E, k, activation).cuda()
    N = 8192
    x = torch.randn(N, d, device="cuda")
    ids, weights = routing(kind, N, E, k), torch.rand(N, k, device="cuda")
    dy = torch.randn(N, d, device="cuda")
    results = {}
    for kernel, dtype in (("triton", torch.bfloat16), ("loop", torch.float32)):
        layer = m.to(dtype)
        layer.kernel = kernel
        layer.zero_grad(set_to_none=True)
        xi, wi = x.to(dtype).requires_grad_(), weights.to(dtype).requires_grad_()
        run = torch.compile(layer.experts, fullgraph=True) if kernel == "triton" else layer.experts
        y = run(xi, ids, wi)
        y.backward(dy.to(dtype))
        results[kernel] = [y, xi.grad, wi.grad, layer.w_in.grad, layer.w_out.grad]
    for name, a, b in zip(["y", "x", "weights", "w_in", "w_out"], results["triton"], results["loop"]):
        assert relative_error(a, b) < 1e-2, name


@gpu
@pytest.mark.parametrize("d,E,k,f,activation,bias", [
    (1024, 16, 4, 256, "relu2", True), (768, 8, 2, 1536, "gelu", False), (256, 8, 2, 512, "relu", True)])
def test_real_shapes_forward_only_epilogue_against_the_fp32_loop(d, E, k, f, activation, bias):
    """Evaluation's path at real shapes: compiled, bf16, bias and activation in the first GEMM's epilogue (of the
    short-depth kernel at d = 256), against the per-expert loop in fp32."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = MoEFFN(d, f, E, k, activation, bias=bias).cuda()
    if bias:
        torch.nn.init.normal_(m.in_bias, 0.0, 0.02)
    N = 8192
    x = torch.randn(N, d, device="cuda")
    ids, weights = routing("random", N, E, k), torch.rand(N, k, device="cuda")
    out = {}
    with torch.no_grad():
        for kernel, dtype in (("triton", torch.bfloat16), ("loop", torch.float32)):
            layer = m.to(dtype)
            layer.kernel = kernel
            run = torch.compile(layer.experts, fullgraph=True) if kernel == "triton" else layer.experts
            out[kernel] = run(x.to(dtype), ids, weights.to(dtype))
    assert relative_error(out["triton"], out["loop"]) < 1e-2


@pytest.mark.parametrize("method,model", [
    ({"name": "upcycle"}, None),
    ({"name": "ssd", "schedule": "fixed", "sparse_windows": [[0.0, 1.0]], "monitor_every": 0},
     {"activation": "relu2"})])
def test_triton_kernel_option_where_it_cannot_run_is_a_user_error(method, model, make_config, tmp_path,
                                                                   monkeypatch):
    """method.kernel = "triton" where the kernels cannot run: one line before the first step, not a traceback."""
    from sparsetrain.errors import UserError
    from sparsetrain.training.loop import train

    monkeypatch.setattr(moe_gemm, "available", lambda device: False)
    with pytest.raises(UserError, match='method.kernel = "triton" needs a GPU'):
        train(make_config(method={**method, "kernel": "triton"}, model=model, steps=2), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
