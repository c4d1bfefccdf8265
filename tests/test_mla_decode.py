"""Triton MLA decode kernel (zebra/kernels/mla_decode.py) vs its torch reference and vs the MLA layer.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py). Ground truth is
mla_decode_reference in fp64, itself checked against MLAttention.attend_absorbed (the MLA
engineer's decode math) under zebra.llama.Cache's mask. The ahead-of-time builds for ROCm gfx942
and CUDA sm_90 are in tests/test_kernels_compile.py with every other kernel.
"""

import pytest
import torch

from zebra.kernels.mla_decode import mla_decode, mla_decode_reference
from zebra.llama import Cache
from zebra.mla import MLAConfig, MLAttention


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def inputs(b, H, r, d_rope, T, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r_ = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return r_(b, H, r), r_(b, H, d_rope), r_(b, T, r), r_(b, T, d_rope)


# (b, H, r, d_rope, T, length, splits, left_pad): heads and ranks that are not powers of two,
# two head blocks (H > 64), one and several splits (a split covers whole 64-key tiles), a
# single key, ragged left pads, a pad-only query row (left_pad >= length: attends its own slot),
# and cache slots past `length` that hold garbage the kernel must not read.
CASES = [
    (2, 4, 32, 16, 1, 1, 1, [0, 0]),
    (3, 5, 24, 8, 150, 150, 3, [0, 17, 149]),
    (2, 72, 16, 8, 70, 70, 1, [0, 5]),
    (2, 8, 48, 16, 260, 200, 4, [3, 200]),
    (1, 16, 64, 32, 300, 300, 2, [40]),
]


@pytest.mark.parametrize("b,H,r,d_rope,T,length,splits,pads", CASES)
def test_kernel_matches_reference(b, H, r, d_rope, T, length, splits, pads):
    q_lat, q_rope, c_kv, k_rope = inputs(b, H, r, d_rope, T, seed=T + H)
    c_kv[:, length:], k_rope[:, length:] = float("nan"), float("nan")
    left_pad = torch.tensor(pads)
    out = mla_decode(q_lat, q_rope, c_kv, k_rope, left_pad, length, 0.3, num_splits=splits)
    want = mla_decode_reference(q_lat.double(), q_rope.double(), c_kv.double(), k_rope.double(),
                                left_pad, length, 0.3)
    assert out.shape == (b, H, r) and out.dtype == torch.float32
    assert rel_err(out, want) <= 1e-5


def test_kernel_reads_the_length_from_the_device():
    """A decode step passes length as a (1,) tensor (a CUDA graph replays one launch at every
    length): the same result as the int, and the grid is sized by T, not by the length."""
    b, H, r, d_rope, T, length, splits, pads = CASES[3]
    q_lat, q_rope, c_kv, k_rope = inputs(b, H, r, d_rope, T, seed=5)
    c_kv[:, length:], k_rope[:, length:] = float("nan"), float("nan")
    left_pad = torch.tensor(pads)
    for n in (length, length - 77):
        got = mla_decode(q_lat, q_rope, c_kv, k_rope, left_pad, torch.tensor([n]), 0.3, num_splits=splits)
        want = mla_decode_reference(q_lat.double(), q_rope.double(), c_kv.double(), k_rope.double(),
                                    left_pad, n, 0.3)
        assert rel_err(got, want) <= 1e-5, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision(dtype):
    q_lat, q_rope, c_kv, k_rope = inputs(2, 8, 32, 16, 190, seed=7, dtype=dtype)
    left_pad = torch.tensor([0, 33])
    out = mla_decode(q_lat, q_rope, c_kv, k_rope, left_pad, 190, 0.2, num_splits=3)
    want = mla_decode_reference(q_lat.double(), q_rope.double(), c_kv.double(), k_rope.double(),
                                left_pad, 190, 0.2)
    assert out.dtype == dtype
    assert rel_err(out, want) <= 1e-2


def test_reference_is_the_mla_layers_absorbed_decode():
    """W_uk into the query, the reference, W_uv after: MLAttention.attend_absorbed under the
    mask of a left-padded Cache (every row, every head, GQA up-projection)."""
    cfg = MLAConfig(hidden_size=32, n_heads=6, n_kv_heads=2, q_rank=0, kv_rank=12, d_nope=8,
                    d_rope=4, v_head_dim=10)
    torch.manual_seed(0)
    mla = MLAttention(cfg).double()
    b, T = 3, 9
    cache = Cache([], left_pad=torch.tensor([0, 4, 8]), length=T - 1)
    mask = cache.attention_mask(1)  # (b 1 1 T): the new token at slot T - 1
    q_nope, q_rope = torch.randn(b, 6, 1, 8).double(), torch.randn(b, 6, 1, 4).double()
    c_kv, k_rope = torch.randn(b, T, 12).double(), torch.randn(b, T, 4).double()
    want = mla.attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask)[:, :, 0]  # (b H d_v)

    w = mla.kv_b_proj.weight.view(2, 8 + 10, 12).repeat_interleave(3, dim=0)  # (H, d_nope + d_v, r)
    q_latent = torch.einsum("bhd,hdr->bhr", q_nope[:, :, 0], w[:, :8])
    context = mla_decode_reference(q_latent, q_rope[:, :, 0], c_kv, k_rope, cache.left_pad, T, mla.scale)
    got = torch.einsum("bhr,hvr->bhv", context, w[:, 8:])
    assert rel_err(got, want) <= 1e-6  # attend_absorbed takes its softmax in fp32


def test_mla_layer_decodes_through_the_kernel(monkeypatch):
    """MLAttention's one-token decode steps with BACKEND "triton" == the torch absorbed path, on a
    left-padded cache after a prefill, buffer longer than the tokens (the wiring: first keys
    read off Cache.context's mask, the length from its device slot)."""
    from zebra import kernels

    cfg = MLAConfig(hidden_size=32, n_heads=4, n_kv_heads=2, q_rank=0, kv_rank=16, d_nope=8,
                    d_rope=8, v_head_dim=8)
    torch.manual_seed(1)
    mla = MLAttention(cfg)
    x = torch.randn(2, 6, 32)
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(kernels, "BACKEND", backend)
        cache = Cache([mla.new_cache(2, 9, torch.float32, "cpu")], left_pad=torch.tensor([0, 3]), max_len=9)
        steps = []
        for chunk in (x[:, :4], x[:, 4:5], x[:, 5:]):  # prefill (materialised), then one token at a time
            ctx = cache.context(chunk.shape[1])
            steps.append(mla(chunk, ctx["positions"], cache.layers[0], ctx["start"], ctx["mask"]))
            cache.advance(chunk.shape[1])
        outs[backend] = torch.cat(steps[1:], 1)
    assert rel_err(outs["triton"], outs["torch"]) <= 1e-5


def test_kernel_rejects_bad_inputs():
    q_lat, q_rope, c_kv, k_rope = inputs(2, 4, 16, 8, 10, seed=0)
    with pytest.raises(ValueError, match="c_kv"):
        mla_decode(q_lat, q_rope, c_kv[:, :, :8], k_rope, torch.zeros(2, dtype=torch.long), 10, 1.0)
    with pytest.raises(ValueError, match="length"):
        mla_decode(q_lat, q_rope, c_kv, k_rope, torch.zeros(2, dtype=torch.long), 11, 1.0)
