"""zebra/kernels/_triton.py, the helpers every Triton kernel shares, against torch indexing.

load_chunk / store_chunk address one head of a block of rows of a (rows g D) tensor whose rows
may be strided (a split view of a wider projection, as the SSD kernels receive x, B, C, z); a
copy kernel built on them must equal the torch slice, with the row tail and the channels past D
masked. Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py)."""

import pytest
import torch
import triton
import triton.language as tl

from zebra.kernels._triton import block, load_chunk, rows, store_chunk, tuning_configs, warps_stages


@triton.jit
def _copy_head_kernel(src_ptr, dst_ptr, n_rows, src_stride, dst_stride, head, D,
                      Q: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    row0 = (c * Q).to(tl.int64)
    mask_q = c * Q + tl.arange(0, Q) < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    value = load_chunk(src_ptr, row0, src_stride, head, D, offs_d, mask_q)
    store_chunk(dst_ptr, row0, dst_stride, 0, D, offs_d, mask_q, value)


@pytest.mark.parametrize("n_rows, g, D, head", [(37, 3, 24, 2), (16, 1, 32, 0), (5, 4, 8, 1)])
def test_load_store_chunk_copy_one_head_of_a_strided_view(n_rows, g, D, head):
    Q, pad = 16, 7  # chunks of 16 rows (the last one partial when n_rows % 16); rows 7 wider
    wide = torch.randn(n_rows, g * D + pad)
    src = wide[:, pad:].unflatten(-1, (g, D))  # row stride g * D + pad, as a slice of in_proj
    dst = torch.full((n_rows, D + 5), -1.0)  # 5 spare columns that store_chunk must not touch
    _copy_head_kernel[(triton.cdiv(n_rows, Q),)](src, dst, n_rows, wide.stride(0), dst.stride(0), head, D,
                                                 Q=Q, BLOCK_D=block(D))
    assert torch.equal(dst[:, :D], src[:, head])
    assert torch.equal(dst[:, D:], torch.full((n_rows, 5), -1.0))


def test_rows_keeps_a_split_view_and_copies_otherwise():
    wide = torch.randn(2, 5, 3 * 8 + 4)
    view = wide[..., 4:].unflatten(-1, (3, 8))  # (b l g d): unit stride over (g d), rows of 28
    t, stride = rows(view)
    assert t.data_ptr() == view.data_ptr() and stride == 28
    swapped = view.transpose(2, 3)  # (g d) no longer contiguous: copied
    t, stride = rows(swapped)
    assert t.is_contiguous() and torch.equal(t, swapped) and stride == 3 * 8


def test_block_is_the_power_of_two_cover_at_least_16():
    assert [block(v) for v in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]


def test_tuning_configs_keep_only_the_first_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert len(warps_stages([(4, 2), (8, 3)])) == 1 and tuning_configs(["a", "b"]) == ["a"]
    monkeypatch.delenv("TRITON_INTERPRET")
    configs = warps_stages([(4, 2), (8, 3)])
    assert [(c.num_warps, c.num_stages) for c in configs] == [(4, 2), (8, 3)]
