"""Evaluation on GSM8K-style problems: zero-shot, greedy by default, the training prompt, batched generation, one
process or N ranks, scored with the same extractors as the rewards (grpo_ds.rewards), so a training reward and an
eval score agree on the same text.

    bash scripts/eval_gsm8k.sh runs/qwen05/final --data data/gsm8k/test.jsonl --limit 100
    python -m grpo_ds.eval MODEL ...                              # the same, without the wrapper
    bash scripts/eval_gsm8k.sh MODEL --nproc 2 ...                # 2 ranks, each a shard, results gathered
    bash scripts/eval_gsm8k.sh --score_gold --data test.jsonl     # the dataset's own solutions as completions

In-process (e.g. from the trainer, on every rank): `summary, rows = evaluate(model, tokenizer, problems)`.

Scores, per completion: strict (the number in the first <answer> block equals the gold: `is_correct`, what the
training reward pays for), lenient (the last number anywhere: `is_correct_lenient`), format (`has_format`). With
--num_samples k > 1: pass@k (any of the k samples correct, strict and lenient) and maj@k (the most frequent strict
answer among the k, ties to the earliest, is correct).

Batches are formed over the whole dataset (prompts sorted by length to cut padding) before they are dealt to
ranks round-robin, and sampling is seeded per batch, so every batch holds the same rows whatever the number of
ranks: a 2-rank evaluation reproduces the 1-process one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data import Problem, load_problems
from .inference import Completion, generate, load, render, sampling_kwargs
from .rewards import extract_answer, extract_last_number, has_format, numbers_equal, parse_number

log = logging.getLogger("grpo_ds.eval")

DEFAULT_DATA = "openai/gsm8k"


# ----------------------------------------------------------------------------- scoring (pure)


def score_texts(texts: list[str], problems: list[Problem]) -> list[dict]:
    """One row per (text, problem): the strict <answer> content and its number, the lenient last number, and
    whether each equals the gold. The functions are the rewards' own.

    >>> score_texts(["<think>6*2</think><answer>$12</answer>"], [Problem("q", "12")])[0]["correct"]
    True
    """
    if len(texts) != len(problems):
        raise ValueError(f"score_texts: {len(texts)} texts but {len(problems)} problems")
    rows = []
    for text, problem in zip(texts, problems):
        extracted = extract_answer(text)
        gold_number = parse_number(problem.answer)
        predicted, lenient = parse_number(extracted), extract_last_number(text)
        rows.append({"question": problem.question, "gold": problem.answer, "completion": text,
                     "extracted": extracted, "predicted": predicted, "lenient": lenient,
                     "correct": numbers_equal(predicted, gold_number),
                     "correct_lenient": numbers_equal(lenient, gold_number),
                     "format": has_format(text)})
    return rows


def majority(numbers: list[float | None]) -> float | None:
    """The most frequent number (equal as the rewards compare numbers); ties go to the one seen first.

    >>> majority([3.0, None, 5.0, 5.0, 3.0]), majority([None, None])
    (3.0, None)
    """
    best, best_count = None, 0
    for candidate in numbers:
        count = sum(numbers_equal(candidate, other) for other in numbers)
        if count > best_count:
            best, best_count = candidate, count
    return best


def summarize(rows: list[dict], num_samples: int = 1) -> dict:
    """Accuracy (strict, lenient), format rate and, when the rows come from generation, length and truncation;
    with k samples per problem (rows ordered problem by problem), pass@k and maj@k."""
    n_rows = len(rows)
    if n_rows == 0 or n_rows % num_samples:
        raise ValueError(f"summarize: {n_rows} rows is not a positive multiple of --num_samples {num_samples}")
    summary = {"n": n_rows // num_samples, "num_samples": num_samples,
               "accuracy_strict": _mean(r["correct"] for r in rows),
               "accuracy_lenient": _mean(r["correct_lenient"] for r in rows),
               "format_rate": _mean(r["format"] for r in rows)}
    if "num_tokens" in rows[0]:
        summary["mean_completion_tokens"] = _mean(r["num_tokens"] for r in rows)
        summary["truncated_rate"] = _mean(r["truncated"] for r in rows)
    if num_samples > 1:
        groups = [rows[i:i + num_samples] for i in range(0, n_rows, num_samples)]
        summary["pass_at_k"] = _mean(any(r["correct"] for r in g) for g in groups)
        summary["pass_at_k_lenient"] = _mean(any(r["correct_lenient"] for r in g) for g in groups)
        summary["maj_at_k"] = _mean(numbers_equal(majority([r["predicted"] for r in g]), parse_number(g[0]["gold"]))
                                    for g in groups)
    return summary


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- generation


def batch_plan(prompt_lengths: list[int], batch_size: int) -> list[list[int]]:
    """Problem indices in batches of `batch_size`, longest prompts first (so padding is small and an out-of-memory
    batch fails at once), ties by index: the same plan on every rank and for every number of ranks.

    >>> batch_plan([3, 9, 5, 9], 2)
    [[1, 3], [2, 0]]
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate(model, tokenizer, problems: list[Problem], *, max_new_tokens: int = 512, batch_size: int = 16,
             num_samples: int = 1, temperature: float | None = None, top_p: float = 1.0, prompt: str = "train",
             seed: int = 0, response_prefix: str = "") -> tuple[dict, list[dict]]:
    """Evaluate a loaded model (a plain Hugging Face model, or a DeepSpeed engine's `.module`) on `problems`.

    Returns (summary, rows), the same on every rank: rows are one per completion, ordered by problem then sample.
    Under torch.distributed every rank must call it; each generates its round-robin share of the batches and the
    rows are gathered. Under ZeRO-3, call it inside distributed.gathered_for_generation (ranks generate different
    numbers of batches, so per-layer gathering in step would hang). `batch_size` counts completions per generate
    call; `temperature` defaults to 0 (greedy) for one sample and 1.0 for several. The model's train/eval mode
    and the global RNG state are restored on return, so evaluating inside training changes nothing there."""
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    check_settings(len(problems), max_new_tokens, batch_size, num_samples, temperature, top_p)
    rank, world = rank_and_world()
    prompts = [render(tokenizer, p.question, prompt, response_prefix) for p in problems]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    plan = batch_plan(lengths, max(1, batch_size // num_samples))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            mine = generate_share(model, tokenizer, prompts, plan, rank, world, num_samples=num_samples, seed=seed,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    finally:
        model.train(was_training)
    parts = [(mine, time.perf_counter() - start)] if world == 1 else _gather((mine, time.perf_counter() - start))
    by_problem = {i: completions for part, _ in parts for i, completions in part.items()}
    seconds = max(s for _, s in parts)  # ranks run side by side: the slowest one's time is the wall time

    flat = [c for i in range(len(problems)) for c in by_problem[i]]
    rows = score_texts([c.text for c in flat], [p for p in problems for _ in range(num_samples)])
    for k, (row, completion) in enumerate(zip(rows, flat)):
        row.update(index=k // num_samples, sample=k % num_samples, num_tokens=completion.num_tokens,
                   truncated=completion.truncated)
    summary = summarize(rows, num_samples)
    tokens = sum(c.num_tokens for c in flat)
    summary.update(completion_tokens=tokens, seconds=round(seconds, 3), tokens_per_s=tokens / max(seconds, 1e-9),
                   world_size=world)
    return summary, rows


def check_settings(num_problems: int, max_new_tokens: int, batch_size: int, num_samples: int, temperature: float,
                   top_p: float) -> None:
    for flag, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("num_samples", num_samples)):
        if value < 1:
            raise ValueError(f"--{flag} {value}: expected a positive integer")
    sampling_kwargs(temperature, top_p)
    if num_samples > 1 and temperature == 0:
        raise ValueError(f"--num_samples {num_samples} with --temperature 0: greedy samples are all the same; "
                         f"give a temperature > 0")
    if num_problems == 0:
        raise ValueError("evaluate: no problems to evaluate")


def generate_share(model, tokenizer, prompts: list[str], plan: list[list[int]], rank: int, world: int, *,
                   num_samples: int, seed: int, **sampling) -> dict[int, list[Completion]]:
    """This rank's batches of the plan (b = rank, rank + world, ...): problem index -> its completions. Each batch
    is seeded by its own number, so a batch samples the same whichever rank runs it."""
    out: dict[int, list[Completion]] = {}
    start = time.perf_counter()
    for b in range(rank, len(plan), world):
        torch.manual_seed(batch_seed(seed, b))
        batch_prompts = [prompts[i] for i in plan[b] for _ in range(num_samples)]
        completions = generate(model, tokenizer, batch_prompts, **sampling)
        for j, i in enumerate(plan[b]):
            out[i] = completions[j * num_samples:(j + 1) * num_samples]
        if rank == 0:
            log.info("batch %d/%d on rank 0: %d completions, %.1f s", b + 1, len(plan), len(completions),
                     time.perf_counter() - start)
    return out


def _gather(obj) -> list:
    from .distributed import all_gather_objects  # torch.distributed only; eval stays usable without DeepSpeed

    return all_gather_objects(obj)


# ----------------------------------------------------------------------------- the gold solutions as completions


def gold_solutions(dataset: str, split: str = "test", limit: int | None = None) -> tuple[list[str], list[Problem]]:
    """(solutions, problems): a GSM8K-style dataset's reference solutions, to be scored as if a model had written
    them. Rows are read by data.load_problems itself, so the gold is parsed exactly as in training; rows without a
    parsable final answer are skipped, as there."""
    if Path(dataset).suffix.lower() in (".jsonl", ".json", ".parquet") and not Path(dataset).is_file():
        raise ValueError(f"--data '{dataset}': file not found")
    problems = load_problems(dataset, split, num_problems=limit)
    return [p.solution for p in problems], problems


# ----------------------------------------------------------------------------- the command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_gsm8k.sh", description=(
        "Zero-shot evaluation on GSM8K test (or another GSM8K-style file): writes predictions.jsonl and "
        "summary.json to --output_dir and prints a table."))
    p.add_argument("model", nargs="?", help="Hub id, Hugging Face folder (a run's final/), a run's output folder, "
                                            "DeepSpeed checkpoint, .gguf file or 'embedded'.")
    p.add_argument("--data", default=DEFAULT_DATA, help="'openai/gsm8k' (hub), a local .jsonl/.json/.parquet file "
                                                        "with question/answer fields, or 'arithmetic'.")
    p.add_argument("--split", default="test", help="Split for hub datasets and 'arithmetic'.")
    p.add_argument("--limit", type=int, default=None, help="Evaluate only the first N problems.")
    p.add_argument("--max_new_tokens", type=int, default=512, help="Most tokens per completion (training default).")
    p.add_argument("--batch_size", type=int, default=16, help="Completions per generate call on each rank.")
    p.add_argument("--num_samples", type=int, default=1, help="Samples per problem; > 1 reports pass@k and maj@k.")
    p.add_argument("--temperature", type=float, default=None,
                   help="Sampling temperature; default 0 (greedy) for one sample, 1.0 for several.")
    p.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling threshold when sampling.")
    p.add_argument("--prompt", default="train", choices=["train", "plain"],
                   help="'train': chat template + the training system prompt; 'plain': the question alone.")
    p.add_argument("--response_prefix", default="", help="Text every answer starts with, as the training run's "
                   "--response_prefix (with --prompt train).")
    p.add_argument("--output_dir", default=None, help="Where predictions.jsonl and summary.json go "
                                                      "(default: runs/eval/<model>).")
    p.add_argument("--seed", type=int, default=0, help="Seed for sampling (per batch, so ranks do not matter).")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
    p.add_argument("--difficulty", type=int, default=2, help="Difficulty of --data arithmetic.")
    p.add_argument("--score_gold", action="store_true",
                   help="Score the dataset's own solutions as completions (no model): a check of the extractor.")
    return p


def default_output_dir(model: str | None) -> Path:
    name = "gold" if model is None else model.strip("/").replace("/", "_").replace(".", "_") or "model"
    return Path("runs") / "eval" / name


TABLE_ROWS = [("n", "problems"), ("num_samples", "samples per problem"),
              ("accuracy_strict", "accuracy, strict <answer>"), ("accuracy_lenient", "accuracy, lenient last number"),
              ("pass_at_k", "pass@k, strict"), ("pass_at_k_lenient", "pass@k, lenient"), ("maj_at_k", "maj@k, strict"),
              ("format_rate", "format rate"), ("mean_completion_tokens", "mean completion tokens"),
              ("truncated_rate", "truncated (no EOS)"), ("seconds", "seconds"), ("tokens_per_s", "tokens/s")]


def table(summary: dict, title: str) -> str:
    """The summary's headline numbers as a small Markdown table under `title`."""
    lines = [title, f"| {'metric':<30} | {'value':>10} |", f"|{'-' * 32}|{'-' * 12}|"]
    for key, label in TABLE_ROWS:
        if key in summary:
            value = summary[key]
            shown = str(value) if isinstance(value, int) else f"{value:.4f}" if value <= 1 else f"{value:.1f}"
            lines.append(f"| {label:<30} | {shown:>10} |")
    return "\n".join(lines)


def write_results(output_dir: Path, summary: dict, rows: list[dict]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def default_temperature(args) -> float:
    if args.temperature is not None:
        return args.temperature
    return 0.0 if args.num_samples == 1 else 1.0


def check_args(args) -> None:
    """Refuse bad flags before any model loads."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: expected a positive integer")
    check_settings(1, args.max_new_tokens, args.batch_size, args.num_samples, default_temperature(args), args.top_p)
    if args.model is None and not args.score_gold:
        raise ValueError("eval: give a MODEL (or --score_gold)")


def run(args) -> tuple[dict, list[dict]]:
    check_args(args)
    settings = {"data": args.data, "split": args.split, "limit": args.limit}
    if args.score_gold:
        solutions, problems = gold_solutions(args.data, args.split, args.limit)
        rows = score_texts(solutions, problems)
        for i, row in enumerate(rows):
            row.update(index=i, sample=0)
        return {**summarize(rows), "model": "gold solutions", **settings}, rows
    problems = load_problems(args.data, args.split, num_problems=args.limit, difficulty=args.difficulty)
    model, tokenizer = load(args.model, args.dtype)
    summary, rows = evaluate(model, tokenizer, problems, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, num_samples=args.num_samples, temperature=args.temperature,
                             top_p=args.top_p, prompt=args.prompt, seed=args.seed,
                             response_prefix=args.response_prefix)
    summary.update(model=args.model, **settings, prompt=args.prompt, response_prefix=args.response_prefix,
                   max_new_tokens=args.max_new_tokens,
                   temperature=default_temperature(args), top_p=args.top_p, seed=args.seed,
                   device=str(next(model.parameters()).device))
    return summary, rows


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under a launcher: join the ranks (and pick this rank's GPU)
        from .distributed import init_distributed

        rank, _ = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[eval rank{rank}] %(message)s")
    try:
        summary, rows = run(args)
    except ValueError as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(None if args.score_gold
                                                                                        else args.model)
        write_results(output_dir, summary, rows)
        print(table(summary, f"{summary['model']} on {args.data} ({summary['n']} problems) -> {output_dir}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
