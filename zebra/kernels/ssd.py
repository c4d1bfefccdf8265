"""Triton chunked SSD (Mamba2 scan), forward and backward, as one torch.autograd.Function.

Same function as `reference.ssd_chunked` (the spec, with the equations and shapes); structure
after mamba_ssm's ssd_combined, one section per stage. Per batch b, head h and chunk c of Q
positions, with a_t = dt_t A and acs_t the cumsum of a within the chunk:

  forward
    0. dt:      dt <- clamp(softplus?(dt + dt_bias)); acs = cumsum_chunk(dt A)    (b h c q) fp32
    1. states:  H_0 = initial_state; H_{c+1} = exp(acs_last) H_c + sum_s exp(acs_last - acs_s)
                dt_s x_s B_s^T, sequential over chunks; stores H_c entering each chunk (b h c p n)
    2. output:  y_t = sum_{s<=t} (C_t.B_s) exp(acs_t - acs_s) dt_s x_s + exp(acs_t) H_c C_t
                + D x_t; y <- y silu(z)
  backward (ssd_bwd.py; H_c recomputed by stage 1, never stored)
    3. dstates: G_c = dL/dH_{c+1}, reverse over chunks
    4. chunk:   every input's gradient, per chunk, from H_c, G_c and the chunk's inputs

Heads share x, B, C in groups (see reference.py): kernels index them by head // ratio, so no
repeated tensor is ever materialised. Matrix products take the input dtype (bf16/fp16 tensor
cores; TF32 for fp32 inputs on GPUs); sums, decays and states are fp32. Only portable Triton is
used (no inline asm), so the kernels build for CUDA and ROCm. Each program's base offset
(first row of its chunk, its (b, h, chunk) state) is an int64 scalar, so tensors may exceed
2^31 elements; offsets within a chunk stay int32 (_triton.py says why).
"""

import torch
import triton
import triton.language as tl

from zebra.kernels._triton import FP32_DOTS, block, load_chunk, rows, store_chunk, warps_stages
from zebra.kernels.ssd_bwd import ssd_backward

# ---------------------------------------------------------------------------------------------
# 0. dt processing and the within-chunk cumsum of dt A


@triton.jit
def _dt_cumsum_kernel(dt_ptr, bias_ptr, A_ptr, dt_out_ptr, acs_ptr, L, H, NC, dt_min, dt_max,
                      HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    offs_q = tl.arange(0, CHUNK)
    hh = tl.arange(0, BLOCK_H)
    mask = (pid_c * CHUNK + offs_q < L)[:, None] & (hh < H)[None, :]
    dt_ptr += (pid_b * L + pid_c * CHUNK).to(tl.int64) * H
    dt = tl.load(dt_ptr + offs_q[:, None] * H + hh[None, :], mask=mask, other=0.0)
    dt = dt.to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + hh, mask=hh < H, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:  # torch's softplus, threshold 20
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask, dt, 0.0)  # padded tail: dt = 0, so decay 1 and no input
    A = tl.load(A_ptr + hh, mask=hh < H, other=0.0).to(tl.float32)
    acs = tl.cumsum(dt * A[None, :], axis=0)
    chunk = (pid_b * H * NC + pid_c).to(tl.int64) * CHUNK  # (b h c q): chunk pid_c, head 0
    out = hh[None, :] * NC * CHUNK + offs_q[:, None]
    tl.store(dt_out_ptr + chunk + out, dt, mask=(hh < H)[None, :])
    tl.store(acs_ptr + chunk + out, acs, mask=(hh < H)[None, :])


# ---------------------------------------------------------------------------------------------
# 1. states entering each chunk (chunk state + state passing in one sequential loop)


@triton.autotune(warps_stages([(4, 2), (8, 2)]), key=["P", "N", "CHUNK"])
@triton.jit
def _states_fwd_kernel(x_ptr, B_ptr, dt_ptr, acs_ptr, init_ptr, states_ptr, final_ptr,
                       L, H, P, N, NC, stride_x, stride_b, RX, RB,
                       HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_pn, pid_bh = tl.program_id(0), tl.program_id(1)
    bi, hd = pid_bh // H, pid_bh % H
    dtype = tl.float32 if FP32_DOTS else x_ptr.dtype.element_ty
    n_pblocks = tl.cdiv(P, BLOCK_P)
    offs_p = (pid_pn % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn // n_pblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, CHUNK)
    mask_pn = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    offs_pn = offs_p[:, None] * N + offs_n[None, :]
    if HAS_INIT:
        h = tl.load(init_ptr + pid_bh.to(tl.int64) * P * N + offs_pn, mask=mask_pn, other=0.0)
    else:
        h = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for c in range(NC):
        chunk = (pid_bh * NC + c).to(tl.int64)
        tl.store(states_ptr + chunk * P * N + offs_pn, h, mask=mask_pn)
        row0, mask_q = (bi * L + c * CHUNK).to(tl.int64), c * CHUNK + offs_q < L
        x = load_chunk(x_ptr, row0, stride_x, hd // RX, P, offs_p, mask_q)
        B = load_chunk(B_ptr, row0, stride_b, hd // RB, N, offs_n, mask_q)
        dt = tl.load(dt_ptr + chunk * CHUNK + offs_q)
        acs = tl.load(acs_ptr + chunk * CHUNK + offs_q)
        acs_last = tl.load(acs_ptr + chunk * CHUNK + CHUNK - 1)
        w = tl.exp(acs_last - acs) * dt  # (q): decay to the chunk's end times dt
        xw = (x * w[:, None]).to(dtype)
        h = tl.exp(acs_last) * h + tl.dot(tl.trans(xw), B.to(dtype))
    if STORE_FINAL:
        tl.store(final_ptr + pid_bh.to(tl.int64) * P * N + offs_pn, h, mask=mask_pn)


# ---------------------------------------------------------------------------------------------
# 2. output: the diagonal block plus the entering state read out by C


@triton.autotune(warps_stages([(4, 2), (8, 2)]), key=["P", "N", "CHUNK"])
@triton.jit
def _output_fwd_kernel(x_ptr, B_ptr, C_ptr, dt_ptr, acs_ptr, states_ptr, D_ptr, z_ptr, y_ptr,
                       L, H, P, N, NC, stride_x, stride_b, stride_c, stride_z, RX, RB, RC,
                       HAS_D: tl.constexpr, HAS_Z: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_p, pid_bc, hd = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, c = pid_bc // NC, pid_bc % NC
    dtype = tl.float32 if FP32_DOTS else x_ptr.dtype.element_ty
    offs_q = tl.arange(0, CHUNK)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    row0, mask_q = (bi * L + c * CHUNK).to(tl.int64), c * CHUNK + offs_q < L
    x = load_chunk(x_ptr, row0, stride_x, hd // RX, P, offs_p, mask_q)
    B = load_chunk(B_ptr, row0, stride_b, hd // RB, N, offs_n, mask_q)
    C = load_chunk(C_ptr, row0, stride_c, hd // RC, N, offs_n, mask_q)
    chunk = ((bi * H + hd) * NC + c).to(tl.int64)
    dt = tl.load(dt_ptr + chunk * CHUNK + offs_q)
    acs = tl.load(acs_ptr + chunk * CHUNK + offs_q)
    state = tl.load(states_ptr + chunk * P * N + offs_p[None, :] * N + offs_n[:, None],
                    mask=(offs_p < P)[None, :] & (offs_n < N)[:, None], other=0.0)  # H_c^T (n p)
    causal = offs_q[:, None] >= offs_q[None, :]
    decay = tl.exp(tl.where(causal, acs[:, None] - acs[None, :], float("-inf")))  # (t s)
    x, B, C = x.to(dtype), B.to(dtype), C.to(dtype)
    scores = tl.dot(C, tl.trans(B)) * decay * dt[None, :]
    y = tl.dot(scores.to(dtype), x)
    y += tl.exp(acs)[:, None] * tl.dot(C, state.to(dtype))
    if HAS_D:
        y += tl.load(D_ptr + hd).to(tl.float32) * x.to(tl.float32)
    if HAS_Z:
        z = load_chunk(z_ptr, row0, stride_z, hd, P, offs_p, mask_q).to(tl.float32)
        y *= z * tl.sigmoid(z)
    store_chunk(y_ptr, row0, H * P, hd, P, offs_p, mask_q, y)


# ---------------------------------------------------------------------------------------------
# host side


def _check(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size):
    b, l, hx, p = x.shape
    h, n = dt.shape[-1], B.shape[-1]
    want = {"dt": (b, l, h), "A": (h,), "B": (b, l, B.shape[2], n), "C": (b, l, C.shape[2], n),
            "D": (h,), "z": (b, l, h, p), "dt_bias": (h,), "initial_state": (b, h, p, n)}
    got = {"dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
           "initial_state": initial_state}
    for name, t in got.items():
        if t is not None and tuple(t.shape) != want[name]:
            raise ValueError(f"ssd_scan: {name} has shape {tuple(t.shape)}, expected {want[name]}")
    for name, g in (("x", hx), ("B", B.shape[2]), ("C", C.shape[2])):
        if h % g != 0:
            raise ValueError(f"ssd_scan: {name} has {g} heads/groups, which must divide h={h}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"ssd_scan: chunk_size must be a power of two >= 16, got {chunk_size}")


def _dt_cumsum(dt, dt_bias, A, dt_softplus, dt_limit, chunk_size):
    b, l, h = dt.shape
    nc = triton.cdiv(l, chunk_size)
    dt_out = dt.new_empty(b, h, nc * chunk_size, dtype=torch.float32)
    acs = torch.empty_like(dt_out)
    has_limit = tuple(dt_limit) != (0.0, float("inf"))
    _dt_cumsum_kernel[(b, nc)](
        dt.contiguous(), dt_bias, A, dt_out, acs, l, h, nc, float(dt_limit[0]),
        float(dt_limit[1]), HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        HAS_LIMIT=has_limit, CHUNK=chunk_size, BLOCK_H=triton.next_power_of_2(h))
    return dt_out, acs


def _states(x, B, dt_out, acs, initial_state, store_final, chunk_size):
    (b, l, hx, p), (h, nc), n = x.shape, (dt_out.shape[1], acs.shape[2] // chunk_size), B.shape[-1]
    (x, sx), (B, sb) = rows(x), rows(B)
    states = x.new_empty(b, h, nc, p, n, dtype=torch.float32)
    final = x.new_empty(b, h, p, n, dtype=torch.float32) if store_final else None
    bp, bn = min(64, block(p)), min(64, block(n))
    grid = (triton.cdiv(p, bp) * triton.cdiv(n, bn), b * h)
    _states_fwd_kernel[grid](
        x, B, dt_out, acs, initial_state, states, final, l, h, p, n, nc, sx, sb, h // hx,
        h // B.shape[2], HAS_INIT=initial_state is not None, STORE_FINAL=store_final,
        CHUNK=chunk_size, BLOCK_P=bp, BLOCK_N=bn)
    return states, final


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, dt_limit,
                return_final_state, chunk_size):
        b, l, hx, p = x.shape
        h, n = dt.shape[-1], B.shape[-1]
        if initial_state is not None:
            initial_state = initial_state.float().contiguous()
        dt_out, acs = _dt_cumsum(dt, dt_bias, A, dt_softplus, dt_limit, chunk_size)
        states, final = _states(x, B, dt_out, acs, initial_state, return_final_state, chunk_size)
        (xr, sx), (Br, sb), (Cr, sc) = rows(x), rows(B), rows(C)
        zr, sz = rows(z) if z is not None else (None, 0)
        y = x.new_empty(b, l, h, p)
        nc = acs.shape[2] // chunk_size
        _output_fwd_kernel[(1, b * nc, h)](
            xr, Br, Cr, dt_out, acs, states, D, zr, y, l, h, p, n, nc, sx, sb, sc, sz, h // hx,
            h // B.shape[2], h // C.shape[2], HAS_D=D is not None, HAS_Z=z is not None,
            CHUNK=chunk_size, BLOCK_P=block(p), BLOCK_N=block(n))
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_out, acs)
        ctx.dt_softplus, ctx.dt_limit, ctx.chunk_size = dt_softplus, dt_limit, chunk_size
        return (y, final) if return_final_state else y

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        x, dt, A, B, C, D, z, dt_bias, initial_state, dt_out, acs = ctx.saved_tensors
        states, _ = _states(x, B, dt_out, acs, initial_state, False, ctx.chunk_size)
        grads = ssd_backward(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_state, dt_out,
                             acs, states, ctx.dt_softplus, ctx.dt_limit, ctx.chunk_size)
        return (*grads, None, None, None, None)


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), initial_state=None, return_final_state=False,
             chunk_size=64):
    """Chunked SSD scan (Triton), differentiable in x, dt, A, B, C, D, z, dt_bias, initial_state.

    x (b l hx p), dt (b l h) raw, A (h) negative, B (b l gb n), C (b l gc n), D (h),
    z (b l h p), dt_bias (h), initial_state (b h p n) fp32; hx, gb, gc divide h.
    Returns y (b l h p) in x's dtype, or (y, final_state (b h p n) fp32).
    """
    _check(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size)
    return _SSDScan.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus,
                          tuple(dt_limit), return_final_state, chunk_size)
