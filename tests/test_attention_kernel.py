"""Causal attention's backend choice (`train.attention_kernel`, `nn.model.causal_attention`): every choice computes
what PyTorch's own order computes, traces without a graph break, and reaches every layer; on a GPU, cuDNN's attention
at the presets' shapes against the math backend on fp32 copies, and the compiled model with it against
FlashAttention."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparsetrain import config
from sparsetrain.errors import UserError
from sparsetrain.nn import model as model_mod
from sparsetrain.training.build import build_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="cuDNN's attention needs a GPU")


def loss_and_grads(model, idx):
    model.zero_grad()
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_every_kernel_reaches_every_layer_and_computes_the_same(tiny_data):
    """The trainer's setting is set on each layer; on the CPU (one backend) every choice gives the same loss and
    gradients, bit for bit."""
    cfg = config.from_dict(tiny_config(tiny_data, attention_kernel="flash"))
    model, _, args = build_model(cfg, 512)
    assert model.attention_kernel == "flash" and {b.attn.kernel for b in model.blocks} == {"flash"}
    idx = torch.randint(0, args.vocab_size, (2, 33))
    results = {}
    for kernel in model_mod.ATTENTION_KERNELS:
        model.attention_kernel = kernel
        results[kernel] = loss_and_grads(model, idx)
    for kernel, (loss, grads) in results.items():
        assert torch.equal(loss, results["torch"][0]), kernel
        for name, g in grads.items():
            assert torch.equal(g, results["torch"][1][name]), (kernel, name)


def test_the_preference_traces_without_a_graph_break():
    """torch.compile traces the backend order into the graph (fullgraph: a break would raise), and the order set
    for the call is the one in force outside it afterwards."""
    q, k, v = (torch.randn(2, 4, 256, 16) for _ in range(3))
    before = torch._C._get_sdp_priority_order()
    traced = torch.compile(model_mod.causal_attention, backend="eager", fullgraph=True)
    for kernel in model_mod.ATTENTION_KERNELS:
        torch.testing.assert_close(traced(q, k, v, False, kernel), F.scaled_dot_product_attention(q, k, v,
                                                                                                    is_causal=True))
    assert torch._C._get_sdp_priority_order() == before


def test_bad_attention_kernels_are_errors(tiny_data):
    with pytest.raises(UserError, match="train.attention_kernel must be torch, cudnn or flash"):
        config.from_dict(tiny_config(tiny_data, attention_kernel="fa3"))
    model, _, _ = build_model(config.from_dict(tiny_config(tiny_data)), 512)
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        model.attention_kernel = "fa3"


@gpu
@pytest.mark.parametrize("heads,kv_heads,seq", [(12, 12, 1024), (16, 16, 1024), (32, 8, 1024), (16, 16, 4096)])
def test_cudnn_attention_against_the_math_backend(heads, kv_heads, seq):
    """GPT-2 small and medium's heads, Llama 3.2 1B's grouped ones, a long sequence: output and the gradients of q,
    k, v cut from one projection (the model's strides) within bf16 tolerance of fp32 math, as FlashAttention is."""
    torch.manual_seed(0)
    d, batch = 64, 16384 // seq
    qkv = torch.randn(batch, seq, (heads + 2 * kv_heads) * d, device=DEVICE).to(torch.bfloat16)
    grad = torch.randn(batch, heads, seq, d, device=DEVICE).to(torch.bfloat16)

    def run(x, backend):
        x = x.detach().requires_grad_()
        q, k, v = x.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k, v = (t.view(batch, seq, -1, d).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
        out.backward(grad.to(out.dtype))
        return out.float(), x.grad.float()

    ref_out, ref_grad = run(qkv.float(), SDPBackend.MATH)
    errors = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        out, g = run(qkv, backend)
        errors[backend] = ((out - ref_out).abs().max().item(), (g - ref_grad).abs().max().item())
    cudnn, flash = errors[SDPBackend.CUDNN_ATTENTION], errors[SDPBackend.FLASH_ATTENTION]
    assert cudnn[0] <= 2 * flash[0] + 1e-3 and cudnn[1] <= 2 * flash[1] + 1e-3, errors


@gpu
def test_compiled_model_with_cudnn_attention_matches_flash():
    """gpt2-small's shape, compiled: the loss and gradients with cuDNN's attention against FlashAttention's within
    bf16 tolerance, and cuDNN's kernels are the ones that ran."""
    cfg = config.from_dict({"model": {"preset": "gpt2-small", "vocab_size": 50304, "n_layer": 2},
                            "train": {"seq_len": 1024, "batch_size": 4}})
    model, _, args = build_model(cfg, None)
    model.to(DEVICE)
    idx = torch.randint(0, args.vocab_size, (4, 1025), device=DEVICE)
    results = {}
    for kernel in ("flash", "cudnn"):
        model.attention_kernel = kernel
        torch._dynamo.reset()
        step = torch.compile(model)
        with torch.autocast("cuda", torch.bfloat16), torch.profiler.profile() as prof:
            model.zero_grad()
            loss = step(idx[:, :-1], idx[:, 1:])
            loss.backward()
        names = " ".join(e.name for e in prof.events()).lower()
        results[kernel] = loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}, names
    assert "cudnn" in results["cudnn"][2] and "cudnn" not in results["flash"][2]
    torch.testing.assert_close(results["cudnn"][0], results["flash"][0], rtol=1e-3, atol=1e-3)
    for name, g in results["flash"][1].items():
        torch.testing.assert_close(results["cudnn"][1][name], g, rtol=5e-2, atol=5e-3, msg=name)
