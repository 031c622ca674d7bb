"""SSD: the MoE is the dense FFN permuted (forward, gradients, optimizer moments), clustering, ARI, the switching
policy, only chosen experts computed and updated, training end to end, resume, conversions, generation."""
import copy
import json

import pytest
import torch
from helpers import make_method, make_optimizer, random_batch, seeded_model
from helpers import start as start_method

import sparsetrain.store.checkpoint as ckpt_mod
from sparsetrain.cli.convert import densify_checkpoint, moefy_checkpoint
from sparsetrain.cli.generate import generate_both
from sparsetrain.data.batches import TrainingData
from sparsetrain.errors import UserError
from sparsetrain.methods.ssd.cluster import (adjusted_rand_index, balanced_assign, balanced_kmeans, cluster_neurons,
                                             contiguous_labels)
from sparsetrain.methods.ssd.ffn import fit_router, neuron_rows, permute_ffn_, router_centroids, ssd_layers
from sparsetrain.methods.ssd.method import SSD
from sparsetrain.methods.ssd.moefy import fit_routers, moefy_, prepare_moe, run_as_moe, run_dense, stored_order
from sparsetrain.methods.ssd.monitor import Check, Monitor
from sparsetrain.nn.generate import generate
from sparsetrain.training.build import load_model
from sparsetrain.training.loop import evaluate, train
from sparsetrain.training.runtime import setup_runtime

VOCAB, T, B = 64, 16, 4
PRESETS = [("tiny", "relu2"), ("tiny", "relu"), ("tiny-llama", "swiglu")]


def make_model(preset="tiny", activation="relu2", seed=0, **overrides):
    model = seeded_model(preset, VOCAB, seed, activation=activation, **overrides)
    with torch.no_grad():  # trained-looking biases, so that they are tested too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def make_ssd(model, total_steps=20, **options):
    return make_method(SSD, model, T, total_steps, **{"experts": 4, "top_k": 2, **options})


def tokens(n=B, seed=1):
    return random_batch(VOCAB, n, T, torch.Generator().manual_seed(seed))


def grads(model, x, y):
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# --- the MoE is the dense FFN --------------------------------------------------------------------------------------
def as_moe(dense, top_k, experts=4, **kw):
    """A copy of `dense` run as an MoE, and the neuron order of each layer (new neuron i = old neuron order[i])."""
    model = copy.deepcopy(dense)
    orders = moefy_(model, experts)
    layout = [torch.arange(m.d_ff) // (m.d_ff // experts) for m in ssd_layers(model)]
    return run_as_moe(model, top_k, experts, clustering=layout, **kw), orders  # already laid out: no new order


@pytest.mark.parametrize("preset,activation", PRESETS)
@pytest.mark.parametrize("grouped", [True, False])
def test_all_experts_active_is_the_dense_ffn_forward_and_gradients(preset, activation, grouped):
    dense = make_model(preset, activation)
    x, y = tokens()
    ref_loss, ref = dense(x, y).item(), grads(dense, x, y)
    for router_grad in (False, True):
        moe, orders = as_moe(dense, top_k=4, router_grad=router_grad)
        for m in ssd_layers(moe):
            m.kernel = "grouped_mm" if grouped else "loop"
        assert moe(x, y).item() == pytest.approx(ref_loss, abs=1e-5)
        g = grads(moe, x, y)
        # Undo the permutation to compare neuron by neuron.
        for i, order in enumerate(orders):
            ffn = dense.blocks[i].mlp
            for name, rows in [("fc.weight", ffn.in_rows(order)), ("fc.bias", ffn.in_rows(order))]:
                key = f"blocks.{i}.mlp.{name}"
                if key in g:
                    g[key] = g[key][rows.argsort()]
            key = f"blocks.{i}.mlp.proj.weight"
            g[key] = g[key][:, order.argsort()]
        last = f"blocks.{len(orders) - 1}.mlp."
        for name in ref:
            # The straight-through gate sends a gradient into the router's input, hence into every earlier
            # parameter; what lies after the last router (the last FFN's weights, the head) is unchanged.
            if not router_grad or name.startswith((last, "norm.")) or (name == "lm_head.weight"
                                                                       and not dense.args.tie_embeddings):
                torch.testing.assert_close(g[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
        if router_grad:
            assert not torch.allclose(g["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"], atol=1e-6)


@pytest.mark.parametrize("preset,activation", PRESETS)
def test_dense_moe_dense_is_exact(preset, activation):
    dense = make_model(preset, activation)
    x, _ = tokens()
    with torch.no_grad():
        ref = dense(x)
        model = copy.deepcopy(dense)
        orders = moefy_(model, 4)
        for m, ref_m, order in zip(ssd_layers(model), dense.blocks, orders):
            ref_m = ref_m.mlp
            assert sorted(order.tolist()) == list(range(ref_m.d_ff))
            assert torch.equal(m.fc.weight, ref_m.fc.weight[ref_m.in_rows(order)])  # gate and up together
            assert torch.equal(m.proj.weight, ref_m.proj.weight[:, order])
            if m.fc.bias is not None:
                assert torch.equal(m.fc.bias, ref_m.fc.bias[ref_m.in_rows(order)])
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)  # permuted dense
        run_as_moe(model, 2, 4, clustering=[torch.arange(m.d_ff) // (m.d_ff // 4) for m in ssd_layers(model)])
        assert not torch.allclose(model(x), ref, atol=1e-3)  # top-2 of 4: an approximation
        run_dense(model)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        # Undoing the permutation gives back the exact weights.
        for m, order in zip(ssd_layers(model), orders):
            permute_ffn_(m, order.argsort())
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))


@pytest.mark.parametrize("preset,activation", [("tiny", "relu2"), ("tiny-llama", "swiglu")])
def test_optimizer_moments_follow_their_neurons(preset, activation):
    model = make_model(preset, activation)
    opt = make_optimizer(model)
    x, y = tokens()
    model(x, y).backward()
    opt.step()
    ffn = model.blocks[1].mlp
    d_ff = ffn.d_ff
    before = {name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in
              [("fc", ffn.fc.weight), ("proj", ffn.proj.weight)]}
    order = torch.randperm(d_ff, generator=torch.Generator().manual_seed(0))
    permute_ffn_(ffn, order, opt)
    j = int(order[5])  # the neuron now at position 5
    for key in ("exp_avg", "exp_avg_sq"):
        fc_now, fc_then = opt.state[ffn.fc.weight][key], before["fc"][key]
        assert torch.equal(fc_now[5], fc_then[j])
        if ffn.activation == "swiglu":
            assert torch.equal(fc_now[d_ff + 5], fc_then[d_ff + j])  # the up row moves with its gate row
        assert torch.equal(opt.state[ffn.proj.weight][key][:, 5], before["proj"][key][:, j])
    assert torch.equal(opt.state[ffn.fc.weight]["step"], before["fc"]["step"])
    # The next step is the step the unpermuted model would take, permuted.
    ref = make_model(preset, activation)
    ref_opt = make_optimizer(ref)
    ref(x, y).backward()
    ref_opt.step()
    for o, m in ((opt, model), (ref_opt, ref)):
        o.zero_grad()
        m(x, y).backward()
        o.step()
    ref_ffn = ref.blocks[1].mlp
    torch.testing.assert_close(ffn.fc.weight, ref_ffn.fc.weight[ref_ffn.in_rows(order)], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("preset,activation", [("tiny", "relu2"), ("tiny-llama", "swiglu")])
def test_switching_without_a_step_keeps_the_dense_loss(preset, activation):
    model = make_model(preset, activation)
    x, y = tokens()
    method = make_ssd(model, schedule="fixed", sparse_windows=[[0.5, 1.0]], monitor_every=0)
    opt = make_optimizer(model)
    method.setup(model)
    start_method(method, model, opt)
    with torch.no_grad():
        dense_loss, dense_logits = model(x, y).item(), model(x)
        method.before_step(10)  # into the sparse window: cluster, permute, route
        assert method.phase == "sparse" and method.switches == 1
        sparse_logits = model(x)
        method.switch_to_dense(10)
        after_loss, after_logits = model(x, y).item(), model(x)
    assert after_loss == pytest.approx(dense_loss, abs=1e-6)
    torch.testing.assert_close(after_logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert (sparse_logits - dense_logits).abs().max() > 1e-3  # the sparse approximation itself
    order = method.order
    assert not torch.equal(order, torch.arange(model.args.d_ff).expand_as(order))


def test_sparse_step_computes_and_updates_only_chosen_experts():
    model = make_model("tiny", "relu2")
    x, y = tokens()
    method = make_ssd(model, schedule="fixed", sparse_windows=[[0.0, 1.0]], monitor_every=0, top_k=1)
    opt = make_optimizer(model)
    method.setup(model)
    start_method(method, model, opt)
    model(x, y).backward()  # moments for every parameter, so that AdamW would move idle ones
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.before_step(0)
    layer = method.layers[1]
    d = model.args.d_model
    with torch.no_grad():  # every token of this layer picks expert 2
        layer.centroids.copy_(torch.zeros(4, d))
        layer.centroids[2] = 1.0
    f = layer.d_ff // 4
    chosen = torch.arange(2 * f, 3 * f)
    idle = torch.cat([torch.arange(0, 2 * f), torch.arange(3 * f, 4 * f)])
    # Positive inputs to that FFN, so that the scores order the experts the same way for every token.
    handle = model.blocks[1].norm2.register_forward_hook(lambda m, a, out: out.abs() + 0.1)
    model(x, y).backward()
    handle.remove()
    assert layer.load.tolist() == [0.0, 0.0, x.numel(), 0.0]
    with torch.no_grad():  # an evaluation or inference pass is not counted: only a training step updates experts
        model(x, y)
    assert layer.load.tolist() == [0.0, 0.0, x.numel(), 0.0]
    assert (layer.fc.weight.grad[idle] == 0).all() and (layer.fc.bias.grad[idle] == 0).all()
    assert (layer.proj.weight.grad[:, idle] == 0).all()
    assert (layer.fc.weight.grad[chosen] != 0).any() and (layer.proj.weight.grad[:, chosen] != 0).any()
    before = layer.fc.weight.detach().clone(), layer.proj.weight.detach().clone()
    moments = opt.state[layer.fc.weight]["exp_avg"].clone()
    method.before_optimizer(0)
    opt.step()
    method.after_optimizer(0)
    assert torch.equal(layer.fc.weight[idle], before[0][idle])  # no momentum, no weight decay
    assert torch.equal(layer.proj.weight[:, idle], before[1][:, idle])
    assert torch.equal(opt.state[layer.fc.weight]["exp_avg"][idle], moments[idle])
    assert not torch.equal(layer.fc.weight[chosen], before[0][chosen])


# --- clustering ------------------------------------------------------------------------------------------------------
def test_balanced_kmeans_equal_sizes_deterministic_and_warm_start():
    model = make_model("tiny-llama", "swiglu")
    rows = neuron_rows(model.blocks[0].mlp)  # 352 neurons
    a = cluster_neurons(rows, 8, 5, seed=3)
    b = cluster_neurons(rows, 8, 5, seed=3)
    assert torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels, minlength=8).tolist() == [44] * 8
    # From its own result, the warm start is at least as good and wins the tie.
    c = cluster_neurons(rows, 8, 5, seed=4, warm=a.centroids)
    assert c.score >= a.score - 1e-6
    # Balanced assignment is greedy by similarity: every row gets its best cluster when capacity allows.
    sim = torch.eye(4).repeat_interleave(3, dim=0)  # rows 0-2 like cluster 0, ...
    assert balanced_assign(sim, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.bincount(balanced_assign(torch.randn(60, 5), 12)).tolist() == [12] * 5


def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=1)
    labels = torch.arange(64) // 16
    rows = torch.nn.functional.normalize(centers[labels] + 0.05 * torch.randn(64, 32, generator=g), dim=1)
    shuffle = torch.randperm(64, generator=g)
    found = cluster_neurons(rows[shuffle], 4, 10, seed=0)
    assert torch.bincount(found.labels).tolist() == [16] * 4
    assert adjusted_rand_index(found.labels, labels[shuffle]) == pytest.approx(1.0)


def test_adjusted_rand_index_known_values():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a) == 1.0
    assert adjusted_rand_index(a, torch.tensor([5, 5, 3, 3, 9, 9])) == 1.0  # renamed
    assert adjusted_rand_index(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 2])) == pytest.approx(4 / 7)
    g = torch.Generator().manual_seed(0)
    independent = [adjusted_rand_index(torch.randint(0, 8, (4000,), generator=g),
                                       torch.randint(0, 8, (4000,), generator=g)) for _ in range(5)]
    assert abs(sum(independent) / 5) < 0.01


def test_light_check_reclusters_from_the_last_centroids_only():
    model = make_model("tiny", "relu2")
    x, _ = tokens(8)
    monitor = Monitor(4, 2, iters=10, light_iters=2, seed=0)
    full = monitor.check(model, x, light=True)  # no centroids yet: the first check is a full one anyway
    warm = [c.clone() for c in monitor.centroids]
    with torch.no_grad():
        for b in model.blocks:
            b.mlp.fc.weight.add_(0.05 * torch.randn_like(b.mlp.fc.weight))
    rows = [neuron_rows(b.mlp) for b in model.blocks]
    light = monitor.check(model, x, light=True)
    for i, r in enumerate(rows):
        expected = balanced_kmeans(r, 4, 2, warm[i])  # one start (the warm one), light_iters iterations
        assert torch.equal(monitor.labels[i], expected.labels)
    assert all(0 <= a <= 1 for a in light.ari)
    # k-means FLOPs: a full check with a previous clustering runs 2 starts x 10 iterations, a light one 1 x 2.
    again = monitor.check(model, x)
    per_iter = 2.0 * model.args.d_ff * 4 * model.args.d_model * model.args.n_layer
    assert again.flops - light.flops == pytest.approx((2 * 10 - 2) * per_iter)
    assert full.flops - light.flops == pytest.approx((10 - 2) * per_iter)


def test_monitor_tracks_neurons_through_permutations():
    model = make_model("tiny", "relu2")
    x, _ = tokens(8)
    monitor = Monitor(4, 2, seed=0)
    first = monitor.check(model, x)
    assert all(v is None for v in first.ari) and all(0 < v < 1 for v in first.sparsity)
    assert all(0 < r <= m <= 1 for r, m in zip(first.router_mass, first.mass))  # best top-k holds the most
    # Permute layer 0: told the order, the monitor computes what it would have without the permutation;
    # not told, it sees a random clustering.
    reference, blind = copy.deepcopy(monitor), copy.deepcopy(monitor)
    expected = reference.check(model, x)
    order = torch.arange(model.args.d_ff).repeat(2, 1)
    order[0] = torch.randperm(model.args.d_ff, generator=torch.Generator().manual_seed(1))
    permute_ffn_(model.blocks[0].mlp, order[0])
    second = monitor.check(model, x, order)
    assert second.ari == expected.ari and second.mass == pytest.approx(expected.mass)
    assert second.sparsity == pytest.approx(expected.sparsity)
    assert torch.equal(monitor.labels[0], reference.labels[0])
    assert abs(blind.check(model, x).ari[0]) < 0.1
    # Co-activation clustering: from firing patterns, still balanced.
    co = Monitor(4, 2, cluster="coactivation")
    co.check(model, x)
    assert all(torch.bincount(t).tolist() == [model.args.d_ff // 4] * 4 for t in co.labels)


# --- the switching policy --------------------------------------------------------------------------------------------
def run_policy(method, steps, stable_from=None):
    """The method's phases per step, the monitor faked: stable from step `stable_from` on."""
    phases = []

    def fake_check(step, light=False):
        good = stable_from is not None and step >= stable_from
        method.last = Check(sparsity=[0.5, 0.5], ari=[0.95 if good else 0.2] * 2, mass=[0.9] * 2,
                            router_mass=[0.8 if good else 0.3] * 2)
        method.check_step = step
        method.monitor.check(method.model)  # a clustering for the switch

    method.run_check = fake_check
    method.probe = torch.zeros(1, T, dtype=torch.long)
    for step in range(steps):
        method.before_step(step)
        phases.append(method.phase[0])
        method.after_optimizer(step)
    return "".join(phases)


def start(method, model):
    method.setup(model)
    start_method(method, model, make_optimizer(model))
    return method


def small_model():
    return make_model(d_model=64, d_ff=128)


def test_fixed_schedule_phases():
    model = small_model()
    method = start(make_ssd(model, 20, schedule="fixed", sparse_windows=[[0.1, 0.3], [0.3, 0.4], [0.75, 1.0]],
                            monitor_every=0), model)
    # Windows [2, 6), [6, 8), [15, 20): each window starts with a fresh clustering, adjacent ones too.
    assert run_policy(method, 20) == "dd" + "ssss" + "ss" + "d" * 7 + "s" * 5
    assert method.switches == 3


def test_adaptive_schedule_phases():
    opts = dict(monitor_every=2, dense_span=4, sparse_span=3, final_fraction=0.2, stable_ari=0.9, stable_mass=0.6)
    model = small_model()
    # Stable from the check at step 6: sparse for 3 steps, dense for at least 4, sparse again (the check at 12 is
    # stable), and the last 20% dense.
    assert run_policy(start(make_ssd(model, 20, **opts), model), 20, stable_from=6) == \
        "d" * 6 + "sss" + "dddd" + "sss" + "dddd"
    model = small_model()
    assert run_policy(start(make_ssd(model, 20, **opts), model), 20) == "d" * 20  # never stable
    model = small_model()
    final_sparse = start(make_ssd(model, 20, **opts, final_phase="sparse"), model)
    assert run_policy(final_sparse, 20) == "d" * 16 + "ssss"


@pytest.mark.parametrize("options,match", [
    ({"experts": 3}, "divide model.d_ff"),
    ({"experts": 4, "top_k": 5}, "top_k"),
    ({"top_ratio": 1.5}, "top_ratio"),
    ({"schedule": "sometimes"}, "schedule"),
    ({"schedule": "fixed", "sparse_windows": [[0.5, 0.2]]}, "start < end"),
    ({"schedule": "fixed", "sparse_windows": [[0.1, 0.5], [0.4, 0.6]]}, "overlap"),
    ({"sparse_windows": [[0.1, 0.5]]}, "fixed"),
    ({"monitor_every": 0}, "monitor"),
    ({"cluster": "spectral"}, "cluster"),
    ({"final_fraction": 1.0}, "final_fraction"),
    ({"stable_mass": 2.0}, "stable_mass"),
    ({"kernel": "fast"}, "method.kernel"),
    ({"experts_count": 4}, "unknown config key"),
])
def test_bad_options_are_user_errors(options, match):
    model = make_model()
    with pytest.raises(UserError, match=match):
        SSD.from_config({"name": "ssd", **options}, model.args, T)


def test_top_ratio_sets_k():
    model = make_model()
    assert make_ssd(model, top_ratio=0.5, experts=8).top_k == 4


# --- training, resume, conversions ---------------------------------------------------------------------------------
SSD_FIXED = {"name": "ssd", "experts": 4, "top_k": 1, "schedule": "fixed", "sparse_windows": [[0.25, 0.75]],
             "monitor_every": 2}


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_switches_phases_logs_and_saves_flops(make_config, tmp_path):
    run = tmp_path / "run"
    train(make_config(method=SSD_FIXED, model={"activation": "relu2"}), run)
    rows = metrics(run)
    assert [r["ssd_phase"] for r in rows] == ["dense"] * 3 + ["sparse"] * 6 + ["dense"] * 3
    step_flops = [b["flops"] - a["flops"] for a, b in zip([{"flops": 0.0}] + rows, rows)]
    # Steps 1, 5 and 11 have no monitor check: dense, sparse, dense again. Check steps add the monitor's cost.
    assert step_flops[4] < 0.9 * step_flops[0] and step_flops[10] == pytest.approx(step_flops[0])
    assert step_flops[11] > step_flops[10]
    checks = [r for r in rows if "ssd_sparsity" in r]
    assert [r["step"] for r in checks] == [2, 4, 6, 8, 10, 12]
    assert all(0 < r["ssd_sparsity"] < 1 and len(r["ssd_sparsity_layers"]) == 2 for r in checks)
    assert checks[0]["ssd_ari"] is None and all(-1 <= r["ssd_ari"] <= 1 for r in checks[1:])
    assert rows[-1]["ssd_switches"] == 1 and rows[4]["ssd_flops_saved"] > 0.1
    assert all("val_loss" not in r or r["val_loss"] < 10 for r in rows)
    # The run's checkpoint keeps its neurons' original order; eval as an MoE works on it.
    order = stored_order(run)
    assert order.shape == (2, 256) and sorted(order[0].tolist()) == list(range(256))
    model, method, cfg = load_model(run)
    rt = setup_runtime(cfg.train)
    val = TrainingData(cfg.data.dir, cfg.train)
    dense_loss = evaluate(model, val, cfg.train, rt, method)
    prepare_moe(model, run, 4)  # all 4 experts of 4: the dense model
    assert evaluate(model, val, cfg.train, rt, method) == pytest.approx(dense_loss, abs=1e-4)
    prepare_moe(model, run, 1)
    assert evaluate(model, val, cfg.train, rt, method) > dense_loss


def test_resume_reproduces_phase_clustering_and_weights(make_config, tmp_path, interrupt_after_checkpoint):
    cfg = dict(method=SSD_FIXED, model={"activation": "relu2"})
    full = tmp_path / "full"
    train(make_config(**cfg), full)

    part = tmp_path / "part"  # killed right after the step-6 checkpoint, then resumed
    with interrupt_after_checkpoint(6):
        train(make_config(**cfg), part)
    state = ckpt_mod.load_checkpoint(ckpt_mod.list_checkpoints(part)[-1])["method"]
    assert state["phase"] == "sparse" and state["probe"].shape[1] == 32
    train(make_config(**cfg), part, resume=True)

    a, b = metrics(full), metrics(part)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["ssd_phase"] for r in a] == [r["ssd_phase"] for r in b]
    assert [r.get("ssd_ari") for r in a] == [r.get("ssd_ari") for r in b]
    assert torch.equal(stored_order(full), stored_order(part))
    wa = ckpt_mod.load_checkpoint(ckpt_mod.list_checkpoints(full)[-1])
    wb = ckpt_mod.load_checkpoint(ckpt_mod.list_checkpoints(part)[-1])
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert torch.equal(wa["method"]["monitor"]["labels"], wb["method"]["monitor"]["labels"])


def test_moefy_and_densify_round_trip(make_config, tmp_path):
    run = tmp_path / "run"
    train(make_config(model={"activation": "relu2"}, steps=4, eval_every=0, checkpoint_every=0), run)
    moefied, back = tmp_path / "moefied", tmp_path / "dense"
    moefy_checkpoint(run, moefied, experts=4)
    assert json.loads((moefied / "moe.json").read_text())["experts"] == 4
    densify_checkpoint(moefied, back)
    original, _, _ = load_model(run)
    m, method, cfg = load_model(moefied)
    d, _, dcfg = load_model(back)
    assert cfg.method == {"name": "dense"} and dcfg.method == {"name": "dense"}
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), original.state_dict().values()))
    assert not torch.equal(m.blocks[0].mlp.fc.weight, original.blocks[0].mlp.fc.weight)
    x, _ = tokens()
    with torch.no_grad():
        ref = original(x)
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)  # moefied = the same dense function
        weights = m.blocks[0].mlp.fc.weight.clone()
        prepare_moe(m, moefied, 4)  # the stored clustering, used as it is: no new permutation
        assert torch.equal(m.blocks[0].mlp.fc.weight, weights)
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="already exists"):
        moefy_checkpoint(run, moefied, experts=4)
    with pytest.raises(UserError, match="divide"):
        moefy_checkpoint(run, tmp_path / "bad", experts=3)


def test_generate_dense_and_moe(make_config, tmp_path):
    from sparsetrain.data.prepare import load_tokenizer

    run = tmp_path / "run"
    train(make_config(model={"activation": "relu2"}, steps=2, eval_every=0, checkpoint_every=0), run)
    model, _, cfg = load_model(run)
    tok = load_tokenizer(cfg.data.dir)
    greedy = dict(max_new_tokens=8, temperature=0.0)
    dense = generate(model, tok, "def main(", **greedy)
    assert generate(model, tok, "def main(", **greedy) == dense and isinstance(dense, str)
    run_as_moe(model, 4, 4)  # all experts: the same tokens
    assert generate(model, tok, "def main(", **greedy) == dense
    sampled = generate_both(run, "import os", moe=1, experts=4, max_new_tokens=5, seed=3)
    assert set(sampled) == {"dense", "moe_top1"}
    assert generate_both(run, "import os", max_new_tokens=5, seed=3)["dense"] == sampled["dense"]


def test_fitted_router_catches_more_activation_mass_than_the_centroids():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    truth = torch.randn(4, 16, generator=g)
    mass = torch.softmax(3 * x @ truth.t(), dim=1)  # where each token's activation mass is
    init = torch.randn(4, 16, generator=g)
    fitted = fit_router(x, mass, init, steps=200, lr=0.05)

    def caught(w):
        return mass.gather(1, (x @ w.t()).topk(1, dim=1).indices).sum() / mass.sum()

    assert caught(fitted) > caught(init) + 0.2 and caught(fitted) > 0.8


def test_trained_router_option_routes_with_the_fitted_routers():
    model = make_model("tiny", "relu2")
    method = make_ssd(model, total_steps=8, schedule="fixed", sparse_windows=[[0.25, 1.0]], monitor_every=0,
                      router="trained", router_steps=20)
    optimizer = make_optimizer(model)
    method.setup(model)
    start_method(method, model, optimizer)
    x, y = tokens()
    for step in range(4):
        method.before_step(step)
        model(x, y).backward()
        method.before_optimizer(step)
        optimizer.step()
        method.after_optimizer(step)
        optimizer.zero_grad(set_to_none=True)
    assert method.phase == "sparse" and method.switches == 1
    for i, m in enumerate(method.layers):
        fitted = method.monitor.routers[i]
        centroids = router_centroids(m, contiguous_labels(m.d_ff, 4), 4)
        assert torch.equal(m.centroids, fitted) and not torch.allclose(fitted, centroids)
    with pytest.raises(UserError, match="method.router"):
        make_ssd(model, router="mlp")


def test_fit_routers_of_a_model_run_as_moe_fit_the_probes_activation_mass():
    """fit_routers: every layer's router moves from the centroids to a lower cross-entropy against where the probe
    tokens' activation mass is (the objective is convex in the router), and the model stays an MoE."""
    model = make_model("tiny", "relu2")
    run_as_moe(model, top_k=1, experts=4)
    x, _ = tokens(8)
    layers = [b.mlp for b in model.blocks]
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1]))) for m in layers]
    run_dense(model)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()

    def cross_entropy(m, xi):
        h = torch.relu(m.fc(xi)).square()
        mass = h.new_zeros(h.shape[0], 4).index_add_(1, contiguous_labels(m.d_ff, 4), h)
        q = mass / mass.sum(1, keepdim=True)
        return -(q * torch.log_softmax(xi @ m.centroids.t(), dim=1)).sum(1).mean().item()

    for m in layers:
        m.sparse = True
    with torch.no_grad():
        before = [cross_entropy(m, xi) for m, xi in zip(layers, inputs)]
        centroids = [m.centroids.clone() for m in layers]
        fit_routers(model, x, steps=100)
        after = [cross_entropy(m, xi) for m, xi in zip(layers, inputs)]
    assert all(m.sparse for m in layers)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert all(not torch.equal(c, m.centroids) for c, m in zip(centroids, layers))
