"""Teacher -> student initialisation: every student mixer is built from a Llama attention layer.

MLA (SVD init)       : see the MLA section below.
Mamba2 (attention reinterpretation): see the Mamba2 section below.
"""

import math

import torch
from einops import rearrange

from zebra.config import LlamaConfig
from zebra.llama import LlamaAttention, LlamaForCausalLM, rope_frequencies
from zebra.mamba2 import Mamba2, Mamba2Config
from zebra.mla import MLAConfig, MLAttention

# ---------------------------------------------------------------------------------------
# MLA: SVD init
#
# Teacher (HF Llama layout): W_q (H*d, D), W_k and W_v (Hk*d, D), W_o (D, H*d); inside a head dim
# j pairs with j + d/2 at frequency f_j. Both modes split each head's d dims into d_nope = d - d_rope
# position-free dims and d_rope RoPE dims (listed in the MLA's rotate-half order, see zebra/mla.py),
# then factor with truncated SVDs, the singular values on the DOWN projection (as the official
# code; with the latent norms off this placement does not change the function):
#     W_q regrouped per head [nope | rope]  = U S V^T:  q_a = S_r V_r^T,   q_b = U_r
#     [W_k rows ; W_v]                      = U S V^T:  kv_a latent rows = S_r V_r^T,  kv_b = U_r
#     shared rope key rows of kv_a          = one key for all heads from W_k's rope rows (below)
#     out_proj                              = W_o
# GQA stays inside kv_b: it has Hk groups of [k_nope | v], repeated to H heads at attention time.
#
# official (OFFICIAL.md section 2): nope = the FIRST d_nope dims of each head, rope = the LAST
#   d_rope dims re-paired as adjacent pairs (2j, 2j+1) at frequencies theta^(-2j/d_rope); the kv
#   SVD factors all d key rows and then drops the rope rows of U. Not function-preserving even at
#   full rank (the teacher pairs j with j + d/2, the first half loses its rotation, the rope key is
#   the mean of the Hk heads' rope rows, and part of the kv rank is spent on discarded rows): by
#   design of the original, ILD repairs it. Departure: for teachers with rope_scaling the official
#   code uses YaRN inside MLA (with its mscale quirk); we keep the plain theta^(-2j/d_rope) that it
#   uses for unscaled teachers such as SmolLM2.
# preserve (ours): rope = d_rope/2 whole teacher pairs (j, j + d/2) with the teacher's own
#   frequencies (the highest ones, or MHA2MLA's query/key norm criterion); the kv SVD factors only
#   the rows that are kept ([W_k nope rows ; W_v]). The shared rope key is not a head mean: read a
#   pair's two rows as one complex row (RoPE multiplies it by e^{i p f}); per pair the Hk keys get
#   their best complex rank-1 fit k_g ~ a_g k, and since RoPE commutes with complex scaling,
#   q_h . RoPE(a_g k) = (conj(a_g) q_h) . RoPE(k): a_g is folded into the query rows of group g's
#   heads. Given the layer's inputs on calibration text, every fit is whitened by them
#   (SVD-LLM style, see input_whitening): it then minimises the error on real inputs instead of
#   in weight space. Exact for an MQA teacher at full rank with all pairs kept; otherwise the
#   errors are the truncation, the dropped rotations of the nope pairs and (Hk > 1) the rank-1 fit
#   of the keys.


def energy_rank(singular_values: torch.Tensor, ratio: float, multiple: int = 8) -> int:
    """Smallest rank whose sigma^2 share reaches `ratio`, rounded up to `multiple`, capped at full.

    X-EcoMLA counts the singular values whose cumulative share is <= ratio (at least 1): at most
    one fewer than ours before rounding up to a multiple of 8."""
    energy = singular_values.double().pow(2).cumsum(0)
    rank = int((energy / energy[-1] < ratio).sum()) + 1
    return min(math.ceil(rank / multiple) * multiple, singular_values.numel())


def energy_ranks(teacher: LlamaForCausalLM, q_ratio: float, kv_ratio: float, q_rank: int,
                 kv_rank: int) -> list[tuple[int, int]]:
    """(r_q, r_kv) for every teacher layer: first and last layer fixed, others by spectral energy.

    The kv energy is measured on the whole [W_k; W_v] stack (X-EcoMLA's matrix; repeating its heads
    for MHA would scale every sigma^2 alike), the same reference for both init modes."""
    layers = teacher.model.layers
    ranks = []
    for i, layer in enumerate(layers):
        if i in (0, len(layers) - 1):
            ranks.append((q_rank, kv_rank))
            continue
        attn = layer.self_attn
        kv = torch.cat([attn.k_proj.weight, attn.v_proj.weight]).float()
        ranks.append((energy_rank(torch.linalg.svdvals(attn.q_proj.weight.float()), q_ratio),
                      energy_rank(torch.linalg.svdvals(kv), kv_ratio)))
    return ranks


def official_dims(head_dim: int, d_rope: int) -> tuple[list[int], list[int]]:
    """(nope dims, rope dims) of a teacher head as the official init uses them.

    The rope dims are the last d_rope, permuted from interleaved to half layout (0, 2, 4, ...,
    1, 3, 5, ...) as the official code permutes q_pe/k_pe before its rotate-half: adjacent dims
    (2j, 2j+1) become a rotation pair at the MLA's frequency j."""
    last = list(range(head_dim - d_rope, head_dim))
    return list(range(head_dim - d_rope)), last[0::2] + last[1::2]


def preserve_dims(head_dim: int, pairs: list[int]) -> tuple[list[int], list[int]]:
    """(nope dims, rope dims) keeping teacher pairs (p, p + d/2) for p in `pairs` whole."""
    rope = list(pairs) + [p + head_dim // 2 for p in pairs]
    return [i for i in range(head_dim) if i not in rope], rope


def rope_pair_scores(attn: LlamaAttention, inputs: torch.Tensor | None = None) -> torch.Tensor:
    """MHA2MLA's 2-norm criterion per teacher pair j (d/2,): sum over query heads h of
    mean_t ||q_{h,j}(x_t)|| * ||k_{g(h),j}(x_t)||, pair norms being rotation invariant.

    inputs (n D) are the attention's (normed) inputs on calibration text; without them the
    weights' pair norms stand in (the expected norms for white inputs, up to a constant)."""
    H, Hk, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w_q = rearrange(attn.q_proj.weight.float(), "(h d) D -> h d D", d=d)
    w_k = rearrange(attn.k_proj.weight.float(), "(h d) D -> h d D", d=d)
    if inputs is None:
        q_sq, k_sq = w_q.pow(2).sum(-1)[None], w_k.pow(2).sum(-1)[None]  # (1 h d)
    else:
        x = inputs.float()
        q_sq = torch.einsum("nD,hdD->nhd", x, w_q).pow(2)
        k_sq = torch.einsum("nD,hdD->nhd", x, w_k).pow(2)
    q_pair = (q_sq[..., : d // 2] + q_sq[..., d // 2:]).sqrt()  # (n H d/2)
    k_pair = (k_sq[..., : d // 2] + k_sq[..., d // 2:]).sqrt().repeat_interleave(H // Hk, dim=1)
    return (q_pair * k_pair).mean(0).sum(0)


def input_whitening(inputs: torch.Tensor | None, dim: int, device) -> torch.Tensor | None:
    """Lower Cholesky factor L of the inputs' second moment, X^T X / n = L L^T (dim dim), or None.

    Fitting W L instead of W weighs errors by the real inputs: ||(W - W') x|| summed over the
    calibration x equals ||(W - W') L||_F (SVD-LLM's truncation-aware whitening). A small ridge
    (1e-4 of the mean diagonal) keeps L invertible."""
    if inputs is None:
        return None
    x = inputs.float().to(device)
    moment = x.T @ x / len(x)
    ridge = 1e-4 * moment.diagonal().mean() * torch.eye(dim, device=device)
    return torch.linalg.cholesky(moment + ridge)


def svd_factors(w: torch.Tensor, rank: int, name: str, whiten: torch.Tensor | None = None):
    """w (m n) ~ up @ down, up = U_r (m r), down = S_r V_r^T (r n); fp32 like the official code.

    With `whiten` (L from input_whitening) the SVD is of w L and down = S_r V_r^T L^-1: the same
    at full rank, the best rank r for the calibration inputs below it."""
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"{name} must be in [1, {min(w.shape)}] for a {tuple(w.shape)} matrix, got {rank}")
    U, S, Vh = torch.linalg.svd(w.float() if whiten is None else w.float() @ whiten, full_matrices=False)
    down = S[:rank, None] * Vh[:rank]
    if whiten is not None:
        down = torch.linalg.solve_triangular(whiten, down, upper=False, left=False)
    return down, U[:, :rank]


def shared_rope_key(w_q_rope: torch.Tensor, w_k_rope: torch.Tensor, whiten: torch.Tensor | None = None):
    """preserve's shared rope key: w_q_rope (H d_rope D), w_k_rope (Hk d_rope D), rotate-half layout
    -> (query rope rows with the group factors folded in (H d_rope D), shared key rows (d_rope D)).

    Pair j of group g as one complex row z_gj = row j + i row (j + d_rope/2); per pair the best
    rank-1 fit z_gj ~ a_gj k_j (a complex SVD, whitened like svd_factors when `whiten` is given),
    then each query pair of group g's heads is multiplied by conj(a_gj)."""
    H, Hk, k = w_q_rope.shape[0], w_k_rope.shape[0], w_k_rope.shape[1] // 2
    keys = torch.complex(w_k_rope[:, :k], w_k_rope[:, k:]).transpose(0, 1)  # (k Hk D)
    whiten = None if whiten is None else whiten.to(keys.dtype)
    U, S, Vh = torch.linalg.svd(keys if whiten is None else keys @ whiten, full_matrices=False)
    key = S[:, :1] * Vh[:, 0]  # (k D)
    if whiten is not None:
        key = torch.linalg.solve_triangular(whiten, key, upper=False, left=False)
    factor = U[:, :, 0].T.repeat_interleave(H // Hk, dim=0)  # (H k): a_gj of each query head's group
    q = torch.complex(w_q_rope[:, :k], w_q_rope[:, k:]) * factor.conj()[..., None]
    return torch.cat([q.real, q.imag], dim=1), torch.cat([key.real, key.imag])


@torch.no_grad()
def mla_from_llama(attn: LlamaAttention, llama_cfg: LlamaConfig, q_rank: int, kv_rank: int, d_rope: int,
                   mode: str = "official", rope_pairs: str = "high_freq", inputs: torch.Tensor | None = None,
                   latent_norm: bool = False) -> MLAttention:
    """An MLA layer initialised from a Llama attention layer (q_rank 0: full-rank plain q_proj).

    mode "official" | "preserve" (see above); rope_pairs (preserve only): "high_freq" keeps the
    d_rope/2 highest-frequency teacher pairs, "norm" the best by `rope_pair_scores(attn, inputs)`.
    inputs (n D, preserve only): the layer's normed inputs on calibration text; given, every fit
    (q and kv SVDs, the shared rope key) is whitened by them (see input_whitening).
    d_nope = head_dim - d_rope and v_head_dim = head_dim, so every teacher head dim is used once.
    latent_norm=True adds RMSNorms (weight 1) on the latents, as no released config does: the
    factors are the same, but the layer then no longer matches the SVD's function."""
    H, Hk, d, D = attn.n_heads, attn.n_kv_heads, attn.head_dim, llama_cfg.hidden_size
    if attn.q_proj.bias is not None:
        raise ValueError("attention_bias: MLA has no biases, the teacher must have attention_bias=False")
    if d_rope % 2 or not 0 < d_rope <= d:
        raise ValueError(f"d_rope must be even and in [2, head_dim={d}], got {d_rope}")
    if mode == "official":
        if rope_pairs != "high_freq" or inputs is not None:
            raise ValueError("rope_pairs and calibration inputs apply to mode 'preserve' only")
        nope, rope = official_dims(d, d_rope)
        inv_freq = None  # theta^(-2j/d_rope)
    elif mode == "preserve":
        if rope_pairs == "high_freq":
            pairs = list(range(d_rope // 2))  # f_j = theta^(-2j/d) falls with j
        elif rope_pairs == "norm":
            pairs = sorted(rope_pair_scores(attn, inputs).topk(d_rope // 2).indices.tolist())
        else:
            raise ValueError(f"rope_pairs must be 'high_freq' or 'norm', got {rope_pairs!r}")
        nope, rope = preserve_dims(d, pairs)
        teacher_freq = rope_frequencies(d, llama_cfg.rope_theta, llama_cfg.rope_scaling)
        inv_freq = teacher_freq[pairs].tolist()
    else:
        raise ValueError(f"mode must be 'official' or 'preserve', got {mode!r}")
    cfg = MLAConfig(hidden_size=D, n_heads=H, n_kv_heads=Hk, q_rank=q_rank, kv_rank=kv_rank, d_nope=len(nope),
                    d_rope=d_rope, v_head_dim=d, rope_theta=llama_cfg.rope_theta, rope_inv_freq=inv_freq,
                    latent_norm=latent_norm, rms_norm_eps=llama_cfg.rms_norm_eps)
    mla = MLAttention(cfg).to(attn.q_proj.weight.device)
    dtype = attn.q_proj.weight.dtype
    w_q = rearrange(attn.q_proj.weight.float(), "(h d) D -> h d D", d=d)
    w_k = rearrange(attn.k_proj.weight.float(), "(h d) D -> h d D", d=d)
    w_v = attn.v_proj.weight.float()
    whiten = input_whitening(inputs, D, w_v.device) if mode == "preserve" else None
    if mode == "official":
        w_q_rope, k_rope = w_q[:, rope], w_k[:, rope].mean(0)  # head mean of the key's rope rows
    else:
        w_q_rope, k_rope = shared_rope_key(w_q[:, rope], w_k[:, rope], whiten)

    # Query. Regrouping rows before the SVD equals the official "SVD, then pick rows of U":
    # a row permutation of W_q permutes U's rows and leaves S and V alone.
    w_q = rearrange(torch.cat([w_q[:, nope], w_q_rope], dim=1), "h e D -> (h e) D")
    if q_rank:
        down, up = svd_factors(w_q, q_rank, "q_rank", whiten)
        mla.q_a_proj.weight.copy_(down)
        mla.q_b_proj.weight.copy_(up)
    else:
        mla.q_proj.weight.copy_(w_q)

    # Keys and values: one joint SVD (official: all key rows, preserve: only the nope rows).
    k_rows = w_k if mode == "official" else w_k[:, nope]
    down, up = svd_factors(torch.cat([rearrange(k_rows, "g e D -> (g e) D"), w_v]), kv_rank, "kv_rank", whiten)
    up_k, up_v = up.split([k_rows.shape[0] * k_rows.shape[1], Hk * d])
    up_k = rearrange(up_k, "(g e) r -> g e r", g=Hk)
    if mode == "official":
        up_k = up_k[:, nope]  # the rope rows of U are discarded
    up_v = rearrange(up_v, "(g e) r -> g e r", g=Hk)
    mla.kv_b_proj.weight.copy_(rearrange(torch.cat([up_k, up_v], dim=1), "g e r -> (g e) r"))
    mla.kv_a_proj_with_mqa.weight.copy_(torch.cat([down, k_rope]))
    mla.out_proj.weight.copy_(attn.o_proj.weight)
    return mla.to(dtype)


# ---------------------------------------------------------------------------------------
# Mamba2: attention -> SSD reinterpretation


@torch.no_grad()
def mamba2_from_llama(attn: LlamaAttention, llama_cfg: LlamaConfig, generator: torch.Generator) -> Mamba2:
    """A Mamba2 block that reads the teacher's attention as linear attention (MambaInLlama's
    init_with_kqvo): C <- W_q, B <- W_k, x <- W_v (query, key, value), out_proj <- W_o.

    The other in_proj rows (z, dt), conv1d, dt_bias, A_log, D and the norm keep the reference
    default init (Mamba2.reset_parameters), drawn from `generator`, a CPU torch.Generator.
    The block has the dtype and device of the teacher's weights."""
    if llama_cfg.attention_bias:
        raise ValueError("mamba2_from_llama: attention_bias=True is not supported (in_proj has no bias)")
    cfg = Mamba2Config.from_llama(llama_cfg)
    teacher_w = attn.q_proj.weight
    block = Mamba2(cfg).to(device=teacher_w.device, dtype=teacher_w.dtype)
    block.reset_parameters(generator)
    _, x_rows, B_rows, C_rows, _ = torch.split(block.in_proj.weight, cfg.in_proj_sizes, dim=0)  # views
    copies = [(x_rows, attn.v_proj.weight, "x <- v_proj"), (B_rows, attn.k_proj.weight, "B <- k_proj"),
              (C_rows, attn.q_proj.weight, "C <- q_proj"), (block.out_proj.weight, attn.o_proj.weight, "out_proj <- o_proj")]
    for dst, src, name in copies:
        if dst.shape != src.shape:
            raise ValueError(f"mamba2_from_llama: {name}: shape {tuple(dst.shape)} != teacher {tuple(src.shape)}")
        dst.copy_(src)
    return block
