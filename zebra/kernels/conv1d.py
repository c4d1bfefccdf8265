"""Triton causal depthwise conv1d (sequence, forward + backward) and its one-token step.

Same functions as `reference.causal_conv1d` / `reference.causal_conv1d_step` (the spec). Per
channel c with k taps, zeros before t = 0 and act = silu or identity:

    pre_t = bias + sum_j w[c, j] x_{t-k+1+j},    y_t = act(pre_t)               x, y: (b l c)
    backward: g_t = dy_t act'(pre_t);  dx_s = sum_j w[c, j] g_{s+k-1-j};
              dw[c, j] = sum_{b,t} g_t x_{t-k+1+j};  dbias = sum_{b,t} g_t

The backward recomputes pre instead of storing it. The step keeps a rolling buffer of the
last k inputs, conv_state (b c k), oldest first, and updates it in place.

Each program moves its pointers to its first row (b, t0) with an int64 scalar offset, so x and y
may exceed 2^31 elements (a (48, 16384, 5152) in_proj output does); offsets within the block
stay int32 (_triton.py says why).
"""

import torch
import triton
import triton.language as tl

from zebra.kernels._triton import tuning_configs

_CONFIGS = tuning_configs([triton.Config({"BLOCK_L": 32, "BLOCK_C": 64}, num_warps=4),
                           triton.Config({"BLOCK_L": 64, "BLOCK_C": 128}, num_warps=4)])


@triton.jit
def _conv_pre(x_ptr, w_ptr, bias_ptr, t0, q, offs_c, L, Cn, stride_x,
              HAS_BIAS: tl.constexpr, K: tl.constexpr):
    """pre-activation at positions t0 + q (q: BLOCK_L) for channels offs_c (BLOCK_C), fp32;
    x_ptr points at position t0 of the sequence."""
    mask_c = offs_c < Cn
    acc = tl.zeros((q.shape[0], offs_c.shape[0]), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        src = q - (K - 1) + j
        xj = tl.load(x_ptr + src[:, None] * stride_x + offs_c[None, :],
                     mask=((t0 + src >= 0) & (t0 + src < L))[:, None] & mask_c[None, :], other=0.0)
        wj = tl.load(w_ptr + offs_c * K + j, mask=mask_c, other=0.0).to(tl.float32)
        acc += xj.to(tl.float32) * wj[None, :]
    return acc


@triton.autotune(_CONFIGS, key=["Cn", "K"])
@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, L, Cn, stride_x, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, K: tl.constexpr, BLOCK_L: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    bi, pid_l, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, q = pid_l * BLOCK_L, tl.arange(0, BLOCK_L)
    row0 = (bi * L + t0).to(tl.int64)
    x_ptr += row0 * stride_x
    y_ptr += row0 * Cn
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    y = _conv_pre(x_ptr, w_ptr, bias_ptr, t0, q, offs_c, L, Cn, stride_x, HAS_BIAS, K)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + q[:, None] * Cn + offs_c[None, :], y,
             mask=(t0 + q < L)[:, None] & (offs_c < Cn)[None, :])


@triton.autotune(_CONFIGS, key=["Cn", "K"], reset_to_zero=["dw_part_ptr", "db_part_ptr"])
@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, dy_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                     L, Cn, stride_x, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    bi, pid_l, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, s = pid_l * BLOCK_L, tl.arange(0, BLOCK_L)  # this program's rows: t0 + s
    row0 = (bi * L + t0).to(tl.int64)
    x_ptr += row0 * stride_x
    dy_ptr += row0 * Cn
    dx_ptr += row0 * Cn
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < Cn
    part = (bi * tl.num_programs(1) + pid_l).to(tl.int64) * Cn  # partial sums of dw and dbias
    dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for m in tl.static_range(K):  # g at t = s + m feeds dx_s through tap j = K - 1 - m
        q = s + m
        mask_t = (t0 + q < L)[:, None] & mask_c[None, :]
        g = tl.load(dy_ptr + q[:, None] * Cn + offs_c[None, :], mask=mask_t,
                    other=0.0).to(tl.float32)
        if SILU:
            pre = _conv_pre(x_ptr, w_ptr, bias_ptr, t0, q, offs_c, L, Cn, stride_x, HAS_BIAS, K)
            sig = tl.sigmoid(pre)
            g *= sig * (1.0 + pre * (1.0 - sig))
        wj = tl.load(w_ptr + offs_c * K + (K - 1 - m), mask=mask_c, other=0.0).to(tl.float32)
        dx += g * wj[None, :]
        if m == 0:  # this program's own rows: dw and dbias partial sums
            if HAS_BIAS:
                tl.store(db_part_ptr + part + offs_c, tl.sum(g, axis=0), mask=mask_c)
            for j in tl.static_range(K):
                src = s - (K - 1) + j
                xj = tl.load(x_ptr + src[:, None] * stride_x + offs_c[None, :],
                             mask=((t0 + src >= 0) & (t0 + src < L))[:, None] & mask_c[None, :],
                             other=0.0).to(tl.float32)
                tl.store(dw_part_ptr + part * K + offs_c * K + j, tl.sum(g * xj, axis=0),
                         mask=mask_c)
    tl.store(dx_ptr + s[:, None] * Cn + offs_c[None, :], dx,
             mask=(t0 + s < L)[:, None] & mask_c[None, :])


@triton.jit
def _conv_step_rows(x_ptr, state_ptr, w_ptr, bias_ptr, offs_c, mask_c, real,
                    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, K: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """One token for channels offs_c of one row (shared with mamba2_step.py): shift the window
    state[c, :K] left, append x[c] (0 where real is false: a pad), store it back; returns y
    (BLOCK_C) fp32."""
    offs_k = tl.arange(0, BLOCK_K)
    state_offs = offs_c[:, None] * K + offs_k[None, :]
    x = tl.where(real, tl.load(x_ptr + offs_c, mask=mask_c, other=0.0), 0.0)
    # new[j] = old[j + 1] for j < K - 1, new[K - 1] = x
    shifted = tl.load(state_ptr + state_offs + 1, mask=mask_c[:, None] & (offs_k < K - 1)[None, :],
                      other=0.0)
    new = tl.where((offs_k == K - 1)[None, :], x[:, None].to(shifted.dtype), shifted)
    mask_ck = mask_c[:, None] & (offs_k < K)[None, :]
    tl.store(state_ptr + state_offs, new, mask=mask_ck)
    w = tl.load(w_ptr + state_offs, mask=mask_ck, other=0.0).to(tl.float32)
    y = tl.sum(new.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _conv_step_kernel(x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, Cn, stride_x, stride_s,
                      HAS_BIAS: tl.constexpr, SILU: tl.constexpr, K: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    bi, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < Cn
    y = _conv_step_rows(x_ptr + bi * stride_x, state_ptr + bi * stride_s, w_ptr, bias_ptr, offs_c,
                        mask_c, True, HAS_BIAS, SILU, K, BLOCK_K)
    tl.store(y_ptr + bi * Cn + offs_c, y, mask=mask_c)


def _check_activation(activation):
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")


def _grid(b, l, c):
    return lambda meta: (b, triton.cdiv(l, meta["BLOCK_L"]), triton.cdiv(c, meta["BLOCK_C"]))


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        b, l, c = x.shape
        if x.stride(2) != 1 or x.stride(0) != l * x.stride(1):
            x = x.contiguous()
        weight = weight.contiguous()
        y = x.new_empty(b, l, c)
        _conv_fwd_kernel[_grid(b, l, c)](x, weight, bias, y, l, c, x.stride(1),
                                         HAS_BIAS=bias is not None, SILU=activation == "silu",
                                         K=weight.shape[1])
        ctx.save_for_backward(x, weight, bias)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        (b, l, c), k = x.shape, weight.shape[1]
        dy = dy.contiguous()
        dx = torch.empty(b, l, c, dtype=x.dtype, device=x.device)
        n_parts = b * triton.cdiv(l, 32)  # enough rows for the smallest BLOCK_L
        dw_part = x.new_zeros(n_parts, c, k, dtype=torch.float32)
        db_part = x.new_zeros(n_parts, c, dtype=torch.float32)
        _conv_bwd_kernel[_grid(b, l, c)](x, weight, bias, dy, dx, dw_part, db_part, l, c,
                                         x.stride(1), HAS_BIAS=bias is not None,
                                         SILU=ctx.activation == "silu", K=k)
        dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw_part.sum(0).to(weight.dtype), dbias, None


def causal_conv1d(x, weight, bias=None, activation="silu"):
    """Causal depthwise conv1d (Triton). x (b l c) channel-last, weight (c k), bias (c).
    Returns act(conv) (b l c) in x's dtype; differentiable in x, weight and bias."""
    _check_activation(activation)
    if weight.shape[0] != x.shape[-1] or (bias is not None and bias.shape != (x.shape[-1],)):
        raise ValueError(f"causal_conv1d: weight must be (c, k) and bias (c,) for c={x.shape[-1]}")
    return _CausalConv1d.apply(x, weight, bias, activation)


def causal_conv1d_step(x, conv_state, weight, bias=None, activation="silu"):
    """One token (Triton). x (b c); conv_state (b c k), the last k inputs oldest first, updated
    IN PLACE; weight (c k), bias (c). Returns y (b c) in x's dtype."""
    _check_activation(activation)
    (b, c), k = x.shape, weight.shape[1]
    if conv_state.shape != (b, c, k) or conv_state.stride(2) != 1 or conv_state.stride(1) != k:
        raise ValueError(f"causal_conv1d_step: conv_state must be ({b}, {c}, {k}) with (c k) "
                         f"contiguous, got {tuple(conv_state.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = x.new_empty(b, c)
    block_c = min(256, triton.next_power_of_2(c))
    _conv_step_kernel[(b, triton.cdiv(c, block_c))](
        x, conv_state, weight.contiguous(), bias, y, c, x.stride(0), conv_state.stride(0),
        HAS_BIAS=bias is not None, SILU=activation == "silu", K=k,
        BLOCK_K=triton.next_power_of_2(k), BLOCK_C=block_c)
    return y
