"""SAT: omission rate 0 is dense training, omitted slices are frozen, sliced = zeroed dense, LORS, metrics, resume."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import make_method, make_optimizer, random_batches, seeded_model, start, train_by_hand

from sparsetrain.errors import UserError
from sparsetrain.methods.sat import SAT, keep_count

VOCAB, T, B = 61, 16, 4


def make_model(preset, seed=0):
    return seeded_model(preset, VOCAB, seed)


def make_sat(model, total_steps=10, **options):
    return make_method(SAT, model, T, total_steps, **options)


def batches(n, seed=1):
    return random_batches(n, VOCAB, B, T, seed)


def train(model, method, data, optimizer=None, first_step=0):
    return train_by_hand(model, method, data, optimizer, first_step=first_step)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("metric", ["wanda", "maxip"])
def test_rate_zero_is_dense_training_bit_for_bit(preset, metric):
    dense = make_model(preset)
    sparse = copy.deepcopy(dense)
    data = batches(5)
    dense_losses, _ = train(dense, None, data)
    method = make_sat(sparse, total_steps=5, ffn_rate=0.0, head_rate=0.0, metric=metric, stats_dense_pass=True)
    sat_losses, _ = train(sparse, method, data)
    assert dense_losses == sat_losses
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        assert torch.equal(p, q), name


def _snapshot(model, optimizer):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: {k: v.clone() for k, v in optimizer.state[p].items() if k != "step"}
               for n, p in model.named_parameters()}
    return params, moments


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_step_with_omission_freezes_omitted_slices_and_moments(preset):
    model = make_model(preset)
    # Two dense steps fill every moment; step 2 omits half of the neurons and heads.
    method = make_sat(model, total_steps=4, dense_warmup=0.5, dense_final=0.0, schedule="constant",
                      ffn_multiple=1, metric="magnitude", select="sample")
    data = batches(3)
    _, optimizer = train(model, method, data[:2])
    before = _snapshot(model, optimizer)
    method.before_step(2)
    kept_ffn = [model.blocks[i].mlp.active.clone() for i in range(2)]
    kept_head = [model.blocks[i].attn.active.clone() for i in range(2)]
    model(*data[2]).backward()
    method.before_optimizer(2)
    optimizer.step()
    method.after_optimizer(2)
    after = _snapshot(model, optimizer)

    for i in range(2):
        mlp, attn = model.blocks[i].mlp, model.blocks[i].attn
        n, K = mlp.d_ff, attn.n_kv_head
        assert kept_ffn[i].numel() == n // 2 and kept_head[i].numel() == K // 2
        for kept, n_all, slices in [
            (kept_ffn[i], n, [("mlp.fc.weight", 0, mlp.in_rows), ("mlp.fc.bias", 0, mlp.in_rows),
                              ("mlp.proj.weight", 1, lambda x: x)]),
            (kept_head[i], K, [("attn.qkv.weight", 0, lambda g: attn.group_rows(g)[0]),
                               ("attn.qkv.bias", 0, lambda g: attn.group_rows(g)[0]),
                               ("attn.proj.weight", 1, lambda g: attn.group_rows(g)[1])]),
        ]:
            mask = torch.ones(n_all, dtype=torch.bool)
            mask[kept] = False
            omitted = mask.nonzero().flatten()
            for suffix, dim, index in slices:
                name = f"blocks.{i}.{suffix}"
                if name not in after[0]:
                    continue  # llama has no biases
                tensors = [(before[0][name], after[0][name])]
                tensors += [(before[1][name][k], after[1][name][k]) for k in ("exp_avg", "exp_avg_sq")]
                for old, new in tensors:
                    assert torch.equal(old.index_select(dim, index(omitted)), new.index_select(dim, index(omitted)))
                    # Every kept row (column) moved: gradient, momentum and weight decay all act on it.
                    changed = (old != new).index_select(dim, index(kept))
                    other = tuple(d for d in range(changed.dim()) if d != dim)
                    assert changed.any(dim=other).all() if other else changed.all(), name
    # The model is dense again between steps (evaluation sees the full model).
    assert all(b.mlp.active is None and b.attn.active is None for b in model.blocks)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_sliced_forward_equals_dense_with_omitted_outputs_zeroed(preset):
    model = make_model(preset)
    method = make_sat(model, schedule="constant", dense_final=0.0, metric="uniform")
    start(method, model, make_optimizer(model))
    method.before_step(0)
    x = torch.randn(2, T, model.args.d_model)
    rope = (model.rope_cos, model.rope_sin) if model.rope_cos is not None else None
    for block in model.blocks:
        mlp, attn = block.mlp, block.attn
        # FFN: zero the omitted neurons' activations.
        h = mlp.hidden(x)
        zero = torch.ones(mlp.d_ff, dtype=torch.bool)
        zero[mlp.active] = False
        expected = F.linear(h.masked_fill(zero, 0.0), mlp.proj.weight, mlp.proj.bias)
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
        # Attention: zero the omitted groups' heads before the output projection.
        y = attn.head_outputs(x, rope)  # [B, H, T, d], all heads
        per_group = attn.n_head // attn.n_kv_head
        heads_zero = torch.ones(attn.n_kv_head, dtype=torch.bool)
        heads_zero[attn.active] = False
        y_zeroed = y.masked_fill(heads_zero.repeat_interleave(per_group)[None, :, None, None], 0.0)
        expected = F.linear(y_zeroed.transpose(1, 2).flatten(2), attn.proj.weight, attn.proj.bias)
        torch.testing.assert_close(attn(x, rope), expected, rtol=1e-5, atol=1e-6)
        # Attention.head_outputs itself is the dense attention before proj.
        active, attn.active = attn.active, None
        dense = F.linear(y.transpose(1, 2).flatten(2), attn.proj.weight, attn.proj.bias)
        torch.testing.assert_close(attn(x, rope), dense, rtol=1e-5, atol=1e-6)
        attn.active = active
    if preset == "tiny-llama":
        assert model.args.n_kv_head < model.args.n_head  # grouped-query attention was exercised


def test_ladder_schedule_and_kept_counts():
    model = make_model("tiny-llama")  # d_ff 352, 2 kv groups of 2 heads
    method = make_sat(model, total_steps=100, ffn_rate=0.5, head_rate=0.5, exempt_layers=[-1])
    rates = [method.rates(s)[0] for s in range(100)]
    assert rates[:50] == [0.5] * 50
    assert rates[90:] == [0.0] * 10
    assert sorted(set(rates), reverse=True) == [0.5, 0.375, 0.25, 0.125, 0.0]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never goes back up
    rungs = [rates[50:90].count(r) for r in (0.375, 0.25, 0.125)]
    assert sum(rungs) == 40 and max(rungs) - min(rungs) <= 1  # three equal rungs
    # Kept counts: round((1 - rate) n) to a multiple, within [multiple, n].
    assert keep_count(352, 0.5, 64) == 192 and keep_count(512, 0.5, 64) == 256
    assert keep_count(352, 0.95, 64) == 64 and keep_count(4, 0.375, 1) == 3 and keep_count(4, 0.0, 1) == 4
    start(method, model, make_optimizer(model))
    shapes = set()
    for step in range(100):
        method.before_step(step)
        kf, kh = method.keep_counts(step)
        ffn, attn = model.blocks[0].mlp.active, model.blocks[0].attn.active
        assert model.blocks[1].mlp.active is None and model.blocks[1].attn.active is None  # exempt
        if kf == 352:
            assert ffn is None
        else:
            assert ffn.numel() == kf and kf % 64 == 0 and torch.equal(ffn, ffn.sort().values)
            assert ffn.unique().numel() == kf
        assert (attn is None) == (kh == 2)
        shapes.add((kf, kh))
        method.after_optimizer(step)
    assert len(shapes) <= 5  # a handful of distinct shapes for torch.compile
    # Warm-up and the other schedules.
    warm = make_sat(model, total_steps=100, dense_warmup=0.1, schedule="constant")
    assert [warm.rates(s)[0] for s in (0, 9, 10, 89, 90)] == [0.0, 0.0, 0.5, 0.5, 0.0]
    linear = make_sat(model, total_steps=100, schedule="linear", dense_final=0.0)
    lin = [linear.rates(s)[0] for s in range(100)]
    assert lin[0] == 0.5 and all(a > b for a, b in zip(lin, lin[1:])) and lin[-1] > 0


def _planted(preset, seed=0):
    """A model whose FFN neurons 0-63 and kv group 1 read a loud input feature, while neurons 64-127 and kv group 0
    have big weights on a silent feature: magnitude prefers the latter, wanda and maxip the former."""
    model = make_model(preset, seed)
    d = model.args.d_model
    with torch.no_grad():
        for block in model.blocks:
            mlp, attn = block.mlp, block.attn
            mlp.fc.weight[mlp.in_rows(torch.arange(64)), 0] = 0.3
            mlp.fc.weight[mlp.in_rows(torch.arange(64, 128)), 1] = 3.0
            loud_rows, _ = attn.group_rows(torch.tensor([1]))
            silent_rows, _ = attn.group_rows(torch.tensor([0]))
            attn.qkv.weight[loud_rows, 0] = 0.3
            attn.qkv.weight[silent_rows, 1] = 3.0
    x = 0.01 * torch.randn(4, T, d)
    x[..., 0] = 10 * torch.randn(4, T)
    return model, x


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("metric", ["magnitude", "wanda", "maxip"])
def test_metrics_rank_the_planted_neurons_and_heads(preset, metric):
    model, x = _planted(preset)
    K = model.args.n_kv_head
    method = make_sat(model, ffn_rate=1 - 64 / model.args.d_ff, head_rate=1 - 1 / K, ffn_multiple=1, metric=metric,
                      select="topk", schedule="constant", dense_final=0.0, stats_dense_pass=True)
    optimizer = make_optimizer(model)
    start(method, model, optimizer)
    rope = (model.rope_cos, model.rope_sin) if model.rope_cos is not None else None
    method.before_step(0)  # gathers statistics from the blocks' inputs
    for block in model.blocks:
        block.mlp(x)
        block.attn(x, rope)
    method.before_optimizer(0)
    method.after_optimizer(0)
    method.before_step(1)
    for block in model.blocks:
        expect_ffn = torch.arange(64, 128) if metric == "magnitude" else torch.arange(64)
        expect_head = torch.tensor([0]) if metric == "magnitude" else torch.tensor([1])
        assert torch.equal(block.mlp.active, expect_ffn)
        assert torch.equal(block.attn.active, expect_head)


def test_maxip_measures_only_computed_neurons_and_tries_unmeasured_ones_first():
    model, x = _planted("tiny")
    method = make_sat(model, ffn_rate=0.5, head_rate=0.5, metric="maxip", select="topk", schedule="constant",
                      dense_final=0.0)
    start(method, model, make_optimizer(model))
    seen = torch.zeros(model.args.d_ff, dtype=torch.bool)
    for step in range(2):
        method.before_step(step)
        kept = model.blocks[0].mlp.active
        assert not seen[kept].any()  # unmeasured neurons are tried before measured ones
        model.blocks[0].mlp(x)
        measured = method.stats["ffn_ip_w"][0] > 0
        assert torch.equal(measured, seen.index_fill(0, kept, True))
        seen = measured
        method.before_optimizer(step)
        method.after_optimizer(step)
    assert seen.all()


def test_state_dict_round_trip_gives_the_same_next_selections():
    model = make_model("tiny-llama")
    options = dict(metric="maxip", select="sample", ffn_multiple=32, schedule="constant", dense_final=0.0, seed=3)
    method = make_sat(model, **options)
    data = batches(4)
    _, optimizer = train(model, method, data[:3])
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)

    def next_selection(m, mdl):
        picks = []
        for step in (3, 4):
            m.before_step(step)
            picks.append([(b.mlp.active.clone(), b.attn.active.clone()) for b in mdl.blocks])
            m.after_optimizer(step)
        return picks

    copy_model = copy.deepcopy(model)
    expected = next_selection(method, model)
    resumed = make_sat(copy_model, **options)
    start(resumed, copy_model, make_optimizer(copy_model), first_step=3)
    resumed.load_state_dict(state)  # after start(), as the trainer does
    got = next_selection(resumed, copy_model)
    assert all(torch.equal(a, b) for ea, ga in zip(expected, got) for e, g in zip(ea, ga) for a, b in zip(e, g))
    fresh = make_sat(copy.deepcopy(model), **options)  # same seed, no statistics: a different choice
    start(fresh, fresh_model := copy.deepcopy(model), make_optimizer(fresh_model))
    other = next_selection(fresh, fresh_model)
    assert not all(torch.equal(a, b) for ea, ga in zip(expected, other) for e, g in zip(ea, ga) for a, b in zip(e, g))


def test_each_steps_selection_lands_where_cuda_graphs_recorded_it():
    """A new selection every step, at a constant rate: the kept indices change, the tensors the modules read them
    from do not (CUDA graphs replay reading `active` at its recorded address; a moved tensor costs a re-recording)."""
    model = make_model("tiny-llama")
    method = make_sat(model, select="sample", schedule="constant", dense_final=0.0, seed=3)
    start(method, model, make_optimizer(model))
    seen = []
    for step in range(4):
        method.before_step(step)
        seen.append([(m.active.data_ptr(), m.active.clone()) for b in model.blocks for m in (b.mlp, b.attn)])
        method.after_optimizer(step)
    assert all([ptr for ptr, _ in step] == [ptr for ptr, _ in seen[0]] for step in seen)
    assert not all(torch.equal(a, b) for step in seen[1:] for (_, a), (_, b) in zip(step, seen[0]))


def test_flops_and_metrics():
    model = make_model("tiny")
    method = make_sat(model, total_steps=10, schedule="constant", metric="magnitude", exempt_layers=[0])
    dense = method.dense_flops_per_token()
    assert method.flops_per_token(9) == dense  # dense_final
    m = method.metrics(0)
    assert m["sat_ffn_rate"] == 0.5 and m["sat_head_rate"] == 0.5
    # One of two layers at half its FFN and half its heads: a quarter of the layers' FLOPs saved.
    from sparsetrain.nn.model import flops_per_token
    parts = flops_per_token(model.args, T)
    layer_flops = parts["ffn"] + parts["attn_linear"] + parts["attn_scores"]
    assert m["sat_flops_saved"] == pytest.approx(0.25 * 3 * layer_flops / dense)
    counted = make_sat(model, total_steps=10, schedule="constant", metric="maxip")
    assert counted.flops_per_token(0) > make_sat(model, total_steps=10, schedule="constant").flops_per_token(0)


@pytest.mark.parametrize("options, message", [
    (dict(ffn_rate=1.0), "outside [0, 1)"),
    (dict(head_rate=-0.1), "outside [0, 1)"),
    (dict(head_rate=0.8), "keeps none of the 2 kv-head groups"),
    (dict(ffn_rate=0.9999), "keeps none of the 352 FFN neurons"),
    (dict(metric="random"), "unknown method.metric"),
    (dict(select="greedy"), "unknown method.select"),
    (dict(schedule="cosine"), "unknown method.schedule"),
    (dict(exempt_layers=[2]), "exempt_layers"),
    (dict(ladder_start=0.95), "ladder_start"),
    (dict(dense_warmup=0.6, dense_final=0.5), "dense_warmup"),
    (dict(stats_fraction=0.0), "stats_fraction"),
    (dict(ffn_multiple=0), "ffn_multiple"),
    (dict(rate=0.5), "unknown config key 'method.rate'"),
    (dict(ffn_rate="half"), "method.ffn_rate must be float"),
    (dict(compiled_stash="yes"), "method.compiled_stash must be auto, true or false, got 'yes'"),
])
def test_bad_options_raise_user_error(options, message):
    model = make_model("tiny-llama")
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        SAT.from_config({"name": "sat", **options}, model.args, T)


def test_freeze_omitted_off_lets_adamw_move_omitted_weights():
    """The ablation switch: without the stash, AdamW's momentum moves omitted rows (what the default prevents)."""
    model = make_model("tiny")
    method = make_sat(model, total_steps=4, dense_warmup=0.5, dense_final=0.0, schedule="constant",
                      ffn_multiple=1, metric="magnitude", select="topk", freeze_omitted=False)
    data = batches(3)
    _, optimizer = train(model, method, data[:2])
    method.before_step(2)
    mlp = model.blocks[0].mlp
    omitted = torch.ones(mlp.d_ff, dtype=torch.bool)
    omitted[mlp.active] = False
    before = mlp.fc.weight.detach().clone()
    model(*data[2]).backward()
    method.before_optimizer(2)
    optimizer.step()
    method.after_optimizer(2)
    assert not torch.equal(before[omitted], mlp.fc.weight.detach()[omitted])


@pytest.mark.parametrize("value, compiled", [("auto", False), (True, True), (False, False)])
def test_compiled_stash_auto_is_eager_on_the_cpu(value, compiled):
    """`auto` (the default) compiles the stash on a GPU only; true and false force it."""
    model = make_model("tiny")
    method = make_sat(model, compiled_stash=value)
    assert make_sat(model).options.compiled_stash == "auto"
    start(method, model, make_optimizer(model))
    method.before_step(0)
    method.before_optimizer(0)
    assert method._frozen.compiled is compiled


def train_both(preset, first: dict, second: dict):
    """The same SAT run (6 steps, a rate change halfway) with two sets of freeze options: both models, optimizers."""
    runs = []
    for options in (first, second):
        model = make_model(preset)
        method = make_sat(model, total_steps=6, ladder_start=0.3, ladder_steps=1, dense_final=0.0, ffn_multiple=1,
                          **options)
        _, optimizer = train(model, method, batches(6))
        runs.append((model, optimizer))
    return runs


def assert_same_training(runs):
    (a, opt_a), (b, opt_b) = runs
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), (name, key)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_compiled_stash_freezes_exactly_what_the_eager_one_does(preset):
    """The compiled stash (two compiled calls) leaves the same weights and AdamW moments as the eager one, step for
    step, from the first step (moments created by the step) through a rate change (other slice shapes)."""
    assert_same_training(train_both(preset, dict(freeze_by="stash", compiled_stash=False),
                                    dict(freeze_by="stash", compiled_stash=True)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_masked_update_is_bit_identical_to_the_stash(preset):
    """The masked AdamW update (the default, uncompiled on the CPU) trains bit for bit what stash + AdamW's own
    step + restore trains: weights, both moments and step counts, through a rate change."""
    assert_same_training(train_both(preset, dict(freeze_by="stash", compiled_stash=False),
                                    dict(freeze_by="mask", compiled_stash=False)))

