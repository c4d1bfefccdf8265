"""MLA layer and its SVD init from a Llama attention layer (issue 4).

References: our Llama attention (itself checked against transformers in test_llama.py), an
independent re-implementation of the official MLA forward written from OFFICIAL.md (DeepSeek's
complex-number RoPE on adjacent pairs), SVD facts (torch.linalg.svdvals), and the MLA's own
materialised full forward for the decoding paths."""

import pytest
import torch

from zebra.config import LlamaConfig
from zebra.init import energy_rank, mla_from_llama
from zebra.llama import Cache, LlamaAttention, apply_rope, rope_cos_sin, rope_frequencies
from zebra.mla import MLAConfig, MLAttention

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def llama_config(heads=4, kv_heads=2, head_dim=16, hidden=48, rope_scaling=None):
    return LlamaConfig(vocab_size=11, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       rope_theta=500.0, rope_scaling=rope_scaling)


def teacher(cfg: LlamaConfig, seed=0):
    torch.manual_seed(seed)
    return LlamaAttention(cfg).eval()


def teacher_out(attn, cfg, x):
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    cos, sin = rope_cos_sin(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), pos)
    return attn(x, cos, sin)


def mla_out(mla, x):
    return mla(x, torch.arange(x.shape[1]).expand(x.shape[0], -1))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------
# Init


@pytest.mark.parametrize("q_rank", [0, 48], ids=["q-full-proj", "q-svd-full-rank"])
@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["rope-default", "rope-llama3"])
def test_preserve_mqa_full_rank_reproduces_teacher(q_rank, rope):
    cfg = llama_config(kv_heads=1, rope_scaling=rope)
    attn = teacher(cfg)
    # kv stack of an MQA teacher with all pairs kept = [no nope rows; W_v (16 rows)]: full rank 16
    mla = mla_from_llama(attn, cfg, q_rank=q_rank, kv_rank=16, d_rope=16, mode="preserve")
    x = torch.randn(2, 19, 48)
    with torch.no_grad():
        diff = (mla_out(mla, x) - teacher_out(attn, cfg, x)).abs().max().item()
    assert diff <= 1e-5, diff


def test_preserve_gqa_shared_rope_key_is_exact_when_keys_are_complex_multiples():
    # Group 1's key pairs = group 0's rotated and scaled pair by pair (a complex multiple): one
    # shared rope key then suffices once each group's factor is folded into its queries.
    cfg = llama_config(heads=4, kv_heads=2)
    attn = teacher(cfg)
    d = 16
    with torch.no_grad():
        w = attn.k_proj.weight.view(2, d, -1)
        z0 = torch.complex(w[0, : d // 2], w[0, d // 2:])
        z1 = torch.polar(torch.rand(d // 2) + 0.5, torch.rand(d // 2) * 6.28)[:, None] * z0
        w[1] = torch.cat([z1.real, z1.imag])
    mla = mla_from_llama(attn, cfg, q_rank=0, kv_rank=32, d_rope=16, mode="preserve")  # [W_v] is 32 rows
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        diff = (mla_out(mla, x) - teacher_out(attn, cfg, x)).abs().max().item()
    assert diff <= 1e-5, diff


def test_preserve_calibrated_fits_are_exact_at_full_rank_and_best_on_the_inputs():
    cfg = llama_config(kv_heads=1)
    attn = teacher(cfg)
    mix = torch.randn(48, 48) * torch.logspace(0, -2, 48)  # strongly anisotropic inputs
    calib, x = torch.randn(400, 48) @ mix, torch.randn(2, 19, 48) @ mix
    with torch.no_grad():
        full = mla_from_llama(attn, cfg, q_rank=48, kv_rank=16, d_rope=16, mode="preserve", inputs=calib)
        assert (mla_out(full, x) - teacher_out(attn, cfg, x)).abs().max().item() <= 1e-5
        # rank 4 of W_v (16 x 48): the whitened fit beats plain truncation on the calibration inputs,
        # and its error is the closed-form tail of the spectrum of W_v L, X^T X / n = L L^T
        w_v = attn.v_proj.weight
        errs = []
        for inputs in (calib, None):
            mla = mla_from_llama(attn, cfg, q_rank=48, kv_rank=4, d_rope=16, mode="preserve", inputs=inputs)
            recon = mla.kv_b_proj.weight @ mla.kv_a_proj_with_mqa.weight[:4]
            errs.append(((recon - w_v) @ calib.T).pow(2).sum().item() / len(calib))
        L = torch.linalg.cholesky(calib.T @ calib / len(calib))
        tail = torch.linalg.svdvals(w_v @ L)[4:].pow(2).sum().item()
    assert errs[0] < 0.5 * errs[1], errs
    assert abs(errs[0] - tail) <= 1e-2 * tail, (errs[0], tail)


def rope_interleaved(x, pos, theta):
    """DeepSeek/official RoPE: adjacent dims (2j, 2j+1) rotate as one complex number by pos * theta^(-2j/n)."""
    n = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, n, 2).double() / n)
    rot = torch.polar(torch.ones(len(pos), n // 2, dtype=torch.float64), pos[:, None].double() * freqs)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], n // 2, 2).contiguous())
    return torch.view_as_real(z * rot).flatten(-2).float()


def official_attention(attn, cfg, x, d_rope):
    """The official MLA at full rank, written from OFFICIAL.md section 2 without our MLA code."""
    H, Hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    d_nope, (b, l, _) = d - d_rope, x.shape
    q = attn.q_proj(x).view(b, l, H, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, l, Hk, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, l, Hk, d).transpose(1, 2)
    w_k = attn.k_proj.weight.view(Hk, d, -1)
    k_pe = x @ w_k.mean(0)[d_nope:].T  # shared key: head mean of the last d_rope rows
    pos = torch.arange(l)
    q_pe, k_pe = rope_interleaved(q[..., d_nope:], pos, cfg.rope_theta), rope_interleaved(k_pe, pos, cfg.rope_theta)
    group = H // Hk
    k_nope, v = k[..., :d_nope].repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q[..., :d_nope] @ k_nope.transpose(-1, -2) + q_pe @ k_pe[:, None].transpose(-1, -2)) / d ** 0.5
    scores = scores.masked_fill(torch.ones(l, l, dtype=torch.bool).triu(1), float("-inf"))
    o = scores.softmax(-1) @ v
    return attn.o_proj(o.transpose(1, 2).reshape(b, l, H * d))


@pytest.mark.parametrize("d_rope", [8, 16])
def test_official_full_rank_equals_official_formula(d_rope):
    cfg = llama_config(heads=4, kv_heads=2)
    attn = teacher(cfg)
    mla = mla_from_llama(attn, cfg, q_rank=48, kv_rank=48, d_rope=d_rope, mode="official")
    x = torch.randn(2, 13, 48)
    with torch.no_grad():
        diff = (mla_out(mla, x) - official_attention(attn, cfg, x, d_rope)).abs().max().item()
        teacher_gap = rel_err(mla_out(mla, x), teacher_out(attn, cfg, x))
    assert diff <= 1e-5, diff
    assert teacher_gap > 1e-2  # not function-preserving, by design of the original


def test_official_svd_factors_reconstruct_kv_with_singular_values_on_down():
    cfg = llama_config(heads=4, kv_heads=2, hidden=80)  # [W_k; W_v] is 64 x 80: full rank 64
    attn = teacher(cfg)
    d, d_rope, d_nope, Hk = 16, 8, 8, 2
    mla = mla_from_llama(attn, cfg, q_rank=64, kv_rank=64, d_rope=d_rope, mode="official")
    w_k, w_v = attn.k_proj.weight.detach(), attn.v_proj.weight.detach()
    down = mla.kv_a_proj_with_mqa.weight.detach()[:64]
    up = mla.kv_b_proj.weight.detach().view(Hk, d_nope + d, 64)
    # up @ down gives back, per kv head, the first d_nope rows of W_k and all rows of W_v
    recon = (up @ down)
    assert torch.allclose(recon[:, :d_nope], w_k.view(Hk, d, -1)[:, :d_nope], atol=1e-5)
    assert torch.allclose(recon[:, d_nope:], w_v.view(Hk, d, -1), atol=1e-5)
    # singular values sit on the down projections: their row norms are the spectrum
    assert torch.allclose(down.norm(dim=1), torch.linalg.svdvals(torch.cat([w_k, w_v])), rtol=1e-5, atol=1e-6)
    q_down = mla.q_a_proj.weight.detach()
    assert torch.allclose(q_down.norm(dim=1), torch.linalg.svdvals(attn.q_proj.weight.detach()), rtol=1e-5)
    q_up = mla.q_b_proj.weight.detach()  # a row permutation of U: orthonormal columns
    assert torch.allclose(q_up.T @ q_up, torch.eye(64), atol=1e-5)


def test_official_rope_key_pairs_and_frequencies():
    cfg = llama_config(heads=4, kv_heads=2)
    attn = teacher(cfg)
    d, d_rope = 16, 8
    mla = mla_from_llama(attn, cfg, q_rank=24, kv_rank=16, d_rope=d_rope, mode="official")
    head_mean = attn.k_proj.weight.detach().view(2, d, -1).mean(0)[d - d_rope:]  # last d_rope rows, mean of heads
    rope_rows = mla.kv_a_proj_with_mqa.weight.detach()[16:]
    # adjacent teacher dims (2j, 2j+1) become the MLA's rotate-half pair (j, j + d_rope/2)
    assert torch.allclose(rope_rows[: d_rope // 2], head_mean[0::2], atol=1e-6)
    assert torch.allclose(rope_rows[d_rope // 2:], head_mean[1::2], atol=1e-6)
    expected = torch.tensor([500.0 ** (-2 * j / d_rope) for j in range(d_rope // 2)])
    assert torch.allclose(mla.inv_freq, expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["official", "preserve"])
def test_gqa_error_falls_with_rank(mode):
    cfg = llama_config(heads=4, kv_heads=2)
    attn = teacher(cfg)
    x = torch.randn(2, 24, 48)
    d, d_nope, Hk = 16, 8, 2
    k_nope_rows = attn.k_proj.weight.detach().view(Hk, d, -1)[:, :d_nope] if mode == "official" else None
    ranks = [4, 8, 16, 32, 48]  # 48 = full (the kv stack is at most 48 columns wide)
    weight_err, out_err, teacher_err = [], [], []
    with torch.no_grad():
        full = mla_out(mla_from_llama(attn, cfg, q_rank=48, kv_rank=48, d_rope=8, mode=mode), x)
        ref = teacher_out(attn, cfg, x)
        for r in ranks:
            mla = mla_from_llama(attn, cfg, q_rank=48, kv_rank=r, d_rope=8, mode=mode)
            up = mla.kv_b_proj.weight.view(Hk, d_nope + d, r)
            recon = up @ mla.kv_a_proj_with_mqa.weight[:r]
            target_v = attn.v_proj.weight.view(Hk, d, -1)
            err = (recon[:, d_nope:] - target_v).norm() ** 2
            if k_nope_rows is not None:
                err = err + (recon[:, :d_nope] - k_nope_rows).norm() ** 2
            weight_err.append(err.sqrt().item())
            out = mla_out(mla, x)
            out_err.append(rel_err(out, full))
            teacher_err.append(rel_err(out, ref))
    for errs in (weight_err, out_err, teacher_err):
        assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert weight_err[-1] <= 1e-4 and out_err[-1] <= 1e-5


def test_energy_rank_closed_form():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0] + [0.0] * 12)  # sigma^2 shares 16, 9, 4, 1 of 30
    assert energy_rank(s, 0.5, multiple=1) == 1  # 16/30 >= 0.5
    assert energy_rank(s, 0.9, multiple=1) == 3  # 29/30
    assert energy_rank(s, 0.9) == 8  # rounded up to a multiple of 8
    assert energy_rank(s[:4], 0.99) == 4  # capped at full rank


# ---------------------------------------------------------------------------------------
# Decoding with the latent cache


def random_mla(q_rank=12, latent_norm=False, n_kv_heads=2, seed=0):
    torch.manual_seed(seed)
    cfg = MLAConfig(hidden_size=32, n_heads=4, n_kv_heads=n_kv_heads, q_rank=q_rank, kv_rank=10, d_nope=6, d_rope=4,
                    v_head_dim=5, rope_theta=100.0, latent_norm=latent_norm)
    mla = MLAttention(cfg).eval()
    with torch.no_grad():
        for name, p in mla.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return mla


@pytest.mark.parametrize("q_rank,latent_norm,n_kv_heads", [(12, False, 2), (0, True, 1), (12, True, 4)],
                         ids=["lowrank-q-gqa", "full-q-norm-mqa", "norm-mha"])
def test_absorbed_decode_equals_materialised(q_rank, latent_norm, n_kv_heads):
    mla = random_mla(q_rank, latent_norm, n_kv_heads)
    x = torch.randn(2, 15, 32)
    with torch.no_grad():
        full = mla_out(mla, x)  # no cache: materialised k, v and SDPA
        cache = Cache([mla.new_cache(2, 16, torch.float32, "cpu")], torch.zeros(2, dtype=torch.long), max_len=16)
        steps = []
        for t in range(15):  # one token at a time: the absorbed path from the first token
            ctx = cache.context(1)
            steps.append(mla(x[:, t:t + 1], ctx["positions"], cache.layers[0], ctx["start"], ctx["mask"]))
            cache.advance(1)
    diff = (torch.cat(steps, 1) - full).abs().max().item()
    assert diff <= 1e-5, diff


def test_incremental_decode_left_padded_equals_full_forward():
    mla = random_mla()
    left_pad = torch.tensor([0, 3, 6])
    x = torch.randn(3, 14, 32)
    with torch.no_grad():
        cache = Cache([mla.new_cache(3, 16, torch.float32, "cpu")], left_pad, max_len=16)
        chunks = []
        for n in [8, 1, 1, 1, 1, 2]:  # prefill (materialised, fills the cache), decode steps, one 2-token chunk
            s, ctx = cache.length, cache.context(n)
            chunks.append(mla(x[:, s:s + n], ctx["positions"], cache.layers[0], ctx["start"], ctx["mask"]))
            cache.advance(n)
        out = torch.cat(chunks, 1)
        for row, pad in enumerate(left_pad.tolist()):  # each row alone, no padding, no cache
            ref = mla_out(mla, x[row:row + 1, pad:])
            diff = (out[row, pad:] - ref[0]).abs().max().item()
            assert diff <= 1e-5, (row, diff)


def test_smollm2_cache_is_96_values_per_token_per_layer():
    # SmolLM2-135M attention: D 576, 9 heads, 3 kv heads, head_dim 64; MLA (r_kv, d_rope) = (64, 32)
    cfg = llama_config(heads=9, kv_heads=3, head_dim=64, hidden=576)
    mla = mla_from_llama(teacher(cfg), cfg, q_rank=400, kv_rank=64, d_rope=32, mode="official")
    T = 10
    cache = mla.new_cache(1, T, torch.bfloat16, "cpu")
    values = sum(buf.numel() for buf in (cache.c_kv, cache.k_rope)) // T
    assert values == 96 == mla.cfg.kv_values_per_token()
    assert sum(b.numel() * b.element_size() for b in (cache.c_kv, cache.k_rope)) // T == mla.cfg.kv_bytes_per_token(2)
    assert values * 4 == 2 * 3 * 64  # 25% of the teacher's 2 * Hk * d per layer
