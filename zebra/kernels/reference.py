"""Plain-torch SSD (Mamba2), causal depthwise conv1d and their one-token steps: the spec.

Every Triton kernel in this package is tested against these functions. Anchors: mamba_ssm's
`modules/ssd_minimal.py` (the four numbered einsum steps, `segsum`) and mamba2-minimal's `step`.

SSD with scalar decay per head, p = head dim, n = state size (per batch b and head h):

    dt_t <- clamp(softplus?(dt_t + dt_bias), dt_limit)
    h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          h: (p n), x_t: (p), B_t: (n)
    y_t  = h_t C_t + D x_t;   y_t <- y_t * silu(z_t)     C_t: (n), D scalar

Heads share inputs in groups: x has hx heads, B gb groups, C gc groups, each dividing h; head
i reads x head i // (h // hx), B group i // (h // gb), C group i // (h // gc). (The Zebra
Mamba2 block has x and B with n_kv heads and C with n_heads; Mamba2 itself has hx = h.)

Shapes: x (b l hx p), dt (b l h), A (h), B (b l gb n), C (b l gc n), D (h), z (b l h p),
initial_state / final_state (b h p n) fp32. y has x's dtype; all arithmetic is fp32 (fp64
when the inputs are fp64, so tests can use these functions as a high-precision ground truth).
"""

import torch
import torch.nn.functional as F
from einops import rearrange, repeat


def _f(t):
    """Compute dtype: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """dt (b l h) raw -> fp32 step sizes: add bias, softplus if asked, clamp to dt_limit."""
    dt = _f(dt)
    if dt_bias is not None:
        dt = dt + _f(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return dt


def _heads(t, h):
    """(b l g d) -> (b l h d) fp32: head i reads group i // (h // g)."""
    return repeat(_f(t), "b l g d -> b l (g r) d", r=h // t.shape[2])


def _check_groups(x, dt, B, C):
    h = dt.shape[-1]
    for name, t in (("x", x), ("B", B), ("C", C)):
        if h % t.shape[2] != 0:
            raise ValueError(f"{name} has {t.shape[2]} heads/groups, which must divide h={h}")
    return h


def _gate(y, x, D, z):
    """y (b l h p) fp32 -> y + D x, times silu(z)."""
    if D is not None:
        y = y + _f(D)[:, None] * x
    if z is not None:
        y = y * F.silu(_f(z))
    return y


def ssd_sequential(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), initial_state=None, return_final_state=False,
                   chunk_size=64):
    """The recurrence, one token at a time: the ground truth. Same signature as `ssd_scan`
    (chunk_size is accepted and unused)."""
    b, l, _, p = x.shape
    h = _check_groups(x, dt, B, C)
    n = B.shape[-1]
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b l h)
    xh, Bh, Ch = _heads(x, h), _heads(B, h), _heads(C, h)
    state = xh.new_zeros(b, h, p, n)
    if initial_state is not None:
        state = _f(initial_state).clone()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * _f(A))  # (b h)
        state = decay[:, :, None, None] * state + torch.einsum(
            "bh, bhp, bhn -> bhpn", dt[:, t], xh[:, t], Bh[:, t])
        ys.append(torch.einsum("bhpn, bhn -> bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if l > 0 else xh.new_zeros(b, 0, h, p)
    y = _gate(y, xh, D, z).to(x.dtype)
    return (y, state) if return_final_state else y


def segsum(a):
    """a (... T) -> (... T T) with out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the
    diagonal (the stable form of ssd_minimal's segsum: no difference of two cumsums)."""
    T = a.shape[-1]
    a = repeat(a, "... d -> ... d e", e=T)
    a = a.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), -1), 0)
    a_segsum = torch.cumsum(a, dim=-2)
    return a_segsum.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device)),
                                -torch.inf)


def ssd_chunked(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                dt_limit=(0.0, float("inf")), initial_state=None, return_final_state=False,
                chunk_size=64):
    """The chunked (block-decomposed) SSD of ssd_minimal, in four numbered steps. Any length:
    the tail is padded with dt = 0 (decay 1, no input), which leaves the state unchanged."""
    b, l, _, p = x.shape
    h = _check_groups(x, dt, B, C)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b l h)
    xh, Bh, Ch = _heads(x, h), _heads(B, h), _heads(C, h)
    pad = (-l) % chunk_size
    X, Bc, Cc = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xh * dt[..., None], Bh, Ch))
    X, Bc, Cc = (rearrange(t, "b (c q) h d -> b c q h d", q=chunk_size) for t in (X, Bc, Cc))
    a = rearrange(F.pad(dt, (0, 0, 0, pad)) * _f(A), "b (c q) h -> b h c q", q=chunk_size)
    a_cumsum = torch.cumsum(a, dim=-1)  # (b h c q)

    # 1. Diagonal blocks: the quadratic (attention-like) output within each chunk.
    L = torch.exp(segsum(a))  # (b h c q q)
    Y_diag = torch.einsum("bclhn, bcshn, bhcls, bcshp -> bclhp", Cc, Bc, L, X)

    # 2. Chunk states: each chunk's input decayed to the chunk's end (initial state ignored).
    decay_states = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b h c q)
    states = torch.einsum("bclhn, bhcl, bclhp -> bchpn", Bc, decay_states, X)

    # 3. Inter-chunk recurrence: the state entering each chunk, and the final state.
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, :1])
    else:
        initial_state = _f(initial_state)[:, None]
    states = torch.cat([initial_state, states], dim=1)  # (b c+1 h p n)
    decay_chunk = torch.exp(segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # (b h c+1 c+1)
    new_states = torch.einsum("bhzc, bchpn -> bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. State -> output: each chunk's entering state read out by C, decayed within the chunk.
    Y_off = torch.einsum("bclhn, bchpn, bhcl -> bclhp", Cc, states, torch.exp(a_cumsum))

    y = rearrange(Y_diag + Y_off, "b c q h p -> b (c q) h p")[:, :l]
    y = _gate(y, xh, D, z).to(x.dtype)
    return (y, final_state) if return_final_state else y


ssd_scan = ssd_chunked


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf"))):
    """One token of the recurrence. state (b h p n) fp32, updated IN PLACE; x (b hx p),
    dt (b h), B (b gb n), C (b gc n), z (b h p). Returns y (b h p) in x's dtype."""
    y, new_state = ssd_sequential(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D,
        z=None if z is None else z[:, None], dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, initial_state=state, return_final_state=True)
    state.copy_(new_state)
    return y[:, 0]


def causal_conv1d(x, weight, bias=None, activation="silu"):
    """Depthwise causal conv over time. x (b l c) channel-last, weight (c k), bias (c);
    y_t = act(bias + sum_j weight[:, j] x_{t-k+1+j}) with zeros before t = 0. Returns (b l c)."""
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    k = weight.shape[1]
    y = F.conv1d(_f(rearrange(x, "b l c -> b c l")), _f(weight)[:, None, :],
                 None if bias is None else _f(bias), padding=k - 1, groups=x.shape[-1])
    y = rearrange(y[..., : x.shape[1]], "b c l -> b l c")
    return (F.silu(y) if activation == "silu" else y).to(x.dtype)


def causal_conv1d_step(x, conv_state, weight, bias=None, activation="silu"):
    """One token of `causal_conv1d`. x (b c); conv_state (b c k) holds the last k inputs
    (oldest first) and is updated IN PLACE (shift left, append x). Returns y (b c)."""
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], x[:, :, None].to(conv_state.dtype)], -1))
    y = torch.einsum("bck, ck -> bc", _f(conv_state), _f(weight))
    if bias is not None:
        y = y + _f(bias)
    return (F.silu(y) if activation == "silu" else y).to(x.dtype)
