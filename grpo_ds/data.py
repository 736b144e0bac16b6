"""Training data for grpo_ds: where problems come from, how they become prompts, and in what order.

This module owns
  * the `Problem` record (a prompt, its gold final answer, and the row's other columns),
  * reading golds of any form (`read_gold`): numbers, GSM8K's '#### n', a worked solution's last \\boxed{}, or a
    short answer as written (fractions, LaTeX, tuples, intervals, letters),
  * loading problems: a seeded synthetic arithmetic generator, local .jsonl/.json/.parquet files, or a Hugging Face
    hub dataset id, with the prompt and answer columns found by name or given (`load_problems`),
  * rendering a problem into prompt text with the tokenizer's chat template (`render_problem`): a question string
    in grpo_ds's turns, or a chat-format prompt (a list of messages, TRL's conversational format) as written,
  * the seeded, resumable data order shared by every rank (`PromptSampler`).

It deliberately knows nothing about distributed training: every rank calls the same functions with the
same seed and gets the same result, so no communication is needed here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .tools import ToolFormat, renders_tools, with_tool_instructions

logger = logging.getLogger("grpo_ds.data")

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think>\n<answer> answer here </answer>"
)


@dataclass(frozen=True)
class Problem:
    question: str  # the question; for a chat-format prompt, the text of its last user turn (for logs and displays)
    # the gold final answer: a plain numeric string for numbers ("72", "-3", "2.5"; commas stripped), otherwise as
    # written ("\\frac{1}{2}", "(1, 2)", "B"); see read_gold
    answer: str
    # the dataset's own answer text (GSM8K: the worked solution ending in "#### n"); not part of equality
    solution: str = field(default="", compare=False, repr=False)
    # a chat-format prompt's turns as written (dicts with "role" and "content"); () for a question string
    messages: tuple = ()
    # the row's columns (all but TRL's reserved prompt/completion/completion_ids), passed to rewards by name
    columns: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def prompt(self) -> str | list[dict]:
        """The prompt as the dataset holds it, as TRL passes it to reward functions: the question string, or the
        list of chat messages."""
        return [dict(m) for m in self.messages] if self.messages else self.question

    def with_observation(self, text: str | None) -> "Problem":
        """The problem with `text` (an environment's reset() result) appended to its question, or to the last
        user turn of a chat prompt, as TRL appends it; unchanged for None.

        >>> Problem("Guess a number.", "7").with_observation(" It is below 10.").question
        'Guess a number. It is below 10.'
        """
        if text is None:
            return self
        if not self.messages:
            return dataclasses.replace(self, question=self.question + text)
        messages = [dict(m) for m in self.messages]
        last = max(i for i, m in enumerate(messages) if m["role"] == "user") if any(
            m["role"] == "user" for m in messages) else len(messages) - 1
        messages[last]["content"] = messages[last]["content"] + text
        return dataclasses.replace(self, messages=tuple(messages))


# ----------------------------------------------------------------------------------------------- answers

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _plain_number(text: str) -> str | None:
    """`text` as a plain numeric string if it is nothing but a number ("$1,000" -> "1000"), else None."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.strip())  # thousands commas only: "3,4" stays invalid
    text = text.removeprefix("$").rstrip(".")  # "$12" and "12." occur in hand-written answers
    return text.removeprefix("+") if _NUMBER.fullmatch(text) else None


def gsm8k_final_answer(solution: str) -> str | None:
    """Text after the last '####' in a GSM8K solution, commas removed; None if absent or not a number."""
    if "####" not in solution:
        return None
    return _plain_number(solution.rsplit("####", 1)[1])


def is_number(gold: str) -> bool:
    r"""True when a gold answer is a plain number, compared numerically; other golds are compared by math-verify.

    >>> is_number("72"), is_number("-2.5"), is_number("\\frac{1}{2}"), is_number("(1, 2)")
    (True, True, False, False)
    """
    return _NUMBER.fullmatch(str(gold)) is not None


def last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (or \fbox{...}) in `text`, braces balanced; None if there is none.

    >>> last_boxed("so $x = \\boxed{\\frac{1}{2}}$, and \\boxed{(1, 2)}.")
    '(1, 2)'
    >>> last_boxed("\\boxed{\\frac{1}{2}}"), last_boxed("\\boxed{unclosed") is None
    ('\\frac{1}{2}', True)
    """
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")
_PLACEHOLDERS = {"n/a", "na", "none", "null", "nan", "-", "?", "unknown"}  # a missing answer, written as text
_MATHLIKE = re.compile(r"[\d\\()\[\]{}^_=+*/<>|]")  # a digit, a LaTeX command or a math symbol: not a plain word
_CHOICE = re.compile(r"\(?[A-Za-z]\)?\.?")  # a multiple-choice letter: "B", "(B)", "B."


def read_gold(value: Any) -> str | None:
    r"""The gold final answer in a dataset's answer field, or None when it cannot be read. In order: a plain number
    ("$1,000" -> "1000"); the text after GSM8K's last '####'; the last \boxed{} of a worked solution (MATH); else a
    short answer as written (one line, at most 80 characters, fewer than three words once LaTeX commands are set
    aside, with a digit, a LaTeX command or a math symbol in it, or a single choice letter: fractions, LaTeX,
    tuples, intervals, letters). A worked solution with no such marker, or a bare word, cannot be read.

    >>> [read_gold(v) for v in [72, "$1,000", "... #### 1/2", "so \\boxed{3\\sqrt{2}}.", "$\\frac{1}{2}$", "(1, 2)"]]
    ['72', '1000', '1/2', '3\\sqrt{2}', '\\frac{1}{2}', '(1, 2)']
    >>> [read_gold(v) for v in ["It is 12 minus 5, which leaves 7.", "", None, True, "#### ", "#### n/a", "many"]]
    [None, None, None, None, None, None, None]
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if isinstance(value, list) and len(value) == 1:  # some datasets store a one-element list of answers
        return read_gold(value[0])
    if not isinstance(value, str):
        return None
    text = value.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    elif (boxed := last_boxed(text)) is not None:
        text = boxed
    elif re.search(r"\\(?:boxed|fbox)\b", text):  # a box that never closes
        return None
    number = _plain_number(text)
    if number is not None:
        return number
    if len(text) > 2 and text[0] == text[-1] == "$" and "$" not in text[1:-1].strip("$"):  # "$x$", "$$x$$"
        text = text.strip("$").strip()
    if not text or "\n" in text or len(text) > 80 or text.lower() in _PLACEHOLDERS \
            or len(_WORD.findall(_LATEX_COMMAND.sub(" ", text))) >= 3 \
            or not (_MATHLIKE.search(text) or _CHOICE.fullmatch(text)):
        return None
    return text


# -------------------------------------------------------------------------------- synthetic arithmetic

# A story is a set of phrasings for the same few operations on one running quantity. Every number in a
# question is an operand, in the order the operations apply, so a reader (or a test) can re-derive the answer.
# Keys: start (a), start_prod (c groups of n), add/sub (n), add_prod/sub_prod (c groups of n), div (k, last).
_STORIES: list[dict[str, str]] = [
    dict(start="{name} has {a} apples.", start_prod="{name} has {c} bags of apples with {n} apples in each bag.",
         add="buys {n} more", sub="gives {n} to {his} sister", add_prod="picks {c} bags with {n} apples in each",
         sub_prod="gives {n} apples to each of {c} neighbors", div="shares them equally among {k} friends",
         question="How many apples does {name} have now?", div_question="How many apples does each friend get?"),
    dict(start="{name} has {a} pencils in the classroom.",
         start_prod="{name} has {c} boxes of pencils with {n} pencils in each box.",
         add="orders {n} more", sub="hands out {n} to students", add_prod="buys {c} boxes with {n} pencils each",
         sub_prod="gives {n} pencils to each of {c} groups", div="splits them equally among {k} tables",
         question="How many pencils does {name} have now?", div_question="How many pencils does each table get?",
         teacher="yes"),
    dict(start="{name} has ${a} in a piggy bank.", start_prod="{name} saves ${n} per week for {c} weeks.",
         add="earns ${n} walking dogs", sub="spends ${n} on a book", add_prod="saves ${n} per week for {c} more weeks",
         sub_prod="buys {c} tickets that cost ${n} each", div="divides the money equally into {k} envelopes",
         question="How many dollars does {name} have now?", div_question="How many dollars are in each envelope?"),
    dict(start="A bakery has {a} cookies.",
         start_prod="A bakery bakes {c} trays of cookies with {n} cookies on each tray.",
         add="bakes {n} more", sub="sells {n}", add_prod="bakes {c} more trays of {n} cookies",
         sub_prod="sells {c} boxes of {n} cookies", div="packs them equally into {k} boxes",
         question="How many cookies does the bakery have now?", div_question="How many cookies are in each box?",
         subject="It"),
    dict(start="A library has {a} books on a shelf.",
         start_prod="A library has {c} shelves with {n} books on each shelf.",
         add="receives {n} donated books", sub="lends out {n}", add_prod="receives {c} boxes of {n} new books",
         sub_prod="lends {n} books to each of {c} schools", div="spreads them equally across {k} carts",
         question="How many books does the library have now?", div_question="How many books are on each cart?",
         subject="It"),
    dict(start="{name} has {a} stickers.",
         start_prod="{name} has {c} sheets of stickers with {n} stickers on each sheet.",
         add="gets {n} more from a friend", sub="uses {n} to decorate a notebook",
         add_prod="buys {c} packs with {n} stickers in each", sub_prod="puts {n} stickers on each of {c} cards",
         div="shares them equally among {k} classmates", question="How many stickers does {name} have now?",
         div_question="How many stickers does each classmate get?"),
]
_PEOPLE = [("Tom", "he", "his"), ("Maria", "she", "her"), ("Liam", "he", "his"), ("Aisha", "she", "her"),
           ("Kenji", "he", "his"), ("Sofia", "she", "her"), ("Omar", "he", "his"), ("Emma", "she", "her"),
           ("Diego", "he", "his"), ("Priya", "she", "her"), ("Lucas", "he", "his"), ("Hana", "she", "her")]
_TEACHERS = [("Ms. Lee", "she", "her"), ("Mr. Park", "he", "his"), ("Mrs. Diaz", "she", "her"),
             ("Mr. Novak", "he", "his")]

# Plans (sequences of step kinds) per difficulty; the number of arithmetic operations equals the difficulty.
_PLANS: dict[int, list[tuple[str, ...]]] = {
    1: [("start", "add"), ("start", "sub")],
    2: [("start", "add", "sub"), ("start", "sub", "add"), ("start", "add_prod"), ("start", "sub_prod"),
        ("start_prod", "add"), ("start_prod", "sub")],
    3: [("start_prod", "add", "sub"), ("start_prod", "sub", "add"), ("start", "add_prod", "sub"),
        ("start", "sub", "add_prod"), ("start", "add", "sub_prod"), ("start_prod", "add_prod"),
        ("start", "add", "sub", "div"), ("start", "sub", "add", "div"),
        ("start_prod", "add", "div"), ("start_prod", "sub", "div")],
}
# (largest plain operand, largest group count, largest group size, largest divisor) per difficulty.
_LIMITS = {1: (20, 0, 0, 0), 2: (50, 5, 10, 0), 3: (100, 6, 15, 9)}


def _step(rng: random.Random, kind: str, value: int, limits: tuple[int, ...], multiple_of: int) -> tuple[str, dict]:
    """Numbers for one step applied to `value`; the result is >= 0 and, when asked, a multiple of `multiple_of`.

    Numbers are drawn inside the feasible range directly (never rejected); a subtraction with no room left
    turns into the matching addition, which is always feasible."""
    hi, max_count, max_size, _ = limits
    if kind == "start":
        return kind, {"a": rng.randint(2, hi)}  # from 2: "has 1 books" reads badly
    if kind == "start_prod":
        return kind, {"c": rng.randint(2, max_count), "n": rng.randint(2, max_size)}
    if kind == "sub" and multiple_of > 1:
        first = value % multiple_of or multiple_of  # smallest n with (value - n) % k == 0
        top = min(hi, value - multiple_of)  # keep at least one share for each of the k receivers
        if first <= top:
            return kind, {"n": first + multiple_of * rng.randint(0, (top - first) // multiple_of)}
        kind = "add"
    if kind == "add" and multiple_of > 1:
        first = -value % multiple_of or multiple_of
        first += multiple_of if first == 1 else 0  # "receives 1 donated books" reads badly
        return kind, {"n": first + multiple_of * rng.randint(0, (hi - first) // multiple_of)}
    if kind == "sub" and value >= 2:  # leave at least one, so answers of 0 stay out
        return kind, {"n": rng.randint(1, min(hi, value - 1))}
    if kind in ("add", "sub"):
        return "add", {"n": rng.randint(2, hi)}
    if kind == "sub_prod" and value >= 5:
        c = rng.randint(2, min(max_count, (value - 1) // 2))  # leaves room for n >= 2 with c * n < value
        return kind, {"c": c, "n": rng.randint(2, min(max_size, (value - 1) // c))}
    return "add_prod", {"c": rng.randint(2, max_count), "n": rng.randint(2, max_size)}


def _apply(kind: str, value: int, nums: dict) -> int:
    if kind in ("start", "start_prod"):
        return nums["a"] if kind == "start" else nums["c"] * nums["n"]
    delta = nums["n"] if kind in ("add", "sub") else nums["c"] * nums["n"]
    return value + delta if kind.startswith("add") else value - delta


def arithmetic_problem(rng: random.Random, difficulty: int) -> Problem:
    """One seeded multi-step arithmetic word problem (difficulty 1-3 = number of operations) with answer >= 0."""
    if difficulty not in _PLANS:
        raise ValueError(f"--difficulty {difficulty}: expected 1, 2 or 3")
    limits = _LIMITS[difficulty]
    story = rng.choice(_STORIES)
    name, he, his = rng.choice(_TEACHERS if story.get("teacher") else _PEOPLE)
    plan = rng.choice(_PLANS[difficulty])
    value, steps, divisor = 0, [], 1
    for i, kind in enumerate(plan):
        if kind == "div":  # always last, after an add/sub that was steered onto a multiple of `divisor`
            steps.append(("div", {"k": divisor}))
            value //= divisor
            continue
        if i + 1 < len(plan) and plan[i + 1] == "div":
            divisor = rng.randint(2, limits[3])  # chosen first so division is exact by construction
        kind, nums = _step(rng, kind, value, limits, divisor)
        value = _apply(kind, value, nums)
        steps.append((kind, nums))
    fields = {"name": name, "his": his}
    first = story[steps[0][0]].format(**fields, **steps[0][1])
    clauses = [story[kind].format(**fields, **nums) for kind, nums in steps[1:]]
    subject = story.get("subject", he.capitalize())
    question = story["div_question" if plan[-1] == "div" else "question"].format(**fields)
    text = f"{first} {subject} {_join_clauses(clauses)}. {question}"
    return Problem(text, str(value), columns={"question": text, "answer": str(value)})


def _join_clauses(clauses: list[str]) -> str:
    if len(clauses) == 1:
        return clauses[0]
    if len(clauses) == 2:
        return f"{clauses[0]} and then {clauses[1]}"
    return ", then ".join(clauses[:-1]) + f", and then {clauses[-1]}"


def _is_test_question(question: str) -> bool:
    # A stable hash (not Python's salted hash()) so the split is the same in every process and run.
    return int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:8], 16) % 8 == 0


def arithmetic_problems(split: str, num_problems: int, difficulty: int, seed: int) -> list[Problem]:
    """`num_problems` distinct problems; the test split is the 1-in-8 hash bucket, train is everything else."""
    if split not in ("train", "test"):
        raise ValueError(f"--split '{split}': expected 'train' or 'test' for the arithmetic dataset")
    if difficulty not in _PLANS:
        raise ValueError(f"--difficulty {difficulty}: expected 1, 2 or 3")
    # Both splits draw from the same stream and filter it, so they are disjoint by construction.
    rng = random.Random(int(hashlib.sha256(f"arithmetic:{seed}:{difficulty}".encode()).hexdigest()[:16], 16))
    problems: list[Problem] = []
    seen: set[str] = set()
    for _ in range(64 * num_problems + 10_000):  # bounded: small spaces (difficulty 1) can run out
        problem = arithmetic_problem(rng, difficulty)
        if problem.question in seen or _is_test_question(problem.question) != (split == "test"):
            continue
        seen.add(problem.question)
        problems.append(problem)
        if len(problems) == num_problems:
            return problems
    raise ValueError(f"--num_problems {num_problems}: only {len(problems)} distinct difficulty-{difficulty} "
                     f"'{split}' problems could be generated; ask for fewer")


# ------------------------------------------------------------------------------------------------ loading

_OTHER_DATA_SUFFIXES = {".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx", ".xml", ".yaml", ".yml"}


# Column names recognised when --prompt_column / --answer_column are not given, first match wins: GSM8K's
# question/answer, MATH's problem/solution, TRL's prompt with solution/answer/ground_truth.
PROMPT_COLUMNS = ("prompt", "question", "problem")
ANSWER_COLUMNS = ("answer", "solution", "ground_truth")
# TRL passes every column to reward functions but these (they are the trainer's own arguments).
RESERVED_COLUMNS = ("prompt", "completion", "completion_ids")


def load_problems(dataset: str, split: str = "train", *, num_problems: int | None = None, difficulty: int = 2,
                  seed: int = 0, bad_answers: str = "skip", prompt_column: str | None = None,
                  answer_column: str | None = None) -> list[Problem]:
    """The one entry point: 'arithmetic', a local .jsonl/.json/.parquet file, or a hub dataset id.

    Each row needs a prompt (`prompt_column`, default the first of prompt/question/problem present: a string, or a
    list of chat messages) and a gold answer (`answer_column`, default the first of answer/solution/ground_truth;
    any form read_gold reads). `split` only applies to 'arithmetic' and the hub; `num_problems` keeps the first n
    usable rows. Rows whose gold cannot be read are skipped and counted in one warning naming the column and the
    first such row (bad_answers="skip"), or stop the run (bad_answers="error"); a dataset with no readable gold
    is refused."""
    if bad_answers not in ("skip", "error"):
        raise ValueError(f"--bad_answers '{bad_answers}': expected 'skip' or 'error'")
    if num_problems is not None and num_problems < 1:
        raise ValueError(f"--num_problems {num_problems}: expected a positive integer")
    columns = (prompt_column, answer_column)
    if dataset == "arithmetic":
        if prompt_column or answer_column:
            raise ValueError(f"--{'prompt' if prompt_column else 'answer'}_column: the built-in arithmetic "
                             f"problems have no columns to choose; give it with a --dataset file or hub id")
        count = num_problems or (5000 if split == "train" else 500)
        return arithmetic_problems(split, count, difficulty, seed)
    path = Path(dataset)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise ValueError(f"--dataset '{dataset}': file not found")
        if path.stat().st_size == 0:
            raise ValueError(f"{dataset}: file is empty")
        read = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}[suffix]
        try:
            problems = _to_problems(read(dataset), dataset, bad_answers, *columns)
        except UnicodeDecodeError as e:
            raise ValueError(f"{dataset}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    elif suffix in _OTHER_DATA_SUFFIXES or path.is_file():
        raise ValueError(f"--dataset '{dataset}': unsupported file type; use .jsonl, .json or .parquet")
    else:
        problems = _to_problems(_hub_rows(dataset, split), f"--dataset '{dataset}'", bad_answers, *columns)
    return problems[:num_problems] if num_problems else problems


def _jsonl_rows(path: str) -> Iterable[tuple[str, Any]]:
    """(location, row) pairs; read line by line so errors can name the line."""
    found = False
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing one) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            found = True
            yield f"{path}:{lineno}", row
    if not found:
        raise ValueError(f"{path}: file is empty")


def _json_rows(path: str) -> list[tuple[str, Any]]:
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or an object with a 'data' list)")
    if not data:
        raise ValueError(f"{path}: file is empty")
    # A .json file has no useful line per row, so errors name the 1-based row instead.
    return [(f"{path} (row {i})", row) for i, row in enumerate(data, start=1)]


def _parquet_rows(path: str) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq  # imported here: only parquet users pay for it

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: cannot read parquet ({type(e).__name__}: {_short(e)})") from None
    if not rows:
        raise ValueError(f"{path}: file is empty")
    return [(f"{path} (row {i})", row) for i, row in enumerate(rows, start=1)]


def _hub_rows(dataset: str, split: str) -> list[tuple[str, Any]]:
    import datasets  # heavy import, only for hub users

    try:
        ds = datasets.load_dataset(dataset, "main" if dataset == "openai/gsm8k" else None, split=split)
    except Exception as e:  # anything from network, auth or a missing repo: all mean "cannot load"
        raise ValueError(f"--dataset '{dataset}': cannot load from the Hugging Face hub ({type(e).__name__}: "
                         f"{_short(e)}); pass a local .jsonl/.json/.parquet file or 'arithmetic'") from None
    return [(f"--dataset '{dataset}' (row {i})", row) for i, row in enumerate(ds, start=1)]


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else "no message"


def _column(row: dict, where: str, given: str | None, candidates: tuple[str, ...], flag: str) -> str:
    """The column of `row` that holds the prompt or the answer: `given`, else the first candidate present."""
    if given is not None:
        if given not in row:
            raise ValueError(f"{where}: no column '{given}' ({flag}); the row has {', '.join(map(str, row)) or 'none'}")
        return given
    found = next((name for name in candidates if name in row), None)
    if found is None:
        raise ValueError(f"{where}: none of the columns {', '.join(candidates)}; name the one to use with {flag} "
                         f"(the row has {', '.join(map(str, row)) or 'none'})")
    return found


def chat_messages(value: Any, where: str, column: str) -> tuple[dict, ...]:
    """A chat-format prompt as a tuple of {"role", "content"} dicts, checked; a one-line error naming the row."""
    if not value:
        raise ValueError(f"{where}: column '{column}' is an empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: column '{column}' message {i} is not a {{'role': str, 'content': str}} turn")
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{where}: column '{column}' has no user turn")
    return tuple(messages)


def _to_problems(rows: Iterable[tuple[str, Any]], source: str, bad_answers: str, prompt_column: str | None = None,
                 answer_column: str | None = None) -> list[Problem]:
    problems, skipped, first_bad = [], 0, None
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: row is not a JSON object")
        prompt_key = _column(row, where, prompt_column, PROMPT_COLUMNS, "--prompt_column")
        answer_key = _column(row, where, answer_column, ANSWER_COLUMNS, "--answer_column")
        prompt, answer = row[prompt_key], row[answer_key]
        if isinstance(prompt, list):
            messages = chat_messages(prompt, where, prompt_key)
            question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        elif isinstance(prompt, str):
            messages, question = (), prompt
        else:
            raise ValueError(f"{where}: column '{prompt_key}' is neither a string nor a list of chat messages")
        gold = read_gold(answer)
        if gold is None:
            if bad_answers == "error":
                raise ValueError(f"{where}: column '{answer_key}' holds no readable gold answer (a number, '#### x', "
                                 f"\\boxed{{x}} or a short answer): {str(answer)[:60]!r}")
            skipped += 1
            first_bad = first_bad or f"{where}: {str(answer)[:60]!r}"
            continue
        solution = answer if isinstance(answer, str) else str(answer)
        columns = {k: v for k, v in row.items() if k not in RESERVED_COLUMNS}
        problems.append(Problem(question, gold, solution, messages, columns))
    if not problems:
        raise ValueError(f"{source}: no usable rows ({skipped} without a readable gold answer; first {first_bad})")
    if skipped:
        logger.warning("%s: skipped %d of %d rows whose gold answer cannot be read (first %s); --bad_answers error "
                       "stops instead", source, skipped, skipped + len(problems), first_bad)
    return problems


# ------------------------------------------------------------------------------------------------ prompts

def render_chat(tokenizer: Any, messages: list[dict], response_prefix: str = "",
                tools: list[dict] | None = None) -> str:
    r"""Prompt text for a conversation (dicts with 'role' and 'content'), ending where the model's answer starts:
    after the assistant's turn opens and after `response_prefix` (text the answer is made to begin with, such as
    "<think>\n"; part of the prompt, so it is neither generated, trained on nor scored).

    Models without a chat template (base models often ship none, and transformers refuses to guess one) get a plain
    transcript that still ends on the assistant's turn:

    >>> class Plain: chat_template = None
    >>> render_chat(Plain(), [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}])
    'System: Be brief.\nUser: 2+3?\nAssistant:'

    `tools` (JSON schemas, tools.Toolbox) reach the model through the template where it renders them
    (`apply_chat_template(..., tools=...)`), and otherwise in the text format's block at the end of the system turn
    (tools.with_tool_instructions; docs/AGENTS.md). Tool turns written in OpenAI's form (an assistant message with
    `tool_calls`, `tool` messages: a worked example that calls tools, a chat sent to the server) are framed as
    rollouts frame them (tools.ToolFormat.frame).
    """
    if any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        messages = ToolFormat(tokenizer).frame(messages)  # framing a turn needs no prefix
    if tools and renders_tools(tokenizer):
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=True) + response_prefix
    if tools:
        messages = with_tool_instructions(messages, tools)
    if getattr(tokenizer, "chat_template", None) is None:
        turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return f"{turns}Assistant:{response_prefix}"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + response_prefix


def prompt_messages(question: str | None, system_prompt: str | None = SYSTEM_PROMPT,
                    example: tuple[str, str] | list[dict] | None = None) -> list[dict]:
    """The turns a question is asked in: the system prompt (None: none), the worked example (question, answer) as
    an earlier user turn and its answer (None: none), or the example's turns as messages (one that calls tools:
    tools.Toolbox.worked_example), then the question (None: stop before it).

    >>> [m["role"] for m in prompt_messages("2+3?", "Be brief.", ("1+1?", "2"))]
    ['system', 'user', 'assistant', 'user']
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if isinstance(example, list):
        messages += [dict(m) for m in example]
    elif example is not None:
        messages += [{"role": "user", "content": example[0]}, {"role": "assistant", "content": example[1]}]
    return messages + ([{"role": "user", "content": question}] if question is not None else [])


def render_prompt(tokenizer: Any, question: str, system_prompt: str | None = SYSTEM_PROMPT,
                  response_prefix: str = "", example: tuple[str, str] | list[dict] | None = None,
                  tools: list[dict] | None = None) -> str:
    """Prompt text for one question, asked in prompt_messages' turns; see render_chat. Training, evaluation, ask
    and serve all build their prompts here."""
    return render_chat(tokenizer, prompt_messages(question, system_prompt, example), response_prefix, tools)


def render_problem(tokenizer: Any, problem: Problem, system_prompt: str | None = SYSTEM_PROMPT,
                   response_prefix: str = "", example: tuple[str, str] | list[dict] | None = None,
                   tools: list[dict] | None = None) -> str:
    r"""Prompt text for a problem. A question string is asked in prompt_messages' turns (render_prompt). A chat-format
    prompt is rendered as written, as TRL renders it: the system prompt and worked example are not added (the
    conversation carries its own), and a last assistant turn is a prefill the answer continues (TRL's
    continue_final_message). The response prefix is appended in both cases.

    >>> class Plain: chat_template = None
    >>> chat = Problem("2+3?", "5", messages=({"role": "user", "content": "2+3?"},))
    >>> render_problem(Plain(), chat, "Ignored for chat prompts.")
    'User: 2+3?\nAssistant:'
    """
    if not problem.messages:
        return render_prompt(tokenizer, problem.question, system_prompt, response_prefix, example, tools)
    messages = [dict(m) for m in problem.messages]
    if messages[-1]["role"] != "assistant":
        return render_chat(tokenizer, messages, response_prefix, tools)
    if tools and renders_tools(tokenizer):
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             continue_final_message=True) + response_prefix
    if tools:
        messages = with_tool_instructions(messages, tools)
    if getattr(tokenizer, "chat_template", None) is None:
        turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages[:-1])
        return f"{turns}Assistant: {messages[-1]['content']}{response_prefix}"
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True) + response_prefix


# ---------------------------------------------------------------------------------------------- data order

class PromptSampler:
    """Seeded, resumable order over problems: one permutation per epoch from default_rng([seed, epoch]).

    Batches run across epoch boundaries so every batch has exactly batch_size problems. Every rank builds the
    same sampler and takes the same global batch, then its own slice, so no communication is needed."""

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise ValueError("PromptSampler: no problems to sample from")
        if seed < 0:
            raise ValueError(f"--seed {seed}: expected a non-negative integer")
        self.problems = problems
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))

    def next_batch(self, batch_size: int) -> list[Problem]:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: expected a positive integer")
        batch = []
        while len(batch) < batch_size:
            if self.cursor == len(self._order):
                self.load_state_dict({"epoch": self.epoch + 1, "cursor": 0})
            take = self._order[self.cursor:self.cursor + batch_size - len(batch)]
            batch.extend(self.problems[i] for i in take)
            self.cursor += len(take)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= len(self.problems):
            raise ValueError(f"sampler state {state}: cursor must be in [0, {len(self.problems)}] and epoch >= 0")
        self.epoch, self.cursor = epoch, cursor
        self._order = self._permutation(epoch)
