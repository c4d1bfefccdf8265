"""The whole pipeline on a tiny random teacher with the real tokenizer, and fail-fast configs."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from zebra.config import LlamaConfig
from zebra.hub import TOKENIZER_FILES, resolve_model_dir, write_model_dir
from zebra.llama import LlamaForCausalLM
from zebra.pipeline import load_config, run_pipeline

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    """A 4-layer random Llama with SmolLM2's tokenizer (so the real data and chat template work)."""
    real = resolve_model_dir("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e5,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    return write_model_dir(path, cfg.to_dict(), model.state_dict(), tokenizer_dir=real)


def config_dict(teacher: Path, runs: Path) -> dict:
    step = lambda lr: {"max_steps": 2, "lr": lr, "batch_size": 2, "ckpt_interval": 1}  # noqa: E731
    return {
        "name": "tiny", "teacher": str(teacher), "runs_dir": str(runs),
        "student": {"n_mla": 2, "kv_rank": 8, "d_rope": 4, "mla_init": "preserve"},
        "data": {"sft": [str(ROOT / "data/self_instruct_seed/seed_tasks.instruction.jsonl.gz")],
                 "preference": [str(ROOT / "data/hh_rlhf/helpful-base_test.pairs500.jsonl.gz")],
                 "seq_len": 32, "max_length": 64, "max_prompt_length": 32},
        "ild": {"train": step(1e-3)}, "smart": {"calib_sequences": 2},
        "kd": {"train": step(1e-3)}, "dpo": {"train": step(1e-5)},
        "eval": {"tasks": ["piqa"], "data_dir": str(ROOT / "tests/data/eval"), "limit": 4, "batch_size": 4},
    }


def write_config(tmp_path, d: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.slow
def test_whole_pipeline_runs_and_skips_finished_stages(tmp_path, tiny_teacher_dir, capsys):
    cfg = load_config(write_config(tmp_path, config_dict(tiny_teacher_dir, tmp_path / "runs")))
    run = run_pipeline(cfg)
    for stage in ("init", "ild", "smart", "kd", "dpo", "eval"):
        assert (run.dir / stage / "DONE").is_file(), stage
    smart = json.loads((run.dir / "smart" / "smart.json").read_text())
    assert smart["mla_layers"] == [0, 2]  # structured rule with anchors 0 and L-2
    plan = json.loads((run.dir / "kd" / "DONE").read_text())["plan"]
    assert plan == ["mla", "mamba2", "mla", "mamba2"]
    assert json.loads((run.dir / "dpo" / "model" / "config.json").read_text())["model_type"] == "zebra"
    for stage in ("ild/mla", "ild/mamba2", "kd", "dpo"):
        rows = [json.loads(x) for x in (run.dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    capsys.readouterr()
    run_pipeline(cfg)  # everything finished: every stage is skipped
    assert capsys.readouterr().out.count("skipped") == 6


def test_bad_configs_fail_before_any_work(tmp_path, tiny_teacher_dir):
    good = config_dict(tiny_teacher_dir, tmp_path / "runs")
    cases = [
        ({**good, "lr": 1.0}, "unknown key 'lr'"),
        ({**good, "kd": {"train": {"max_steps": 2, "lr": 1e-3, "betas": [0.9]}}}, "betas"),
        ({**good, "kd": {"train": {"max_steps": 2, "lr": 1e-3, "warmup": 3}}}, "unknown key 'kd.train.warmup'"),
        ({**good, "stages": ["init", "distil"]}, "unknown stage 'distil'"),
        ({**good, "student": {"kv_rank": 8}}, "exactly one of mla_layers, n_mla, kv_budget"),
        ({**good, "data": {**good["data"], "sft": ["data/nope.jsonl"]}}, r"data.sft\[0\]: no such file"),
        ({k: v for k, v in good.items() if k != "kd"}, "no 'kd:' section"),
    ]
    for d, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_config(write_config(tmp_path, d))
    with pytest.raises(ValueError, match="unknown key 'kd.train.lrr'"):
        load_config(write_config(tmp_path, good), ["kd.train.lrr=1"])


def test_wrong_schema_fails_before_the_init_stage(tmp_path, tiny_teacher_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    d = config_dict(tiny_teacher_dir, tmp_path / "runs")
    d["data"]["sft"] = [str(bad)]
    with pytest.raises(ValueError, match="bad.jsonl"):
        run_pipeline(load_config(write_config(tmp_path, d)))
    assert not (tmp_path / "runs" / "tiny" / "init").exists()


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=100.0)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def fit(model, loss_fn, steps=30, lr=3e-3):
    """Plain AdamW on one fixed batch; returns (first loss, last loss)."""
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (4, 24))
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize("kind", ["mla", "mamba2"])
def test_ild_loss_of_the_stage_falls(kind):
    from zebra.hybrid import build_student
    from zebra.pipeline import ild_loss_fn

    teacher = tiny_llama()
    student = build_student(teacher, kind, kv_rank=8, d_rope=4, mla_init="official").train()
    first, last = fit(student, ild_loss_fn(teacher))
    assert last < 0.5 * first, (first, last)


def test_kd_loss_of_the_stage_falls():
    from zebra.hybrid import build_student, stitch
    from zebra.pipeline import KDStage, kd_loss_fn
    from zebra.trainer import TrainConfig

    teacher = tiny_llama()
    mla = build_student(teacher, "mla", kv_rank=8, d_rope=4, mla_init="official")
    hybrid = stitch(["mla", "mamba2"], mla, build_student(teacher, "mamba2"), teacher).train()
    stage = KDStage(train=TrainConfig(max_steps=1, lr=1e-3), chunk_size=16)
    first, last = fit(hybrid, kd_loss_fn(teacher, stage))
    assert last < 0.5 * first, (first, last)
