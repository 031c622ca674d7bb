"""Sparse upcycling: the MoE starts as the dense model; Drop-Upcycling; the method's hooks and option checks."""
import copy

import pytest
import torch

from sparsetrain.config import ModelConfig
from sparsetrain.errors import UserError
from sparsetrain.methods import RunInfo
from sparsetrain.methods.upcycle import Upcycle, moe_layers, upcycle
from sparsetrain.nn.model import Transformer, flops_per_token, resolve
from sparsetrain.nn.moe import MoEFFN


def dense_model(preset: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(resolve(ModelConfig(preset=preset), vocab_size=64))
    with torch.no_grad():  # trained-looking biases, so that copying them is tested too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("granularity,experts,top_k", [(1, 4, 1), (1, 4, 2), (2, 8, 2), (2, 4, 4)])
@pytest.mark.parametrize("router", ["softmax_then_topk", "topk_then_softmax"])
def test_upcycled_model_computes_the_dense_function(preset, granularity, experts, top_k, router):
    dense = dense_model(preset)
    idx = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        expected = dense(idx)
        moe = upcycle(copy.deepcopy(dense), experts=experts, top_k=top_k, granularity=granularity, layers="all",
                      router=router)
        assert len(moe_layers(moe)) == 2
        torch.testing.assert_close(moe(idx), expected, atol=2e-5, rtol=2e-5)


def test_every_other_layer_and_everything_else_copied():
    dense = dense_model("tiny-llama")
    dense.args.n_layer = 4  # resolve layers against 4 blocks
    dense.blocks.append(copy.deepcopy(dense.blocks[0]))
    dense.blocks.append(copy.deepcopy(dense.blocks[1]))
    moe = upcycle(copy.deepcopy(dense), experts=4, top_k=2)
    assert [isinstance(b.mlp, MoEFFN) for b in moe.blocks] == [False, True, False, True]
    moe_params = dict(moe.named_parameters())
    for name, p in dense.named_parameters():
        if name in moe_params:
            assert torch.equal(p, moe_params[name]), name
    assert moe.blocks[1].mlp.router.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_virtual_groups_tie_router_rows():
    moe = upcycle(dense_model("tiny"), experts=8, top_k=4, granularity=4, layers=[0])
    w = moe.blocks[0].mlp.router.weight
    assert torch.equal(w[0], w[3]) and torch.equal(w[4], w[7]) and not torch.equal(w[0], w[4])


def test_unnormalised_router_scales_experts_by_the_expected_weight():
    dense = dense_model("tiny")
    moe = upcycle(copy.deepcopy(dense), experts=8, top_k=2, layers=[1], renormalize=False)
    ffn, m = dense.blocks[1].mlp, moe.blocks[1].mlp
    torch.testing.assert_close(m.w_out[3], ffn.proj.weight.t() * 4.0)  # E / k
    torch.testing.assert_close(m.out_bias.view(8, -1)[3], ffn.proj.bias * 4.0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_drop_upcycling_redraws_exactly_the_chosen_neurons(preset):
    dense = dense_model(preset)
    G, E, rate = 2, 4, 0.5
    moe = upcycle(copy.deepcopy(dense), experts=E, top_k=2, granularity=G, layers=[1], drop_rate=rate, seed=3)
    fresh = upcycle(copy.deepcopy(dense), experts=E, top_k=2, granularity=G, layers=[1], seed=3)
    m, ref = moe.blocks[1].mlp, fresh.blocks[1].mlp
    f = m.d_expert
    gated = m.activation == "swiglu"
    chosen = []
    for e in range(E):
        w_in, w_ref = m.w_in[e], ref.w_in[e]
        parts = [(w_in[:, :f], w_ref[:, :f]), (w_in[:, f:], w_ref[:, f:])] if gated else [(w_in, w_ref)]
        changed_in = [(a != b).any(0) for a, b in parts]
        changed_out = (m.w_out[e] != ref.w_out[e]).any(1)
        for c in changed_in:
            assert torch.equal(c, changed_out)  # the same neurons in every matrix
        assert changed_out.sum().item() == round(rate * f)
        chosen.append(changed_out)
        for a, b in parts + [(m.w_out[e], ref.w_out[e])]:  # redrawn from the matrix's own statistics
            assert a.mean().item() == pytest.approx(b.mean().item(), abs=0.2 * b.std().item())
            assert a.std().item() == pytest.approx(b.std().item(), rel=0.15)
    assert not torch.equal(chosen[0], chosen[2])  # copies of one shard differ: the symmetry is broken


def test_method_setup_builds_the_structure_and_loads_an_upcycled_checkpoint():
    dense = dense_model("tiny-llama")
    options = {"name": "upcycle", "experts": 4, "top_k": 2, "layers": [0, 1], "aux_loss_coef": 0.01}
    method = Upcycle.from_config(options, dense.args, seq_len=32)
    upcycled = method.convert(copy.deepcopy(dense))
    state = upcycled.state_dict()

    fresh = Transformer(dense.args)
    method.setup(fresh)
    assert all(isinstance(b.mlp, MoEFFN) for b in fresh.blocks)
    fresh.load_state_dict(state)  # same keys and shapes
    method.setup(fresh)  # a second setup keeps the loaded experts
    assert torch.equal(fresh.blocks[0].mlp.w_in, upcycled.blocks[0].mlp.w_in)

    method.start(fresh, None, RunInfo())
    idx = torch.randint(0, 64, (2, 16))
    loss = fresh(idx, idx) + method.aux_loss(fresh)
    loss.backward()
    assert fresh.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    metrics = method.metrics(0)
    assert set(metrics) == {"moe_load_imbalance", "moe_dropped", "moe_router_entropy", "moe_lb_loss", "moe_z_loss",
                            "moe_aux_loss"}
    assert metrics["moe_load_imbalance"] >= 1.0 and metrics["moe_dropped"] == 0.0
    assert metrics["moe_aux_loss"] == pytest.approx(method.aux_loss(fresh).item())


def test_flops_count_the_active_experts():
    args = resolve(ModelConfig(preset="tiny"), vocab_size=64)
    dense = 3 * sum(flops_per_token(args, 32).values())
    ffn = 3 * flops_per_token(args, 32)["ffn"] / args.n_layer
    router = 3 * 2 * args.d_model * 8

    def flops(**kw):
        return Upcycle.from_config({"experts": 8, **kw}, args, 32).flops_per_token(0)

    assert flops(top_k=1, layers="all") == pytest.approx(dense + 2 * router)
    assert flops(top_k=2) == pytest.approx(dense + ffn + router)  # one MoE layer (block 1), two experts
    assert flops(top_k=2, granularity=2) == pytest.approx(dense + router)  # two half-width experts
    assert flops(top_k=1, router="expert_choice", capacity_factor=2.0) == pytest.approx(dense + ffn + router)


@pytest.mark.parametrize("bad", [
    {"experts": 1},
    {"top_k": 0},
    {"top_k": 9},
    {"granularity": 3},  # does not divide d_ff=512
    {"granularity": 2, "top_k": 1},  # top-k must pick whole virtual groups
    {"drop_rate": 1.0},
    {"router": "hash"},
    {"router": "expert_choice"},  # needs a capacity factor
    {"capacity_factor": -1.0},
    {"layers": [2]},
    {"layers": []},
    {"layers": "odd"},
    {"experts": "8"},
    {"kernel": "cuda"},
    {"unknown_key": 1},
])
def test_bad_options_raise_user_error(bad):
    args = resolve(ModelConfig(preset="tiny"), vocab_size=64)
    with pytest.raises(UserError):
        Upcycle.from_config({"experts": 8, "top_k": 2, **bad}, args, 32)
