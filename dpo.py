"""Run the DPO stage of a run config (policy: the run's KD result, or --set dpo.init_from=DIR).

    python dpo.py configs/demo.yaml
"""

import argparse

import train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    train.main([args.config, "--stage", "dpo", *(x for kv in args.set for x in ("--set", kv))])


if __name__ == "__main__":
    main()
