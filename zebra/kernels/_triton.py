"""Helpers shared by the Triton kernels of this package (autotune configs, layouts).

Offsets: program ids and i32 size/stride arguments are int32 in Triton, so a product such as
(batch row) x (row stride) overflows once a tensor holds 2^31 elements (a (48, 16384, 5152) bf16
in_proj output does: an illegal memory access). The kernels therefore offset each program's block
(its batch row, first row or chunk) by one SCALAR int64 and keep the offsets within the block
(t_local * stride with t_local < the block length, channel offsets) int32: cheap per element,
and the loads stay vectorised as before.
"""

import os

import triton
import triton.language as tl

# Triton 3.9's interpreter gets tl.dot of bf16 operands wrong (fp16 and fp32 are right), so
# under the interpreter the kernels feed fp32 to their matrix products; GPUs use x's dtype.
FP32_DOTS = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def tuning_configs(configs):
    """Autotune configs, only the first under TRITON_INTERPRET=1: the interpreter ignores
    num_warps/num_stages and block sizes do not change results, so tuning there is wasted."""
    return configs[:1] if os.environ.get("TRITON_INTERPRET") == "1" else configs


def warps_stages(pairs):
    """Autotune configs from (num_warps, num_stages) pairs."""
    return tuning_configs([triton.Config({}, num_warps=w, num_stages=s) for w, s in pairs])


def rows(t):
    """(b l g d) with unit stride over g d and batch stride l * row stride (a split view of a
    wider projection qualifies): returned as is with its row stride; otherwise made contiguous."""
    b, l, g, d = t.shape
    if not (t.stride(3) == 1 and t.stride(2) == d and t.stride(0) == l * t.stride(1)):
        t = t.contiguous()
    return t, t.stride(1)


@triton.jit
def _chunk_ptrs(ptr, row0, stride, head, D, offs_d, mask_q):
    """Pointers and mask of rows row0 + q (q < len(mask_q), where mask_q holds) of head `head`
    of a (rows g D) tensor with row stride `stride`: (q, len(offs_d)). row0 is int64 and is
    added first, so only the in-block offsets are int32."""
    offs_q = tl.arange(0, mask_q.shape[0])
    ptrs = ptr + row0 * stride + offs_q[:, None] * stride + head * D + offs_d[None, :]
    return ptrs, mask_q[:, None] & (offs_d < D)[None, :]


@triton.jit
def load_chunk(ptr, row0, stride, head, D, offs_d, mask_q):
    """The block _chunk_ptrs describes, 0 off the mask."""
    ptrs, mask = _chunk_ptrs(ptr, row0, stride, head, D, offs_d, mask_q)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_chunk(ptr, row0, stride, head, D, offs_d, mask_q, value):
    """Store value (q, len(offs_d)) where load_chunk with the same arguments reads."""
    ptrs, mask = _chunk_ptrs(ptr, row0, stride, head, D, offs_d, mask_q)
    tl.store(ptrs, value, mask=mask)


def block(v):
    """Power-of-two block covering v, at least 16 (tl.dot's smallest side)."""
    return max(16, triton.next_power_of_2(v))
