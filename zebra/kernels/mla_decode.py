"""Triton MLA decode attention over the latent cache: one new query token per row (flash-decoding).

The absorbed form of zebra.mla (W_uk already folded into the query, W_uv applied by the caller):
per row b and query head h, over the keys t in [start_b, length),

    s_t   = scale * (q_latent[b, h] . c_kv[b, t] + q_rope[b, h] . k_rope[b, t])
    out   = sum_t softmax(s)_t c_kv[b, t]                                   (b H r), latent space

Shapes: q_latent (b H r), q_rope (b H d_rope), c_kv (b T r), k_rope (b T d_rope), T >= length,
left_pad (b,). start_b = min(left_pad[b], length - 1): the keys before left_pad are padding
(zebra.llama.Cache), and a row whose query is itself a pad attends to that slot alone, the
same rule as Cache.attention_mask, so no softmax is ever empty. `length` may live on the device
(a (1,) tensor, the decode step's slot + 1): the grid depends on T only, so one captured CUDA
graph serves every length (splits past the length exit at once).

All H heads read the same latents (MQA in latent space), so one program takes a block of heads
as the M dimension of its matrix products and reads each key tile once for all of them:
S = Q_lat C^T + Q_rope K_rope^T (BLOCK_H x BLOCK_T), then acc += P C. Split-K over the context
(flash-decoding) keeps small batches busy: split s of a row covers
[start_b + s * split_len, start_b + (s + 1) * split_len) and writes its running max m, sum l
(of exp(s - m)) and unnormalised acc (BLOCK_H x r) in fp32; the combine kernel merges the
splits with weights exp(m_s - max_s m_s). With one split the first kernel normalises and writes
the output itself. Softmax runs in base 2 (exp2, scale * log2 e folded into the scores); sums
and accumulators are fp32; matrix products take the input dtype (bf16/fp16 tensor cores, IEEE
fp32 for fp32 inputs). Only portable Triton: the kernels build for CUDA and ROCm alike.
Offsets: the row's base (b times a stride) is an int64 scalar and the key slots' offsets are
int64 too, so no cache size overflows them. (An int64 base per key tile with int32 offsets within
it, the other kernels' form, ran 20-28% slower on an H100 where a split holds 8-16 tiles.)
"""

import torch
import triton
import triton.language as tl

from zebra.kernels._triton import FP32_DOTS, block, tuning_configs

_LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 256  # shortest split (a guess): below it a program's fixed cost outweighs its keys


def mla_decode_reference(q_latent, q_rope, c_kv, k_rope, left_pad, length: int, scale: float):
    """The spec in plain torch (fp32 or fp64 math): see the module docstring. Returns (b H r) in
    q_latent's dtype."""
    out_dtype, acc = q_latent.dtype, torch.promote_types(q_latent.dtype, torch.float32)
    q_latent, q_rope = q_latent.to(acc), q_rope.to(acc)
    c_kv, k_rope = c_kv[:, :length].to(acc), k_rope[:, :length].to(acc)
    slots = torch.arange(length, device=c_kv.device)
    valid = slots[None] >= left_pad.clamp(max=length - 1)[:, None]  # (b T)
    scores = (torch.einsum("bhr,btr->bht", q_latent, c_kv) + torch.einsum("bhd,btd->bht", q_rope, k_rope)) * scale
    probs = scores.masked_fill(~valid[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bht,btr->bhr", probs, c_kv).to(out_dtype)


_CONFIGS = tuning_configs([triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=2),
                           triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=3)])


@triton.autotune(_CONFIGS, key=["H", "R", "DR", "SINGLE"])
@triton.jit
def _mla_decode_split_kernel(ql_ptr, qr_ptr, ckv_ptr, kr_ptr, start_ptr, length_ptr, out_ptr, part_ptr,
                             ml_ptr, H, R, DR, split_len, n_splits, qk_scale,
                             stride_qlb, stride_qlh, stride_qrb, stride_qrh,
                             stride_cb, stride_ct, stride_kb, stride_kt,
                             SINGLE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_DR: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_s, pid_b, pid_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r, offs_d = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_DR)
    mask_h, mask_r, mask_d = offs_h < H, offs_r < R, offs_d < DR
    dot_dtype = tl.float32 if FP32_DOTS else ckv_ptr.dtype.element_ty
    q_lat = tl.load(ql_ptr + pid_b * stride_qlb + offs_h[:, None] * stride_qlh + offs_r[None, :],
                    mask=mask_h[:, None] & mask_r[None, :], other=0.0).to(dot_dtype)
    q_rope = tl.load(qr_ptr + pid_b * stride_qrb + offs_h[:, None] * stride_qrh + offs_d[None, :],
                     mask=mask_h[:, None] & mask_d[None, :], other=0.0).to(dot_dtype)

    length = tl.load(length_ptr).to(tl.int32)
    lo = tl.minimum(tl.load(start_ptr + pid_b).to(tl.int32), length - 1) + pid_s * split_len
    hi = tl.minimum(lo + split_len, length)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    c_base = ckv_ptr + pid_b * stride_cb
    k_base = kr_ptr + pid_b * stride_kb
    for t0 in range(lo, hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < hi
        c = tl.load(c_base + offs_t[:, None].to(tl.int64) * stride_ct + offs_r[None, :],
                    mask=mask_t[:, None] & mask_r[None, :], other=0.0).to(dot_dtype)  # (T r)
        k = tl.load(k_base + offs_t[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(dot_dtype)  # (T dr)
        s = tl.dot(q_lat, tl.trans(c), input_precision="ieee")
        s = tl.dot(q_rope, tl.trans(k), s, input_precision="ieee") * qk_scale  # (H T), base 2
        s = tl.where(mask_t[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(dot_dtype), c, acc * alpha[:, None], input_precision="ieee")
        m = m_new

    if SINGLE:  # one split covers the row: normalise and write the output directly
        out = acc / l[:, None]
        tl.store(out_ptr + pid_b * H * R + offs_h[:, None] * R + offs_r[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])
    else:
        row0 = (pid_b * n_splits + pid_s) * H  # partials laid out (b S H r), (b S H 2)
        tl.store(part_ptr + row0 * R + offs_h[:, None] * R + offs_r[None, :], acc,
                 mask=mask_h[:, None] & mask_r[None, :])
        tl.store(ml_ptr + row0 * 2 + offs_h * 2, m, mask=mask_h)
        tl.store(ml_ptr + row0 * 2 + offs_h * 2 + 1, l, mask=mask_h)


@triton.jit
def _mla_decode_combine_kernel(part_ptr, ml_ptr, out_ptr, H, R, n_splits,
                               BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_b, pid_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_s, offs_r = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_R)
    mask_s, mask_r = offs_s < n_splits, offs_r < R
    row0, row = pid_b * n_splits * H, offs_s * H + pid_h  # this row's splits, head pid_h
    m = tl.load(ml_ptr + row0 * 2 + row * 2, mask=mask_s, other=float("-inf"))
    l = tl.load(ml_ptr + row0 * 2 + row * 2 + 1, mask=mask_s, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # empty splits (m = -inf) weigh 0; split 0 is never empty
    acc = tl.load(part_ptr + row0 * R + row[:, None] * R + offs_r[None, :],
                  mask=mask_s[:, None] & mask_r[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + (pid_b * H + pid_h) * R + offs_r, out.to(out_ptr.dtype.element_ty), mask=mask_r)


_SM_COUNT = {}


def default_splits(batch: int, head_blocks: int, length: int, device) -> int:
    """As many splits as fit in four programs per multiprocessor (rounded down: a partly filled
    extra wave costs a whole one), none shorter than 256 keys. At b=64, T=32k on 132 SMs that is
    S=8: 271 us on an H100 (S=4 319, S=16 282) and 224 us on an H200, where S=9 (576 programs,
    4.4 waves) took 295 us; bench/RESULTS.md."""
    if device.type != "cuda":
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = 4 * _SM_COUNT[device] // (batch * head_blocks)
    return max(1, min(wanted, length // _MIN_SPLIT_TOKENS))


@torch.compiler.disable  # under torch.compile (DecodeStep) a call of its own, launched as written
def mla_decode(q_latent, q_rope, c_kv, k_rope, left_pad, length, scale: float,
               num_splits: int | None = None):
    """Latent-space attention of one query token per row (Triton); the spec is mla_decode_reference.

    q_latent (b H r), q_rope (b H d_rope): the new token's absorbed query and rotated rope query;
    c_kv (b T r), k_rope (b T d_rope): the cache slots (T >= length, last dim contiguous);
    left_pad (b,) int: pad slots before each row's first real key; keys [left_pad, length) count;
    length: an int, or a (1,) int tensor on the device (read by the kernel, never synchronised).
    num_splits: split-K factor over the context (None: fill the GPU). Returns (b H r) in
    q_latent's dtype."""
    b, H, r = q_latent.shape
    d_rope = q_rope.shape[-1]
    if q_rope.shape[:2] != (b, H) or c_kv.shape[0] != b or c_kv.shape[2] != r or \
            k_rope.shape != (b, c_kv.shape[1], d_rope) or left_pad.shape != (b,):
        raise ValueError(f"mla_decode: expected q_latent (b H r), q_rope (b H d_rope), c_kv (b T r), "
                         f"k_rope (b T d_rope), left_pad (b,); got {tuple(q_latent.shape)}, "
                         f"{tuple(q_rope.shape)}, {tuple(c_kv.shape)}, {tuple(k_rope.shape)}, "
                         f"{tuple(left_pad.shape)}")
    T = c_kv.shape[1]
    if not isinstance(length, torch.Tensor):
        if not 1 <= length <= T:
            raise ValueError(f"mla_decode: length must be in [1, T={T}], got {length}")
        length = torch.full((1,), length, dtype=torch.long, device=c_kv.device)
    if c_kv.dtype != k_rope.dtype:
        raise ValueError(f"mla_decode: c_kv and k_rope dtypes differ ({c_kv.dtype}, {k_rope.dtype})")
    q_latent, q_rope, c_kv, k_rope = (t if t.stride(-1) == 1 else t.contiguous()
                                      for t in (q_latent, q_rope, c_kv, k_rope))
    q_latent, q_rope = q_latent.to(c_kv.dtype), q_rope.to(c_kv.dtype)
    block_h = min(64, block(H))  # heads are the M side of the matrix products
    head_blocks = triton.cdiv(H, block_h)
    splits = num_splits or default_splits(b, head_blocks, T, c_kv.device)
    split_len = triton.cdiv(triton.cdiv(T, splits), 64) * 64  # whole key tiles per split
    splits = triton.cdiv(T, split_len)
    out = torch.empty(b, H, r, dtype=q_latent.dtype, device=q_latent.device)
    part = ml = out  # unused with one split
    if splits > 1:
        part = torch.empty(b, splits, H, r, dtype=torch.float32, device=out.device)
        ml = torch.empty(b, splits, H, 2, dtype=torch.float32, device=out.device)
    block_r = block(r)
    _mla_decode_split_kernel[(splits, b, head_blocks)](
        q_latent, q_rope, c_kv, k_rope, left_pad, length, out, part, ml, H, r, d_rope, split_len,
        splits, scale * _LOG2E, q_latent.stride(0), q_latent.stride(1), q_rope.stride(0),
        q_rope.stride(1), c_kv.stride(0), c_kv.stride(1), k_rope.stride(0), k_rope.stride(1),
        SINGLE=splits == 1, BLOCK_H=block_h, BLOCK_R=block_r,
        BLOCK_DR=block(d_rope))
    if splits > 1:
        _mla_decode_combine_kernel[(b, H)](part, ml, out, H, r, splits,
                                           BLOCK_S=triton.next_power_of_2(splits), BLOCK_R=block_r)
    return out
