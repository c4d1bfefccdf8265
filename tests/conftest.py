import os

import torch

# Kernels (tests/test_kernels_*.py): without a GPU, run the Triton kernels in Triton's CPU
# interpreter. It must be switched on before triton.jit decorates any kernel, i.e. before any
# test module imports zebra.kernels.ssd / conv1d / ssd_step; conftest.py is imported first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
