"""The benchmark suite and its report, on tiny corpora: every part with --quick, the report on what they wrote."""
import ast
import json
import lzma
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.data.prepare import export_jsonl, prepare
from sparsetrain.data.tokens import TokenData
from sparsetrain.errors import UserError
from sparsetrain.methods import REGISTRY
from sparsetrain.methods.base import Dense, DenseOptions
from sparsetrain_bench.comparison import iso_loss
from sparsetrain_bench.context import Context
from sparsetrain_bench.corpora import prepare_corpus, random_tokens
from sparsetrain_bench.report import TARGETS, evaluate_targets, load_results, write_report
from sparsetrain_bench.runs import CompileClock, code_base, steady_times
from sparsetrain_bench.suite import PARTS, run_part


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_english(folder, max_bytes=250_000):
    """Real English: the docstrings of standard-library modules (read with ast, nothing imported)."""
    folder.mkdir()
    total = 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))]
        text = "\n\n".join(d for d in docs if d)
        if text:
            (folder / f"{path.stem}.txt").write_text(text)
            total += len(text)
        if total > max_bytes:
            break


def add_kernel_doc_files(code_jsonl_xz, files=40, functions=8):
    """C files with documented functions (the fine-tuning pairs of sat-sft), appended to the code corpus."""
    with lzma.open(code_jsonl_xz, "at", encoding="utf-8") as f:
        for i in range(files):
            text = "".join(f"/**\n * add_{i}_{j}() - add {j} to a\n * @a: a number\n */\nint add_{i}_{j}(int a)\n{{\n"
                           f"\treturn a + {j};\n}}\n\n" for j in range(functions))
            f.write(json.dumps({"name": f"kdoc/{i}.c", "text": text}) + "\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The carried files of a GPU call in miniature: code and English JSONL (xz) and one shared tokenizer."""
    root = tmp_path_factory.mktemp("suite")
    carry = root / "carry"
    write_english(root / "english_text")
    export_jsonl("stdlib", carry / "code.jsonl.xz", max_bytes=300_000, progress=False)
    add_kernel_doc_files(carry / "code.jsonl.xz")
    export_jsonl(str(root / "english_text"), carry / "english.jsonl.xz", progress=False)
    tok = root / "tok"
    prepare(str(carry / "code.jsonl.xz"), tok, vocab_size=512, max_bytes=100_000, progress=False)
    shutil.copy(tok / "tokenizer.json", carry / "tokenizer.json")
    dirs = {"out": root / "out", "data_dir": root / "data", "work_dir": root / "work", "carry": carry}
    run_part("prepare-data", quick=True, **dirs)
    return dirs


@pytest.fixture(scope="module")
def results(env):
    """Every part, --quick, in this process, as `sparsetrain bench --suite all` runs them (the suite is the slowest
    fixture of the tests: it runs once, and the CLI test reads what it wrote)."""
    assert main(["bench", "--suite", "all", "--quick", "--out", str(env["out"]), "--data-dir", str(env["data_dir"]),
                 "--work-dir", str(env["work_dir"]), "--carry", str(env["carry"])]) == 0
    return {name: json.loads((env["out"] / f"{name}.json").read_text()) for name in PARTS if name != "prepare-data"}


def test_every_part_writes_its_json(env, results):
    for name, r in results.items():
        on_disk = json.loads((env["out"] / f"{name}.json").read_text())
        assert on_disk["part"] == name and on_disk["quick"] is True
        assert on_disk["command"].startswith(f"sparsetrain bench --suite {name} --quick --out ")
        methods = PARTS[name].methods
        if all(m in REGISTRY for m in methods):
            assert on_disk["status"] == "done"
        else:  # ssd / mst while they are not registered
            assert on_disk["status"] == "skipped"
            assert all(f"'{m}'" in on_disk["message"] for m in methods if m not in REGISTRY)


def test_prepare_data_shares_the_tokenizer_and_keeps_prepared_corpora(env):
    for corpus in ("code", "english"):
        d = env["data_dir"] / corpus
        assert TokenData(d).meta["val_tokens"] >= 2049  # the quick evaluation: 2048 tokens
        assert (d / "tokenizer.json").read_bytes() == (env["data_dir"] / "code" / "tokenizer.json").read_bytes()
    before = os.stat(env["data_dir"] / "code" / "train.bin").st_mtime_ns
    run_part("prepare-data", quick=True, **env)
    assert os.stat(env["data_dir"] / "code" / "train.bin").st_mtime_ns == before


def test_prepare_data_refuses_a_corpus_of_another_tokenizer(env, tmp_path):
    carry = tmp_path / "carry"
    shutil.copytree(env["carry"], carry)
    other = tmp_path / "other"
    prepare(str(carry / "english.jsonl.xz"), other, vocab_size=300, max_bytes=50_000, progress=False)
    shutil.copy(other / "tokenizer.json", carry / "tokenizer.json")
    with pytest.raises(UserError, match="another tokenizer"):
        run_part("prepare-data", quick=True, **{**env, "carry": carry, "out": tmp_path / "out"})


def test_prepare_corpus_raises_the_validation_fraction_until_the_held_out_set_is_large_enough(env, tmp_path):
    source, tok = env["carry"] / "english.jsonl.xz", env["carry"] / "tokenizer.json"
    small = prepare_corpus(source, tmp_path / "a", tok, min_val_tokens=1, val_fraction=0.02)
    need = 3 * small["val_tokens"]
    meta = prepare_corpus(source, tmp_path / "b", tok, min_val_tokens=need, val_fraction=0.02)
    assert meta["val_tokens"] >= need and meta["val_fraction"] > 0.02


def test_steady_times_takes_out_at_most_the_compile_time_where_it_was_spent():
    # 10-step windows of 1 s; 30 s extra in the first (a compile), 20 s in the fifth (a recompile, or a method's own
    # one-off work), then a real 2x slower phase.
    per_window = [31.0, 1.0, 1.0, 1.0, 21.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    records, t = [], 0.0
    for i, w in enumerate(per_window):
        t += w
        records.append({"step": 10 * (i + 1), "train_time": t})
    raw = [r["train_time"] for r in records]
    assert steady_times(records, compile_s=0.0) == pytest.approx(raw)
    steady = steady_times(records, compile_s=50.0)
    assert steady[-1] == pytest.approx(raw[-1] - 50)
    assert steady[:4] == pytest.approx([1, 2, 3, 4])  # the slower phase at the end is not taken for compilation
    more = steady_times(records, compile_s=80.0)  # more compile time than the spikes hold: only the spikes go
    assert more == pytest.approx(steady)
    part = steady_times(records, compile_s=25.0)  # a compile only explains half: the rest stays
    assert part[-1] == pytest.approx(raw[-1] - 25)
    for times in (steady, part):
        assert all(b > a for a, b in zip(times, times[1:]))
        assert all(s <= r for s, r in zip(times, raw))


def test_compile_clock_counts_training_compilations_only():
    f = torch.compile(lambda x: (x.sin() * 2).sum(), backend="aot_eager")
    with CompileClock() as clock:
        with torch.no_grad():  # an evaluation: not training time
            f(torch.randn(3))
        assert clock.count == 0
        x = torch.randn(4, requires_grad=True)
        f(x).backward()
    assert clock.count >= 1 and clock.seconds > 0
    seconds = clock.seconds
    f(torch.randn(5, requires_grad=True))  # outside the clock
    assert clock.seconds == seconds


class _GraphTrees:
    """Stands in for torch's CUDA graph tree manager: its `record_function` fires the recording callbacks, and it
    knows each function's mode (forward, backward, inference)."""

    def __init__(self):
        from torch._inductor.cudagraph_trees import CompilationMode
        self.id_to_mode = {"forward": CompilationMode.FORWARD, "backward": CompilationMode.BACKWARD,
                           "inference": CompilationMode.INFERENCE}

    def record_function(self, new_inputs, function_id):
        from torch._dynamo.callback import CallbackTrigger, callback_handler
        with callback_handler.install_callbacks(CallbackTrigger.CUDAGRAPH_RECORDING, "test"):
            time.sleep(0.02)


def _record_graph(mode: str):
    with torch.no_grad():  # as inside autograd: grad is off while a training graph records
        _GraphTrees().record_function([], mode)


def test_compile_clock_counts_the_recording_of_training_graphs_not_of_evaluation_graphs():
    with CompileClock() as clock:
        _record_graph("inference")  # an evaluation's graph: not training time
        assert clock.count == 0 and clock.recording_seconds == 0
        _record_graph("forward")
        _record_graph("backward")
    assert clock.count == 2 and clock.recording_seconds == clock.seconds >= 0.04


def test_step_parts_time_dense_first_and_give_ratios_to_it(results):
    for name in ("dense-step", "sat-step", "ssd-step"):
        rows = results[name]["rows"]
        assert rows[0]["method"] == "dense" and rows[0]["speedup"] == 1.0
        for r in rows:
            assert r["speedup"] == pytest.approx(rows[0]["step_s"] / r["step_s"])
    sat = results["sat-step"]["rows"][1]
    assert sat["method"] == "sat" and sat["flops_ratio"] > 1.2  # half the FFN and heads omitted every step
    stash = results["sat-step"]["rows"][2]
    assert stash["method"] == "sat-stash" and stash["method_options"]["freeze_by"] == "stash"
    assert stash["flops_ratio"] == sat["flops_ratio"]  # the same omission, frozen another way
    floor, mst = results["sat-step"]["rows"][3:5]
    assert floor["method"] == "sat-rate0" and floor["flops_ratio"] == 1.0
    assert mst["method"] == "mst-neuron" and mst["flops_ratio"] > 1.2
    ssd = results["ssd-step"]["rows"][1]
    assert ssd["method"] == "ssd" and ssd["flops_ratio"] > 1.2  # 4 of 16 experts: a quarter of the FFN
    assert results["ssd-step"]["shape"]["model"] == {"activation": "relu2"}


def test_report_judges_the_step_target_by_any_variant_on_every_model(results, tmp_path):
    part = json.loads(json.dumps(results["sat-step"]))
    part["quick"] = False
    # two models: each variant's speed-ups in row order -> met when one variant is >= 1.6x on both
    rows = [("gpt2-medium", "dense"), ("gpt2-medium", "sat"), ("gpt2-medium", "sat-eager-stash"),
            ("llama-1b", "dense"), ("llama-1b", "sat"), ("llama-1b", "sat-eager-stash")]
    for sat, stash, met in [((1.7, 1.6), (1.0, 1.0), "yes"), ((1.7, 1.5), (1.5, 1.7), "**no**"),
                            ((1.2, 1.4), (1.6, 1.9), "yes")]:
        speedups = {"sat": list(sat), "sat-eager-stash": list(stash)}
        part["rows"] = [{"preset": p, "method": m, "speedup": 1.0 if m == "dense" else speedups[m].pop(0)}
                        for p, m in rows]
        path = tmp_path / "sat-step.json"
        path.write_text(json.dumps(part))
        row = next(r for r in evaluate_targets(load_results([path])) if r["what"] == "SAT step at omission 0.5")
        assert row["met"] == met, (sat, stash)
        assert f"sat: gpt2-medium {sat[0]:.2f}x, llama-1b {sat[1]:.2f}x" in row["measured"]


def test_report_judges_ssd_moe_inference_by_ffn_speed_and_validation_gap(results, tmp_path):
    part = json.loads(json.dumps(results["ssd-pretrain"]))
    part["quick"] = False
    what = "SSD model run as MoE, FFN speed at val loss within 2%"
    for speedup, gap, met in [(2.2, 0.01, "yes"), (2.2, 0.05, "**no**"), (1.5, 0.0, "**no**")]:
        part["moe_inference"]["ssd"].update(ffn_speedup=speedup, val_gap=gap)
        path = tmp_path / "ssd-pretrain.json"
        path.write_text(json.dumps(part))
        row = next(r for r in evaluate_targets(load_results([path])) if r["what"] == what)
        assert row["met"] == met, (speedup, gap)
        assert f"FFN {speedup:.2f}x" in row["measured"]


def check_contenders(part, baseline="dense"):
    """Invariants of a trained part: same tokens and held-out set, ratios to dense, curves, copied metrics."""
    cs = {c["name"]: c for c in part["contenders"]}
    base = cs[baseline]
    for c in part["contenders"]:
        assert math.isfinite(c["val_loss"]) and c["wallclock"] > 0 and c["flops"] > 0
        assert c["train_time"] - c["compile_s"] - 1e-9 <= c["wallclock"] <= c["train_time"] + 1e-9
        assert c["config"]["train"]["eval_tokens"] == base["config"]["train"]["eval_tokens"]
        assert c["curve"][-1]["val_loss"] == pytest.approx(c["val_loss"])
        if c["role"] == "base":
            continue
        assert c["corpus"] == base["corpus"]
        assert c["val_gap"] == pytest.approx((c["val_loss"] - base["val_loss"]) / base["val_loss"])
        assert c["speedup"] == pytest.approx(base["wallclock"] / c["wallclock"])
        assert c["flops_ratio"] == pytest.approx(base["flops"] / c["flops"])
    return cs


def test_sat_cpt_continues_the_code_base_on_english_with_the_same_tokens(env, results):
    cs = check_contenders(results["sat-cpt"])
    assert cs["base"]["corpus"] == "code" and cs["dense"]["corpus"] == "english"
    assert list(cs) == ["base", "dense-0.5x", "dense", "dense-1.5x", "dense-2x", "sat", "sat-sample"]
    assert cs["dense"]["tokens"] == cs["sat"]["tokens"] == cs["sat-sample"]["tokens"]
    assert cs["sat"]["config"]["method"].get("select", "topk") == "topk"  # the default
    assert cs["sat-sample"]["config"]["method"]["select"] == "sample"
    for name in ("dense", "sat", "sat-sample"):
        train_cfg = cs[name]["config"]["train"]
        assert train_cfg["init_from"] == cs["base"]["run_dir"]
        assert train_cfg["seed"] == cs["dense"]["config"]["train"]["seed"] != cs["base"]["config"]["train"]["seed"]
        assert cs[name]["curve"][0]["val_loss"] == pytest.approx(results["sat-cpt"]["start_val_loss"])
        assert (env["out"] / cs[name]["metrics"]).is_file()
    rates = [r["sat_ffn_rate"] for r in cs["sat"]["curve"] if "sat_ffn_rate" in r]
    assert rates[0] == 0.5 and rates[-1] == 0.0 and rates == sorted(rates, reverse=True)  # the LORS ladder
    assert cs["sat"]["flops"] < cs["dense"]["flops"]


def test_sat_sft_fine_tunes_the_code_base_on_kernel_doc_pairs(env, results):
    part = results["sat-sft"]
    cs = check_contenders(part)
    assert cs["base"]["corpus"] == "code" and cs["dense"]["corpus"] == cs["sat"]["corpus"] == "sft"
    assert cs["dense"]["tokens"] == cs["sat"]["tokens"] == cs["sat-sample"]["tokens"]
    assert cs["sat"]["config"]["method"]["name"] == cs["sat-sample"]["config"]["method"]["name"] == "sat"
    for name in ("dense", "sat", "sat-sample"):
        assert cs[name]["config"]["train"]["init_from"] == cs["base"]["run_dir"]
        assert cs[name]["curve"][0]["val_loss"] == pytest.approx(part["start_val_loss"])
        assert cs[name]["val_loss"] < part["start_val_loss"]  # the format is learnt: loss on the functions falls
    meta = json.loads((env["data_dir"] / "sft" / "meta.json").read_text())
    assert meta["kind"] == "sft" and meta["examples_file"]["examples"] == 40 * 8 and meta["val"]["sequences"] > 0


def test_continuations_are_read_against_a_dense_continuation_frontier(results):
    """sat-cpt, sat-sft and upcycle continue the base dense at four budgets (a wsd trunk and its branches, every
    curve starting at the base's loss) and report each method's speed-up at equal quality."""
    for name, methods in (("sat-cpt", ["sat", "sat-sample"]), ("sat-sft", ["sat", "sat-sample"]), ("upcycle", ["upcycle"])):
        part = results[name]
        cs = check_contenders(part)
        assert list(cs) == ["base", "dense-0.5x", "dense", "dense-1.5x", "dense-2x", *methods]
        base = cs["base"]
        for c in list(cs.values())[1:]:
            assert c["config"]["train"]["schedule"] == "wsd" and c["config"]["train"]["init_from"] == base["run_dir"]
            assert c["curve"][0]["step"] == 0 and c["curve"][0]["flops"] == 0.0
        assert [cs[n]["steps"] for n in ("dense-0.5x", "dense", "dense-1.5x", "dense-2x")] == [8, 16, 24, 32]
        assert all(cs[m]["steps"] == cs["dense"]["steps"] for m in methods)
        for m in methods:
            assert set(part["iso_loss"][m]) == {"wallclock", "flops"}
    moe = next(c for c in results["upcycle"]["contenders"] if c["name"] == "upcycle")
    assert moe["config"]["method"]["experts"] == 8
    # Exact upcycling computes what the base did: the MoE's curve starts at the base's loss, as dense's.
    assert moe["curve"][0]["val_loss"] == next(c for c in results["upcycle"]["contenders"]
                                               if c["role"] == "base")["val_loss"]


def test_the_continuation_parts_share_one_code_base(env, results):
    parts = ("sat-cpt", "sat-sft", "upcycle")
    bases = [next(c for c in results[p]["contenders"] if c["role"] == "base") for p in parts]
    assert not bases[0].get("reused") and bases[1]["reused"] and bases[2]["reused"]
    assert len({b["run_dir"] for b in bases}) == 1 and len({b["val_loss"] for b in bases}) == 1
    for part in ("sat-sft", "upcycle"):
        assert (env["out"] / part / "base" / "metrics.jsonl").is_file()


def test_a_base_of_another_config_is_trained_again(env, results, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(env["work_dir"] / "base-code", work / "base-code")
    ctx = Context("upcycle", tmp_path / "out", env["data_dir"], work, env["carry"], True, "auto", 1.0)
    assert code_base(ctx)["reused"]
    saved = work / "base-code" / "result.json"
    result = json.loads(saved.read_text())
    result["asked"]["config"]["train"]["seed"] += 1  # a base trained otherwise than this part would
    saved.write_text(json.dumps(result))
    again = code_base(ctx)
    assert not again.get("reused") and again["run_dir"] == str(work / "base-code" / "run")
    assert code_base(ctx)["reused"]
    result = json.loads(saved.read_text())
    result["asked"]["data"]["train.bin"] = "0" * 64  # the same config on other tokens (a corpus prepared again)
    saved.write_text(json.dumps(result))
    assert not code_base(ctx).get("reused")


class StandIn(Dense):
    """Dense under a method's name, whatever its options: runs a part whose method is not registered yet."""

    @classmethod
    def from_config(cls, method_cfg, args, seq_len):
        return cls(DenseOptions(), args, seq_len)


@pytest.mark.parametrize("name, contenders", [("ssd-pretrain", ["dense", "ssd"]),
                                              ("mst-pretrain", ["dense", "mst-weight", "mst-neuron"])])
def test_pretrain_parts_train_every_contender_on_the_same_tokens(env, results, monkeypatch, tmp_path, name,
                                                                  contenders):
    part = results[name]
    if part["status"] == "skipped":
        for m in PARTS[name].methods:
            monkeypatch.setitem(REGISTRY, m, StandIn)
        part = run_part(name, quick=True, **{**env, "out": tmp_path})
    cs = check_contenders(part)
    assert list(cs) == ["dense-0.5x", "dense", "dense-1.5x", "dense-2x", *contenders[1:]]  # dense's frontier first
    assert len({cs[c]["tokens"] for c in contenders}) == 1
    assert len({json.dumps(c["config"]["model"]) for c in cs.values()}) == 1  # the same model for all
    assert all(c["config"]["model"]["activation"] == "relu2" for c in cs.values())  # one frontier for both parts
    # --quick makes the methods switch phases / update their topology within its few steps.
    if name == "ssd-pretrain":
        assert cs["ssd"]["config"]["model"]["activation"] == "relu2"
        assert cs["ssd"]["config"]["method"]["schedule"] == "fixed"
        # Both trained models run as MoEs: in dense mode the permuted model is the same function as the trained one.
        for c in contenders:
            mi = part["moe_inference"][c]
            assert mi["val_loss_dense"] == pytest.approx(cs[c]["val_loss"], abs=1e-4)
            assert mi["val_loss_moe"] != mi["val_loss_dense"]  # top-4 of 16 drops neurons
            assert mi["ffn_ms_moe"] > 0 and mi["prefill_ms_dense"] > 0
            assert math.isfinite(mi["val_loss_moe_trained"]) and mi["val_loss_moe_trained"] != mi["val_loss_moe"]
    else:
        assert cs["mst-weight"]["config"]["method"]["update_every"] == 4


def test_a_part_whose_method_is_not_registered_is_skipped_with_a_message(env, monkeypatch, tmp_path):
    monkeypatch.delitem(REGISTRY, "sat")
    r = run_part("sat-cpt", quick=True, **{**env, "out": tmp_path})
    assert r["status"] == "skipped" and "'sat' is not registered" in r["message"]
    assert json.loads((tmp_path / "sat-cpt.json").read_text())["status"] == "skipped"


def test_user_mistakes(env, tmp_path):
    with pytest.raises(UserError, match="unknown suite part"):
        run_part("sat-ctp", quick=True, **env)
    with pytest.raises(UserError, match="prepare-data"):
        run_part("upcycle", quick=True, **{**env, "data_dir": tmp_path / "nothing", "out": tmp_path / "o"})
    foreign = tmp_path / "work" / "upcycle"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("not the suite's")
    with pytest.raises(UserError, match="not made by the suite"):
        run_part("upcycle", quick=True, **{**env, "work_dir": tmp_path / "work", "out": tmp_path / "o"})
    assert (foreign / "keep.txt").is_file()


def test_report_has_every_target_and_the_plots(env, results, tmp_path):
    paths = [env["out"] / f"{name}.json" for name in results if name != "sat-step"]
    report = write_report(paths, tmp_path).read_text()
    for t in TARGETS:
        assert f"| {t.what} | {t.target} |" in report
    rows = {r["what"]: r for r in evaluate_targets(load_results(paths))}
    assert rows["SAT step at omission 0.5"]["measured"] == "not measured"  # its JSON was left out
    sat_cpt = rows["SAT continual pre-training (code -> English): speed-up at equal quality, wall-clock"]
    assert sat_cpt["met"] == "quick run, not a measurement"
    assert results["sat-cpt"]["command"] in sat_cpt["command"]
    for png in ("loss.png", "steps.png", "schedules.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "![validation loss](loss.png)" in report
    assert "| trained as | val loss dense | val loss as MoE |" in report  # ssd-pretrain's MoE inference table
    assert "| method | parallel | steps | batch | largest loss gap |" in report  # two-gpu


def test_report_gives_the_fine_tuning_rows_in_words(env, results, tmp_path):
    report = write_report([env["out"] / "prepare-data.json"], tmp_path).read_text()
    meta = json.loads((env["data_dir"] / "sft" / "meta.json").read_text())
    assert f"sft: {meta['examples_file']['examples']:,} kernel-doc pairs in {meta['train']['sequences']:,} train" in report
    assert "| code |" in report and "| english |" in report and "| sft |" not in report


def test_report_judges_iso_loss_targets_exactly_or_by_a_lower_bound(results, tmp_path):
    """A speed-up at equal quality meets its target when it is at least the target exactly or as a lower bound
    (beyond dense's frontier); an upper bound (below the frontier) never does; either SAT variant may meet it."""
    part = json.loads(json.dumps(results["sat-cpt"]))
    part["quick"] = False
    what = "SAT continual pre-training (code -> English): speed-up at equal quality, wall-clock"
    cases = [(("exact", 1.5), ("exact", 1.0), "yes"), (("upper bound", 2.0), ("exact", 1.0), "**no**"),
             (("lower bound", 1.4), ("exact", 1.0), "yes"), (("exact", 1.1), ("exact", 1.35), "yes"),
             (("lower bound", 1.2), ("upper bound", 1.9), "**no**")]
    status = {"exact": "on", "upper bound": "below", "lower bound": "beyond"}
    for (bound, speedup), (topk_bound, topk_speedup), met in cases:
        for name, b, x in (("sat", bound, speedup), ("sat-sample", topk_bound, topk_speedup)):
            sign = {"exact": "", "upper bound": "<= ", "lower bound": ">= "}[b]
            part["iso_loss"][name]["wallclock"].update(bound=b, speedup=x, status=status[b], label=f"{sign}{x:.2f}x")
        path = tmp_path / "sat-cpt.json"
        path.write_text(json.dumps(part))
        row = next(r for r in evaluate_targets(load_results([path])) if r["what"] == what)
        assert row["met"] == met, (bound, speedup, topk_bound, topk_speedup)
        assert f"sat: {'<= ' if bound == 'upper bound' else '>= ' if bound == 'lower bound' else ''}{speedup:.2f}x" \
            in row["measured"]


def test_report_refuses_files_that_are_not_suite_results(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(UserError, match="not a suite result"):
        write_report([bad], tmp_path / "r")


def test_cli_suite_all_runs_every_part_and_writes_the_report(env, results):
    assert sorted(p.stem for p in env["out"].glob("*.json")) == sorted(PARTS)
    assert (env["out"] / "report" / "report.md").is_file()


def test_two_gpu_part_compares_one_process_with_two_under_torchrun(env, results):
    part = results["two-gpu"]
    rows = {(r["method"], r["parallel"]): r for r in part["scaling"]}
    assert set(rows) == {("dense", "ddp"), ("dense", "fsdp"), ("dense-accum4", "ddp"), ("dense-accum4", "fsdp"),
                         ("upcycle", "ddp"), ("upcycle", "fsdp")}
    assert rows["dense-accum4", "ddp"]["batch_size"] == 4 * rows["dense", "ddp"]["batch_size"]
    kept = env["work_dir"] / "two-gpu-launches"
    accum = json.loads(next(kept.glob("dense-accum4-1-*.json")).read_text())
    assert accum[0]["tokens"] == 4 * json.loads(next(kept.glob("dense-1-*.json")).read_text())[0]["tokens"]
    link = part["link"]
    assert link["topology"]["gpus"] == 0 and link["topology"]["peer_access"] == {}
    (ar,) = link["all_reduce"]  # the quick size, between 2 gloo processes
    assert ar["size_mb"] == 1 and ar["busbw_gb_s"] == pytest.approx(ar["algbw_gb_s"])  # 2 (n - 1) / n = 1 at n = 2
    for r in rows.values():
        assert len(r["losses_1"]) == len(r["losses_2"]) > 1
        assert r["loss_match"] and r["max_loss_gap"] < 1e-3  # fp32 on gloo: the same training
        assert r["scaling"] == pytest.approx(r["tokens_per_s_2"] / r["tokens_per_s_1"])


def test_two_gpu_part_reuses_finished_launches_in_the_same_work_folder(env, results, tmp_path, monkeypatch):
    """A second call on the same machine (a time limit cut the first) launches nothing that already finished."""
    import subprocess

    run = subprocess.run

    def no_launch(cmd, **k):
        if "sparsetrain_bench.interconnect" in cmd:  # the link is timed again on every call
            return run(cmd, **k)
        raise AssertionError("launched again")

    monkeypatch.setattr(subprocess, "run", no_launch)
    again = run_part("two-gpu", quick=True, **{**env, "out": tmp_path})
    assert again["scaling"] == results["two-gpu"]["scaling"]


def test_two_gpu_part_records_a_failed_launch_and_goes_on(env, tmp_path, monkeypatch):
    import subprocess

    calls = []

    def failing(cmd, **k):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nRuntimeError: NCCL error: unhandled\n")

    monkeypatch.setattr(subprocess, "run", failing)
    part = run_part("two-gpu", quick=True, **{**env, "out": tmp_path, "work_dir": tmp_path / "work"})
    assert part["status"] == "done" and len(part["scaling"]) == 6  # every method and mode tried
    assert len(calls) == 1 + 6  # the link, then one launch per row
    assert all(not r["loss_match"] and "NCCL error" in r["error"] for r in part["scaling"])
    assert "NCCL error" in part["link"]["all_reduce_error"]
    text, met = next(t for t in TARGETS if t.part == "two-gpu").check(part)
    assert "dense ddp failed" in text and met is False
    report = write_report([tmp_path / "two-gpu.json"], tmp_path / "report").read_text()
    assert "dense (fsdp) failed: `RuntimeError: NCCL error: unhandled`" in report
    assert "The all-reduce timing failed: `RuntimeError: NCCL error: unhandled`" in report


def test_report_shows_the_link_between_the_gpus(results, tmp_path):
    part = json.loads(json.dumps(results["two-gpu"]))
    part["link"]["topology"] |= {"gpus": 2, "peer_access": {"0->1": False, "1->0": False},
                                 "nvidia_smi_topo": "        GPU0    GPU1\nGPU0     X      PHB"}
    path = tmp_path / "two-gpu.json"
    path.write_text(json.dumps(part))
    report = write_report([path], tmp_path / "report").read_text()
    assert "Peer access between the GPUs: 0->1 no, 1->0 no." in report
    assert "| all-reduce MB | ms | algorithm GB/s | bus GB/s |" in report
    assert "```\n        GPU0    GPU1\nGPU0     X      PHB\n```" in report


def test_hsa_part_compares_each_pattern_with_dense_at_its_sequence_length(results):
    part = results["hsa-attention"]
    cs = {c["name"]: c for c in part["contenders"]}
    assert set(cs) == ({f"{n}-{t}" for n in ("dense", "local", "hybrid") for t in (64, 128)}
                       | {f"dense-{t}-{f}x" for f in ("0.5", "1.5", "2") for t in (64, 128)})  # dense's frontiers
    for t in (64, 128):  # each pattern against the frontier of its own sequence length
        for n in ("local", "hybrid"):
            assert cs[f"{n}-{t}"]["frontier"] == [f"dense-{t}-0.5x", f"dense-{t}", f"dense-{t}-1.5x", f"dense-{t}-2x"]
            assert set(part["iso_loss"][f"{n}-{t}"]) == {"wallclock", "flops"}
    for t in (64, 128):
        dense = cs[f"dense-{t}"]
        assert dense["config"]["train"]["seq_len"] == t and dense["speedup"] == 1.0
        for n in ("local", "hybrid"):
            c = cs[f"{n}-{t}"]
            assert c["tokens"] == dense["tokens"] and c["config"]["method"]["sparsity"] == 0.0
            assert c["speedup"] == pytest.approx(dense["wallclock"] / c["wallclock"])
            assert c["val_loss"] != dense["val_loss"]  # the pattern hides keys: a different model
            # Attention FLOPs count the 128 x 128 blocks computed: at these lengths one block, nothing skipped.
            assert c["flops"] == dense["flops"]


def test_run_parts_script_packs_every_part_and_keeps_what_a_cut_part_logged(env, tmp_path):
    """bench/run_parts.sh, as a GPU call runs it: each part under its own limit, everything in one tar."""
    import subprocess
    import sys
    import tarfile

    repo = Path(__file__).resolve().parents[1]
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    run_env = {**os.environ, "OUT": str(out), "DATA": str(env["data_dir"]), "CARRY": str(env["carry"]),
               "WORK": str(work), "QUICK": "1", "PYTHON": sys.executable}
    # sat-cpt gets 1 s: cut short before its JSON (the interpreter alone takes longer to start).
    res = subprocess.run(["bash", "bench/run_parts.sh", "prepare-data", "dense-step:120", "sat-cpt:1"], cwd=repo,
                         env=run_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    with tarfile.open(out / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"prepare-data.json", "dense-step.json", "log.txt"} <= names
    assert "sat-cpt.json" not in names
    log = res.stdout
    assert "== dense-step: exit 0" in log and "== sat-cpt: exit 124" in log


def test_run_parts_script_passes_part_args_to_training_parts(env, tmp_path):
    """PART_ARGS reaches a training part (a split contender with its budgets), as a 2-GPU call runs each half."""
    import json as json_mod
    import subprocess
    import sys
    import tarfile

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    out.mkdir()
    run_env = {**os.environ, "OUT": str(out), "DATA": str(env["data_dir"]), "WORK": str(tmp_path / "work"),
               "QUICK": "1", "PYTHON": sys.executable, "PART_ARGS": "--contenders dense --budgets 0.5 1"}
    res = subprocess.run(["bash", "bench/run_parts.sh", "mst-pretrain:300"], cwd=repo, env=run_env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    with tarfile.open(out / "results.tgz") as tar:
        part = json_mod.load(tar.extractfile("./mst-pretrain.json"))
    assert part["selected"] == ["dense"] and "--contenders dense --budgets 0.5 1" in part["command"]
    assert [c["name"] for c in part["contenders"]] == ["dense-0.5x", "dense"]


def test_pretrain_parts_read_each_method_against_a_dense_frontier(env, results):
    """ssd-pretrain and mst-pretrain train dense at four budgets (a wsd trunk and branches off it) and report each
    method's speed-up at equal quality in wall-clock and FLOPs; the report draws the frontiers and the bars."""
    for name, methods in (("ssd-pretrain", ["ssd"]), ("mst-pretrain", ["mst-weight", "mst-neuron"])):
        part = results[name]
        frontier = [c for c in part["contenders"] if c.get("role") == "frontier"]
        assert [c["name"] for c in frontier] == ["dense-0.5x", "dense", "dense-1.5x", "dense-2x"]
        assert [c["steps"] for c in frontier] == [10, 20, 30, 40]
        assert all(c["config"]["train"]["schedule"] == "wsd" for c in part["contenders"])
        trunk = frontier[-1]
        for c in frontier[:-1]:  # a branch: the trunk's curve up to its decay start, then its own steps
            start = c["branched_at"]
            assert [r["loss"] for r in c["curve"] if r["step"] <= start] == \
                [r["loss"] for r in trunk["curve"] if r["step"] <= start]
            assert c["flops"] == pytest.approx(trunk["flops"] * c["steps"] / trunk["steps"])  # dense: fixed per step
            assert 0 < c["wallclock"] < trunk["wallclock"]
        for m in methods:
            for cost in ("wallclock", "flops"):
                iso = part["iso_loss"][m][cost]
                assert iso["status"] in ("on", "below", "beyond") and iso["speedup"] > 0
                assert next(c for c in part["contenders"] if c["name"] == m)[f"iso_{cost}"] == iso["label"]
    report = write_report([env["out"] / "ssd-pretrain.json", env["out"] / "mst-pretrain.json"], env["out"] / "iso")
    text = report.read_text()
    assert "speed-up at equal quality" in text.lower() and "(iso-loss.png)" in text
    for f in ("iso-loss.png", "ssd-pretrain-frontier-wallclock.png", "mst-pretrain-frontier-flops.png"):
        assert (env["out"] / "iso" / f).stat().st_size > 1000


def test_the_speed_up_bars_name_the_part_of_a_method_in_several_parts(env, results, tmp_path, monkeypatch):
    """sat-cpt and sat-sft both hold "sat": each keeps its own bar and target."""
    import sparsetrain_bench.report as report
    drawn = {}
    monkeypatch.setattr(report, "plot_speedups", lambda bars, targets, path: drawn.update(bars=bars, targets=targets))
    report.plot_iso(load_results([env["out"] / f"{p}.json" for p in ("sat-cpt", "sat-sft", "ssd-pretrain")]), tmp_path)
    assert {k for k in drawn["bars"] if "sat\n" in k} == {
        f"{p}: sat\n{cost}" for p in ("sat-cpt", "sat-sft") for cost in ("wall-clock", "counted FLOPs")}
    assert "ssd\nwall-clock" in drawn["bars"]
    assert drawn["targets"]["sat-cpt: sat\nwall-clock"] != drawn["targets"]["sat-sft: sat\nwall-clock"]


@pytest.mark.parametrize("script,args", [
    ("moe_layer.py", ["--device", "cpu", "--quick"]),
    ("moe_step.py", ["--device", "cpu", "--quick", "--contenders", "ssd", "upcycle", "--kernels", "auto", "loop"]),
    ("moe_step.py", ["--device", "cpu", "--quick", "--contenders", "ssd", "upcycle", "--kernels", "auto",
                     "--cuda-graphs", "auto", "false"]),
    ("sat_phases.py", ["--device", "cpu", "--quick", "--variants", "uniform"]),
    ("step_in_training.py", ["--device", "cpu", "--quick", "--contenders", "sat", "mst-neuron-run"]),
    ("moe_inference.py", ["--device", "cpu", "--quick", "--experts", "4", "--top-k", "1", "2", "--kernels", "auto",
                          "loop"]),
    ("masked_update.py", ["--device", "cpu", "--quick"]),
    ("expert_gemms.py", ["--device", "cpu", "--quick", "--sweep", "--skew", "1"]),
    ("loss_kernel.py", ["--device", "cpu", "--quick"]),
    ("attention_kernel.py", ["--device", "cpu", "--quick"]),
    ("train_setting.py", ["--device", "cpu", "--quick", "--key", "loss_kernel", "--values", "torch", "auto"]),
])
def test_gpu_bench_scripts_run_their_cpu_smoke_test(script, args, tmp_path):
    """The GPU scripts of bench/ on tiny shapes: they run and write rows for every contender."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    if script in ("expert_gemms.py", "loss_kernel.py"):
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels themselves, on the CPU
    res = subprocess.run([sys.executable, str(repo / "bench" / script), *args, "--out", str(out)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    expected = {"moe_layer.py": 4, "moe_step.py": 5, "sat_phases.py": 2, "step_in_training.py": 3,
                "moe_inference.py": 4, "masked_update.py": 2, "expert_gemms.py": 32,
                "loss_kernel.py": 5, "attention_kernel.py": 4,
                "train_setting.py": 2}[script]
    assert len(rows) == expected


def test_a_pretrain_part_split_over_two_processes_merges_into_one_comparison(env, tmp_path):
    """--contenders runs the frontier in one process and a method in another (two GPUs at once on the machine);
    each calibrates its device; the report merges them, the method put in the frontier's device time by the ratio of
    the calibrations, and reads the method off the frontier as an unsplit run would."""
    common = {**env, "budgets": (0.5, 1.0, 1.5)}
    runs = {}
    for name, contenders in (("a", ("dense",)), ("b", ("mst-neuron",))):
        runs[name] = run_part("mst-pretrain", quick=True, contenders=contenders,
                              **{**common, "out": tmp_path / name, "work_dir": tmp_path / f"work-{name}"})
    a, b = runs["a"], runs["b"]
    assert [c["name"] for c in a["contenders"]] == ["dense-0.5x", "dense", "dense-1.5x"]
    assert [c["name"] for c in b["contenders"]] == ["mst-neuron"] and b["iso_loss"] == {}
    assert "--contenders mst-neuron --budgets 0.5 1 1.5" in b["command"]
    assert a["calibration"]["step_s"] > 0 and b["calibration"]["device"] == "cpu"
    merged = load_results([tmp_path / "a" / "mst-pretrain.json", tmp_path / "b" / "mst-pretrain.json"])["mst-pretrain"]
    factor = a["calibration"]["step_s"] / b["calibration"]["step_s"]
    (m,) = [c for c in merged["contenders"] if c["name"] == "mst-neuron"]
    assert m["calibration_factor"] == pytest.approx(factor)
    assert m["wallclock"] == pytest.approx(b["contenders"][0]["wallclock"] * factor)
    assert m["curve"][-1]["wallclock"] == pytest.approx(b["contenders"][0]["curve"][-1]["wallclock"] * factor)
    assert m["flops_ratio"] == pytest.approx(a["contenders"][1]["flops"] / m["flops"])
    # The merged speed-up is the one an unsplit comparison of the same numbers gives.
    alone = iso_loss([*json.loads(json.dumps(a["contenders"])), json.loads(json.dumps(m))])
    assert merged["iso_loss"]["mst-neuron"] == alone["mst-neuron"]
    assert m["iso_wallclock"] == alone["mst-neuron"]["wallclock"]["label"]
    assert any("calibration" in n for n in merged["notes"])
    write_report([tmp_path / "a" / "mst-pretrain.json", tmp_path / "b" / "mst-pretrain.json"], tmp_path / "r")
    with pytest.raises(UserError, match="2 of the 2 results hold the dense frontier"):
        load_results([tmp_path / "a" / "mst-pretrain.json", tmp_path / "a" / "mst-pretrain.json"])
    with pytest.raises(UserError, match="more than one result"):
        load_results([tmp_path / name / "mst-pretrain.json" for name in ("a", "b", "b")])


def test_split_and_budget_mistakes_are_one_line_errors(env, tmp_path):
    with pytest.raises(UserError, match="mst-nueron not in mst-pretrain; pick from dense, mst-weight, mst-neuron"):
        run_part("mst-pretrain", quick=True, contenders=("mst-nueron",), **env)
    with pytest.raises(UserError, match="is not split over GPUs"):
        run_part("sat-step", quick=True, contenders=("sat",), **env)
    with pytest.raises(UserError, match="with 1 among them"):
        run_part("ssd-pretrain", quick=True, budgets=(0.5, 2.0), **env)
    assert main(["bench", "--contenders", "ssd"]) == 2


def test_pretrain_methods_split_off_are_read_against_the_other_pretrain_parts_frontier(env, tmp_path):
    """ssd-pretrain and mst-pretrain train the same dense runs: MST's methods run in their own process merge with
    the frontier that ssd-pretrain's process trained."""
    common = {**env, "budgets": (0.5, 1.0, 1.5)}
    run_part("ssd-pretrain", quick=True, contenders=("dense",), **{**common, "out": tmp_path / "a",
                                                                   "work_dir": tmp_path / "wa"})
    run_part("mst-pretrain", quick=True, contenders=("mst-weight",), **{**common, "out": tmp_path / "b",
                                                                        "work_dir": tmp_path / "wb"})
    parts = load_results([tmp_path / "a" / "ssd-pretrain.json", tmp_path / "b" / "mst-pretrain.json"])
    mst = parts["mst-pretrain"]
    assert [c["name"] for c in mst["contenders"]] == ["dense-0.5x", "dense", "dense-1.5x", "mst-weight"]
    assert set(mst["iso_loss"]) == {"mst-weight"} and "ssd-pretrain's" in mst["notes"][-1]
    assert "moe_inference" not in mst
    # A method trained on other tokens (another seed) is not read against that frontier.
    other = json.loads((tmp_path / "b" / "mst-pretrain.json").read_text())
    other["contenders"][0]["config"]["train"]["seed"] += 1
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mst-pretrain.json").write_text(json.dumps(other))
    parts = load_results([tmp_path / "a" / "ssd-pretrain.json", tmp_path / "c" / "mst-pretrain.json"])
    assert parts["mst-pretrain"]["iso_loss"] == {}


def test_ssd_pretrain_split_keeps_each_processs_moe_inference(env, tmp_path):
    common = {**env, "budgets": (0.5, 1.0)}
    for name, contenders in (("a", ("dense",)), ("b", ("ssd",))):
        run_part("ssd-pretrain", quick=True, contenders=contenders,
                 **{**common, "out": tmp_path / name, "work_dir": tmp_path / f"w{name}"})
    merged = load_results([tmp_path / n / "ssd-pretrain.json" for n in ("a", "b")])["ssd-pretrain"]
    assert set(merged["moe_inference"]) == {"dense", "ssd"}
    assert [c["name"] for c in merged["contenders"]] == ["dense-0.5x", "dense", "ssd"]
    assert set(merged["iso_loss"]) == {"ssd"}


def test_hsa_lengths_split_over_processes_are_whole_comparisons_side_by_side(env, tmp_path):
    """--contenders picks hsa-attention's lengths and patterns by name; each process compares its patterns with its
    own length's frontier, and the report puts the processes' comparisons side by side, unscaled."""
    common = {**env, "budgets": (0.5, 1.0)}
    picks = {"a": ("dense-64", "local-64", "hybrid-64"), "b": ("dense-128", "hybrid-128")}
    runs = {n: run_part("hsa-attention", quick=True, contenders=c,
                        **{**common, "out": tmp_path / n, "work_dir": tmp_path / f"w{n}"}) for n, c in picks.items()}
    assert [c["name"] for c in runs["a"]["contenders"]] == ["dense-64-0.5x", "dense-64", "local-64", "hybrid-64"]
    assert [c["name"] for c in runs["b"]["contenders"]] == ["dense-128-0.5x", "dense-128", "hybrid-128"]
    merged = load_results([tmp_path / n / "hsa-attention.json" for n in picks])["hsa-attention"]
    assert set(merged["iso_loss"]) == {"local-64", "hybrid-64", "hybrid-128"}
    for n, r in runs.items():
        for name, iso in r["iso_loss"].items():
            assert merged["iso_loss"][name] == iso  # each against its own frontier, no calibration factor
    by_name = {c["name"]: c for c in merged["contenders"]}
    assert by_name["hybrid-128"]["wallclock"] == runs["b"]["contenders"][-1]["wallclock"]
    assert "--contenders dense-128 hybrid-128" in merged["command"]
    with pytest.raises(UserError, match="local-4097 not in hsa-attention; pick from dense-1024"):
        run_part("hsa-attention", quick=True, contenders=("local-4097",), **env)


def test_a_merged_comparison_names_every_process_command(env, tmp_path):
    common = {**env, "budgets": (0.5, 1.0)}
    for name, contenders in (("a", ("dense",)), ("b", ("mst-weight",))):
        run_part("mst-pretrain", quick=True, contenders=contenders,
                 **{**common, "out": tmp_path / name, "work_dir": tmp_path / f"w{name}"})
    merged = load_results([tmp_path / n / "mst-pretrain.json" for n in ("a", "b")])["mst-pretrain"]
    assert "--contenders dense" in merged["command"] and "--contenders mst-weight" in merged["command"]
    row = next(r for r in evaluate_targets({"mst-pretrain": merged}) if r["what"].startswith("MST weight level"))
    assert "--contenders mst-weight" in row["command"]


def test_a_training_part_takes_one_model_preset(env, tmp_path):
    ctx = Context("sat-cpt", tmp_path, tmp_path, tmp_path, tmp_path, False, "cpu", 1.0, ("gpt2-medium",))
    assert ctx.shape.preset == "gpt2-medium" and ctx.shape.batch_size == 16
    assert Context("sat-cpt", tmp_path, tmp_path, tmp_path, tmp_path, False, "cpu", 1.0).shape.preset == "gpt2-small"
    r = run_part("sat-cpt", quick=True, presets=("gpt2-medium",), **{**env, "out": tmp_path / "o"})
    assert "--preset gpt2-medium" in r["command"]
    with pytest.raises(UserError, match="takes one model preset"):
        run_part("sat-cpt", quick=True, presets=("gpt2-small", "gpt2-medium"), **env)
    with pytest.raises(UserError, match="trains no model"):
        run_part("prepare-data", quick=True, presets=("gpt2-medium",), **env)


def test_resume_reads_finished_runs_back_and_continues_a_cut_one_exactly(env, tmp_path):
    """--resume keeps the work folder: a finished run is read back as it was; a run cut after a checkpoint continues
    from it and ends where the uninterrupted run ended (resume equals uninterrupted)."""
    from sparsetrain.store.checkpoint import list_checkpoints

    common = {**env, "budgets": (0.5, 1.0), "out": tmp_path / "o", "work_dir": tmp_path / "w"}
    first = run_part("mst-pretrain", quick=True, contenders=("dense", "mst-neuron"), **common)
    again = run_part("mst-pretrain", quick=True, contenders=("dense", "mst-neuron"), resume=True, **common)
    assert "--resume" in again["command"]
    for a, b in zip(first["contenders"], again["contenders"]):
        assert (a["name"], a["val_loss"], a["wallclock"], a["flops"]) == (b["name"], b["val_loss"], b["wallclock"],
                                                                         b["flops"])
    # Cut the method's run after its first checkpoint (what a call's time limit leaves).
    run = tmp_path / "w" / "mst-pretrain" / "mst-neuron"
    checkpoints = list_checkpoints(run)
    assert len(checkpoints) == 2
    shutil.rmtree(checkpoints[-1])
    (run / "summary.json").unlink()
    resumed = run_part("mst-pretrain", quick=True, contenders=("dense", "mst-neuron"), resume=True, **common)
    (m0,) = [c for c in first["contenders"] if c["name"] == "mst-neuron"]
    (m1,) = [c for c in resumed["contenders"] if c["name"] == "mst-neuron"]
    assert m1["val_loss"] == m0["val_loss"] and m1["steps"] == m0["steps"]
    assert [r["loss"] for r in m1["curve"]] == [r["loss"] for r in m0["curve"]]
    # Without --resume the part starts over.
    fresh = run_part("mst-pretrain", quick=True, contenders=("mst-neuron",), **common)
    assert fresh["contenders"][0]["val_loss"] == m0["val_loss"]
    assert main(["bench", "--resume"]) == 2  # not a suite part: one line, exit 2


def test_random_tokens_are_a_prepared_folder(tmp_path):
    data = TokenData(random_tokens(tmp_path / "r", 300, 5000, 700, seed=1))
    assert data.meta["vocab_size"] == 300 and data.meta["train_tokens"] == 5000 and data.meta["val_tokens"] == 700
    train = (tmp_path / "r" / "train.bin").read_bytes()
    assert len(train) == 2 * 5000 and max(memoryview(train).cast("H")) < 300
    with pytest.raises(UserError, match="vocabulary in \\[2, 65536\\]"):
        random_tokens(tmp_path / "big", 70000, 10, 10)
    assert not (tmp_path / "big").exists()


def test_data_parallel_keeps_finished_rows_when_a_limit_cuts_it(tmp_path, monkeypatch):
    """bench/data_parallel.py rewrites its raw file after every contender (a call's time limit kept none of its rows
    before), with scaling over one GPU and FSDP2 over DDP worked out per method. Its launcher (fresh processes
    under torchrun on GPUs) is replaced by one that returns a row, and the third launch stands for the limit."""
    import importlib.util
    import sys

    import sparsetrain_bench.steps as steps_mod

    path = Path(__file__).resolve().parents[1] / "bench" / "data_parallel.py"
    spec = importlib.util.spec_from_file_location("data_parallel_under_test", path)
    dp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dp)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(steps_mod, "environment", lambda: {"device": "none"})
    launched = []

    def launch(spec, scratch, profile_dir=None):
        launched.append(spec)
        if len(launched) == 5:
            raise KeyboardInterrupt  # the call's time limit
        speed = 200.0 if spec.get("graphs") else {None: 100.0, "ddp": 190.0, "fsdp": 95.0}[spec["parallel"]]
        return dict(spec, stream_tokens_per_s=speed, stream_step_s=1.0)

    monkeypatch.setattr(dp, "launch", launch)
    out = tmp_path / "dp.json"
    monkeypatch.setattr(sys, "argv", ["data_parallel.py", "--methods", "dense", "sat", "--parallel", "ddp", "fsdp",
                                      "--fsdp-units", "0", "2", "--fsdp-reshard", "true", "false", "--ddp-graphs",
                                      "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        dp.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["parallel"]) for r in rows] == [
        ("dense", None), ("dense", "ddp"), ("dense", "ddp, CUDA graphs"), ("dense", "fsdp (auto)")]
    assert rows[1]["scaling"] == pytest.approx(1.9) and rows[2]["vs_ddp"] == pytest.approx(200 / 190)
    assert rows[3]["vs_ddp"] == pytest.approx(0.5)
    # DDP, DDP with graphs, then FSDP2 auto (resharded after forward, then kept gathered: cut by the limit)
    assert [(s["parallel"], s.get("graphs"), s.get("fsdp_units"), s.get("reshard")) for s in launched[1:]] == [
        ("ddp", False, 0, True), ("ddp", True, 0, True), ("fsdp", False, 0, True), ("fsdp", False, 0, False)]


def test_inference_times_time_a_served_copy_and_leave_the_model_as_it_was():
    """The MoE inference timing runs a copy in the compute dtype (as served) and returns both modes' times; the
    caller's model keeps its dtype, its MoE mode and its outputs."""
    from test_ssd import make_model

    from sparsetrain.methods.ssd.moefy import run_as_moe
    from sparsetrain.training.runtime import Runtime
    from sparsetrain_bench.parts import inference_times

    model = make_model("tiny", "relu2").eval()
    run_as_moe(model, 2, 4)
    x = torch.randint(0, model.args.vocab_size, (2, 16))
    before = model(x).detach()
    times = inference_times(model, x, Runtime(device=torch.device("cpu"), dtype=torch.bfloat16), compiled=False)
    assert set(times) >= {"prefill_ms_dense", "prefill_ms_moe", "ffn_ms_dense", "ffn_ms_moe", "ffn_speedup"}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.mlp.sparse for b in model.blocks)
    assert torch.equal(model(x), before)
