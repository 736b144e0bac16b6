#!/usr/bin/env python
"""GRPO training on DeepSpeed ZeRO-2/3.

    deepspeed --num_gpus 8 scripts/train.py --ds_config ds_configs/zero2.json --model Qwen/Qwen2.5-0.5B-Instruct \
        --dataset openai/gsm8k --output_dir runs/qwen05
    deepspeed --num_gpus 2 scripts/train.py --ds_config ds_configs/zero3.json ...   # 2 CPU ranks on a CPU-only host
    python scripts/train.py ...                                                       # one process, no launcher

Every flag is a field of grpo_ds.config.Config; `--help` lists them with their defaults.
"""

import sys

from grpo_ds.config import parse_args
from grpo_ds.trainer import train


def main() -> int:
    cfg = parse_args()
    try:
        train(cfg)
    except ValueError as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
