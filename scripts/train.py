#!/usr/bin/env python
"""GRPO training on DeepSpeed ZeRO-2/3.

    .venv/bin/deepspeed --num_gpus 8 scripts/train.py --ds_config ds_configs/zero2.json \
        --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --output_dir runs/qwen05
    .venv/bin/deepspeed --num_gpus 2 scripts/train.py --ds_config ds_configs/zero3.json ...  # 2 CPU ranks, no GPU
    .venv/bin/python scripts/train.py ...                                                     # one process

Every flag is a field of grpo_ds.config.Config; `--help` lists them with their defaults and says where a setting
comes from (the command line, then --config FILE or the built-in recipe, then the defaults; docs/FLAGS.md).
Exit codes: 0 done, 2 bad input (one line on stderr), 3 stopped after repeated non-finite steps,
4 another rank died or stopped answering for --dist_timeout minutes (the last line names the step and phase),
143 stopped by SIGTERM/SIGINT after writing a checkpoint (after 4 and 143, resume with --resume_from latest).
"""

import sys

from grpo_ds.config import parse_args
from grpo_ds.distributed import run
from grpo_ds.trainer import NonFiniteError, Preempted, train


def main() -> int:
    cfg = parse_args()
    try:
        train(cfg)
    except ValueError as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except Preempted as err:
        print(str(err), file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
