"""`python evaluate.py`: evaluate one or more models and write JSON, a Markdown table and a plot.

    python evaluate.py --model smollm2-135m-instruct --tasks piqa,arc_easy --limit 100 \
        --data-dir ../shared/data/eval
    python evaluate.py --model teacher_dir --model runs/demo/kd --ppl book.txt \
        --kv-contexts 4096 --throughput-contexts 128,512,2048 --out runs/eval
    python evaluate.py --report runs/eval/a.json runs/eval/b.json --out runs/eval   # tables only

Each model gets `<out>/<name>.json`; all models of the run (or the --report files) go side by
side into `<out>/report.md` and `<out>/report.png`.
"""

import argparse
import datetime
import os
from pathlib import Path

import torch

from zebra.data import read_json_rows
from zebra.eval import report
from zebra.eval.harness import evaluate_task, perplexity
from zebra.eval.speed import kv_cache_report, throughput
from zebra.eval.tasks import TASKS, get_task, load_docs
from zebra.hub import load_model

DEFAULT_TASKS = "hellaswag,piqa,arc_easy,arc_challenge,winogrande,openbookqa,lambada_openai"


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="HF model dir or named source (repeatable)")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list or 'all' ({', '.join(TASKS)}); '' for none")
    ap.add_argument("--data-dir", default=os.environ.get("ZEBRA_EVAL_DATA"),
                    help="local task files (layout of shared/data/eval; default $ZEBRA_EVAL_DATA); "
                         "without it the tasks load by their datasets hub names")
    ap.add_argument("--limit", type=int, help="first N docs of each task (as lm-eval --limit)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, help="left-truncate inputs (default: max_position_embeddings)")
    ap.add_argument("--add-bos", action="store_true", help="prepend BOS to every context (lm-eval add_bos_token)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--ppl", action="append", default=[], help="text file (.txt, or .jsonl with a 'text' field) "
                    "or a datasets name[:config] (split --ppl-split) for sliding-window perplexity")
    ap.add_argument("--ppl-split", default="test")
    ap.add_argument("--ppl-max-length", type=int, default=1024)
    ap.add_argument("--ppl-stride", type=int, default=512)
    ap.add_argument("--kv-contexts", type=ints, default=[], help="e.g. 4096,32768: KV report at these lengths")
    ap.add_argument("--kv-batch", type=int, default=1)
    ap.add_argument("--kv-dtype-bytes", type=int, default=2, help="bytes per cached number (2: bf16/fp16)")
    ap.add_argument("--throughput-contexts", type=ints, default=[], help="e.g. 128,512,2048")
    ap.add_argument("--throughput-batch", type=int, default=1)
    ap.add_argument("--throughput-steps", type=int, default=32, help="decode steps timed after the prefill")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--report", nargs="+", default=[], help="only tabulate these results JSON files")
    ap.add_argument("--out", default="runs/eval")
    args = ap.parse_args(argv)
    if not args.model and not args.report:
        ap.error("give --model (one or more) or --report FILES")
    names = list(TASKS) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    args.tasks = [get_task(t) for t in names]  # a bad name fails here, before any model loads
    for spec in args.ppl:
        if spec.endswith((".txt", ".jsonl", ".json")) and not Path(spec).is_file():
            raise ValueError(f"--ppl: no such file {spec}")
    return args


def read_text(spec: str, split: str) -> str:
    """A text file as it is; a jsonl file or a hub dataset as its 'text' rows joined by blank lines."""
    if spec.endswith(".txt"):
        return Path(spec).read_text(encoding="utf-8")
    if spec.endswith((".jsonl", ".json")):
        rows = read_json_rows(spec)
    else:
        import datasets

        name, _, config = spec.partition(":")
        rows = list(datasets.load_dataset(name, config or None, split=split))
    if not rows or any("text" not in row for row in rows):
        raise ValueError(f"--ppl {spec}: expected a 'text' field in every row")
    return "\n\n".join(row["text"] for row in rows)


def model_name(source: str) -> str:
    """A short name for tables: the directory's name, or run-stage for a pipeline's <run>/<stage>/model."""
    path = Path(source)
    return f"{path.parent.parent.name}-{path.parent.name}" if path.name == "model" else path.name


def evaluate_model(source: str, args, task_docs: dict) -> dict:
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(source, device=args.device, dtype=dtype)
    max_length = args.max_length or model.config.max_position_embeddings
    result = {"model": model_name(source), "source": str(source),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": model.config.to_dict(),
              "settings": {"limit": args.limit, "batch_size": args.batch_size, "max_length": max_length,
                           "add_bos": args.add_bos, "device": args.device, "dtype": args.dtype,
                           "data_dir": args.data_dir, "num_fewshot": 0},
              "tasks": {}, "perplexity": {}}
    for task in args.tasks:
        docs, split = task_docs[task.name]
        metrics = evaluate_task(model, tokenizer, task, docs, args.batch_size, max_length, args.device, args.add_bos)
        result["tasks"][task.name] = {**metrics, "split": split, "source": "local" if args.data_dir else "hub"}
        print(f"{result['model']} {task.name}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in metrics.items() if k in task.metrics))
    for spec in args.ppl:
        ids = tokenizer.encode(read_text(spec, args.ppl_split))
        result["perplexity"][Path(spec).name] = perplexity(
            model, ids, args.ppl_max_length, args.ppl_stride, args.batch_size, args.device)
        print(f"{result['model']} ppl {spec}: {result['perplexity'][Path(spec).name]['perplexity']:.3f}")
    if args.kv_contexts:
        result["kv_cache"] = kv_cache_report(model, args.kv_contexts, args.kv_batch, args.kv_dtype_bytes)
    result["throughput"] = [throughput(model, args.throughput_batch, t, args.throughput_steps, args.repeats)
                            for t in args.throughput_contexts]
    for point in result["throughput"]:
        print(f"{result['model']} b={point['batch']} ctx={point['context']}: prefill {point['prefill_tok_s']:,.0f} "
              f"tok/s, decode {point['decode_tok_s']:,.0f} tok/s")
    return result


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    results, written = report.read_results(args.report), []
    # every task's data is read before any model loads, so a bad file fails fast
    task_docs = {task.name: load_docs(task, args.data_dir, args.limit) for task in args.tasks} if args.model else {}
    for source in args.model:
        result = evaluate_model(source, args, task_docs)
        written.append(out / f"{result['model']}.json")
        report.write_json(written[-1], result)
        results.append(result)
    (out / "report.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report.markdown_table(results))
    report.plot(results, out / "report.png")
    print(report.markdown_table(results))
    print("wrote " + ", ".join(map(str, [out / "report.md", out / "report.png", *written])))
