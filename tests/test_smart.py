"""SMART: cached sensitivity scores against full forwards of each swapped model, the structured rule
against the released layer lists (OFFICIAL.md section 7) and brute force, and the stage outputs.

Two tiny Llamas with different random weights stand in for the all-Mamba2 and all-MLA students."""

import copy
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zebra.config import LlamaConfig
from zebra.hybrid import build_student, stitch
from zebra.llama import LlamaForCausalLM
from zebra.smart import (kl_guided_scores, n_mla_for_kv_budget, run_smart, sensitivity_scores, structured_select,
                         swapped_model, topk_select, uniform_select)

VOCAB, N_LAYERS = 61, 5


def tiny_llama(seed: int, n_layers: int = N_LAYERS) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms, so that a norm taken from the wrong model shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1), tiny_llama(2)  # teacher, "Mamba2" student, "MLA" student


def calibration(n_batches=3, rows=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, seq), generator=g) for _ in range(n_batches)]


def slow_kl(teacher, student, batches) -> float:
    """Per-token KL(teacher || student) with full forwards and torch's kl_div."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            t, s = F.log_softmax(teacher(ids), -1), F.log_softmax(student(ids), -1)
            total += F.kl_div(s, t, log_target=True, reduction="sum").item()
            n += ids.numel()
    return total / n


# ---------------------------------------------------------------------------------------
# scores


def test_cached_scores_equal_full_forward_of_each_swapped_model(models):
    teacher, mamba, mla = models
    batches = calibration()
    scores = sensitivity_scores(teacher, mamba, mla, batches, n_tokens=70)
    used = batches[:2] + [batches[2][:1]]  # 64 tokens + one 16-token row reaches 70
    assert scores.n_tokens == 80
    assert all(math.isfinite(v) for v in [scores.kl_mamba, scores.kl_mla, *scores.kl_swapped])
    assert scores.kl_mamba == pytest.approx(slow_kl(teacher, mamba, used), abs=1e-5)
    assert scores.kl_mla == pytest.approx(slow_kl(teacher, mla, used), abs=1e-5)
    for l in range(N_LAYERS):
        m_l = copy.deepcopy(mamba)
        m_l.model.layers[l] = mla.model.layers[l]
        assert scores.kl_swapped[l] == pytest.approx(slow_kl(teacher, m_l, used), abs=1e-5), l
        assert scores.sensitivity[l] == pytest.approx(scores.kl_mamba - scores.kl_swapped[l])


def test_swap_changes_only_the_listed_layers(models):
    _, mamba, mla = models
    before = {k: v.clone() for k, v in mamba.state_dict().items()}
    for chosen in ([0], [3], [1, 4]):
        model = swapped_model(mamba, mla, chosen)
        for name, value in model.state_dict().items():
            source = mla if name.startswith("model.layers.") and int(name.split(".")[2]) in chosen else mamba
            assert torch.equal(value, source.state_dict()[name]), name
        with torch.no_grad():  # a copy: editing it leaves both students alone
            for p in model.parameters():
                p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in mamba.state_dict().items())
    with pytest.raises(ValueError, match="mla_layers"):
        swapped_model(mamba, mla, [N_LAYERS])


def test_restoring_the_one_broken_layer_closes_the_gap(models):
    """Students = the teacher, except M's layer 2 is broken: s = KL(M) at l = 2 and 0 elsewhere."""
    teacher = models[0]
    mla = copy.deepcopy(teacher)
    mamba = copy.deepcopy(teacher)
    with torch.no_grad():
        mamba.model.layers[2].self_attn.o_proj.weight.normal_()
    scores = sensitivity_scores(teacher, mamba, mla, calibration())
    assert scores.kl_mamba > 1e-3
    assert scores.kl_mla == pytest.approx(0, abs=1e-6)
    expected = [scores.kl_mamba if l == 2 else 0.0 for l in range(N_LAYERS)]
    assert scores.sensitivity == pytest.approx(expected, abs=1e-6)


def test_real_hybrid_students(models):
    """The replay works with zebra.hybrid's layers: scores equal full forwards of stitched hybrids."""
    teacher = models[0]
    mla = build_student(teacher, "mla", kv_rank=8, d_rope=4)
    mamba = build_student(teacher, "mamba2")
    batches = calibration(2)
    scores = sensitivity_scores(teacher, mamba, mla, batches)
    assert scores.kl_mamba == pytest.approx(slow_kl(teacher, mamba, batches), abs=1e-5)
    assert scores.kl_mla == pytest.approx(slow_kl(teacher, mla, batches), abs=1e-5)
    for l in range(N_LAYERS):
        hybrid = stitch(["mla" if i == l else "mamba2" for i in range(N_LAYERS)], mla, mamba, teacher)
        assert scores.kl_swapped[l] == pytest.approx(slow_kl(teacher, hybrid, batches), abs=1e-5), l


class CallCounting(torch.nn.Module):
    """A stateful layer: its output depends on how often it was called, so a replay differs."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.calls = layer, 0

    def forward(self, x, *args):
        self.calls += 1
        out, mixed = self.layer(x, *args)
        return out * self.calls, mixed


def test_bad_models_and_data_are_refused(models):
    teacher, mamba, mla = models
    odd = copy.deepcopy(mamba)
    odd.model.layers[1] = CallCounting(odd.model.layers[1])
    with pytest.raises(RuntimeError, match="does not reproduce"):
        sensitivity_scores(teacher, odd, mla, calibration(1))
    with pytest.raises(ValueError, match="layers"):
        sensitivity_scores(teacher, mamba, tiny_llama(3, n_layers=4), calibration(1))
    with pytest.raises(ValueError, match="token ids"):
        sensitivity_scores(teacher, mamba, mla, [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="n_tokens"):
        sensitivity_scores(teacher, mamba, mla, calibration(1), n_tokens=1000)


# ---------------------------------------------------------------------------------------
# selection

RELEASED = {  # OFFICIAL.md section 7: (L, MLA layers)
    "1B-8": (16, [0, 2, 4, 6, 8, 10, 12, 14]),
    "1B-6": (16, [0, 2, 5, 8, 11, 14]),
    "1B-4": (16, [0, 5, 10, 14]),
    "3B-14": (28, list(range(0, 27, 2))),
    "3B-8": (28, [0, 3, 7, 10, 14, 18, 22, 26]),
    "3B-6": (28, [0, 5, 10, 16, 21, 26]),
    "8B-16": (32, list(range(0, 31, 2))),
    "8B-8": (32, [0, 4, 8, 12, 16, 20, 25, 30]),
}


@pytest.mark.parametrize("name", RELEASED)
def test_structured_reproduces_released_lists(name):
    n_layers, layers = RELEASED[name]
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = (np.isin(np.arange(n_layers), layers) + 0.01 * rng.random(n_layers)).tolist()
        assert structured_select(scores, len(layers)) == layers


def brute_force(scores, n_mla):
    """All placements with anchors 0 and L-2 and gaps floor(g)/ceil(g), best total score, then smallest."""
    last = len(scores) - 2
    g = last / (n_mla - 1)
    best = None
    for gaps in itertools.product(sorted({math.floor(g), math.ceil(g)}), repeat=n_mla - 1):
        if sum(gaps) != last:
            continue
        layers = [0] + list(itertools.accumulate(gaps))
        key = (-sum(scores[i] for i in layers), layers)
        best = key if best is None or key < best else best
    return best[1]


def test_structured_keeps_its_constraints_and_is_optimal():
    rng = random.Random(0)
    for n_layers in range(3, 41):
        for n_mla in range(2, n_layers):
            scores = [rng.gauss(0, 1) for _ in range(n_layers)]
            layers = structured_select(scores, n_mla)
            g = (n_layers - 2) / (n_mla - 1)
            gaps = [b - a for a, b in zip(layers, layers[1:])]
            assert len(layers) == n_mla and layers[0] == 0 and layers[-1] == n_layers - 2
            assert set(gaps) <= {math.floor(g), math.ceil(g)}, (n_layers, n_mla, layers)
            if n_mla <= 12:  # 2^11 gap patterns at most
                assert layers == brute_force(scores, n_mla), (n_layers, n_mla)
    ties = [1.0] * 10  # equal scores: the lexicographically smallest list (long gaps last)
    assert structured_select(ties, 4) == [0, 2, 5, 8]


def test_structured_edge_cases():
    scores = [0.1, 0.5, 0.2, 0.9, 0.3, 0.7, 0.4]  # L = 7, anchors 0 and 5
    assert structured_select(scores, 7) == list(range(7))  # N = L: every layer
    assert structured_select(scores, 1) == [5]  # N = 1: the better anchor
    assert structured_select([0.8] + scores[1:], 1) == [0]
    assert structured_select(scores, 2) == [0, 5]
    assert structured_select(scores, 6) == [0, 1, 2, 3, 4, 5]  # N = L - 1: gaps of 1
    assert structured_select([0.3, 0.1], 1) == [0]  # L = 2: both anchors are layer 0
    for bad in (0, 8, 2.0):
        with pytest.raises(ValueError, match="n_mla"):
            structured_select(scores, bad)


def test_topk_and_uniform_by_definition():
    rng = np.random.default_rng(1)
    for n_layers in (1, 5, 16, 28):
        scores = rng.normal(size=n_layers)
        for n_mla in range(1, n_layers + 1):
            assert topk_select(scores.tolist(), n_mla) == sorted(np.argsort(-scores)[:n_mla].tolist())
            layers = uniform_select(n_layers, n_mla)
            assert layers[0] == 0 and len(set(layers)) == n_mla
            assert all(abs(l - i * n_layers / n_mla) < 1 for i, l in enumerate(layers))
    assert topk_select([1.0, 2.0, 2.0, 0.0], 2) == [1, 2]
    assert topk_select([1.0, 1.0, 1.0], 1) == [0]  # ties to the lower layer
    assert uniform_select(16, 8) == list(range(0, 16, 2))
    assert uniform_select(16, 4) == [0, 4, 8, 12]
    with pytest.raises(ValueError, match="n_mla"):
        uniform_select(16, 17)


def llama_shape(n_layers, kv_heads, head_dim):
    return LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=n_layers,
                       num_attention_heads=kv_heads, num_key_value_heads=kv_heads, head_dim=head_dim)


def test_kv_budget_gives_n_mla():
    one_b, eight_b = llama_shape(16, 8, 64), llama_shape(32, 8, 128)  # KV 16384 and 65536 values/token
    assert n_mla_for_kv_budget(7.8125, one_b, 160) == 8  # 8 * 160 / 16384 exactly
    assert n_mla_for_kv_budget(7.8, one_b, 160) == 7
    assert n_mla_for_kv_budget(5.86, one_b, 160) == 6  # 6 * 160 / 16384 = 5.859375%
    assert n_mla_for_kv_budget(2.7344, eight_b, 224) == 8  # 8B 8MLA: r_kv 160 + d_rope 64
    assert n_mla_for_kv_budget(2.73, eight_b, 224) == 7  # the README's rounded 2.73% is just short
    assert n_mla_for_kv_budget(100 * 16 * 160 / 16384, one_b, 160) == 16
    with pytest.raises(ValueError, match="allows no MLA layer"):
        n_mla_for_kv_budget(0.9, one_b, 160)  # one layer needs 0.977%
    with pytest.raises(ValueError, match="allows 17 MLA layers"):
        n_mla_for_kv_budget(17 * 100 * 160 / 16384, one_b, 160)


# ---------------------------------------------------------------------------------------
# KL-guided selector and the stage entry point


def test_kl_guided_scores(models):
    """Untrained (lr 0) it is SMART's s_l by another path; trained on the scored batch it does better."""
    teacher, mamba, mla = models
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (mamba, mla)]
    batches = calibration(1)
    s = sensitivity_scores(teacher, mamba, mla, batches).sensitivity
    assert kl_guided_scores(teacher, mamba, mla, calibration(1, seed=1), batches, lr=0.0) == pytest.approx(s, abs=1e-5)
    trained = kl_guided_scores(teacher, mamba, mla, batches * 3, batches, lr=1e-2)
    assert all(t > u for t, u in zip(trained, s)), (trained, s)
    for m, sd in zip((mamba, mla), before):  # trained copies, never the students
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("method", ["structured", "topk", "uniform", "kl_guided"])
def test_run_smart_writes_choice_table_and_plot(models, tmp_path, capsys, method):
    teacher, mamba, mla = models
    train = calibration(1, seed=1) if method == "kl_guided" else None
    chosen = run_smart(teacher, mamba, mla, calibration(1), 2, method, tmp_path / "smart", train_batches=train)
    report = json.loads((tmp_path / "smart" / "smart.json").read_text())
    assert report["mla_layers"] == chosen and len(chosen) == 2
    assert len(report["sensitivity"]) == N_LAYERS and report["n_tokens"] == 32
    scores = report["kl_guided_scores"] if method == "kl_guided" else report["sensitivity"]
    select = {"structured": structured_select, "topk": topk_select, "kl_guided": topk_select,
              "uniform": lambda s, n: uniform_select(len(s), n)}[method]
    assert chosen == select(scores, 2)
    assert (tmp_path / "smart" / "smart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"MLA layers: {chosen}" in capsys.readouterr().out


def test_run_smart_refuses_bad_arguments_before_scoring(models, tmp_path):
    teacher, mamba, mla = models
    with pytest.raises(ValueError, match="method"):
        run_smart(teacher, mamba, mla, calibration(1), 2, "best", tmp_path)
    with pytest.raises(ValueError, match="train_batches"):
        run_smart(teacher, mamba, mla, calibration(1), 2, "kl_guided", tmp_path)
    with pytest.raises(ValueError, match="train_batches"):
        run_smart(teacher, mamba, mla, calibration(1), 2, "topk", tmp_path, train_batches=calibration(1))
    with pytest.raises(ValueError, match="n_mla"):
        run_smart(teacher, mamba, mla, calibration(1), N_LAYERS + 1, "topk", tmp_path)
