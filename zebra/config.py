"""Configuration: the teacher's `LlamaConfig` (read from an HF `config.json`) and a strict
YAML -> dataclass loader for run configs.

Llama shapes, with the letters used across Zebra:
    D  = hidden_size                 model width
    L  = num_hidden_layers           depth
    H  = num_attention_heads         query heads
    Hk = num_key_value_heads         key/value heads (GQA: H % Hk == 0; MQA: Hk = 1)
    d  = head_dim                    per-head width (D // H unless given)
    F  = intermediate_size           SwiGLU width
    V  = vocab_size

HF has written RoPE settings two ways: `rope_theta` + `rope_scaling` (transformers 4.x) and
`rope_parameters = {rope_type, rope_theta, ...}` (5.x). Both are read; we keep the 4.x form,
which both versions load.

Run configs are YAML files mapped onto dataclasses by `load_yaml`: an unknown key or a value
of the wrong type is an error naming the key and the file, raised before any heavy work.
"""

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

ROPE_TYPES = ("default", "llama3")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hk
    head_dim: int  # d
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor", ...}
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        H, Hk = self.num_attention_heads, self.num_key_value_heads
        if H % Hk:
            raise ValueError(f"num_attention_heads ({H}) must be a multiple of num_key_value_heads ({Hk})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if rope_type == "llama3":
            need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in need if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling of type llama3 lacks {missing}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "LlamaConfig":
        """Build from an HF config dict; HF keys we do not use (torch_dtype, ...) are ignored."""
        arch = d.get("model_type")
        if arch != "llama":
            raise ValueError(f"{source}: model_type is {arch!r}, expected 'llama'")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (Llama uses 'silu')")
        rope_theta = d.get("rope_theta", 10000.0)
        rope_scaling = d.get("rope_scaling")
        if d.get("rope_parameters"):  # transformers 5.x layout
            params = dict(d["rope_parameters"])
            rope_theta = params.pop("rope_theta", rope_theta)
            rope_scaling = params if params.get("rope_type", "default") != "default" else None
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling["rope_type"] = rope_scaling.pop("type", rope_scaling.get("rope_type", "default"))
            if rope_scaling["rope_type"] == "default":
                rope_scaling = None
        H = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=H,
            num_key_value_heads=d.get("num_key_value_heads") or H,
            head_dim=d.get("head_dim") or d["hidden_size"] // H,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))

    def to_dict(self) -> dict:
        """HF config.json contents (transformers 4.x and 5.x both load this)."""
        d = dataclasses.asdict(self)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu")
        return d


# ---------------------------------------------------------------------------------------
# YAML -> dataclass, strictly


def load_yaml(path: str | Path, cls):
    """Read a YAML file into the dataclass `cls` (nested dataclasses allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, raw, where=str(path))


def from_dict(cls, raw: dict, where: str, prefix: str = ""):
    """Map `raw` onto dataclass `cls`, naming `prefix.key` and `where` in every error."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ValueError(f"{where}: unknown key {name!r} (allowed here: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else key
        values[key] = _coerce(hints[key], value, where, name)
    missing = [
        n for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        name = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ValueError(f"{where}: missing required key {name!r}")
    return cls(**values)


def _coerce(hint, value, where: str, name: str):
    """Check `value` against the type `hint`; recurse into dataclasses, lists and dicts."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {name!r} has an invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where, prefix=name)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: {name!r} must be a list, got {value!r}")
        return [_coerce(args[0], v, where, f"{name}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {name!r} must be a mapping, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: {name!r} must be one of {list(args)}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is typing.Any or (isinstance(hint, type) and isinstance(value, hint) and not (
            hint is int and isinstance(value, bool))):
        return value
    raise ValueError(f"{where}: {name!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")


