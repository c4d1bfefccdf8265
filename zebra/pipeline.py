"""The Zebra pipeline: init -> ild -> smart -> kd -> dpo -> eval, as a run config lists it.

    init   load the teacher; build the all-MLA student (SVD init) and the all-Mamba2 student
           (attention reinterpretation), both full depth; save them as HF directories
    ild    per student: every layer i reads the teacher's hidden state i (teacher forcing, all
           layers in one pass) and is pulled towards the teacher's block and mixer outputs
           (losses.ild_loss, plus the final-norm output as the official code adds)
    smart  choose the MLA layers (smart.run_smart), or take the config's fixed `mla_layers`
    kd     stitch the hybrid from whole ILD layers, then end-to-end KD from the frozen teacher:
           kl_weight T^2 KL(teacher || student) + ce_weight CE (losses.kd_loss, chunked)
    dpo    sigmoid DPO against a frozen copy of the KD result (reference log-probs, no grad)
    eval   zero-shot tasks and perplexity of the teacher and the final student (zebra.eval)

Every stage writes `runs/<name>/<stage>/` and a `DONE` file last. A stage with DONE is
skipped; an interrupted one resumes from its newest complete checkpoint (zebra.trainer), with
the same data order and RNG. The ILD data are the first `ild_fraction` of the shuffled SFT
rows and the KD data the rest, as the official runs split them (OFFICIAL.md section 4).

One code path for 1 or N processes: zebra.dist makes a process group (a one-rank group without
torchrun) and FSDP2-shards the trained model and the frozen teacher.
"""

import copy
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from zebra import data as zdata
from zebra.config import from_dict, load_yaml
from zebra.dist import barrier, export_hf, init_distributed, print0, shard_model, shard_teacher
from zebra.hub import load_llama, resolve_model_dir
from zebra.hybrid import StudentSpec, build_student, from_pretrained, save_pretrained, stitch
from zebra.init import energy_ranks
from zebra.losses import dpo_loss, ild_loss, kd_loss, sequence_logprobs
from zebra.trainer import TrainConfig, train

STAGES = ("init", "ild", "smart", "kd", "dpo", "eval")
DATA_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet")


@dataclass
class DataSpec:
    sft: list[str]  # chat / instruction / text sources for ILD and KD: files, or hub names ("name@split")
    preference: list[str] = field(default_factory=list)  # DPO pairs, same forms
    seq_len: int = 2048
    ild_fraction: float = 0.2  # first share of the shuffled SFT rows for ILD, the rest for KD
    assistant_only: bool = True  # KD loss on assistant tokens only; False = official (every token)
    max_length: int = 1024  # DPO pair length (prompt + response)
    max_prompt_length: int = 512


@dataclass
class ILDStage:
    train: TrainConfig
    trainable: str = "all"  # "all" (official Zebra) or "mixers" (MambaInLlama: freeze MLPs, norms)


@dataclass
class SmartStage:
    method: str = "structured"  # structured | topk | uniform | kl_guided
    calib_sequences: int = 64  # sequences of the KD data for the sensitivity scores
    kl_guided_lr: float = 1e-4


@dataclass
class KDStage:
    train: TrainConfig
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    reduction: str = "token"  # "sequence" = official per-sequence sum (losses.kd_loss)
    chunk_size: int = 1024
    init_from: str | None = None  # an existing hybrid directory instead of the stitch (official with_distill)


@dataclass
class DPOStage:
    train: TrainConfig
    beta: float = 0.01
    init_from: str | None = None  # the policy's directory (default: this run's kd/model)


@dataclass
class EvalStage:
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy"])
    data_dir: str | None = None  # local task files; None = datasets hub names
    limit: int | None = None
    ppl: list[str] = field(default_factory=list)
    batch_size: int = 16


@dataclass
class RunConfig:
    name: str
    teacher: str  # base model: init and ILD teacher (HF dir, hub name or named source)
    student: StudentSpec
    kd_teacher: str | None = None  # end-to-end KD teacher (default: teacher); same vocabulary
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    data: DataSpec | None = None
    ild: ILDStage | None = None
    smart: SmartStage = field(default_factory=SmartStage)
    kd: KDStage | None = None
    dpo: DPOStage | None = None
    eval: EvalStage = field(default_factory=EvalStage)
    seed: int = 42
    runs_dir: str = "runs"

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage {unknown[0]!r}; expected a list from {STAGES}")
        for stage in ("ild", "kd", "dpo"):
            if stage in self.stages and getattr(self, stage) is None:
                raise ValueError(f"stages lists {stage!r} but the config has no '{stage}:' section")
        if set(self.stages) & {"ild", "smart", "kd", "dpo"} and self.data is None:
            raise ValueError("training stages need a 'data:' section (data.sft at least)")
        if "dpo" in self.stages and not self.data.preference:
            raise ValueError("stage 'dpo' needs data.preference sources")
        if self.smart.method not in ("structured", "topk", "uniform", "kl_guided"):
            raise ValueError(f"smart.method {self.smart.method!r} is not one of structured, topk, uniform, kl_guided")
        if self.ild is not None and self.ild.trainable not in ("all", "mixers"):
            raise ValueError(f"ild.trainable must be 'all' or 'mixers', got {self.ild.trainable!r}")
        for name in ("sft", "preference"):
            for i, source in enumerate(getattr(self.data, name) if self.data else []):
                if source.endswith(DATA_SUFFIXES) and not Path(source).is_file():
                    raise FileNotFoundError(f"data.{name}[{i}]: no such file {source}")


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run config; `overrides` are "a.b=value" strings (YAML values) applied first."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        node, *parts = raw, *key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return from_dict(RunConfig, raw, where=str(path))


# ---------------------------------------------------------------------------------------
# Running


class Run:
    """What the stages share: config, directories, process group, lazily loaded teacher/data."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dir = Path(cfg.runs_dir) / cfg.name
        self.info = init_distributed()
        self.device = self.info.device
        self.teacher_dir = resolve_model_dir(cfg.teacher)
        self._teacher = self._samples = None

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "DONE").is_file()

    def mark_done(self, stage: str, info: dict | None = None):
        if self.info.is_main:
            path = self.stage_dir(stage) / "DONE"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(info or {}, indent=1) + "\n")
        barrier()

    def teacher(self):
        """The base teacher (fp32 on CPU), loaded once; its tokenizer rides along."""
        if self._teacher is None:
            self._teacher = load_llama(self.teacher_dir)
        return self._teacher

    def sft_samples(self) -> tuple[list, list]:
        """(ILD samples, KD samples): one seeded shuffle of all SFT rows, split by ild_fraction."""
        if self._samples is None:
            _, tok = self.teacher()
            d = self.cfg.data
            samples = []
            for src in d.sft:
                name, split = source_split(src)
                samples += zdata.load_sft(name, tok, assistant_only=d.assistant_only, split=split)
            order = np.random.default_rng(self.cfg.seed).permutation(len(samples))
            cut = round(d.ild_fraction * len(samples))
            self._samples = [samples[i] for i in order[:cut]], [samples[i] for i in order[cut:]]
        return self._samples

    def packed(self, samples, batch_size: int) -> zdata.PackedBatches:
        _, tok = self.teacher()
        return zdata.PackedBatches(samples, self.cfg.data.seq_len, batch_size, tok.eos_token_id, self.cfg.seed,
                                   self.info.rank, self.info.world_size)

    def frozen(self, model, train: TrainConfig):
        """A frozen copy on this rank's device, sharded like the students."""
        return shard_teacher(copy.deepcopy(model).to(self.device), bf16(train))

    def export(self, model, path: Path):
        """Write the trained model as an HF directory (tokenizer from the teacher)."""
        def write(tmp: Path, state: dict):
            from zebra.hub import write_model_dir
            write_model_dir(tmp, model.config.to_dict(), state, self.teacher_dir)
        export_hf(model, path, write)


def source_split(source: str) -> tuple[str, str]:
    """"name@split" -> (name, split); a hub dataset without "@" reads its "train" split."""
    name, _, split = source.partition("@")
    return name, split or "train"


def bf16(train: TrainConfig) -> bool:
    """bf16 compute with fp32 master weights (zebra.dist); only on GPU."""
    return train.dtype == "bfloat16"


def full_weight(w: torch.Tensor) -> torch.Tensor:
    """A frozen model's (resharded) weight as one tensor."""
    return w.full_tensor() if isinstance(w, DTensor) else w


def stage_init(run: Run):
    teacher, _ = run.teacher()
    spec, out = run.cfg.student, run.stage_dir("init")
    ranks = energy_ranks(teacher, spec.q_energy, spec.kv_energy, spec.q_rank, spec.kv_rank) if spec.q_energy else None
    calib = None
    if spec.mla_init == "preserve":  # fit each MLA layer on ~2k tokens of real inputs (zebra.init)
        ild, _ = run.sft_samples()
        calib = next(run.packed(ild, max(1, 2048 // run.cfg.data.seq_len)))["input_ids"]
    if run.info.is_main:
        for kind in ("mla", "mamba2"):
            student = build_student(teacher, kind, spec.q_rank, spec.kv_rank, spec.d_rope, spec.mla_init,
                                    spec.rope_pairs, ranks, calib, seed=run.cfg.seed)
            save_pretrained(student, out / kind, run.teacher_dir)
            print0(f"init: {kind} student -> {out / kind}")
    run.mark_done("init")


def ild_loss_fn(teacher):
    def loss_fn(student, batch):
        ids = batch["input_ids"]
        with torch.no_grad():
            t_hs = []
            t_final = teacher(ids, hidden_states=t_hs, return_hidden=True)
        s_hs = []
        s_final = student(ids, hidden_states=s_hs, return_hidden=True, layer_inputs=[x for x, _, _ in t_hs])
        loss = ild_loss([o for _, o, _ in s_hs] + [s_final], [o for _, o, _ in t_hs] + [t_final],
                        [m for _, _, m in s_hs], [m for _, _, m in t_hs])
        return loss, {}
    return loss_fn


def stage_ild(run: Run):
    teacher, _ = run.teacher()
    frozen_teacher = run.frozen(teacher, run.cfg.ild.train)
    ild_samples, _ = run.sft_samples()
    stage = run.cfg.ild
    for kind in ("mla", "mamba2"):
        out = run.stage_dir("ild") / kind
        if (out / "model" / "config.json").is_file():
            continue
        student = from_pretrained(run.stage_dir("init") / kind)
        if stage.trainable == "mixers":
            for name, p in student.named_parameters():
                p.requires_grad_(".mixer." in name)
        student = shard_model(student.to(run.device), bf16(stage.train))
        batches = run.packed(ild_samples, stage.train.batch_size)
        train(student, ild_loss_fn(frozen_teacher), batches, stage.train, out, stage=f"ild-{kind}")
        run.export(student, out / "model")
        print0(f"ild: {kind} student -> {out / 'model'}")
    run.mark_done("ild")


def mla_layers(run: Run) -> list[int]:
    """The fixed list of the config, or the smart stage's choice."""
    spec = run.cfg.student
    if spec.mla_layers is not None:
        return spec.mla_layers
    path = run.stage_dir("smart") / "smart.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the smart stage (student.n_mla/kv_budget given)")
    return json.loads(path.read_text())["mla_layers"]


def stage_smart(run: Run):
    from zebra.smart import n_mla_for_kv_budget, run_smart

    spec, out = run.cfg.student, run.stage_dir("smart")
    if spec.mla_layers is not None:
        print0(f"smart: fixed mla_layers {spec.mla_layers} from the config")
        run.mark_done("smart", {"mla_layers": spec.mla_layers})
        return
    teacher, _ = run.teacher()
    mamba = from_pretrained(run.stage_dir("ild") / "mamba2" / "model", run.device)
    mla = from_pretrained(run.stage_dir("ild") / "mla" / "model", run.device)
    n_mla = spec.n_mla
    if n_mla is None:
        per_layer = mla.config.layers[0].kv_values_per_token()
        n_mla = n_mla_for_kv_budget(spec.kv_budget, teacher.config, per_layer)
    _, kd_samples = run.sft_samples()
    calib = zdata.PackedBatches(kd_samples, run.cfg.data.seq_len, 1, run.teacher()[1].eos_token_id, run.cfg.seed)
    batches = [next(calib)["input_ids"].to(run.device) for _ in range(run.cfg.smart.calib_sequences)]
    train_batches = None
    if run.cfg.smart.method == "kl_guided":  # its short per-layer training runs read these
        train_batches = [next(calib)["input_ids"].to(run.device) for _ in range(run.cfg.smart.calib_sequences)]
    if run.info.is_main:
        chosen = run_smart(teacher.to(run.device), mamba, mla, batches, n_mla, run.cfg.smart.method, out,
                           train_batches=train_batches, lr=run.cfg.smart.kl_guided_lr)
        teacher.to("cpu")
        print0(f"smart: MLA layers {chosen}")
    run.mark_done("smart", {"mla_layers": json.loads((out / "smart.json").read_text())["mla_layers"]})


def kd_loss_fn(teacher, stage: KDStage):
    def loss_fn(student, batch):
        with torch.no_grad():
            t_hidden = teacher(batch["input_ids"], return_hidden=True)
        s_hidden = student(batch["input_ids"], return_hidden=True)
        out = kd_loss(s_hidden, t_hidden, student.lm_head.weight, full_weight(teacher.lm_head.weight),
                      batch["targets"], batch["loss_mask"], stage.temperature, stage.kl_weight, stage.ce_weight,
                      stage.reduction, stage.chunk_size)
        return out.loss, {"kl": out.kl.item(), "ce": out.ce.item()}
    return loss_fn


def stage_kd(run: Run):
    teacher, _ = run.teacher()
    if run.cfg.kd.init_from:
        hybrid = from_pretrained(run.cfg.kd.init_from)
    else:
        plan = run.cfg.student.plan(teacher.config.num_hidden_layers, mla_layers(run))
        ild = run.stage_dir("ild")
        mla = from_pretrained(ild / "mla" / "model") if "mla" in plan else None
        mamba = from_pretrained(ild / "mamba2" / "model") if "mamba2" in plan else None
        hybrid = stitch(plan, mla, mamba, teacher)
    kd_teacher = teacher
    if run.cfg.kd_teacher:
        kd_teacher, _ = load_llama(run.cfg.kd_teacher)
        if kd_teacher.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"kd_teacher vocab {kd_teacher.config.vocab_size} != student vocab "
                             f"{teacher.config.vocab_size}")
    _, kd_samples = run.sft_samples()
    stage, out = run.cfg.kd, run.stage_dir("kd")
    student = shard_model(hybrid.to(run.device), bf16(stage.train))
    train(student, kd_loss_fn(run.frozen(kd_teacher, stage.train), stage), run.packed(kd_samples, stage.train.batch_size),
          stage.train, out, stage="kd")
    run.export(student, out / "model")
    run.mark_done("kd", {"plan": hybrid.config.plan})


def dpo_loss_fn(reference, beta: float):
    def logps(model, batch):
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
        mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
        return sequence_logprobs(model(ids), targets, mask).chunk(2)

    def loss_fn(policy, batch):
        with torch.no_grad():
            ref_chosen, ref_rejected = logps(reference, batch)
        chosen, rejected = logps(policy, batch)
        out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        return out.loss, {"reward_acc": out.accuracy.item(), "margin": out.margin.item(),
                          "chosen_reward": out.chosen_rewards.mean().item(),
                          "rejected_reward": out.rejected_rewards.mean().item()}
    return loss_fn


def stage_dpo(run: Run):
    _, tok = run.teacher()
    d, stage, out = run.cfg.data, run.cfg.dpo, run.stage_dir("dpo")
    pairs = []
    for src in d.preference:
        name, split = source_split(src)
        pairs += zdata.load_pairs(name, tok, d.max_length, d.max_prompt_length, split=split)
    policy = from_pretrained(stage.init_from or run.stage_dir("kd") / "model")
    reference = run.frozen(policy, stage.train)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = zdata.PairBatches(pairs, stage.train.batch_size, pad, run.cfg.seed, run.info.rank, run.info.world_size)
    policy = shard_model(policy.to(run.device), bf16(stage.train))
    train(policy, dpo_loss_fn(reference, stage.beta), batches, stage.train, out, stage="dpo")
    run.export(policy, out / "model")
    run.mark_done("dpo")


def final_student(run: Run) -> Path:
    for stage in ("dpo", "kd"):
        if (run.stage_dir(stage) / "model" / "config.json").is_file():
            return run.stage_dir(stage) / "model"
    raise FileNotFoundError(f"no trained student under {run.dir} (kd/model or dpo/model)")


def stage_eval(run: Run):
    from zebra.eval.main import main as eval_main

    ev, out = run.cfg.eval, run.stage_dir("eval")
    if run.info.is_main:
        argv = ["--model", str(run.teacher_dir), "--model", str(final_student(run)), "--tasks", ",".join(ev.tasks),
                "--batch-size", str(ev.batch_size), "--out", str(out), "--kv-contexts", "4096",
                "--device", str(run.device)]
        argv += ["--data-dir", ev.data_dir] if ev.data_dir else []
        argv += ["--limit", str(ev.limit)] if ev.limit else []
        for spec in ev.ppl:
            argv += ["--ppl", spec]
        eval_main(argv)
    run.mark_done("eval")


RUNNERS = {"init": stage_init, "ild": stage_ild, "smart": stage_smart, "kd": stage_kd, "dpo": stage_dpo,
           "eval": stage_eval}


def run_pipeline(cfg: RunConfig, only: list[str] | None = None, restart: bool = False):
    """Run the config's stages in order (or `only` those), skipping finished ones."""
    run = Run(cfg)
    stages = only or cfg.stages
    if set(stages) & {"init", "ild", "smart", "kd"} and not all(run.done(s) for s in stages):
        run.sft_samples()  # a bad file, row or schema fails here, before any heavy work
    if run.info.is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
        (run.dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    for stage in stages:
        if restart and run.info.is_main and run.stage_dir(stage).exists():
            shutil.rmtree(run.stage_dir(stage))
        barrier()
        if run.done(stage):
            print0(f"{stage}: done already ({run.stage_dir(stage)}), skipped")
            continue
        print0(f"== {stage} ==")
        RUNNERS[stage](run)
    return run

