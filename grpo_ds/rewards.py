r"""Reward functions: grpo_ds's presets, ``reward_fn(completion, gold) -> float``, and TRL's batched convention.

What each preset pays (``--reward NAME``; "block" is the first ``<answer>...</answer>``, "clean" means the block holds
just the answer, a number or an equation ending in it, or for a non-numeric gold any expression without words, with
nothing after it). "Right" compares the block's content with the gold as numbers when the gold is a plain number
("$1,234.00" == "1234", "5/2" == "2.5", "6 apples" == "6"), otherwise with math-verify (answers_match:
"\frac{1}{2}" == "0.5", "(1, 2)" != "(2, 1)", intervals, LaTeX):

| preset | right answer in the block | wrong answer in the block | no block, right last answer | no block |
| --- | --- | --- | --- | --- |
| ``math`` (default) | 1.1 | 0.1 (0 when a numeric gold's block holds no number) | 0 | 0 |
| ``math_clean`` (the CPU recipe) | 1.2 if clean right after ``</think>``, else 0.25 | 0.2 if clean after ``</think>`` | 0.25 | 0 |
| ``math_shaped`` | math + 0.05 per answer tag + 0.25 | 0.1 + tags | 0.25 + tags | 0.05 per tag |
| ``math_verify`` | 1.1 (math-verify for every gold) | 0.1 | 0 | 0 |
| ``correct`` / ``format`` / ``lenient`` | 1 / 1 if clean / 1 | 0 / 1 if clean / 1 if its last answer is right | 0 / 0 / 1 | 0 |
| ``seed`` (tiny-grpo) | 1.0 exact string, 0.5 if the gold is inside | 0.01 | 0 | 0 |
| ``hash`` | benchmarks only: a pseudo-random score of the text, so groups never tie |

"Last answer" (lenient): the last number in the text for a numeric gold; for other golds, math-verify's reading of
the whole text (its last ``\boxed{}`` or expression).

Anything else is loaded with ``--reward package.module:function`` (see `get_reward_fn`) in either form:
grpo_ds's ``f(completion, gold) -> float``, called per completion, or TRL's batched
``f(completions, prompts=, completion_ids=, **columns) -> list[float | None]``, called once per rollout batch with
every dataset column by name (see `is_batched`, `score_completions`), so TRL's ``trl.rewards`` work unchanged.

Nothing here raises on model output: malformed text scores 0. The module is pure Python (no torch), so rewards are
cheap to test and usable from evaluation scripts.
"""

import hashlib
import inspect
import logging
import math
import numbers
import re
from dataclasses import dataclass
from typing import Callable

from .data import Problem, is_number
from .tools import import_callable

RewardFn = Callable[[str, str], float]

log = logging.getLogger(__name__)

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# Thousands separators (",", LaTeX "{,}" and "\,") only between a digit and exactly three digits, so "1,234" is one
# number while "1, 2" and "1,2345" are two.
_THOUSANDS_RE = re.compile(r"(?<=\d)(?:,|\{,\}|\\,)(?=\d{3}(?!\d))")
_CURRENCY_RE = re.compile(r"[$€£¥₹]")
# A digit right before \frac is a mixed number ("2\frac{1}{2}"); rewriting it to "21/2" would be wrong.
_LATEX_FRAC_RE = re.compile(r"(?<!\d)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\uff0d": "-"})  # unicode minus, fullwidth hyphen-minus
_NUMBER_RE = re.compile(
    r"(?P<sign>(?<!\w)-)?"  # a minus after a digit or letter is a range/operator ("5-3"), not a sign
    r"(?:(?<!/)(?P<num>\d+)/(?P<den>\d+)(?![\d/]|\.\d)"  # integer fraction, but not a date "1/2/2020"
    r"|\d+(?:\.\d+)?"  # 72, 2.50; a trailing "." ("3.", "is 72.") is left behind as punctuation
    r"|(?<!\d)\.\d+)"  # .5
)


def extract_answer(completion: str) -> str | None:
    """Content of the first well-formed <answer>...</answer> block, stripped; None if there is none.

    First, as the tiny-grpo tutorial's re.search: a hedging model writing two answers is judged on the first.

    >>> extract_answer("<think>48+24</think><answer> 72 </answer><answer>73</answer>")
    '72'
    >>> extract_answer("<answer>72") is None
    True
    """
    start = completion.find("<answer>") if isinstance(completion, str) else -1
    if start < 0:
        return None
    # Same result as ANSWER_RE.search (no close tag after the first open tag means none after a later one), but
    # linear: search() retries from every "<answer>" and is quadratic on a degenerate "<answer><answer>..." rollout.
    match = ANSWER_RE.match(completion, start)
    return match.group(1).strip() if match else None


def _match_value(match: re.Match) -> float | None:
    """The float of one _NUMBER_RE match; None for 1/0 or a value too large for a float."""
    try:
        if match.group("den") is not None:
            value = float(match.group("num")) / float(match.group("den"))
            value = -value if match.group("sign") else value
        else:
            value = float(match.group(0))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def parse_number(text: str | None) -> float | None:
    """The last number in `text` after normalization, or None. Never raises.

    Strips currency and thousands commas, reads unicode minus, decimals, integer fractions and LaTeX \\frac; ignores
    units and wrappers. The last number is taken because models put the result at the end ("48+24 = 72").

    >>> [parse_number(s) for s in ["$1,234.00", "6个", "−3", "5-3", ".5", "3/4", "\\\\boxed{72}", "is 72.", ""]]
    [1234.0, 6.0, -3.0, 3.0, 0.5, 0.75, 72.0, 72.0, None]
    >>> parse_number("1, 2"), parse_number("1,2345")  # not thousands groupings: two numbers each
    (2.0, 2345.0)
    """
    if text is None:
        return None
    text = str(text).translate(_MINUS_SIGNS)
    text = _CURRENCY_RE.sub("", text)  # before signs are read, so "-$3" is -3
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = _THOUSANDS_RE.sub("", text)
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return _match_value(last) if last is not None else None


def extract_last_number(completion: str) -> float | None:
    """Lenient extraction for evaluation: the last number anywhere in the completion.

    >>> extract_last_number("48/2 = 24, so 48 + 24 = 72 clips.")
    72.0
    """
    return parse_number(completion) if isinstance(completion, str) else None


def numbers_equal(a: float | None, b: float | None) -> bool:
    """True when both are numbers equal within 1e-6 relative (1e-9 absolute near zero).

    >>> numbers_equal(2.5, 5 / 2), numbers_equal(72.0, 73.0), numbers_equal(None, None)
    (True, False, False)
    """
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def answers_match(answer: str | None, gold: str) -> bool:
    r"""True when an extracted answer equals the gold: as numbers when the gold is a plain number (data.is_number),
    otherwise as mathematical objects by math-verify (fractions, LaTeX, expressions, tuples, intervals).

    >>> answers_match("$72.00", "72"), answers_match("6 apples", "6"), answers_match(None, "6")
    (True, True, False)
    >>> answers_match("0.5", "\\frac{1}{2}"), answers_match("(2, 1)", "(1, 2)")
    (True, False)
    """
    if answer is None:
        return False
    if is_number(gold):
        return numbers_equal(parse_number(answer), float(gold))
    return math_equal(answer, gold)


def is_correct(completion: str, gold: str) -> bool:
    r"""Strict: the content of the first <answer> block equals the gold (answers_match).

    >>> is_correct("<answer>$72.00</answer>", "72"), is_correct("The answer is 72", "72")
    (True, False)
    >>> is_correct("<answer>\\frac{3}{6}</answer>", "\\frac{1}{2}")
    True
    """
    return answers_match(extract_answer(completion), gold)


_FRACTION_RE = re.compile(r"-?(?:\d+/\d+|\\[dt]?frac\{\d+\}\{\d+\})")  # golds with a numeric value


def is_correct_lenient(completion: str, gold: str) -> bool:
    r"""Lenient: for a numeric gold, the last number anywhere in the completion equals it; otherwise the strict check,
    the last number for a fraction gold ("5/2", "\frac{5}{2}"), or math-verify's reading of the whole completion
    (its last \boxed{}, or last expression).

    >>> is_correct_lenient("The answer is 72", "72"), is_correct_lenient("so it is \\boxed{\\frac{1}{2}}", "0.5")
    (True, True)
    """
    if is_number(gold):
        return numbers_equal(extract_last_number(completion), float(gold))
    if not isinstance(completion, str):
        return False
    fraction = parse_number(gold) if _FRACTION_RE.fullmatch(str(gold).strip()) else None
    return (is_correct(completion, gold) or numbers_equal(extract_last_number(completion), fraction)
            or math_equal(completion, gold, whole_text=True))


def has_format(completion: str, gold: str | None = None) -> bool:
    """True when the completion has an <answer> block holding an answer: a number when the gold is a number (or
    unknown), any non-empty content for other golds (a fraction, an interval, a letter).

    >>> has_format("<answer>6 apples</answer>"), has_format("<answer>seventy-two</answer>")
    (True, False)
    >>> has_format("<answer>(1, 2]</answer>", "(1, 2]"), has_format("<answer> </answer>", "(1, 2]")
    (True, False)
    """
    answer = extract_answer(completion)
    if gold is not None and not is_number(gold):
        return bool(answer)
    return parse_number(answer) is not None


def seed_reward(completion: str, gold: str) -> float:
    """The tiny-grpo tutorial's scheme: 1.0 exact, 0.5 gold inside the answer, 0.01 other answer, 0.0 no answer.

    >>> [seed_reward(c, "72") for c in ["<answer>72</answer>", "<answer>72 or 73</answer>", "<answer>7</answer>", "72"]]
    [1.0, 0.5, 0.01, 0.0]
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    gold = str(gold).strip()
    if answer == gold:
        return 1.0
    if gold and gold in answer:  # an empty gold is "in" every string; it should not pay
        return 0.5
    return 0.01


def math_reward(completion: str, gold: str) -> float:
    """Default preset: 1.0 for numeric equivalence (is_correct) plus a 0.1 format bonus (has_format).

    No substring credit: under seed_reward "72 or 73 or 74" gets 0.5; here only its last number counts.

    >>> [math_reward(c, "72") for c in ["<answer>$72</answer>", "<answer>73</answer>", "72"]]
    [1.1, 0.1, 0.0]
    """
    return (1.0 if is_correct(completion, gold) else 0.0) + (0.1 if has_format(completion, gold) else 0.0)


def math_shaped_reward(completion: str, gold: str) -> float:
    """math_reward plus partial credit for a small model that never closes an <answer> block yet.

    Under math_reward such a model scores 0 on every completion, every group ties and nothing is learned. This
    preset adds 0.05 for each answer tag written (opening and closing) and 0.25 when the last number anywhere in
    the completion is the gold one (the lenient check): a gradient towards the format and towards the right number
    from the first step. The lenient credit is also what keeps the tag credit honest: with tags alone paid,
    SmolLM2-135M learned to answer "<answer> </answer>" and nothing else within 14 steps; here that scores 0.1,
    below a right number without tags (0.25).

    >>> [round(math_shaped_reward(c, "72"), 2) for c in
    ...  ["<answer>72</answer>", "It is 72", "<answer>7</answer>", "<answer> </answer>", "72 <answer></answer>"]]
    [1.45, 0.25, 0.2, 0.1, 0.35]
    """
    tags = 0.05 * ("<answer>" in completion) + 0.05 * ("</answer>" in completion)
    lenient = 0.25 if is_correct_lenient(completion, gold) else 0.0
    return math_reward(completion, gold) + tags + lenient


_CLEAN_CONTENT_RE = re.compile(r"[\d\s.,$()+\-*/×÷x=]*\d")  # a number, or an equation ending in one
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")


def _clean_math(content: str) -> bool:
    r"""A math answer with no words: LaTeX commands set aside, no run of three letters or more ("\frac{1}{2}",
    "(1, 2]", "x = 3", "B" are clean; "22 stickers" and "the answer" are not).

    >>> [_clean_math(c) for c in ["\\frac{1}{2}", "3\\sqrt{2}", "(1, 2]", "B", "22 stickers", ""]]
    [True, True, True, True, False, False]
    """
    return bool(content) and not _WORD_RE.search(_LATEX_COMMAND_RE.sub(" ", content))


def clean_answer(completion: str, after_reasoning: bool = False, math: bool = False) -> str | None:
    r"""The content of the completion's answer block when the block holds just the answer and nothing follows it;
    None otherwise. Just the answer: a number, or an equation ending in the number ("5 + 17 = 22"), no words or
    units. Nothing follows: only whitespace after `</answer>` (the end of turn is a special token, not text), and
    no second block. Reciting a prompt that quotes the tags ("... <answer> </answer> tags") is never clean. With
    `after_reasoning`, the block must also come right after the reasoning's closing `</think>` (the format the
    R1-style prompts ask for: `<think> reasoning </think> <answer> answer </answer>`). With `math` (a gold that is
    not a plain number), the answer may also be any expression without words (_clean_math: "\\frac{1}{2}").

    >>> [clean_answer(c) for c in ["<think>5 + 17</think>\n<answer>22</answer>", "<answer>5 + 17 = 22</answer>\n",
    ...                            "<answer>22 stickers</answer>", "<answer>22</answer> The answer is 22."]]
    ['22', '5 + 17 = 22', None, None]
    >>> clean_answer("5 + 17 = 22\n<answer>22</answer>", after_reasoning=True) is None
    True
    """
    if not isinstance(completion, str) or completion.count("<answer>") != 1 or completion.count("</answer>") != 1:
        return None
    head, _, rest = completion.partition("<answer>")
    content, found, tail = rest.partition("</answer>")
    content = content.strip()
    if not found or tail.strip() or content.startswith("="):
        return None
    if not (_CLEAN_CONTENT_RE.fullmatch(content) or (math and _clean_math(content))):
        return None
    if after_reasoning and (completion.count("</think>") != 1 or not head.rstrip().endswith("</think>")):
        return None
    return content


def math_clean_reward(completion: str, gold: str) -> float:
    r"""For small models learning the format: the format pays only for a clean answer block right after the
    closed reasoning (clean_answer with after_reasoning), so a block stuffed with words, followed by chatter,
    recited from the prompt, or written without closing the `<think>` block earns no format credit.

    Clean: 0.2, plus 1.0 when its number (the last number of an equation) is the gold. Not clean: 0.25 when the
    last number anywhere is the gold (a correctness signal before the format is learned), else 0. The tag credit
    of math_shaped is gone: SmolLM2-135M learned to recite "<answer> answer here </answer>" from the system prompt
    for it; and the closed reasoning is required because, paid without it, the model dropped `</think>`, a token
    the reference model expects there, and half the KL to the reference came from that one change
    (docs/RECIPE_CPU.md).

    >>> [math_clean_reward(c, "22") for c in ["5 + 17 = 22</think>\n<answer>22</answer>",
    ...  "<think>5 + 17</think><answer>5 + 17 = 22</answer>", "</think><answer>21</answer>", "So 22.",
    ...  "</think><answer>22</answer> Yes, 22.", "5 + 17 = 22\n<answer>22</answer>", "21"]]
    [1.2, 1.2, 0.2, 0.25, 0.25, 0.25, 0.0]
    """
    content = clean_answer(completion, after_reasoning=True, math=not is_number(gold))
    if content is not None:
        return 0.2 + (1.0 if answers_match(content, gold) else 0.0)
    return 0.25 if is_correct_lenient(completion, gold) else 0.0


def hash_reward(completion: str, gold: str) -> float:
    """For benchmarks, not learning: a score in [0, 1) drawn from the SHA-256 of the completion's text.

    A model that never answers (random weights, or any model on a fixed-length run) scores 0 everywhere, so every
    group ties and the trainer skips the step's reference pass and update; distinct texts almost never tie here,
    so every benchmarked step does the full work. Deterministic: equal texts score equally on any rank or run.

    >>> hash_reward("abc", "1") == hash_reward("abc", "2"), 0 <= hash_reward("abc", "1") < 1
    (True, True)
    """
    return int.from_bytes(hashlib.sha256(completion.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2 ** 64


def correct_reward(completion: str, gold: str) -> float:
    """1.0 when the number in the first answer block is the gold (is_correct), else 0.0; for weighted sums.

    >>> correct_reward("<answer>72</answer>", "72"), correct_reward("72", "72")
    (1.0, 0.0)
    """
    return float(is_correct(completion, gold))


def format_reward(completion: str, gold: str) -> float:
    """1.0 for a clean answer block (clean_answer: just the answer, nothing after), else 0.0; for weighted sums.

    >>> format_reward("<answer>3 + 4 = 7</answer>", "7"), format_reward("<answer>7</answer> done", "7")
    (1.0, 0.0)
    """
    return float(clean_answer(completion, math=not is_number(gold)) is not None)


def lenient_reward(completion: str, gold: str) -> float:
    """1.0 when the last number anywhere is the gold (is_correct_lenient), else 0.0; for weighted sums.

    >>> lenient_reward("so it is 72", "72")
    1.0
    """
    return float(is_correct_lenient(completion, gold))


def math_verify_reward(completion: str, gold: str) -> float:
    r"""1.0 when the first answer block's content and the gold are the same mathematical object by the math-verify
    package (expressions, fractions, LaTeX: "\\frac{1}{2}" == "0.5" == "1/2"), plus 0.1 when a block exists, for numeric
    golds too (the other presets compare numeric golds as numbers and hand every other gold to math-verify).

    >>> math_verify_reward("<answer>\\frac{1}{2}</answer>", "0.5"), math_verify_reward("<answer>1/3</answer>", "0.5")
    (1.1, 0.1)
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    return 0.1 + (1.0 if math_equal(answer, gold) else 0.0)


def math_equal(answer: str, gold: str, whole_text: bool = False) -> bool:
    """math-verify's verdict that `answer` (an answer block's content, read as LaTeX; or, with `whole_text`, a
    whole completion, searched for its answer) equals `gold`; False for anything it cannot parse. Its
    signal-based timeout only works on the main thread, so elsewhere (a server's worker) it runs without one."""
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ImportError("the math_verify reward needs the math-verify package: pip install math-verify") from err
    import threading

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = str(gold)
        parsed_gold = parse(gold if "$" in gold else f"${gold}$", parsing_timeout=timeout)
        wrapped = answer if whole_text or "$" in answer else f"${answer}$"  # LaTeX is read between $ signs
        parsed = parse(wrapped, parsing_timeout=timeout)
        return bool(parsed_gold and parsed and verify(parsed_gold, parsed, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - unparsable model output is simply not equal
        return False


REWARDS: dict[str, RewardFn] = {"math": math_reward, "seed": seed_reward, "math_shaped": math_shaped_reward,
                                "math_clean": math_clean_reward, "math_verify": math_verify_reward,
                                "correct": correct_reward, "format": format_reward, "lenient": lenient_reward,
                                "hash": hash_reward}


@dataclass(frozen=True)
class WeightedReward:
    name: str  # as written in --reward: a preset, module:function, or a scorer's name ('model', 'remote')
    fn: Callable
    weight: float
    batched: bool = False  # TRL's convention: fn(prompts=, completions=, completion_ids=, **columns) -> list


# What TRL passes to a batched reward besides the dataset's columns; a required parameter outside these and the
# columns cannot be filled.
TRL_REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                        "environments")


def is_batched(fn: Callable) -> bool:
    """TRL's batched convention (`f(completions, **kwargs) -> list`), told apart from grpo_ds's per-completion
    `f(completion, gold) -> float` by the signature: batched when the first parameter is named `completions` or
    `prompts`, or the function takes **kwargs.

    >>> is_batched(math_reward), is_batched(lambda completions, solution, **kwargs: [])
    (False, True)
    """
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the per-completion form
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return True
    return bool(parameters) and parameters[0].name in ("completions", "prompts")


def required_columns(term: WeightedReward) -> list[str]:
    """The keyword arguments a batched reward requires that only dataset columns can fill (e.g. TRL's
    accuracy_reward needs `solution`)."""
    if not term.batched:
        return []
    parameters = inspect.signature(term.fn).parameters.values()
    return [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in TRL_REWARD_ARGUMENTS
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def parse_reward(spec: str, scorers: dict[str, Callable] | None = None) -> list[WeightedReward]:
    """`--reward` as a weighted sum: comma-separated terms, each a preset, module:function, or the name of one of
    `scorers` (a reward model 'model', a remote scorer 'remote'), with an optional ":weight" (default 1.0). The
    advantages use the sum; each term is logged as reward/<name>.

    >>> [(r.name, r.weight) for r in parse_reward("correct:1.0,format:0.2")]
    [('correct', 1.0), ('format', 0.2)]
    >>> [(r.name, r.weight, r.batched) for r in parse_reward("math")]
    [('math', 1.0, False)]

    'none' is no term at all: an --environment's get_reward is then the only reward (the trainer checks there is
    one).
    """
    scorers = scorers or {}
    terms = []
    if str(spec).strip() == "none":
        return terms
    for item in str(spec).split(","):
        item = item.strip()
        name, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                name, weight = head, float(tail)
            except ValueError:
                pass  # module:function without a weight
        if not math.isfinite(weight):
            raise ValueError(f"--reward {spec!r}: the weight of {name!r} is not a finite number")
        if name in [t.name for t in terms]:
            raise ValueError(f"--reward {spec!r}: {name!r} appears twice")
        fn = scorers[name] if name in scorers else get_reward_fn(name)
        terms.append(WeightedReward(name, fn, weight, is_batched(fn)))
    return terms


def get_reward_fn(spec: str) -> RewardFn:
    """A preset name or "package.module:function"; a bad spec raises ValueError with one line naming --reward.
    The module is looked up on sys.path and then in the current directory, as `python -m` would.

    >>> get_reward_fn("math") is math_reward
    True
    >>> get_reward_fn("foo")
    Traceback (most recent call last):
    ...
    ValueError: --reward 'foo': not a preset (math, seed, math_shaped, math_clean, math_verify, correct, format, lenient, hash) and not module:function
    """
    if spec in REWARDS:
        return REWARDS[spec]
    module_name, _, fn_name = str(spec).partition(":")
    if not module_name or not fn_name or ":" in fn_name:
        raise ValueError(f"--reward {spec!r}: not a preset ({', '.join(REWARDS)}) and not module:function")
    return import_callable(spec, "--reward", noun="function")


def overlong_penalties(lengths: list[int], max_new_tokens: int, buffer: int, penalty: float) -> list[float]:
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13), one value per completion to add to its reward:
    0 up to max_new_tokens - buffer tokens, then falling linearly to -penalty at max_new_tokens. `lengths` count
    completion tokens, the EOS included; a truncated completion has length max_new_tokens.

    >>> overlong_penalties([10, 12, 14, 16], max_new_tokens=16, buffer=4, penalty=1.0)
    [0.0, 0.0, -0.5, -1.0]
    """
    if buffer <= 0:
        return [0.0] * len(lengths)
    free = max_new_tokens - buffer
    return [-penalty * min(length - free, buffer) / buffer if length > free else 0.0 for length in lengths]


def _safe_reward(reward_fn: RewardFn, completion: str, gold: str) -> tuple[float | None, str]:
    """(reward as a finite float, "") or (None, why it failed)."""
    try:
        value = reward_fn(completion, gold)
        if not isinstance(value, numbers.Real):  # bool counts: is_correct is a fine reward
            return None, f"returned {type(value).__name__}, not a number"
        value = float(value)
    except Exception as e:  # a buggy custom reward must not end a long run; it is counted instead
        return None, f"raised {type(e).__name__}: {e}"
    return (value, "") if math.isfinite(value) else (None, f"returned {value}")


class RewardAbort(Exception):
    """A reward source failed in a way that must stop the run (a remote scorer that stays unreachable), rather
    than score 0: raised through score_completions unchanged, so the trainer can checkpoint and stop."""


def _batched_rewards(term: WeightedReward, texts: list[str], problems: list, completion_ids: list | None,
                     extras: dict, messages: list | None = None) -> tuple[list[float | None], list[str]]:
    """One call of a TRL-convention reward for the whole batch: (values, None where the reward does not apply;
    failures). Completions are strings for string prompts and [{"role": "assistant", "content": text}] for chat
    prompts (an episode's whole conversation with tools: the model's turns and the tool results, as TRL passes
    it); every column of the rows is passed by name, as TRL does."""
    prompts = [p.prompt for p in problems]
    messages = messages or [None] * len(texts)
    completions = [(m or [{"role": "assistant", "content": t}]) if p.messages else t
                   for t, p, m in zip(texts, problems, messages)]
    keys = [k for k in problems[0].columns if k not in TRL_REWARD_ARGUMENTS] if problems else []
    columns = {k: [p.columns.get(k) for p in problems] for k in keys}
    try:
        values = term.fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                         **columns, **extras)
        values = list(values)
    except RewardAbort:
        raise
    except Exception as e:  # noqa: BLE001 - counted, as a per-completion failure is
        return [0.0] * len(texts), [f"{term.name} raised {type(e).__name__}: {e}"] * len(texts)
    if len(values) != len(texts):
        return [0.0] * len(texts), [f"{term.name} returned {len(values)} rewards for {len(texts)} completions"] * \
            len(texts)
    out, failures = [], []
    for value in values:
        if value is None:  # TRL: this reward does not apply to this completion
            out.append(None)
        elif isinstance(value, numbers.Real) and math.isfinite(float(value)):
            out.append(float(value))
        else:
            out.append(0.0)
            failures.append(f"{term.name} returned {value!r}")
    return out, failures


def score_completions(completions: list[str], problems: list, rewards: RewardFn | list[WeightedReward],
                      completion_ids: list | None = None, extras: dict | None = None,
                      messages: list | None = None) -> tuple[list[float], dict[str, float]]:
    """Rewards for each completion of `problems` (data.Problem, or bare gold strings), and stats: success_rate,
    format_rate, clean_rate, reward_errors and, for a weighted sum of terms (parse_reward), each term's sum and
    count over the completions it applies to as reward/<name>_sum and reward/<name>_count (unweighted).

    Per-completion terms are called as f(completion, gold); batched terms (TRL's convention) once for the whole
    batch, with `completion_ids` and `extras` (TRL's trainer_state, log_metric, environments, ...) passed on, and
    `messages` (each episode's conversation, with tools) as the completions of chat prompts. A reward that
    raises or is not a finite number scores 0.0 and is counted in reward_errors. A batched reward's None means
    "does not apply" and is aggregated as TRL does: the weighted sum skips it, and a completion to which no term
    applies gets NaN (unscorable: loss.group_advantages leaves it out of its group's baseline, advantage 0).

    >>> score_completions(["<answer>72</answer>", "72"], ["72", "72"], math_reward)
    ([1.1, 0.0], {'success_rate': 0.5, 'format_rate': 0.5, 'clean_rate': 0.5, 'reward_errors': 0})
    """
    if len(completions) != len(problems):
        raise ValueError(f"score_completions: {len(completions)} completions but {len(problems)} golds")
    problems = [_as_problem(p) for p in problems]
    golds = [p.answer for p in problems]
    terms = rewards if isinstance(rewards, list) else [WeightedReward("", rewards, 1.0, is_batched(rewards))]
    totals: list[float | None] = [None] * len(completions)
    failures, stats = [], {}
    for term in terms:
        if term.batched:
            values, failed = _batched_rewards(term, completions, problems, completion_ids, extras or {}, messages)
            failures += failed
        else:
            values = []
            for completion, gold in zip(completions, golds):
                value, why = _safe_reward(term.fn, completion, gold)
                if value is None:
                    failures.append(f"{term.name or 'reward'} {why}")
                values.append(0.0 if value is None else value)
        totals = [t if v is None else (t or 0.0) + term.weight * v for t, v in zip(totals, values)]
        if len(terms) > 1:
            applied = [v for v in values if v is not None]
            stats[f"reward/{term.name}_sum"], stats[f"reward/{term.name}_count"] = sum(applied), len(applied)
    if failures:  # one line per batch, not per completion, so a broken reward does not flood the log
        log.warning("reward function failed on %d/%d completions (scored 0.0); first: %s",
                    len(failures), len(completions) * len(terms), failures[0])
    unscorable = [i for i, t in enumerate(totals) if t is None]
    if unscorable:
        log.warning("every reward returned None for %d completion(s) (first: gold %r): they are left out of their "
                    "groups' baselines, with advantage 0", len(unscorable), golds[unscorable[0]])
    n = max(len(completions), 1)  # an empty batch has rates of 0, not a ZeroDivisionError
    stats = {
        "success_rate": sum(is_correct(c, g) for c, g in zip(completions, golds)) / n,
        "format_rate": sum(has_format(c, g) for c, g in zip(completions, golds)) / n,
        "clean_rate": sum(clean_answer(c, math=not is_number(g)) is not None for c, g in zip(completions, golds)) / n,
        "reward_errors": len(failures), **stats,
    }
    return [math.nan if t is None else t for t in totals], stats


def _as_problem(problem):
    """A bare gold string as a problem with no prompt or columns (for callers that have only golds)."""
    return Problem("", problem) if isinstance(problem, str) else problem
