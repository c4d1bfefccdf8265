"""Triton kernels vs the torch references (FLA-style: odd lengths, groups, every gradient).

Gradients come from the backward kernels in zebra/kernels/ssd_bwd.py (through ssd_scan's
autograd.Function). On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py). Ground truth is the reference in
fp64; errors are relative RMS ||got - ref|| / ||ref||, named per tensor in the assert message.
"""

import pytest
import torch
import torch.nn.functional as F

from zebra.kernels import reference as ref
from zebra.kernels.conv1d import causal_conv1d, causal_conv1d_step
from zebra.kernels.mamba2_step import mamba2_step
from zebra.kernels.ssd import ssd_scan
from zebra.kernels.ssd_decode import ssd_step

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


def mamba2_step_reference(zxbcdt, conv_state, ssm_state, n_kv_heads, weight, bias, dt_bias, A_log,
                          D, norm_weight, eps, dt_limit, real):
    """Mamba2.step's unfused composition from reference.py: dt, pad masking, conv step, SSD step,
    and the gated RMSNorm written out."""
    (b, H, P, N), Hk = ssm_state.shape, n_kv_heads
    z, xBC, dt = zxbcdt.split([H * P, Hk * (P + N) + H * N, H], dim=-1)
    dt = ref.process_dt(dt, dt_bias, dt_softplus=True, dt_limit=dt_limit)
    if real is not None:
        xBC, dt = xBC.masked_fill(~real[:, None], 0.0), dt.masked_fill(~real[:, None], 0.0)
    x, B, C = ref.causal_conv1d_step(xBC, conv_state, weight, bias).split([Hk * P, Hk * N, H * N], -1)
    y = ref.ssd_step(ssm_state, x.view(b, Hk, P), dt, -torch.exp(A_log), B.view(b, Hk, N),
                     C.view(b, H, N), D=D)
    y = y * F.silu(z.view(b, H, P))
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).flatten(1) * norm_weight


# (H, Hk, P, N, K, pad, dt_limit): GQA groups and H = Hk, P != N, sizes that are not powers of two
MAMBA2_STEP_CASES = [(6, 2, 16, 16, 4, True, (0.0, float("inf"))), (4, 4, 8, 12, 4, False, (0.01, 0.5)),
                     (3, 1, 12, 10, 3, True, (0.0, float("inf")))]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("H,Hk,P,N,K,pad,dt_limit", MAMBA2_STEP_CASES)
def test_mamba2_step_equals_unfused_reference(H, Hk, P, N, K, pad, dt_limit, dtype, tol):
    """The fused step == the reference composition in fp64, on the same inputs (y, both states);
    in 16 bits only y's final rounding differs (the states stay within fp32 of the reference)."""
    b, c = 3, Hk * (P + N) + H * N
    g = torch.Generator().manual_seed(H + P + N)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    zxbcdt = r(b, H * P + c + H + 5)[:, 5:]  # a strided view, as a split of a wider projection is
    params = dict(weight=r(c, K) * 0.5, bias=r(c), dt_bias=r(H) * 0.5, A_log=r(H) * 0.5, D=r(H),
                  norm_weight=r(H * P), eps=1e-5, dt_limit=dt_limit)
    states = dict(conv_state=r(b, c, K), ssm_state=torch.randn(b, H, P, N, generator=g))
    real = torch.tensor([[True, False], [False, True], [True, True]])[:, 0] if pad else None  # strided
    got = {k: v.clone() for k, v in states.items()}
    y = mamba2_step(zxbcdt, got["conv_state"], got["ssm_state"], Hk, *params.values(), real=real)
    want = {k: v.double() for k, v in states.items()}
    y_ref = mamba2_step_reference(zxbcdt.double(), want["conv_state"], want["ssm_state"], Hk,
                                  *(v.double() if torch.is_tensor(v) else v for v in params.values()), real)
    assert y.dtype == dtype and y.shape == (b, H * P)
    torch.testing.assert_close(got["conv_state"], want["conv_state"].to(dtype), rtol=0, atol=0)
    assert_close_named({"y": y}, {"y": y_ref}, tol)
    assert_close_named({"ssm_state": got["ssm_state"]}, {"ssm_state": want["ssm_state"]}, 1e-5)


def test_mamba2_step_rejects_bad_shapes():
    b, H, Hk, P, N, K = 2, 4, 2, 8, 8, 4
    c = Hk * (P + N) + H * N
    args = dict(conv_weight=torch.randn(c, K), conv_bias=torch.randn(c), dt_bias=torch.randn(H),
                A_log=torch.randn(H), D=torch.randn(H), norm_weight=torch.randn(H * P), eps=1e-5)
    zxbcdt, conv, ssm = torch.randn(b, H * P + c + H), torch.randn(b, c, K), torch.randn(b, H, P, N)
    with pytest.raises(ValueError, match="n_kv_heads"):
        mamba2_step(zxbcdt, conv, ssm, 3, **args)
    with pytest.raises(ValueError, match="zxbcdt"):
        mamba2_step(zxbcdt[:, 1:], conv, ssm, Hk, **args)
    with pytest.raises(ValueError, match="conv_state"):
        mamba2_step(zxbcdt, conv.transpose(1, 2).contiguous().transpose(1, 2), ssm, Hk, **args)
    with pytest.raises(ValueError, match="ssm_state"):
        mamba2_step(zxbcdt, conv, ssm.double(), Hk, **args)
    with pytest.raises(ValueError, match="real"):
        mamba2_step(zxbcdt, conv, ssm, Hk, **args, real=torch.ones(b, 1, dtype=torch.bool))
