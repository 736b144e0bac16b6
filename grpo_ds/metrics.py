"""Logging a run: metrics.jsonl (always), DeepSpeed's monitors (tensorboard, wandb) for --report_to, a progress bar,
and sample completions. Only rank 0 writes; the values it receives are already reduced over ranks."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

# The order of the console summary; every key is also in metrics.jsonl.
CONSOLE_KEYS = ("reward_mean", "success_rate", "clean_rate", "kl", "loss", "completion_len_mean", "step_s")


def setup_logging(rank: int) -> None:
    """INFO from grpo_ds on rank 0, warnings only elsewhere; DeepSpeed's INFO chatter is quieted."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[grpo_ds rank{rank}] %(message)s", force=True)
    logging.getLogger("grpo_ds").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass


def _plain(value):
    """JSON-friendly numbers: tensors to floats; a non-finite float becomes null (None), so every column of
    metrics.jsonl holds numbers or null and reads as a number column in pandas or jq."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, output_dir: str, rank: int, total_steps: int, monitor=None, first_step: int = 1):
        self.rank = rank
        self.monitor = monitor
        self.path = Path(output_dir) / "metrics.jsonl"
        self.completions_path = Path(output_dir) / "completions.jsonl"
        self.bar = None
        if rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step - 1, desc="grpo", unit="step", dynamic_ncols=True,
                            disable=os.environ.get("GRPO_DS_NO_PROGRESS") == "1")

    def log(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            self.monitor.write_events([(f"train/{k}", float(v), step) for k, v in row.items()
                                       if k not in ("step", "time") and isinstance(v, (int, float))])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{row[k]:.3g}" for k in CONSOLE_KEYS if isinstance(row.get(k), (int, float))},
                                 refresh=False)
            logging.getLogger("grpo_ds").info(
                "step %d: %s", step, " ".join(f"{k}={row[k]:.4g}" for k in CONSOLE_KEYS
                                              if isinstance(row.get(k), (int, float))))

    def completions(self, step: int, rows: list[dict]) -> None:
        if self.rank != 0:
            return
        with open(self.completions_path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(output_dir: str) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]

