"""SSD scan, SSD one-token step and causal conv1d behind one API, backend picked once at import.

BACKEND is "triton" when torch.cuda.is_available() (CUDA or ROCm), else "torch" (the plain
reference in reference.py); the environment variable ZEBRA_KERNELS=torch|triton overrides.
Both backends share the signatures of reference.py:

    ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, inf), initial_state=None, return_final_state=False, chunk_size=64)
    ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, inf))                       # state updated in place
    causal_conv1d(x, weight, bias=None, activation="silu")
    causal_conv1d_step(x, conv_state, weight, bias=None, activation="silu")  # state in place

Fused decode kernels with no torch twin (mamba2_step.py: a whole Mamba2 token after in_proj) are
called by the layers themselves when BACKEND is "triton"; the torch backend runs the pieces above.
"""

import os

import torch

BACKEND = os.environ.get("ZEBRA_KERNELS") or ("triton" if torch.cuda.is_available() else "torch")
if BACKEND not in ("torch", "triton"):
    raise ValueError(f"ZEBRA_KERNELS must be 'torch' or 'triton', got {BACKEND!r}")

if BACKEND == "triton":
    from zebra.kernels.conv1d import causal_conv1d, causal_conv1d_step
    from zebra.kernels.ssd import ssd_scan
    from zebra.kernels.ssd_decode import ssd_step
else:
    from zebra.kernels.reference import causal_conv1d, causal_conv1d_step, ssd_scan, ssd_step

__all__ = ["BACKEND", "ssd_scan", "ssd_step", "causal_conv1d", "causal_conv1d_step"]
