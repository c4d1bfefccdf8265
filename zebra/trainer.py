"""The one training loop every stage (ILD, KD, DPO) runs: nanoGPT's train.py written as a function.

One optimizer step s (0-based) with learning rate lr(s), A micro-steps and N ranks:
    g   = (1 / (A N)) sum_{micro a, rank n} grad loss(batch_{a,n})    mean over the global batch
    g  <- g * min(1, clip / ||g||_2)                                  global-norm clipping
    W  <- AdamW(W, g, lr(s))                                          decay on matrices only
lr(s), as nanoGPT's get_lr: (1) linear warmup over the first W steps, (2) cosine from lr down to
min_lr at max_steps. Under FSDP2 the gradients are reduce-scattered only on the last micro-step.

Data protocol. `batches` is an endless iterator of dicts of CPU tensors (one micro-batch of this
rank) with `state_dict() -> dict` (JSON-serialisable) and `load_state_dict(dict)`, as
zebra.data.Batches: the state taken after step s restores the batches of step s + 1, so a resumed
run sees the same data in the same order. Tokens counted = elements of every `*input_ids` tensor.

Loss protocol. `loss_fn(model, batch) -> (loss, parts)`: a scalar tensor to minimise (a mean over
the micro-batch) and a dict of floats to log (e.g. {"kl": .., "ce": ..}); ILD, KD and DPO differ
only there. A teacher or reference model is closed over by the loss_fn.

Outputs in `out_dir`: `metrics.jsonl`, one row per logged step
    {step, loss, <parts>, lr, grad_norm, tokens, tokens_per_s, ms [, peak_gib]}
(loss and parts: means over ranks and micro-steps; tokens: all ranks', since the start; peak_gib:
rank 0's peak CUDA memory allocated so far, on GPU only)
and `checkpoints/step-N/` (zebra.dist). A run that finds a complete checkpoint resumes from the
newest one: weights, optimizer, step, data position and RNG, and metrics rows after that step are
dropped; so an interrupted and resumed run reproduces the uninterrupted one exactly (CPU, fp32).
SIGTERM or SIGINT (a scheduler's preemption, `timeout`, Ctrl-C) lets the step in flight finish,
checkpoints it and stops with SystemExit saying how to resume; a second SIGINT aborts at once.
A non-finite loss or gradient norm stops the run with FloatingPointError naming the stage and the
step, before the optimizer step, so neither the weights nor any checkpoint see it.
"""

import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from zebra.dist import get_rank, latest_checkpoint, load_checkpoint, print0, save_checkpoint, set_gradient_sync


@dataclass
class TrainConfig:
    max_steps: int
    lr: float
    min_lr: float = 0.0  # cosine floor reached at max_steps
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # alternative to warmup_steps: round(ratio * max_steps) (official: 0.01)
    batch_size: int = 1  # rows per rank per micro-step (read by whoever builds the batches)
    grad_accum: int = 1
    clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    weight_decay: float = 0.0  # HF Trainer's default, which the official runs use
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    log_interval: int = 1
    ckpt_interval: int = 100
    keep_last: int = 2  # complete checkpoints kept
    seed: int = 42
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype on GPU (zebra.dist.shard_model)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "log_interval", "ckpt_interval", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig: need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("TrainConfig: give warmup_steps or warmup_ratio, not both")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig: warmup_ratio must be in [0, 1) and warmup_steps >= 0")
        if len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers, got {self.betas}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps or round(self.warmup_ratio * self.max_steps)


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    # 1) linear warmup: lr / W, 2 lr / W, ..., lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    # 2) past the end (never reached by train): the floor
    if step >= cfg.max_steps:
        return cfg.min_lr
    # 3) in between, cosine from lr down to min_lr
    ratio = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms or biases), as nanoGPT; fused on GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer: the model has no trainable parameters (all requires_grad=False)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def _count_tokens(batch: dict) -> int:
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


def _truncate_metrics(path: Path, step: int):
    """Keep the rows of steps <= `step` (a resumed run rewrites the rest), atomically."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(row + "\n" for row in rows))
    tmp.rename(path)


@contextmanager
def _stop_requests():
    """A list that SIGTERM / SIGINT append to while the loop runs (main thread only: signals are
    delivered there). The loop reads it between steps; a second SIGINT raises KeyboardInterrupt."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def request(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train(model: nn.Module, loss_fn: Callable, batches, cfg: TrainConfig, out_dir: str | Path,
          stage: str, stop_after: int | None = None) -> dict:
    """Train `model` (plain, or FSDP2-sharded by zebra.dist.shard_model) for cfg.max_steps steps.

    Every rank calls it. Resumes from the newest complete checkpoint in out_dir/checkpoints.
    `stop_after=k` returns after step k without a final checkpoint, as a kill would (for tests).
    Returns the train state: {"step", "tokens", "data"}."""
    out_dir = Path(out_dir)
    ckpt_dir, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    is_main = get_rank() == 0
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    model.train()
    optimizer = make_optimizer(model, cfg)

    state = {"step": 0, "tokens": 0, "data": batches.state_dict()}
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        print0(f"{stage}: resuming from {last}")
        state = load_checkpoint(last, model, optimizer)
        batches.load_state_dict(state["data"])
    if is_main:
        _truncate_metrics(metrics_path, state["step"])
    step, tokens_seen = state["step"], state["tokens"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=step, desc=stage, disable=not is_main, dynamic_ncols=True)
    with _stop_requests() as stop_requests:
        while step < cfg.max_steps:
            if stop_after is not None and step >= stop_after:
                break
            t0 = time.perf_counter()
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, parts_sum, tokens = 0.0, {}, 0
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                tokens += _count_tokens(batch)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                set_gradient_sync(model, micro == cfg.grad_accum - 1)  # nanoGPT's no_sync until the last
                loss, parts = loss_fn(model, batch)
                (loss / cfg.grad_accum).backward()
                loss_sum = loss_sum + loss.detach().float()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip if cfg.clip > 0 else math.inf)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()

            # one all-reduce for everything logged, [loss, parts..., tokens, stop requests], summed over
            # ranks: a signal that reached any rank stops all of them after the same step
            names = list(parts_sum)
            logged = torch.tensor([0.0, *(parts_sum[k] for k in names), tokens, len(stop_requests)],
                                  dtype=torch.float64, device=device)
            logged[0] = loss_sum
            if dist.is_initialized():
                dist.all_reduce(logged)
            world = dist.get_world_size() if dist.is_initialized() else 1
            logged = logged.tolist()
            stop = logged.pop() > 0
            loss_value, tokens = logged[0] / (world * cfg.grad_accum), round(logged[-1])
            grad_norm = float(grad_norm)  # global already: the same on every rank
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"stage {stage!r}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step "
                    f"{step + 1}; stopped before the update, last checkpoint: {latest_checkpoint(ckpt_dir)}"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, tokens_seen = step + 1, tokens_seen + tokens

            ms = (time.perf_counter() - t0) * 1000
            row = {"step": step, "loss": loss_value}
            row.update({k: v / (world * cfg.grad_accum) for k, v in zip(names, logged[1:-1])})
            row.update(lr=lr, grad_norm=grad_norm, tokens=tokens_seen, tokens_per_s=tokens / (ms / 1000), ms=ms)
            if device.type == "cuda":  # this rank's high-water mark since the process started
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if is_main and step % cfg.log_interval == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if step % cfg.ckpt_interval == 0 or step == cfg.max_steps or stop:
                state = {"step": step, "tokens": tokens_seen, "data": batches.state_dict()}
                path = save_checkpoint(ckpt_dir, step, model, optimizer, state, cfg.keep_last)
            if stop and step < cfg.max_steps:
                bar.close()
                raise SystemExit(f"stage {stage!r}: stopped by a signal after step {step} of {cfg.max_steps}; "
                                 f"checkpoint {path}; run the same command again to resume")
    bar.close()
    return {"step": step, "tokens": tokens_seen, "data": batches.state_dict()}
