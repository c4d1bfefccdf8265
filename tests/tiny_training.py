"""Shared pieces of the trainer/dist tests: a tiny Llama, toy batches, a CE loss, and a torchrun
worker (`python -m torch.distributed.run --nproc-per-node 2 tests/tiny_training.py OUT ...`)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zebra.config import LlamaConfig
from zebra.hub import write_model_dir
from zebra.llama import LlamaForCausalLM, rope_cos_sin
from zebra.losses import ild_loss, kd_loss

VOCAB, SEQ = 64, 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


class ToyBatches:
    """Rows following x_{t+1} = (5 x_t + 3) mod V from random starts; the data protocol of
    zebra.data.Batches (global batches of batch_size * world_size rows, rank r takes slice r,
    position {"epoch", "index"} in rows)."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, n_rows: int = 48, seed: int = 0):
        starts = np.random.default_rng(seed).integers(0, VOCAB, n_rows)
        rows = [starts]
        for _ in range(SEQ):
            rows.append((5 * rows[-1] + 3) % VOCAB)
        self.rows = torch.from_numpy(np.stack(rows, axis=1))  # (n_rows, SEQ + 1)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch, self.index = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        step = self.batch_size * self.world_size
        if self.index + step > len(self.rows):
            self.epoch, self.index = self.epoch + 1, 0
        order = torch.from_numpy(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows)))
        start = self.index + self.rank * self.batch_size
        self.index += step
        rows = self.rows[order[start : start + self.batch_size]]
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict):
        self.epoch, self.index = state["epoch"], state["index"]


def ce_loss(model, batch):
    logits = model(batch["input_ids"]).float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    return loss, {"ce": loss.item()}


def kd_loss_fn(teacher):
    """The KD stage's call pattern: the body's hidden states and the raw lm_head weights (chunked KD)."""
    def loss_fn(model, batch):
        with torch.no_grad():
            teacher_hidden = teacher.model(batch["input_ids"])
        out = kd_loss(model.model(batch["input_ids"]), teacher_hidden, model.lm_head.weight,
                      teacher.lm_head.weight, batch["targets"], ce_weight=0.5, chunk_size=24)
        return out.loss, {"kl": out.kl.item(), "ce": out.ce.item()}
    return loss_fn


def ild_loss_fn(teacher):
    """The ILD stage's call pattern: each student layer called alone on the teacher's layer input."""
    def loss_fn(model, batch):
        ids = batch["input_ids"]
        teacher_states = []
        with torch.no_grad():
            teacher.model(ids, hidden_states=teacher_states)
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
        cos, sin = rope_cos_sin(model.model.inv_freq, positions)
        outs = [layer(x, cos, sin) for layer, (x, _, _) in zip(model.model.layers, teacher_states)]
        loss = ild_loss([o for o, _ in outs], [o for _, o, _ in teacher_states],
                        [a for _, a in outs], [a for _, _, a in teacher_states])
        return loss, {}
    return loss_fn


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def hf_writer(model):
    """export_hf's writer for a Llama: the HF directory writer with the model's config bound."""
    return lambda path, state: write_model_dir(path, model.config.to_dict(), state)


def main(out: str, batch_size: int, grad_accum: int, max_steps: int, tied: bool):
    """torchrun worker: FSDP2-train tiny students from a sharded teacher by KD and by ILD, each
    checkpointed and exported into out/<stage>."""
    from zebra.dist import cleanup, export_hf, init_distributed, shard_model, shard_teacher
    from zebra.trainer import TrainConfig, train

    info = init_distributed()
    teacher = shard_teacher(tiny_model(seed=1, tied=tied), mixed_precision=False)
    cfg = TrainConfig(max_steps=max_steps, lr=3e-3, warmup_steps=2, batch_size=batch_size,
                      grad_accum=grad_accum, ckpt_interval=4, keep_last=5)
    for stage, make_loss in (("kd", kd_loss_fn), ("ild", ild_loss_fn)):
        model = shard_model(tiny_model(seed=0, tied=tied), mixed_precision=False)
        batches = ToyBatches(batch_size, info.rank, info.world_size)
        train(model, make_loss(teacher), batches, cfg, Path(out) / stage, stage=stage)
        export_hf(model, Path(out) / stage / "model", hf_writer(model))
    cleanup()


if __name__ == "__main__":
    out, batch_size, grad_accum, max_steps, tied = sys.argv[1:]
    main(out, int(batch_size), int(grad_accum), int(max_steps), tied == "tied")
