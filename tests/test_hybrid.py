"""The hybrid: exactness of the all-MLA student, decoding with mixed caches, save/load, paper shapes."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from zebra.config import LlamaConfig, from_dict
from zebra.hybrid import (StudentSpec, ZebraForCausalLM, build_student, cache_report, from_pretrained,
                          save_pretrained, stitch, student_config)
from zebra.llama import LlamaForCausalLM

CONFIGS = Path(__file__).parent.parent / "configs"


def tiny_teacher(kv_heads=2, seed=0, tied=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, rope_theta=100.0,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def tiny_hybrid(tied=True):
    teacher = tiny_teacher(tied=tied)
    mla = build_student(teacher, "mla", q_rank=32, kv_rank=24, d_rope=8, mla_init="official")
    mamba = build_student(teacher, "mamba2", seed=1)
    for student in (mla, mamba):  # mixers only ever seen through ILD: perturb so nothing is accidentally exact
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return teacher, stitch(["mla", "mamba2", "attention", "mamba2"], mla, mamba, teacher).eval()


def test_all_mla_full_rank_reproduces_mqa_teacher():
    teacher = tiny_teacher(kv_heads=1)
    d = teacher.config.head_dim
    # preserve mode, every rotate-half pair kept (d_rope = d), full-rank query and kv latent
    student = build_student(teacher, "mla", q_rank=0, kv_rank=d, d_rope=d, mla_init="preserve").eval()
    ids = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        diff = (student(ids) - teacher(ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_stitch_takes_whole_layers_and_teacher_ends():
    teacher, hybrid = tiny_hybrid()
    assert hybrid.config.plan == ["mla", "mamba2", "attention", "mamba2"]
    t_layer, h_layer = teacher.model.layers[2], hybrid.model.layers[2]
    assert torch.equal(h_layer.mixer.q_proj.weight, t_layer.self_attn.q_proj.weight)
    assert torch.equal(hybrid.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert hybrid.lm_head.weight is hybrid.model.embed_tokens.weight  # still tied


def test_incremental_decode_with_left_padding_equals_full_forward():
    _, model = tiny_hybrid()
    rows = [torch.randint(1, 61, (n,)) for n in (4, 9)]
    nxt = torch.randint(1, 61, (2, 4))
    pad = torch.tensor([5, 0])
    batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), rows[0]]), rows[1]])
    with torch.no_grad():
        cache = model.new_cache(2, 16, left_pad=pad)
        out = torch.cat([model(batch, cache)[:, -1:]] + [model(nxt[:, t:t + 1], cache) for t in range(4)], 1)
        for b, row in enumerate(rows):
            alone = model(torch.cat([row, nxt[b]])[None])[0, len(row) - 1:]
            diff = (out[b] - alone).abs().max().item()
            assert diff <= 1e-4, f"row {b}: {diff}"


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, tied):
    _, model = tiny_hybrid(tied)
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "zebra"


def test_bad_directories_fail_clearly(tmp_path):
    _, model = tiny_hybrid()
    path = save_pretrained(model, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    for broken, message in [
        ({**cfg, "zebra_layers": cfg["zebra_layers"][:3]}, "3 layer configs"),
        ({**cfg, "zebra_layers": [{"kind": "gru"}] + cfg["zebra_layers"][1:]}, r"zebra_layers\[0\].kind"),
        ({k: v for k, v in cfg.items() if k != "zebra_layers"}, "zebra_layers"),
        ({**cfg, "model_type": "llama"}, "model_type"),
    ]:
        (path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            from_pretrained(path)
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "absent")


# The paper's table (PAPER.md sections 2 and 8): KV size in % of the teacher and released params (B).
PAPER = {
    "llama-3.2-1b-8mla8m2": (7.81, 1.27), "llama-3.2-1b-4mla12m2": (3.91, 1.28),
    "llama-3.2-3b-14mla14m2": (4.69, 3.27), "llama-3.2-3b-6mla22m2": (2.01, 3.39),
    "llama-3.1-8b-16mla16m2": (5.47, 8.19), "llama-3.1-8b-8mla24m2": (2.73, 8.38),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_shapes_kv_percent_and_params(name):
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    spec = from_dict(StudentSpec, raw["student"], where=name)
    base = LlamaConfig.from_json(CONFIGS / "shapes" / f"{name.rsplit('-', 1)[0]}.json")
    config = student_config(base, spec.plan(base.num_hidden_layers), spec.q_rank, spec.kv_rank, spec.d_rope)
    with torch.device("meta"):
        model = ZebraForCausalLM(config)
    kv, params = PAPER[name]
    assert round(cache_report(config, seq_len=1)["kv_percent"], 2) == kv
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(n - params) <= 0.01, f"{n:.4f}B vs released {params}B"


def test_student_spec_errors():
    with pytest.raises(ValueError, match="exactly one"):
        StudentSpec(mla_layers=[0], n_mla=2)
    with pytest.raises(ValueError, match="mla_init"):
        StudentSpec(n_mla=2, mla_init="svd")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        StudentSpec(mla_layers=[0, 4]).plan(4)


@pytest.mark.slow
def test_default_teacher_into_hybrid_gives_finite_logits(teacher_dir):
    from zebra.hub import load_llama

    teacher, tok = load_llama(teacher_dir)
    plan = ["mla" if i in (0, 5, 10, 16, 21, 27) else "mamba2" for i in range(30)]
    mla = build_student(teacher, "mla", q_rank=0, kv_rank=64, d_rope=32, mla_init="preserve")
    mamba = build_student(teacher, "mamba2")
    hybrid = stitch(plan, mla, mamba, teacher).eval()
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        logits = hybrid(ids)
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    report = cache_report(hybrid.config, seq_len=4096)
    assert report["kv_bytes_per_token"] == 6 * 96 * 2 and round(report["kv_percent"], 2) == 5.0
