#!/usr/bin/env python
"""Convert a grpo_ds checkpoint (DeepSpeed ZeRO-1/2/3, any number of ranks) to a Hugging Face folder.

    .venv/bin/python scripts/export.py runs/x/checkpoints OUT_DIR [--dtype bf16|fp32]   # the latest checkpoint
    .venv/bin/python scripts/export.py runs/x/checkpoints/step_0000050 OUT_DIR
"""

import argparse
import sys

import torch

from grpo_ds.checkpoint import export_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoints/ folder (its latest) or one checkpoints/step_N folder")
    parser.add_argument("output", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' dtype")
    args = parser.parse_args()
    try:
        path = export_checkpoint(args.checkpoint, args.output,
                                 {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
