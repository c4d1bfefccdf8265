"""Triton backward of the chunked SSD scan (stages 3 and 4 of ssd.py, whose docstring has the
equations). dy = dout silu(z) is the gradient of the pre-gate output; H_c (states entering each
chunk) come recomputed from ssd.py's stage 1.

  3. dstates: G_c = dL/dH_{c+1}, reverse over chunks: G_{c-1} = exp(acs_last_c) G_c +
              sum_t exp(acs_t) dy_t C_t^T; dL/dH_0 is the initial state's gradient
  4. chunk:   (a) dx_s = sum_t C_t.B_s exp(acs_t - acs_s) dt_s dy_t + exp(acs_last - acs_s) dt_s
              G_c B_s + D dy_s, dz, d(dt) through every decay and softplus / clamp, partial dA
              and dD sums; (b) dC_t = sum_s exp(acs_t - acs_s) dt_s (dy_t.x_s) B_s +
              exp(acs_t) H_c^T dy_t and dB_s alike, n tiled. Two kernels, so that neither holds
              all of a chunk's matrices at once (one kernel spilled registers on sm_90).

Each stage-4 program loops over the heads that share its inputs (x head; B and C groups) and
sums their gradients in registers: no repeated tensor, no atomics. As in ssd.py, each chunk's
base offset is an int64 scalar (row0, chunk) and offsets within the chunk are int32.
"""

import math

import torch
import triton
import triton.language as tl

from zebra.kernels._triton import FP32_DOTS, block, load_chunk, rows, store_chunk, warps_stages


# ---------------------------------------------------------------------------------------------
# 3. backward: gradients of the states, reverse over chunks


@triton.autotune(warps_stages([(4, 2), (8, 2)]), key=["P", "N", "CHUNK"])
@triton.jit
def _dstates_bwd_kernel(dout_ptr, z_ptr, C_ptr, acs_ptr, dfinal_ptr, dstates_ptr, dinit_ptr,
                        L, H, P, N, NC, stride_c, stride_z, RC,
                        HAS_Z: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_pn, pid_bh = tl.program_id(0), tl.program_id(1)
    bi, hd = pid_bh // H, pid_bh % H
    dtype = tl.float32 if FP32_DOTS else C_ptr.dtype.element_ty
    n_pblocks = tl.cdiv(P, BLOCK_P)
    offs_p = (pid_pn % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn // n_pblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, CHUNK)
    mask_pn = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    offs_pn = offs_p[:, None] * N + offs_n[None, :]
    if HAS_DFINAL:
        g = tl.load(dfinal_ptr + pid_bh.to(tl.int64) * P * N + offs_pn, mask=mask_pn, other=0.0)
    else:
        g = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        chunk = (pid_bh * NC + c).to(tl.int64)
        tl.store(dstates_ptr + chunk * P * N + offs_pn, g, mask=mask_pn)
        row0, mask_q = (bi * L + c * CHUNK).to(tl.int64), c * CHUNK + offs_q < L
        dy, _ = _gated_dout(dout_ptr, z_ptr, row0, hd, H, P, stride_z, offs_p, mask_q, HAS_Z)
        C = load_chunk(C_ptr, row0, stride_c, hd // RC, N, offs_n, mask_q)
        acs = tl.load(acs_ptr + chunk * CHUNK + offs_q)
        acs_last = tl.load(acs_ptr + chunk * CHUNK + CHUNK - 1)
        dyw = (dy * tl.exp(acs)[:, None]).to(dtype)
        g = tl.exp(acs_last) * g + tl.dot(tl.trans(dyw), C.to(dtype))
    if HAS_INIT:
        tl.store(dinit_ptr + pid_bh.to(tl.int64) * P * N + offs_pn, g, mask=mask_pn)


# ---------------------------------------------------------------------------------------------
# 4. backward, per chunk: (a) dx, dz, d(dt), dA, dD; (b) dB, dC


@triton.jit
def _gated_dout(dout_ptr, z_ptr, row0, hd, H, P, stride_z, offs_p, mask_q, HAS_Z: tl.constexpr):
    """dL/dy before the gate at rows row0 + q: dout silu(z). Also returns z (fp32) when HAS_Z."""
    dout = load_chunk(dout_ptr, row0, H * P, hd, P, offs_p, mask_q).to(tl.float32)
    z = dout
    if HAS_Z:
        z = load_chunk(z_ptr, row0, stride_z, hd, P, offs_p, mask_q).to(tl.float32)
        dout = dout * z * tl.sigmoid(z)
    return dout, z


@triton.autotune(warps_stages([(4, 1), (8, 1)]), key=["P", "N", "CHUNK"])
@triton.jit
def _chunk_bwd_dx_kernel(x_ptr, B_ptr, C_ptr, dt_raw_ptr, bias_ptr, A_ptr, D_ptr, z_ptr,
                         dt_ptr, acs_ptr, states_ptr, dstates_ptr, dout_ptr,
                         dx_ptr, dz_ptr, ddt_ptr, dA_part_ptr, dD_part_ptr,
                         L, H, P, N, NC, stride_x, stride_b, stride_c, stride_z, RX, RB, RC,
                         dt_min, dt_max, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (b, chunk, x head); loops over the RX heads that read that x head."""
    pid_bc, hx = tl.program_id(0), tl.program_id(1)
    bi, c = pid_bc // NC, pid_bc % NC
    dtype = tl.float32 if FP32_DOTS else x_ptr.dtype.element_ty
    offs_q = tl.arange(0, CHUNK)
    row0, mask_q = (bi * L + c * CHUNK).to(tl.int64), c * CHUNK + offs_q < L
    offs_p = tl.arange(0, BLOCK_P)
    causal = offs_q[:, None] >= offs_q[None, :]
    x = load_chunk(x_ptr, row0, stride_x, hx, P, offs_p, mask_q).to(dtype)
    acc_dx = tl.zeros((CHUNK, BLOCK_P), dtype=tl.float32)
    for i in range(RX):
        hd = hx * RX + i
        chunk = ((bi * H + hd) * NC + c).to(tl.int64)
        dt = tl.load(dt_ptr + chunk * CHUNK + offs_q)
        acs = tl.load(acs_ptr + chunk * CHUNK + offs_q)
        acs_last = tl.load(acs_ptr + chunk * CHUNK + CHUNK - 1)
        # reductions over n, one n tile at a time: C B^T, C H^T, B G^T, (x G . B) and (G . H),
        # with H = H_c entering the chunk and G = dL/dH_{c+1} leaving it
        cb = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
        ch = tl.zeros((CHUNK, BLOCK_P), dtype=tl.float32)
        bg = tl.zeros((CHUNK, BLOCK_P), dtype=tl.float32)
        xgb = tl.zeros((CHUNK,), dtype=tl.float32)
        gh = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            B = load_chunk(B_ptr, row0, stride_b, hd // RB, N, offs_n, mask_q).to(dtype)
            C = load_chunk(C_ptr, row0, stride_c, hd // RC, N, offs_n, mask_q).to(dtype)
            pn = offs_p[:, None] * N + offs_n[None, :]
            mask_pn = (offs_p < P)[:, None] & (offs_n < N)[None, :]
            state = tl.load(states_ptr + chunk * P * N + pn, mask=mask_pn, other=0.0)
            dstate = tl.load(dstates_ptr + chunk * P * N + pn, mask=mask_pn, other=0.0)
            cb += tl.dot(C, tl.trans(B))
            ch += tl.dot(C, tl.trans(state.to(dtype)))
            bg += tl.dot(B, tl.trans(dstate.to(dtype)))
            xgb += tl.sum(tl.dot(x, dstate.to(dtype)) * B.to(tl.float32), axis=1)
            gh += tl.sum(dstate * state, axis=1)
        decay = tl.exp(tl.where(causal, acs[:, None] - acs[None, :], float("-inf")))  # (t s)
        y_off = tl.exp(acs)[:, None] * ch
        if HAS_D:
            Dh = tl.load(D_ptr + hd).to(tl.float32)
        dy, z = _gated_dout(dout_ptr, z_ptr, row0, hd, H, P, stride_z, offs_p, mask_q, HAS_Z)
        if HAS_Z:  # recompute the pre-gate output y for dz = dout y silu'(z)
            y = tl.dot((cb * decay * dt[None, :]).to(dtype), x) + y_off
            if HAS_D:
                y += Dh * x.to(tl.float32)
            sig = tl.sigmoid(z)
            dout = load_chunk(dout_ptr, row0, H * P, hd, P, offs_p, mask_q).to(tl.float32)
            store_chunk(dz_ptr, row0, H * P, hd, P, offs_p, mask_q,
                        dout * y * sig * (1.0 + z * (1.0 - sig)))
        dyx = tl.dot(dy.to(dtype), tl.trans(x))  # (t s): dy_t . x_s
        decay_end = tl.exp(acs_last - acs)  # (s)
        # dx_s = sum_t cb_ts decay_ts dt_s dy_t + decay_end_s dt_s G B_s + D dy_s
        acc_dx += tl.dot(tl.trans((cb * decay * dt[None, :]).to(dtype)), dy.to(dtype))
        acc_dx += (decay_end * dt)[:, None] * bg
        if HAS_D:
            acc_dx += Dh * dy
            tl.store(dD_part_ptr + pid_bc * H + hd, tl.sum(dy * x.to(tl.float32)))
        # d(dt) directly, and d(acs) through every exp(acs_t - acs_s) and exp(acs_last)
        m = dyx * cb * decay
        state_in = decay_end * xgb  # dL/d(dt_s) through the chunk state
        ddt = tl.sum(m, axis=0) + state_in
        m *= dt[None, :]
        dacs = tl.sum(m, axis=1) - tl.sum(m, axis=0) + tl.sum(dy * y_off, axis=1) - state_in * dt
        last = tl.sum(state_in * dt) + tl.exp(acs_last) * tl.sum(gh)  # exp(acs_last) terms
        dacs += tl.where(offs_q == CHUNK - 1, last, 0.0)
        da = tl.cumsum(dacs, axis=0, reverse=True)  # dL/da_s, a_s = dt_s A
        ddt += da * tl.load(A_ptr + hd).to(tl.float32)
        tl.store(dA_part_ptr + pid_bc * H + hd, tl.sum(da * dt))
        # back through clamp, softplus and bias to the raw dt
        raw = tl.load(dt_raw_ptr + row0 * H + offs_q * H + hd, mask=mask_q, other=0.0)
        raw = raw.to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + hd).to(tl.float32)
        if SOFTPLUS:
            if HAS_LIMIT:
                pre = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))
                ddt = tl.where((pre >= dt_min) & (pre <= dt_max), ddt, 0.0)
            ddt *= tl.sigmoid(raw)
        elif HAS_LIMIT:
            ddt = tl.where((raw >= dt_min) & (raw <= dt_max), ddt, 0.0)
        tl.store(ddt_ptr + row0 * H + offs_q * H + hd, ddt, mask=mask_q)
    store_chunk(dx_ptr, row0, (H // RX) * P, hx, P, offs_p, mask_q, acc_dx)


@triton.autotune(warps_stages([(8, 1), (8, 2)]), key=["P", "N", "CHUNK"])
@triton.jit
def _chunk_bwd_dbc_kernel(x_ptr, B_ptr, C_ptr, z_ptr, dt_ptr, acs_ptr, states_ptr, dstates_ptr,
                          dout_ptr, dB_ptr, dC_ptr, L, H, P, N, NC, stride_x, stride_b, stride_c,
                          stride_z, RX, RB, RC, R, HAS_Z: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (b, chunk, n tile, set of R heads sharing B and C groups):
    dC_t = sum_s decay_ts dt_s (dy_t . x_s) B_s + exp(acs_t) H^T dy_t,
    dB_s = sum_t decay_ts dt_s (dy_t . x_s) C_t + decay_end_s dt_s G^T x_s, summed over the
    heads of each group and written when the group's last head is done."""
    pid_bcn, pid_g = tl.program_id(0), tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_bc, pid_n = pid_bcn // n_tiles, pid_bcn % n_tiles
    bi, c = pid_bc // NC, pid_bc % NC
    dtype = tl.float32 if FP32_DOTS else x_ptr.dtype.element_ty
    offs_q = tl.arange(0, CHUNK)
    row0, mask_q = (bi * L + c * CHUNK).to(tl.int64), c * CHUNK + offs_q < L
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pn = offs_p[:, None] * N + offs_n[None, :]
    mask_pn = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    causal = offs_q[:, None] >= offs_q[None, :]
    acc_dB = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
    acc_dC = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
    for i in range(R):
        hd = pid_g * R + i
        chunk = ((bi * H + hd) * NC + c).to(tl.int64)
        dt = tl.load(dt_ptr + chunk * CHUNK + offs_q)
        acs = tl.load(acs_ptr + chunk * CHUNK + offs_q)
        acs_last = tl.load(acs_ptr + chunk * CHUNK + CHUNK - 1)
        x = load_chunk(x_ptr, row0, stride_x, hd // RX, P, offs_p, mask_q).to(dtype)
        dy, _ = _gated_dout(dout_ptr, z_ptr, row0, hd, H, P, stride_z, offs_p, mask_q, HAS_Z)
        dy = dy.to(dtype)
        decay = tl.exp(tl.where(causal, acs[:, None] - acs[None, :], float("-inf")))
        dyxw = (tl.dot(dy, tl.trans(x)) * decay * dt[None, :]).to(dtype)  # (t s)
        B = load_chunk(B_ptr, row0, stride_b, hd // RB, N, offs_n, mask_q).to(dtype)
        C = load_chunk(C_ptr, row0, stride_c, hd // RC, N, offs_n, mask_q).to(dtype)
        state = tl.load(states_ptr + chunk * P * N + pn, mask=mask_pn, other=0.0).to(dtype)
        dstate = tl.load(dstates_ptr + chunk * P * N + pn, mask=mask_pn, other=0.0).to(dtype)
        acc_dC += tl.dot(dyxw, B) + tl.exp(acs)[:, None] * tl.dot(dy, state)
        acc_dB += tl.dot(tl.trans(dyxw), C)
        acc_dB += (tl.exp(acs_last - acs) * dt)[:, None] * tl.dot(x, dstate)
        if (hd + 1) % RB == 0:
            store_chunk(dB_ptr, row0, (H // RB) * N, hd // RB, N, offs_n, mask_q, acc_dB)
            acc_dB = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
        if (hd + 1) % RC == 0:
            store_chunk(dC_ptr, row0, (H // RC) * N, hd // RC, N, offs_n, mask_q, acc_dC)
            acc_dC = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)


def ssd_backward(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_state, dt_out, acs, states,
                 dt_softplus, dt_limit, chunk_size):
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state), None for absent
    inputs. dout (b l h p); dfinal (b h p n) or None; states (b h c p n) fp32 from stage 1;
    dt_out, acs (b h c*q) fp32 from stage 0; the rest as ssd.ssd_scan takes them."""
    b, l, hx, p = x.shape
    h, n, gb, gc = dt.shape[-1], B.shape[-1], B.shape[2], C.shape[2]
    nc = acs.shape[2] // chunk_size
    dout = dout.contiguous()
    (Cr, sc), (xr, sx), (Br, sb) = rows(C), rows(x), rows(B)
    zr, sz = rows(z) if z is not None else (None, 0)
    dstates = torch.empty_like(states)
    dinit = torch.empty_like(initial_state) if initial_state is not None else None
    if dfinal is not None:
        dfinal = dfinal.float().contiguous()
    bp, bn = min(64, block(p)), min(64, block(n))
    _dstates_bwd_kernel[(triton.cdiv(p, bp) * triton.cdiv(n, bn), b * h)](
        dout, zr, Cr, acs, dfinal, dstates, dinit, l, h, p, n, nc, sc, sz, h // gc,
        HAS_Z=z is not None, HAS_DFINAL=dfinal is not None, HAS_INIT=dinit is not None,
        CHUNK=chunk_size, BLOCK_P=bp, BLOCK_N=bn)
    dx, dB, dC = x.new_empty(x.shape), B.new_empty(B.shape), C.new_empty(C.shape)
    dz = z.new_empty(z.shape) if z is not None else None
    ddt = dt.new_empty(b, l, h, dtype=torch.float32)
    dA_part = dt.new_empty(b * nc, h, dtype=torch.float32)
    dD_part = torch.empty_like(dA_part) if D is not None else None
    flags = dict(CHUNK=chunk_size, BLOCK_P=block(p), BLOCK_N=min(64, block(n)))
    _chunk_bwd_dx_kernel[(b * nc, hx)](
        xr, Br, Cr, dt.contiguous(), dt_bias, A, D, zr, dt_out, acs, states, dstates, dout,
        dx, dz, ddt, dA_part, dD_part, l, h, p, n, nc, sx, sb, sc, sz, h // hx, h // gb,
        h // gc, float(dt_limit[0]), float(dt_limit[1]), HAS_D=D is not None,
        HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        HAS_LIMIT=tuple(dt_limit) != (0.0, float("inf")), **flags)
    heads = h // math.gcd(gb, gc)  # heads per program: whole B groups and whole C groups
    _chunk_bwd_dbc_kernel[(b * nc * triton.cdiv(n, flags["BLOCK_N"]), h // heads)](
        xr, Br, Cr, zr, dt_out, acs, states, dstates, dout, dB, dC, l, h, p, n, nc, sx, sb,
        sc, sz, h // hx, h // gb, h // gc, heads, HAS_Z=z is not None, **flags)
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    return dx, ddt.to(dt.dtype), dA, dB, dC, dD, dz, dbias, dinit
