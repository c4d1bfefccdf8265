"""Run one distillation stage of a run config: ILD of the two pure students, or end-to-end KD.

    python distill.py configs/demo.yaml --stage ild
    python distill.py configs/demo.yaml --stage kd --set kd.init_from=runs/other/kd/model
"""

import argparse

import train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--stage", required=True, choices=["ild", "kd"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    train.main([args.config, "--stage", args.stage, *(x for kv in args.set for x in ("--set", kv))])


if __name__ == "__main__":
    main()
