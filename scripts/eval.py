#!/usr/bin/env python
"""Zero-shot evaluation of a model or a training run on GSM8K-style problems (grpo_ds/eval.py does the work).

    bash scripts/eval_gsm8k.sh runs/quickstart                      # a run: its own held-out problems and prompt
    bash scripts/eval_gsm8k.sh MODEL --data path/to/test.jsonl --limit 100
    bash scripts/eval_gsm8k.sh MODEL --nproc 2 ...                  # 2 ranks, each a shard, results gathered
    bash scripts/eval_gsm8k.sh --score_gold --data test.jsonl       # the dataset's own solutions as completions

When MODEL is a training run (its output folder, final/, a checkpoint), the run's system prompt and response
prefix are used, and its own held-out problems unless --data says otherwise, so a model is asked the way it was
trained. Writes predictions.jsonl and summary.json and prints a table. Exit codes: 0 done, 2 bad input.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from grpo_ds.config import Config
from grpo_ds.data import load_problems
from grpo_ds.distributed import init_distributed, run
from grpo_ds.eval import DEFAULT_DATA, check_settings, evaluate, gold_solutions, score_texts, summarize
from grpo_ds.inference import load, prompt_format, training_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_gsm8k.sh", description=(
        "Zero-shot evaluation on GSM8K test (or another GSM8K-style file): writes predictions.jsonl and "
        "summary.json to --output_dir and prints a table."))
    p.add_argument("model", nargs="?", help="Hub id, Hugging Face folder, a training run's output folder (its "
                                            "final/), DeepSpeed checkpoint, .gguf file or 'embedded'.")
    p.add_argument("--data", default=None, help="A hub dataset id ('openai/gsm8k'), a local .jsonl/.json/.parquet "
                   "file, or 'arithmetic' (default: a training run's own held-out problems, "
                   f"else {DEFAULT_DATA}).")
    p.add_argument("--prompt_column", default=None, help="The column holding each prompt, a string or chat messages "
                   "(default: a training run's, else the first of prompt, question, problem).")
    p.add_argument("--answer_column", default=None, help="The column holding each gold answer (default: a training "
                   "run's, else the first of answer, solution, ground_truth).")
    p.add_argument("--split", default="test", help="Split for hub datasets and 'arithmetic'.")
    p.add_argument("--limit", type=int, default=None, help="Evaluate only the first N problems.")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="Most tokens per completion (default: a training run's max_new_tokens, else 512).")
    p.add_argument("--batch_size", type=int, default=16, help="Completions per generate call on each rank.")
    p.add_argument("--num_samples", type=int, default=1, help="Samples per problem; > 1 reports pass@k and maj@k.")
    p.add_argument("--temperature", type=float, default=None,
                   help="Sampling temperature; default 0 (greedy) for one sample, 1.0 for several.")
    p.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling threshold when sampling.")
    p.add_argument("--system_prompt", default=None, help="'default' (the training default), 'none' (the question "
                   "alone) or the text (default: the training run's, else 'default').")
    p.add_argument("--response_prefix", default=None,
                   help="Text every answer starts with (default: the training run's, else none).")
    p.add_argument("--output_dir", default=None, help="Where predictions.jsonl and summary.json go "
                                                      "(default: runs/eval/<model>).")
    p.add_argument("--seed", type=int, default=0, help="Seed for sampling (per batch, so ranks do not matter).")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
    p.add_argument("--difficulty", type=int, default=None,
                   help=f"Difficulty of --data arithmetic (default: a training run's, else {Config.difficulty}, as "
                        "training's).")
    p.add_argument("--scorer", default=None, choices=["auto", "numeric", "math_verify"],
                   help="How answers are compared: 'auto' (as the training rewards do: numbers for numeric golds, "
                        "math-verify for any other), 'numeric' (numbers only) or 'math_verify' (math-verify for "
                        "every gold) (default: 'math_verify' for a run trained with --reward math_verify, else "
                        "'auto').")
    p.add_argument("--like", default=None, metavar="RUN",
                   help="Ask as the training run RUN was trained (its system prompt, response prefix, data and "
                        "budget) whatever MODEL is: to evaluate a base model exactly as its trained run.")
    p.add_argument("--no_tools", action="store_true",
                   help="Ask without the run's --tools/--environment: no tool schemas in the prompt and no tool "
                        "loop (a worked example that calls tools keeps its question and final answer); to measure "
                        "what the tools add.")
    p.add_argument("--score_gold", action="store_true",
                   help="Score the dataset's own solutions as completions (no model): a check of the extractor.")
    return p


def fill_defaults(args) -> None:
    """Missing flags from the training run behind MODEL, if there is one, else the general defaults."""
    source = args.like or args.model
    trained = (training_config(source) if source else None) or {}
    if args.like and not trained:
        raise ValueError(f"--like '{args.like}': not a training run (no grpo_ds config.json there)")
    if args.data is None:
        local_file = Path(trained.get("dataset", "")).suffix != ""
        args.data = (trained.get("eval_dataset") or (None if local_file else trained.get("dataset"))
                     or DEFAULT_DATA)
    if args.difficulty is None:
        args.difficulty = trained.get("difficulty", Config.difficulty)  # as training's default
    if args.data == trained.get("eval_dataset") or args.data == trained.get("dataset"):  # the run's own columns
        args.prompt_column = args.prompt_column or trained.get("prompt_column")
        args.answer_column = args.answer_column or trained.get("answer_column")
    if args.scorer is None:
        terms = [t.strip().split(":")[0] for t in str(trained.get("reward", "")).split(",")]
        args.scorer = "math_verify" if "math_verify" in terms else "auto"
    if args.max_new_tokens is None:
        args.max_new_tokens = trained.get("eval_max_new_tokens") or trained.get("max_new_tokens") or 512
    if args.temperature is None:
        args.temperature = 0.0 if args.num_samples == 1 else 1.0


def check_args(args) -> None:
    """Refuse bad flags before any model loads."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: expected a positive integer")
    check_settings(1, args.max_new_tokens, args.batch_size, args.num_samples, args.temperature, args.top_p)
    if args.model is None and not args.score_gold:
        raise ValueError("eval: give a MODEL (or --score_gold)")


def evaluate_args(args) -> tuple[dict, list[dict]]:
    fill_defaults(args)
    check_args(args)
    settings = {"data": args.data, "split": args.split, "limit": args.limit}
    if args.score_gold:
        solutions, problems = gold_solutions(args.data, args.split, args.limit, prompt_column=args.prompt_column,
                                             answer_column=args.answer_column)
        rows = score_texts(solutions, problems, args.scorer)
        for i, row in enumerate(rows):
            row.update(index=i, sample=0)
        return {**summarize(rows), "model": "gold solutions", **settings}, rows
    fmt = prompt_format(args.like or args.model, args.system_prompt, args.response_prefix, tools=not args.no_tools)
    logging.getLogger("grpo_ds.eval").info(
        "prompt from %s: system prompt %s, response prefix %r, worked example %s", fmt.source,
        "none" if fmt.system_prompt is None else f"{fmt.system_prompt[:40]!r}...", fmt.response_prefix,
        "none" if fmt.example is None else
        f"{fmt.example[0] if isinstance(fmt.example, tuple) else fmt.example[0]['content']!r:.40}...")
    problems = load_problems(args.data, args.split, num_problems=args.limit, difficulty=args.difficulty,
                             prompt_column=args.prompt_column, answer_column=args.answer_column)
    model, tokenizer = load(args.model, args.dtype)
    summary, rows = evaluate(model, tokenizer, problems, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, num_samples=args.num_samples, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, system_prompt=fmt.system_prompt,
                             response_prefix=fmt.response_prefix, example=fmt.example, scorer=args.scorer,
                             toolbox=fmt.toolbox, max_episode_tokens=fmt.max_episode_tokens,
                             turn_prefix=fmt.turn_prefix)
    summary.update(model=args.model, **settings, scorer=args.scorer, system_prompt=fmt.system_prompt,
                   response_prefix=fmt.response_prefix, example=fmt.example, max_new_tokens=args.max_new_tokens,
                   tools=fmt.toolbox.names if fmt.toolbox is not None else [],
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   device=str(next(model.parameters()).device))
    return summary, rows


def default_output_dir(model: str | None) -> Path:
    name = "gold" if model is None else model.strip("/").replace("/", "_").replace(".", "_") or "model"
    return Path("runs") / "eval" / name


TABLE_ROWS = [("n", "problems"), ("num_samples", "samples per problem"),
              ("accuracy_strict", "accuracy, strict <answer>"), ("accuracy_lenient", "accuracy, lenient last number"),
              ("pass_at_k", "pass@k, strict"), ("pass_at_k_lenient", "pass@k, lenient"), ("maj_at_k", "maj@k, strict"),
              ("format_rate", "format rate"), ("clean_rate", "clean answer block rate"),
              ("mean_completion_tokens", "mean completion tokens"),
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under a launcher: join the ranks (and pick this rank's GPU)
        rank, _ = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[eval rank{rank}] %(message)s")
    try:
        summary, rows = evaluate_args(args)
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
    sys.exit(run(main))
