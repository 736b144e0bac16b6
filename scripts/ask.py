#!/usr/bin/env python
"""Quick inference: answer a question (or a file of them) with a model or a training run, and with --compare BASE
show the base model's answers beside the trained ones, as the tiny-grpo tutorial's run.py does.

    .venv/bin/python scripts/ask.py runs/quickstart "Tom has 3 apples and buys 4 more. How many apples does he have?"
    .venv/bin/python scripts/ask.py runs/quickstart --compare embedded --file questions.jsonl   # question/answer fields

Greedy by default. A training run is asked with its own system prompt and response prefix (from its config.json),
and --compare's model is asked the same way, so the two columns differ only in the weights. Exit codes: 0 done,
2 bad input.
"""

import argparse
import shutil
import sys

from grpo_ds.generation import Sampling
from grpo_ds.inference import answer_all, prompt_format, read_questions, side_by_side, verdict


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ask.py", description="Answer one question (or a file of them) with a model or a training run; "
                                   "--compare BASE shows the base model's answers beside it.")
    p.add_argument("model", help="Hub id, Hugging Face folder, a training run's output folder (its final/), "
                                 "DeepSpeed checkpoint, .gguf file or 'embedded'.")
    p.add_argument("question", nargs="?", help="The question (or use --file).")
    p.add_argument("--file", help="A .jsonl file with 'question' (and optional 'answer') fields, or a text file "
                                  "with one question per line.")
    p.add_argument("--compare", metavar="BASE", help="A second model, shown on the left (e.g. the base model).")
    p.add_argument("--max_new_tokens", type=int, default=512, help="Most tokens per answer.")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default).")
    p.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling threshold when sampling.")
    p.add_argument("--system_prompt", default=None, help="'default' (the training default), 'none' (the question "
                   "alone) or the text (default: the training run's, else 'default').")
    p.add_argument("--response_prefix", default=None,
                   help="Text every answer starts with (default: the training run's, else none).")
    p.add_argument("--batch_size", type=int, default=16, help="Questions per generate call.")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
    p.add_argument("--seed", type=int, default=0, help="Seed for sampling.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if (args.question is None) == (args.file is None):
            raise ValueError("ask.py: give either a question or --file, not both or neither")
        if args.batch_size < 1:
            raise ValueError(f"--batch_size {args.batch_size}: expected a positive integer")
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
        items = read_questions(args.file) if args.file else [(args.question, None)]
        fmt = prompt_format(args.model, args.system_prompt, args.response_prefix)
        questions = [question for question, _ in items]
        options = dict(batch_size=args.batch_size, dtype=args.dtype, seed=args.seed)
        answers = answer_all(args.model, questions, sampling, fmt, **options)
        base = answer_all(args.compare, questions, sampling, fmt, **options) if args.compare else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    width = shutil.get_terminal_size((160, 24)).columns
    for i, (question, gold) in enumerate(items):
        print(f"\n=== Q{i + 1}: {question}" + (f"   [gold: {gold}]" if gold is not None else ""))
        if base is None:
            print(answers[i].text.strip())
            print(f"--> {verdict(answers[i].text, gold)}")
            continue
        print(side_by_side(f"BASE {args.compare}", base[i].text.strip(), f"MODEL {args.model}",
                           answers[i].text.strip(), width))
        print(f"BASE  --> {verdict(base[i].text, gold)}")
        print(f"MODEL --> {verdict(answers[i].text, gold)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
