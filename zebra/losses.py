"""Training losses: ILD, chunked KD (KL + CE), sequence log-probs, DPO.

Shapes: b batch, l positions, d hidden, V vocab, n = counted positions. Every mask, target
and hidden state is aligned with the *predicting* position (targets[t] is the token after
input t; zebra.data hands them out so). Reductions run in fp32.

ILD (OFFICIAL.md section 4), per layer i, unsquared L2 over d, mean over counted tokens:
    L = sum_i mean_t ||S_block_i,t - T_block_i,t||_2 + sum_j mean_t ||S_mixer_j,t - T_mixer_j,t||_2
KD, with p = softmax(t / T), q = softmax(s / T) (t, s: teacher and student logits):
    L = kl_weight * T^2 * KL(p || q) + ce_weight * CE(s, y),  KL(p || q) = sum_v p_v (log p_v - log q_v)
    reduction "token" (default): sums over counted positions / their number;
    reduction "sequence": sums / b, the official 'batchmean' on (b, l, V) tensors, i.e. a
    per-sequence sum over tokens (OFFICIAL.md section 5; the official CE is a token mean, but its
    ce_weight is 0).
DPO (sigmoid, TRL's default), with r = beta * (log pi(y|x) - log ref(y|x)):
    L = mean_b -log sigmoid(r_chosen - r_rejected)
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x (b l) over positions where mask (b l) is True (over all when mask is None)."""
    if mask is None:
        return x.mean()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def ild_loss(
    student_blocks: list[torch.Tensor],
    teacher_blocks: list[torch.Tensor],
    student_mixers: list[torch.Tensor],
    teacher_mixers: list[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over pairs of the token mean of ||student - teacher||_2 over d; each tensor (b l d).

    Blocks are decoder-layer outputs (the caller may append the final-norm outputs, as the official
    code does); mixers are attention / MLA / Mamba2 outputs before the residual add.
    """
    if len(student_blocks) != len(teacher_blocks) or len(student_mixers) != len(teacher_mixers):
        raise ValueError(
            f"ild_loss: {len(student_blocks)} student vs {len(teacher_blocks)} teacher blocks, "
            f"{len(student_mixers)} student vs {len(teacher_mixers)} teacher mixers"
        )
    loss = torch.zeros((), device=(student_blocks + student_mixers)[0].device)
    for s, t in zip(student_blocks + student_mixers, teacher_blocks + teacher_mixers):
        loss = loss + _masked_mean(torch.linalg.vector_norm(s.float() - t.float(), dim=-1), mask)
    return loss


class KDLoss(NamedTuple):
    loss: torch.Tensor  # kl_weight * T^2 * kl + ce_weight * ce: what to backpropagate
    kl: torch.Tensor  # KL(p || q) at temperature T, reduced, no grad (for logging)
    ce: torch.Tensor  # CE of the student at temperature 1, reduced, no grad (for logging)


class _ChunkedKD(torch.autograd.Function):
    """Sums of the KD loss over n positions, never holding more than `chunk` rows of (n, V) logits.

    The gradient of the loss with respect to the student logits has a closed form,
        dL/ds = kl_weight * T * (q - p) + ce_weight * (softmax(s) - onehot(y)),
    so the forward pass computes it chunk by chunk and turns it at once into the gradients of the
    student's hidden states (g @ W) and head weight (g^T @ h); backward only scales them. Each
    chunk's logits are built once and freed before the next chunk. (torch.utils.checkpoint per
    chunk would also bound memory, but it recomputes both models' logits in the backward pass:
    one more (n, d) x (d, V) matmul per model.) Memory: a few (chunk, V) fp32 buffers at a time,
    plus the (n, d) and (V, d) gradients held from forward to backward.
    """

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, student_head, teacher_head, targets, temperature, kl_weight, ce_weight, chunk, need_grad):
        n = student_hidden.shape[0]
        kl_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        ce_sum = torch.zeros_like(kl_sum)
        grad_hidden = torch.empty_like(student_hidden) if need_grad else None
        grad_head = torch.zeros(student_head.shape, dtype=torch.float32, device=student_head.device) if need_grad else None
        for start in range(0, n, chunk):
            h, y = student_hidden[start : start + chunk], targets[start : start + chunk]
            s = (h @ student_head.T).float()  # (c V) student logits
            t = (teacher_hidden[start : start + chunk] @ teacher_head.T).float()  # (c V) teacher logits
            log_q = F.log_softmax(s if temperature == 1.0 else s / temperature, -1)
            log_p = F.log_softmax(t if temperature == 1.0 else t / temperature, -1)
            p = log_p.exp()
            kl_sum += (p * (log_p - log_q)).sum()
            log_probs = log_q if temperature == 1.0 else F.log_softmax(s, -1)
            ce_sum -= log_probs.gather(-1, y[:, None]).sum()
            if need_grad:  # g = dL/ds (c V), built in place over the buffers no longer needed
                if temperature == 1.0:  # softmax(s) = q: g = (kl_weight + ce_weight) q - kl_weight p
                    g = log_q.exp_().mul_(kl_weight + ce_weight).sub_(p, alpha=kl_weight)
                else:
                    g = log_q.exp_().sub_(p).mul_(kl_weight * temperature)
                    if ce_weight:
                        g.add_(log_probs.exp_(), alpha=ce_weight)
                if ce_weight:
                    g[torch.arange(len(y), device=y.device), y] -= ce_weight
                g = g.to(h.dtype)
                grad_hidden[start : start + chunk] = g @ student_head
                grad_head.add_(g.T @ h)  # fp32 accumulation of the (V d) gradient
        ctx.save_for_backward(grad_hidden, grad_head)
        ctx.head_dtype = student_head.dtype
        ctx.mark_non_differentiable(kl_sum, ce_sum)
        loss = kl_weight * temperature**2 * kl_sum + ce_weight * ce_sum
        return loss, kl_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_kl, grad_ce):
        grad_hidden, grad_head = ctx.saved_tensors
        grad_hidden = (grad_loss * grad_hidden).to(grad_hidden.dtype)
        grad_head = (grad_loss * grad_head).to(ctx.head_dtype)
        return grad_hidden, None, grad_head, None, None, None, None, None, None, None


def kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_head: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    reduction: str = "token",
    chunk_size: int = 256,
) -> KDLoss:
    """KD loss from final hidden states (b l d) and lm_head weights (V d), chunked over positions.

    targets (b l) are the next tokens (for CE); mask (b l) selects the counted positions (None: all).
    The teacher is frozen: no gradient flows to teacher_hidden or teacher_head. chunk_size rows of
    logits are live at a time (a few fp32 (chunk_size, V) buffers).
    """
    if reduction not in ("token", "sequence"):
        raise ValueError(f"kd_loss: reduction should be 'token' or 'sequence', got {reduction!r}")
    b, l, d = student_hidden.shape
    if teacher_hidden.shape[:2] != (b, l) or targets.shape != (b, l) or (mask is not None and mask.shape != (b, l)):
        raise ValueError(f"kd_loss: student_hidden {tuple(student_hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)}, targets {tuple(targets.shape)} disagree")
    if mask is None:
        mask = torch.ones(b, l, dtype=torch.bool, device=targets.device)
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # only counted positions reach the heads
    need_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    loss, kl, ce = _ChunkedKD.apply(
        student_hidden.reshape(-1, d)[rows], teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[rows].detach(),
        student_head, teacher_head.detach(), targets.reshape(-1)[rows], temperature, kl_weight, ce_weight, chunk_size, need_grad,
    )
    denominator = rows.numel() if reduction == "token" else b
    denominator = max(denominator, 1)
    return KDLoss(loss / denominator, kl / denominator, ce / denominator)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask_t * log softmax(logits_t)[targets_t]: logits (b l V), targets and mask (b l) -> (b,)."""
    logits = logits.float()
    token_logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, token_logprobs, 0.0).sum(-1)


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar, mean over the batch
    chosen_rewards: torch.Tensor  # (b,) beta * (log pi(y_w) - log ref(y_w)), no grad
    rejected_rewards: torch.Tensor  # (b,) beta * (log pi(y_l) - log ref(y_l)), no grad
    accuracy: torch.Tensor  # scalar: fraction of pairs with chosen reward > rejected reward
    margin: torch.Tensor  # scalar: mean of chosen - rejected rewards


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> DPOLoss:
    """Sigmoid DPO from sequence log-probs (b,) of the policy and the frozen reference."""
    chosen_rewards = beta * (policy_chosen.float() - reference_chosen.float())
    rejected_rewards = beta * (policy_rejected.float() - reference_rejected.float())
    margins = chosen_rewards - rejected_rewards
    return DPOLoss(
        loss=-F.logsigmoid(margins).mean(),
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        accuracy=(margins > 0).float().mean().detach(),
        margin=margins.mean().detach(),
    )
