"""The training loop on one CPU process, fp32: lr schedule, learning, kill-and-resume, NaN guard."""

import functools
import math
import os
import shutil
import signal

import pytest
import torch

from tiny_training import ToyBatches, ce_loss, ild_loss_fn, one_thread, read_rows, tiny_model  # noqa: F401
from zebra.config import load_yaml
from zebra.dist import latest_checkpoint, step_dirs
from zebra.trainer import TrainConfig, get_lr, train

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
TIMING = ("tokens_per_s", "ms", "peak_gib")  # wall-clock fields: the only ones allowed to differ between runs


def run_steps(out, max_steps, stop_after=None, seed=0, loss_fn=ce_loss, **cfg):
    model = tiny_model(seed)
    cfg = TrainConfig(max_steps=max_steps, **{"lr": 3e-3, "warmup_steps": 2, "batch_size": 4, **cfg})
    train(model, loss_fn, ToyBatches(cfg.batch_size), cfg, out, stage="test", stop_after=stop_after)
    return model


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert [get_lr(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    # cosine: halfway between the end of warmup (step 10) and max_steps (110) sits the midpoint
    assert get_lr(60, cfg) == pytest.approx(0.55)
    assert get_lr(35, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert get_lr(109, cfg) == pytest.approx(0.1, abs=1e-3)
    assert TrainConfig(max_steps=200, lr=1.0, warmup_ratio=0.01).warmup == 2


def test_config_from_yaml_is_strict(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("max_steps: 10\nlr: 2e-4\nwarmup_ratio: 0.01\nbetas: [0.9, 0.95]\ndtype: bfloat16\n")
    cfg = load_yaml(good, TrainConfig)
    assert (cfg.lr, cfg.betas, cfg.warmup, cfg.dtype) == (2e-4, [0.9, 0.95], 0, "bfloat16")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 10\nlr: 1e-3\nlearning_rate: 1e-3\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_yaml(bad, TrainConfig)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(max_steps=10, lr=1e-3, warmup_steps=2, warmup_ratio=0.1)


def test_loss_falls(tmp_path):
    run_steps(tmp_path, max_steps=30, lr=1e-2, ckpt_interval=30)
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[0]["loss"] == pytest.approx(math.log(64), rel=0.1)  # a random init predicts ~uniformly
    assert max(r["loss"] for r in rows[-3:]) < 0.5 * rows[0]["loss"]
    assert rows[-1]["tokens"] == 30 * 4 * 16


@pytest.mark.parametrize("loss", ["ce", "ild"])  # ILD: embeddings and head get no gradient, so no AdamW state
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, loss):
    loss_fn = ce_loss if loss == "ce" else ild_loss_fn(tiny_model(seed=5).requires_grad_(False))
    run = functools.partial(run_steps, loss_fn=loss_fn)
    whole = run(tmp_path / "whole", max_steps=10, ckpt_interval=4, keep_last=2)
    assert [s for s, _ in step_dirs(tmp_path / "whole/checkpoints")] == [8, 10]  # keep_last pruned step 4

    ckpts = tmp_path / "cut/checkpoints"
    run(tmp_path / "cut", max_steps=10, stop_after=6, ckpt_interval=4)  # "killed" after step 6
    assert latest_checkpoint(ckpts).name == "step-00000004"
    # a crash while writing step 6 would leave these: neither may count
    shutil.copytree(ckpts / "step-00000004", ckpts / ".step-00000006.tmp")
    shutil.copytree(ckpts / "step-00000004", ckpts / "step-00000006", ignore=shutil.ignore_patterns("COMPLETE"))
    assert latest_checkpoint(ckpts).name == "step-00000004"

    resumed = run(tmp_path / "cut", max_steps=10, seed=1, ckpt_interval=4)  # seed 1: weights must come from disk
    assert not (ckpts / ".step-00000006.tmp").exists()  # cleared by the next save
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(read_rows(tmp_path / "cut/metrics.jsonl")) == strip(read_rows(tmp_path / "whole/metrics.jsonl"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_sigterm_checkpoints_the_step_in_flight_and_resumes_exactly(tmp_path):
    calls = []

    def preempted_at_step_3(model, batch):  # the signal lands mid-step, as a scheduler's would
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return ce_loss(model, batch)

    whole = run_steps(tmp_path / "whole", max_steps=6, ckpt_interval=100)
    with pytest.raises(SystemExit, match=r"stage 'test'.*after step 3 of 6.*run the same command again"):
        run_steps(tmp_path / "cut", max_steps=6, ckpt_interval=100, loss_fn=preempted_at_step_3)
    assert latest_checkpoint(tmp_path / "cut/checkpoints").name == "step-00000003"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    resumed = run_steps(tmp_path / "cut", max_steps=6, seed=1, ckpt_interval=100)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_rows(tmp_path / "cut/metrics.jsonl")) == strip(read_rows(tmp_path / "whole/metrics.jsonl"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_guard_names_stage_and_step(tmp_path):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss, parts = ce_loss(model, batch)
        return (loss * math.nan if len(calls) == 3 else loss), parts

    model = tiny_model(0)
    cfg = TrainConfig(max_steps=5, lr=1e-3, batch_size=4, ckpt_interval=1)
    with pytest.raises(FloatingPointError, match=r"stage 'kd'.*at step 3"):
        train(model, loss_fn, ToyBatches(4), cfg, tmp_path, stage="kd")
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [1, 2]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"
    assert all(p.isfinite().all() for p in model.parameters())
