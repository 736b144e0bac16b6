"""Evaluation on GSM8K-style problems: zero-shot, greedy by default, the training prompt, batched generation, one
process or N ranks, scored with the same extractors as the rewards (grpo_ds.rewards), so a training reward and an
eval score agree on the same text.

    bash scripts/eval_gsm8k.sh runs/qwen05 --data data/gsm8k/test.jsonl --limit 100
    .venv/bin/python scripts/eval.py MODEL ...                              # the same, without the wrapper
    bash scripts/eval_gsm8k.sh MODEL --nproc 2 ...                # 2 ranks, each a shard, results gathered
    bash scripts/eval_gsm8k.sh --score_gold --data test.jsonl     # the dataset's own solutions as completions

In-process (e.g. from the trainer, on every rank): `summary, rows = evaluate(model, tokenizer, problems)`.

Scores, per completion: strict (the first <answer> block's content equals the gold: `is_correct`, what the
training rewards pay for: as numbers for a numeric gold, by math-verify for any other), lenient (the last answer
anywhere: `is_correct_lenient`), format (`has_format`). With
--num_samples k > 1: pass@k (any of the k samples correct, strict and lenient) and maj@k (the most frequent strict
answer among the k, ties to the earliest, is correct).

Batches are formed over the whole dataset (prompts sorted by length to cut padding) before they are dealt to
ranks round-robin, and sampling is seeded per batch, so every batch holds the same rows whatever the number of
ranks: a 2-rank evaluation reproduces the 1-process one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import distributed
from .data import SYSTEM_PROMPT, Problem, is_number, load_problems, render_problem
from .generation import Sampling, generate
from .tools import Toolbox, ToolFormat
from .rewards import (answers_match, clean_answer, extract_answer, extract_last_number, has_format,
                      is_correct_lenient, math_equal, numbers_equal, parse_number)

log = logging.getLogger("grpo_ds.eval")

DEFAULT_DATA = "openai/gsm8k"


@dataclass
class Completion:
    text: str  # decoded completion up to its first EOS (the EOS itself is a special token, not text)
    num_tokens: int  # completion tokens, the EOS included (what the training metrics count)
    truncated: bool  # no EOS within max_new_tokens
    episode: Optional[list] = None  # with tools: the conversation, the model's turns and the tool results


# ----------------------------------------------------------------------------- scoring (pure)


SCORERS = ("auto", "numeric", "math_verify")


def score_texts(texts: list[str], problems: list[Problem], scorer: str = "auto") -> list[dict]:
    """One row per (text, problem): the strict <answer> content and its number, the lenient last number, and
    whether each equals the gold. The functions are the rewards' own. Scorer "auto" compares as the rewards do
    (numbers for a numeric gold, math-verify for any other); "numeric" reads numbers only (the scorer before golds
    of other forms existed); "math_verify" uses the math-verify package for every gold (expressions, fractions,
    LaTeX), for the answer block (strict) and for the whole text (lenient).

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
        if scorer == "math_verify":
            correct = extracted is not None and math_equal(extracted, problem.answer)
            correct_lenient = math_equal(text, problem.answer, whole_text=True)
        elif scorer == "auto":
            correct = answers_match(extracted, problem.answer)
            correct_lenient = is_correct_lenient(text, problem.answer)
        elif scorer == "numeric":
            correct, correct_lenient = numbers_equal(predicted, gold_number), numbers_equal(lenient, gold_number)
        else:
            raise ValueError(f"--scorer '{scorer}': expected one of {', '.join(SCORERS)}")
        rows.append({"question": problem.question, "gold": problem.answer, "completion": text,
                     "extracted": extracted, "predicted": predicted, "lenient": lenient,
                     "correct": correct, "correct_lenient": correct_lenient,
                     "format": has_format(text, problem.answer),
                     "clean": clean_answer(text, math=not is_number(problem.answer)) is not None})
    return rows


def majority(values: list, equal=numbers_equal):
    """The most frequent value (equal by `equal`, the rewards' number comparison by default); ties go to the one
    seen first; None never wins.

    >>> majority([3.0, None, 5.0, 5.0, 3.0]), majority([None, None])
    (3.0, None)
    """
    best, best_count = None, 0
    for candidate in values:
        if candidate is None:
            continue
        count = sum(other is not None and equal(candidate, other) for other in values)
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
               "format_rate": _mean(r["format"] for r in rows),
               # of the completions, those whose answer block holds just the answer with nothing after it
               "clean_rate": _mean(r["clean"] for r in rows)}
    if "num_tokens" in rows[0]:
        summary["mean_completion_tokens"] = _mean(r["num_tokens"] for r in rows)
        summary["truncated_rate"] = _mean(r["truncated"] for r in rows)
    if num_samples > 1:
        groups = [rows[i:i + num_samples] for i in range(0, n_rows, num_samples)]
        summary["pass_at_k"] = _mean(any(r["correct"] for r in g) for g in groups)
        summary["pass_at_k_lenient"] = _mean(any(r["correct_lenient"] for r in g) for g in groups)
        summary["maj_at_k"] = _mean(_majority_correct(g) for g in groups)
    return summary


def _majority_correct(rows: list[dict]) -> bool:
    """maj@k for one problem: the most frequent strict answer is right (numbers compared as numbers; other golds'
    answers by math-verify, as the rewards do)."""
    gold = rows[0]["gold"]
    if is_number(gold):
        return numbers_equal(majority([r["predicted"] for r in rows]), parse_number(gold))
    return answers_match(majority([r["extracted"] for r in rows], equal=lambda a, b: math_equal(a, b)), gold)


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
             num_samples: int = 1, temperature: Optional[float] = None, top_p: float = 1.0, seed: int = 0,
             system_prompt: Optional[str] = SYSTEM_PROMPT, response_prefix: str = "",
             example: Optional[tuple[str, str]] = None, scorer: str = "auto",
             synced_gpus: bool = False, toolbox: Optional[Toolbox] = None,
             max_episode_tokens: int = 0, turn_prefix: Optional[str] = None) -> tuple[dict, list[dict]]:
    """Evaluate a loaded model (a plain Hugging Face model, or a DeepSpeed engine's `.module`) on `problems`, each
    asked with `system_prompt` (None: the question alone), the worked `example` (None: none) and `response_prefix`,
    as data.render_prompt builds them.

    Returns (summary, rows), the same on every rank: rows are one per completion, ordered by problem then sample.
    Under torch.distributed every rank must call it; each generates its round-robin share of the batches and the
    rows are gathered. Under ZeRO-3, either call it inside distributed.gathered_for_generation (the whole model on
    every rank), or pass `synced_gpus=True` for a model gathered layer by layer: every rank then makes the same
    number of generate calls, stepping together (generate_share). `batch_size` counts completions per generate
    call; `temperature` defaults to 0 (greedy) for one sample and 1.0 for several. The model's train/eval mode
    and the global RNG state are restored on return, so evaluating inside training changes nothing there.

    With a `toolbox` (the run's --tools/--environment) every completion is an episode, as in training (the same
    prompt with the tools' schemas, the same loop; docs/AGENTS.md): it is scored on its whole text, its length
    counts the model's tokens, and its row holds the conversation (`episode`); `turn_prefix` opens the turns after
    tool results (None: `response_prefix`)."""
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    sampling = check_settings(len(problems), max_new_tokens, batch_size, num_samples, temperature, top_p)
    rank, world = rank_and_world()
    schemas = toolbox.schemas if toolbox is not None else None
    render = lambda p: render_problem(tokenizer, p, system_prompt, response_prefix, example, schemas)  # noqa: E731
    prompts = [render(p) for p in problems]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    plan = batch_plan(lengths, max(1, batch_size // num_samples))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            episodes = (None if toolbox is None else
                        Episodes(toolbox, ToolFormat(tokenizer, response_prefix, turn_prefix), problems, render,
                                 max_episode_tokens))
            mine = generate_share(model, tokenizer, prompts, plan, rank, world, num_samples=num_samples, seed=seed,
                                  sampling=sampling, synced_gpus=synced_gpus, episodes=episodes)
    finally:
        model.train(was_training)
    parts = [(mine, time.perf_counter() - start)] if world == 1 else distributed.all_gather_objects((mine, time.perf_counter() - start))
    by_problem = {i: completions for part, _ in parts for i, completions in part.items()}
    seconds = max(s for _, s in parts)  # ranks run side by side: the slowest one's time is the wall time

    flat = [c for i in range(len(problems)) for c in by_problem[i]]
    rows = score_texts([c.text for c in flat], [p for p in problems for _ in range(num_samples)], scorer)
    for k, (row, completion) in enumerate(zip(rows, flat)):
        row.update(index=k // num_samples, sample=k % num_samples, num_tokens=completion.num_tokens,
                   truncated=completion.truncated, **({"episode": completion.episode} if completion.episode else {}))
    summary = summarize(rows, num_samples)
    tokens = sum(c.num_tokens for c in flat)
    summary.update(completion_tokens=tokens, seconds=round(seconds, 3), tokens_per_s=tokens / max(seconds, 1e-9),
                   world_size=world)
    return summary, rows


def check_settings(num_problems: int, max_new_tokens: int, batch_size: int, num_samples: int, temperature: float,
                   top_p: float) -> Sampling:
    """The sampling settings, or a one-line error naming the flag."""
    for flag, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("num_samples", num_samples)):
        if value < 1:
            raise ValueError(f"--{flag} {value}: expected a positive integer")
    sampling = Sampling(max_new_tokens, temperature, top_p)
    if num_samples > 1 and temperature == 0:
        raise ValueError(f"--num_samples {num_samples} with --temperature 0: greedy samples are all the same; "
                         f"give a temperature > 0")
    if num_problems == 0:
        raise ValueError("evaluate: no problems to evaluate")
    return sampling


@dataclass
class Episodes:
    """What evaluation needs to run the tool loop: the tools, how their results are framed, the problems (for
    each row's environment reset) and how a problem is rendered."""

    toolbox: Toolbox
    fmt: ToolFormat
    problems: list[Problem]
    render: object
    max_episode_tokens: int = 0

    def batch(self, indices: list[int], num_samples: int) -> tuple[list[str], int, object]:
        """(prompts, group_size, session) for a batch of problems, num_samples rows each."""
        chosen = [self.problems[i] for i in indices]
        session = self.toolbox.session([p.columns for p in chosen for _ in range(num_samples)], self.fmt)
        prompts, group_size = session.prompts(chosen, num_samples, self.render)
        return prompts, group_size, session


def generate_share(model, tokenizer, prompts: list[str], plan: list[list[int]], rank: int, world: int, *,
                   num_samples: int, seed: int, sampling: Sampling, synced_gpus: bool = False,
                   episodes: Optional[Episodes] = None) -> dict[int, list[Completion]]:
    """This rank's batches of the plan (b = rank, rank + world, ...): problem index -> its completions. Each batch
    is seeded by its own number, so a batch samples the same whichever rank runs it.

    With `synced_gpus` (ZeRO-3, parameters gathered per layer: every forward is a collective), ranks must make the
    same number of generate calls, but the round-robin gives the first len(plan) % world ranks one batch more. A
    rank short of a batch generates the plan's last (shortest) batch once more and drops the result."""
    out: dict[int, list[Completion]] = {}
    start = time.perf_counter()
    num_calls = -(-len(plan) // world) if synced_gpus else len(range(rank, len(plan), world))
    for b in range(rank, rank + num_calls * world, world):
        if b >= len(plan):  # a padding call, only to step with the other ranks
            generate(model, tokenizer, [prompts[i] for i in plan[-1]], sampling, group_size=num_samples,
                     synced_gpus=True)
            continue
        torch.manual_seed(batch_seed(seed, b))
        if episodes is None:
            rollout = generate(model, tokenizer, [prompts[i] for i in plan[b]], sampling, group_size=num_samples,
                               synced_gpus=synced_gpus)
        else:  # the tool loop, as in training
            batch_prompts, group_size, session = episodes.batch(plan[b], num_samples)
            rollout = generate(model, tokenizer, batch_prompts, sampling, group_size=group_size, tools=session,
                               max_episode_tokens=episodes.max_episode_tokens)
        messages = rollout.messages_N or [None] * len(rollout.truncated_N)
        completions = [Completion(text, int(n), bool(t), m) for text, n, t, m in
                       zip(rollout.texts(tokenizer), rollout.completion_mask_NC.sum(dim=1), rollout.truncated_N,
                           messages)]
        for j, i in enumerate(plan[b]):
            out[i] = completions[j * num_samples:(j + 1) * num_samples]
        if rank == 0:
            log.info("batch %d/%d on rank 0: %d completions, %.1f s", b + 1, len(plan), len(completions),
                     time.perf_counter() - start)
    return out


# ----------------------------------------------------------------------------- the gold solutions as completions


def gold_solutions(dataset: str, split: str = "test", limit: int | None = None,
                   **columns) -> tuple[list[str], list[Problem]]:
    """(solutions, problems): a dataset's reference solutions, to be scored as if a model had written them. Rows are
    read by data.load_problems itself (with its `prompt_column`/`answer_column`), so the gold is read exactly as in
    training; rows whose gold cannot be read are skipped, as there."""
    if Path(dataset).suffix.lower() in (".jsonl", ".json", ".parquet") and not Path(dataset).is_file():
        raise ValueError(f"--data '{dataset}': file not found")
    problems = load_problems(dataset, split, num_problems=limit, **columns)
    return [p.solution for p in problems], problems
