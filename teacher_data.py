"""Teacher-written chat data for distillation: the teacher answers every prompt of some chat data.

    python teacher_data.py --prompts data/hh_rlhf/helpful-base_test.chat500.jsonl.gz \\
        --out runs/data/teacher.jsonl.gz --samples 2 --temperature 0.7

Each row of the prompt files (any schema zebra.data reads: chat, instruction, hh, preference) is cut
before its last assistant turn; the teacher samples `--samples` answers per prompt, in batches sorted
by prompt length (less padding), and each answer becomes one chat row
{"messages": [...prompt turns..., {"role": "assistant", "content": answer}]}. Why: KD matches the
student to the teacher on the training text, and the teacher's own answers are text where the
teacher is in distribution, so they carry more of its behaviour per token than other models' answers
(MiniLLM / GKD make the same argument); they also multiply a small prompt set into many tokens.
Answers cut by --max-new-tokens are kept and counted; empty answers are dropped. The file is written atomically.
"""

import argparse
import gzip
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from zebra.data import load_rows, sft_messages
from zebra.generate import eos_ids_of, generate
from zebra.hub import load_model


def prompts_of(sources: list[str]) -> list[list[dict]]:
    """Every row's conversation up to (not including) its last assistant turn; plain text rows are skipped."""
    prompts = []
    for source in sources:
        rows, schema = load_rows(source)
        for i, row in enumerate(rows):
            chat = sft_messages(row, schema, f"{source} row {i}")
            if isinstance(chat, str):
                continue
            while chat and chat[-1]["role"] == "assistant":
                chat = chat[:-1]
            if chat:
                prompts.append(chat)
    if not prompts:
        raise ValueError(f"no chat prompts in {sources}")
    return prompts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="teacher: HF directory or named source")
    ap.add_argument("--prompts", nargs="+", required=True, help="chat/instruction/hh/preference files")
    ap.add_argument("--out", required=True, help="output .jsonl.gz")
    ap.add_argument("--samples", type=int, default=1, help="answers per prompt")
    ap.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if not args.out.endswith(".jsonl.gz"):
        raise ValueError(f"--out {args.out!r}: expected a .jsonl.gz path")

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tok = load_model(args.model, device=args.device, dtype=dtype)
    model.eval()
    eos = eos_ids_of(model, tok)
    chats = prompts_of(args.prompts)
    encoded = [(tok.encode(tok.apply_chat_template(c, add_generation_prompt=True)), c) for c in chats]
    kept = [(ids, c) for ids, c in encoded if len(ids) <= args.max_prompt_tokens]
    jobs = sorted(kept * args.samples, key=lambda job: len(job[0]))
    print(f"{len(chats)} prompts, {len(chats) - len(kept)} over {args.max_prompt_tokens} tokens skipped, "
          f"{len(jobs)} answers to write")

    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    out, tmp = Path(args.out), Path(args.out + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    answer_tokens = truncated = empty = 0
    with gzip.open(tmp, "wt", encoding="utf-8") as f, tqdm(total=len(jobs), unit="answer") as bar:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            answers = generate(model, [ids for ids, _ in batch], args.max_new_tokens, eos, args.temperature,
                               args.top_p, pad_id=pad, generator=gen)
            for answer, (_, chat) in zip(answers, batch):
                finished = bool(answer) and answer[-1] in eos
                truncated += not finished
                answer_tokens += len(answer)
                text = tok.decode(answer[:-1] if finished else answer, skip_special_tokens=True).strip()
                if not text:
                    empty += 1
                    continue
                row = {"messages": chat + [{"role": "assistant", "content": text}]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(len(batch))
            bar.set_postfix(answer_tokens=answer_tokens, truncated=truncated, refresh=False)
    os.replace(tmp, out)
    print(f"wrote {out}: {len(jobs) - empty} answers ({empty} empty ones dropped), {answer_tokens} answer tokens, "
          f"{truncated} cut at {args.max_new_tokens}")


if __name__ == "__main__":
    main()
