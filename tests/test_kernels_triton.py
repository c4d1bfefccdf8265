"""Triton kernels vs the torch references (FLA-style: odd lengths, groups, every gradient).

Gradients come from the backward kernels in zebra/kernels/ssd_bwd.py (through ssd_scan's
autograd.Function). On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py). Ground truth is the reference in
fp64; errors are relative RMS ||got - ref|| / ||ref||, named per tensor in the assert message.
"""

import pytest
import torch

from zebra.kernels import reference as ref
from zebra.kernels.conv1d import causal_conv1d, causal_conv1d_step
from zebra.kernels.ssd import ssd_scan
from zebra.kernels.ssd_step import ssd_step

SSD_GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def assert_close_named(got: dict, want: dict, tol):
    errs = {k: rel_err(got[k], want[k]) for k in want}
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= tol}
    all_errs = {k: f"{e:.1e}" for k, e in errs.items()}
    assert not bad, f"relative errors above {tol}: {bad} (all: {all_errs})"


def ssd_inputs(b, l, h, hx, gb, gc, p, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(x=r(b, l, hx, p), dt=r(b, l, h) - 1.0, A=-torch.rand(h, generator=g) * 2 - 0.1,
                B=r(b, l, gb, n), C=r(b, l, gc, n), D=torch.randn(h, generator=g),
                z=r(b, l, h, p), dt_bias=torch.randn(h, generator=g) * 0.5,
                initial_state=torch.randn(b, h, p, n, generator=g))


# (l, h, hx, gb, gc, p, n, chunk, options): options pick D / z / dt_bias + softplus + clamp /
# initial state; the shapes cover Mamba2's (hx = h, one B/C group), Zebra's (x, B with kv
# heads, C with all heads) and uneven groupings, p and n that are not powers of two.
CASES = [
    (1, 2, 2, 1, 1, 16, 16, 16, "D,z,dt,init"),
    (63, 4, 4, 1, 1, 16, 72, 16, ""),  # n > 64: two n tiles in the backward
    (63, 4, 2, 2, 4, 16, 16, 32, "D,z,dt,init"),
    (70, 6, 3, 2, 6, 8, 12, 16, "D,dt"),
    (257, 2, 1, 1, 2, 16, 16, 64, "z,init"),
]


@pytest.mark.parametrize("l,h,hx,gb,gc,p,n,chunk,options", CASES)
def test_ssd_scan_forward_and_grads(l, h, hx, gb, gc, p, n, chunk, options):
    inp = ssd_inputs(2, l, h, hx, gb, gc, p, n, seed=l + h)
    opts = options.split(",")
    used = ["x", "dt", "A", "B", "C"] + [k for k, o in (("D", "D"), ("z", "z"), ("dt_bias", "dt"),
                                                      ("initial_state", "init")) if o in opts]
    dt_limit = (0.001, 4.0) if "dt" in opts else (0.0, float("inf"))
    kw = dict(dt_softplus="dt" in opts, dt_limit=dt_limit, return_final_state=True,
              chunk_size=chunk)
    if "dt" not in opts:
        inp["dt"] = inp["dt"].abs() * 0.3
    leaves = {k: inp[k].clone().requires_grad_(True) for k in used}
    leaves64 = {k: inp[k].double().requires_grad_(True) for k in used}
    y, final = ssd_scan(**leaves, **kw)
    y_ref, final_ref = ref.ssd_chunked(**leaves64, **kw)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    assert_close_named({"y": y, "final_state": final}, {"y": y_ref, "final_state": final_ref}, 1e-5)
    gy, gf = torch.randn_like(y_ref), torch.randn_like(final_ref)
    loss = (y * gy.float()).sum() + (final * gf.float()).sum()
    loss_ref = (y_ref * gy).sum() + (final_ref * gf).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    grads_ref = torch.autograd.grad(loss_ref, list(leaves64.values()))
    assert_close_named(dict(zip(used, grads)), dict(zip(used, grads_ref)), 1e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_ssd_scan_half_precision(dtype, tol):
    """16-bit inputs: output in the input dtype, within its rounding of the fp64 reference
    (the interpreter's products are fp32, so this checks the rounding of inputs and outputs)."""
    inp = ssd_inputs(2, 100, 4, 2, 2, 2, 16, 32, seed=1, dtype=dtype)
    kw = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True,
              initial_state=inp["initial_state"], return_final_state=True, chunk_size=32)
    names = ("x", "dt", "B", "C")
    leaves = {k: inp[k].clone().requires_grad_(True) for k in names}
    leaves64 = {k: inp[k].double().requires_grad_(True) for k in names}
    y, final = ssd_scan(**leaves, A=inp["A"], **kw)
    y_ref, final_ref = ref.ssd_chunked(**leaves64, A=inp["A"], **kw)
    assert y.dtype == dtype
    dy = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y.double() * dy).sum(), list(leaves.values()))
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), list(leaves64.values()))
    assert all(g.dtype == dtype for g in grads)
    assert_close_named({"y": y, "final_state": final, **dict(zip(names, grads))},
                       {"y": y_ref, "final_state": final_ref, **dict(zip(names, grads_ref))}, tol)


def test_ssd_scan_rejects_bad_shapes():
    inp = ssd_inputs(1, 8, 4, 4, 1, 1, 16, 16, seed=0)
    with pytest.raises(ValueError, match="B has 3"):
        ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"].expand(1, 8, 3, 16), inp["C"])
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=48)


def test_ssd_step_token_by_token_equals_scan():
    b, l, h, hx, gb, gc, p, n = 2, 5, 4, 2, 2, 4, 8, 12
    inp = ssd_inputs(b, l, h, hx, gb, gc, p, n, seed=3)
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True, dt_limit=(0.001, 4.0))
    y_ref, final_ref = ref.ssd_sequential(
        inp["x"].double(), inp["dt"].double(), inp["A"], inp["B"].double(), inp["C"].double(),
        z=inp["z"].double(), initial_state=inp["initial_state"], return_final_state=True, **kw)
    state = inp["initial_state"].clone()
    ys = [ssd_step(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                   z=inp["z"][:, t], **kw) for t in range(l)]
    assert_close_named({"y": torch.stack(ys, 1), "state": state},
                       {"y": y_ref, "state": final_ref}, 1e-5)


@pytest.mark.parametrize("l,c,k,activation,bias", [
    (1, 24, 4, "silu", True), (67, 40, 4, "silu", True), (33, 16, 3, None, False)])
def test_causal_conv1d_forward_grads_and_step(l, c, k, activation, bias):
    g = torch.Generator().manual_seed(l)
    x = torch.randn(2, l, c, generator=g)
    w = torch.randn(c, k, generator=g) * 0.5
    bvec = torch.randn(c, generator=g) if bias else None
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((bvec,) if bias else ())]
    leaves64 = [t.double().requires_grad_(True) for t in leaves]
    y = causal_conv1d(leaves[0], leaves[1], leaves[2] if bias else None, activation)
    y_ref = ref.causal_conv1d(leaves64[0], leaves64[1], leaves64[2] if bias else None, activation)
    gy = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y * gy.float()).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), leaves64)
    names = ["x", "weight", "bias"][:len(leaves)]
    assert_close_named({"y": y, **dict(zip(names, grads))},
                       {"y": y_ref, **dict(zip(names, grads_ref))}, 1e-5)
    state = torch.zeros(2, c, k)
    steps = torch.stack([causal_conv1d_step(x[:, t], state, w, bvec, activation)
                         for t in range(l)], dim=1)
    assert_close_named({"step_y": steps}, {"step_y": y_ref}, 1e-5)
    tail = x[:, -k:].transpose(1, 2)
    torch.testing.assert_close(state[:, :, k - tail.shape[2]:], tail)
