"""FSDP2 on CPU (gloo): 2 ranks train like 1 process, and their DCP checkpoint loads on 1 process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_training import ToyBatches, ce_loss, hf_writer, ild_loss_fn, kd_loss_fn, one_thread, read_rows, tiny_model  # noqa: F401
from zebra import dist as zdist
from zebra.hub import read_model_dir
from zebra.trainer import TrainConfig, make_optimizer, train

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
WORKER = Path(__file__).with_name("tiny_training.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_one_process_and_checkpoint_reshards(tmp_path):
    """The stages' call patterns under FSDP2 with tied embeddings and a sharded teacher: KD (the
    body's hidden states + raw lm_head weights) and ILD (layers called one by one). 2 ranks x 1 row
    x 2 micro-steps (gradient sync on the last only) = the 1-process batch of 4 rows."""
    steps, two, one = 6, tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(WORKER), str(two), "1", "2", str(steps), "tied"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    teacher = tiny_model(seed=1, tied=True).requires_grad_(False)
    cfg = TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=2, batch_size=4, ckpt_interval=4, keep_last=5)
    for stage, make_loss in (("kd", kd_loss_fn), ("ild", ild_loss_fn)):
        model = tiny_model(seed=0, tied=True)
        train(model, make_loss(teacher), ToyBatches(4), cfg, one / stage, stage=stage)
        rows1, rows2 = read_rows(one / stage / "metrics.jsonl"), read_rows(two / stage / "metrics.jsonl")
        assert [r["step"] for r in rows2] == list(range(1, steps + 1))
        for r1, r2 in zip(rows1, rows2):
            assert r2["tokens"] == r1["tokens"] and r2["lr"] == r1["lr"]
            for key in ("loss", "grad_norm", *(("kl", "ce") if stage == "kd" else ())):
                assert abs(r2[key] - r1[key]) < 1e-5, (stage, r1["step"], key, r1[key], r2[key])

        # export_hf gathered full tensors; the sharded checkpoint loads into one unsharded process
        config, exported = read_model_dir(two / stage / "model")
        assert config["tie_word_embeddings"] and "lm_head.weight" not in exported  # stored once, as the embedding
        fresh = tiny_model(seed=2, tied=True)
        state = zdist.load_checkpoint(zdist.latest_checkpoint(two / stage / "checkpoints"), fresh, make_optimizer(fresh, cfg))
        assert state["step"] == steps and state["data"] == {"epoch": 0, "index": 4 * steps}
        for name, tensor in exported.items():
            assert torch.equal(fresh.state_dict()[name], tensor), (stage, name)
            torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=1e-5)


def test_single_process_group_runs_fsdp(tmp_path, monkeypatch):
    """Without torchrun, init_distributed makes a 1-rank group and the FSDP2 path trains like a plain model."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = TrainConfig(max_steps=3, lr=3e-3, batch_size=2, ckpt_interval=3)
    plain = tiny_model(seed=0)
    train(plain, ce_loss, ToyBatches(2), cfg, tmp_path / "plain", stage="test")
    info = zdist.init_distributed()
    try:
        assert (info.rank, info.world_size, info.device.type) == (0, 1, "cpu")
        sharded = zdist.shard_model(tiny_model(seed=0), mixed_precision=True)  # bf16 is for GPUs only
        train(sharded, ce_loss, ToyBatches(2), cfg, tmp_path / "fsdp", stage="test")
        zdist.export_hf(sharded, tmp_path / "export", hf_writer(sharded))
    finally:
        zdist.cleanup()
    for r1, r2 in zip(read_rows(tmp_path / "plain/metrics.jsonl"), read_rows(tmp_path / "fsdp/metrics.jsonl")):
        assert abs(r1["loss"] - r2["loss"]) < 1e-6
    _, exported = read_model_dir(tmp_path / "export")
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-6)


def test_bf16_sharded_body_fills_the_callers_hidden_states_list(monkeypatch):
    """ILD collects every layer's states in a list passed to the body; a bf16 policy (GPU) must not
    copy that list on the way in (FSDP2 rebuilds containers when it casts inputs). CPU, 1 rank."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    zdist.init_distributed()
    try:
        plain, sharded = tiny_model(seed=0), tiny_model(seed=0)
        zdist._fully_shard_decoder(sharded, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        ids = torch.randint(0, plain.config.vocab_size, (2, 8))
        want, got = [], []
        plain.model(ids, hidden_states=want)
        sharded.model(ids, hidden_states=got)
    finally:
        zdist.cleanup()
    assert len(got) == len(want) == plain.config.num_hidden_layers
    for (x0, o0, a0), (x1, o1, a1) in zip(want, got):  # bf16 compute vs fp32: loose, but the same states
        for a, b in ((x0, x1), (o0, o1), (a0, a1)):
            torch.testing.assert_close(b.float(), a, rtol=0.05, atol=0.05)
