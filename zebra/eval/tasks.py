"""Zero-shot tasks, formatted exactly as lm-evaluation-harness 0.4 formats them.

Reference: EleutherAI/lm-evaluation-harness @ 4e7e0d47, `lm_eval/tasks/<task>/*.yaml` and
`lm_eval/api/task.py` (`construct_requests`, `process_results`). Every task becomes a list of
`Doc`s; a doc is one (context, continuation) pair per choice:

    multiple choice   pairs = [(doc_to_text(doc), " " + choice) for choice in doc_to_choice(doc)]
    winogrande        pairs = [(partial_context, " " + partial_target) for each option]
    lambada_openai    pairs = [(" ".join(words[:-1]), " " + words[-1])]   (output_type loglikelihood)

Rows are first brought to the schema of the Hugging Face dataset that lm-eval reads (so the
formatters below read like the official yamls), either from the original files in a local
data directory (same layout as `shared/data/eval`, see its README) or with
`datasets.load_dataset` from the hub.
"""

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Doc:
    pairs: list[tuple[str, str]]  # (context, continuation) per choice
    choices: list[str]  # lm-eval's doc_to_choice: acc_norm divides by len(choice) in characters
    gold: int


@dataclass(frozen=True)
class Task:
    name: str
    metrics: tuple[str, ...]  # the yaml's metric_list
    files: tuple[str, ...]  # local files, relative to the data dir
    split: str  # the split of the local files
    hub: tuple[str, str | None, str]  # (dataset path, config name, split) as in the yaml
    read_local: Callable[[list[Path]], list[dict]]  # local files -> rows in the hub schema
    to_doc: Callable[[dict], Doc]


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    """The common multiple-choice request: target_delimiter " " before every choice."""
    return Doc(pairs=[(context, " " + c) for c in choices], choices=choices, gold=gold)


# --- hellaswag (lm_eval/tasks/hellaswag/utils.py) ---
def hellaswag_preprocess(text: str) -> str:
    """WikiHow clean-up, quirks included: " [title]" -> ". " can leave "..", one pass of "  " -> " "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Doc:
    # str.capitalize() also lower-cases the rest of ctx_b, as lm-eval does.
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    return _mc(query, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


# --- piqa, arc, openbookqa, boolq, sciq: plain templates from their yamls ---
def _piqa(row: dict) -> Doc:
    return _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _arc(row: dict) -> Doc:
    ch = row["choices"]
    return _mc(f"Question: {row['question']}\nAnswer:", list(ch["text"]), ch["label"].index(row["answerKey"]))


def _openbookqa(row: dict) -> Doc:
    ch = row["choices"]
    return _mc(row["question_stem"], list(ch["text"]), ch["label"].index(row["answerKey"].lstrip()))


def _boolq(row: dict) -> Doc:
    return _mc(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["label"]))


def _sciq(row: dict) -> Doc:
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _mc(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


# --- winogrande (lm_eval/tasks/winogrande/preprocess_winogrande.py): partial scoring ---
def _winogrande(row: dict) -> Doc:
    sentence = row["sentence"]
    i = sentence.index("_")
    contexts = [sentence[:i] + row["option1"], sentence[:i] + row["option2"]]
    target = " " + sentence[i + 1 :].strip()
    return Doc(pairs=[(c, target) for c in contexts], choices=contexts, gold={"1": 0, "2": 1}[row["answer"]])


# --- lambada_openai: loglikelihood of the last word (split on " " only, as the yaml does) ---
def _lambada(row: dict) -> Doc:
    words = row["text"].split(" ")
    return Doc(pairs=[(" ".join(words[:-1]), " " + words[-1])], choices=[words[-1]], gold=0)


# --- local files (original formats, shared/data/eval/README.md) -> hub schema ---
def _with_labels(choices: list[str], gold: int) -> dict:
    """Local ARC/OBQA files keep only the gold index; the letters stand in for the original labels."""
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    return {"choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}


def _local_piqa(paths: list[Path]) -> list[dict]:
    rows = _read_jsonl(paths[0])
    labels = [int(x) for x in paths[1].read_text().split()]
    if len(labels) != len(rows):
        raise ValueError(f"{paths[1]}: {len(labels)} labels for {len(rows)} rows in {paths[0]}")
    return [{**row, "label": label} for row, label in zip(rows, labels)]


def _local_choices(paths: list[Path]) -> list[dict]:
    return [{**r, **_with_labels(r["choices"], r["gold"])} for r in _read_jsonl(paths[0])]


def _local_jsonl(paths: list[Path]) -> list[dict]:
    return _read_jsonl(paths[0])


MC = ("acc", "acc_norm")
TASKS = {
    t.name: t
    for t in [
        Task("hellaswag", MC, ("hellaswag/hellaswag_val.jsonl.gz",), "validation",
             ("Rowan/hellaswag", None, "validation"), _local_jsonl, _hellaswag),
        Task("piqa", MC, ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation",
             ("baber/piqa", None, "validation"), _local_piqa, _piqa),
        Task("arc_easy", MC, ("arc_easy/ARC-Easy-Test.jsonl",), "test",
             ("allenai/ai2_arc", "ARC-Easy", "test"), _local_choices, _arc),
        Task("arc_challenge", MC, ("arc_challenge/ARC-Challenge-Test.jsonl",), "test",
             ("allenai/ai2_arc", "ARC-Challenge", "test"), _local_choices, _arc),
        Task("winogrande", ("acc",), ("winogrande/winogrande_xl_dev.jsonl",), "validation",
             ("allenai/winogrande", "winogrande_xl", "validation"), _local_jsonl, _winogrande),
        Task("openbookqa", MC, ("openbookqa/test.jsonl",), "test",
             ("allenai/openbookqa", "main", "test"), _local_choices, _openbookqa),
        Task("lambada_openai", ("perplexity", "acc"), ("lambada_openai/lambada_test.jsonl",), "test",
             ("EleutherAI/lambada_openai", "default", "test"), _local_jsonl, _lambada),
        Task("boolq", ("acc",), ("boolq/boolq_validation.jsonl",), "validation",
             ("aps/super_glue", "boolq", "validation"), _local_jsonl, _boolq),
        # lm-eval scores the sciq *test* split; the local file is validation (recorded in the output).
        Task("sciq", MC, ("sciq/sciq_validation.jsonl",), "validation",
             ("allenai/sciq", None, "test"), _local_jsonl, _sciq),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def local_paths(task: Task, data_dir: str | Path) -> list[Path]:
    """The task's files under data_dir, checked before any model work."""
    paths = [Path(data_dir) / f for f in task.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"task {task.name}: missing data file(s) {', '.join(missing)} "
                         f"(--data-dir must have the layout of shared/data/eval)")
    return paths


def load_rows(task: Task, data_dir: str | Path | None, limit: int | None = None) -> tuple[list[dict], str]:
    """Rows in the hub schema and the split they come from; the first `limit` rows, as lm-eval --limit."""
    if data_dir is None:
        import datasets

        path, config, split = task.hub
        try:
            rows = list(datasets.load_dataset(path, config, split=split))
        except Exception as e:  # offline, or the hub changed: say what to do instead
            raise ValueError(f"task {task.name}: cannot load {path} ({config}, {split}) with datasets: {e}; "
                             f"pass --data-dir (or set ZEBRA_EVAL_DATA) to a directory laid out as "
                             f"shared/data/eval") from e
    else:
        paths = local_paths(task, data_dir)
        try:
            rows, split = task.read_local(paths), task.split
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise ValueError(f"task {task.name}: cannot read {', '.join(map(str, paths))}: {e}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"task {task.name}: a row of {paths[0]} does not have the expected schema ({e!r})") from e
    return rows[:limit] if limit is not None else rows, split


def load_docs(task: Task, data_dir: str | Path | None, limit: int | None = None) -> tuple[list[Doc], str]:
    rows, split = load_rows(task, data_dir, limit)
    try:
        return [task.to_doc(r) for r in rows], split
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"task {task.name}: a row does not have the expected schema ({e!r})") from e
