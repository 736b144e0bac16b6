#!/usr/bin/env python
"""Plot runs' metrics (reward, success and clean rates, KL, completion length, clip fraction, seconds per step,
held-out accuracy) against step, runs overlaid: each step a faint point, a moving average drawn over them. A metric
no run logged, or one that is zero at every step, gets no panel.

    .venv/bin/python scripts/plot_run.py runs/a runs/b --out docs/runs.png
"""

import argparse
import sys

from grpo_ds.plot import plot_runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN/metrics.png of the first run)")
    parser.add_argument("--labels", nargs="*", default=None, help="legend labels, one per run")
    args = parser.parse_args()
    if args.labels and len(args.labels) != len(args.runs):
        print(f"error: --labels: {len(args.labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        path = plot_runs(args.runs, args.out or f"{args.runs[0]}/metrics.png", args.labels)
    except FileNotFoundError as err:
        print(f"error: {err.filename}: not found (not a run folder?)", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
