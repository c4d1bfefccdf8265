"""Generation: cached decoding equals recomputation; sampling follows its definition."""

import pytest
import torch

from zebra.config import LlamaConfig
from zebra.generate import generate, sample
from zebra.llama import LlamaForCausalLM


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=100.0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # sharp logits: greedy paths differ from one prompt to the next
    return model


def greedy_by_recompute(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(prompt):]


def test_batched_greedy_equals_full_recompute_per_row():
    model = tiny_llama()
    prompts = [[3, 14, 15, 9, 26], [5], [35, 8, 9, 7, 9, 3, 2, 3]]
    out = generate(model, prompts, max_new_tokens=12)
    for row, prompt in enumerate(prompts):
        assert out[row] == greedy_by_recompute(model, prompt, 12), f"row {row}"


def test_rows_stop_at_their_own_eos():
    model = tiny_llama()
    prompts = [[3, 14, 15], [35, 8]]
    free = generate(model, prompts, max_new_tokens=10)
    eos = free[0][3]  # make row 0's fourth token the end-of-sequence id
    out = generate(model, prompts, max_new_tokens=10, eos_ids={eos})
    assert out[0] == free[0][:4]
    cut = next((i for i, t in enumerate(free[1]) if t == eos), len(free[1]) - 1)
    assert out[1] == free[1][:cut + 1]


def test_top_p_keeps_the_smallest_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 or 0.79 keeps the two best; 0.81 also the third
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    g = torch.Generator().manual_seed(0)
    for top_p, allowed in [(0.7, {1, 3}), (0.79, {1, 3}), (0.81, {0, 1, 3}), (0.01, {1})]:
        draws = {sample(logits, 1.0, top_p, g).item() for _ in range(300)}
        assert draws == allowed, (top_p, draws)


def test_temperature_sampling_matches_softmax_frequencies():
    logits = torch.tensor([[1.0, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(sample(logits, 2.0, 1.0, g), minlength=3).float() / 20000
    expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0]) / 2.0, -1)
    assert torch.allclose(counts, expected, atol=0.015), (counts, expected)


def test_chunked_prefill_equals_one_forward():
    """The prompt fed in chunks that continue the cache (left pads, a 1-token last chunk) gives the
    tokens of one forward over the whole prompt: llama (KV cache) and the hybrid (MLA latents,
    Mamba2 conv + SSM states)."""
    from tests.test_hybrid import tiny_hybrid

    prompts = [[3, 14, 15, 9, 26, 5, 3], [5, 9], [35, 8, 9, 7, 9, 3, 2, 3, 8, 4]]
    for model in (tiny_llama(), tiny_hybrid()[1]):
        whole = generate(model, prompts, max_new_tokens=8, prefill_chunk=64)
        for chunk in (1, 3):
            assert generate(model, prompts, max_new_tokens=8, prefill_chunk=chunk) == whole, (type(model), chunk)


@pytest.mark.slow  # inductor builds C++ kernels on the CPU: about a minute
def test_compiled_step_equals_eager_and_compiles_once():
    """compile_step=True (torch.compile of the decode step) gives the eager tokens, and a new
    batch size (>= 2) or cache length reuses the compiled step: no recompilation."""
    from tests.test_hybrid import tiny_hybrid

    model = tiny_hybrid()[1]  # MLA and Mamba2 layers, the Llama MLP and norms
    prompts = [[3, 14, 15, 9, 26], [5], [35, 8, 9, 7, 9, 3, 2, 3]]
    torch._dynamo.reset()
    assert generate(model, prompts, 10, compile_step=True) == generate(model, prompts, 10)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert generate(model, prompts[1:], 14, compile_step=True) == generate(model, prompts[1:], 14)
