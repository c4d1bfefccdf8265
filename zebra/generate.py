"""Batched generation with a decoding cache, for the teacher and every student alike.

Any model with `new_cache(batch, max_len, left_pad)` and `forward(input_ids, cache) -> logits`
works. Prompts of different lengths are left-padded; each model's cache knows each row's
pad count, so positions, attention and recurrent states see only real tokens.

Sampling, per row, from the last logits z (V,):
    temperature 0  -> argmax z
    otherwise      -> p = softmax(z / T); keep the smallest set of top tokens whose mass
                      reaches top_p (the top token always stays); renormalise; draw.
A row stops at its first end-of-sequence token; the batch stops when every row has.

The prompt is prefilled `prefill_chunk` positions at a time, each chunk continuing the cache, so a
long batch's activations stay bounded (b x 4096 x the MLP width, not b x P x ...); the logits
are computed at the last position only.

On CUDA the one-token step is captured once in a CUDA graph and replayed for every token
(`DecodeStep`): a decode step has static shapes (zebra.llama.Cache.context reads the slot from
the device), so one graph serves every length. Without it, batch-1 decode is bound by Python
and kernel launches (17-28 ms per step where the GPU needs ~3: bench/RESULTS.md). With
`compile_step` the captured step is torch.compile's, whose fused kernels take a 1B hybrid's
batch-1 step from ~2.2 to ~1.5 ms on an H200 (gpt-fast's recipe: compile, then graph).

CLI (streams a chat answer):
    python -m zebra.generate --model smollm2-135m-instruct --prompt "What is the capital of France?" [--compile]
"""

import argparse
import gc
import sys
from collections.abc import Iterator

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """logits (b V) -> next token ids (b,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly better tokens
        sorted_probs[mass_before >= top_p] = 0.0  # the top token has mass_before 0: always kept
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (b P), left_pad (b,)) with every row right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
    pads = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pads.to(device)


def next_logits(model, cache, token: torch.Tensor) -> torch.Tensor:
    """One decode step: token (b,) -> logits (b V) of the next position; the cache advances."""
    return model(token[:, None], cache)[:, -1]


class DecodeStep:
    """token (b,) -> logits (b V) of the next position, the cache advanced by one slot.

    compile_step: run the step through torch.compile (dynamic shapes, so one compilation serves
    every batch size and length): it fuses the norms, RoPE, gates and residual adds, which
    eagerly are ~40 small kernels a layer; our Triton kernels stay calls of their own.
    cuda_graph: the first call runs the step on a side stream (allocations, cuBLAS handles,
    Triton autotuning and compilation happen there), then records it into a CUDA graph; every
    later call copies the token into the graph's input and replays it. Recording runs nothing,
    so it leaves the cache as it was; replay advances the device slot, the host keeps `length`."""

    def __init__(self, model, cache, cuda_graph: bool, compile_step: bool = False):
        self.model, self.cache, self.cuda_graph = model, cache, cuda_graph
        self.token = self.logits = self.graph = None
        # a function of its arguments, not a bound method: a compiled bound method would hold
        # this object in a reference cycle, and the cyclic GC freeing an old step's graph during
        # a later capture invalidates that capture
        self.forward = torch.compile(next_logits, dynamic=True) if compile_step else next_logits

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph:
            return self.forward(self.model, self.cache, token)
        if self.graph is None:
            self.token = token.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.forward(self.model, self.cache, self.token)
            torch.cuda.current_stream().wait_stream(side)
            self.graph, length = torch.cuda.CUDAGraph(), self.cache.length
            gc.collect()  # nothing may free CUDA graphs (other steps') while this one records
            with torch.cuda.graph(self.graph):
                self.logits = self.forward(self.model, self.cache, self.token)
            self.cache.length = length  # recorded, not run
            return logits
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"cache overflow: {self.cache.length + 1} tokens > max_len {self.cache.max_len}")
        self.token.copy_(token)
        self.graph.replay()
        self.cache.length += 1
        return self.logits


@torch.no_grad()
def stream(model, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), temperature: float = 0.0,
           top_p: float = 1.0, pad_id: int = 0, generator=None,
           cuda_graph: bool | None = None, prefill_chunk: int = 4096,
           compile_step: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (b,), step by step; finished rows yield `pad_id`.
    cuda_graph: replay the decode step as a CUDA graph (default: on CUDA devices);
    prefill_chunk: prompt positions per prefill forward;
    compile_step: torch.compile the decode step (DecodeStep; worth its compile time on long runs)."""
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    device = next(model.parameters()).device
    ids, pads = left_pad(prompts, pad_id, device)
    cache = model.new_cache(len(prompts), ids.shape[1] + max_new_tokens, left_pad=pads)
    for start in range(0, ids.shape[1], prefill_chunk):
        hidden = model(ids[:, start:start + prefill_chunk], cache, return_hidden=True)
    logits = model.lm_head(hidden[:, -1])  # last position only: (b P V) can be GBs
    step = DecodeStep(model, cache, device.type == "cuda" if cuda_graph is None else cuda_graph, compile_step)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token = sample(logits, temperature, top_p, generator).masked_fill(done, pad_id)
        yield token
        done |= torch.isin(token, eos)
        if done.all():
            return
        logits = step(token)


def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), temperature: float = 0.0,
             top_p: float = 1.0, pad_id: int = 0, generator=None, cuda_graph: bool | None = None,
             prefill_chunk: int = 4096, compile_step: bool = False) -> list[list[int]]:
    """New tokens per row, each cut after its first end-of-sequence token (kept)."""
    steps = list(stream(model, prompts, max_new_tokens, eos_ids, temperature, top_p, pad_id, generator, cuda_graph,
                        prefill_chunk, compile_step))
    out = []
    for row in torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]:
        stop = next((i for i, t in enumerate(row) if t in set(eos_ids)), len(row) - 1)
        out.append(row[: stop + 1])
    return out


def eos_ids_of(model, tokenizer) -> set[int]:
    """End-of-sequence ids from the model config and the tokenizer (chat models end turns with one)."""
    ids = {tokenizer.eos_token_id} - {None}
    cfg_eos = getattr(model.config, "eos_token_id", None)
    ids |= set(cfg_eos) if isinstance(cfg_eos, list) else {cfg_eos} - {None}
    return ids


def main(argv=None):
    from zebra.hub import load_model

    ap = argparse.ArgumentParser(description="Chat with a Llama or a Zebra hybrid (streams the answer).")
    ap.add_argument("--model", required=True, help="HF-format directory or a named source (smollm2-135m-instruct)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--system", default=None, help="optional system message")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (faster tokens, "
                    "a compilation first: worth it for long answers)")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model, device=args.device)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    eos = eos_ids_of(model, tok)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    answer, shown = [], ""
    for token in stream(model, [prompt], args.max_new_tokens, eos, args.temperature, args.top_p, generator=gen,
                        compile_step=args.compile):
        if token.item() in eos:
            break
        answer.append(token.item())
        text = tok.decode(answer, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    print()


if __name__ == "__main__":
    main()
