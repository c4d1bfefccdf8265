"""KD and ILD training steps at Llama-3.2-1B shapes: tokens/s and MFU, one GPU, bf16, random weights.

    python bench/train_step.py [--quick] [--batch 4] [--seq 2048]

Steps (the losses of zebra.pipeline's kd and ild stages, written out here with zebra.losses):
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
from zebra.losses import ild_loss, kd_loss  # noqa: E402
from zebra.mamba2 import Mamba2  # noqa: E402
from zebra.mla import MLAttention  # noqa: E402


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


def kd_step(student, teacher, ids, targets, opt):
    with torch.no_grad():
        t_hidden = teacher(ids, return_hidden=True)
    s_hidden = student(ids, return_hidden=True)
    out = kd_loss(s_hidden, t_hidden, student.lm_head.weight, teacher.lm_head.weight, targets, chunk_size=1024)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def ild_step(student, teacher, ids, targets, opt):
    with torch.no_grad():
        t_hs = []
        t_final = teacher(ids, hidden_states=t_hs, return_hidden=True)
    s_hs = []
    s_final = student(ids, hidden_states=s_hs, return_hidden=True, layer_inputs=[x for x, _, _ in t_hs])
    loss = ild_loss([o for _, o, _ in s_hs] + [s_final], [o for _, o, _ in t_hs] + [t_final],
                    [m for _, _, m in s_hs], [m for _, _, m in t_hs])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(step, student, teacher, b: int, seq: int, warmup: int, steps: int) -> float:
    """Median seconds per step."""
    ids = torch.randint(0, 1000, (b, seq), device="cuda")
    targets = torch.roll(ids, -1, dims=1)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, fused=True)
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(student, teacher, ids, targets, opt)
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
            sec = measure(kd_step if stage == "kd" else ild_step, student, teacher, b, seq, warmup, steps)
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
