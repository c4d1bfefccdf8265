"""Our Llama against transformers.LlamaForCausalLM, and the KV cache against the full forward."""

import pytest
import torch
import transformers

from zebra.config import LlamaConfig
from zebra.llama import LlamaForCausalLM

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_hf_config(heads=4, kv_heads=2, tied=False, rope_scaling=None, head_dim=16):
    return dict(model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500.0, rope_scaling=rope_scaling,
                tie_word_embeddings=tied)


def hf_and_ours(cfg: dict, seed=0):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # HF inits norms to 1: randomise them so a swapped norm cannot pass
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf, ours


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["rope-default", "rope-llama3"])
def test_logits_match_transformers(heads, kv_heads, tied, rope):
    hf, ours = hf_and_ours(tiny_hf_config(heads, kv_heads, tied, rope))
    for seq_len in (1, 7, 33):
        ids = torch.randint(0, 97, (2, seq_len))
        with torch.no_grad():
            diff = (hf(ids).logits - ours(ids)).abs().max().item()
        assert diff <= 1e-4, f"seq_len {seq_len}: max abs diff {diff}"


def test_config_reads_transformers5_rope_parameters():
    cfg = tiny_hf_config()
    hf_cfg = transformers.LlamaConfig(**{**cfg, "rope_scaling": LLAMA3_ROPE}).to_dict()
    ours = LlamaConfig.from_dict(hf_cfg)
    assert ours.rope_theta == 500.0 and ours.rope_scaling["rope_type"] == "llama3"
    assert ours.rope_scaling["factor"] == 8.0


def test_kv_cache_decoding_equals_full_forward():
    _, model = hf_and_ours(tiny_hf_config(rope_scaling=LLAMA3_ROPE))
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :9], cache)] + [model(ids[:, t:t + 1], cache) for t in range(9, 21)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_left_padded_batch_equals_rows_alone():
    _, model = hf_and_ours(tiny_hf_config())
    rows = [torch.randint(1, 97, (n,)) for n in (5, 11)]
    pad = torch.tensor([6, 0])
    batch = torch.stack([torch.cat([torch.zeros(6, dtype=torch.long), rows[0]]), rows[1]])
    nxt = torch.randint(1, 97, (2, 3))
    with torch.no_grad():
        cache = model.new_cache(2, 16, left_pad=pad)
        out = torch.cat([model(batch, cache)[:, -1:]] + [model(nxt[:, t:t + 1], cache) for t in range(3)], 1)
        for b, row in enumerate(rows):
            alone = model(torch.cat([row, nxt[b]])[None])[0, len(row) - 1:]
            assert torch.allclose(out[b], alone, atol=1e-5), f"row {b}"


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_dict({**tiny_hf_config(), "model_type": "mistral"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig.from_dict(tiny_hf_config(heads=4, kv_heads=3))
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_dict(tiny_hf_config(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig.from_dict({k: v for k, v in tiny_hf_config().items() if k != "vocab_size"})
