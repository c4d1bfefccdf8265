"""Llama, the teacher: the model every Zebra student starts from and is measured against.

One decoder block (x: b l D):
    h = x + Attn(RMSNorm(x))
    y = h + MLP(RMSNorm(h)),          MLP(u) = W_down(silu(W_gate u) * W_up u)
RMSNorm(u) = w * u / sqrt(mean(u^2) + eps), computed in fp32.

Attention with grouped query heads (H query heads share Hk key/value heads, H % Hk == 0):
    q = W_q x -> (b H l d),  k = W_k x, v = W_v x -> (b Hk l d)
    q, k <- RoPE(q, pos), RoPE(k, pos)
    o_i = softmax(q_i k_g^T / sqrt(d) + causal) v_g,   g = i // (H / Hk)
    out = W_o [o_1 ... o_H]
RoPE in HF's rotate-half layout: dim j pairs with j + d/2 at frequency f_j = theta^(-2j/d),
    RoPE(u)[j]       = u[j] cos(p f_j) - u[j + d/2] sin(p f_j)
    RoPE(u)[j + d/2] = u[j + d/2] cos(p f_j) + u[j] sin(p f_j)
With llama3 scaling the low frequencies are divided by `factor` and the band between the two
wavelength bounds is interpolated (Llama 3.1's recipe, same as transformers).

Parameter names equal Hugging Face's `LlamaForCausalLM`, so an HF state dict loads as it is.

Decoding uses a `Cache` (gpt-fast style: buffers preallocated to max length, written by slot).
A batch of prompts of different lengths is left-padded: row b's real tokens start at slot
`left_pad[b]`; its positions count from there and attention never looks at its pad slots.
A one-token decode step reads its slot from a device counter and attends over the whole buffer
under a mask, so the step has static shapes and one captured CUDA graph replays it at every
length (gpt-fast's input_pos; zebra.generate captures it).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zebra.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ---------------------------------------------------------------------------------------
# RoPE


def rope_frequencies(dim: int, theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies f_j = theta^(-2j/dim), j < dim/2, with optional llama3 scaling. (dim/2,)"""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if rope_scaling is None or rope_scaling.get("rope_type", "default") == "default":
        return inv_freq
    factor = rope_scaling["factor"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_len = rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # 1. long wavelengths (low frequencies) are slowed down by `factor`;
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    # 2. the band between old_len/high and old_len/low is interpolated between the two.
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor):
    """cos, sin of shape (b l dim) for positions (b l), in fp32 (as transformers computes them)."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x (b h l dim); cos, sin (b l dim)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---------------------------------------------------------------------------------------
# Cache shared by all model kinds (the hybrid reuses it with its own per-layer caches)


class KVCache:
    """Keys and values of one attention layer, (b Hk T d) each, written by slot.

    Caches are plain objects, not nn.Modules: torch.compile treats a module's buffers as fixed
    shapes, so every new batch size or max_len would recompile the decode step (zebra.generate)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (b Hk l d) from slot `start` and return the keys and values to attend over.

        start an int (prefill): slots [start, start + l), returns the slots up to there.
        start a (1,) device tensor (decode step, l = 1): that slot, returns the whole buffer."""
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start, k)
            self.v.index_copy_(2, start, v)
            return self.k, self.v
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"cache overflow: {end} tokens > max_len {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class Cache:
    """Everything a model carries between decoding calls.

    layers:   one cache per layer (KVCache here; the hybrid adds MLA and Mamba2 caches)
    left_pad: (b,) number of pad slots before each row's first real token
    max_len:  slots of every per-layer buffer
    length:   slots filled so far (the same for every row); `slot` (1,) is the same number on
              the device, what a decode step reads, so that no Python int enters the step
    """

    layers: list
    left_pad: torch.Tensor
    max_len: int = 0
    length: int = 0

    def __post_init__(self):
        self.slot = torch.full((1,), self.length, dtype=torch.long, device=self.left_pad.device)

    def positions(self, seq_len: int) -> torch.Tensor:
        """RoPE positions (b l) of the next `seq_len` slots: slot - left_pad, clamped at 0 on pads."""
        slots = torch.arange(self.length, self.length + seq_len, device=self.left_pad.device)
        return (slots[None] - self.left_pad[:, None]).clamp(min=0)

    def real_tokens(self, seq_len: int) -> torch.Tensor:
        """(b l) bool, True where the next `seq_len` slots hold real tokens (not left padding)."""
        slots = torch.arange(self.length, self.length + seq_len, device=self.left_pad.device)
        return slots[None] >= self.left_pad[:, None]

    def attention_mask(self, seq_len: int) -> torch.Tensor:
        """Boolean mask (b 1 l T), True = may attend, over slots T = length + seq_len: causal,
        never to pad slots. A pad query attends to itself only, so no softmax row is empty."""
        dev = self.left_pad.device
        q = torch.arange(self.length, self.length + seq_len, device=dev)[:, None]
        k = torch.arange(self.length + seq_len, device=dev)[None]
        real_key = k[None] >= self.left_pad[:, None, None]
        return ((k <= q) & real_key | (k == q))[:, None]

    def context(self, seq_len: int) -> dict:
        """What the layers read for the next `seq_len` tokens: positions (b l), real (b l),
        mask (b 1 l T) and start, where the new keys go.

        Several tokens (prefill): start = length (an int), T = length + seq_len.
        One token (decode step): all from the device `slot`: start = slot, T = max_len (the
        mask also hides the slots after this one); the step's shapes do not depend on length."""
        if self.length + seq_len > self.max_len:
            raise ValueError(f"cache overflow: {self.length + seq_len} tokens > max_len {self.max_len}")
        if seq_len > 1:
            return dict(positions=self.positions(seq_len), start=self.length,
                        mask=self.attention_mask(seq_len), real=self.real_tokens(seq_len))
        k = torch.arange(self.max_len, device=self.left_pad.device)[None]  # (1 T)
        mask = (k <= self.slot) & (k >= self.left_pad[:, None]) | (k == self.slot)  # (b T), as above
        return dict(positions=(self.slot - self.left_pad).clamp(min=0)[:, None], start=self.slot,
                    mask=mask[:, None, None], real=(self.slot >= self.left_pad)[:, None])

    def advance(self, seq_len: int):
        self.length += seq_len
        self.slot += seq_len


# ---------------------------------------------------------------------------------------
# The model


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, H, Hk, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hk, d
        self.q_proj = nn.Linear(D, H * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(D, Hk * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(D, Hk * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * d, D, bias=config.attention_bias)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start: int = 0, mask=None):
        """x (b l D) -> (b l D). Without a cache: plain causal attention over x."""
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
        )
        return self.o_proj(rearrange(o, "b h l d -> b l (h d)"))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, Fd, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(D, Fd, bias=bias)
        self.up_proj = nn.Linear(D, Fd, bias=bias)
        self.down_proj = nn.Linear(Fd, D, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, cache=None, start=0, mask=None):
        """Returns (block output, attention output before the residual add); ILD uses both."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), attn


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids, cache: Cache | None = None, hidden_states: list | None = None):
        """input_ids (b l) -> final normed hidden states (b l D).

        `hidden_states`, if a list, receives each layer's (input, block output, attention output)."""
        b, l = input_ids.shape
        if cache is None:
            positions = torch.arange(l, device=input_ids.device).expand(b, l)
            start, mask = 0, None
        else:
            ctx = cache.context(l)
            positions, start, mask = ctx["positions"], ctx["start"], ctx["mask"]
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            out, attn = layer(x, cos, sin, None if cache is None else cache.layers[i], start, mask)
            if hidden_states is not None:
                hidden_states.append((x, out, attn))
            x = out
        if cache is not None:
            cache.advance(l)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, cache: Cache | None = None, hidden_states: list | None = None,
                return_hidden: bool = False):
        """input_ids (b l) -> logits (b l V), or the final normed hidden states (b l D) with
        return_hidden (chunked KD applies lm_head itself). `hidden_states`: see LlamaModel."""
        hidden = self.model(input_ids, cache, hidden_states)
        return hidden if return_hidden else self.lm_head(hidden)

    def new_cache(self, batch: int, max_len: int, left_pad: torch.Tensor | None = None, dtype=None) -> Cache:
        """Preallocate a decoding cache for `batch` rows of up to `max_len` slots."""
        c, p = self.config, self.lm_head.weight
        dtype = dtype or p.dtype
        layers = [
            KVCache(batch, max_len, c.num_key_value_heads, c.head_dim, dtype, p.device)
            for _ in range(c.num_hidden_layers)
        ]
        if left_pad is None:
            left_pad = torch.zeros(batch, dtype=torch.long, device=p.device)
        return Cache(layers, left_pad.to(p.device), max_len)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Per-token KV cache of all layers: 2 * L * Hk * d values."""
        c = self.config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype_bytes
