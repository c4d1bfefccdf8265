"""Parity with lm-evaluation-harness: the same rows scored by lm-eval (HF backend) and by zebra.eval.

    python bench/lm_eval_parity.py --model smollm2-135m-instruct --data-dir ../shared/data/eval \
        --limit 500 --lm-eval /tmp/lmeval/bin/lm_eval

1. Writes the first --limit rows of each task, in the hub schema our loader produces, to
   runs/lm_eval_parity/data/<task>.jsonl; bench/lm_eval_tasks/*.yaml are the official task
   yamls pointed at these files (`dataset_path: json`).
2. Runs `lm_eval --model hf` (a separate venv: lm-eval is never a Zebra dependency) on the model
   directory with --log_samples, in float32, no BOS (lm-eval's default for this tokenizer).
3. Scores the same rows with our Llama and zebra.eval.harness (in this process, float32).
4. Prints a Markdown table (metric in points, |diff|) plus the largest per-request |log-likelihood|
   difference, and exits 1 if any metric differs by more than --tolerance points.
Steps 2 and 3 can run side by side (one with --skip-ours, one with --skip-lm-eval); a run with
both flags only compares the saved results.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from zebra.eval.harness import encode_pair, loglikelihoods, score_docs
from zebra.eval.tasks import TASKS, get_task, load_rows
from zebra.hub import load_llama, resolve_model_dir

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "lm_eval_parity"  # the yamls read OUT/data/<task>.jsonl (relative to ROOT)


def write_data(tasks, data_dir: str, limit: int | None):
    """Atomically (temp + rename): an lm-eval run and ours may start side by side."""
    (OUT / "data").mkdir(parents=True, exist_ok=True)
    for task in tasks:
        rows, _ = load_rows(task, data_dir, limit)
        tmp = OUT / "data" / f"{task.name}.jsonl.{os.getpid()}"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, OUT / "data" / f"{task.name}.jsonl")


def run_lm_eval(lm_eval: str, model_dir: Path, tasks, device: str, batch_size: int):
    cmd = [lm_eval, "run", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", ",".join(f"zebra_{t.name}" for t in tasks), "--include_path", str(ROOT / "bench" / "lm_eval_tasks"),
           "--device", device, "--batch_size", str(batch_size), "--output_path", str(OUT / "lm_eval"), "--log_samples"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def lm_eval_results(task: str, n: int) -> tuple[dict, list]:
    """{metric: value} and [(request pairs, lls) per doc] of the newest lm-eval run of `task` on n docs."""
    name = f"zebra_{task}"
    files = sorted((OUT / "lm_eval").rglob("results_*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for f in files:
        saved = json.loads(f.read_text())
        if saved["n-samples"].get(name, {}).get("effective") == n:
            break
    else:
        raise SystemExit(f"no lm-eval results for {task} on {n} docs under {OUT / 'lm_eval'}")
    metrics = {k.split(",")[0]: v for k, v in saved["results"][name].items() if k.endswith(",none")}
    stamp = f.stem.removeprefix("results_")
    docs = [json.loads(line) for line in open(f.parent / f"samples_{name}_{stamp}.jsonl")]
    return metrics, [([list(a.values()) for a in d["arguments"].values()], [float(r[0][0]) for r in d["resps"]])
                     for d in sorted(docs, key=lambda d: d["doc_id"])]


def run_ours(model_source, tasks, device, batch_size):
    model, tokenizer = load_llama(model_source, device=device, dtype=torch.float32)
    for task in tasks:  # the rows lm-eval reads, formatted by our task code
        t0 = time.time()
        docs = [task.to_doc(json.loads(line)) for line in open(OUT / "data" / f"{task.name}.jsonl")]
        requests = [encode_pair(tokenizer, c, x) for d in docs for c, x in d.pairs]
        flat = loglikelihoods(model, requests, batch_size, model.config.max_position_embeddings, device, task.name)
        per_doc, k = [], 0
        for d in docs:
            per_doc.append(flat[k:k + len(d.pairs)])
            k += len(d.pairs)
        out = {"metrics": score_docs(task, docs, per_doc), "lls": [[ll for ll, _ in r] for r in per_doc],
               "pairs": [d.pairs for d in docs], "seconds": time.time() - t0}
        (OUT / f"zebra_{task.name}_{len(docs)}.json").write_text(json.dumps(out))


def compare(tasks, n: int, tolerance: float) -> bool:
    print("| task | n | metric | lm-eval | zebra | abs diff | same request strings | max abs diff log-lik |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for task in tasks:
        ref_metrics, ref = lm_eval_results(task.name, n)
        mine = json.loads((OUT / f"zebra_{task.name}_{n}.json").read_text())
        same = sum(pairs == [list(p) for p in ours_pairs] for (pairs, _), ours_pairs in zip(ref, mine["pairs"]))
        max_dll = max(abs(a - b) for (_, la), lb in zip(ref, mine["lls"]) for a, b in zip(la, lb))
        ok &= same == len(ref)
        for metric in task.metrics:
            scale = 1 if metric == "perplexity" else 100
            a, b = ref_metrics[metric] * scale, mine["metrics"][metric] * scale
            ok &= abs(a - b) <= tolerance if metric != "perplexity" else abs(a - b) / a <= 1e-3
            print(f"| {task.name} | {len(ref)} | {metric} | {a:.2f} | {b:.2f} | {abs(a - b):.2f} | "
                  f"{same}/{len(ref)} | {max_dll:.1e} |")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data-dir", help="local task files (layout of shared/data/eval)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--lm-eval", default="/tmp/lmeval/bin/lm_eval", help="the lm_eval executable of its own venv")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=0.5, help="points")
    ap.add_argument("--skip-lm-eval", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    args = ap.parse_args()
    tasks = [get_task(t) for t in args.tasks.split(",")]
    model_dir = resolve_model_dir(args.model)
    if not (args.skip_lm_eval and args.skip_ours):
        write_data(tasks, args.data_dir, args.limit)
    if not args.skip_lm_eval:
        t0 = time.time()
        run_lm_eval(args.lm_eval, model_dir, tasks, args.device, args.batch_size)
        print(f"lm-eval: {time.time() - t0:.0f} s", flush=True)
    if not args.skip_ours:
        t0 = time.time()
        run_ours(model_dir, tasks, args.device, args.batch_size)
        print(f"zebra: {time.time() - t0:.0f} s", flush=True)
    if args.skip_lm_eval == args.skip_ours:  # both ran here, or both skipped: compare
        sys.exit(0 if compare(tasks, args.limit, args.tolerance) else 1)


if __name__ == "__main__":
    main()
