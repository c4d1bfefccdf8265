"""Multi-head latent attention (MLA, DeepSeek-V2/V3 style), the attention kind of the hybrid.

Shapes: x (b l D); H query heads, Hk key/value heads (H % Hk == 0, GQA kept inside kv_b as the
official Zebra code does); a per-head query/key of width d_nope + d_rope, values of width d_v.

    c_q            = W_qa x                         (b l r_q)     r_q = 0: no query latent, q = W_q x
    [q_nope q_rope] = W_qb norm(c_q)                (b H l d_nope), (b H l d_rope)
    [c_kv k_rope]  = W_kva x                        (b l r_kv), (b l d_rope)   ONE rope key for all heads
    c_kv          <- norm(c_kv)                     (identity unless latent_norm: every released
                                                     config has the latent norms off)
    [k_nope v]     = W_kvb c_kv                     (b Hk l d_nope), (b Hk l d_v), group g serves
                                                     query heads g*H/Hk .. (g+1)*H/Hk - 1
    q_rope, k_rope <- RoPE(., positions)            rotate-half layout over d_rope, explicit inv_freq
    s_i            = (q_nope_i . k_nope_g + q_rope_i . k_rope) / sqrt(d_nope + d_rope) + causal
    out            = W_o [softmax(s_1) v_g ... softmax(s_H) v_g]

RoPE layout: the rope part of a query/key is stored in HF's rotate-half layout, dim j pairs with
dim j + d_rope/2 at frequency inv_freq[j] (a buffer of d_rope/2 values from the config), so the
teacher's `rope_cos_sin`/`apply_rope` are reused as they are. The two SVD inits (zebra/init.py)
only choose which teacher rows land in which slot: `official` stores the DeepSeek adjacent pairs
(2j, 2j+1) at (j, j + d_rope/2) (the permutation the official code applies at run time) with
inv_freq = theta^(-2j/d_rope); `preserve` stores whole teacher pairs with the teacher's frequencies.

Two ways to attend, the same function:
- materialised (training, prefill): k = [k_nope | k_rope], v from kv_b, then SDPA.
- absorbed (decode, one new token): W_uk is folded into the query and W_uv into the output, so
  scores and values are computed against the cached latents without expanding them per head:
      s_i = (q_nope_i W_uk_g) . c_kv + q_rope_i . k_rope,    o_i = (softmax(s_i) c_kv) W_uv_g^T
The cache holds only (c_kv, k_rope) per token: r_kv + d_rope values per token and layer.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zebra import kernels
from zebra.llama import RMSNorm, apply_rope, rope_cos_sin, rope_frequencies


@dataclass
class MLAConfig:
    hidden_size: int  # D
    n_heads: int  # H
    n_kv_heads: int  # Hk: up-projection heads of kv_b, repeated to H like HF repeat_kv
    q_rank: int  # r_q; 0 = full-rank query (a plain q_proj)
    kv_rank: int  # r_kv, the cached latent
    d_nope: int  # per-head query/key dims without position
    d_rope: int  # per-head query dims with RoPE = width of the one shared rope key
    v_head_dim: int  # d_v
    rope_theta: float = 10000.0
    rope_inv_freq: list[float] | None = None  # d_rope/2 pair frequencies; None = theta^(-2j/d_rope)
    latent_norm: bool = False  # RMSNorm on c_q and c_kv (off in every released config)
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.d_rope % 2:
            raise ValueError(f"d_rope must be even (RoPE rotates pairs), got {self.d_rope}")
        if self.kv_rank < 1 or self.q_rank < 0:
            raise ValueError(f"need kv_rank >= 1 and q_rank >= 0, got kv_rank {self.kv_rank}, q_rank {self.q_rank}")
        if self.d_nope + self.d_rope < 1:
            raise ValueError("d_nope + d_rope must be at least 1")
        if self.rope_inv_freq is not None and len(self.rope_inv_freq) != self.d_rope // 2:
            raise ValueError(f"rope_inv_freq has {len(self.rope_inv_freq)} values, "
                             f"expected d_rope/2 = {self.d_rope // 2}")

    def inv_freq(self) -> torch.Tensor:
        """Pair frequencies (d_rope/2,): explicit, or the official theta^(-2j/d_rope)."""
        if self.rope_inv_freq is not None:
            return torch.tensor(self.rope_inv_freq, dtype=torch.float32)
        return rope_frequencies(self.d_rope, self.rope_theta)

    def kv_values_per_token(self) -> int:
        """Cached values per token for this layer: the latent plus the shared rope key."""
        return self.kv_rank + self.d_rope

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.kv_values_per_token() * dtype_bytes


class MLACache:
    """Latents c_kv (b T r_kv) and already-rotated rope keys k_rope (b T d_rope), written by slot
    (a plain object, as zebra.llama.KVCache says why)."""

    def __init__(self, batch: int, max_len: int, kv_rank: int, d_rope: int, dtype, device):
        self.c_kv = torch.zeros(batch, max_len, kv_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(batch, max_len, d_rope, dtype=dtype, device=device)

    def update(self, start, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Write c_kv (b l r), k_rope (b l d_rope) from slot `start`; return the slots to attend
        over: up to start + l for an int start (prefill), the whole buffer for a (1,) device
        start (decode step, l = 1; see zebra.llama.Cache.context)."""
        if isinstance(start, torch.Tensor):
            self.c_kv.index_copy_(1, start, c_kv)
            self.k_rope.index_copy_(1, start, k_rope)
            return self.c_kv, self.k_rope
        end = start + c_kv.shape[1]
        if end > self.c_kv.shape[1]:
            raise ValueError(f"cache overflow: {end} tokens > max_len {self.c_kv.shape[1]}")
        self.c_kv[:, start:end] = c_kv
        self.k_rope[:, start:end] = k_rope
        return self.c_kv[:, :end], self.k_rope[:, :end]


class MLAttention(nn.Module):
    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.cfg = cfg
        D, H, Hk, qk = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.d_nope + cfg.d_rope
        if cfg.q_rank:
            self.q_a_proj = nn.Linear(D, cfg.q_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_rank, cfg.rms_norm_eps) if cfg.latent_norm else nn.Identity()
            self.q_b_proj = nn.Linear(cfg.q_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_rank + cfg.d_rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_rank, cfg.rms_norm_eps) if cfg.latent_norm else nn.Identity()
        self.kv_b_proj = nn.Linear(cfg.kv_rank, Hk * (cfg.d_nope + cfg.v_head_dim), bias=False)
        self.out_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)
        self.scale = 1.0 / math.sqrt(qk)

    def new_cache(self, batch: int, max_len: int, dtype, device) -> MLACache:
        return MLACache(batch, max_len, self.cfg.kv_rank, self.cfg.d_rope, dtype, device)

    def query(self, x):
        """x (b l D) -> q_nope (b H l d_nope), q_rope (b H l d_rope), not yet rotated."""
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.cfg.q_rank else self.q_proj(x)
        q = rearrange(q, "b l (h d) -> b h l d", h=self.cfg.n_heads)
        return q.split([self.cfg.d_nope, self.cfg.d_rope], dim=-1)

    def forward(self, x, positions, cache: MLACache | None = None, start: int = 0, mask=None):
        """x (b l D), positions (b l) -> (b l D).

        Without a cache: plain causal attention over x. With one, `start` and `mask` (b 1 l T,
        True = may attend) come from zebra.llama.Cache.context: the new latents are written from
        slot `start`; one new token (a decode step) takes the absorbed path."""
        cfg = self.cfg
        q_nope, q_rope = self.query(x)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([cfg.kv_rank, cfg.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope[:, None], cos, sin)[:, 0]  # (b l d_rope), shared by all heads
        if cache is not None:
            c_kv, k_rope = cache.update(start, c_kv, k_rope)  # (b T r_kv), (b T d_rope)
        if cache is None or x.shape[1] > 1:
            o = self.attend_materialised(q_nope, q_rope, c_kv, k_rope, mask)
        else:
            o = self.attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask, start)
        return self.out_proj(rearrange(o, "b h l d -> b l (h d)"))

    def attend_materialised(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Expand the latents to per-group keys and values, then SDPA. Returns (b H l d_v)."""
        cfg = self.cfg
        kv = rearrange(self.kv_b_proj(c_kv), "b t (g e) -> b g t e", g=cfg.n_kv_heads)
        k_nope, v = kv.split([cfg.d_nope, cfg.v_head_dim], dim=-1)  # (b Hk T d_nope), (b Hk T d_v)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, cfg.n_kv_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                              enable_gqa=cfg.n_heads != cfg.n_kv_heads)

    def attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask, start=None):
        """Scores and values in latent space (W_uk into the query, W_uv after the sum). (b H l d_v)
        `start`: the query's slot, a (1,) device tensor in a decode step; None: the last key's."""
        cfg = self.cfg
        w = rearrange(self.kv_b_proj.weight, "(g e) r -> g e r", g=cfg.n_kv_heads)
        w_uk, w_uv = w.split([cfg.d_nope, cfg.v_head_dim], dim=1)  # (Hk d_nope r), (Hk d_v r)
        by_group = lambda t: rearrange(t, "b (g j) l d -> b g j l d", g=cfg.n_kv_heads)  # noqa: E731
        q_latent = rearrange(torch.einsum("bgjld,gdr->bgjlr", by_group(q_nope), w_uk), "b g j l r -> b (g j) l r")
        if kernels.BACKEND == "triton" and q_latent.shape[2] == 1:  # zebra/kernels/mla_decode.py
            from zebra.kernels.mla_decode import mla_decode

            # the mask's first visible key is the kernel's first key: the row's left pad, or the
            # query's own slot for a pad query (Cache.context)
            first = mask[:, 0, -1].int().argmax(-1) if mask is not None else \
                c_kv.new_zeros(c_kv.shape[0], dtype=torch.long)
            length = c_kv.shape[1] if start is None else start + 1
            context = mla_decode(q_latent[:, :, 0], q_rope[:, :, 0], c_kv, k_rope, first, length,
                                 self.scale)[:, :, None]
        else:
            scores = torch.einsum("bhlr,btr->bhlt", q_latent, c_kv) + torch.einsum("bhld,btd->bhlt", q_rope, k_rope)
            scores = scores * self.scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.float().softmax(dim=-1).to(c_kv.dtype)
            context = torch.einsum("bhlt,btr->bhlr", probs, c_kv)
        return rearrange(torch.einsum("bgjlr,gvr->bgjlv", by_group(context), w_uv), "b g j l v -> b (g j) l v")
