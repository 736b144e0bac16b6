"""Tests for grpo_ds.rewards: answer extraction, numeric normalization, presets, loading and batch scoring."""

import ast
import doctest
import math
from pathlib import Path

import pytest

from grpo_ds import rewards
from grpo_ds.rewards import (REWARDS, extract_answer, get_reward_fn, has_format, is_correct, is_correct_lenient,
                             math_clean_reward, math_reward, math_shaped_reward, math_verify_reward, numbers_equal,
                             overlong_penalties, parse_reward, parse_number, score_completions,
                             seed_reward)

# (completion, gold, strict, lenient, has_format, seed_reward, math_reward), each worked out by hand.
COMPLETIONS = [
    ("<think>48/2=24, 48+24=72</think><answer>72</answer>", "72", True, True, True, 1.0, 1.1),
    ("<think>\nNatalia sold 72 clips.\n</think>\n<answer>\n72\n</answer>", "72", True, True, True, 1.0, 1.1),
    ("<answer> 72 </answer>", "72", True, True, True, 1.0, 1.1),
    ("<answer>$1,234.00</answer>", "1234", True, True, True, 0.01, 1.1),  # "1234" is not a substring
    ("<answer>6个</answer>", "6", True, True, True, 0.5, 1.1),
    ("<answer>6 apples</answer>", "6", True, True, True, 0.5, 1.1),
    ("<answer>-3</answer>", "-3", True, True, True, 1.0, 1.1),
    ("<answer>−3</answer>", "-3", True, True, True, 0.01, 1.1),  # unicode minus: seed's string match misses it
    ("<answer>2.5</answer>", "2.5", True, True, True, 1.0, 1.1),
    ("<answer>2.5</answer>", "5/2", True, True, True, 0.01, 1.1),
    ("<answer>\\boxed{72}</answer>", "72", True, True, True, 0.5, 1.1),
    ("<answer>\\frac{5}{2}</answer>", "2.5", True, True, True, 0.01, 1.1),
    ("The answer is 72", "72", False, True, False, 0.0, 0.0),
    ("<answer>72</answer><answer>73</answer>", "72", True, False, True, 1.0, 1.1),  # first block; last number 73
    ("<answer>73 or 72</answer>", "72", True, True, True, 0.5, 1.1),  # last number counts
    ("<answer>72 or 73 or 74</answer>", "72", False, False, True, 0.5, 0.1),  # the hedge seed pays 0.5 for
    ("<answer>73</answer>", "72", False, False, True, 0.01, 0.1),
    ("<answer>5-3</answer>", "-3", False, False, True, 0.5, 0.1),  # a range's last number is 3, not -3
    ("<answer>72", "72", False, True, False, 0.0, 0.0),  # unclosed tag
    ("<answer></answer>", "72", False, False, False, 0.01, 0.0),
    ("<answer>seventy-two</answer>", "72", False, False, False, 0.01, 0.0),
    ("<answer>The total is 1,000 dollars.</answer>", "1000", True, True, True, 0.01, 1.1),
]


@pytest.mark.parametrize("completion, gold, strict, lenient, fmt, seed, math_r", COMPLETIONS)
def test_completion_table(completion, gold, strict, lenient, fmt, seed, math_r):
    assert is_correct(completion, gold) is strict
    assert is_correct_lenient(completion, gold) is lenient
    assert has_format(completion) is fmt
    assert seed_reward(completion, gold) == pytest.approx(seed)
    assert math_reward(completion, gold) == pytest.approx(math_r)


def test_extract_answer_first_block_nested_and_missing():
    assert extract_answer("<answer>72</answer><answer>73</answer>") == "72"
    assert extract_answer("<answer><answer>1</answer></answer>") == "<answer>1"  # non-greedy: first close tag
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("no tags") is None
    assert extract_answer(None) is None


@pytest.mark.parametrize("text, expected", [
    ("72", 72.0), ("1,234", 1234.0), ("1,234,567", 1234567.0), ("1{,}234", 1234.0),
    ("1, 2", 2.0),  # comma plus space: a list of two numbers
    ("1,2345", 2345.0),  # decided: not a thousands grouping (4 digits after the comma), so two numbers: 1 and 2345
    ("5-3", 3.0), ("x-3", 3.0), ("-3", -3.0), ("−3", -3.0), ("x = -3", -3.0), ("-$3", -3.0), ("$-3", -3.0),
    ("2.50", 2.5), (".5", 0.5), ("-.5", -0.5), ("3.", 3.0), ("The answer is 72.", 72.0),
    ("3/4", 0.75), ("-3/4", -0.75), ("3 / 4", 4.0), ("2.5/5", 5.0), ("1/2/2020", 2020.0), ("1/0", None),
    ("\\boxed{72}", 72.0), ("$72$", 72.0), ("72€", 72.0), ("£1,000", 1000.0), ("₹500", 500.0), ("¥6", 6.0),
    ("5%", 5.0), ("12kg", 12.0), ("6个", 6.0), ("\\frac{3}{4}", 0.75), ("\\dfrac{5}{2}", 2.5),
    ("9" * 400, None),  # overflows a float: not a usable number
    ("", None), (None, None), ("no digits here", None), ("None", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_numbers_equal_tolerance():
    assert numbers_equal(0.1 + 0.2, 0.3)
    assert numbers_equal(1e9, 1e9 + 1)  # within 1e-6 relative
    assert not numbers_equal(72.0, 72.01)
    assert numbers_equal(0.0, 1e-10) and not numbers_equal(0.0, 1e-8)
    assert not numbers_equal(None, 1.0) and not numbers_equal(1.0, None)
    assert not numbers_equal(math.nan, math.nan)


def test_presets():
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn("seed") is seed_reward
    assert get_reward_fn("math_shaped") is math_shaped_reward
    assert get_reward_fn("math_clean") is math_clean_reward
    assert set(REWARDS) == {"math", "seed", "math_shaped", "math_clean", "math_verify", "correct", "format", "lenient",
                            "hash"}


@pytest.mark.parametrize("completion, expected", [
    ("<answer>72</answer>", 1.0 + 0.1 + 0.05 + 0.05 + 0.25),  # correct and formatted: every credit
    ("<answer>73</answer>", 0.1 + 0.05 + 0.05),  # formatted but wrong
    ("<answer>\nNow, think", 0.05),  # the opening tag only (what the untrained SmolLM2 writes)
    ("so the answer is 72</answer>", 0.05 + 0.25),  # the closing tag, and 72 is the last number
    ("<answer></answer>", 0.05 + 0.05),  # both tags, no number: below a right number without tags
    ("The answer is 72", 0.25),  # right number, no tags: the lenient credit
    ("The answer is 72, no 73", 0.0),  # the lenient check reads the last number
])
def test_math_shaped_reward(completion, expected):
    assert math_shaped_reward(completion, "72") == pytest.approx(expected)


RECITAL = (" The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
           "respectively, i.e., <think> reasoning process here </think>\n<answer> answer here </answer>")


@pytest.mark.parametrize("completion, expected", [
    # what the CPU recipe's model writes once trained: the reasoning closed, a clean block, right -> 0.2 + 1.0
    ("5 + 17 = 22</think>\n<answer>22</answer>", 1.2),
    ("5 + 17</think> <answer>5 + 17 = 22</answer>\n", 1.2),  # an equation ending in the answer, a trailing newline
    ("</think><answer> $1,022 </answer>", 0.2),  # clean (currency, thousands) but 1022 is not 22: format only
    ("5 + 17 = 21</think>\n<answer>21</answer>", 0.2),  # clean, wrong
    # the reasoning never closed (the drift that raised the KL): no format credit, only the right last number
    ("5 + 17 = 22\n<answer>22</answer>", 0.25),
    ("</think>\n</think>\n<answer>22</answer>", 0.25),  # two closings
    # docs/RECIPE_CPU.md, run 1: the sum in the block, then the system prompt recited, which closes it; not clean
    # (two blocks, text after): only the right last number pays, as it would without the recital
    ("</think><answer>17 + 5 = 22 stickers." + RECITAL, 0.25),
    ("</think><answer>17 + 5 = 22 stickers.", 0.25),
    # run 2: a proper block, then chatter with another number: not clean; the last number (27) is wrong
    ("</think><answer> 17 + 5 = 22 </answer>\nThe answer is 22 + 5 = 27.", 0.0),
    # the same chatter ending on the gold: the lenient credit only
    ("</think><answer>22</answer> So the answer is 22.", 0.25),
    ("</think><answer> answer here </answer>", 0.0),  # the recited placeholder: no number, no credit
    ("</think><answer></answer>", 0.0),  # empty block
    ("</think><answer>22 stickers</answer>", 0.25),  # a unit inside: not clean; 22 is the last number
    ("Sofia has 22 stickers now.", 0.25),  # right number, no block
    ("</think><answer>= 22</answer>", 0.25),  # an equation needs a left side
])
def test_math_clean_reward(completion, expected):
    assert math_clean_reward(completion, "22") == pytest.approx(expected)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A tiny user reward module on sys.path; its name is unique so no other test has imported it."""
    (tmp_path / "grpo_ds_test_user_reward.py").write_text(
        "def half(completion, gold):\n    return 0.5\n\nNOT_A_FUNCTION = 3\n")
    (tmp_path / "grpo_ds_test_broken_reward.py").write_text("def half(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "grpo_ds_test_user_reward"


def test_module_function_spec(reward_module):
    fn = get_reward_fn(f"{reward_module}:half")
    assert fn("<answer>1</answer>", "1") == 0.5


@pytest.mark.parametrize("spec, message", [
    ("foo", "--reward 'foo': not a preset (math, seed, math_shaped, math_clean, math_verify, correct, format, lenient, hash) and not module:function"),
    (":half", "--reward ':half': not a preset (math, seed, math_shaped, math_clean, math_verify, correct, format, lenient, hash) and not module:function"),
    ("mod:", "--reward 'mod:': not a preset (math, seed, math_shaped, math_clean, math_verify, correct, format, lenient, hash) and not module:function"),
    ("grpo_ds_no_such_module:fn",
     "--reward 'grpo_ds_no_such_module:fn': cannot import module 'grpo_ds_no_such_module' (ModuleNotFoundError: "),
    ("grpo_ds_test_broken_reward:half",
     "--reward 'grpo_ds_test_broken_reward:half': cannot import module 'grpo_ds_test_broken_reward' (SyntaxError: "),
    ("grpo_ds_test_user_reward:missing",
     "--reward 'grpo_ds_test_user_reward:missing': module 'grpo_ds_test_user_reward' has no function 'missing'"),
    ("grpo_ds_test_user_reward:NOT_A_FUNCTION",
     "--reward 'grpo_ds_test_user_reward:NOT_A_FUNCTION': grpo_ds_test_user_reward.NOT_A_FUNCTION is not callable"),
])
def test_bad_specs_give_one_line(reward_module, spec, message):
    with pytest.raises(ValueError) as info:
        get_reward_fn(spec)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_score_completions_stats():
    completions = ["<answer>72</answer>", "<answer>73</answer>", "72", "<answer>1,000</answer> ok"]
    golds = ["72", "72", "72", "1000"]
    scores, stats = score_completions(completions, golds, math_reward)
    assert scores == pytest.approx([1.1, 0.1, 0.0, 1.1])
    # strict right: 1st and 4th; a numeric block: 1st, 2nd, 4th; clean (nothing after the block): 1st and 2nd
    assert stats == {"success_rate": 0.5, "format_rate": 0.75, "clean_rate": 0.5, "reward_errors": 0}


@pytest.mark.parametrize("bad_value", [ValueError("boom"), math.nan, math.inf, "1.0", None, 10 ** 400])
def test_failing_reward_scores_zero_and_is_counted(bad_value):
    def reward(completion, gold):
        if completion != "bad":
            return 1.0
        if isinstance(bad_value, Exception):
            raise bad_value
        return bad_value

    scores, stats = score_completions(["ok", "bad", "ok"], ["1", "1", "1"], reward)
    assert scores == [1.0, 0.0, 1.0]
    assert stats["reward_errors"] == 1


def test_score_completions_accepts_bool_and_rejects_length_mismatch():
    scores, _ = score_completions(["<answer>1</answer>", "x"], ["1", "1"], is_correct)
    assert scores == [1.0, 0.0]
    assert score_completions([], [], math_reward) == ([], {"success_rate": 0.0, "format_rate": 0.0,
                                                           "clean_rate": 0.0, "reward_errors": 0})
    with pytest.raises(ValueError):
        score_completions(["a", "b"], ["1"], math_reward)


ODD_OUTPUTS = [
    "", "None", "9" * 400, f"<answer>{'9' * 400}</answer>", f"<answer>{'9' * 5000}/1</answer>",
    "<answer><answer>1</answer></answer>", "</answer>72<answer>", "<answer>" * 20000,  # quadratic with re.search
    "<answer>1/0</answer>",
    "<answer>🙂−∞ NaN inf</answer>", "<answer>١٢</answer>", "\x00\ud800<answer>\u202e72</answer>",
    "<answer>1e400</answer>", "<answer>--- ... /// ,,, </answer>", "1" * 10000 + "/" + "2" * 10000,
]


@pytest.mark.parametrize("completion", ODD_OUTPUTS)
@pytest.mark.parametrize("gold", ["72", "", "abc", "9" * 400])
def test_rewards_never_raise_on_odd_output(completion, gold):
    for fn in REWARDS.values():
        value = fn(completion, gold)
        assert isinstance(value, float) and math.isfinite(value), fn.__name__
    checks = (is_correct(completion, gold), is_correct_lenient(completion, gold), has_format(completion))
    assert all(isinstance(check, bool) for check in checks)
    _, stats = score_completions([completion], [gold], math_reward)
    assert stats["reward_errors"] == 0


def test_doctests_pass():
    assert doctest.testmod(rewards).failed == 0


def test_module_imports_no_torch_or_deepspeed():
    tree = ast.parse(Path(rewards.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported, "the walk found no imports at all; the check would be vacuous"
    assert not {name for name in imported if name.split(".")[0] in ("torch", "deepspeed")}


def test_hash_reward_is_deterministic_spread_and_ignores_gold():
    from grpo_ds.rewards import hash_reward
    texts = [f"completion {i}" for i in range(200)]
    scores = [hash_reward(t, "0") for t in texts]
    assert scores == [hash_reward(t, "999") for t in texts]  # the gold plays no part
    assert all(0 <= s < 1 for s in scores) and len(set(scores)) == 200
    assert 0.35 < sum(scores) / 200 < 0.65  # roughly uniform, so groups have a spread of advantages


# ----------------------------------------------------------------------------- weighted sums, overlong, math-verify


def test_weighted_reward_terms_are_summed_and_reported_apart():
    terms = parse_reward("correct:1.0,format:0.2")
    assert [(t.name, t.weight) for t in terms] == [("correct", 1.0), ("format", 0.2)]
    texts = ["<answer>72</answer>", "<answer>7</answer>", "72", "<answer>72</answer> yes"]
    rewards, stats = score_completions(texts, ["72"] * 4, terms)
    # correct: 1, 0, 0, 1; format (clean block): 1, 1, 0, 0 -> 1.2, 0.2, 0, 1.0
    assert rewards == pytest.approx([1.2, 0.2, 0.0, 1.0])
    assert stats["reward/correct_sum"] == 2 and stats["reward/format_sum"] == 2  # unweighted sums
    assert stats["reward/correct_count"] == stats["reward/format_count"] == 4


def test_reward_specs_with_modules_and_weights(reward_module):
    terms = parse_reward("grpo_ds_test_user_reward:half:2,math")
    assert [(t.name, t.weight) for t in terms] == [("grpo_ds_test_user_reward:half", 2.0), ("math", 1.0)]
    assert score_completions(["<answer>1</answer>"], ["1"], terms)[0] == pytest.approx([2 * 0.5 + 1.1])
    with pytest.raises(ValueError, match="appears twice"):
        parse_reward("math,math:0.5")
    with pytest.raises(ValueError, match="not a finite number"):
        parse_reward("math:nan")
    with pytest.raises(ValueError, match="--reward 'nope': not a preset"):
        parse_reward("math:1.0,nope")


def test_overlong_penalty_hand_values():
    # max 16 tokens, buffer 4: free up to 12; 13 -> -0.25 x 2, 16 (truncated) -> the whole 2
    assert overlong_penalties([12, 13, 15, 16], 16, 4, 2.0) == pytest.approx([0.0, -0.5, -1.5, -2.0])
    assert overlong_penalties([16], 16, 0, 2.0) == [0.0]  # buffer 0: off


@pytest.mark.parametrize("completion, gold, expected", [
    ("<answer>\\frac{1}{2}</answer>", "0.5", 1.1),  # LaTeX fraction vs decimal
    ("<answer>2/4</answer>", "1/2", 1.1),  # unreduced fraction
    ("<answer>x = 3</answer>", "3", 1.1),  # an equation's value
    ("<answer>\\sqrt{4}</answer>", "2", 1.1),  # an expression the numeric extractor cannot read
    ("<answer>3</answer>", "4", 0.1),  # a block, wrong
    ("the answer is 4", "4", 0.0),  # no block
])
def test_math_verify_reward(completion, gold, expected):
    pytest.importorskip("math_verify", reason="the [math] extra (math-verify) is not installed; .ci/run installs it")
    assert math_verify_reward(completion, gold) == pytest.approx(expected)
    # the numeric extractor of `math` reads the square root as 4: a formatted, wrong answer
    if "sqrt" in completion:
        assert math_reward(completion, gold) == pytest.approx(0.1)
