"""Kernels on tensors above 2^31 elements: the last batch row must not depend on the batch size.

    python bench/large_offsets.py [--batch 72] [--seqlen 16384]

GPU only at the default size: peak 57.3 GiB, ~45 s on an H100 (PASS for both kernels; the
kernels before the int64 offsets stopped in the conv with an illegal memory access).

A prefill of 48 x 16384 tokens through an all-Mamba2 Llama-3.2-1B student once crashed with an
illegal memory access: int32 address arithmetic (row x stride) overflowed once a tensor held more
than 2^31 elements. The kernels now offset each program's block in int64 (zebra/kernels/
_triton.py). This runs, at the Llama-3.2-1B Mamba2 shapes (in_proj width 5152 = [z 2048 | x 512 |
B 512 | C 2048 | dt 32], h = 32, 8 kv heads, p = n = 64) and on views laid out as the layer makes
them (zebra/mamba2.py), bf16:

  1. causal_conv1d forward + backward on the conv channels, a (b, l, 3072) strided slice of the
     (b, l, 5152) in_proj output (about 6e9 elements at the default size);
  2. ssd_scan forward + backward with x, B (8 kv heads) and C (32 heads) views of the conv's
     (b, l, 3072) output, z a view of the in_proj output, D, an initial state and the final state;
     y, dout, dz and dC (b, l, 32, 64) pass 2^31 elements too from b = 65 at l = 16384.

Each runs on the whole batch, then on its last batch row alone (small offsets), and compares
that row's outputs and per-row gradients (the weight, bias and per-head sums over the batch are
left out). Same programs on the same data: they must agree exactly (bf16 rounding allowed).
Prints PASS/FAIL per kernel; exits non-zero on a FAIL. With TRITON_INTERPRET=1 and a small
--batch/--seqlen it runs on the CPU, as a check of the script (not of the offsets).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zebra.config import LlamaConfig  # noqa: E402
from zebra.kernels.conv1d import causal_conv1d  # noqa: E402
from zebra.kernels.ssd import ssd_scan  # noqa: E402
from zebra.mamba2 import Mamba2Config  # noqa: E402

# Llama-3.2-1B as a Mamba2 student: in_proj's [z | x | B | C | dt] widths 2048, 512, 512, 2048, 32
CFG = Mamba2Config.from_llama(LlamaConfig.from_dict(json.load(open(os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/shapes/llama-3.2-1b.json")))))
H, HK, P, N, K = CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, CFG.d_state, CFG.d_conv
D_Z, D_X, D_B, D_C, _ = CFG.in_proj_sizes
D_CONV = CFG.conv_channels  # 3072
D_IN = sum(CFG.in_proj_sizes)  # 5152
DTYPE = torch.bfloat16


def compare(name, got: dict, want: dict) -> bool:
    """Max |got - want| per tensor against one bf16 ulp of want's largest value; prints a line."""
    ok, parts = True, []
    for k, w in want.items():
        g, w = got[k].float(), w.float()
        diff = (g - w).abs().max().item()
        tol = 2.0**-7 * w.abs().max().item()
        good = diff <= tol  # False for NaN
        ok &= good
        parts.append(f"{k} {'exact' if diff == 0 else f'{diff:.3g} (tol {tol:.3g})'}"
                     f"{'' if good else ' <-- FAIL'}")
    print(f"  {name}: last row, batch vs alone: " + ", ".join(parts))
    return ok


def sizes(name, tensors: dict):
    big = max(tensors, key=lambda k: tensors[k].numel())
    n = tensors[big].numel()
    note = "" if n > 2**31 else "  (below 2^31: checks the script only)"
    print(f"  {name}: largest tensor {big} {tuple(tensors[big].shape)}, {n / 2**31:.2f} x 2^31 "
          f"elements{note}")


def check_conv(zxbcdt, weight, bias) -> tuple[bool, torch.Tensor]:
    """causal_conv1d fwd + bwd on zxbcdt's conv slice; returns (ok, conv output detached)."""
    xbc_in = zxbcdt[..., D_Z:D_Z + D_CONV]  # (b l 3072), row stride 5152, as Mamba2._project
    y = causal_conv1d(xbc_in, weight, bias, "silu")
    dy = torch.randn_like(y)
    sizes("causal_conv1d", {"in_proj output": zxbcdt, "x": xbc_in, "y": y})
    (dx,) = torch.autograd.grad(y, xbc_in, dy)
    want = {"y": y[-1].detach().clone(), "dx": dx[-1].clone()}
    out, dy_last = y.detach(), dy[-1:].clone()
    del y, dy, dx
    xr = xbc_in[-1:]
    yr = causal_conv1d(xr, weight, bias, "silu")
    (dxr,) = torch.autograd.grad(yr, xr, dy_last)
    return compare("causal_conv1d", {"y": yr[0], "dx": dxr[0]}, want), out


def ssd_inputs(zxbcdt, xbc, rows: slice):
    """x, B, C (views of the conv output) and z (of the in_proj output) for the batch rows, laid
    out as Mamba2 passes them to ssd_scan."""
    xbc, zx = xbc[rows], zxbcdt[rows]
    x = xbc[..., :D_X].unflatten(-1, (HK, P))
    B = xbc[..., D_X:D_X + D_B].unflatten(-1, (HK, N))
    C = xbc[..., D_X + D_B:].unflatten(-1, (H, N))
    z = zx[..., :D_Z].unflatten(-1, (H, P))
    return x, B, C, z


def check_ssd(zxbcdt, xbc, dt, A, D, init) -> bool:
    grads = ("x", "dt", "B", "C", "z", "initial_state")

    def run(rows, dout, dfinal):
        x, B, C, z = ssd_inputs(zxbcdt, xbc, rows)
        leaves = dict(x=x, dt=dt[rows], B=B, C=C, z=z, initial_state=init[rows])
        y, final = ssd_scan(**leaves, A=A, D=D, return_final_state=True)
        if dout is None:
            dout, dfinal = torch.randn_like(y), torch.randn_like(final)
            sizes("ssd_scan", {"in_proj output": zxbcdt, "conv output": xbc, "y": y,
                               "dout": dout})
        g = torch.autograd.grad((y, final), [leaves[k] for k in grads], (dout, dfinal))
        return y.detach(), final.detach(), dict(zip(grads, g)), dout, dfinal

    y, final, g, dout, dfinal = run(slice(None), None, None)
    last = lambda t: t[-1].clone()  # noqa: E731
    want = {"y": last(y), "final_state": last(final), **{f"d{k}": last(v) for k, v in g.items()}}
    dout, dfinal = dout[-1:].clone(), dfinal[-1:].clone()
    del y, final, g
    y, final, g, _, _ = run(slice(-1, None), dout, dfinal)
    got = {"y": y[0], "final_state": final[0], **{f"d{k}": v[0] for k, v in g.items()}}
    return compare("ssd_scan", got, want)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=72)
    ap.add_argument("--seqlen", type=int, default=16384)
    args = ap.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        sys.exit("large_offsets.py needs a GPU (or TRITON_INTERPRET=1, small --batch/--seqlen)")
    dev = "cuda" if torch.cuda.is_available() and not interpret else "cpu"
    b, l = args.batch, args.seqlen
    print(f"# kernels on > 2^31-element tensors: b={b}, l={l}, bf16, "
          f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (interpreter)'}")
    gen = torch.Generator(dev).manual_seed(0)
    results = {}
    t0 = time.time()
    try:
        with torch.no_grad():
            zxbcdt = torch.randn(b, l, D_IN, device=dev, dtype=DTYPE, generator=gen)
            weight = torch.randn(D_CONV, K, device=dev, dtype=DTYPE, generator=gen) * 0.5
            bias = torch.randn(D_CONV, device=dev, dtype=DTYPE, generator=gen) * 0.1
        zxbcdt.requires_grad_(True)
        results["causal_conv1d fwd+bwd"], xbc = check_conv(zxbcdt, weight, bias)
        if dev == "cuda":
            torch.cuda.empty_cache()
        with torch.no_grad():  # dt (after softplus) in [1e-3, 0.1]; A = -exp(U(0, log 16))
            dt = torch.empty(b, l, H, device=dev).uniform_(-6.9, -2.3, generator=gen).exp()
            A = -torch.empty(H, device=dev).uniform_(0.0, 2.77, generator=gen).exp()
            D = torch.ones(H, device=dev)
            init = torch.randn(b, H, P, N, device=dev, generator=gen) * 0.1
        for t in (xbc, dt, init):
            t.requires_grad_(True)
        results["ssd_scan fwd+bwd"] = check_ssd(zxbcdt, xbc, dt, A, D, init)
    except RuntimeError as e:  # an illegal address leaves the CUDA context unusable: stop here
        print(f"  error: {str(e).splitlines()[0]}")
        results.setdefault("causal_conv1d fwd+bwd", False)
        results.setdefault("ssd_scan fwd+bwd", False)
    if dev == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
              f"{time.time() - t0:.0f} s")
    for name, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    sys.exit(0 if all(results.values()) else 1)


if __name__ == "__main__":
    main()
