"""FSDP2 on 2 GPUs vs 1: the KD step of a Zebra student at Llama-3.2-1B shapes ([multigpu], issue 9).

    python bench/fsdp_scaling.py --out runs/fsdp            # needs 2 GPUs; writes fsdp.json + fsdp.md
    python bench/fsdp_scaling.py --out /tmp/fsdp --smoke    # CPU, gloo, tiny shapes (a check of the script)

A random-weight teacher at configs/shapes/llama-3.2-1b.json and an 8 MLA + 8 Mamba2 student of
that shape (random weights: this measures the distributed machinery, not distillation) train with
the pipeline's own KD loss (`zebra.pipeline.kd_loss_fn`), trainer and checkpoints, on random
token batches; each global batch is drawn from a generator seeded by its step, and rank r takes
its rows [r B, (r + 1) B), as zebra.data.Batches does. Runs, each a `torchrun` of this file:

    one    1 GPU,  per-rank batch G      (global batch G)
    two    2 GPUs, per-rank batch G / 2  (same global batch, so the same loss trajectory up to
                                          reduction order and bf16 rounding)
    cut    2 GPUs, stopped by SIGTERM after half the steps (the trainer checkpoints the step in
           flight), then resumed on 2 GPUs to the end: its trajectory must equal `two`'s
    reload the last DCP checkpoint of `two` (written as 2 shards) loaded on 1 GPU: its loss on a
           fixed held-out batch must equal the one `two` measured at the end

Reported: max |loss(one) - loss(two)| over steps (and relative), resumed vs uninterrupted, reload vs
saved loss, tokens/s (median over steps after the first 3) per run, scaling efficiency
tok/s(two) / (2 tok/s(one)), and each run's peak CUDA memory on rank 0.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zebra.config import LlamaConfig  # noqa: E402
from zebra.dist import cleanup, init_distributed, latest_checkpoint, load_checkpoint, shard_model, shard_teacher  # noqa: E402
from zebra.hybrid import StudentSpec, ZebraForCausalLM, student_config  # noqa: E402
from zebra.llama import LlamaForCausalLM  # noqa: E402
from zebra.pipeline import KDStage, kd_loss_fn  # noqa: E402
from zebra.trainer import TrainConfig, make_optimizer, train  # noqa: E402

SAFE_NCCL = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class RandomBatches:
    """Endless KD batches of random tokens; global batch s comes from a generator seeded by s."""

    def __init__(self, vocab: int, seq: int, batch: int, rank: int, world: int):
        self.vocab, self.seq, self.batch, self.rank, self.world, self.step = vocab, seq, batch, rank, world, 0

    def global_batch(self, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab, (self.batch * self.world, self.seq + 1), generator=gen)

    def __next__(self) -> dict:
        rows = self.global_batch(self.step)[self.rank * self.batch:(self.rank + 1) * self.batch]
        self.step += 1
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": torch.ones_like(rows[:, 1:], dtype=torch.bool)}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict):
        self.step = state["step"]


def models(smoke: bool, device):
    """(teacher, student) with the same random weights on every rank and in every run."""
    if smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
        spec = StudentSpec(mla_layers=[0, 2], q_rank=0, kv_rank=16, d_rope=8)
    else:
        cfg = LlamaConfig.from_json(ROOT / "configs/shapes/llama-3.2-1b.json")
        spec = StudentSpec(mla_layers=[0, 2, 4, 6, 8, 10, 12, 14], q_rank=1344, kv_rank=128, d_rope=32)  # the 8MLA-8M2 recipe
    torch.manual_seed(0)
    with torch.device(device):
        teacher = LlamaForCausalLM(cfg)
        student = ZebraForCausalLM(student_config(cfg, spec.plan(cfg.num_hidden_layers), spec.q_rank, spec.kv_rank,
                                                  spec.d_rope))
    # Embeddings as HF initialises them (std 0.02): with nn.Embedding's N(0, 1) and tied weights the
    # residual stream is just the input token, both models put p = 1 on repeating it, and the KL is 0.
    for model in (teacher, student):
        model.model.embed_tokens.weight.data.normal_(0, 0.02)
    return teacher, student


def worker(args):
    info = init_distributed()
    teacher, student = models(args.smoke, info.device)
    bf16 = info.device.type == "cuda"
    cfg = TrainConfig(max_steps=args.steps, lr=1e-4, warmup_steps=2, batch_size=args.global_batch // info.world_size,
                      ckpt_interval=args.steps, dtype="bfloat16" if bf16 else "float32")
    stage = KDStage(train=cfg, chunk_size=512)
    student = shard_model(student, bf16)
    loss_fn = kd_loss_fn(shard_teacher(teacher, bf16), stage)
    batches = RandomBatches(teacher.config.vocab_size, args.seq, cfg.batch_size, info.rank, info.world_size)
    out = Path(args.out)
    if args.reload:  # the newest checkpoint of `out`, whatever world size wrote it, then the held-out loss
        load_checkpoint(latest_checkpoint(out / "checkpoints"), student, make_optimizer(student, cfg))
    else:
        if args.stop_after and info.rank == 0 and not latest_checkpoint(out / "checkpoints"):
            stop_at = args.stop_after

            def preempt(model, batch, _calls=[0]):  # SIGTERM inside step stop_at, as a scheduler's would
                _calls[0] += 1
                if _calls[0] == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return loss_fn(model, batch)
            train(student, preempt, batches, cfg, out, stage="kd")
        else:
            train(student, loss_fn, batches, cfg, out, stage="kd")
    held_out = RandomBatches(teacher.config.vocab_size, args.seq, cfg.batch_size, info.rank, info.world_size)
    held_out.step = 10**6
    with torch.no_grad():
        loss, _ = loss_fn(student, {k: v.to(info.device) for k, v in next(held_out).items()})
    loss = loss.detach().float()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss)
    if info.rank == 0:
        peak = torch.cuda.max_memory_allocated(info.device) / 2**30 if bf16 else 0.0
        (out / ("reload.json" if args.reload else "final.json")).write_text(json.dumps(
            {"held_out_loss": loss.item() / info.world_size, "world": info.world_size, "peak_gib": peak}))
    cleanup()


def launch(args, nproc: int, out: Path, *extra: str) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port",
           str(29500 + nproc), __file__, "--worker", "--out", str(out), "--steps", str(args.steps), "--seq",
           str(args.seq), "--global-batch", str(args.global_batch), *(["--smoke"] if args.smoke else []), *extra]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, env={**os.environ, **SAFE_NCCL}, timeout=args.timeout).returncode
    print(f"  exit {rc} after {time.time() - t0:.0f} s", flush=True)
    return rc


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=150, help="seconds per torchrun")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--reload", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.seq, args.global_batch = min(args.steps, 6), min(args.seq, 32), 4
    if args.worker:
        return worker(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    half = args.steps // 2
    launch(args, 1, out / "one")
    launch(args, 2, out / "two")
    launch(args, 2, out / "cut", "--stop-after", str(half))  # exits non-zero: stopped by the signal
    launch(args, 2, out / "cut")
    launch(args, 1, out / "two", "--reload")

    one, two, cut = rows(out / "one"), rows(out / "two"), rows(out / "cut")
    diff = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    rel = [d / abs(a["loss"]) for d, a in zip(diff, one)]
    resumed = max(abs(a["loss"] - b["loss"]) for a, b in zip(cut, two))
    tok_s = {name: statistics.median(r["tokens_per_s"] for r in rs[3:]) for name, rs in (("one", one), ("two", two))}
    final, reload = (json.loads((out / "two" / f).read_text()) for f in ("final.json", "reload.json"))
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "steps": args.steps, "seq": args.seq, "global_batch": args.global_batch,
        "max_abs_loss_diff_1_vs_2": max(diff), "max_rel_loss_diff_1_vs_2": max(rel),
        "steps_compared": len(diff), "resumed_vs_uninterrupted_max_abs": resumed, "resumed_steps": len(cut),
        "held_out_loss_2gpu": final["held_out_loss"], "held_out_loss_reloaded_on_1": reload["held_out_loss"],
        "tokens_per_s_1gpu": tok_s["one"], "tokens_per_s_2gpu": tok_s["two"],
        "scaling_efficiency": tok_s["two"] / (2 * tok_s["one"]),
        "peak_gib_1gpu": max(r.get("peak_gib", 0.0) for r in one),
        "peak_gib_2gpu_rank0": max(r.get("peak_gib", 0.0) for r in two),
        "losses_one": [r["loss"] for r in one], "losses_two": [r["loss"] for r in two],
        "losses_resumed": [r["loss"] for r in cut],
    }
    (out / "fsdp.json").write_text(json.dumps(result, indent=1))
    table = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in result.items() if not k.startswith("losses"))
    (out / "fsdp.md").write_text("| quantity | value |\n|---|---|\n" + table + "\n")
    print("| quantity | value |\n|---|---|\n" + table)


if __name__ == "__main__":
    main()
