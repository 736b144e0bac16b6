#!/usr/bin/env python
"""Benchmark grpo_ds: N GRPO steps with fixed settings; prints a table and writes JSON.

    .venv/bin/python scripts/bench.py --steps 4 --warmup 1 --fixed_length true --max_new_tokens 128 ...
    .venv/bin/deepspeed --num_gpus 2 scripts/bench.py --ds_config ds_configs/zero2.json ...
    .venv/bin/python scripts/bench.py --vs trl --nproc 2 --rounds 2 ...   # side by side with TRL's GRPOTrainer

With `--vs trl` this process only orchestrates: each round runs grpo_ds and then TRL (scripts/bench_trl.py, the
same flags translated to GRPOConfig; the order flips every round), each as its own job of --nproc ranks under the
deepspeed launcher (or one plain process), and prints both sides' medians over every measured step and the ratio
TRL / grpo_ds per phase: above 1 means grpo_ds is faster. TRL comes from the optional extra: pip install -e '.[bench]'.

Every training flag is accepted (scripts/train.py --help), layered as train.py layers them: the command line, then
`--config FILE` (or, for the embedded model on the built-in arithmetic, its recipe), then the defaults; the
benchmark writes no checkpoints unless asked. Reported per step, as medians over the steps after the
warm-up: seconds per step and per phase (rollout, reference, old log-probs, train), rollout tokens/s (completion
tokens over all ranks per second of generation), completions/s and completion tokens/s end to end (over the whole
step), and peak memory per rank up to the end of the last step (RSS on CPU, the allocator's peak on GPUs; the
final export that follows, which for LoRA builds a merged copy, is not counted). `--fixed_length true` suppresses EOS
so every completion is exactly max_new_tokens long, which makes runs comparable across implementations whose
sampling differs.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from grpo_ds import distributed
from grpo_ds.config import Config, build_parser, resolve
from grpo_ds.trainer import train

PHASES = ("step_s", "rollout_s", "reference_s", "old_logprobs_s", "train_s")


def bench_parser() -> argparse.ArgumentParser:
    """Every training flag, plus the benchmark's own: --steps, --warmup, --json."""
    parser = build_parser(suppress=True)  # flags not given stay absent, so that --config and the recipe can fill them
    parser.add_argument("--steps", type=int, default=4, help="measured steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    parser.add_argument("--json", default=None, help="where to write the results (default: OUTPUT_DIR/bench.json)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def bench_config(given: dict, output_dir: str, max_steps: int) -> Config:
    """The Config a benchmark runs: the flags given, over the benchmark's own defaults (no checkpoints, no sample
    completions, no held-out evaluation: the recipe's would land in the last step's time), over --config FILE or the
    embedded model's recipe, exactly as scripts/train.py layers them."""
    return resolve({**given, "max_steps": max_steps},
                   defaults={"save_steps": 0, "log_completions_steps": 0, "eval_steps": 0, "output_dir": output_dir})


def summarize(cfg: Config, measured: list[dict], **fields) -> dict:
    """The JSON of a benchmark run: medians over the measured steps' rows, completions/s and completion tokens/s
    end to end, the settings, `fields`, and the rows themselves."""
    keys = (*PHASES, "rollout_tokens_per_s", "completion_len_mean", "update_wait_s", "update_wait_s_max",
            "rank_tokens_max", "rank_tokens_min")
    median = {k: statistics.median(r.get(k, 0.0) for r in measured) for k in keys}
    completions = cfg.rollouts_per_step * cfg.group_size
    return {"settings": cfg.to_dict(), **fields, "median": median,
            "completions_per_s": completions / median["step_s"],
            "completion_tokens_per_s": completions * median["completion_len_mean"] / median["step_s"],
            "steps": measured}


def write_json(result: dict, json_path: str | None, cfg: Config) -> Path:
    path = Path(json_path or Path(cfg.output_dir) / "bench.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def peak_reserved_bytes() -> int:
    return torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0


ROOT = Path(__file__).resolve().parent.parent
SIDE_FLAGS = ("--vs", "--nproc", "--rounds", "--json")  # this script's own; everything else is passed through


def _passed_through(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=")[0] in SIDE_FLAGS:
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def side_by_side(vs: str, nproc: int, rounds: int, cfg: Config, json_path: str | None) -> int:
    """Alternate grpo_ds and TRL jobs on the same flags; print medians per phase and the TRL / grpo_ds ratios."""
    if vs != "trl":
        print(f"error: --vs {vs!r}: only 'trl' is supported", file=sys.stderr)
        return 2
    try:
        import trl  # noqa: F401  (fail before any job starts)
    except ImportError:
        print("error: --vs trl needs TRL: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    flags = _passed_through(sys.argv[1:])
    out = Path(cfg.output_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    runs: dict[str, list[dict]] = {"grpo_ds": [], "trl": []}
    for r in range(rounds):
        order = ("grpo_ds", "trl") if r % 2 == 0 else ("trl", "grpo_ds")
        for impl in order:
            path = out / f"round{r + 1}_{impl}.json"
            script = "bench.py" if impl == "grpo_ds" else "bench_trl.py"
            job = distributed.launch_command(str(ROOT / "scripts" / script), nproc,
                                      [*flags, "--output_dir", str(out / f"round{r + 1}_{impl}"), "--json", str(path)])
            print(f"[bench] round {r + 1}/{rounds}: {impl}, {nproc} rank(s)", flush=True)
            proc = subprocess.run(job, env=env)
            if proc.returncode != 0 or not path.exists():
                print(f"error: the {impl} job of round {r + 1} failed (exit {proc.returncode}): {' '.join(job)}",
                      file=sys.stderr)
                return 1
            runs[impl].append(json.loads(path.read_text()))
    keys = (*PHASES, "rollout_tokens_per_s", "completion_len_mean", "update_wait_s", "update_wait_s_max",
            "rank_tokens_max", "rank_tokens_min")
    median = {impl: {k: statistics.median(s.get(k, 0.0) for run in rs for s in run["steps"]) for k in keys}
              for impl, rs in runs.items()}
    completions = cfg.rollouts_per_step * cfg.group_size
    for impl in runs:
        median[impl]["completions_per_s"] = completions / median[impl]["step_s"]
    # a phase neither side runs (old log-probs, on-policy) takes microseconds: no ratio for it
    ratio = {k: (median["trl"][k] / median["grpo_ds"][k] if median["grpo_ds"][k] >= 0.01 else None) for k in PHASES}
    ratio["completions_per_s"] = median["grpo_ds"]["completions_per_s"] / median["trl"]["completions_per_s"]
    result = {"vs": vs, "nproc": nproc, "rounds": rounds, "flags": flags, "median": median,
              "ratio_trl_over_grpo_ds": ratio, "runs": runs}
    path = write_json(result, json_path or str(out / "bench_vs_trl.json"), cfg)
    steps = sum(len(run["steps"]) for run in runs["grpo_ds"])
    print(f"\ngrpo_ds vs TRL {__import__('trl').__version__}: {nproc} rank(s), {cfg.rollouts_per_step} prompts x "
          f"{cfg.group_size}, {cfg.max_new_tokens} new tokens; medians of {steps} measured step(s) each over "
          f"{rounds} round(s)")
    print(f"  {'':<28}{'grpo_ds':>10}{'TRL':>10}{'TRL/grpo_ds':>13}")
    for k in PHASES:
        cell = "-" if ratio[k] is None else f"{ratio[k]:.2f}x"
        print(f"  {k:<28}{median['grpo_ds'][k]:>10.2f}{median['trl'][k]:>10.2f}{cell:>13}")
    print(f"  {'completions/s':<28}{median['grpo_ds']['completions_per_s']:>10.3f}"
          f"{median['trl']['completions_per_s']:>10.3f}{ratio['completions_per_s']:>12.2f}x")
    print(f"  {'completion length (mean)':<28}{median['grpo_ds']['completion_len_mean']:>10.1f}"
          f"{median['trl']['completion_len_mean']:>10.1f}")
    print(f"  -> {path}")
    return 0


def main() -> int:
    parser = bench_parser()
    parser.add_argument("--vs", default=None, help="'trl': run TRL's GRPOTrainer on the same work, side by side")
    parser.add_argument("--nproc", type=int, default=1, help="with --vs: ranks per job (deepspeed launcher)")
    parser.add_argument("--rounds", type=int, default=1, help="with --vs: grpo_ds/TRL pairs, order flipped each")
    args = vars(parser.parse_args())
    steps, warmup, json_path = args.pop("steps"), args.pop("warmup"), args.pop("json")
    vs, nproc, rounds = args.pop("vs"), args.pop("nproc"), args.pop("rounds")
    args.pop("local_rank", None)
    if steps < 1 or warmup < 0:
        print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    cfg = bench_config(args, "runs/bench", warmup + steps)
    if vs is not None:
        if nproc < 1 or rounds < 1:
            print("error: --nproc and --rounds must be >= 1", file=sys.stderr)
            return 2
        return side_by_side(vs, nproc, rounds, cfg, json_path)
    started = time.time()
    at_last_step = {}

    def record_peak(step, **_):  # the training's peak, before the final export (a LoRA merge copies the model)
        if step == cfg.max_steps:
            at_last_step.update(peak=peak_memory_bytes(), reserved=peak_reserved_bytes())

    try:
        history = train(cfg, on_step_end=record_peak)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    peaks = distributed.all_gather_objects(at_last_step.get("peak", peak_memory_bytes()))
    reserved = distributed.all_gather_objects(at_last_step.get("reserved", peak_reserved_bytes()))
    if torch.distributed.get_rank() != 0:
        return 0
    result = summarize(
        cfg, history[warmup:], world_size=len(peaks), device="cuda" if torch.cuda.is_available() else "cpu",
        warmup_steps=warmup, measured_steps=steps, wall_s=round(time.time() - started, 1),
        peak_memory_gib_per_rank=[round(p / 1024 ** 3, 3) for p in peaks],
        peak_reserved_gib_per_rank=[round(p / 1024 ** 3, 3) for p in reserved])  # the CUDA caching allocator's
    median = result["median"]
    path = write_json(result, json_path, cfg)
    rows = [(k, f"{median[k]:.2f}") for k in PHASES]
    rows += [("rollout tokens/s", f"{median['rollout_tokens_per_s']:.1f}"),
             ("completions/s (end to end)", f"{result['completions_per_s']:.3f}"),
             ("completion tokens/s (end to end)", f"{result['completion_tokens_per_s']:.1f}"),
             ("completion length (mean)", f"{median['completion_len_mean']:.1f}"),
             ("update wait per rank, mean / max (s)",
              f"{median['update_wait_s']:.2f} / {median['update_wait_s_max']:.2f}"),
             ("tokens per rank, max / min", f"{median['rank_tokens_max']:.0f} / {median['rank_tokens_min']:.0f}"),
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
    sys.exit(distributed.run(main))
