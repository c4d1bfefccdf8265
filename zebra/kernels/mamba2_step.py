"""Fused Triton Mamba2 decode step: from in_proj's output to the gated-normed y in one launch.

One token of the Zebra Mamba2 block (zebra/mamba2.py) between in_proj and out_proj, per row b:

    [z | x | B | C | dt] = zxbcdt                  z (H P), x (Hk P), B (Hk N), C (H N), dt (H)
    [x | B | C] <- silu(conv_step([x | B | C]))    conv_state (c K) shifted, x appended, in place
    dt <- clamp(softplus(dt + dt_bias), dt_limit),  A = -exp(A_log)
    per head h, reading x and B of kv head g = h // (H / Hk) and its own C:
        state_h <- exp(dt_h A_h) state_h + dt_h x_g B_g^T      (P N) fp32, in place
        y_h = state_h C_h + D_h x_g
        y_h <- w_h * RMSNorm(y_h * silu(z_h))                 over the head's P channels, eps
    a pad row (real = False): conv input 0 and dt = 0, as Mamba2._project does.

Shapes: zxbcdt (b, H P + c + H) with c = Hk (P + N) + H N the conv channels [x | B | C],
conv_state (b c K), weight (c K), bias (c), dt_bias, A_log, D (H), norm weight (H P),
ssm_state (b H P N) fp32, real (b) bool. y (b, H P) in zxbcdt's dtype; all arithmetic fp32.

Grid: one program per (b, kv head g). It convolves x_g and B_g once, then loops over the
H / Hk query heads of the group (their C channels, SSM states, outputs). One program per (b, h)
would race: every head of a group reads x_g's and B_g's conv windows and one of them must store
the shifted windows, and programs are unordered, so another head could read an already
shifted window. Here each conv-state channel and each SSM state is read and written by exactly
one program, so the kernel needs no ordering; the cost is b * Hk programs rather than b * H.
P, N and K are compile-time constants (one build per model shape): for power-of-two sizes the
masks fold away, and the (P N) state tile stays in registers, ~16 values a thread (4-16 warps).
Row offsets (b times a stride) are int64 scalars, so no tensor size overflows them.
"""

import torch
import triton
import triton.language as tl

from zebra.kernels.conv1d import _conv_step_rows
from zebra.kernels.ssd_decode import _softplus_clamp, _state_step


@triton.jit
def _mamba2_step_kernel(zxbcdt_ptr, conv_ptr, w_ptr, bias_ptr, dt_bias_ptr, A_log_ptr, D_ptr,
                        norm_ptr, ssm_ptr, real_ptr, y_ptr, H, Hk, stride_u, stride_conv,
                        stride_real, eps, dt_min, dt_max, P: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                        HAS_PAD: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    bi, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < P, offs_n < N
    offs_pn, mask_pn = offs_p[:, None] * N + offs_n[None, :], mask_p[:, None] & mask_n[None, :]
    if HAS_PAD:
        real = tl.load(real_ptr + bi * stride_real) != 0
    else:
        real = True
    u_ptr = zxbcdt_ptr + bi * stride_u
    xbc_ptr = u_ptr + H * P  # conv channel c is column H P + c
    conv_ptr += bi * stride_conv
    x = _conv_step_rows(xbc_ptr, conv_ptr, w_ptr, bias_ptr, g * P + offs_p, mask_p, real,
                        HAS_BIAS=True, SILU=True, K=K, BLOCK_K=BLOCK_K)
    B = _conv_step_rows(xbc_ptr, conv_ptr, w_ptr, bias_ptr, Hk * P + g * N + offs_n, mask_n,
                        real, HAS_BIAS=True, SILU=True, K=K, BLOCK_K=BLOCK_K)
    R = H // Hk
    for h in range(g * R, g * R + R):
        C = _conv_step_rows(xbc_ptr, conv_ptr, w_ptr, bias_ptr, Hk * (P + N) + h * N + offs_n,
                            mask_n, real, HAS_BIAS=True, SILU=True, K=K, BLOCK_K=BLOCK_K)
        dt = tl.load(xbc_ptr + Hk * (P + N) + H * N + h).to(tl.float32)
        dt = _softplus_clamp(dt + tl.load(dt_bias_ptr + h).to(tl.float32), dt_min, dt_max,
                             SOFTPLUS=True, HAS_LIMIT=HAS_LIMIT)
        dt = tl.where(real, dt, 0.0)
        A = -tl.exp(tl.load(A_log_ptr + h).to(tl.float32))
        y = _state_step(ssm_ptr + (bi * H + h) * P * N, offs_pn, mask_pn, x, B, C, dt, A)
        y += tl.load(D_ptr + h).to(tl.float32) * x
        z = tl.load(u_ptr + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)  # off mask_p: y = 0, so the sum is over the P channels
        y *= tl.rsqrt(tl.sum(y * y, axis=0) / P + eps)
        y *= tl.load(norm_ptr + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        tl.store(y_ptr + (bi * H + h) * P + offs_p, y, mask=mask_p)


@torch.compiler.disable  # under torch.compile (DecodeStep) a call of its own, launched as written
def mamba2_step(zxbcdt, conv_state, ssm_state, n_kv_heads, conv_weight, conv_bias, dt_bias, A_log,
                D, norm_weight, eps, dt_limit=(0.0, float("inf")), real=None):
    """One Mamba2 token after in_proj (Triton, one launch). zxbcdt (b, H P + c + H), any dtype,
    rows may be strided; conv_state (b c K) and ssm_state (b H P N) fp32 updated IN PLACE (H, P,
    N are read off ssm_state); real (b) bool, any stride, or None (no pads). Returns y (b, H P) in zxbcdt's
    dtype, ready for out_proj."""
    (b, H, P, N), Hk, K = ssm_state.shape, n_kv_heads, conv_weight.shape[1]
    c = Hk * (P + N) + H * N
    if H % Hk:
        raise ValueError(f"mamba2_step: n_kv_heads={Hk} must divide H={H}")
    if ssm_state.dtype != torch.float32 or not ssm_state.is_contiguous():
        raise ValueError("mamba2_step: ssm_state must be a contiguous fp32 tensor (b H P N)")
    if zxbcdt.shape != (b, H * P + c + H):
        raise ValueError(f"mamba2_step: zxbcdt must be ({b}, {H * P + c + H}), "
                         f"got {tuple(zxbcdt.shape)}")
    if conv_state.shape != (b, c, K) or conv_state.stride(2) != 1 or conv_state.stride(1) != K:
        raise ValueError(f"mamba2_step: conv_state must be ({b}, {c}, {K}) with (c K) contiguous, "
                         f"got {tuple(conv_state.shape)}")
    if real is not None and real.shape != (b,):
        raise ValueError(f"mamba2_step: real must be ({b},), got {tuple(real.shape)}")
    if zxbcdt.stride(1) != 1:
        zxbcdt = zxbcdt.contiguous()
    y = zxbcdt.new_empty(b, H * P)
    block_p, block_n = triton.next_power_of_2(P), triton.next_power_of_2(N)
    _mamba2_step_kernel[(b, Hk)](
        zxbcdt, conv_state, conv_weight.contiguous(), conv_bias, dt_bias, A_log, D, norm_weight,
        ssm_state, real, y, H, Hk, zxbcdt.stride(0), conv_state.stride(0),
        0 if real is None else real.stride(0), float(eps),
        float(dt_limit[0]), float(dt_limit[1]), P=P, N=N, K=K, HAS_PAD=real is not None,
        HAS_LIMIT=tuple(dt_limit) != (0.0, float("inf")), BLOCK_P=block_p, BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(K), num_warps=min(16, max(4, block_p * block_n // 512)))
    return y
