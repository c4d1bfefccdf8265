"""Evaluation results: one JSON file per model, a side-by-side Markdown table and a PNG plot.

JSON (written atomically: temp file + rename):
    {"model", "date", "config", "settings",
     "tasks":      {task: {metric: value, metric_stderr: stderr, "n", "split", "source"}},
     "perplexity": {name: {"perplexity", "nll_per_token", "tokens", "max_length", "stride"}},
     "kv_cache":   {"bytes_per_token", "constant_bytes", "teacher_bytes_per_token", "percent_of_teacher", ...},
     "throughput": [{"batch", "context", "prefill_tok_s", "decode_tok_s", ...}]}

The headline metric of a task is the one the Zebra-Llama tables use (PAPER.md, section 7):
acc_norm for ARC, HellaSwag, OpenBookQA and PIQA, acc elsewhere. "average" is their mean over
the tasks every compared model has.
"""

import json
import os
import tempfile
from pathlib import Path

HEADLINE = {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
            "openbookqa": "acc_norm", "piqa": "acc_norm"}


def headline(task: str) -> str:
    return HEADLINE.get(task, "acc")


def write_json(path: str | Path, result: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def read_results(paths: list[str | Path]) -> list[dict]:
    results = []
    for p in paths:
        try:
            results.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read results file {p}: {e}") from e
        if "model" not in results[-1]:
            raise ValueError(f"{p}: not an evaluate.py results file (no 'model' key)")
    return results


def average_headline(result: dict, tasks: list[str]) -> float | None:
    values = [result["tasks"][t][headline(t)] for t in tasks]
    return sum(values) / len(values) if values else None


def markdown_table(results: list[dict]) -> str:
    """Tasks (headline metric, in %, ± stderr) down, models across; then KV cache and throughput."""
    names = [r["model"] for r in results]
    header = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    rows = []
    all_tasks = list(dict.fromkeys(t for r in results for t in r.get("tasks", {})))
    common = [t for t in all_tasks if all(t in r.get("tasks", {}) for r in results)]
    for t in all_tasks:
        for metric in ("acc", "acc_norm", "perplexity"):
            if not any(metric in r.get("tasks", {}).get(t, {}) for r in results):
                continue
            scale = 1 if metric == "perplexity" else 100
            cells = []
            for r in results:
                m = r.get("tasks", {}).get(t)
                cells.append(f"{m[metric] * scale:.2f} ± {m[metric + '_stderr'] * scale:.2f}" if m and metric in m else "")
            mark = " *" if metric == headline(t) else ""
            n = next(r["tasks"][t]["n"] for r in results if t in r.get("tasks", {}))
            rows.append(f"| {t} {metric}{mark} (n={n}) | " + " | ".join(cells) + " |")
    if common:
        rows.append(f"| **average*** ({len(common)} tasks) | "
                    + " | ".join(f"**{100 * average_headline(r, common):.2f}**" for r in results) + " |")
    for name in list(dict.fromkeys(p for r in results for p in r.get("perplexity", {}))):
        rows.append(f"| ppl {name} | " + " | ".join(
            f"{r['perplexity'][name]['perplexity']:.3f}" if name in r.get("perplexity", {}) else "" for r in results) + " |")
    if any("kv_cache" in r for r in results):
        rows.append("| KV bytes / token | " + " | ".join(
            f"{r['kv_cache']['bytes_per_token']:,}" if "kv_cache" in r else "" for r in results) + " |")
        rows.append("| KV % of teacher | " + " | ".join(
            f"{r['kv_cache']['percent_of_teacher']:.2f}%" if "kv_cache" in r else "" for r in results) + " |")
    for point in sorted({(p["batch"], p["context"]) for r in results for p in r.get("throughput", [])}):
        for key, label in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")):
            cells = [next((f"{p[key]:,.0f}" for p in r.get("throughput", []) if (p["batch"], p["context"]) == point), "")
                     for r in results]
            rows.append(f"| {label} tok/s (b={point[0]}, ctx={point[1]}) | " + " | ".join(cells) + " |")
    note = "\n\n`*` headline metric (acc_norm for ARC, HellaSwag, OpenBookQA, PIQA; acc otherwise), in %, ± stderr."
    return header + "\n".join(rows) + (note if all_tasks else "") + "\n"


def plot(results: list[dict], path: str | Path):
    """Left: average headline accuracy vs KV cache % of the teacher. Right: decode tokens/s vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_tps) = plt.subplots(1, 2, figsize=(11, 4.2))
    common = [t for t in results[0].get("tasks", {}) if all(t in r.get("tasks", {}) for r in results)]
    for r in results:
        if "kv_cache" in r and common:
            x, y = r["kv_cache"]["percent_of_teacher"], 100 * average_headline(r, common)
            ax_acc.scatter(x, y)
            ax_acc.annotate(r["model"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        points = sorted((p["context"], p["decode_tok_s"]) for p in r.get("throughput", []))
        if points:
            ax_tps.plot(*zip(*points), marker="o", label=f"{r['model']} (b={r['throughput'][0]['batch']})")
    ax_acc.set(xlabel="KV cache, % of the teacher", ylabel=f"average accuracy over {len(common)} tasks (%)",
               title="accuracy vs KV cache")
    ax_tps.set(xlabel="context length (tokens)", ylabel="decode tokens/s", title="throughput vs context", xscale="log")
    if ax_tps.lines:
        ax_tps.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
