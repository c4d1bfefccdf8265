"""Mamba2 (SSD) block shaped like the attention layer it replaces (Zebra-Llama / MambaInLlama).

Anchor: mamba2-minimal's `Mamba2` mixer (one class with `forward` and `step`, the in_proj order
stated once); OFFICIAL.md section 3 is the block this reproduces. Letters:
    D  hidden_size,  H  heads (= the teacher's query heads),  Hk  kv heads (the teacher's),
    P  head dim = N  state size = the teacher's head_dim,  K  conv width (4).

    [z | x | B | C | dt] = in_proj(u)              z (b l H P), x (b l Hk P), B (b l Hk N),
                                                   C (b l H N), dt (b l H)
    [x | B | C] <- silu(conv1d([x | B | C]))       causal depthwise, kernel K, with bias, run on
                                                   the Hk-wide x and B (before any sharing)
    dt <- softplus(dt + dt_bias),  A = -exp(A_log) (H,),  D (H,) one scalar per head
    per head i, reading x and B of kv head g = i // (H / Hk) (the kernel indexes them; the
    repeat is never materialised) and its own C:
        h_t = exp(dt_t A_i) h_{t-1} + dt_t x_t B_t^T       h: (P N), fp32
        y_t = h_t C_t + D_i x_t
    y <- w * RMSNorm(y * silu(z))                  normalised per head (groups of P), eps 1e-5
    out = out_proj(y)                              (b l D)

With A = 0, dt = 1, D = 0 and no conv, gate or norm this is causal linear attention,
y_t = sum_{s<=t} (C_t . B_s) x_s, which is why init.py reads C <- W_q, B <- W_k, x <- W_v,
out_proj <- W_o. `Mamba2.linear_attention_test` switches the block to exactly that (tests only).

Decoding: a `Mamba2Cache` holds conv_state (b, conv channels, K), the last K conv inputs, and
ssm_state (b H P N) fp32, a constant size per sequence. `forward` with a cache continues from it
(a new cache, all zeros, is the empty prefix) and leaves the new state in it; one token goes
through `step`, the recurrence written out with the one-token kernels (with the Triton backend,
everything between in_proj and out_proj is one fused kernel, zebra/kernels/mamba2_step.py).

Left-padded batches: `pad_mask` (b l) is True on real tokens. A pad gets no conv input and
dt = 0 (decay 1, no write), so both states stay zero until the row's first real token and a
padded row computes exactly what it computes alone.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zebra import kernels
from zebra.config import LlamaConfig
from zebra.kernels import causal_conv1d, causal_conv1d_step, ssd_scan, ssd_step


@dataclass
class Mamba2Config:
    hidden_size: int  # D
    n_heads: int  # H: SSD heads, and groups of C
    n_kv_heads: int  # Hk: heads of x and groups of B
    head_dim: int  # P = N (d_state)
    d_conv: int = 4  # K
    chunk_size: int = 64  # SSD chunk length (tiling only; a power of two >= 16 for the Triton kernels)
    rms_norm_eps: float = 1e-5  # of the gated norm (the reference's, not the teacher's)
    dt_min: float = 1e-3  # init: dt log-uniform in [dt_min, dt_max] ...
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # ... and at least this
    dt_limit: tuple[float, float] = (0.0, math.inf)  # clamp of dt after softplus; default: none

    def __post_init__(self):
        for name in ("hidden_size", "n_heads", "n_kv_heads", "head_dim", "d_conv", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Mamba2Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"Mamba2Config.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"Mamba2Config needs 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @classmethod
    def from_llama(cls, config: LlamaConfig) -> "Mamba2Config":
        """The sizes that mirror the teacher's attention layer."""
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim)

    @property
    def d_state(self) -> int:  # N
        return self.head_dim

    @property
    def in_proj_sizes(self) -> list[int]:
        """Widths of [z | x | B | C | dt] in in_proj's output."""
        H, Hk, P, N = self.n_heads, self.n_kv_heads, self.head_dim, self.d_state
        return [H * P, Hk * P, Hk * N, H * N, H]

    @property
    def conv_channels(self) -> int:
        """Width of [x | B | C], the conv's input."""
        return sum(self.in_proj_sizes[1:4])

    def state_bytes_per_sequence(self, dtype_bytes: int = 2) -> int:
        """Decoding state of one sequence: conv state in the model dtype, SSM state in fp32."""
        return self.conv_channels * self.d_conv * dtype_bytes + self.n_heads * self.head_dim * self.d_state * 4


class Mamba2Cache:
    """Decoding state of one Mamba2 layer, preallocated and updated in place (a plain object, as
    zebra.llama.KVCache says why)."""

    def __init__(self, batch: int, cfg: Mamba2Config, dtype, device):
        conv = torch.zeros(batch, cfg.conv_channels, cfg.d_conv, dtype=dtype, device=device)
        state_dtype = torch.promote_types(dtype, torch.float32)  # fp32 (fp64 for an fp64 model)
        ssm = torch.zeros(batch, cfg.n_heads, cfg.head_dim, cfg.d_state, dtype=state_dtype, device=device)
        self.conv_state = conv  # (b, conv channels, K) oldest first
        self.ssm_state = ssm  # (b H P N)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: the compute dtype of states and norms (fp64 stays fp64, for exactness tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class GatedRMSNorm(nn.Module):
    """w * RMSNorm(y * silu(z)) over each head's P channels (norm_before_gate=False), in fp32."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))

    def forward(self, y, z):
        """y, z (... H P) -> (... (H P))."""
        g = _fp32(y) * F.silu(_fp32(z))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (rearrange(g, "... h p -> ... (h p)") * _fp32(self.weight)).to(y.dtype)


def _uniform(shape, low: float, high: float, generator) -> torch.Tensor:
    """U(low, high) drawn on the CPU, so that one CPU generator seeds parameters on any device."""
    return torch.empty(shape).uniform_(low, high, generator=generator)


class Mamba2(nn.Module):
    """The block of the module docstring. Parameter names follow the official layer (in_proj,
    conv1d, dt_bias, A_log, D, norm, out_proj)."""

    linear_attention_test = False  # TEST SWITCH: A = 0, dt = 1, D = 0, conv+SiLU and gated norm skipped

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        H, P, K = cfg.n_heads, cfg.head_dim, cfg.d_conv
        # Order: (z, x, B, C, dt)
        self.in_proj = nn.Linear(cfg.hidden_size, sum(cfg.in_proj_sizes), bias=False)
        c = cfg.conv_channels
        self.conv1d = nn.Conv1d(c, c, K, groups=c, padding=K - 1, bias=True)  # weight (c 1 K); run by the kernels
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedRMSNorm(H, P, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(H * P, cfg.hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """The reference default init (mamba_ssm's Mamba2), drawn from `generator` (a CPU one):
        in_proj, out_proj and conv1d as PyTorch initialises them, U(+-1/sqrt(fan_in)) for weights
        and bias; dt = exp(U(log dt_min, log dt_max)) floored at dt_init_floor and
        dt_bias = softplus^-1(dt), so softplus(dt_bias) = dt; A_log = log U(1, 16); D = 1; norm w = 1."""
        cfg = self.cfg
        fan_ins = [(self.in_proj.weight, cfg.hidden_size), (self.out_proj.weight, cfg.n_heads * cfg.head_dim),
                   (self.conv1d.weight, cfg.d_conv), (self.conv1d.bias, cfg.d_conv)]  # depthwise: K taps
        for w, fan_in in fan_ins:
            w.copy_(_uniform(w.shape, -fan_in**-0.5, fan_in**-0.5, generator))
        log_dt = _uniform(cfg.n_heads, math.log(cfg.dt_min), math.log(cfg.dt_max), generator)
        dt = log_dt.exp().clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt) = dt + log(1 - exp(-dt))
        self.A_log.copy_(_uniform(cfg.n_heads, 1.0, 16.0, generator).log())
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def new_cache(self, batch: int, dtype=None, device=None) -> Mamba2Cache:
        w = self.in_proj.weight
        return Mamba2Cache(batch, self.cfg, dtype or w.dtype, device or w.device)

    # -- the pieces shared by forward and step ------------------------------------------

    def _project(self, u, pad_mask):
        """u (... D) -> z (... H P), xBC (... conv channels), dt (... H) after softplus, in fp32."""
        d_z, d_x, d_B, d_C, d_dt = self.cfg.in_proj_sizes
        z, xBC, dt = torch.split(self.in_proj(u), [d_z, d_x + d_B + d_C, d_dt], dim=-1)
        if self.linear_attention_test:
            dt = torch.ones_like(_fp32(dt))
        else:
            dt = F.softplus(_fp32(dt) + _fp32(self.dt_bias)).clamp(*self.cfg.dt_limit)
        if pad_mask is not None:  # a pad leaves both states as they are: no conv input, dt = 0
            xBC = xBC.masked_fill(~pad_mask[..., None], 0.0)
            dt = dt.masked_fill(~pad_mask[..., None], 0.0)
        return rearrange(z, "... (h p) -> ... h p", p=self.cfg.head_dim), xBC, dt

    def _conv_params(self):
        """(weight (c K), bias (c), activation) for the conv kernels."""
        weight = rearrange(self.conv1d.weight, "c 1 k -> c k")
        if self.linear_attention_test:  # the identity: only the newest tap, no bias, no SiLU
            return F.pad(torch.ones_like(weight[:, :1]), (self.cfg.d_conv - 1, 0)), None, None
        return weight, self.conv1d.bias, "silu"

    def _split_xBC(self, xBC):
        """xBC (... conv channels) -> x (... Hk P), B (... Hk N), C (... H N)."""
        _, d_x, d_B, d_C, _ = self.cfg.in_proj_sizes
        x, B, C = torch.split(xBC, [d_x, d_B, d_C], dim=-1)
        split_heads = lambda t, d: rearrange(t, "... (h d) -> ... h d", d=d)  # noqa: E731
        return split_heads(x, self.cfg.head_dim), split_heads(B, self.cfg.d_state), split_heads(C, self.cfg.d_state)

    def _A_D(self):
        """A = -exp(A_log) (H,) fp32 and D (H,); A = 0 and no D under the test switch."""
        A = -torch.exp(_fp32(self.A_log))
        return (torch.zeros_like(A), None) if self.linear_attention_test else (A, self.D)

    def _output(self, y, z):
        """y, z (... H P) -> out_proj(w * RMSNorm(y * silu(z))) (... D)."""
        y = rearrange(y, "... h p -> ... (h p)") if self.linear_attention_test else self.norm(y, z)
        return self.out_proj(y)

    # -- the two paths --------------------------------------------------------------------

    def forward(self, u, cache: Mamba2Cache | None = None, pad_mask=None):
        """u (b l D) -> (b l D); pad_mask (b l) bool, True on real tokens (left padding only).

        With a cache: continue from its state and leave the state after u in it."""
        b, l, _ = u.shape
        if cache is not None and l == 1:
            return self.step(u, cache, pad_mask)
        if pad_mask is not None and pad_mask.shape != (b, l):
            raise ValueError(f"pad_mask must have shape {(b, l)}, got {tuple(pad_mask.shape)}")
        z, xBC, dt = self._project(u, pad_mask)
        weight, bias, activation = self._conv_params()
        K = weight.shape[1]
        n_prev = 0
        if cache is not None:  # the cached last K-1 inputs come first; keep the last K for next time
            prev = rearrange(cache.conv_state[..., 1:], "b c k -> b k c").to(xBC.dtype)
            xBC, n_prev = torch.cat([prev, xBC], dim=1), K - 1
            cache.conv_state.copy_(rearrange(xBC[:, -K:], "b k c -> b c k"))
        xBC = causal_conv1d(xBC, weight, bias, activation)[:, n_prev:]  # (b l conv channels)
        x, B, C = self._split_xBC(xBC)
        A, D = self._A_D()
        y = ssd_scan(x, dt, A, B, C, D=D, initial_state=None if cache is None else cache.ssm_state,
                     return_final_state=cache is not None, chunk_size=self.cfg.chunk_size)
        if cache is not None:
            y, final_state = y
            cache.ssm_state.copy_(final_state)
        return self._output(y, z)  # (b l D)

    def step(self, u, cache: Mamba2Cache, pad_mask=None):
        """One token: u (b 1 D) -> (b 1 D), cache updated in place; pad_mask (b 1) or None.

        The recurrence itself (mamba2-minimal's `step`): shift the conv window, decay the state
        by exp(dt A) and add dt x B^T, read it out with C, add D x."""
        if u.shape[1] != 1:
            raise ValueError(f"step takes one token, got u of shape {tuple(u.shape)}")
        real = None if pad_mask is None else pad_mask[:, 0]
        if kernels.BACKEND == "triton" and not self.linear_attention_test:
            from zebra.kernels.mamba2_step import mamba2_step

            # everything between in_proj and out_proj in one launch (decode is launch-bound)
            weight, bias, _ = self._conv_params()
            y = mamba2_step(self.in_proj(u[:, 0]), cache.conv_state, cache.ssm_state, self.cfg.n_kv_heads,
                            weight, bias, self.dt_bias, self.A_log, self.D, self.norm.weight,
                            self.cfg.rms_norm_eps, self.cfg.dt_limit, real)
            return self.out_proj(y)[:, None]
        z, xBC, dt = self._project(u[:, 0], real)
        xBC = causal_conv1d_step(xBC, cache.conv_state, *self._conv_params())  # (b conv channels)
        x, B, C = self._split_xBC(xBC)
        A, D = self._A_D()
        y = ssd_step(cache.ssm_state, x, dt, A, B, C, D=D)  # (b H P)
        return self._output(y, z)[:, None]
