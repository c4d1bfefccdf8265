"""SMART: which layers of the hybrid become MLA (the rest stay Mamba2).

Inputs: the teacher T, the ILD-refined all-Mamba2 student M and all-MLA student A, all with the
Llama layout (`model.embed_tokens`, `model.layers[l]`, `model.norm`, `lm_head`; L layers), and
calibration batches of token ids (b l), packed rows without padding.

Sensitivity (PAPER.md section 5, the paper's [B][P]). M_l = M with its decoder layer l replaced by
A's whole decoder layer l (mixer, MLP and norms, as the stitch does):
    KL(X)  = 1/N sum_tokens sum_v p_T(v) (log p_T(v) - log p_X(v))     per-token mean over N tokens
    s_l    = KL(M) - KL(M_l)        how much making l an MLA layer closes the gap to the teacher
The paper does not give the KL direction. We use the forward KL(T || student): it is the
objective the stitched hybrid is trained on next (OFFICIAL.md section 5), so s_l measures the
reduction of exactly the loss the KD stage will minimise; it is also mass-covering and finite for
any softmax student. Per-token mean rather than the KD trainer's per-sequence sum: scores do not
depend on the sequence length (a constant factor would not change any selection).

Exact and cheap (all ours), batch by batch: the teacher runs once per batch and its final normed
hidden states (b l D) are kept for that batch; M runs once with its layer inputs x_0..x_{L-1}
(b l D) cached; then M_l reuses x_l (layers < l of M_l are M's, so x_l is exactly M_l's input) and
recomputes only A.layers[l] and M.layers[l+1:]: L(L+1)/2 layer calls per batch instead of L^2.
Layer calls replay the other arguments (positions, RoPE tables, ...) that each model's own forward
passed, captured with forward pre-hooks, so any layer signature `layer(x, ...)` works; the first
batch checks that replaying M's layers reproduces M's forward. The KL is the KD stage's own
zebra.losses.kd_loss (T = 1, full vocabulary, fp32, exact): it rebuilds both models' logits in
chunks of positions from the hidden states and lm_head weights, so no (b l V) tensor is ever held
(one teacher lm_head matmul per evaluated model is the price; a cached (b l V) teacher
distribution would cost 4 b l V bytes per batch instead). Memory: (2L + 1) b l D activations.

Selection of N MLA layers (N directly, or from a KV budget: N = floor(budget% * teacher KV per
token / MLA KV per layer), teacher KV = 2 L Hk d values, MLA = r_kv + d_rope values per layer):
- `structured`: our reconstruction of the paper's Algorithm 2 (its text is NOT available; only its
  title and the released layer lists are). Constraints read off every released config: layers 0 and
  L-2 are MLA (terminal anchors), and each gap between consecutive MLA layers is floor(g) or ceil(g),
  g = (L-2)/(N-1). Among these placements take the one of maximum total sensitivity, by dynamic
  programming over (gaps placed, long gaps used), O(N^2); ties go to the lexicographically smallest
  list. The anchors fit every 2 <= N <= L-1 (then g >= 1; N = 2 gives [0, L-2], N = L-1 gives
  0..L-2). Cases outside the rule (our choices): N = L cannot keep L-1 out, so it gives all layers;
  N = 1 has no gap, so it gives the better-scoring anchor, 0 or L-2 (0 when L <= 2).
- `topk`: the N highest scores (ties to the lower layer). `uniform`: layers floor(i L / N), i < N.
- `kl_guided`: the selector of Li et al., "Distilling to Hybrid Attention Models via KL-Guided
  Layer Selection" (ICLR 2026, arXiv 2512.20569; fla-org/hybrid-distillation, read, not copied),
  in our terms. Documented there (README, configs, paper summaries): start from the all-linear
  student after hidden-state alignment; for each layer l build the hybrid with only l restored to
  softmax attention, train it briefly with the stage-2 KL distillation (all parameters), rank the
  layers by the resulting distillation loss (lower = better) and keep the top K; the released lists
  are prefixes of one ranking. Ours: M for the all-linear student, A's layer l for the restored layer,
  a short AdamW run (betas 0.9/0.95, grad-norm clip 1, one learning rate) on the forward KL over
  `train_batches`, then KL(T || trained M_l) on the calibration batches; score = KL(M) - that KL.
  Differences from SMART: each candidate is trained before it is scored (L short trainings instead of
  L forward passes), and the choice is a plain top-K with no positional structure, so it may cluster.
  Our deviations: their restored layer is the teacher's own attention, ours A's MLA layer (the
  kind Zebra keeps); they rank by the logged training loss at a chosen step, we by the KL on the
  calibration batches after training (paired: the same data for every l); they give token mixers
  a 14x higher learning rate (1e-4 vs 7e-6) and use ~200M tokens.
  Unknown from the stored material: what "GA-S2" abbreviates, which step's loss made the released
  rankings, and the temperature and reduction of their ranking-run KL (we use T = 1, per-token mean).
"""

import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from zebra.config import LlamaConfig
from zebra.losses import kd_loss

METHODS = ("structured", "topk", "uniform", "kl_guided")


# ---------------------------------------------------------------------------------------
# KL and models


def kl_sum(student_hidden, teacher_hidden, student, teacher) -> torch.Tensor:
    """Sum over positions of KL(teacher || student), from final normed hidden states (b l D).

    zebra.losses.kd_loss (the KD stage's loss, T = 1) builds the logits chunk by chunk, so no
    (b l V) tensor is ever held. Its CE term is weighted 0; the targets it needs are unused."""
    targets = torch.zeros(student_hidden.shape[:2], dtype=torch.long, device=student_hidden.device)
    kl = kd_loss(student_hidden, teacher_hidden, student.lm_head.weight, teacher.lm_head.weight, targets).loss
    return kl * targets.numel()


def swapped_model(mamba_student: nn.Module, mla_student: nn.Module, mla_layers: list[int]) -> nn.Module:
    """A copy of M whose decoder layers `mla_layers` are copies of the MLA student's (whole layers)."""
    n_layers = len(mamba_student.model.layers)
    if any(not 0 <= l < n_layers for l in mla_layers):
        raise ValueError(f"mla_layers {mla_layers} must lie in [0, {n_layers})")
    model = copy.deepcopy(mamba_student)
    for l in mla_layers:
        model.model.layers[l] = copy.deepcopy(mla_student.model.layers[l])
    return model


def _forward_capturing(model: nn.Module, input_ids: torch.Tensor):
    """Final normed hidden states (b l D) of `model`, and each layer's call (x, other args, kwargs)."""
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: calls.append((a[0], a[1:], kw)), with_kwargs=True)
             for layer in model.model.layers]
    try:
        hidden = model(input_ids, return_hidden=True)
    finally:
        for h in hooks:
            h.remove()
    if len(calls) != len(model.model.layers):
        raise RuntimeError("smart.py assumes the Llama layout: each decoder layer called once per forward")
    return hidden, calls


def _call(layer: nn.Module, x: torch.Tensor, call) -> torch.Tensor:
    """`layer` on x with the other arguments of a captured call; its block output (b l D)."""
    _, args, kwargs = call
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _run_layers(model: nn.Module, x: torch.Tensor, calls, start: int) -> torch.Tensor:
    """Layers start.. of `model` from x, then the final norm: (b l D)."""
    for k in range(start, len(calls)):
        x = _call(model.model.layers[k], x, calls[k])
    return model.model.norm(x)


# ---------------------------------------------------------------------------------------
# SMART sensitivity scores


@dataclass
class Scores:
    """KLs (per-token means over `n_tokens` calibration tokens) of M, of A and of each M_l."""

    kl_mamba: float  # KL(T || M)
    kl_mla: float  # KL(T || A), the all-MLA student: how far any hybrid could get
    kl_swapped: list[float]  # KL(T || M_l), l < L
    n_tokens: int

    @property
    def sensitivity(self) -> list[float]:
        """s_l = KL(M) - KL(M_l)."""
        return [self.kl_mamba - kl for kl in self.kl_swapped]


def take_tokens(batches, n_tokens: int | None) -> list[torch.Tensor]:
    """The calibration batches, cut (by whole rows) to at least `n_tokens` tokens; all if None."""
    if n_tokens is not None and n_tokens < 1:
        raise ValueError(f"n_tokens must be positive or None, got {n_tokens}")
    taken, count = [], 0
    for i, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"calibration batch {i} must be an integer tensor (b l) of token ids, got {batch!r:.80}")
        if n_tokens is not None:
            batch = batch[: math.ceil((n_tokens - count) / batch.shape[1])]
        taken.append(batch)
        count += batch.numel()
        if n_tokens is not None and count >= n_tokens:
            return taken
    if not taken or (n_tokens is not None and count < n_tokens):
        raise ValueError(f"calibration data has {count} tokens, n_tokens asks for {n_tokens or 'at least 1'}")
    return taken


def _check_models(teacher, mamba_student, mla_student):
    n_m, n_a = len(mamba_student.model.layers), len(mla_student.model.layers)
    if n_m != n_a:
        raise ValueError(f"the Mamba2 student has {n_m} layers but the MLA student has {n_a}")
    vocab = {m.lm_head.weight.shape[0] for m in (teacher, mamba_student, mla_student)}
    if len(vocab) != 1:
        raise ValueError(f"teacher and students must share one vocabulary, got sizes {sorted(vocab)}")


@torch.no_grad()
def sensitivity_scores(teacher, mamba_student, mla_student, batches, n_tokens: int | None = None) -> Scores:
    """KL(M), KL(A) and KL(M_l) for every l over the calibration batches, batch by batch."""
    _check_models(teacher, mamba_student, mla_student)
    batches = take_tokens(batches, n_tokens)
    device = mamba_student.lm_head.weight.device
    n_layers = len(mamba_student.model.layers)
    kl_m = kl_a = 0.0
    kl_swapped = [0.0] * n_layers
    for i, ids in enumerate(batches):
        ids = ids.to(device)
        t_hidden = teacher(ids, return_hidden=True)
        m_hidden, m_calls = _forward_capturing(mamba_student, ids)
        a_hidden, a_calls = _forward_capturing(mla_student, ids)
        if i == 0 and not torch.allclose(_run_layers(mamba_student, m_calls[0][0], m_calls, 0), m_hidden):
            raise RuntimeError("replaying M's layers from its captured layer calls does not reproduce its forward: "
                               "smart.py assumes the Llama layout and stateless layers")
        kl_m += kl_sum(m_hidden, t_hidden, mamba_student, teacher).item()
        kl_a += kl_sum(a_hidden, t_hidden, mla_student, teacher).item()
        for l in range(n_layers):
            x = _call(mla_student.model.layers[l], m_calls[l][0], a_calls[l])  # M_l's input x_l is M's
            kl_swapped[l] += kl_sum(_run_layers(mamba_student, x, m_calls, l + 1), t_hidden, mamba_student,
                                    teacher).item()
    n = sum(b.numel() for b in batches)
    return Scores(kl_m / n, kl_a / n, [kl / n for kl in kl_swapped], n)


# ---------------------------------------------------------------------------------------
# KL-guided scores (Li et al.): train each M_l briefly, then measure its KL


@torch.no_grad()
def mean_kl(teacher, student, batches) -> float:
    """Per-token mean KL(T || student) over `batches`, with full forwards of the student."""
    device = student.lm_head.weight.device
    total = 0.0
    for ids in batches:
        ids = ids.to(device)
        total += kl_sum(student(ids, return_hidden=True), teacher(ids, return_hidden=True), student, teacher).item()
    return total / sum(b.numel() for b in batches)


def kl_guided_scores(teacher, mamba_student, mla_student, train_batches, eval_batches, lr: float) -> list[float]:
    """score_l = KL(T || M) - KL(T || M_l after one AdamW step per train batch), both on eval_batches."""
    _check_models(teacher, mamba_student, mla_student)
    train_batches, eval_batches = take_tokens(train_batches, None), take_tokens(eval_batches, None)
    device = mamba_student.lm_head.weight.device
    kl_m = mean_kl(teacher, mamba_student, eval_batches)
    scores = []
    for l in range(len(mamba_student.model.layers)):
        model = swapped_model(mamba_student, mla_student, [l]).train()
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
        for ids in train_batches:
            ids = ids.to(device)
            with torch.no_grad():
                t_hidden = teacher(ids, return_hidden=True)  # recomputed per step: memory stays one batch
            with torch.enable_grad():
                loss = kl_sum(model(ids, return_hidden=True), t_hidden, model, teacher) / ids.numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        scores.append(kl_m - mean_kl(teacher, model.eval(), eval_batches))
    return scores


# ---------------------------------------------------------------------------------------
# Selection


def _check_n(n_mla: int, n_layers: int):
    if not isinstance(n_mla, int) or not 1 <= n_mla <= n_layers:
        raise ValueError(f"n_mla must be an integer in [1, {n_layers}] for a {n_layers}-layer model, got {n_mla!r}")


def n_mla_for_kv_budget(kv_budget: float, teacher_config: LlamaConfig, mla_kv_per_layer: int) -> int:
    """Most MLA layers whose cache fits in `kv_budget` percent of the teacher's KV cache per token."""
    c = teacher_config
    teacher_kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
    one, n_layers = 100 * mla_kv_per_layer / teacher_kv, c.num_hidden_layers
    n = math.floor(kv_budget / one + 1e-9)  # the epsilon absorbs float error in exact budgets
    if n < 1:
        raise ValueError(f"kv_budget {kv_budget}% allows no MLA layer: one needs {one:.4f}% "
                         f"({mla_kv_per_layer} of the teacher's {teacher_kv} values per token)")
    if n > n_layers:
        raise ValueError(f"kv_budget {kv_budget}% allows {n} MLA layers but the model has {n_layers}; "
                         f"all-MLA needs only {n_layers * one:.4f}%")
    return n


def structured_select(scores: list[float], n_mla: int) -> list[int]:
    """Anchors 0 and L-2, gaps floor(g)/ceil(g), g = (L-2)/(N-1), max total score (module docstring)."""
    n_layers = len(scores)
    _check_n(n_mla, n_layers)
    if n_mla == n_layers:
        return list(range(n_layers))
    last = n_layers - 2
    if n_mla == 1:
        return [max((0, last), key=lambda i: (scores[i], -i))]
    n_gaps = n_mla - 1
    short, n_long = divmod(last, n_gaps)  # n_long gaps of short + 1, the others of short

    def pos(j, h):  # the j-th MLA layer, after h long gaps
        return j * short + h

    # best[j][h]: max total score of the MLA layers j..N-1 given that layer j sits at pos(j, h)
    best = [[-math.inf] * (n_long + 1) for _ in range(n_mla)]
    best[n_gaps][n_long] = scores[last]
    for j in range(n_gaps - 1, -1, -1):
        for h in range(min(j, n_long) + 1):
            nxt = max(best[j + 1][h], best[j + 1][h + 1] if h < n_long else -math.inf)
            best[j][h] = scores[pos(j, h)] + nxt
    chosen, h = [0], 0
    for j in range(1, n_mla):  # a short gap first on ties: the lexicographically smallest optimum
        if h < n_long and best[j][h + 1] > best[j][h]:
            h += 1
        chosen.append(pos(j, h))
    return chosen


def topk_select(scores: list[float], n_mla: int) -> list[int]:
    _check_n(n_mla, len(scores))
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n_mla])


def uniform_select(n_layers: int, n_mla: int) -> list[int]:
    _check_n(n_mla, n_layers)
    return [i * n_layers // n_mla for i in range(n_mla)]


# ---------------------------------------------------------------------------------------
# The stage entry point


def run_smart(teacher, mamba_student, mla_student, batches, n_mla: int, method: str, out_dir,
              n_tokens: int | None = None, train_batches=None, lr: float = 1e-4) -> list[int]:
    """Score, choose `n_mla` MLA layers by `method`, write smart.json + smart.png into out_dir.

    `train_batches` and `lr` are for method "kl_guided" only (its short training runs)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if (train_batches is not None) != (method == "kl_guided"):
        raise ValueError("train_batches is required for method 'kl_guided' and used by no other method")
    _check_n(n_mla, len(mamba_student.model.layers))
    batches = take_tokens(batches, n_tokens)
    scores = sensitivity_scores(teacher, mamba_student, mla_student, batches)
    s = scores.sensitivity
    guided = None
    if method == "structured":
        chosen = structured_select(s, n_mla)
    elif method == "topk":
        chosen = topk_select(s, n_mla)
    elif method == "uniform":
        chosen = uniform_select(len(s), n_mla)
    else:
        guided = kl_guided_scores(teacher, mamba_student, mla_student, train_batches, batches, lr)
        chosen = topk_select(guided, n_mla)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(method=method, n_mla=n_mla, mla_layers=chosen, uniform_layers=uniform_select(len(s), n_mla),
                  sensitivity=s, kl_guided_scores=guided, **asdict(scores))
    _write_atomic(out_dir / "smart.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    _write_atomic(out_dir / "smart.png", lambda p: _plot(s, guided, chosen, method, scores).print_png(str(p)))
    print(_table(scores, guided, chosen, method))
    print(f"smart: wrote {out_dir / 'smart.json'} and {out_dir / 'smart.png'}")
    return chosen


def _write_atomic(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _table(scores: Scores, guided, chosen, method) -> str:
    s, uniform = scores.sensitivity, uniform_select(len(scores.kl_swapped), len(chosen))
    lines = [f"SMART ({method}, {len(chosen)} MLA layers, {scores.n_tokens} tokens): "
             f"KL(T||all-Mamba2) = {scores.kl_mamba:.5f}, KL(T||all-MLA) = {scores.kl_mla:.5f}",
             f"{'layer':>5}  {'KL(M with l as MLA)':>19}  {'s_l':>9}" + (f"  {'kl_guided':>9}" if guided else "")
             + "  chosen"]
    for l, kl in enumerate(scores.kl_swapped):
        extra = f"  {guided[l]:+9.5f}" if guided else ""
        lines.append(f"{l:5d}  {kl:19.5f}  {s[l]:+9.5f}{extra}  {'MLA' if l in chosen else ''}")
    lines.append(f"MLA layers: {chosen} (sum of s_l {sum(s[l] for l in chosen):+.5f}); uniform spacing: "
                 f"{uniform} (sum of s_l {sum(s[l] for l in uniform):+.5f})")
    return "\n".join(lines)


def _plot(sensitivity, guided, chosen, method, scores: Scores) -> FigureCanvasAgg:
    panels = [("s_l = KL(M) - KL(M with l as MLA)", sensitivity)]
    if guided is not None:
        panels.append(("KL-guided score (after short training)", guided))
    fig = Figure(figsize=(max(6.0, 0.35 * len(sensitivity)), 3.2 * len(panels)), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    layers = range(len(sensitivity))
    for i, (label, values) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        colors = ["tab:red" if l in chosen else "tab:gray" for l in layers]
        ax.bar(layers, values, color=colors)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(list(layers))
        ax.set_ylabel(label, fontsize=8)
    ax.set_xlabel("layer (red = MLA)")
    fig.suptitle(f"SMART {method}: MLA layers {chosen}; KL(T||M) = {scores.kl_mamba:.4f}, "
                 f"KL(T||all-MLA) = {scores.kl_mla:.4f}", fontsize=9)
    return canvas
