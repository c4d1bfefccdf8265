"""Log-likelihood scoring as lm-evaluation-harness 0.4 does it, plus sliding-window perplexity.

For one (context, continuation) pair with tokens c = ctx_ids + cont_ids (lm-eval `_encode_pair`:
the context's trailing whitespace moves to the continuation, the whole string is encoded once and
the continuation is every token after len(encode(context))):

    inp    = c[-(max_length + 1):][:-1]                       (b l)
    logp   = log_softmax(model(inp))[len(inp) - len(cont):]   (n V), n = len(cont_ids)
    ll     = sum_t logp[t, cont_ids[t]]
    greedy = all_t argmax_v logp[t, v] == cont_ids[t]

Per doc with choices i: acc = [argmax_i ll_i == gold], acc_norm = [argmax_i ll_i / len(choice_i) == gold]
(len in characters, ties go to the first index as np.argmax does). Aggregates are means over docs
with stderr = sample std / sqrt(n); lambada's perplexity = exp(-mean ll) with a bootstrap stderr
(lm-eval: 100k resamples, sample std of the resampled perplexities).

Batching: sequences are sorted by length (longest first), right-padded (causal, so padding never
reaches a scored position) and run `batch_size` at a time. Identical inputs are run once (lm-eval's
one-token-continuation cache): when a doc's choices differ only in their last token (boolq
" no"/" yes", one-token answers), the input c[:-1] is the same and one forward scores them all.
Longer choices still recompute their shared context: sharing it through a decoding cache would
need every model's cache to copy its rows (one context row -> one row per choice).
"""

import math
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from zebra.eval.tasks import Doc, Task

Model = Callable[[torch.Tensor], torch.Tensor]  # input_ids (b l) -> logits (b l V)


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval `_encode_pair` (and the empty-context rule of `loglikelihood`)."""
    bos = [tokenizer.bos_token_id] if add_bos else []
    if context == "":  # lm-eval conditions on the prefix token: BOS, else EOS
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = bos + tokenizer.encode(context + continuation)
    ctx = bos + tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: Model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   max_length: int = 2048, device: str | torch.device = "cpu",
                   progress: str | None = None) -> list[tuple[float, bool]]:
    """(sum log p(cont | ctx), cont is the greedy continuation) per (ctx_ids, cont_ids) request."""
    inputs, conts = [], []
    for ctx, cont in requests:
        if not ctx or not cont or len(cont) > max_length:
            raise ValueError(f"need a non-empty context and 1..{max_length} continuation tokens, "
                             f"got {len(ctx)} and {len(cont)}")
        inputs.append(tuple((ctx + cont)[-(max_length + 1):][:-1]))
        conts.append(cont)
    unique = sorted(set(inputs), key=lambda x: (-len(x), x))
    by_input: dict[tuple, list[int]] = {}  # input -> requests that read its logits
    for i, inp in enumerate(inputs):
        by_input.setdefault(inp, []).append(i)

    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in tqdm(range(0, len(unique), batch_size), desc=progress, disable=progress is None):
        batch = unique[start:start + batch_size]
        ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)  # right padding
        for row, inp in enumerate(batch):
            ids[row, :len(inp)] = torch.tensor(inp)
        logits = model(ids.to(device))  # (b l V)
        for row, inp in enumerate(batch):
            for i in by_input[inp]:
                cont = torch.tensor(conts[i], device=logits.device)
                logp = logits[row, len(inp) - len(cont):len(inp)].float().log_softmax(-1)  # (n V)
                ll = logp.gather(-1, cont[:, None]).sum().item()
                results[i] = (ll, bool((logp.argmax(-1) == cont).all()))
    return results


def mean_stderr(values: np.ndarray) -> float:
    """lm-eval `mean_stderr`: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def perplexity_stderr(lls: np.ndarray, iters: int = 100_000, seed: int = 0) -> float:
    """Bootstrap stderr of exp(-mean ll) as lm-eval's `bootstrap_stderr` (numpy resampling, chunks of 1000)."""
    rng = np.random.default_rng(seed)
    ppls = []
    for _ in range(iters // 1000):
        idx = rng.integers(0, len(lls), size=(1000, len(lls)))
        ppls.append(np.exp(-lls[idx].mean(axis=1)))
    return float(np.std(np.concatenate(ppls), ddof=1))


def score_docs(task: Task, docs: list[Doc], results: list[list[tuple[float, bool]]]) -> dict:
    """Per-task metrics {name: value, name_stderr: stderr} from each doc's per-choice (ll, greedy)."""
    if "perplexity" in task.metrics:  # loglikelihood task: one pair per doc
        lls = np.array([r[0][0] for r in results])
        greedy = np.array([float(r[0][1]) for r in results])
        return {"perplexity": float(np.exp(-lls.mean())), "perplexity_stderr": perplexity_stderr(lls),
                "acc": float(greedy.mean()), "acc_stderr": mean_stderr(greedy)}
    per_doc = {"acc": [], "acc_norm": []}
    for doc, res in zip(docs, results):
        lls = np.array([ll for ll, _ in res])
        lengths = np.array([float(len(c)) for c in doc.choices])
        per_doc["acc"].append(float(np.argmax(lls) == doc.gold))
        per_doc["acc_norm"].append(float(np.argmax(lls / lengths) == doc.gold))
    out = {}
    for name in task.metrics:
        values = np.array(per_doc[name])
        out[name], out[f"{name}_stderr"] = float(values.mean()), mean_stderr(values)
    return out


def evaluate_task(model: Model, tokenizer, task: Task, docs: list[Doc], batch_size: int = 16,
                  max_length: int = 2048, device: str | torch.device = "cpu", add_bos: bool = False) -> dict:
    """Encode every doc's pairs, score them in one batched pass, aggregate the task's metrics."""
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("add_bos: the tokenizer has no bos_token_id")
    flat = [encode_pair(tokenizer, ctx, cont, add_bos) for doc in docs for ctx, cont in doc.pairs]
    lls = loglikelihoods(model, flat, batch_size, max_length, device, progress=task.name)
    results, k = [], 0
    for doc in docs:
        results.append(lls[k:k + len(doc.pairs)])
        k += len(doc.pairs)
    return {**score_docs(task, docs, results), "n": len(docs)}


@torch.no_grad()
def perplexity(model, ids: list[int], max_length: int, stride: int, batch_size: int = 8,
               device: str | torch.device = "cpu") -> dict:
    """Sliding-window perplexity of one token stream (the transformers "perplexity of fixed-length models" recipe).

    Window k covers ids[k*stride : k*stride + max_length] and scores only the tokens no earlier
    window scored, so every token after the first is predicted once with at least
    max_length - stride tokens of context (fewer only at the start). `model` is a Llama or Zebra
    model: the head runs on the scored positions only, one window at a time.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"need 0 < stride <= max_length, got stride={stride}, max_length={max_length}")
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    windows, prev_end = [], 1  # (begin, end, first scored target); token 0 is never predicted
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + max_length, len(ids))
        windows.append((begin, end, prev_end))
        prev_end = end
        if end == len(ids):
            break
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        inp = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (begin, end, _) in enumerate(batch):
            inp[row, :end - begin] = torch.tensor(ids[begin:end])
        hidden = model(inp.to(device), return_hidden=True)  # (b l d); the head runs per row: (b l V) is GBs
        for row, (begin, end, first) in enumerate(batch):
            targets = torch.tensor(ids[first:end], device=hidden.device)  # positions first..end-1
            logp = model.lm_head(hidden[row, first - 1 - begin:end - 1 - begin]).float().log_softmax(-1)
            nll -= logp.gather(-1, targets[:, None]).sum().item()
            count += len(targets)
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count,
            "max_length": max_length, "stride": stride}
