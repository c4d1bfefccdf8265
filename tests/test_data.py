"""zebra.data: schemas, exact assistant masks, packing, shuffle / resume / sharding, DPO pairs, errors.

A tiny byte-level BPE with SmolLM2's ChatML template stands in for the teacher's tokenizer; the
expected masks and packed streams are built here by hand, not with zebra.data's own helpers.
"""

import gzip
import json
from pathlib import Path

import jinja2.sandbox
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from zebra.data import (
    Pair,
    PackedBatches,
    PairBatches,
    Sample,
    encode_chat,
    encode_pair,
    encode_sft,
    load_pairs,
    load_rows,
    read_json_rows,
    load_sft,
    pack,
    parse_hh,
    preference_messages,
)

DATA = Path(__file__).resolve().parents[1] / "data"
CHAT = DATA / "hh_rlhf" / "helpful-base_test.chat500.jsonl.gz"
PAIRS = DATA / "hh_rlhf" / "helpful-base_test.pairs500.jsonl.gz"
INSTRUCTIONS = DATA / "self_instruct_seed" / "seed_tasks.instruction.jsonl.gz"

# SmolLM2-135M-Instruct's template (tokenizer_config.json): ChatML with a default system turn.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def read_jsonl_gz(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


class TinyTokenizer:
    """The zebra.tokenizer interface on a 512-token byte-level BPE."""

    def __init__(self, texts, chat_template=CHATML):
        self.hf = HFTokenizer(models.BPE())
        self.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        self.hf.train_from_iterator(texts, trainer)
        self.chat_template = chat_template
        self.template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(chat_template)
        self.eos_token_id = self.hf.token_to_id("<|im_end|>")
        self.pad_token_id = self.bos_token_id = self.hf.token_to_id("<|endoftext|>")
        self.vocab_size = self.hf.get_vocab_size()

    def encode(self, text, add_special_tokens=False):
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def tokenizer():
    rows = read_jsonl_gz(CHAT)[:200]
    return TinyTokenizer([r["chosen"] for r in rows])


def masked_runs(sample):
    """Contiguous runs of masked-in token ids."""
    runs, current = [], []
    for token, keep in zip(sample.ids.tolist(), sample.mask.tolist()):
        if keep:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + [current] if current else runs


def test_mask_selects_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    sample = encode_chat(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages)
    assert tokenizer.decode(sample.ids) == text
    # In ChatML an assistant turn is "<|im_start|>assistant\n" + content + "<|im_end|>\n".
    want = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in masked_runs(sample)] == want
    assert tokenizer.decode(sample.ids[~sample.mask]) == text.replace(want[0], "").replace(want[1], "")
    assert encode_chat(tokenizer, messages, assistant_only=False).mask.all()


def test_masks_on_the_shipped_chats(tokenizer):
    """Every shipped hh chat: tokens decode to the render, masked runs are the assistant turns."""
    samples = load_sft(str(CHAT), tokenizer)
    rows = read_jsonl_gz(CHAT)
    assert len(samples) == len(rows) == 500
    for sample, row in zip(samples[:100], rows):
        turns = row["chosen"].split("\n\nAssistant:")[1:]
        want = [t.split("\n\nHuman:")[0].strip() + "<|im_end|>\n" for t in turns]
        assert [tokenizer.decode(run) for run in masked_runs(sample)] == want
    instructions = load_sft(str(INSTRUCTIONS), tokenizer)
    tasks = read_jsonl_gz(INSTRUCTIONS)
    assert len(instructions) == len(tasks) == 175
    for sample, task in zip(instructions, tasks):
        user = task["instruction"] + ("\n\n" + task["input"] if task["input"] else "")
        assert f"<|im_start|>user\n{user}<|im_end|>" in tokenizer.decode(sample.ids)
        assert [tokenizer.decode(run) for run in masked_runs(sample)] == [task["output"] + "<|im_end|>\n"]


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    counting = TinyTokenizer(["a b c"], chat_template="{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="prefix by prefix"):
        encode_chat(counting, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_pack_conserves_tokens_and_masks():
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(3, 50, n), rng.random(n) > 0.5) for n in (5, 1, 9, 4, 7, 3)]
    eos, seq_len = 99, 4
    stream, stream_mask = [], []
    for s in samples:  # EOS after each sample, masked like the sample's last token
        stream += s.ids.tolist() + [eos]
        stream_mask += s.mask.tolist() + [bool(s.mask[-1])]
    input_ids, targets, loss_mask = pack(samples, seq_len, eos)
    n = (len(stream) - 1) // seq_len
    assert input_ids.shape == targets.shape == loss_mask.shape == (n, seq_len)
    assert input_ids.reshape(-1).tolist() == stream[: n * seq_len]
    assert targets.reshape(-1).tolist() == stream[1 : n * seq_len + 1]
    assert loss_mask.reshape(-1).tolist() == stream_mask[1 : n * seq_len + 1]


def toy_samples(count=23):
    rng = np.random.default_rng(1)
    return [Sample(np.arange(i * 100 + 10, i * 100 + 10 + n), rng.random(n) > 0.3) for i, n in enumerate(rng.integers(2, 12, count))]


def take(batches, k):
    return [next(batches) for _ in range(k)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_shuffle_is_deterministic_and_a_permutation_per_epoch():
    samples = toy_samples()
    a, b = PackedBatches(samples, 6, 2, eos_id=1, seed=7), PackedBatches(samples, 6, 2, eos_id=1, seed=7)
    assert_same_batches(take(a, 12), take(b, 12))
    first = next(PackedBatches(samples, 6, 2, eos_id=1, seed=8))["input_ids"]
    assert not torch.equal(first, next(PackedBatches(samples, 6, 2, eos_id=1, seed=7))["input_ids"])
    # An epoch visits the samples in a shuffled order, each once; the next epoch in another order.
    rows_per_epoch = (sum(len(s.ids) + 1 for s in samples) - 1) // 6
    batches = PackedBatches(samples, 6, 1, eos_id=1, seed=7)
    orders = []
    for epoch in range(2):
        seen = [t for _ in range(rows_per_epoch) for t in next(batches)["input_ids"].flatten().tolist() if t != 1]
        assert batches.state_dict() == {"epoch": epoch, "index": rows_per_epoch}
        assert len(seen) == len(set(seen))
        orders.append(list(dict.fromkeys(t // 100 for t in seen)))
        documented = np.random.default_rng([7, epoch]).permutation(len(samples)).tolist()  # seeded by (seed, epoch)
        assert len(orders[-1]) >= len(samples) - 2 and orders[-1] == documented[: len(orders[-1])]
    assert orders[0] != sorted(orders[0]) and orders[0] != orders[1]


def test_resume_gives_the_exact_next_batches():
    samples = toy_samples()
    run = PackedBatches(samples, 5, 3, eos_id=1, seed=3)
    take(run, 14)  # crosses an epoch boundary
    state = dict(run.state_dict())
    assert state["epoch"] >= 1
    fresh = PackedBatches(samples, 5, 3, eos_id=1, seed=3)
    fresh.load_state_dict(state)
    assert_same_batches(take(fresh, 6), take(run, 6))


def test_global_batch_is_the_same_for_any_world_size():
    samples = toy_samples()
    single = take(PackedBatches(samples, 5, 4, eos_id=1, seed=3), 7)
    ranks = [take(PackedBatches(samples, 5, 2, eos_id=1, seed=3, rank=r, world_size=2), 7) for r in range(2)]
    merged = [{k: torch.cat([r0[k], r1[k]]) for k in r0} for r0, r1 in zip(*ranks)]
    assert_same_batches(single, merged)
    with pytest.raises(ValueError, match="rank"):
        PackedBatches(samples, 5, 2, eos_id=1, seed=3, rank=2, world_size=2)
    with pytest.raises(ValueError, match="global batch"):
        next(PackedBatches(samples[:2], 5, 8, eos_id=1, seed=3))


def test_pair_truncation_follows_trl():
    class Chars:  # one token per character, template = "P:" + prompt + "|" then response + "$"
        def encode(self, text):
            return [ord(c) for c in text]

        def apply_chat_template(self, messages, add_generation_prompt=False):
            text = "".join(("P:" if m["role"] == "user" else "") + m["content"] + ("|" if m["role"] == "user" else "$") for m in messages)
            return text

    prompt = [{"role": "user", "content": "abcdefgh"}]  # "P:abcdefgh|" = 11 tokens
    chosen, rejected = [{"role": "assistant", "content": "xyz12"}], [{"role": "assistant", "content": "uv"}]  # 6 and 3
    pair = encode_pair(Chars(), prompt, chosen, rejected, max_length=20, max_prompt_length=8)
    assert "".join(map(chr, pair.prompt)) == "P:abcdefgh|" and "".join(map(chr, pair.chosen)) == "xyz12$"
    pair = encode_pair(Chars(), prompt, chosen, rejected, max_length=15, max_prompt_length=8)
    assert "".join(map(chr, pair.prompt)) == "bcdefgh|"[-8:] and "".join(map(chr, pair.chosen)) == "xyz12$"
    pair = encode_pair(Chars(), prompt, chosen, rejected, max_length=12, max_prompt_length=8)
    assert "".join(map(chr, pair.prompt)) == "abcdefgh|"[-8:]
    assert "".join(map(chr, pair.chosen)) == "xyz1" and "".join(map(chr, pair.rejected)) == "uv$"


def test_pair_batches_mask_the_responses():
    pairs = [Pair(np.array([5, 6, 7]), np.array([8, 9]), np.array([10])), Pair(np.array([11]), np.array([12, 13, 14]), np.array([15, 16]))]
    batch = next(PairBatches(pairs, batch_size=2, pad_id=0, seed=0))
    order = [0, 1] if batch["chosen_input_ids"][0, 0] == 5 else [1, 0]
    for name in ("chosen", "rejected"):
        for row, i in enumerate(order):
            pair = pairs[i]
            full = pair.prompt.tolist() + getattr(pair, name).tolist()
            length = batch[f"{name}_input_ids"].shape[1]
            padded = full + [0] * (length + 1 - len(full))
            assert batch[f"{name}_input_ids"][row].tolist() == padded[:-1]
            assert batch[f"{name}_targets"][row].tolist() == padded[1:]
            want_mask = [len(pair.prompt) <= t + 1 < len(full) for t in range(length)]
            assert batch[f"{name}_loss_mask"][row].tolist() == want_mask
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (2, 4)


def test_shipped_pairs_load(tokenizer):
    pairs = load_pairs(str(PAIRS), tokenizer, max_length=256, max_prompt_length=128)
    rows = read_jsonl_gz(PAIRS)
    assert len(pairs) == len(rows) == 500
    row, pair = rows[0], pairs[0]
    cut = row["chosen"].rfind("\n\nAssistant:")
    assert tokenizer.decode(pair.chosen) == row["chosen"][cut + len("\n\nAssistant:") :].strip() + "<|im_end|>\n"
    assert tokenizer.decode(pair.prompt).endswith("<|im_start|>assistant\n")
    assert all(len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= 256 for p in pairs)


def test_preference_schemas(tokenizer, tmp_path):
    path = tmp_path / "prefs.jsonl"
    conversation = [{"role": "user", "content": "Hi"}]
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "Hi", "chosen": conversation + [{"role": "assistant", "content": "Hello!"}], "rejected": conversation + [{"role": "assistant", "content": "Go away."}]},
    ]
    for i, row in enumerate(rows):
        path.write_text(json.dumps(row) + "\n")
        (pair,) = load_pairs(str(path), tokenizer, max_length=64, max_prompt_length=32)
        assert tokenizer.decode(pair.chosen) == "Hello!<|im_end|>\n", i
        assert tokenizer.decode(pair.rejected) == "Go away.<|im_end|>\n", i
        assert tokenizer.decode(pair.prompt).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), i


def test_parse_hh():
    messages = parse_hh("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:", "x")
    assert messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": ""},
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_errors_name_file_row_and_field(tokenizer, tmp_path, capsys):
    good = {"instruction": "Say hi", "input": "", "output": "hi"}
    path = write_jsonl(tmp_path / "inst.jsonl", [good, good, {"instruction": "Say hi", "input": ""}])
    with pytest.raises(ValueError, match=r"inst\.jsonl row 2: schema 'instruction' needs field 'output'"):
        load_sft(path, tokenizer)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}]}, {"messages": [{"role": "robot", "content": "a"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl row 1: messages\[0\]"):
        load_sft(path, tokenizer)
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"odd\.jsonl: cannot tell the schema from the columns \['answer', 'question'\]"):
        load_rows(path)
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match=r"text\.jsonl row 0: schema 'chat' needs field 'messages'"):
        load_sft(path, tokenizer, schema="chat")
    with pytest.raises(ValueError, match=r"text\.jsonl row 0: schema 'text' has no chosen/rejected pair"):
        load_pairs(path, tokenizer, max_length=8, max_prompt_length=4)
    with pytest.raises(ValueError, match="unknown schema 'chats'"):
        load_rows(path, schema="chats")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl"):
        load_rows(str(tmp_path / "nowhere.jsonl"))
    irregular = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
    path = write_jsonl(tmp_path / "hh.jsonl", [irregular])
    with pytest.raises(ValueError, match=r"hh\.jsonl row 0: 'chosen' and 'rejected' should share"):
        load_pairs(path, tokenizer, max_length=8, max_prompt_length=4)
    # among good rows an unpaired one is skipped and counted, as in the real hh-rlhf test file
    paired = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: d"}
    path = write_jsonl(tmp_path / "hh2.jsonl", [paired, irregular])
    (pair,) = load_pairs(path, tokenizer, max_length=64, max_prompt_length=32)
    assert "hh2.jsonl: skipped 1 of 2 rows" in capsys.readouterr().err
    expected = encode_pair(tokenizer, *preference_messages(paired, "hh", "x"), 64, 32)
    assert all(np.array_equal(a, b) for a, b in zip(pair, expected))


def test_json_rows_equal_datasets_reading_and_bad_lines_are_named(tmp_path):
    import datasets

    for path in (CHAT, INSTRUCTIONS):
        assert read_json_rows(path) == list(datasets.load_dataset("json", data_files=str(path), split="train"))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert load_rows(str(array)) == ([{"text": "a"}, {"text": "b"}], "text")
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write('{"text": "a"}\n\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz line 3: not valid JSON"):
        load_rows(str(bad))
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n["b"]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl line 2: expected a JSON object, got list"):
        load_rows(str(tmp_path / "list.jsonl"))


def test_plain_text_is_trained_everywhere(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "Hello world."}, {"text": "Bye."}])
    samples = load_sft(path, tokenizer)
    assert [tokenizer.decode(s.ids) for s in samples] == ["Hello world.", "Bye."]
    assert all(s.mask.all() for s in samples)


@pytest.fixture(scope="module")
def teacher_tokenizer():
    from zebra.hub import resolve_model_dir
    from zebra.tokenizer import Tokenizer

    return Tokenizer.from_dir(resolve_model_dir("smollm2-135m-instruct"))


def test_teacher_masks_match_an_offset_reference(teacher_tokenizer):
    """SmolLM2's own template and tokenizer: our tokens equal one encode of the whole render, and the
    mask equals an offset-based reference (tokenizer.json read afresh): a token is trained iff its
    characters lie inside some '<|im_start|>assistant\\n' ... '<|im_end|>\\n' turn body."""
    from zebra.hub import resolve_model_dir

    reference = HFTokenizer.from_file(str(resolve_model_dir("smollm2-135m-instruct") / "tokenizer.json"))
    samples = []
    for path in (CHAT, INSTRUCTIONS):
        rows, schema = load_rows(str(path))
        samples += encode_sft(teacher_tokenizer, rows[:100], schema, str(path))
    head, tail = "<|im_start|>assistant\n", "<|im_end|>\n"
    for sample in samples:
        text = teacher_tokenizer.decode(sample.ids)
        encoding = reference.encode(text, add_special_tokens=False)
        assert sample.ids.tolist() == encoding.ids
        spans, start = [], text.find(head)
        while start >= 0:
            end = text.index(tail, start) + len(tail)
            spans.append((start + len(head), end))
            start = text.find(head, end)
        want = [any(a <= lo and hi <= b for a, b in spans) for lo, hi in encoding.offsets]
        assert sample.mask.tolist() == want
    assert teacher_tokenizer.decode([teacher_tokenizer.eos_token_id]) == "<|im_end|>"


def test_parquet_chat_and_response_column(tokenizer, tmp_path):
    import datasets

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    datasets.Dataset.from_list([{"messages": chat}]).to_parquet(str(tmp_path / "chat.parquet"))
    datasets.Dataset.from_list([{"instruction": "Hi", "response": "Hello!"}]).to_parquet(str(tmp_path / "inst.parquet"))
    (a,), (b,) = (load_sft(str(tmp_path / name), tokenizer) for name in ("chat.parquet", "inst.parquet"))
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask)
    assert [tokenizer.decode(run) for run in masked_runs(a)] == ["Hello!<|im_end|>\n"]
