"""zebra.losses against closed forms written independently (numpy loops) and plain torch autograd."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zebra.losses import dpo_loss, ild_loss, kd_loss, sequence_logprobs


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def kd_numpy(hs, ht, ws, wt, targets, mask, temperature, kl_weight, ce_weight, reduction):
    """Explicit loops over positions and vocab in float64."""
    b, l, _ = hs.shape
    kl = ce = 0.0
    count = 0
    for i in range(b):
        for j in range(l):
            if not mask[i, j]:
                continue
            count += 1
            s, t = ws @ hs[i, j], wt @ ht[i, j]
            p, q = np_softmax(t / temperature), np_softmax(s / temperature)
            kl += sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(len(p)))
            ce += -math.log(np_softmax(s)[targets[i, j]])
    denominator = count if reduction == "token" else b
    kl, ce = kl / denominator, ce / denominator
    return kl_weight * temperature**2 * kl + ce_weight * ce, kl, ce


def random_kd_inputs(b=2, l=5, d=4, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(b, l, d, generator=g), torch.randn(b, l, d, generator=g)
    ws, wt = torch.randn(V, d, generator=g), torch.randn(V, d, generator=g)
    targets = torch.randint(0, V, (b, l), generator=g)
    mask = torch.rand(b, l, generator=g) > 0.3
    return hs, ht, ws, wt, targets, mask


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_kd_matches_hand_computed(reduction):
    hs, ht, ws, wt, targets, mask = random_kd_inputs()
    out = kd_loss(hs, ht, ws, wt, targets, mask, temperature=2.0, kl_weight=0.7, ce_weight=0.3, reduction=reduction, chunk_size=3)
    loss, kl, ce = kd_numpy(*(x.double().numpy() for x in (hs, ht, ws, wt)), targets.numpy(), mask.numpy(), 2.0, 0.7, 0.3, reduction)
    torch.testing.assert_close(out.loss.item(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kl.item(), kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce.item(), ce, rtol=1e-5, atol=1e-6)


def test_kd_zero_when_student_is_teacher():
    hs, _, ws, _, targets, mask = random_kd_inputs()
    hs.requires_grad_(True)
    out = kd_loss(hs, hs.detach().clone(), ws, ws.clone(), targets, mask, temperature=1.5)
    out.loss.backward()
    assert abs(out.loss.item()) < 1e-6 and abs(out.kl.item()) < 1e-6
    assert hs.grad.abs().max().item() < 1e-6


def kd_unchunked(hs, ht, ws, wt, targets, mask, temperature, kl_weight, ce_weight):
    """Plain autograd on the full (b l V) logits: the reference for the chunked Function."""
    s, t = hs @ ws.T, (ht @ wt.T).detach()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy(s.flatten(0, 1), targets.flatten(), reduction="none").view_as(kl)
    per_token = kl_weight * temperature**2 * kl + ce_weight * ce
    return per_token[mask].sum() / mask.sum()


@pytest.mark.parametrize("chunk_size, temperature, ce_weight", [(1, 1.7, 0.4), (4, 1.7, 0.4), (1000, 1.7, 0.4), (4, 1.0, 0.0), (4, 1.0, 0.3), (4, 2.0, 0.0)])
def test_kd_chunked_equals_unchunked(chunk_size, temperature, ce_weight):
    hs, ht, ws, wt, targets, mask = random_kd_inputs(b=3, l=7, d=6, V=11, seed=1)
    grads = []
    for fn in ("chunked", "reference"):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        if fn == "chunked":
            loss = kd_loss(h, ht, w, wt, targets, mask, temperature=temperature, kl_weight=0.6, ce_weight=ce_weight, chunk_size=chunk_size).loss
        else:
            loss = kd_unchunked(h, ht, w, wt, targets, mask, temperature, 0.6, ce_weight)
        (2.5 * loss).backward()  # a non-unit upstream gradient
        grads.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kd_bf16_inputs_give_bf16_grads_close_to_fp32():
    hs, ht, ws, wt, targets, mask = random_kd_inputs(b=2, l=6, d=8, V=13, seed=4)
    h, w = hs.bfloat16().requires_grad_(True), ws.bfloat16().requires_grad_(True)
    out = kd_loss(h, ht.bfloat16(), w, wt.bfloat16(), targets, mask, ce_weight=0.5, chunk_size=5)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    want = kd_unchunked(h32, ht.bfloat16().float(), w32, wt.bfloat16().float(), targets, mask, 1.0, 1.0, 0.5)
    want.backward()
    torch.testing.assert_close(out.loss, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h.grad.float(), h32.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(w.grad.float(), w32.grad, rtol=5e-2, atol=5e-2)


def test_kd_without_grad_and_mask_none():
    hs, ht, ws, wt, targets, _ = random_kd_inputs()
    with torch.no_grad():
        out = kd_loss(hs, ht, ws, wt, targets, None, ce_weight=1.0)
    want = kd_unchunked(hs, ht, ws, wt, targets, torch.ones_like(targets, dtype=torch.bool), 1.0, 1.0, 1.0)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


def test_kd_rejects_bad_reduction_and_shapes():
    hs, ht, ws, wt, targets, mask = random_kd_inputs()
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(hs, ht, ws, wt, targets, mask, reduction="batchmean")
    with pytest.raises(ValueError, match="targets"):
        kd_loss(hs, ht, ws, wt, targets[:, :-1], mask)


def test_ild_matches_hand_computed():
    g = torch.Generator().manual_seed(2)
    b, l, d, layers = 2, 3, 5, 3
    sb, tb = [torch.randn(b, l, d, generator=g) for _ in range(layers + 1)], [torch.randn(b, l, d, generator=g) for _ in range(layers + 1)]
    sm, tm = [torch.randn(b, l, d, generator=g) for _ in range(layers)], [torch.randn(b, l, d, generator=g) for _ in range(layers)]
    mask = torch.tensor([[True, False, True], [True, True, False]])
    want = 0.0
    for s, t in zip(sb + sm, tb + tm):
        norms = [math.sqrt(sum((s[i, j, k].item() - t[i, j, k].item()) ** 2 for k in range(d))) for i in range(b) for j in range(l) if mask[i, j]]
        want += sum(norms) / len(norms)
    torch.testing.assert_close(ild_loss(sb, tb, sm, tm, mask).item(), want, rtol=1e-5, atol=1e-6)
    unmasked = sum(torch.linalg.vector_norm(s - t, dim=-1).mean() for s, t in zip(sb + sm, tb + tm))
    torch.testing.assert_close(ild_loss(sb, tb, sm, tm), unmasked)


def test_ild_zero_and_finite_gradient_when_equal():
    x = torch.randn(2, 3, 4, requires_grad=True)
    loss = ild_loss([x], [x.detach()], [x], [x.detach()])
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="teacher blocks"):
        ild_loss([x, x], [x], [], [])


def test_sequence_logprobs_matches_loop():
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(2, 4, 6, generator=g), torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    got = sequence_logprobs(logits, targets, mask)
    for i in range(2):
        want = sum(math.log(np_softmax(logits[i, t].double().numpy())[targets[i, t]]) for t in range(4) if mask[i, t])
        torch.testing.assert_close(got[i].item(), want, rtol=1e-5, atol=1e-6)


def test_dpo_matches_closed_form():
    pc, pr = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -1.0, -2.5])
    rc, rr = torch.tensor([-3.5, -4.0, -2.0]), torch.tensor([-3.0, -2.0, -2.5])
    beta = 0.1
    out = dpo_loss(pc, pr, rc, rr, beta)
    margins = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item() for i in range(3)]
    want = sum(math.log(1 + math.exp(-m)) for m in margins) / 3
    torch.testing.assert_close(out.loss.item(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr))
    assert out.accuracy.item() == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert out.margin.item() == pytest.approx(sum(margins) / 3)


def test_dpo_policy_equal_to_reference():
    logps = torch.tensor([-3.0, -7.0]), torch.tensor([-4.0, -1.0])
    out = dpo_loss(*logps, *logps, beta=0.01)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.margin.item() == 0.0 and out.accuracy.item() == 0.0


def test_kd_on_a_tied_llama_matches_full_logits():
    """Through a real (tiny, tied-embedding) student: every parameter's gradient equals plain autograd."""
    from zebra.config import LlamaConfig
    from zebra.llama import LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    teacher, student = LlamaForCausalLM(config), LlamaForCausalLM(config)
    ids = torch.randint(0, 50, (2, 9))
    targets, mask = torch.roll(ids, -1, 1), torch.rand(2, 9) > 0.2
    with torch.no_grad():
        teacher_hidden = teacher.model(ids)
    out = kd_loss(student.model(ids), teacher_hidden, student.lm_head.weight, teacher.lm_head.weight, targets, mask, ce_weight=0.5, chunk_size=4)
    out.loss.backward()
    chunked = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    s, t = student(ids), teacher.lm_head(teacher_hidden)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy(s.flatten(0, 1), targets.flatten(), reduction="none").view_as(kl)
    want = (kl + 0.5 * ce)[mask].mean()
    want.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
