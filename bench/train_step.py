"""KD and ILD training steps at Llama-3.2-1B shapes: tokens/s and MFU, one GPU, bf16, random weights.

    python bench/train_step.py [--quick] [--batch 4] [--seq 2048]

Steps (the loss closures of zebra.pipeline's kd and ild stages):
    kd    teacher forward (no grad) -> final hidden; student (8mla-8m2 hybrid) forward + backward
          through the chunked KD loss (KL, T = 1, chunk 1024), AdamW step. The teacher is the
          Llama-3.2-1B shape (the issue's 1B shapes; the paper distils its 1B from an 8B).
    ild   teacher forward with every layer's (input, block output, mixer output); an all-MLA and
          an all-Mamba2 student run each layer on the teacher's layer input (layer_inputs), ILD
          loss on block and mixer outputs plus the final norm, backward, AdamW step.
Parameters bf16 (the FSDP2 compute dtype), AdamW(fused). Median of the timed steps after warm-up
(the first steps also autotune the Triton SSD kernels).

FLOPs per token, counted (forward; training = 3x forward for the student, 1x for the teacher):
    2 * (weights of every nn.Linear; the lm_head only where logits are made: kd, both models)
    + attention and MLA (materialised, causal): H * l * (d_qk + d_v) per layer
    + Mamba2 SSD (chunked, chunk Q): H * (Q * (N + P) + 4 * P * N) per layer
MFU = counted FLOP/s over the bf16 matmul rate measured in this run (and over the datasheet).
"""

import argparse
import json
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import datasheet, matmul_flops, print_header, table  # noqa: E402
from bench.decode import SHAPE, build  # noqa: E402
from zebra.config import LlamaConfig  # noqa: E402
from zebra.pipeline import KDStage, ild_loss_fn, kd_loss_fn  # noqa: E402
from zebra.trainer import TrainConfig  # noqa: E402
from zebra.mamba2 import Mamba2  # noqa: E402
from zebra.mla import MLAttention  # noqa: E402


KD = KDStage(train=TrainConfig(max_steps=1, lr=1e-5))  # KL only, T = 1, chunk 1024: the pipeline's defaults


def flops_per_token(model, seq: int, with_head: bool) -> float:
    """Forward matmul FLOPs per token (module docstring)."""
    head = model.lm_head
    flops = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)
                    and (with_head or m is not head))
    for layer in model.model.layers:
        mixer = getattr(layer, "mixer", None) or layer.self_attn
        if isinstance(mixer, Mamba2):
            c = mixer.cfg
            flops += c.n_heads * (c.chunk_size * (c.d_state + c.head_dim) + 4 * c.head_dim * c.d_state)
        elif isinstance(mixer, MLAttention):
            c = mixer.cfg
            flops += c.n_heads * seq * (c.d_nope + c.d_rope + c.v_head_dim)
        else:  # Llama attention
            flops += mixer.n_heads * seq * 2 * mixer.head_dim
    return flops


def step_with(loss_fn):
    """One optimizer step of a zebra.pipeline stage loss on a batch."""
    def step(student, batch, opt):
        loss, _ = loss_fn(student, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(step, student, b: int, seq: int, warmup: int, steps: int) -> float:
    """Median seconds per step."""
    ids = torch.randint(0, 1000, (b, seq), device="cuda")
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, dims=1), "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, fused=True)
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(student, batch, opt)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 warm-up + 3 timed steps (default 3 + 10)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    print_header("KD and ILD training steps", "python bench/train_step.py" + " --quick" * args.quick
                 + f" --batch {args.batch} --seq {args.seq}")
    rate = matmul_flops()
    sheet = datasheet()[1]
    print(f"measured bf16 matmul rate: {rate / 1e12:.0f} TFLOP/s (issue's H100 reference 800; datasheet "
          f"{sheet / 1e12:.0f})")
    base = LlamaConfig.from_dict(json.load(open(SHAPE)))
    warmup, steps = (2, 3) if args.quick else (3, 10)
    b, seq = args.batch, args.seq
    teacher = build("llama", base).requires_grad_(False)
    rows = []
    for stage, name in (("kd", "8mla-8m2"), ("ild", "all-mla"), ("ild", "all-mamba2")):
        student = build(name, base).train()
        fwd_s = flops_per_token(student, seq, with_head=stage == "kd")
        fwd_t = flops_per_token(teacher, seq, with_head=stage == "kd")
        torch.cuda.reset_peak_memory_stats()
        try:
            loss_fn = kd_loss_fn(teacher, KD) if stage == "kd" else ild_loss_fn(teacher)
            sec = measure(step_with(loss_fn), student, b, seq, warmup, steps)
            flops = (3 * fwd_s + fwd_t) * b * seq
            rows.append({"step": stage, "student": name, "b": b, "seq": seq, "ms": sec * 1e3,
                         "tokens/s": b * seq / sec, "TFLOP/s": flops / sec / 1e12,
                         "MFU % (measured)": 100 * flops / sec / rate,
                         "MFU % (datasheet)": 100 * flops / sec / sheet,
                         "peak GiB": torch.cuda.max_memory_allocated() / 2**30})
        except Exception as e:  # noqa: BLE001 - OOM or a kernel failure: report it, go on
            rows.append({"step": stage, "student": name, "ms": f"error: {type(e).__name__}: {str(e)[:80]}"})
        print(rows[-1], flush=True)
        del student
        torch.cuda.empty_cache()
    print()
    print(table(rows, list(max(rows, key=len))))


if __name__ == "__main__":
    main()
