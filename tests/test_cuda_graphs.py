"""train.cuda_graphs: where it applies, the clear refusal where it cannot, and (on a GPU) a run replayed as CUDA
graphs equals the same run launched kernel by kernel, for every method that runs under them."""
import json

import pytest
import torch
from test_train import METHODS

from sparsetrain.errors import UserError
from sparsetrain.methods import REGISTRY, Dense
from sparsetrain.training.loop import train
from sparsetrain.training.runtime import Runtime, parallelize, use_cuda_graphs


class Train:
    def __init__(self, cuda_graphs, parallel="ddp"):
        self.cuda_graphs, self.parallel = cuda_graphs, parallel


GPU = Runtime(device=torch.device("cuda"), dtype=torch.bfloat16)  # a device object: no GPU is needed to build it


def test_auto_is_on_only_where_graphs_apply():
    assert use_cuda_graphs(Train("auto"), GPU, compile_model=True, accum=1, method=Dense)
    assert use_cuda_graphs(Train("true"), GPU, compile_model=True, accum=1, method=Dense)
    assert not use_cuda_graphs(Train("false"), GPU, compile_model=True, accum=1, method=Dense)
    cpu = Runtime(device=torch.device("cpu"), dtype=torch.float32)
    two = Runtime(device=torch.device("cuda"), dtype=torch.bfloat16, world=2)
    for rt, compiled, accum in [(cpu, True, 1), (GPU, False, 1), (two, True, 1), (GPU, True, 2)]:
        assert not use_cuda_graphs(Train("auto"), rt, compile_model=compiled, accum=accum, method=Dense)
    on = {name for name, cls in REGISTRY.items()
          if use_cuda_graphs(Train("auto"), GPU, compile_model=True, accum=1, method=cls)}
    assert on == set(REGISTRY)  # every method: the GPU test below runs each under them


class Unverified(Dense):
    name = "unverified"
    cuda_graphs = False


def test_true_for_a_method_not_run_under_graphs_names_it():
    with pytest.raises(UserError, match="method unverified is not yet.*train.cuda_graphs=auto"):
        use_cuda_graphs(Train("true"), GPU, compile_model=True, accum=1, method=Unverified)
    assert not use_cuda_graphs(Train("auto"), GPU, compile_model=True, accum=1, method=Unverified)


@pytest.mark.parametrize("method, dynamic", [("dense", None), ("upcycle", False), ("ssd", False)])
def test_moe_methods_compile_with_static_shapes(monkeypatch, method, dynamic):
    """Upcycle and SSD compile without symbolic sizes: inductor failed on their MoE layers' symbolic sizes on the
    GPU (with or without graphs) once a second batch shape arrived. The rest keep torch's default (None)."""
    compiled = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.update(kw))
    cpu = Runtime(device=torch.device("cpu"), dtype=torch.float32)
    parallelize(torch.nn.Linear(2, 2), cpu, None, compile_model=True, static_shapes=REGISTRY[method].static_shapes)
    assert compiled == {"mode": None, "dynamic": dynamic}


TWO_GPUS = Runtime(device=torch.device("cuda"), dtype=torch.bfloat16, world=2)


@pytest.mark.parametrize("rt, parallel, compiled, accum, named", [
    (Runtime(device=torch.device("cpu"), dtype=torch.float32), "ddp", True, 1, "on a GPU"),
    (GPU, "ddp", False, 1, "compiled"),
    (TWO_GPUS, "fsdp", True, 1, "in one process or DDP"),
    (GPU, "ddp", True, 4, "with one micro-batch a step"),
])
def test_true_where_graphs_cannot_apply_names_what_is_missing(rt, parallel, compiled, accum, named):
    with pytest.raises(UserError, match=f"not {named}.*train.cuda_graphs=auto"):
        use_cuda_graphs(Train("true", parallel), rt, compile_model=compiled, accum=accum, method=Dense)


def test_ddp_replays_graphs_only_when_asked_for():
    """Under DDP the graphs are `true`'s alone: `auto` leaves them off there until they are measured."""
    assert use_cuda_graphs(Train("true"), TWO_GPUS, compile_model=True, accum=1, method=Dense)
    assert not use_cuda_graphs(Train("auto"), TWO_GPUS, compile_model=True, accum=1, method=Dense)


def test_a_cpu_run_refuses_true_before_writing_anything(make_config, tmp_path):
    with pytest.raises(UserError, match="cuda_graphs=true"):
        train(make_config(cuda_graphs="true", device="cpu"), tmp_path / "run")
    assert not (tmp_path / "run" / "config.toml").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_bad_value_is_a_user_error(make_config):
    with pytest.raises(UserError, match="train.cuda_graphs must be auto, true or false"):
        make_config(cuda_graphs="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", METHODS)
def test_replayed_run_equals_launched_run(make_config, tmp_path, method):
    """Compiled either way. "reduce-overhead" compiles graphs of its own (SAT's losses differ in the fifth digit), so
    equal within a tolerance far below bf16's resolution, not bit for bit."""
    runs = {}
    for graphs in ("true", "false"):
        run = tmp_path / graphs
        summary = train(make_config(method=METHODS[method], compile="true", cuda_graphs=graphs, device="cuda"), run)
        assert summary["cuda_graphs"] == (graphs == "true")
        runs[graphs] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    a, b = runs["true"], runs["false"]
    # A router's top-k turns rounding into other routes now and then: the MoE methods' losses differ by ~1.5e-4
    rel = 5e-4 if METHODS[method]["name"] in ("upcycle", "ssd") else 1e-4  # (bf16's resolution: 3.9e-3)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=rel)
    assert [r.get("val_loss") for r in a] == pytest.approx([r.get("val_loss") for r in b], rel=rel)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="DDP's graphs need 2 GPUs")
@pytest.mark.parametrize("method", METHODS)
def test_ddp_replayed_run_equals_launched_run(make_config, tmp_path, method):
    """Two processes under torchrun (NCCL), DDP compiled with `train.cuda_graphs=true` and with `false`: the same
    losses within the tolerance of the one-process comparison above. Every method: this decides whether `auto`
    may take graphs under DDP (about a minute of GPU time per method)."""
    import subprocess
    import sys

    from sparsetrain import config

    runs = {}
    for graphs in ("true", "false"):
        cfg = tmp_path / f"{graphs}.toml"
        cfg.write_text(config.dumps(config.to_dict(make_config(method=METHODS[method], compile="true",
                                                               cuda_graphs=graphs, device="cuda", parallel="ddp"))))
        run = tmp_path / graphs
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "sparsetrain.cli", "train", "--config", str(cfg), "--out", str(run)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("CUDA graphs" in res.stdout + res.stderr) == (graphs == "true")  # the run's header says so
        runs[graphs] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    a, b = runs["true"], runs["false"]
    rel = 5e-4 if METHODS[method]["name"] in ("upcycle", "ssd") else 1e-4
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=rel)
    assert [r.get("val_loss") for r in a] == pytest.approx([r.get("val_loss") for r in b], rel=rel)
