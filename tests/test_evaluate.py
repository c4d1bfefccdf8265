"""Evaluation: lm-eval 0.4 prompt construction, scoring, batching, perplexity, reports.

Expected prompt strings are written out by hand from lm-eval's task yamls (shared/data/README.md
table) for real rows of tests/data/eval (the first rows of each shared/data/eval file). Scores are
checked against a hand computation and against transformers' Llama run one sequence at a time.
"""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from zebra.eval.harness import encode_pair, evaluate_task, loglikelihoods, mean_stderr, perplexity, score_docs
from zebra.eval.tasks import TASKS, Doc, get_task, hellaswag_preprocess, load_docs

DATA = Path(__file__).parent / "data" / "eval"


def docs_of(name, limit=None):
    return load_docs(get_task(name), DATA, limit)[0]


# ----------------------------------------------------------------------------------------------
# Prompt and choice construction, task by task


def test_hellaswag_activitynet_capitalize():
    doc = docs_of("hellaswag")[0]  # ctx_a "A man is sitting on a roof.", ctx_b "he"
    assert doc.pairs[0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc.choices == ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                           "is holding a rubik's cube.", "starts pulling up roofing on a roof."]
    assert [c for _, c in doc.pairs][3] == " starts pulling up roofing on a roof."
    assert doc.gold == 3


def test_hellaswag_wikihow_quirks():
    # "[header]"/"[step]" tags are deleted, " [title]" becomes ". " (hence ".."), empty ctx_b leaves
    # a trailing space that strip() removes, and an ending that starts with "[title]" keeps the
    # space left behind by the tag (its continuation starts with two spaces).
    doc = docs_of("hellaswag")[2]
    assert doc.pairs[0][0] == (
        "Personal Care and Style: How to make tahini. Preheat the oven to 170ºc/340ºf. "
        "Lay parchment paper across the baking sheet or dish.. Rinse the sesame seeds in a fine "
        "colander. Shake and drip dry.")
    assert doc.choices[2] == " Cool them down on the baking sheet for 2 minutes. This moisturizes the seeds and makes them spreadable."
    assert doc.pairs[2][1] == "  Cool them down on the baking sheet for 2 minutes. This moisturizes the seeds and makes them spreadable."
    assert doc.choices[3] == (" Note that if you feel the seeds are clean enough, you may skip this step (although, see "
                              "tips below for a suggestion about reducing phytic acid).. Arrange the seeds across the baking sheet.")
    assert doc.gold == 3


def test_hellaswag_preprocess_rules():
    assert hellaswag_preprocess("  a [title] b [step] c  d   e ") == "a. b c d  e"
    assert "the Lady Lifts".capitalize() == "The lady lifts"  # why lm-eval lower-cases the rest of ctx_b


def test_piqa():
    docs = docs_of("piqa")
    assert docs[1].pairs == [("Question: dresser\nAnswer:", " replace drawer with bobby pin "),
                             ("Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin ")]
    assert [d.gold for d in docs] == [0, 1, 1, 1]  # valid-labels.lst


def test_arc():
    easy, challenge = docs_of("arc_easy")[0], docs_of("arc_challenge")[0]
    assert easy.pairs[0] == ("Question: Which statement best explains why photosynthesis is the foundation of "
                             "most food webs?\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.")
    assert easy.gold == 0
    assert challenge.pairs[2][1] == " Planetary days will become shorter."
    assert challenge.gold == 2 and len(challenge.pairs) == 4


def test_openbookqa():
    doc = docs_of("openbookqa")[2]
    assert doc.pairs == [("Predators eat", " lions"), ("Predators eat", " humans"),
                         ("Predators eat", " bunnies"), ("Predators eat", " grass")]
    assert doc.gold == 2


def test_winogrande_partial_scoring():
    doc = docs_of("winogrande")[0]
    assert doc.pairs == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                         ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert doc.choices == [doc.pairs[0][0], doc.pairs[1][0]]
    assert doc.gold == 1  # answer "2"


def test_lambada():
    doc = docs_of("lambada_openai")[0]
    context, target = doc.pairs[0]
    assert target == " signs"
    assert context.startswith("In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n\"Figured")
    assert context.endswith("his mouth curved in a confident grin, I don't care about")


def test_boolq():
    doc = docs_of("boolq")[0]
    context = doc.pairs[0][0]
    assert context.startswith("All biomass goes through at least some of these steps:")
    assert context.endswith("producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in doc.pairs] == [" no", " yes"] and doc.gold == 0


def test_sciq():
    docs = docs_of("sciq")
    assert docs[0].pairs[3] == ("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:", " darwin")
    assert docs[3].pairs[0][0] == ("A wetland is an area that is wet for all or part of the year. Wetlands are home to "
                                   "certain types of plants.\nQuestion: What is an area of land called that is wet for "
                                   "all or part of the year?\nAnswer:")
    assert [c for _, c in docs[3].pairs] == [" plains", " grassland", " tundra", " wetland"] and docs[3].gold == 3


def test_hub_schema_rows():
    """Rows as the hub datasets store them (labels may be digits, OBQA's answerKey may have a space)."""
    arc = {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    assert TASKS["arc_easy"].to_doc(arc).gold == 2
    obqa = {"question_stem": "Stem", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": " B"}
    assert TASKS["openbookqa"].to_doc(obqa).pairs[1] == ("Stem", " y")
    assert TASKS["openbookqa"].to_doc(obqa).gold == 1
    hs = {"activity_label": "A", "ctx_a": "b.", "ctx_b": "", "endings": ["c", "d"], "label": "1"}
    assert TASKS["hellaswag"].to_doc(hs).pairs == [("A: b.", " c"), ("A: b.", " d")]
    assert TASKS["hellaswag"].to_doc(hs).gold == 1


def test_limit_takes_first_rows():
    assert len(docs_of("piqa", limit=2)) == 2 and docs_of("piqa", limit=2)[1].pairs[0][0] == "Question: dresser\nAnswer:"


# ----------------------------------------------------------------------------------------------
# Clear errors


def test_bad_task_name():
    with pytest.raises(ValueError, match="unknown task 'hellaswagg'.*hellaswag"):
        get_task("hellaswagg")


def test_missing_data_file(tmp_path):
    with pytest.raises(ValueError, match="piqa.*valid-labels.lst"):
        load_docs(get_task("piqa"), tmp_path)


def test_bad_data_file(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "ARC-Easy-Test.jsonl").write_text('{"question": "q", "answers": []}\n')
    with pytest.raises(ValueError, match="arc_easy.*schema"):
        load_docs(get_task("arc_easy"), tmp_path)
    (tmp_path / "arc_easy" / "ARC-Easy-Test.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="arc_easy: cannot read"):
        load_docs(get_task("arc_easy"), tmp_path)


# ----------------------------------------------------------------------------------------------
# Metrics by hand


def test_acc_and_acc_norm_by_hand():
    task = get_task("arc_easy")
    docs = [Doc(pairs=[("q", " a"), ("q", " bbbb")], choices=["a", "bbbb"], gold=1),
            Doc(pairs=[("q", " aa"), ("q", " b")], choices=["aa", "b"], gold=0),
            Doc(pairs=[("q", " a"), ("q", " b")], choices=["a", "b"], gold=1)]
    results = [[(-2.0, False), (-4.0, False)],  # acc: 0 picks choice 0; norm: -2/1 < -4/4 -> 1
               [(-3.0, False), (-2.0, False)],  # acc: 1 -> wrong; norm: -1.5 vs -2 -> 0
               [(-1.0, False), (-1.0, False)]]  # tie -> first index (np.argmax), wrong both ways
    m = score_docs(task, docs, results)
    assert m["acc"] == pytest.approx(0.0)
    assert m["acc_norm"] == pytest.approx(2 / 3)
    # sample std of [1, 1, 0] is sqrt(1/3); over sqrt(3) gives 1/3
    assert m["acc_norm_stderr"] == pytest.approx(1 / 3)
    assert mean_stderr(np.array([0.0, 1.0, 1.0, 1.0])) == pytest.approx(math.sqrt(0.25 / 4))


def test_lambada_metrics_by_hand():
    task = get_task("lambada_openai")
    docs = [Doc(pairs=[("x", " y")], choices=["y"], gold=0)] * 4
    lls = [-1.0, -2.0, -3.0, -6.0]
    m = score_docs(task, docs, [[(ll, g)] for ll, g in zip(lls, [True, False, True, True])])
    assert m["perplexity"] == pytest.approx(math.exp(3.0))
    assert m["acc"] == pytest.approx(0.75)
    # the ideal bootstrap, by enumerating all 4^4 equally likely resamples
    resampled = [math.exp(-np.mean([lls[i] for i in idx])) for idx in itertools.product(range(4), repeat=4)]
    assert m["perplexity_stderr"] == pytest.approx(np.std(resampled), rel=0.02)


# ----------------------------------------------------------------------------------------------
# Tokenisation of pairs and batched scoring, against transformers' Llama one sequence at a time


class ByteBPE:
    """A small byte-level BPE trained on the test slices: merges across word boundaries matter."""

    def __init__(self):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        texts = [p for name in TASKS for d in docs_of(name) for pair in d.pairs for p in pair]
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        self.tok, self.bos_token_id, self.eos_token_id = tok, 0, 0

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids)


@pytest.fixture(scope="module")
def tokenizer():
    return ByteBPE()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def test_encode_pair_moves_trailing_space(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: dresser\nAnswer: ", "replace")
    assert ctx == tokenizer.encode("Question: dresser\nAnswer:")
    assert ctx + cont == tokenizer.encode("Question: dresser\nAnswer: replace")
    assert tokenizer.decode(cont) == " replace"
    bos_ctx, bos_cont = encode_pair(tokenizer, "Question: dresser\nAnswer:", " replace", add_bos=True)
    assert bos_ctx == [0] + ctx and bos_cont == cont
    assert encode_pair(tokenizer, "", " replace") == ([0], tokenizer.encode(" replace"))


def test_encode_pair_splits_after_context_tokens(tokenizer):
    # When BPE merges across the boundary, the continuation is still "everything after len(ctx)".
    for name in TASKS:
        for doc in docs_of(name):
            for context, continuation in doc.pairs:
                ctx, cont = encode_pair(tokenizer, context, continuation)
                whole = tokenizer.encode(context.rstrip() + context[len(context.rstrip()):] + continuation)
                assert ctx == tokenizer.encode(context.rstrip()) and cont == whole[len(ctx):]


def reference_loglikelihood(hf_model, ctx, cont):
    """One unpadded sequence through transformers: sum of log p(cont_t | prefix) and the greedy check."""
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(hf_model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    tok_lp = logp[torch.arange(len(targets)), targets][-len(cont):]
    greedy = bool((logp.argmax(-1)[-len(cont):] == targets[-len(cont):]).all())
    return tok_lp.sum().item(), greedy


def test_batched_equals_unbatched_equals_transformers(tokenizer, hf_model):
    model = lambda ids: hf_model(ids).logits  # noqa: E731
    requests = [encode_pair(tokenizer, c, x) for name in ("piqa", "winogrande")
                for d in docs_of(name) for c, x in d.pairs]
    batched = loglikelihoods(model, requests, batch_size=5)
    single = loglikelihoods(model, requests, batch_size=1)
    for (ll_b, g_b), (ll_1, g_1), (ctx, cont) in zip(batched, single, requests):
        ll_ref, g_ref = reference_loglikelihood(hf_model, ctx, cont)
        assert ll_b == pytest.approx(ll_ref, abs=1e-4) and ll_1 == pytest.approx(ll_ref, abs=1e-4)
        assert g_b == g_1 == g_ref


def test_batched_equals_unbatched_hybrid_student(tokenizer):
    """Right padding is harmless for a causal recurrent mixer too (Mamba2 + MLA student)."""
    from zebra.config import LlamaConfig
    from zebra.hybrid import ZebraForCausalLM, student_config

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    student = ZebraForCausalLM(student_config(cfg, ["mla", "mamba2"], q_rank=0, kv_rank=8, d_rope=4)).eval()
    requests = [encode_pair(tokenizer, c, x) for d in docs_of("winogrande") for c, x in d.pairs]
    batched, single = loglikelihoods(student, requests, batch_size=3), loglikelihoods(student, requests, batch_size=1)
    for (ll_b, g_b), (ll_1, g_1), (ctx, cont) in zip(batched, single, requests):
        with torch.no_grad():
            logp = student(torch.tensor([ctx + cont]))[0, :-1].log_softmax(-1)
        ll_ref = logp[torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1), torch.tensor(cont)].sum().item()
        assert ll_b == pytest.approx(ll_ref, abs=1e-4) and ll_1 == pytest.approx(ll_ref, abs=1e-4) and g_b == g_1


def test_left_truncation_to_max_length(tokenizer, hf_model):
    model = lambda ids: hf_model(ids).logits  # noqa: E731
    ctx, cont = list(range(5, 45)), [7, 8, 9]
    (ll, _), = loglikelihoods(model, [(ctx, cont)], max_length=16)
    ll_ref, _ = reference_loglikelihood(hf_model, (ctx + cont)[-17:-3], cont)
    assert ll == pytest.approx(ll_ref, abs=1e-4)


def test_greedy_flag_on_a_continuation_the_model_predicts(tokenizer, hf_model):
    model = lambda ids: hf_model(ids).logits  # noqa: E731
    ctx = [11, 12, 13]
    cont = []
    for _ in range(3):  # the model's own greedy continuation
        cont.append(int(hf_model(torch.tensor([ctx + cont])).logits[0, -1].argmax()))
    (_, greedy), (_, not_greedy) = loglikelihoods(model, [(ctx, cont), (ctx, cont[:2] + [(cont[2] + 1) % 400])])
    assert greedy and not not_greedy


def test_evaluate_task_end_to_end(tokenizer, hf_model):
    model = lambda ids: hf_model(ids).logits  # noqa: E731
    task = get_task("hellaswag")
    docs = docs_of("hellaswag")
    m = evaluate_task(model, tokenizer, task, docs, batch_size=3)
    acc = acc_norm = 0
    for doc in docs:
        lls = [reference_loglikelihood(hf_model, *encode_pair(tokenizer, c, x))[0] for c, x in doc.pairs]
        acc += int(np.argmax(lls) == doc.gold)
        acc_norm += int(np.argmax([ll / len(ch) for ll, ch in zip(lls, doc.choices)]) == doc.gold)
    assert m["n"] == 4 and m["acc"] == acc / 4 and m["acc_norm"] == acc_norm / 4


# ----------------------------------------------------------------------------------------------
# Sliding-window perplexity


def test_perplexity_sliding_window(hf_model):
    from zebra.config import LlamaConfig
    from zebra.llama import LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_dict(hf_model.config.to_dict())).eval()  # ours, HF's weights
    model.load_state_dict(hf_model.state_dict())
    torch.manual_seed(1)
    ids = torch.randint(0, 400, (50,)).tolist()
    # one window: every token after the first, full left context
    full = perplexity(model, ids, max_length=64, stride=64)
    logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, :-1], -1)
    nll = -logp[torch.arange(49), torch.tensor(ids[1:])].mean().item()
    assert full["tokens"] == 49 and full["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    # windows of 16 tokens moving by 8: token t is predicted from ids[begin:t] of its window
    win = perplexity(model, ids, max_length=16, stride=8, batch_size=3)
    total, count, scored = 0.0, 0, set()
    for begin in range(0, 49, 8):
        end = min(begin + 16, 50)
        lp = torch.log_softmax(hf_model(torch.tensor([ids[begin:end]])).logits[0], -1)
        for t in range(max(begin + 1, max(scored, default=0) + 1), end):
            total -= lp[t - 1 - begin, ids[t]].item()
            count += 1
            scored.add(t)
        if end == 50:
            break
    assert win["tokens"] == count == 49
    assert win["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, max_length=8, stride=16)



# ----------------------------------------------------------------------------------------------
# KV cache, throughput, reports


def tiny_llama():
    from zebra.config import LlamaConfig
    from zebra.llama import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_kv_cache_report_teacher_and_hybrid():
    from zebra.config import LlamaConfig
    from zebra.eval.speed import kv_cache_report
    from zebra.hybrid import ZebraForCausalLM, student_config

    model = tiny_llama()  # 2 layers, 2 KV heads of 8: 2 * 2 * 2 * 8 values of 2 bytes = 128 bytes per token
    rep = kv_cache_report(model, contexts=[100, 1000], batch=3)
    assert rep["bytes_per_token"] == rep["teacher_bytes_per_token"] == 128 and rep["percent_of_teacher"] == 100.0
    assert rep["totals"][1] == {"batch": 3, "context": 1000, "bytes": 3 * 1000 * 128, "teacher_bytes": 3 * 1000 * 128}
    # SmolLM2-135M with 6 MLA layers (r_kv 64 + d_rope 32) and 24 Mamba2 layers (DESIGN.md formula):
    # teacher 2 * 30 * 3 * 64 = 11520 values per token, student 6 * 96 = 576 -> 5%
    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    plan = ["mla" if i in (0, 5, 10, 15, 20, 25) else "mamba2" for i in range(30)]
    with torch.device("meta"):
        hybrid = ZebraForCausalLM(student_config(smollm2, plan, q_rank=0, kv_rank=64, d_rope=32))
    rep = kv_cache_report(hybrid, contexts=[4096], batch=2)
    assert rep["bytes_per_token"] == 576 * 2 and rep["teacher_bytes_per_token"] == 11520 * 2
    assert rep["percent_of_teacher"] == pytest.approx(5.0)
    assert rep["totals"][0]["bytes"] == 2 * (4096 * 576 * 2 + rep["constant_bytes"]) and rep["constant_bytes"] > 0


def test_throughput_and_reports(tmp_path):
    from zebra.eval import report
    from zebra.eval.speed import throughput

    from zebra.hybrid import build_student

    for model in (tiny_llama(), build_student(tiny_llama(), "mamba2")):  # any model with new_cache
        point = throughput(model, batch=2, context=8, steps=2, repeats=1)
        assert point["prefill_tok_s"] == pytest.approx(2 * 8 / point["prefill_s"])
        assert point["decode_tok_s"] == pytest.approx(2 * 2 / point["decode_s"])
    teacher = {"model": "teacher", "tasks": {"piqa": {"acc": 0.7, "acc_stderr": 0.01, "acc_norm": 0.71,
                                                      "acc_norm_stderr": 0.01, "n": 10},
                                             "winogrande": {"acc": 0.5, "acc_stderr": 0.02, "n": 10}},
               "kv_cache": {"bytes_per_token": 100, "percent_of_teacher": 100.0}, "throughput": [point]}
    student = {**teacher, "model": "student", "kv_cache": {"bytes_per_token": 5, "percent_of_teacher": 5.0}}
    report.write_json(tmp_path / "t.json", teacher)
    report.write_json(tmp_path / "s.json", student)
    table = report.markdown_table(report.read_results([tmp_path / "t.json", tmp_path / "s.json"]))
    assert "| | teacher | student |" in table
    assert "| piqa acc_norm * (n=10) | 71.00 ± 1.00 | 71.00 ± 1.00 |" in table
    assert "**60.50**" in table  # mean of piqa acc_norm and winogrande acc
    assert "| KV % of teacher | 100.00% | 5.00% |" in table
    report.plot([teacher, student], tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="results file"):
        report.read_results([tmp_path / "missing.json"])
