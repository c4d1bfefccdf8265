"""Helpers shared by the Triton kernels of this package (autotune configs, layouts)."""

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


def block(v):
    """Power-of-two block covering v, at least 16 (tl.dot's smallest side)."""
    return max(16, triton.next_power_of_2(v))
