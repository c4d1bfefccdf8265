"""Triton one-token SSD update for decoding, batched: the recurrence of reference.py, one step.

Per batch b and head h (x head h // (h // hx), B group h // (h // gb), C group h // (h // gc)):

    dt <- clamp(softplus?(dt + dt_bias), dt_limit)
    state <- exp(dt A) state + dt x B^T          state: (p n) fp32, updated in place
    y = state C + D x;  y <- y silu(z)           y: (p)

Shapes: state (b h p n) fp32, x (b hx p), dt (b h), B (b gb n), C (b gc n), D (h), z (b h p).
One program per (b, h, block of p rows); each reads and writes its state rows once. Row
offsets (b times a stride, (b h) times p n) are int64 scalars, so no tensor size overflows them.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _softplus_clamp(dt, dt_min, dt_max, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """dt <- clamp(softplus?(dt), dt_limit), fp32 (shared with mamba2_step.py)."""
    if SOFTPLUS:  # torch's softplus, threshold 20
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    return dt


@triton.jit
def _state_step(state_ptr, state_offs, mask_pn, x, B, C, dt, A):
    """state <- exp(dt A) state + dt x B^T, stored back; returns state C (p,) fp32 (shared with
    mamba2_step.py). x (p), B (n), C (n), dt, A: fp32."""
    state = tl.load(state_ptr + state_offs, mask=mask_pn, other=0.0)
    state = tl.exp(dt * A) * state + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptr + state_offs, state, mask=mask_pn)
    return tl.sum(state * C[None, :], axis=1)


@triton.jit
def _ssd_step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                     H, P, N, stride_x, stride_dt, stride_b, stride_c, stride_z, RX, RB, RC,
                     dt_min, dt_max, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_p, pid_bh = tl.program_id(0), tl.program_id(1)
    bi, hd, bh = (pid_bh // H).to(tl.int64), pid_bh % H, pid_bh.to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < P, offs_n < N
    dt = tl.load(dt_ptr + bi * stride_dt + hd).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + hd).to(tl.float32)
    dt = _softplus_clamp(dt, dt_min, dt_max, SOFTPLUS, HAS_LIMIT)
    x = tl.load(x_ptr + bi * stride_x + (hd // RX) * P + offs_p, mask=mask_p, other=0.0)
    x = x.to(tl.float32)
    B = tl.load(B_ptr + bi * stride_b + (hd // RB) * N + offs_n, mask=mask_n, other=0.0)
    C = tl.load(C_ptr + bi * stride_c + (hd // RC) * N + offs_n, mask=mask_n, other=0.0)
    state_offs = offs_p[:, None] * N + offs_n[None, :]
    y = _state_step(state_ptr + bh * P * N, state_offs, mask_p[:, None] & mask_n[None, :], x,
                    B.to(tl.float32), C.to(tl.float32), dt, tl.load(A_ptr + hd).to(tl.float32))
    if HAS_D:
        y += tl.load(D_ptr + hd).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + bi * stride_z + hd * P + offs_p, mask=mask_p, other=0.0)
        z = z.to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + bh * P + offs_p, y, mask=mask_p)


def _batch_rows(t):
    """(b g d) with (g d) contiguous, any batch stride (a split view qualifies)."""
    if t.stride(-1) != 1 or (t.dim() == 3 and t.stride(1) != t.shape[2]):
        t = t.contiguous()
    return t, t.stride(0)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf"))):
    """One token of the SSD recurrence (Triton). state (b h p n) fp32, updated IN PLACE;
    x (b hx p), dt (b h), A (h), B (b gb n), C (b gc n), D (h), z (b h p), dt_bias (h).
    Returns y (b h p) in x's dtype."""
    b, h, p, n = state.shape
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("ssd_step: state must be a contiguous fp32 tensor (b h p n)")
    for name, t, d in (("x", x, p), ("B", B, n), ("C", C, n)):
        if t.dim() != 3 or t.shape[0] != b or t.shape[2] != d or h % t.shape[1]:
            raise ValueError(f"ssd_step: {name} must be (b, g, {d}) with g dividing h={h}, "
                             f"got {tuple(t.shape)}")
    (xr, sx), (dtr, sdt), (Br, sb), (Cr, sc) = (_batch_rows(t) for t in (x, dt, B, C))
    zr, sz = _batch_rows(z) if z is not None else (None, 0)
    y = x.new_empty(b, h, p)
    block_p = min(64, triton.next_power_of_2(p))
    _ssd_step_kernel[(triton.cdiv(p, block_p), b * h)](
        state, xr, dtr, A, Br, Cr, D, zr, dt_bias, y, h, p, n, sx, sdt, sb, sc, sz,
        h // x.shape[1], h // B.shape[1], h // C.shape[1], float(dt_limit[0]), float(dt_limit[1]),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, HAS_LIMIT=tuple(dt_limit) != (0.0, float("inf")),
        BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(n))
    return y
