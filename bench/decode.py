"""Decode throughput and memory: our Llama, the Zebra hybrids, all-Mamba2, all-MLA and HF
transformers' generate, at Llama-3.2-1B shapes with random weights, bf16.

    python bench/decode.py [--quick] [--official] [--compile] [--batches 1,16,64] [--contexts 1024,4096,16384,32768]

Models (configs/shapes/llama-3.2-1b.json; MLA q_rank, kv_rank, d_rope and layers from
configs/llama-3.2-1b-{8mla8m2,4mla12m2}.yaml, zebra.hybrid.student_config):
    llama       zebra.llama.LlamaForCausalLM (GQA KV cache, SDPA)
    8mla-8m2    hybrid, MLA at layers 0,2,..,14, Mamba2 elsewhere
    4mla-12m2   hybrid, MLA at layers 0,5,10,14
    all-mamba2, all-mla
    hf          transformers LlamaForCausalLM (sdpa, DynamicCache), .generate

Ours, per (batch b, context T): model.new_cache(b, T + steps + 1) filled with random values as if
T tokens had been prefilled (a decode step's cost does not depend on the values, and no prefill
time is spent), then `steps` greedy decode steps (slots T .. T + steps - 1) through
zebra.generate.DecodeStep, timed with CUDA events: 1 warm-up run, `repeats` timed runs, median.
`eager` runs the model's Python forward per token; `graph` replays the step captured once as a
CUDA graph, what zebra.generate does on CUDA (the step attends over the whole buffer under a
mask: T + steps + 1 slots); `compiled` (--compile) replays the graph of the torch.compile'd step
(zebra.generate's compile_step=True). Before timing, each model reports for how many greedy tokens
generate() with the graph (and compiled) agrees with the eager step (a left-padded batch of 2
prompts). HF: generate(T random prompt tokens) with max_new_tokens = 1 and 1 + steps
(min_new_tokens equal, so no EOS stops it); decode time is the difference, the prefill cancels.
Memory: peak allocated during decoding (weights + cache + activations) and the cache itself.
Roofline: bytes per step = every weight once + the cache read (KV / latents up to T, Mamba2
states read and written); % of the copy bandwidth measured in this run, for graph and compiled.
--official: the paper's protocol (batch 48, prompt P = each context, the paper's 4k-32k, 1024
generated tokens), generated tokens/s end to end (prefill + decode), ours vs HF generate.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_bandwidth, print_header, table_header, table_row  # noqa: E402
from zebra.config import LlamaConfig  # noqa: E402
from zebra.generate import DecodeStep, generate  # noqa: E402
from zebra.hybrid import ZebraForCausalLM, student_config  # noqa: E402
from zebra.llama import KVCache, LlamaForCausalLM  # noqa: E402
from zebra.mamba2 import Mamba2Cache  # noqa: E402
from zebra.mla import MLACache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = os.path.join(ROOT, "configs/shapes/llama-3.2-1b.json")
HYBRIDS = {"8mla-8m2": "configs/llama-3.2-1b-8mla8m2.yaml", "4mla-12m2": "configs/llama-3.2-1b-4mla12m2.yaml"}
DEVICE, DTYPE = "cuda", torch.bfloat16
GiB = 2**30


def build(name: str, base: LlamaConfig):
    """One of the models of the module docstring, random weights, on the GPU in bf16."""
    with torch.device(DEVICE):
        if name == "llama":
            return LlamaForCausalLM(base).to(DTYPE).eval()
        # all-mla / all-mamba2 take the MLA shape of the 8mla-8m2 config (the same in both)
        spec = yaml.safe_load(open(os.path.join(ROOT, HYBRIDS.get(name, HYBRIDS["8mla-8m2"]))))["student"]
        if name in HYBRIDS:
            plan = ["mla" if i in spec["mla_layers"] else "mamba2" for i in range(base.num_hidden_layers)]
        else:
            plan = [name.removeprefix("all-")] * base.num_hidden_layers
        cfg = student_config(base, plan, spec["q_rank"], spec["kv_rank"], spec["d_rope"])
        return ZebraForCausalLM(cfg).to(DTYPE).eval()


def cache_bytes_per_step(cache, T: int) -> tuple[int, int]:
    """(bytes a decode step reads from the cache at length T, bytes the cache occupies)."""
    read = held = 0
    for layer in cache.layers:
        size = sum(buf.numel() * buf.element_size() for buf in vars(layer).values())
        held += size
        if isinstance(layer, (KVCache, MLACache)):
            read += size * T // (layer.k.shape[2] if isinstance(layer, KVCache) else layer.c_kv.shape[1])
        elif isinstance(layer, Mamba2Cache):
            read += 2 * size  # read and written
    return read, held


def rewind(cache, T: int):
    """Back to T filled slots (the values stay: a step's cost does not depend on them)."""
    cache.length = T
    cache.slot.fill_(T)


def time_ms(fn, runs: int) -> float:
    """Median milliseconds of fn() over `runs` runs after one warm-up, CUDA events."""
    times = []
    for run in range(1 + runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if run:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def ours(model, b: int, T: int, steps: int, repeats: int, peak_bw: float, weight_bytes: int, modes) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = model.new_cache(b, T + steps + 1)
    for layer in cache.layers:
        for buf in vars(layer).values():
            buf.normal_()
    token = torch.randint(0, 1000, (b,), device=DEVICE)
    row = {"b": b, "T": T}
    for mode in modes:
        decode_step = DecodeStep(model, cache, cuda_graph=mode != "eager", compile_step=mode == "compiled")
        rewind(cache, T)
        decode_step(token)  # the graph is recorded here

        def decode():
            rewind(cache, T)
            t = token
            for _ in range(steps):
                t = decode_step(t).argmax(-1)  # greedy, the loop zebra.generate runs

        ms = time_ms(decode, repeats) / steps
        row.update({f"{mode} ms": ms, f"{mode} tok/s": b * 1e3 / ms})
        del decode_step
    read, held = cache_bytes_per_step(cache, T)
    for mode in modes[1:]:
        row[f"{mode} % roofline"] = 100 * (weight_bytes + read) / (row[f"{mode} ms"] * 1e-3) / peak_bw
    row.update({"peak GiB": torch.cuda.max_memory_allocated() / GiB, "cache GiB": held / GiB})
    return row


@torch.no_grad()
def agreement_with_eager(model, n_new: int = 24, **step) -> str:
    """zebra.generate with the step options `step` (cuda_graph, compile_step) against the eager
    step on a left-padded batch (so pad handling is replayed too): greedy tokens equal before the
    first difference, per row. The graph replays the eager kernels, so it must agree everywhere;
    compiled kernels round bf16 differently and may part paths where two logits nearly tie."""
    prompts = [torch.randint(1, 1000, (n,)).tolist() for n in (300, 17)]
    ref = generate(model, prompts, n_new, cuda_graph=False)
    out = generate(model, prompts, n_new, **step)
    same = [next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), len(r)) for a, r in zip(out, ref)]
    return ", ".join(f"{s}/{len(r)}" for s, r in zip(same, ref))


def hf_model(base_json: dict):
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in base_json.items() if k not in ("architectures",)})
    cfg._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        return transformers.LlamaForCausalLM(cfg).to(DTYPE).eval()


@torch.no_grad()
def hf(model, b: int, T: int, steps: int, repeats: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (b, T), device=DEVICE)
    mask = torch.ones_like(ids)

    def generate(n):
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)

    ms = (time_ms(generate(1 + steps), repeats) - time_ms(generate(1), repeats)) / steps
    return {"b": b, "T": T, "eager ms": ms, "eager tok/s": b * 1e3 / ms,
            "peak GiB": torch.cuda.max_memory_allocated() / GiB}


@torch.no_grad()
def official(model, b: int, P: int, new_tokens: int, is_hf: bool) -> float:
    """Generated tokens/s end to end (prefill + decode), the paper's protocol."""
    ids = torch.randint(0, 1000, (b, P), device=DEVICE)

    def run():
        if is_hf:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            return
        generate(model, ids.tolist(), new_tokens)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return b * new_tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="b in {1, 16}, T in {4k, 16k}, 16 steps")
    ap.add_argument("--official", action="store_true", help="also the paper's protocol (b 48, 1024 tokens, P = each context)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,16,64; --quick 1,16)")
    ap.add_argument("--contexts", help="comma-separated contexts T (default 1k,4k,16k,32k; --quick 4k,16k)")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd step (compiles once per model)")
    args = ap.parse_args()
    if args.compile:  # one compilation per model and batch-size class (1, >= 2) and layer kind:
        torch._dynamo.config.recompile_limit = 64  # past the default 8 dynamo would quietly run eager
    print_header("Decode throughput and memory", "python " + " ".join(sys.argv))
    peak_bw = copy_bandwidth()
    print(f"measured copy bandwidth: {peak_bw / 1e12:.2f} TB/s (issue's H100 reference 3.0 TB/s)")
    base_json = json.load(open(SHAPE))
    base = LlamaConfig.from_dict(base_json)
    batches, contexts = ([1, 16], [4096, 16384]) if args.quick else ([1, 16, 64], [1024, 4096, 16384, 32768])
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    contexts = [int(T) for T in args.contexts.split(",")] if args.contexts else contexts
    steps, repeats = (16, 3) if args.quick else (32, 5)
    modes = ["eager", "graph"] + (["compiled"] if args.compile else [])
    columns = ["model", "b", "T", "eager ms", "eager tok/s"] + \
        [f"{m} {c}" for m in modes[1:] for c in ("ms", "tok/s", "% roofline")] + ["peak GiB", "cache GiB"]
    print(f"\n{steps} decode steps, median of {repeats} after a warm-up\n\n" + table_header(columns), flush=True)
    results = {}
    for name in ["llama", "8mla-8m2", "4mla-12m2", "all-mamba2", "all-mla", "hf"]:
        model = hf_model(base_json) if name == "hf" else build(name, base)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if name != "hf":
            print(f"{name}: greedy tokens equal to eager before the first difference, CUDA graph: "
                  f"{agreement_with_eager(model, cuda_graph=True)}", flush=True)
            if args.compile:
                t0 = time.perf_counter()
                agree = agreement_with_eager(model, cuda_graph=True, compile_step=True)
                print(f"{name}: the same, compiled step: {agree} (compile + 2 generations "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
        for b in batches:
            for T in contexts:
                try:
                    row = hf(model, b, T, steps, repeats) if name == "hf" else \
                        ours(model, b, T, steps, repeats, peak_bw, weight_bytes, modes)
                except torch.OutOfMemoryError:
                    row = {"b": b, "T": T, "eager ms": "OOM"}
                except Exception as e:  # noqa: BLE001 - one broken point must not lose the rest of the sweep
                    row = {"b": b, "T": T, "eager ms": f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"}
                results[name, b, T] = row
                print(table_row({"model": name, **row}, columns), flush=True)
        if args.official:
            for P in contexts:
                try:
                    tps = official(model, 48, P, 1024, name == "hf")
                except torch.OutOfMemoryError:
                    tps = "OOM"
                results[name, "official", P] = tps
                print(f"official protocol {name} b=48 P={P}: {tps} generated tok/s", flush=True)
        del model
        torch.cuda.empty_cache()

    fast = modes[-1]  # the fastest step we have: the graph, or the compiled graph with --compile
    print(f"\nRatios of decode tokens/s: ours ({fast}) over our Llama ({fast}) and over HF generate (eager, its default)\n")
    ratio_cols = ["b", "T"] + [f"{m} / {ref}" for m in ("8mla-8m2", "4mla-12m2") for ref in ("llama", "hf")]
    print(table_header(ratio_cols))
    for b in batches:
        for T in contexts:
            row = {"b": b, "T": T}
            for m in ("8mla-8m2", "4mla-12m2"):
                for ref in ("llama", "hf"):
                    x = results[m, b, T].get(f"{fast} tok/s")
                    y = results[ref, b, T].get("eager tok/s" if ref == "hf" else f"{fast} tok/s")
                    if isinstance(x, float) and isinstance(y, float):
                        row[f"{m} / {ref}"] = f"{x / y:.2f}x"
            print(table_row(row, ratio_cols), flush=True)

if __name__ == "__main__":
    main()
