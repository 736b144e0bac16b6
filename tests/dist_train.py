"""Run under the deepspeed launcher by tests/test_distributed.py: train a few steps and record, after every step,
each rank's weight fingerprint and how much of the reference model this rank holds."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # for the learnable reward module

from grpo_ds import distributed as dist  # noqa: E402
from grpo_ds.config import parse_args  # noqa: E402
from grpo_ds.trainer import train  # noqa: E402


def main() -> None:
    cfg = parse_args()
    records = []

    def on_step_end(step, policy, reference, metrics):
        held = full = 0
        for p in reference.module.parameters():
            full += getattr(p, "ds_numel", p.numel())
            # a partitioned ZeRO-3 parameter's data is empty and its shard lives in ds_tensor; a persistent or
            # replicated one holds all of its data
            held += p.data.numel() or p.ds_tensor.numel()
        records.append({"step": step, "fingerprint": float(dist.weights_fingerprint(policy)),
                        "reference_held": held, "reference_full": full, "metrics": metrics})

    train(cfg, on_step_end=on_step_end)
    rank = torch.distributed.get_rank()
    Path(cfg.output_dir, f"rank{rank}.json").write_text(json.dumps(records))


if __name__ == "__main__":
    main()
