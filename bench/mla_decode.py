"""MLA decode attention on the GPU: the Triton latent-cache kernel vs the torch absorbed path and
SDPA (flash) over materialised keys and values.

    python bench/mla_decode.py [--quick]

One decode step (one query token per row) of one MLA layer at the Zebra Llama-3.2-1B shape
(H = 32 query heads, 8 kv groups, r_kv = 128, d_rope = 32, d_nope = 32, d_v = 64; bf16), over a
batch x context sweep; the full sweep adds a DeepSeek-V2-Lite-like layer (H = 16, one group,
r_kv = 512, d_rope = 64, d_nope = 128, d_v = 128). Timed, median of triton.testing.do_bench
(it flushes the L2 before every run):
    kernel      zebra.kernels.mla_decode alone (default split-K): the latent part
    absorbed    MLAttention.attend_absorbed, W_uk into the query and W_uv after: the whole
                decode attention, with zebra.kernels.BACKEND "triton" (the kernel) and "torch"
                (einsum scores, fp32 softmax, einsum: the reference path)
    sdpa        F.scaled_dot_product_attention, FLASH backend, one query over materialised
                k = [k_nope | k_rope], v (b Hk T d) with GQA: what the layer would read if its
                keys and values were cached expanded, as a Llama-style layer's are
    graph       the kernel alone again, timed as CUDA-graph replays (do_bench_cudagraph): no host
                launch cost, which dominates small sizes on a slow host (seen on the lent H100,
                bench/RESULTS.md); replays do not flush the L2, so below ~50 MB of latents the
                keys may come from it
Bytes: kernel reads b T (r_kv + d_rope) values (2 bytes each; queries and outputs are
negligible); sdpa reads b T Hk (d_nope + d_rope + d_v). GB/s and % of the copy bandwidth
measured in this run. Every point also checks the kernel against mla_decode_reference (fp32).
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_bandwidth, print_header, table, table_header, table_row  # noqa: E402
from zebra import kernels  # noqa: E402
from zebra.kernels.mla_decode import mla_decode, mla_decode_reference  # noqa: E402
from zebra.llama import Cache  # noqa: E402
from zebra.mla import MLAConfig, MLAttention  # noqa: E402

DEVICE = "cuda"  # a CPU smoke run of the script's logic swaps this (and the timer) out
SHAPES = {
    "zebra-1b": MLAConfig(hidden_size=2048, n_heads=32, n_kv_heads=8, q_rank=0, kv_rank=128, d_nope=32,
                          d_rope=32, v_head_dim=64),
    "dsv2-lite": MLAConfig(hidden_size=2048, n_heads=16, n_kv_heads=1, q_rank=0, kv_rank=512, d_nope=128,
                           d_rope=64, v_head_dim=128),
}


def bench(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def point(mla: MLAttention, b: int, T: int, peak: float) -> dict:
    cfg, dev, dt = mla.cfg, DEVICE, torch.bfloat16
    torch.manual_seed(b * T)
    q_nope = torch.randn(b, cfg.n_heads, 1, cfg.d_nope, device=dev, dtype=dt)
    q_rope = torch.randn(b, cfg.n_heads, 1, cfg.d_rope, device=dev, dtype=dt)
    c_kv = torch.randn(b, T, cfg.kv_rank, device=dev, dtype=dt)
    k_rope = torch.randn(b, T, cfg.d_rope, device=dev, dtype=dt)
    left_pad = torch.zeros(b, dtype=torch.long, device=dev)
    mask = Cache([], left_pad, length=T - 1).attention_mask(1)  # (b 1 1 T), the token at slot T - 1
    q_latent = torch.randn(b, cfg.n_heads, cfg.kv_rank, device=dev, dtype=dt) / cfg.kv_rank**0.5
    row = {"b": b, "T": T}

    out = mla_decode(q_latent, q_rope[:, :, 0], c_kv, k_rope, left_pad, T, mla.scale)
    want = mla_decode_reference(q_latent, q_rope[:, :, 0], c_kv, k_rope, left_pad, T, mla.scale)
    row["rel err"] = ((out.float() - want.float()).norm() / want.float().norm()).item()
    ms = bench(lambda: mla_decode(q_latent, q_rope[:, :, 0], c_kv, k_rope, left_pad, T, mla.scale))
    latent_bytes = b * T * (cfg.kv_rank + cfg.d_rope) * 2
    row.update({"kernel us": ms * 1e3, "kernel GB/s": latent_bytes / ms / 1e6,
                "% peak": 100 * latent_bytes / (ms * 1e-3) / peak})
    ms = do_bench_cudagraph(lambda: mla_decode(q_latent, q_rope[:, :, 0], c_kv, k_rope, left_pad, T, mla.scale),
                            rep=50, return_mode="median")
    row.update({"graph us": ms * 1e3, "graph % peak": 100 * latent_bytes / (ms * 1e-3) / peak})
    for backend in ("triton", "torch"):
        kernels.BACKEND = backend
        try:
            row[f"absorbed {backend} us"] = bench(lambda: mla.attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask)) * 1e3
        except torch.OutOfMemoryError:
            row[f"absorbed {backend} us"] = "OOM"
    kernels.BACKEND = "triton"
    if isinstance(row["absorbed torch us"], float):
        row["torch/triton"] = row["absorbed torch us"] / row["absorbed triton us"]

    Hk, d_qk = cfg.n_kv_heads, cfg.d_nope + cfg.d_rope
    q = torch.cat([q_nope, q_rope], -1)
    k = torch.randn(b, Hk, T, d_qk, device=dev, dtype=dt)
    v = torch.randn(b, Hk, T, cfg.v_head_dim, device=dev, dtype=dt)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=mla.scale, enable_gqa=Hk != cfg.n_heads))
            kv_bytes = b * T * Hk * (d_qk + cfg.v_head_dim) * 2
            row.update({"sdpa us": ms * 1e3, "sdpa GB/s": kv_bytes / ms / 1e6,
                        "sdpa/absorbed triton": ms * 1e3 / row["absorbed triton us"]})
        except RuntimeError as e:  # no flash kernel for this shape or GQA on this build
            row["sdpa us"] = f"n/a ({str(e).splitlines()[0][:40]})"
    return row


def splits_sweep(mla: MLAttention, b: int, T: int) -> dict:
    cfg, dev, dt = mla.cfg, DEVICE, torch.bfloat16
    q_latent = torch.randn(b, cfg.n_heads, cfg.kv_rank, device=dev, dtype=dt)
    q_rope = torch.randn(b, cfg.n_heads, cfg.d_rope, device=dev, dtype=dt)
    c_kv = torch.randn(b, T, cfg.kv_rank, device=dev, dtype=dt)
    k_rope = torch.randn(b, T, cfg.d_rope, device=dev, dtype=dt)
    pads = torch.zeros(b, dtype=torch.long, device=dev)
    row = {"b": b, "T": T}
    for s in (1, 2, 4, 8, 16, 32, 64, None):
        row[f"S={s or 'auto'} us"] = bench(lambda: mla_decode(q_latent, q_rope, c_kv, k_rope, pads, T, mla.scale,
                                                                num_splits=s)) * 1e3
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Zebra shape, b in {1, 16, 64}, T in {4k, 32k}")
    args = ap.parse_args()
    print_header("MLA decode attention", "python bench/mla_decode.py" + " --quick" * args.quick)
    peak = copy_bandwidth()
    print(f"measured copy bandwidth: {peak / 1e12:.2f} TB/s (issue's H100 reference 3.0 TB/s)")
    batches, contexts = ([1, 16, 64], [4096, 32768]) if args.quick else ([1, 4, 16, 64], [1024, 4096, 16384, 32768])
    columns = ["b", "T", "rel err", "kernel us", "kernel GB/s", "% peak", "graph us", "graph % peak",
               "absorbed triton us", "absorbed torch us", "torch/triton", "sdpa us", "sdpa GB/s",
               "sdpa/absorbed triton"]
    for name in ["zebra-1b"] + ([] if args.quick else ["dsv2-lite"]):
        cfg = SHAPES[name]
        mla = MLAttention(cfg).to(DEVICE, torch.bfloat16)
        print(f"\n## {name}: {cfg}\n")
        print(table_header(columns), flush=True)
        for b in batches:
            for T in contexts:
                try:
                    row = point(mla, b, T, peak)
                except Exception as e:  # noqa: BLE001 - one broken point must not lose the rest of the sweep
                    row = {"b": b, "T": T, "rel err": f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"}
                print(table_row(row, columns), flush=True)
        print(f"\n## {name}: kernel time (us) by split-K factor S\n")
        sweep = [splits_sweep(mla, b, T) for b, T in ((1, 32768), (16, 4096), (64, 32768))]
        print(table(sweep, list(sweep[0])), flush=True)


if __name__ == "__main__":
    main()
