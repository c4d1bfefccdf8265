"""The Mamba2 block and its init from attention.

- exactness: with the test switch (A = 0, dt = 1, D = 0, no conv/SiLU/gate/norm) the block
  initialised from a GQA teacher's attention computes causal linear attention of the teacher's
  q, k, v, written out independently below;
- the block == an independent plain-torch version of OFFICIAL.md section 3 (fp64);
- decoding: prefill + token-by-token steps == one full forward (outputs and states), on both
  kernel backends (the Triton one decodes through the fused step kernel);
- left padding: a padded row of a batch == the row alone, with and without a cache;
- shapes and parameter counts for SmolLM2-135M == OFFICIAL.md section 3; inits in their ranges.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from zebra import kernels
from zebra.config import LlamaConfig
from zebra.init import mamba2_from_llama
from zebra.llama import LlamaAttention
from zebra.mamba2 import Mamba2Config


def tiny_teacher(H=4, Hk=2, d=8, D=24, seed=0, dtype=torch.float32):
    cfg = LlamaConfig(vocab_size=64, hidden_size=D, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=H, num_key_value_heads=Hk, head_dim=d)
    torch.manual_seed(seed)
    return LlamaAttention(cfg).to(dtype), cfg


def smollm2_config():
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64)


def tiny_block(seed=0, chunk_size=16):
    """A block with every parameter at its default init and a short chunk (lengths cross chunks)."""
    attn, cfg = tiny_teacher(seed=seed)
    block = mamba2_from_llama(attn, cfg, torch.Generator().manual_seed(seed))
    block.cfg.chunk_size = chunk_size
    return block


def causal_linear_attention(attn: LlamaAttention, u):
    """Teacher q, k, v (no RoPE), y_t = sum_{s<=t} (q_t . k_s) v_s per head, then W_o."""
    H, Hk, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    b, l, _ = u.shape
    q = (u @ attn.q_proj.weight.T).view(b, l, H, d)
    k = (u @ attn.k_proj.weight.T).view(b, l, Hk, d).repeat_interleave(H // Hk, dim=2)
    v = (u @ attn.v_proj.weight.T).view(b, l, Hk, d).repeat_interleave(H // Hk, dim=2)
    scores = torch.einsum("bthd, bshd -> bhts", q, k).tril()  # s <= t
    y = torch.einsum("bhts, bshd -> bthd", scores, v)
    return y.reshape(b, l, H * d) @ attn.o_proj.weight.T


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("H,Hk", [(4, 2), (6, 1), (3, 3)])
def test_init_is_causal_linear_attention(dtype, tol, H, Hk):
    attn, cfg = tiny_teacher(H=H, Hk=Hk, dtype=dtype)
    block = mamba2_from_llama(attn, cfg, torch.Generator().manual_seed(1))
    block.linear_attention_test = True
    block.cfg.chunk_size = 16  # l = 37 crosses two chunk boundaries
    u = torch.randn(2, 37, cfg.hidden_size, dtype=dtype)
    with torch.no_grad():
        want = causal_linear_attention(attn, u)
        got = block(u)
        # the cached path under the switch too: prefill 20, then one token at a time
        cache = block.new_cache(2)
        got_cached = torch.cat([block(u[:, :20], cache)] + [block(u[:, t:t + 1], cache) for t in range(20, 37)], 1)
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=tol)
    torch.testing.assert_close(got_cached / scale, want / scale, rtol=0, atol=tol)


def test_switch_off_is_not_linear_attention():
    """Without the switch the same block is a different function (the switch is what makes it exact)."""
    attn, cfg = tiny_teacher()
    block = mamba2_from_llama(attn, cfg, torch.Generator().manual_seed(1))
    u = torch.randn(1, 9, cfg.hidden_size)
    with torch.no_grad():
        assert (block(u) - causal_linear_attention(attn, u)).abs().max() > 1e-2


def mamba2_by_hand(block, u):
    """The block as OFFICIAL.md section 3 describes it, in plain torch: conv + SiLU over the
    kv-wide [x | B | C], x and B repeated to the H heads (HF repeat_kv order) AFTER the conv,
    the recurrence one token at a time, y + D x, per-head RMSNorm of y * silu(z), out_proj.
    Returns the output and the final state (b H P N)."""
    c = block.cfg
    H, Hk, P = c.n_heads, c.n_kv_heads, c.head_dim
    b, l, _ = u.shape
    z, x, B, C, dt = (u @ block.in_proj.weight.T).split([H * P, Hk * P, Hk * P, H * P, H], dim=-1)
    xBC = F.conv1d(torch.cat([x, B, C], -1).transpose(1, 2), block.conv1d.weight, block.conv1d.bias,
                   padding=c.d_conv - 1, groups=block.conv1d.weight.shape[0])[..., :l]
    x, B, C = F.silu(xBC).transpose(1, 2).split([Hk * P, Hk * P, H * P], dim=-1)
    x = x.reshape(b, l, Hk, P).repeat_interleave(H // Hk, dim=2)
    B = B.reshape(b, l, Hk, P).repeat_interleave(H // Hk, dim=2)
    C = C.reshape(b, l, H, P)
    dt = F.softplus(dt + block.dt_bias)
    A = -torch.exp(block.A_log)
    h, ys = torch.zeros(b, H, P, P, dtype=u.dtype), []
    for t in range(l):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1) + block.D[:, None] * x[:, t])
    y = torch.stack(ys, 1) * F.silu(z.reshape(b, l, H, P))
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)
    return (y.reshape(b, l, H * P) * block.norm.weight) @ block.out_proj.weight.T, h


@pytest.mark.parametrize("H,Hk", [(4, 2), (6, 1)])
def test_forward_matches_block_by_hand(H, Hk):
    attn, cfg = tiny_teacher(H=H, Hk=Hk, dtype=torch.float64)
    block = mamba2_from_llama(attn, cfg, torch.Generator().manual_seed(2))
    block.cfg.chunk_size = 16
    with torch.no_grad():
        block.D.normal_()  # D = 1 everywhere would hide a mix-up of heads
        block.norm.weight.normal_()
        u = torch.randn(2, 23, cfg.hidden_size, dtype=torch.float64)
        want, want_state = mamba2_by_hand(block, u)
        cache = block.new_cache(2)
        got = block(u, cache)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache.ssm_state, want_state, rtol=1e-10, atol=1e-12)


def use_backend(monkeypatch, backend):
    """Mamba2.step with `backend`'s decode path ("triton": the fused kernel, in Triton's
    interpreter on CPU; the other kernels stay the import-time backend's). Returns a list that
    counts the fused kernel's calls."""
    from zebra.kernels import mamba2_step as fused

    monkeypatch.setattr(kernels, "BACKEND", backend)
    calls, fused_step = [], fused.mamba2_step

    def counted(*args, **kwargs):
        calls.append(1)
        return fused_step(*args, **kwargs)

    monkeypatch.setattr(fused, "mamba2_step", counted)
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_equals_forward(backend, monkeypatch):
    calls = use_backend(monkeypatch, backend)
    block = tiny_block()
    b, l = 2, 21
    u = torch.randn(b, l, block.cfg.hidden_size)
    with torch.no_grad():
        want = block(u)
        full = block.new_cache(b)
        block(u, full)  # prefill of everything: the state after u
        cache = block.new_cache(b)
        outs = [block(u[:, :5], cache)]  # prefill
        outs.append(block(u[:, 5:12], cache))  # a second multi-token call continues the state
        outs += [block(u[:, t:t + 1], cache) for t in range(12, l)]  # steps
    assert len(calls) == (l - 12 if backend == "triton" else 0)
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.ssm_state, full.ssm_state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.conv_state, full.conv_state, rtol=1e-5, atol=1e-6)


def test_step_with_a_pad_row_same_on_both_backends(monkeypatch):
    """A pad in a decode step (no conv input, dt = 0): the fused Triton step == the torch step,
    outputs and caches, with the test switch falling back to the unfused path."""
    block = tiny_block()
    u = torch.randn(2, 6, block.cfg.hidden_size)
    pad_mask = torch.tensor([[True], [False]])
    for switch in (False, True):
        block.linear_attention_test = switch
        results = {}
        for backend in ("torch", "triton"):
            calls = use_backend(monkeypatch, backend)
            cache = block.new_cache(2)
            with torch.no_grad():
                block(u[:, :5], cache)
                results[backend] = (block(u[:, 5:], cache, pad_mask), cache.conv_state, cache.ssm_state)
        assert len(calls) == (0 if switch else 1)
        for got, want in zip(results["triton"], results["torch"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_conv_state_holds_last_inputs():
    """After a prefill the conv state is the last K conv inputs (zeros before the start)."""
    block = tiny_block()
    u = torch.randn(1, 2, block.cfg.hidden_size)
    cache = block.new_cache(1)
    with torch.no_grad():
        block(u, cache)
        xBC = (u @ block.in_proj.weight.T)[0, :, block.cfg.in_proj_sizes[0]:-block.cfg.n_heads]  # (l c)
    want = torch.cat([torch.zeros(2, xBC.shape[1]), xBC]).T  # K = 4 slots: two empty, then u
    torch.testing.assert_close(cache.conv_state[0], want)


def test_left_padding_equals_row_alone():
    block = tiny_block()
    D, lengths, extra = block.cfg.hidden_size, [19, 4, 1], 3
    L = max(lengths)
    rows = [torch.randn(1, n + extra, D) for n in lengths]  # prompt + tokens decoded afterwards
    garbage = torch.randn(len(lengths), L, D)  # pads are not zeros: the mask must do the work
    u = torch.stack([torch.cat([garbage[i, : L - n], r[0, :n]]) for i, (n, r) in enumerate(zip(lengths, rows))])
    pad_mask = torch.arange(L)[None] >= torch.tensor([L - n for n in lengths])[:, None]
    with torch.no_grad():
        out = block(u, pad_mask=pad_mask)
        cache = block.new_cache(len(lengths))
        out_cached = block(u, cache, pad_mask)
        steps = torch.cat([block(torch.cat([r[:, n + j:n + j + 1] for n, r in zip(lengths, rows)]), cache)
                           for j in range(extra)], 1)
        for i, (n, r) in enumerate(zip(lengths, rows)):
            alone_cache = block.new_cache(1)
            alone = block(r[:, :n], alone_cache)
            alone_steps = torch.cat([block(r[:, n + j:n + j + 1], alone_cache) for j in range(extra)], 1)
            torch.testing.assert_close(out[i, L - n:], alone[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out_cached[i, L - n:], alone[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(steps[i], alone_steps[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cache.ssm_state[i], alone_cache.ssm_state[0], rtol=1e-5, atol=1e-6)


def test_smollm2_shapes_and_params():
    """OFFICIAL.md section 3: in_proj 576 -> 1545, conv 960 channels, 9 x 64 x 64 states,
    ~1.23M parameters per layer vs ~0.88M for the attention it replaces."""
    teacher_cfg = smollm2_config()
    attn = LlamaAttention(teacher_cfg)
    block = mamba2_from_llama(attn, teacher_cfg, torch.Generator().manual_seed(0))
    assert block.in_proj.weight.shape == (1545, 576)
    assert block.conv1d.weight.shape == (960, 1, 4) and block.conv1d.bias.shape == (960,)
    assert block.out_proj.weight.shape == (576, 576)
    n_params = sum(p.numel() for p in block.parameters())
    assert n_params == 576 * 1545 + 960 * 4 + 960 + 3 * 9 + 576 + 576 * 576
    assert round(n_params / 1e6, 2) == 1.23
    assert round(sum(p.numel() for p in attn.parameters()) / 1e6, 2) == 0.88
    # rows [z 0:576 | x 576:768 | B 768:960 | C 960:1536 | dt 1536:1545]
    W = block.in_proj.weight
    assert torch.equal(W[576:768], attn.v_proj.weight)
    assert torch.equal(W[768:960], attn.k_proj.weight)
    assert torch.equal(W[960:1536], attn.q_proj.weight)
    assert torch.equal(block.out_proj.weight, attn.o_proj.weight)
    cache = block.new_cache(2)
    assert cache.conv_state.shape == (2, 960, 4) and cache.ssm_state.shape == (2, 9, 64, 64)
    assert cache.ssm_state.dtype == torch.float32
    per_row = sum(t[0].numel() * t.element_size() for t in (cache.conv_state, cache.ssm_state))
    assert block.cfg.state_bytes_per_sequence(dtype_bytes=4) == per_row == 960 * 4 * 4 + 9 * 64 * 64 * 4
    with torch.no_grad():
        assert block(torch.randn(2, 3, 576)).shape == (2, 3, 576)


def test_init_ranges_and_seeding():
    teacher_cfg = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=256, num_key_value_heads=64, head_dim=2)
    attn = LlamaAttention(teacher_cfg)
    block = mamba2_from_llama(attn, teacher_cfg, torch.Generator().manual_seed(0))
    dt = F.softplus(block.dt_bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform: log dt spread over [log 1e-3, log 0.1], mean near the middle
    log_dt = dt.log()
    assert abs(log_dt.mean().item() - math.log(1e-2)) < 0.4
    assert log_dt.min() < math.log(2e-3) and log_dt.max() > math.log(5e-2)
    A = -torch.exp(block.A_log.detach())
    assert A.min() >= -16 and A.max() <= -1 and A.min() < -12 and A.max() > -4
    assert torch.equal(block.D.detach(), torch.ones(256))
    assert torch.equal(block.norm.weight.detach(), torch.ones(256 * 2))
    # PyTorch's default: U(+-1/sqrt(fan_in)); fan_in = D for in_proj rows, K = 4 for the depthwise conv
    z_rows, dt_rows = block.in_proj.weight[:512], block.in_proj.weight[-256:]
    for w, bound in ((z_rows, 96**-0.5), (dt_rows, 96**-0.5), (block.conv1d.weight, 0.5), (block.conv1d.bias, 0.5)):
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    # seeded: the same generator seed gives the same block, another seed another block
    again = mamba2_from_llama(attn, teacher_cfg, torch.Generator().manual_seed(0))
    other = mamba2_from_llama(attn, teacher_cfg, torch.Generator().manual_seed(1))
    for (name, p), q, r in zip(block.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(p, q), name
        if name in ("dt_bias", "A_log", "conv1d.weight", "conv1d.bias"):
            assert not torch.equal(p, r), name


def test_gradients_reach_every_parameter():
    block = tiny_block()
    block(torch.randn(2, 10, block.cfg.hidden_size)).square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_config_errors():
    with pytest.raises(ValueError, match="n_heads"):
        Mamba2Config(hidden_size=8, n_heads=3, n_kv_heads=2, head_dim=4)
    attn, cfg = tiny_teacher()
    cfg.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias"):
        mamba2_from_llama(attn, cfg, torch.Generator().manual_seed(0))
    block = tiny_block()
    with pytest.raises(ValueError, match="pad_mask"):
        block(torch.randn(2, 5, block.cfg.hidden_size), pad_mask=torch.ones(2, 4, dtype=torch.bool))
