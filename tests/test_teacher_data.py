"""teacher_data.py: the teacher's answers, batched and length-sorted, equal one-prompt greedy generation."""

import gzip
import json

import teacher_data
from zebra.generate import eos_ids_of, generate
from zebra.hub import load_model

def test_rows_are_prompts_plus_the_teachers_own_answers(tmp_path, teacher_dir):
    chats = [
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Count from one to five, please."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]},
    ]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = tmp_path / "answers.jsonl.gz"
    teacher_data.main(["--model", str(teacher_dir), "--prompts", str(src), "--out", str(out), "--samples", "2",
                       "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu"])
    rows = [json.loads(line) for line in gzip.open(out, "rt")]

    model, tok = load_model(teacher_dir)
    eos = eos_ids_of(model, tok)
    expected = []
    for chat in chats:
        prompt = chat["messages"][:-1] if chat["messages"][-1]["role"] == "assistant" else chat["messages"]
        ids = tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True))
        (answer,) = generate(model, [ids], 6, eos)  # alone: no padding, no batch neighbours
        answer = answer[:-1] if answer and answer[-1] in eos else answer
        text = tok.decode(answer, skip_special_tokens=True).strip()
        expected += [prompt + [{"role": "assistant", "content": text}]] * 2 if text else []

    key = lambda messages: json.dumps(messages)  # noqa: E731  (rows come sorted by prompt length)
    assert sorted(map(key, (r["messages"] for r in rows))) == sorted(map(key, expected))
