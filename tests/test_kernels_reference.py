"""The torch references agree with each other: chunked SSD == the sequential recurrence (any
length, groups, D, z, dt processing, initial state), one-token steps == the sequence versions,
and the conv1d reference == an explicit sum over taps. fp64 so that only the algebra is tested."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zebra.kernels import reference as ref


def ssd_inputs(b, l, h, hx, gb, gc, p, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(b, l, hx, p), dt=r(b, l, h), A=-torch.rand(h, generator=g, dtype=dtype) * 2,
                B=r(b, l, gb, n), C=r(b, l, gc, n), D=r(h), z=r(b, l, h, p), dt_bias=r(h),
                initial_state=r(b, h, p, n))


@pytest.mark.parametrize("l,h,hx,gb,gc,p,n,chunk", [
    (1, 2, 2, 1, 2, 4, 8, 16), (63, 4, 2, 1, 4, 8, 16, 16), (130, 6, 3, 3, 6, 4, 8, 32)])
@pytest.mark.parametrize("full", [False, True])
def test_chunked_equals_sequential(l, h, hx, gb, gc, p, n, chunk, full):
    inp = ssd_inputs(2, l, h, hx, gb, gc, p, n)
    if not full:  # bare recurrence: no D, z, bias, softplus, clamp or initial state
        inp = {k: inp[k] for k in ("x", "dt", "A", "B", "C")}
        inp["dt"] = inp["dt"].abs()
    kw = dict(dt_softplus=True, dt_limit=(0.01, 5.0)) if full else {}
    y1, s1 = ref.ssd_sequential(**inp, **kw, return_final_state=True, chunk_size=chunk)
    y2, s2 = ref.ssd_chunked(**inp, **kw, return_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s1, rtol=1e-10, atol=1e-10)


def test_step_equals_sequence():
    inp = ssd_inputs(2, 9, 4, 2, 1, 4, 8, 8)
    kw = dict(dt_softplus=True, dt_limit=(0.0, 3.0))
    y, final = ref.ssd_sequential(**inp, **kw, return_final_state=True)
    state = inp["initial_state"].clone()
    for t in range(9):
        yt = ref.ssd_step(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t],
                          inp["C"][:, t], D=inp["D"], z=inp["z"][:, t], dt_bias=inp["dt_bias"],
                          **kw)
        torch.testing.assert_close(yt, y[:, t], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", ["silu", None])
def test_conv1d_reference_and_step(activation):
    g = torch.Generator().manual_seed(0)
    b, l, c, k = 2, 11, 6, 4
    x = torch.randn(b, l, c, generator=g, dtype=torch.float64)
    w = torch.randn(c, k, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    xp = F.pad(x, (0, 0, k - 1, 0))  # zeros before t = 0
    want = bias + sum(w[:, j] * xp[:, j:j + l] for j in range(k))
    want = F.silu(want) if activation == "silu" else want
    got = ref.causal_conv1d(x, w, bias, activation)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    state = torch.zeros(b, c, k, dtype=torch.float64)
    steps = torch.stack([ref.causal_conv1d_step(x[:, t], state, w, bias, activation)
                         for t in range(l)], dim=1)
    torch.testing.assert_close(steps, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, x[:, -k:].transpose(1, 2))


def test_backend_choice():
    """BACKEND is picked once at import; ZEBRA_KERNELS overrides it and is validated."""
    code = ("import zebra.kernels as k, zebra.kernels.ssd as s, zebra.kernels.reference as r; "
            "print(k.BACKEND, k.ssd_scan is s.ssd_scan, k.ssd_scan is r.ssd_chunked)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    for choice, want in (("torch", "torch False True"), ("triton", "triton True False")):
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, ZEBRA_KERNELS=choice),
                             capture_output=True, text=True)
        assert out.stdout.split() == want.split(), out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, ZEBRA_KERNELS="cuda"),
                         capture_output=True, text=True)
    assert out.returncode != 0 and "ZEBRA_KERNELS must be 'torch' or 'triton'" in out.stderr
