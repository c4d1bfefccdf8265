"""KV-cache size and decoding throughput, for the teacher and every student alike.

KV cache (DESIGN.md, "KV cache accounting"), in bytes at `dtype_bytes` per number:
    teacher per token   2 * n_layers * n_kv_heads * head_dim * dtype_bytes
    student per token   n_mla * (r_kv + d_rope) * dtype_bytes       (zebra.hybrid.cache_report)
    student constant    n_mamba * (conv state + SSM state in fp32) per sequence
    % of teacher        student per token / teacher per token * 100
    total at (b, T)     b * (T * per_token + constant)

Throughput uses the decoding loop of zebra.generate: prefill = one forward over (b, T) random
tokens (the head at the last position only), then one untimed decode step (on CUDA it records
the CUDA graph that every later step replays: zebra.generate.DecodeStep), decode = `steps` greedy
steps after it. One untimed warm-up run, then `repeats` timed runs with torch.cuda.synchronize()
around each phase on GPU; we report the median.
    prefill tok/s = b * T / median prefill seconds,   decode tok/s = b * steps / median decode seconds
"""

import statistics
import time

import torch

from zebra.config import LlamaConfig
from zebra.generate import DecodeStep


def teacher_kv_bytes_per_token(config: LlamaConfig, dtype_bytes: int = 2) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes


def kv_cache_report(model, contexts: list[int], batch: int, dtype_bytes: int = 2) -> dict:
    """Per-token and constant cache bytes of `model`, % of its teacher's, totals at each context.

    A plain Llama is its own teacher (100%); a hybrid's teacher is its base Llama shape."""
    if isinstance(model.config, LlamaConfig):
        per_token = teacher_per_token = teacher_kv_bytes_per_token(model.config, dtype_bytes)
        constant = 0
    else:
        from zebra.hybrid import cache_report

        report = cache_report(model.config, contexts[0], batch, dtype_bytes)
        per_token, teacher_per_token = report["kv_bytes_per_token"], report["teacher_kv_bytes_per_token"]
        constant = report["state_bytes_per_sequence"]
    return {"bytes_per_token": per_token, "constant_bytes": constant, "dtype_bytes": dtype_bytes,
            "teacher_bytes_per_token": teacher_per_token,
            "percent_of_teacher": 100.0 * per_token / teacher_per_token,
            "totals": [{"batch": batch, "context": t, "bytes": batch * (t * per_token + constant),
                        "teacher_bytes": batch * t * teacher_per_token} for t in contexts]}


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def throughput(model, batch: int, context: int, steps: int = 32, repeats: int = 5, seed: int = 0) -> dict:
    """Median prefill and decode tokens/s at one (batch, context)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    prefill_s, decode_s = [], []
    for run in range(1 + repeats):  # run 0 is the warm-up (allocations, kernel autotuning, compilation)
        cache = model.new_cache(batch, context + 1 + steps)
        _sync(device)
        t0 = time.perf_counter()
        token = model.lm_head(model(ids, cache, return_hidden=True)[:, -1]).argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        step = DecodeStep(model, cache, cuda_graph=device.type == "cuda")
        token = step(token).argmax(-1)
        _sync(device)
        t1_decode = time.perf_counter()
        for _ in range(steps):
            token = step(token).argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        if run > 0:
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1_decode)
    prefill, decode = statistics.median(prefill_s), statistics.median(decode_s)
    return {"batch": batch, "context": context, "decode_steps": steps, "repeats": repeats,
            "prefill_s": prefill, "decode_s": decode,
            "prefill_tok_s": batch * context / prefill, "decode_tok_s": batch * steps / decode,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
