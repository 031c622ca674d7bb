"""MST: sparsity 0 is dense training, realised sparsity equals the schedule's target after every update, masked
weights and moments stay zero, regrown weights start at zero, ERK, schedule, attention windows, FLOPs, resume."""
import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from helpers import make_method, make_optimizer, random_batches, seeded_model, start, train_by_hand
from safetensors.torch import load_file, save_file

import sparsetrain.nn.attention_masks as attention_masks
from sparsetrain import config
from sparsetrain.errors import UserError
from sparsetrain.methods import RunInfo
from sparsetrain.methods.mst import MST, MSTOptions
from sparsetrain.methods.mst.topology import erk_densities, next_active, sparse_weights
from sparsetrain.nn.model import flops_per_token
from sparsetrain.store.checkpoint import join_state, list_checkpoints, split_state
from sparsetrain.training.loop import train as run_training

VOCAB, T, B = 61, 16, 4
# A short schedule that visits every phase: warm-up to step 6, ultra-sparse to 12, restoration ramp to 18.
SCHEDULE = dict(update_every=2, warmup_end=0.25, restore_start=0.5, restore_end=0.75, sparsity=0.8,
                final_sparsity=0.2, neuron_multiple=1)


def make_model(preset="tiny", seed=0):
    return seeded_model(preset, VOCAB, seed)


def make_mst(model, total_steps=24, **options):
    return make_method(MST, model, T, total_steps, **options)


def batches(n, seed=1):
    return random_batches(n, VOCAB, B, T, seed)


def train(model, method, data, optimizer=None, first_step=0, check=None):
    """Two micro-batches per step, so hooks see an accumulation; the method is started on step 0 only."""
    return train_by_hand(model, method, data, optimizer, first_step=first_step, start=first_step == 0,
                         micro_batches=2, check=check)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_sparsity_zero_is_dense_training_bit_for_bit(preset, granularity):
    dense = make_model(preset)
    sparse = copy.deepcopy(dense)
    data = batches(6)
    dense_losses, _ = train(dense, None, data)
    method = make_mst(sparse, total_steps=6, granularity=granularity, sparsity=0.0, update_every=2,
                      sparsify_embeddings=granularity == "weight")
    sparse_losses, _ = train(sparse, method, data)
    assert dense_losses == sparse_losses
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        assert torch.equal(p, q), name


def _moments(optimizer, p):
    return [t for k, t in optimizer.state.get(p, {}).items() if k != "step"]


@pytest.mark.parametrize("preset, density, grow", [("tiny", "erk", "mixed"), ("tiny-llama", "uniform", "rigl")])
def test_weight_masks_follow_the_schedule_and_masked_weights_stay_zero(preset, density, grow):
    model = make_model(preset)
    method = make_mst(model, density=density, grow=grow, sparsify_embeddings=preset == "tiny-llama", **SCHEDULE)
    optimizer = make_optimizer(model)
    method.setup(model)
    start(method, model, optimizer)
    realised = []

    def check(step, phase):
        for w, p, mask in zip(method.weights, method.params, method.masks):
            if phase == "grad":  # the gradient the optimizer (and clipping) sees is sparse
                assert not p.grad[~mask].any(), w.name
                continue
            assert not p[~mask].any(), w.name
            for t in _moments(optimizer, p):
                assert not t[~mask].any(), w.name
        if phase == "after":
            counts = tuple(int(m.sum()) for m in method.masks)
            if method.is_update(step):
                assert counts == method.keep_counts(method.target(step))  # exactly, in every layer
            realised.append(1 - sum(counts) / sum(m.numel() for m in method.masks))

    assert tuple(int(m.sum()) for m in method.masks) == method.keep_counts(method.target(0))
    train(model, method, batches(24), optimizer, first_step=0, check=check)
    assert realised[0] == 0.0 and max(realised) == pytest.approx(0.8, abs=0.01)
    assert realised[-1] == pytest.approx(0.2, abs=0.01)  # restored to final_sparsity
    assert all(a <= b for a, b in zip(realised[:6], realised[1:6]))  # warm-up only prunes
    assert all(a >= b for a, b in zip(realised[12:], realised[13:]))  # restoration only grows


def test_updates_prune_smallest_and_regrow_at_zero_with_zero_moments():
    model = make_model("tiny")
    method = make_mst(model, total_steps=20, grow="rigl", warmup_end=0.0, restore_start=1.0, restore_end=1.0,
                      update_every=4, zeta=0.5)
    data = batches(5)
    _, optimizer = train(model, method, data[:4])
    before = [m.clone() for m in method.masks]
    values = [p.detach().clone() for p in method.params]
    # The dense gradient of the whole batch, from a copy without the method's hooks.
    reference = copy.deepcopy(model)
    x, y = data[4]
    reference(x, y).backward()
    dense_grads = [reference.get_parameter(w.name).grad.abs() for w in method.weights]
    method.before_step(4)
    for xs, ys in zip(x.split(B // 2), y.split(B // 2)):  # accumulated over micro-batches, like the trainer
        (model(xs, ys) / 2).backward()
    method.before_optimizer(4)
    optimizer.step()
    stepped = [p.detach().clone() for p in method.params]
    method.after_optimizer(4)
    for old, new, p, w0, w1, g in zip(before, method.masks, method.params, values, stepped, dense_grads):
        grown, pruned = new & ~old, old & ~new
        # Grown (rigl): the largest dense-gradient magnitudes among the weights that were not kept.
        assert g[grown].min() >= g[~old & ~new].max()
        assert grown.sum() == pruned.sum() > 0  # at a fixed target, as many grown as pruned
        assert not p[grown].any() and not p[pruned].any()
        for t in _moments(optimizer, p):
            assert not t[grown].any() and not t[pruned].any()
        # Pruned: the smallest magnitudes of the weights as they were after the step (a pruned weight may be
        # grown back at once, and then simply stays).
        assert (old & (w1.abs() > w1.abs()[pruned].max()) & ~new).sum() == 0
        assert (old & new).sum() >= old.sum() - int(0.5 * old.sum())
        assert torch.equal(p[old & new], w1[old & new])  # survivors untouched by the update
        assert not w0[~old].any()  # inactive weights were zero before the update


def test_next_active_prunes_and_grows_by_rule():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    magnitude = torch.tensor([4.0, 1.0, 3.0, 2.0, 0, 0, 0, 0])
    grad = torch.tensor([0.1, 0.1, 0.1, 0.1, 1.0, 5.0, 3.0, 0.5])
    # Fixed target, zeta 0.5: prune the 2 smallest (entries 1 and 3), grow the 2 largest gradients (5, 6).
    new = next_active(mask, magnitude, grad, keep=4, z=0.5, grow="rigl", generator=g)
    assert new.nonzero().flatten().tolist() == [0, 2, 5, 6]
    # Rising target (keep 2), no exchange: prune 2, grow none.
    new = next_active(mask, magnitude, grad, keep=2, z=0.0, grow="rigl", generator=g)
    assert new.nonzero().flatten().tolist() == [0, 2]
    # Falling target (keep 6) with zeta 0.25: prune 1 (entry 1), grow 3: entries 5, 6 and 4 by gradient.
    new = next_active(mask, magnitude, grad, keep=6, z=0.25, grow="rigl", generator=g)
    assert new.nonzero().flatten().tolist() == [0, 2, 3, 4, 5, 6]
    # A pruned entry whose gradient is among the largest is grown back at once: it simply stays.
    new = next_active(mask, magnitude, grad.index_fill(0, torch.tensor([1]), 9.0), keep=4, z=0.5, grow="rigl",
                      generator=g)
    assert new.nonzero().flatten().tolist() == [0, 1, 2, 5]
    # Random growth: the right count, never an entry that survived pruning twice.
    for _ in range(5):
        new = next_active(mask, magnitude, grad, keep=6, z=0.25, grow="set", generator=g)
        assert new.sum() == 6 and new[[0, 2, 3]].all()
    # Mixed: 3 parts by gradient (the 30 largest), 1 at random among the rest.
    new = next_active(torch.zeros(100, dtype=torch.bool), torch.zeros(100), torch.arange(100.0), keep=40, z=0.0,
                      grow="mixed", generator=g)
    assert new[70:].all() and new[:70].sum() == 10 and new[:60].any()


def test_erk_densities():
    model = make_model("tiny-llama")
    weights = sparse_weights(model.args, embeddings=True)
    shapes = [w.shape for w in weights]
    sizes = [a * b for a, b in shapes]
    for sparsity in [0.5, 0.9, 0.99]:
        dens = erk_densities(shapes, sparsity)
        assert max(dens) <= 1.0
        assert sum(d * n for d, n in zip(dens, sizes)) == pytest.approx((1 - sparsity) * sum(sizes))
        raw = [(a + b) / (a * b) for a, b in shapes]
        sparse = [i for i, d in enumerate(dens) if d < 1]
        # Density proportional to (n_in + n_out) / (n_in n_out): larger layers are sparser.
        ratios = [dens[i] / raw[i] for i in sparse]
        assert max(ratios) == pytest.approx(min(ratios))
    # A small layer that would pass density 1 is made dense and the rest rescaled.
    dens = erk_densities([(4, 4), (256, 256), (512, 256)], 0.5)
    assert dens[0] == 1.0 and dens[1] > dens[2]
    assert 16 + dens[1] * 65536 + dens[2] * 131072 == pytest.approx(0.5 * (16 + 65536 + 131072))
    assert erk_densities(shapes, 0.0) == [1.0] * len(shapes)


def test_schedule_phases():
    model = make_model()
    method = make_mst(model, total_steps=1000)  # defaults: warm-up to 0.1, ultra 0.9 to 0.75, restore to 0.9
    t = [method.target(s) for s in range(1000)]
    assert t[0] == 0.0 and t[50] == pytest.approx(0.45) and t[100] == 0.9 and t[749] == 0.9
    assert t[825] == pytest.approx(0.45) and t[900:] == [0.0] * 100
    assert all(a <= b for a, b in zip(t[:100], t[1:101])) and all(a >= b for a, b in zip(t[750:], t[751:]))
    phases = [method.phase(s) for s in (0, 99, 100, 749, 750, 999)]
    assert phases == ["warmup"] * 2 + ["ultra"] * 2 + ["restoration"] * 2
    # Updates every 100 steps; the drop fraction decays by cosine from zeta to 0 at the end.
    assert [s for s in range(1000) if method.is_update(s)] == list(range(100, 1000, 100))
    assert method.drop_fraction(0) == 0.3 and method.drop_fraction(500) == pytest.approx(0.15)
    assert method.topology_step(0) == 0 and method.topology_step(100) == 0 and method.topology_step(101) == 100
    # Without exchange (update_end passed) an update happens only where the target moves.
    quiet = make_mst(model, total_steps=1000, update_end=0.5)
    assert [s for s in range(1000) if quiet.is_update(s)] == [100, 200, 300, 400, 800, 900]
    # No warm-up: sparse from the first step.
    assert make_mst(model, total_steps=1000, warmup_end=0.0).target(0) == 0.9


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_neuron_granularity_schedule_frozen_units_and_sliced_equals_dense(preset):
    model = make_model(preset)
    method = make_mst(model, granularity="neuron", **SCHEDULE)
    optimizer = make_optimizer(model)
    method.setup(model)
    start(method, model, optimizer)
    data = batches(24)
    n = {"ffn": model.args.d_ff, "head": model.args.n_kv_head}
    kept_ffn = []
    omitted_snapshot = {}

    def check(step, phase):
        if phase == "grad":
            return
        for kind in ("ffn", "head"):
            expected = method.unit_keep(kind, method.target(method.topology_step(step + 1)))
            assert method.units[kind].sum(1).tolist() == [expected] * model.args.n_layer
        kept_ffn.append(int(method.units["ffn"][0].sum()))
        # Omitted units: output weights exactly zero, input weights and all moments as they were.
        for kind in ("ffn", "head"):
            for i in range(model.args.n_layer):
                omitted = (~method.units[kind][i]).nonzero().flatten()
                slices = method._slices(kind, i, omitted)
                p, dim, idx = slices[-1]
                assert not p.index_select(dim, idx).any()
                for j, (p, dim, idx) in enumerate(slices):
                    now = [p.detach().index_select(dim, idx)]
                    now += [t.index_select(dim, idx) for t in _moments(optimizer, p)]
                    key = (kind, i, j)
                    prev = omitted_snapshot.get(key)
                    if prev is not None and not method.is_update(step) and prev[0] == omitted.tolist():
                        assert all(torch.equal(a, b) for a, b in zip(prev[1], now)), key
                    omitted_snapshot[key] = (omitted.tolist(), now)
        # Omitted units add exactly nothing: the sliced model computes what the dense model computes.
        if step in (4, 10, 16):
            x, y = data[step]
            with torch.no_grad():
                dense_loss = model(x, y)
                method.before_step(step + 1)  # sets the kept slices (a non-update step)
                assert model.blocks[0].mlp.active is not None
                sliced_loss = model(x, y)
                for block in model.blocks:
                    block.mlp.active = block.attn.active = None
            torch.testing.assert_close(sliced_loss, dense_loss, rtol=1e-5, atol=1e-6)

    train(model, method, data, optimizer, check=check)
    assert kept_ffn[0] == n["ffn"] and min(kept_ffn) == method.unit_keep("ffn", 0.8)
    assert kept_ffn[-1] == method.unit_keep("ffn", 0.2)


def test_neuron_update_steps_run_dense_and_count_dense_flops():
    model = make_model("tiny")
    method = make_mst(model, granularity="neuron", **SCHEDULE)
    method.setup(model)
    start(method, model, make_optimizer(model))
    dense = method.dense_flops_per_token()
    for step in (8, 9):  # ultra-sparse: 8 is an update step (grows by gradient), 9 is not
        method.before_step(step)
        sliced = model.blocks[0].mlp.active is not None
        assert sliced == (not method.is_update(step))
        assert (method.flops_per_token(step) == dense) == method.is_update(step)
        method.before_optimizer(step)
        method.after_optimizer(step)
    kf = method.unit_keep("ffn", 0.8) / model.args.d_ff
    kh = method.unit_keep("head", 0.8) / model.args.n_kv_head
    parts = flops_per_token(model.args, T)
    expected = 3 * (parts["head"] + parts["ffn"] * kf + (parts["attn_linear"] + parts["attn_scores"]) * kh)
    assert method.flops_per_token(9) == pytest.approx(expected)
    random_growth = make_mst(model, granularity="neuron", grow="set", **SCHEDULE)
    assert random_growth.flops_per_token(8) == pytest.approx(expected)  # no gradient needed: stays sliced


def test_neuron_updates_keep_the_kept_indices_where_cuda_graphs_recorded_them():
    """A topology update at an unchanged kept count moves which units are kept, not where their indices live: CUDA
    graphs read `active` at the address they recorded (a moved tensor costs a re-recording every update)."""
    model = make_model("tiny")
    method = make_mst(model, granularity="neuron", grow="set", **SCHEDULE)
    method.setup(model)
    start(method, model, make_optimizer(model))
    seen = []
    for step in range(12):  # the ramp to 0.8 ends at step 6; held from then on, with updates at 8 and 10
        method.before_step(step)
        active = model.blocks[0].mlp.active
        if step >= 7:
            seen.append((active.data_ptr(), active.clone()))
        method.before_optimizer(step)
        method.after_optimizer(step)
    assert len({ptr for ptr, _ in seen}) == 1
    assert not all(torch.equal(seen[0][1], idx) for _, idx in seen)  # the updates did move units


def test_weight_flops_and_metrics():
    model = make_model("tiny")
    method = make_mst(model, density="uniform", **SCHEDULE)
    dense = method.dense_flops_per_token()
    assert method.flops_per_token(0) == dense  # the first topology is dense (warm-up starts dense)
    masked = sum(w.flops for w in method.weights)
    # Step 9 computes with the step-8 topology, density 0.2 in every layer, and is no update.
    keep = method.keep_counts(0.8)
    density = [k / (w.shape[0] * w.shape[1]) for w, k in zip(method.weights, keep)]
    sparse = sum(w.flops * d for w, d in zip(method.weights, density))
    assert method.flops_per_token(9) == pytest.approx(dense - 3 * masked + 3 * sparse)
    # Step 10 grows by gradient: its weight gradient is dense.
    assert method.flops_per_token(10) - method.flops_per_token(9) == pytest.approx(masked - sparse)
    assert make_mst(model, density="uniform", grow="set", **SCHEDULE).flops_per_token(10) == method.flops_per_token(9)

    method.setup(model)
    start(method, model, make_optimizer(model))
    for step, (x, y) in enumerate(batches(10)):
        method.before_step(step)
        model(x, y).backward()
        method.before_optimizer(step)
        method.optimizer.step()
        method.after_optimizer(step)
        method.optimizer.zero_grad()
    m = method.metrics(9)
    assert m["mst_phase"] == "ultra" and m["mst_target"] == 0.8 and m["mst_attention"] == "dense"
    assert m["mst_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert m["mst_layer_density"]["0.mlp.fc"] == pytest.approx(0.2, abs=1e-3)
    assert m["mst_flops_saved"] == pytest.approx(1 - method.flops_per_token(9) / dense)
    json.dumps(m)


def test_attention_window_sets_block_masks_and_counts_blocks():
    model = make_model("tiny")
    seq = 1024
    options = MSTOptions(attention="local", window=128, attention_layers=[-1], attention_start=0.25,
                         attention_end=0.5, sparsity=0.0)
    method = MST.from_config({"name": "mst", **dataclasses.asdict(options)}, model.args, seq)
    method.run = RunInfo(total_steps=100)  # what start() would be told
    method.setup(model)
    seen = []
    for step in (0, 24, 25, 49, 50, 99):
        method.apply_attention(step)
        seen.append([b.attn.block_mask for b in model.blocks])
    assert all(m[0] is None for m in seen)  # layer 0 is not chosen
    assert [m[1] is not None for m in seen] == [False, False, True, True, False, False]
    assert seen[2][1] is seen[3][1]  # built once, cached
    parts = flops_per_token(model.args, seq)
    frac = attention_masks.block_fraction("local", seq, 128, 128)
    assert frac == pytest.approx(15 / 36)
    saved = method.flops_per_token(0) - method.flops_per_token(30)
    assert saved == pytest.approx(3 * parts["attn_scores"] / 2 * (1 - frac))  # one of two layers
    assert method.attention_on(30) and not method.attention_on(50)


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_state_dict_round_trip_resumes_identically(granularity, tmp_path):
    model = make_model("tiny-llama")
    options = dict(granularity=granularity, grow="mixed", seed=3, **SCHEDULE)
    method = make_mst(model, **options)
    data = batches(12)
    _, optimizer = train(model, method, data[:7])
    state = method.state_dict()
    tensors, values = split_state(state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "m.safetensors"))
    state = join_state(load_file(str(tmp_path / "m.safetensors")), json.loads(json.dumps(values)))
    resumed_model = copy.deepcopy(model)
    resumed_opt = make_optimizer(resumed_model)
    resumed_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # else they share moments
    resumed = make_mst(resumed_model, **options)
    resumed.setup(resumed_model)
    start(resumed, resumed_model, resumed_opt, first_step=7)
    resumed.load_state_dict(state)  # after start(), as the trainer does
    expected, _ = train(model, method, data[7:], optimizer, first_step=7)
    got, _ = train(resumed_model, resumed, data[7:], resumed_opt, first_step=7)
    assert expected == got
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("options, message", [
    (dict(sparsity=1.0), r"method.sparsity=1.0 is outside \[0, 1\)"),
    (dict(sparsity=-0.1), "outside"),
    (dict(final_sparsity=0.95), "restoration lowers the sparsity"),
    (dict(warmup_end=0.8), "the phases overlap"),
    (dict(restore_start=0.95), "the phases overlap"),
    (dict(restore_end=1.5), "must be a fraction of training"),
    (dict(update_every=0), "update_every"),
    (dict(zeta=1.5), "zeta"),
    (dict(update_end=0.0), "update_end"),
    (dict(grow="random"), "unknown method.grow"),
    (dict(granularity="block"), "unknown method.granularity"),
    (dict(granularity="neuron", density="erk"), "density=erk applies to granularity=weight"),
    (dict(attention="sliding"), "unknown method.attention"),
    (dict(attention="local", window=17), r"method.window=17 must be in \[1, train.seq_len=16\]"),
    (dict(attention="hybrid", window=8, stride=0), "method.stride=0"),
    (dict(attention_layers=[2]), "attention_layers"),
    (dict(attention_start=0.6, attention_end=0.5), "attention_start"),
    (dict(density_mode="erk"), "unknown config key 'method.density_mode'"),
    (dict(sparsity="high"), "method.sparsity must be float"),
])
def test_bad_options_raise_user_error(options, message):
    model = make_model("tiny")
    with pytest.raises(UserError, match=message):
        MST.from_config({"name": "mst", **options}, model.args, T)


def test_phase_ends_are_updates_whatever_dt_is(make_config, tmp_path):
    """dT longer than the ramps: the ends of warm-up and restoration are updates too, so the run holds `sparsity`
    from the end of warm-up and ends at `final_sparsity` (on the dT grid alone it would end at the last grid
    update's target)."""
    method = make_mst(make_model(), total_steps=480)  # defaults: dT 100, warm-up to 48, restoration to 432
    assert [s for s in range(480) if method.is_update(s)] == [48, 100, 200, 300, 400, 432]
    assert method.topology_step(48) == 0 and method.topology_step(49) == 48 and method.topology_step(479) == 432
    assert method.target(method.topology_step(479)) == 0.0 and method.target(method.topology_step(60)) == 0.9
    # End to end: 12 steps, dT 5, warm-up to step 2, restoration to step 11 (on the grid alone the last update, at
    # step 10, would leave sparsity 0.38 for the end).
    options = {"name": "mst", "update_every": 5, "warmup_end": 0.125, "restore_start": 0.5, "restore_end": 0.9,
               "sparsity": 0.8, "final_sparsity": 0.3}
    run_dir = tmp_path / "run"
    run_training(make_config(method=options), run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sparsity = [round(r["mst_sparsity"], 2) for r in rows]
    assert sparsity[2] == 0.8 and sparsity[-1] == 0.3  # the level after step 2's update, and the final one


def test_trainer_runs_mst_and_resumes_exactly(make_config, tmp_path, interrupt_after_checkpoint):
    method = {"name": "mst", "update_every": 2, "warmup_end": 0.25, "restore_start": 0.5, "restore_end": 0.75,
              "sparsity": 0.8, "final_sparsity": 0.4, "sparsify_embeddings": True}
    full = tmp_path / "full"
    summary = run_training(make_config(method=method), full)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert {"mst_sparsity", "mst_target", "mst_phase", "mst_flops_saved", "mst_layer_density"} <= set(rows[-1])
    assert max(r["mst_sparsity"] for r in rows) == pytest.approx(0.8, abs=0.01)
    assert rows[-1]["mst_sparsity"] == pytest.approx(0.4, abs=0.01)
    assert all(r["mst_sparsity"] == pytest.approx(r["mst_target"], abs=0.01) for r in rows)
    assert summary["flops"] < rows[0]["flops"] * len(rows)  # fewer FLOPs than 12 dense steps
    # Interrupt after the step-6 checkpoint (mid ultra-sparsification) and resume: the same run.
    part = tmp_path / "part"  # killed right after the step-6 checkpoint, then resumed
    with interrupt_after_checkpoint(6):
        run_training(make_config(method=method), part)
    run_training(make_config(method=method), part, resume=True)
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in resumed]
    wa = load_file(str(list_checkpoints(full)[-1] / "model.safetensors"))
    wb = load_file(str(list_checkpoints(part)[-1] / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    masks = load_file(str(list_checkpoints(full)[-1] / "method.safetensors"))
    assert masks["masks/wte.weight"].dtype == torch.bool


def test_trainer_runs_neuron_granularity(make_config, tmp_path):
    method = {"name": "mst", "granularity": "neuron", "update_every": 3, "warmup_end": 0.25, "restore_start": 0.75,
              "restore_end": 1.0, "sparsity": 0.5, "neuron_multiple": 32}
    run_training(make_config(method=method), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["mst_sparsity"] for r in rows) == 0.5 and max(r["mst_head_sparsity"] for r in rows) == 0.5
    assert max(r["mst_flops_saved"] for r in rows) > 0.2


def test_two_processes_match_one(make_config, tmp_path):
    """DDP over 2 gloo processes: the gradient hooks see each rank's half, the dense gradients are all-reduced, so
    both ranks build the topology one process builds, and the runs match."""
    method = {"name": "mst", "update_every": 2, "warmup_end": 0.0, "restore_start": 1.0, "restore_end": 1.0,
              "sparsity": 0.7, "zeta": 0.5, "grow": "rigl"}
    cfg = make_config(method=method, steps=6, eval_every=0, checkpoint_every=6)
    one = tmp_path / "one"
    run_training(cfg, one)
    (tmp_path / "c.toml").write_text(config.dumps(config.to_dict(cfg)))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsetrain.cli", "train", "--config", str(tmp_path / "c.toml"), "--out", str(two)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-4)
    ma, mb = (load_file(str(list_checkpoints(run)[-1] / "method.safetensors")) for run in (one, two))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_hybrid_attention_trains_on_cpu_with_the_dense_mask(make_config, tmp_path):
    """On CPU the attention pattern runs as a boolean mask: the run learns, and the masked layers see only the
    allowed keys (a change to a key outside the window leaves a query's output unchanged)."""
    method = {"name": "mst", "sparsity": 0.0, "attention": "local", "window": 8, "attention_start": 0.0,
              "attention_end": 1.0}
    run = tmp_path / "run"
    summary = run_training(make_config(steps=6, eval_every=3, method=method), run)
    assert summary["val_loss"] < 6.3
    from sparsetrain.nn.model import Attention

    model = make_model("tiny")
    attn: Attention = model.blocks[0].attn
    attn.block_mask = attention_masks.cached_dense_mask("local", 32, 8, 8, "cpu")
    x = torch.randn(1, 32, model.args.d_model)
    y = x.clone()
    y[0, 3] += 1.0  # key 3 is outside the window of query 20 (it sees keys 13..20)
    a, b = attn(x, None), attn(y, None)
    assert torch.allclose(a[0, 20], b[0, 20]) and not torch.allclose(a[0, 5], b[0, 5])
