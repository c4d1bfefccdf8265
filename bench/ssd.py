"""SSD scan on the GPU: our Triton kernel vs the reference, mamba_ssm and flash-linear-attention.

    PYTHONPATH=.peers/site python bench/ssd.py [--chunks 64,128] [--shapes llama1b,smollm2]
        [--no-peer-checks]

Peers (never committed; .peers/ as ../shared/gpu/PEERS.md says): mamba_ssm's Triton
`mamba_chunk_scan_combined` (imported without its CUDA extensions) and fla's `chunk_simple_gla`
(SSD as simple GLA: q = C, k = B, v = dt x, g = dt A, scale 1, then + D x). Both need x, B and C
with one head per SSD head or one shared group, so for the Zebra shapes they get x, B (and, for
fla, C) already repeated to h heads, untimed: the repeat is work they would add and we skip.

1. Checks, bf16, fresh random inputs: ours vs the fp32 reference (output, final state, every
   gradient), vs mamba_ssm (output and gradients) and vs fla (output); relative RMS errors.
2. Times, median of triton.testing.do_bench, fwd and fwd+bwd, with D, dt_bias + softplus, no z:
   Mamba2 shape b=8, h=32, p=64, n=128, g=1, l in {2048, 4096, 8192}; Zebra Llama-3.2-1B
   (h=32, p=n=64, x/B 8 heads, C 32) and SmolLM2-135M (h=9, p=n=64, x/B 3 heads, C 9), b=8.
   GB/s counts each input read once and each output written once (fwd: x dt B C -> y;
   fwd+bwd adds dout read and dx ddt dB dC written) against the measured copy bandwidth.
"""

import argparse
import os
import sys
import types

import torch
import triton
from einops import repeat
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zebra.kernels.reference import process_dt, ssd_chunked  # noqa: E402
from zebra.kernels.ssd import ssd_scan  # noqa: E402

MAMBA_DIR = ".peers/mamba_ssm-2.3.2.post1/mamba_ssm"


def load_peers():
    peers = {}
    if os.path.isdir(MAMBA_DIR):  # bare package: skip mamba_ssm/__init__ and its CUDA imports
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [MAMBA_DIR]
        sys.modules["mamba_ssm"] = pkg
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        peers["mamba"] = mamba_chunk_scan_combined
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        peers["fla"] = chunk_simple_gla
    except ImportError as e:
        print(f"fla not available: {e}")
    return peers


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make(b, l, h, hx, gb, gc, p, n, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    dev = "cuda"
    return dict(x=torch.randn(b, l, hx, p, device=dev, dtype=dtype),
                dt=torch.randn(b, l, h, device=dev, dtype=dtype) - 2.0,
                A=-torch.empty(h, device=dev).uniform_(1, 16),
                B=torch.randn(b, l, gb, n, device=dev, dtype=dtype) / n ** 0.5,
                C=torch.randn(b, l, gc, n, device=dev, dtype=dtype) / n ** 0.5,
                D=torch.ones(h, device=dev), dt_bias=torch.rand(h, device=dev) - 4.0)


def expand(inp, h):
    """x, B, C repeated to h heads (for peers that cannot share heads)."""
    return {k: repeat(v, "b l g d -> b l (g r) d", r=h // v.shape[2]) if k in ("x", "B", "C") else v
            for k, v in inp.items()}


def mamba_call(mamba, inp, chunk):
    """mamba_ssm on inp; x, B and C are repeated first (into new leaves) where it needs that."""
    e = inp
    if inp["x"].shape[2] != inp["dt"].shape[-1] or inp["B"].shape[2] != inp["C"].shape[2]:
        e = {k: v.detach().requires_grad_(v.requires_grad)
             for k, v in expand(inp, inp["dt"].shape[-1]).items()}
    return lambda: mamba(e["x"], e["dt"], e["A"], e["B"], e["C"], chunk, D=e["D"],
                         dt_bias=e["dt_bias"], dt_softplus=True)


def fla_call(fla, inp):
    h = inp["dt"].shape[-1]
    e = expand(inp, h)
    dt = process_dt(e["dt"], e["dt_bias"], True)
    q, k = e["C"], e["B"]
    v = (e["x"] * dt[..., None]).to(e["x"].dtype)
    g = dt * e["A"]
    return lambda: fla(q, k, v, g=g, scale=1.0)[0] + e["D"][:, None] * e["x"]


def checks(peers):
    """Ours vs the fp32 reference; vs the peers when `peers` has them."""
    print("== checks (bf16 inputs, relative RMS error vs fp32 reference) ==")
    for name, shape in [("zebra-like l=1000", (2, 1000, 8, 2, 2, 8, 64, 64)),
                        ("mamba-like l=777", (2, 777, 4, 4, 1, 1, 64, 128))]:
        inp = make(*shape, seed=1)
        leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
        leaves32 = {k: v.float().requires_grad_(True) for k, v in inp.items()}
        kw = dict(dt_softplus=True, return_final_state=True)
        y, s = ssd_scan(**leaves, **kw, chunk_size=64)
        yr, sr = ssd_chunked(**leaves32, **kw, chunk_size=64)
        dy, ds = torch.randn_like(yr), torch.randn_like(sr)
        g = torch.autograd.grad((y.float() * dy).sum() + (s * ds).sum(), list(leaves.values()))
        gr = torch.autograd.grad((yr * dy).sum() + (sr * ds).sum(), list(leaves32.values()))
        errs = {"y": rel(y, yr), "final": rel(s, sr)}
        errs.update({f"d{k}": rel(a, b) for k, a, b in zip(leaves, g, gr)})
        print(f"ours vs reference, {name}: " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        assert all(v < 2e-2 for v in errs.values()), errs
        if "mamba" in peers:  # gradients only where mamba_ssm takes our inputs unrepeated
            e = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
            ym = mamba_call(peers["mamba"], e, 64)()
            yo = ssd_scan(**leaves, dt_softplus=True, chunk_size=64)
            errs = {"y": rel(yo, ym)}
            if shape[3] == shape[2] and shape[4] == shape[5]:
                names = ("x", "dt", "A", "B", "C", "D", "dt_bias")
                gm = torch.autograd.grad((ym.float() * dy).sum(), [e[k] for k in names])
                go = torch.autograd.grad((yo.float() * dy).sum(), [leaves[k] for k in names])
                errs.update({f"d{k}": rel(a, b) for k, a, b in zip(names, go, gm)})
            print(f"ours vs mamba_ssm, {name}: "
                  + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        if "fla" in peers:
            print(f"ours vs fla fwd, {name}: y {rel(y, fla_call(peers['fla'], inp)()):.1e}")


def gbytes(inp, bwd):
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    b, l, h = inp["dt"].shape
    y = b * l * h * inp["x"].shape[-1] * inp["x"].element_size()
    fwd = sum(size(inp[k]) for k in ("x", "dt", "B", "C")) + y
    return (2 * fwd + y) / 1e9 if bwd else fwd / 1e9  # bwd: the same tensors again, + dout


# name: (b, l, h, hx, gb, gc, p, n)
SHAPES = {"mamba2-2k": (8, 2048, 32, 32, 1, 1, 64, 128),
          "mamba2-4k": (8, 4096, 32, 32, 1, 1, 64, 128),
          "mamba2-8k": (8, 8192, 32, 32, 1, 1, 64, 128),
          "llama1b": (8, 4096, 32, 8, 8, 32, 64, 64),
          "smollm2": (8, 4096, 9, 3, 3, 9, 64, 64)}


def timing(peers, chunks, names):
    copy = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    bw = 2 * copy.numel() / do_bench(lambda: copy.clone(), return_mode="median") / 1e6
    del copy
    print(f"\n== timing (median ms; copy bandwidth {bw:.0f} GB/s, read + write) ==")
    shapes = [(name, *SHAPES[name]) for name in names]
    print("| shape | l | kernel (chunk) | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s |")
    print("|---|---|---|---|---|---|---|")
    for name, *shape in shapes:
        inp = make(*shape)
        leaves = {k: v.requires_grad_(True) for k, v in inp.items()}
        dout = torch.randn(*shape[:3], shape[6], device="cuda", dtype=torch.bfloat16)
        res = {}
        for chunk in chunks:
            f = lambda: ssd_scan(**leaves, dt_softplus=True, chunk_size=chunk)  # noqa: E731,B023
            res[f"ours{chunk}"] = (do_bench(f, return_mode="median"),
                                   do_bench(lambda: f().backward(dout), return_mode="median"))
        if "mamba" in peers:
            m = mamba_call(peers["mamba"], leaves, 256)
            res["mamba256"] = (do_bench(m, return_mode="median"),
                               do_bench(lambda: m().backward(dout), return_mode="median"))
        if "fla" in peers:
            with torch.no_grad():
                res["fla64"] = (do_bench(fla_call(peers["fla"], inp), return_mode="median"), None)
        gb_f, gb_b = gbytes(inp, False), gbytes(inp, True)
        for k, (tf, tb) in res.items():
            gf, gb = gb_f / tf * 1e3, gb_b / tb * 1e3 if tb else None
            tbs = f"{tb:.3f}" if tb else "-"
            gbs = f"{gb:.0f} ({gb / bw:.0%})" if gb else "-"
            print(f"| {name} | {shape[1]} | {k} | {tf:.3f} | {tbs} | {gf:.0f} ({gf / bw:.0%}) "
                  f"| {gbs} |")
        best = min(v[1] for k, v in res.items() if k.startswith("ours"))
        bestf = min(v[0] for k, v in res.items() if k.startswith("ours"))
        if "mamba256" in res:
            print(f"ratio {name} l={shape[1]}: ours/mamba fwd {bestf / res['mamba256'][0]:.2f} "
                  f"fwd+bwd {best / res['mamba256'][1]:.2f}"
                  + (f"; ours/fla fwd {bestf / res['fla64'][0]:.2f}" if "fla64" in res else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="64,128", help="our chunk sizes to time")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"some of {','.join(SHAPES)}")
    ap.add_argument("--no-peer-checks", action="store_true", help="check ours vs reference only")
    args = ap.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        ap.error(f"--shapes: unknown {sorted(unknown)}; choose from {','.join(SHAPES)}")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    peers = load_peers()
    checks({} if args.no_peer_checks else peers)
    timing(peers, [int(c) for c in args.chunks.split(",")], args.shapes.split(","))
