"""ZebraForCausalLM: the teacher's embeddings, MLPs, norms and lm_head around per-layer mixers.

Layer i (x: b l D), with mixer_i one of MLA, Mamba2 or the teacher's attention (`plan[i]`):
    h = x + mixer_i(RMSNorm(x))
    y = h + MLP_i(RMSNorm(h))

Students (OFFICIAL.md section 4). From a loaded Llama teacher:
    all-MLA student    = every attention replaced by MLA, SVD-initialised (init.mla_from_llama)
    all-Mamba2 student = every attention replaced by Mamba2, read as linear attention
                         (init.mamba2_from_llama)
    hybrid             = stitch(plan, mla_student, mamba_student, teacher): whole decoder layers
                         (mixer + MLP + norms) from the student of their kind, embeddings, final
                         norm and lm_head from the teacher.

KV cache per token (what grows with the context; PAPER.md section 2):
    teacher: L * 2 * Hk * d values;  hybrid: sum over MLA layers of (r_kv + d_rope)
             (+ 2 * Hk * d per kept attention layer).
Mamba2 layers keep a constant state per sequence: conv (channels x K) + SSM (H x P x N).

Saved as an HF-format directory: config.json (model_type "zebra", the base Llama shape and one
entry per layer: its kind and its mixer config), safetensors, the teacher's tokenizer files.
"""

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zebra.config import LlamaConfig
from zebra.init import mamba2_from_llama, mla_from_llama
from zebra.llama import Cache, KVCache, LlamaAttention, LlamaForCausalLM, LlamaMLP, RMSNorm, rope_cos_sin, \
    rope_frequencies
from zebra.mamba2 import Mamba2, Mamba2Config
from zebra.mla import MLAConfig, MLAttention

KINDS = ("mla", "mamba2", "attention")


@dataclass
class ZebraConfig:
    base: LlamaConfig  # the teacher's shape: embeddings, MLPs, norms, lm_head, kept attention layers
    layers: list[MLAConfig | Mamba2Config | None]  # one mixer config per layer; None = teacher attention

    def __post_init__(self):
        if len(self.layers) != self.base.num_hidden_layers:
            raise ValueError(f"ZebraConfig: {len(self.layers)} layer configs for "
                             f"num_hidden_layers={self.base.num_hidden_layers}")

    @property
    def plan(self) -> list[str]:
        return [kind_of(c) for c in self.layers]

    # what tools read from any model's config (generate, evaluate): the base model's values
    vocab_size = property(lambda self: self.base.vocab_size)
    num_hidden_layers = property(lambda self: self.base.num_hidden_layers)
    max_position_embeddings = property(lambda self: self.base.max_position_embeddings)
    bos_token_id = property(lambda self: self.base.bos_token_id)
    eos_token_id = property(lambda self: self.base.eos_token_id)

    def to_dict(self) -> dict:
        layers = []
        for c in self.layers:
            entry = {"kind": kind_of(c)}
            if c is not None:
                entry["config"] = dataclasses.asdict(c)
            layers.append(entry)
        base = self.base.to_dict()
        return {**base, "model_type": "zebra", "architectures": ["ZebraForCausalLM"], "base_model_type": "llama",
                "zebra_layers": layers}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ZebraConfig":
        if d.get("model_type") != "zebra":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'zebra'")
        if not isinstance(d.get("zebra_layers"), list):
            raise ValueError(f"{source}: missing field 'zebra_layers' (one entry per layer)")
        base = LlamaConfig.from_dict({**d, "model_type": "llama"}, source)
        layers = []
        for i, entry in enumerate(d["zebra_layers"]):
            kind = entry.get("kind") if isinstance(entry, dict) else None
            if kind not in KINDS:
                raise ValueError(f"{source}: zebra_layers[{i}].kind is {kind!r}, expected one of {KINDS}")
            if kind == "attention":
                layers.append(None)
                continue
            if "config" not in entry:
                raise ValueError(f"{source}: zebra_layers[{i}] ({kind}) lacks its 'config'")
            fields = dict(entry["config"])
            if kind == "mamba2" and "dt_limit" in fields:
                fields["dt_limit"] = tuple(fields["dt_limit"])
            try:
                layers.append((MLAConfig if kind == "mla" else Mamba2Config)(**fields))
            except TypeError as e:
                raise ValueError(f"{source}: zebra_layers[{i}].config: {e}") from None
        return cls(base, layers)


def kind_of(c) -> str:
    return "mla" if isinstance(c, MLAConfig) else "mamba2" if isinstance(c, Mamba2Config) else "attention"


@dataclass
class StudentSpec:
    """The `student:` section of a run config: which layers are MLA and how MLA is shaped.

    Exactly one of mla_layers (a fixed list), n_mla or kv_budget (% of the teacher's per-token
    KV cache; SMART then picks the layers) must be given. Every other layer is Mamba2, except
    `attention_layers`, which keep the teacher's attention."""

    mla_layers: list[int] | None = None
    n_mla: int | None = None
    kv_budget: float | None = None
    attention_layers: list[int] = dataclasses.field(default_factory=list)
    q_rank: int = 0  # 0 = full-rank query
    kv_rank: int = 64
    d_rope: int = 32
    mla_init: str = "preserve"  # "official" reproduces the released models' init
    rope_pairs: str = "high_freq"  # preserve only: "high_freq" or "norm"
    q_energy: float | None = None  # spectral-energy ranks per layer (first/last layer fixed)
    kv_energy: float | None = None

    def __post_init__(self):
        given = [k for k in ("mla_layers", "n_mla", "kv_budget") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"student: give exactly one of mla_layers, n_mla, kv_budget (got {given or 'none'})")
        if self.mla_init not in ("official", "preserve"):
            raise ValueError(f"student.mla_init must be 'official' or 'preserve', got {self.mla_init!r}")
        if self.rope_pairs not in ("high_freq", "norm"):
            raise ValueError(f"student.rope_pairs must be 'high_freq' or 'norm', got {self.rope_pairs!r}")
        if (self.q_energy is None) != (self.kv_energy is None):
            raise ValueError("student: q_energy and kv_energy go together")

    def plan(self, n_layers: int, mla_layers: list[int] | None = None) -> list[str]:
        """Layer kinds for a model of `n_layers`; `mla_layers` overrides (the SMART choice)."""
        mla = self.mla_layers if mla_layers is None else mla_layers
        if mla is None:
            raise ValueError("student: the MLA layers are not fixed yet (n_mla/kv_budget: run the smart stage)")
        for name, idx in (("mla_layers", mla), ("attention_layers", self.attention_layers)):
            bad = [i for i in idx if not 0 <= i < n_layers]
            if bad or len(set(idx)) != len(idx):
                raise ValueError(f"student.{name} must be distinct layer indices in [0, {n_layers}), got {idx}")
        if set(mla) & set(self.attention_layers):
            raise ValueError("student: a layer cannot be in both mla_layers and attention_layers")
        return ["mla" if i in mla else "attention" if i in self.attention_layers else "mamba2" for i in range(n_layers)]


def student_config(base: LlamaConfig, plan: list[str], q_rank: int, kv_rank: int, d_rope: int) -> ZebraConfig:
    """The shapes of a student with the official MLA layout (d_nope = d - d_rope, d_v = d) and
    Mamba2 sizes mirroring the attention: enough to count parameters and cache bytes."""
    d = base.head_dim
    mla = MLAConfig(hidden_size=base.hidden_size, n_heads=base.num_attention_heads, n_kv_heads=base.num_key_value_heads,
                    q_rank=q_rank, kv_rank=kv_rank, d_nope=d - d_rope, d_rope=d_rope, v_head_dim=d,
                    rope_theta=base.rope_theta, rms_norm_eps=base.rms_norm_eps)
    mamba = Mamba2Config.from_llama(base)
    table = {"mla": mla, "mamba2": mamba, "attention": None}
    bad = [k for k in plan if k not in table]
    if bad:
        raise ValueError(f"layer plan has unknown kind {bad[0]!r}; expected one of {KINDS}")
    return ZebraConfig(base, [table[k] for k in plan])


# ---------------------------------------------------------------------------------------
# The model


class ZebraDecoderLayer(nn.Module):
    def __init__(self, base: LlamaConfig, mixer_cfg):
        super().__init__()
        self.kind = kind_of(mixer_cfg)
        self.input_layernorm = RMSNorm(base.hidden_size, base.rms_norm_eps)
        if self.kind == "mla":
            self.mixer = MLAttention(mixer_cfg)
        elif self.kind == "mamba2":
            self.mixer = Mamba2(mixer_cfg)
        else:
            self.mixer = LlamaAttention(base)
        self.post_attention_layernorm = RMSNorm(base.hidden_size, base.rms_norm_eps)
        self.mlp = LlamaMLP(base)

    def forward(self, x, ctx: dict, cache=None):
        """Returns (block output, mixer output before the residual add); ILD uses both."""
        u = self.input_layernorm(x)
        if self.kind == "mla":
            m = self.mixer(u, ctx["positions"], cache, ctx["start"], ctx["mask"])
        elif self.kind == "mamba2":
            m = self.mixer(u, cache, ctx["real"])
        else:
            m = self.mixer(u, *ctx["cos_sin"], cache, ctx["start"], ctx["mask"])
        h = x + m
        return h + self.mlp(self.post_attention_layernorm(h)), m

    def new_cache(self, batch: int, max_len: int, dtype, device):
        if self.kind == "mla":
            return self.mixer.new_cache(batch, max_len, dtype, device)
        if self.kind == "mamba2":
            return self.mixer.new_cache(batch, dtype, device)
        a = self.mixer
        return KVCache(batch, max_len, a.n_kv_heads, a.head_dim, dtype, device)


class ZebraModel(nn.Module):
    def __init__(self, config: ZebraConfig):
        super().__init__()
        base = config.base
        self.embed_tokens = nn.Embedding(base.vocab_size, base.hidden_size)
        self.layers = nn.ModuleList(ZebraDecoderLayer(base, c) for c in config.layers)
        self.norm = RMSNorm(base.hidden_size, base.rms_norm_eps)
        inv_freq = rope_frequencies(base.head_dim, base.rope_theta, base.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # for kept attention layers

    def forward(self, input_ids, cache: Cache | None = None, hidden_states: list | None = None,
                layer_inputs: list | None = None):
        """input_ids (b l) -> final normed hidden states (b l D).

        `hidden_states`, if a list, receives each layer's (input, block output, mixer output).
        `layer_inputs` (ILD teacher forcing): layer i reads layer_inputs[i] (b l D) instead of
        the previous layer's output; the final norm reads the last layer's output."""
        b, l = input_ids.shape
        if cache is None:
            positions = torch.arange(l, device=input_ids.device).expand(b, l)
            ctx = dict(positions=positions, start=0, mask=None, real=None)
        else:
            ctx = cache.context(l)
        if any(layer.kind == "attention" for layer in self.layers):
            ctx["cos_sin"] = rope_cos_sin(self.inv_freq, ctx["positions"])
        x = self.embed_tokens(input_ids) if layer_inputs is None else None
        for i, layer in enumerate(self.layers):
            if layer_inputs is not None:
                x = layer_inputs[i]
            out, mixed = layer(x, ctx, None if cache is None else cache.layers[i])
            if hidden_states is not None:
                hidden_states.append((x, out, mixed))
            x = out
        if cache is not None:
            cache.advance(l)
        return self.norm(x)


class ZebraForCausalLM(nn.Module):
    def __init__(self, config: ZebraConfig):
        super().__init__()
        self.config = config
        self.model = ZebraModel(config)
        self.lm_head = nn.Linear(config.base.hidden_size, config.base.vocab_size, bias=False)
        if config.base.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, cache: Cache | None = None, hidden_states: list | None = None,
                return_hidden: bool = False, layer_inputs: list | None = None):
        """input_ids (b l) -> logits (b l V), or the final normed hidden states (b l D) with
        return_hidden. `hidden_states` and `layer_inputs`: see ZebraModel. Training calls go
        through this root forward so that FSDP2's hooks see them."""
        hidden = self.model(input_ids, cache, hidden_states, layer_inputs)
        return hidden if return_hidden else self.lm_head(hidden)

    def new_cache(self, batch: int, max_len: int, left_pad: torch.Tensor | None = None, dtype=None) -> Cache:
        p = self.lm_head.weight
        layers = [layer.new_cache(batch, max_len, dtype or p.dtype, p.device) for layer in self.model.layers]
        if left_pad is None:
            left_pad = torch.zeros(batch, dtype=torch.long, device=p.device)
        return Cache(layers, left_pad.to(p.device), max_len)


# ---------------------------------------------------------------------------------------
# Cache accounting


def cache_report(config: ZebraConfig, seq_len: int, batch: int = 1, dtype_bytes: int = 2) -> dict:
    """Per-token KV bytes, constant state bytes and the share of the teacher's KV cache.

    `kv_percent` is the paper's KV size: per-token cache of the student over the teacher's
    (Mamba2 states do not grow with the context and are not counted there)."""
    base = config.base
    attention_values = 2 * base.num_key_value_heads * base.head_dim
    teacher_values = base.num_hidden_layers * attention_values
    student_values, state_bytes = 0, 0
    for c in config.layers:
        if isinstance(c, MLAConfig):
            student_values += c.kv_values_per_token()
        elif isinstance(c, Mamba2Config):
            state_bytes += c.state_bytes_per_sequence(dtype_bytes)
        else:
            student_values += attention_values
    return {
        "seq_len": seq_len, "batch": batch, "dtype_bytes": dtype_bytes,
        "teacher_kv_bytes_per_token": teacher_values * dtype_bytes,
        "kv_bytes_per_token": student_values * dtype_bytes,
        "state_bytes_per_sequence": state_bytes,
        "kv_percent": 100.0 * student_values / teacher_values,
        "teacher_total_bytes": teacher_values * dtype_bytes * seq_len * batch,
        "total_bytes": (student_values * dtype_bytes * seq_len + state_bytes) * batch,
    }


# ---------------------------------------------------------------------------------------
# Students from a teacher, and the stitch


@torch.no_grad()
def build_student(teacher: LlamaForCausalLM, kind: str, q_rank: int = 0, kv_rank: int = 64, d_rope: int = 32,
                  mla_init: str = "official", rope_pairs: str = "high_freq", ranks: list[tuple[int, int]] | None = None,
                  calib_ids: torch.Tensor | None = None, seed: int = 0) -> "ZebraForCausalLM":
    """A full-depth student of one kind ("mla" or "mamba2") initialised from `teacher`.

    ranks: per-layer (r_q, r_kv) overriding q_rank/kv_rank (e.g. init.energy_ranks).
    calib_ids (b l), preserve mode only: calibration tokens; each MLA fit is then weighted by its
    layer's normed inputs on them (and rope_pairs="norm" picks pairs by them)."""
    if kind not in ("mla", "mamba2"):
        raise ValueError(f"student kind must be 'mla' or 'mamba2', got {kind!r}")
    base, L = teacher.config, teacher.config.num_hidden_layers
    layer_inputs = [None] * L
    if kind == "mla" and mla_init == "preserve" and calib_ids is not None:
        hs = []
        teacher.model(calib_ids, hidden_states=hs)
        layer_inputs = [teacher.model.layers[i].input_layernorm(x).flatten(0, 1) for i, (x, _, _) in enumerate(hs)]
    generator = torch.Generator().manual_seed(seed)
    mixers = []
    for i, layer in enumerate(teacher.model.layers):
        if kind == "mla":
            r_q, r_kv = ranks[i] if ranks else (q_rank, kv_rank)
            mixers.append(mla_from_llama(layer.self_attn, base, r_q, r_kv, d_rope, mla_init, rope_pairs,
                                         layer_inputs[i]))
        else:
            mixers.append(mamba2_from_llama(layer.self_attn, base, generator))
    config = ZebraConfig(base, [m.cfg for m in mixers])
    with torch.device("meta"):
        student = ZebraForCausalLM(config)
    for i, (layer, mixer) in enumerate(zip(student.model.layers, mixers)):
        t = teacher.model.layers[i]
        layer.mixer = mixer
        layer.input_layernorm = copy.deepcopy(t.input_layernorm)
        layer.post_attention_layernorm = copy.deepcopy(t.post_attention_layernorm)
        layer.mlp = copy.deepcopy(t.mlp)
    _take_ends(student, teacher)
    return student


@torch.no_grad()
def stitch(plan: list[str], mla_student: ZebraForCausalLM, mamba_student: ZebraForCausalLM,
           teacher: LlamaForCausalLM) -> ZebraForCausalLM:
    """The hybrid: layer i is the whole decoder layer i of the student of kind plan[i] ("attention"
    keeps the teacher's layer); embeddings, final norm and lm_head from the teacher."""
    L = teacher.config.num_hidden_layers
    if len(plan) != L or any(k not in KINDS for k in plan):
        raise ValueError(f"plan must list {L} kinds from {KINDS}, got {plan}")
    source = {"mla": mla_student, "mamba2": mamba_student}
    for kind, student in source.items():
        if kind in plan and student.config.plan != [kind] * L:
            raise ValueError(f"the {kind} student must be all-{kind}, its plan is {student.config.plan}")
    layers = [None if k == "attention" else source[k].config.layers[i] for i, k in enumerate(plan)]
    with torch.device("meta"):
        hybrid = ZebraForCausalLM(ZebraConfig(teacher.config, layers))
    for i, kind in enumerate(plan):
        if kind == "attention":
            t = teacher.model.layers[i]
            layer = hybrid.model.layers[i]
            layer.mixer = copy.deepcopy(t.self_attn)
            layer.input_layernorm = copy.deepcopy(t.input_layernorm)
            layer.post_attention_layernorm = copy.deepcopy(t.post_attention_layernorm)
            layer.mlp = copy.deepcopy(t.mlp)
        else:
            hybrid.model.layers[i] = copy.deepcopy(source[kind].model.layers[i])
    _take_ends(hybrid, teacher)
    return hybrid


def _take_ends(student: ZebraForCausalLM, teacher: LlamaForCausalLM):
    """Embeddings, final norm, lm_head (tied or not) and the RoPE buffer from the teacher."""
    student.model.embed_tokens = copy.deepcopy(teacher.model.embed_tokens)
    student.model.norm = copy.deepcopy(teacher.model.norm)
    if teacher.config.tie_word_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    else:
        student.lm_head = copy.deepcopy(teacher.lm_head)
    student.model.register_buffer("inv_freq", teacher.model.inv_freq.clone(), persistent=False)


# ---------------------------------------------------------------------------------------
# HF-format directories


def save_pretrained(model: ZebraForCausalLM, path: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """config.json (model_type "zebra"), safetensors and the teacher's tokenizer files, atomically."""
    from zebra.hub import write_model_dir

    return write_model_dir(path, model.config.to_dict(), model.state_dict(), tokenizer_dir)


def from_pretrained(path: str | Path, device="cpu", dtype=torch.float32) -> ZebraForCausalLM:
    """Load a directory written by save_pretrained: it needs nothing but the directory."""
    from zebra.hub import check_state_dict, read_model_dir

    config_dict, state_dict = read_model_dir(path)
    config = ZebraConfig.from_dict(config_dict, source=str(Path(path) / "config.json"))
    with torch.device("meta"):
        model = ZebraForCausalLM(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if config.base.tie_word_embeddings:
        del expected["lm_head.weight"]
        state_dict.pop("lm_head.weight", None)
    check_state_dict(expected, state_dict, str(path))
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()},
                          strict=False, assign=True)
    if config.base.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _restore_buffers(model, device)
    return model.eval()


def _restore_buffers(model: ZebraForCausalLM, device):
    """RoPE frequencies are not stored: recompute them (the model was built on the meta device)."""
    base = model.config.base
    model.model.register_buffer("inv_freq", rope_frequencies(base.head_dim, base.rope_theta, base.rope_scaling)
                                .to(device), persistent=False)
    for layer in model.model.layers:
        if layer.kind == "mla":
            layer.mixer.register_buffer("inv_freq", layer.mixer.cfg.inv_freq().to(device), persistent=False)
