#!/usr/bin/env python
"""Benchmark grpo_ds: N GRPO steps with fixed settings; prints a table and writes JSON.

    python scripts/bench.py --steps 4 --warmup 1 --fixed_length true --max_new_tokens 128 ...
    deepspeed --num_gpus 2 scripts/bench.py --ds_config ds_configs/zero2.json ...

Every training flag is accepted (scripts/train.py --help). Reported per step, as medians over the steps after the
warm-up: seconds per step and per phase (rollout, reference, old log-probs, train), rollout tokens/s (completion
tokens over all ranks per second of generation), completions/s and completion tokens/s end to end (over the whole
step), and peak memory per rank (RSS on CPU, the allocator's peak on GPUs). `--fixed_length true` suppresses EOS
so every completion is exactly max_new_tokens long, which makes runs comparable across implementations whose
sampling differs.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from grpo_ds import distributed as dist
from grpo_ds.config import build_parser, Config
from grpo_ds.trainer import train

PHASES = ("step_s", "rollout_s", "reference_s", "old_logprobs_s", "train_s")


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def main() -> int:
    parser = build_parser(Config(save_steps=0, log_completions_steps=0, output_dir="runs/bench"))
    parser.add_argument("--steps", type=int, default=4, help="measured steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    parser.add_argument("--json", default=None, help="where to write the results (default: OUTPUT_DIR/bench.json)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = vars(parser.parse_args())
    steps, warmup, json_path = args.pop("steps"), args.pop("warmup"), args.pop("json")
    args.pop("local_rank")
    if steps < 1 or warmup < 0:
        print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    cfg = Config(**{**args, "max_steps": warmup + steps})
    started = time.time()
    try:
        history = train(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    peaks = dist.all_gather_objects(peak_memory_bytes())
    reserved = dist.all_gather_objects(torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0)
    if torch.distributed.get_rank() != 0:
        return 0
    measured = history[warmup:]
    completions = cfg.rollouts_per_step * cfg.group_size
    median = {k: statistics.median(r[k] for r in measured) for k in (*PHASES, "rollout_tokens_per_s",
                                                                      "completion_len_mean")}
    result = {
        "settings": cfg.to_dict(), "world_size": len(peaks), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "warmup_steps": warmup, "measured_steps": steps, "wall_s": round(time.time() - started, 1),
        "median": median,
        "completions_per_s": completions / median["step_s"],
        "completion_tokens_per_s": completions * median["completion_len_mean"] / median["step_s"],
        "peak_memory_gib_per_rank": [round(p / 1024 ** 3, 3) for p in peaks],
        "peak_reserved_gib_per_rank": [round(p / 1024 ** 3, 3) for p in reserved],  # the CUDA caching allocator's
        "steps": measured,
    }
    path = Path(json_path or Path(cfg.output_dir) / "bench.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    rows = [(k, f"{median[k]:.2f}") for k in PHASES]
    rows += [("rollout tokens/s", f"{median['rollout_tokens_per_s']:.1f}"),
             ("completions/s (end to end)", f"{result['completions_per_s']:.3f}"),
             ("completion tokens/s (end to end)", f"{result['completion_tokens_per_s']:.1f}"),
             ("completion length (mean)", f"{median['completion_len_mean']:.1f}"),
             ("peak memory per rank (GiB)", ", ".join(f"{p:.2f}" for p in result["peak_memory_gib_per_rank"]))]
    print(f"\ngrpo_ds bench: {len(peaks)} rank(s), {cfg.rollouts_per_step} prompts x {cfg.group_size}, "
          f"{cfg.max_new_tokens} new tokens{' (fixed length)' if cfg.fixed_length else ''}; median of {steps} "
          f"step(s) after {warmup} warm-up")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"  -> {path}")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        dist.shutdown()
    sys.exit(code)
