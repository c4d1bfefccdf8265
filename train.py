"""Distil a Llama into a Zebra hybrid: runs the stages a run config lists, in order.

    python train.py configs/demo.yaml                         # one process (CPU or one GPU)
    python train.py configs/smollm2_gpu.yaml --set kd.train.max_steps=200
    torchrun --nproc-per-node 8 train.py configs/llama-3.2-1b-8mla8m2-run.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py CONFIG

Outputs go to runs/<name>/<stage>/. Re-running the same command skips finished stages and
resumes an interrupted one from its last checkpoint (see zebra/pipeline.py).
"""

import argparse

from zebra.dist import cleanup
from zebra.pipeline import STAGES, load_config, run_pipeline


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="run config (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set kd.train.lr=1e-4 (repeatable)")
    ap.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    ap.add_argument("--restart", action="store_true", help="delete the selected stages' outputs first")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)  # every config error surfaces here, before any work
    try:
        run_pipeline(cfg, only=args.stage, restart=args.restart)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
