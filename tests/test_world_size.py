"""Nothing assumes a world of 2: torchrun with 4 gloo processes at the same global batch (8 rows: 2 per process)
trains what one process trains, dense and SAT, under DDP and FSDP2 (4 shards cut a block's q/k/v and FFN rows at
other places than 2 do)."""
import subprocess
import sys

import pytest
import torch
from test_train import METHODS, final_weights, metrics

from sparsetrain import config
from sparsetrain.training.loop import train

WORLD = 4


@pytest.mark.parametrize("method, parallel", [("dense", "ddp"), ("dense", "fsdp"), ("sat", "ddp"), ("sat", "fsdp")])
def test_four_processes_match_one(make_config, tmp_path, method, parallel):
    def make(**kw):
        return make_config(method=METHODS[method], steps=4, eval_every=0, checkpoint_every=0, **kw)

    assert make().train.batch_size % WORLD == 0  # the global batch splits evenly over the processes
    one = tmp_path / "one"
    train(make(), one)
    cfg = tmp_path / "c.toml"
    cfg.write_text(config.dumps(config.to_dict(make(parallel=parallel))))
    four = tmp_path / "four"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "sparsetrain.cli", "train", "--config", str(cfg), "--out", str(four)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{WORLD} x cpu" in res.stdout  # the run really had 4 processes
    rows = metrics(four)
    assert [r["loss"] for r in metrics(one)] == pytest.approx([r["loss"] for r in rows], rel=1e-4)
    if method == "sat":  # every step omitted neurons and heads (no dense step at 4 steps)
        assert all(r["sat_ffn_rate"] > 0 and r["sat_head_rate"] > 0 for r in rows)
    wa, wb = final_weights(one), final_weights(four)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=lambda m: k + m)
