"""Your data, your rewards: golds of any form, chat-format datasets with their columns, TRL's reward functions
unchanged (TRL's own functions are the oracle), None rewards aggregated as TRL does, and a chat-format MATH-style
file trained on 2 CPU ranks (ZeRO-2 and ZeRO-3) and evaluated with no row lost."""

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from grpo_ds.data import Problem, load_problems, read_gold, render_problem
from grpo_ds.loss import group_advantages, uniform_groups
from grpo_ds.rewards import (format_reward, is_correct, is_correct_lenient, math_clean_reward, math_reward,
                             parse_reward, score_completions)
from helpers import ROOT, build_tokenizer, load_script, records, run, zero_config

MATH_FILE = ROOT / "tests" / "data" / "math_chat.jsonl"
ROWS = [json.loads(line) for line in MATH_FILE.read_text().splitlines()]

# ----------------------------------------------------------------------------------------------- golds


@pytest.mark.parametrize("value, gold", [
    (72, "72"), (2.5, "2.5"), ("$1,000", "1000"), ("Natalia sold 72 clips.\n#### 72", "72"),
    ("#### 1/2", "1/2"), ("#### -3", "-3"),
    ("$\\frac{1}{2}$", "\\frac{1}{2}"), ("3\\sqrt{2}", "3\\sqrt{2}"), ("(1, 2)", "(1, 2)"), ("[0, 1)", "[0, 1)"),
    ("B", "B"), ("x^2 + 1", "x^2 + 1"), (["\\frac{1}{3}"], "\\frac{1}{3}"),
    ("We add: 2x = 2, so $\\boxed{(1, 2)}$.", "(1, 2)"),  # MATH: the last \boxed{} of a worked solution
    ("First \\boxed{1}, then corrected: \\boxed{\\frac{\\pi}{4}}", "\\frac{\\pi}{4}"),  # nested braces, the last
    ("So the answer is \\boxed{12}.", "12"),
    # unreadable: a worked solution with no marker, placeholders, empty, not text
    ("It is 12 minus 5, which leaves 7.", None), ("#### n/a", None), ("N/A", None), ("", None), (None, None),
    (True, None), ({"x": 1}, None), ("\\boxed{unclosed", None), ("line one\nline two", None),
    ("many", None), ("#### several", None), ("(C)", "(C)"), ("\\text{yes}", "\\text{yes}"),
])
def test_read_gold_reads_every_form(value, gold):
    assert read_gold(value) == gold


# ----------------------------------------------------------------------------------------------- datasets


def test_chat_format_math_file_loads_every_row_with_its_columns():
    problems = load_problems(str(MATH_FILE))
    assert len(problems) == len(ROWS) == 8  # no row lost
    assert [p.answer for p in problems] == ["\\frac{1}{2}", "3\\sqrt{2}", "(1, 2)", "[0, 1)", "B", "72",
                                            "\\frac{\\pi}{4}", "x^2 + 1"]
    first = problems[0]
    assert first.prompt == ROWS[0]["prompt"]  # the chat messages as written, as TRL passes them to rewards
    assert first.question == "What is 3/6 in lowest terms?"  # the last user turn, for logs
    # every column but TRL's reserved ones travels with the row
    assert first.columns == {"solution": ROWS[0]["solution"], "level": "Level 1", "type": "Prealgebra"}


def test_columns_are_found_by_name_or_given(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "q?", "answer": "x\n#### 7"}) + "\n")
    math_style = tmp_path / "math.jsonl"
    math_style.write_text(json.dumps({"problem": "p?", "solution": "so \\boxed{\\frac{1}{2}}", "id": 3}) + "\n")
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"text": "t?", "final": "9", "answer": "not this one"}) + "\n")
    assert load_problems(str(gsm)) == [Problem("q?", "7")]
    assert load_problems(str(math_style)) == [Problem("p?", "\\frac{1}{2}")]
    assert load_problems(str(custom), prompt_column="text", answer_column="final") == [Problem("t?", "9")]
    with pytest.raises(ValueError) as info:
        load_problems(str(custom), prompt_column="prompt_text")
    assert str(info.value) == f"{custom}:1: no column 'prompt_text' (--prompt_column); the row has text, final, answer"
    with pytest.raises(ValueError) as info:
        load_problems("arithmetic", answer_column="x")
    assert str(info.value).startswith("--answer_column: the built-in arithmetic problems have no columns")


def test_bad_chat_messages_are_one_line_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user"}], "answer": "1"}) + "\n")
    with pytest.raises(ValueError) as info:
        load_problems(str(path))
    assert str(info.value) == f"{path}:1: column 'prompt' message 0 is not a {{'role': str, 'content': str}} turn"


def test_render_problem_renders_chat_prompts_as_written():
    tokenizer = build_tokenizer()  # ChatML
    problem = load_problems(str(MATH_FILE))[0]
    # hand-written ChatML: the row's own system turn, no grpo_ds system prompt or worked example
    expected = ("<|im_start|>system\nThink inside <think> </think>, then give the final answer in \\boxed{}."
                "<|im_end|>\n<|im_start|>user\nWhat is 3/6 in lowest terms?<|im_end|>\n<|im_start|>assistant\n")
    assert render_problem(tokenizer, problem, "Ignored.", "", ("1+1?", "2")) == expected
    assert render_problem(tokenizer, problem, "Ignored.", "<think>") == expected + "<think>"
    prefill = Problem("q", "1", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "So"}))
    assert render_problem(tokenizer, prefill).endswith("<|im_start|>assistant\nSo")  # continued, not closed
    # a question string keeps grpo_ds's turns
    plain = render_problem(tokenizer, Problem("2+3?", "5"), "Be brief.")
    assert plain == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n" \
                    "<|im_start|>assistant\n"


def test_unreadable_golds_are_counted_once_and_named(tmp_path, caplog):
    path = tmp_path / "some_bad.jsonl"
    rows = [ROWS[0], {"prompt": "q1", "solution": "No marker in this worked solution at all."}, ROWS[5],
            {"prompt": "q2", "solution": "n/a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="grpo_ds.data"):
        assert len(load_problems(str(path))) == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "grpo_ds.data"]
    assert warnings == [f"{path}: skipped 2 of 4 rows whose gold answer cannot be read (first {path}:2: 'No marker "
                        f"in this worked solution at all.'); --bad_answers error stops instead"]


def test_a_dataset_with_no_readable_gold_is_refused_before_any_model(refuse, tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text(json.dumps({"prompt": "q", "solution": "A worked solution, no final answer."}) + "\n")
    refuse(f"{path}: no usable rows (1 without a readable gold answer; first {path}:1: 'A worked solution, no "
           f"final answer.')", dataset=str(path))


def test_a_trl_reward_needing_a_missing_column_is_refused_before_any_model(refuse, tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "#### 7"}) + "\n")
    refuse("--reward trl.rewards:accuracy_reward: needs the dataset column 'solution', which --dataset "
           f"{path} does not have (its columns: answer, question)", dataset=str(path),
           reward="trl.rewards:accuracy_reward")


# ----------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("completion, gold, correct, lenient, math_r, clean, fmt", [
    # non-numeric golds go to math-verify in every preset
    ("</think><answer>\\frac{2}{4}</answer>", "\\frac{1}{2}", True, True, 1.1, 1.2, 1.0),
    ("</think><answer>0.5</answer>", "\\frac{1}{2}", True, True, 1.1, 1.2, 1.0),
    ("</think><answer>(2, 1)</answer>", "(1, 2)", False, False, 0.1, 0.2, 1.0),  # a tuple is ordered
    ("</think><answer>[0, 1)</answer>", "[0, 1)", True, True, 1.1, 1.2, 1.0),
    ("</think><answer>[0, 1]</answer>", "[0, 1)", False, False, 0.1, 0.2, 1.0),  # an interval's ends matter
    ("</think><answer>B</answer>", "B", True, True, 1.1, 1.2, 1.0),
    ("</think><answer>(C)</answer>", "B", False, False, 0.1, 0.2, 1.0),
    ("so \\boxed{3\\sqrt{2}}", "3\\sqrt{2}", False, True, 0.0, 0.25, 0.0),  # no block: only the lenient check
    ("</think><answer>2.5</answer>", "5/2", True, True, 1.1, 1.2, 1.0),
    ("so it is 2.5", "\\frac{5}{2}", False, True, 0.0, 0.25, 0.0),  # a fraction gold's value, read leniently
    # numeric golds keep the number extractor
    ("</think><answer>72</answer>", "72", True, True, 1.1, 1.2, 1.0),
    ("</think><answer>72 stickers</answer>", "72", True, True, 1.1, 0.25, 0.0),
])
def test_presets_on_golds_of_every_form(completion, gold, correct, lenient, math_r, clean, fmt):
    assert is_correct(completion, gold) is correct
    assert is_correct_lenient(completion, gold) is lenient
    assert math_reward(completion, gold) == pytest.approx(math_r)
    assert math_clean_reward(completion, gold) == pytest.approx(clean)
    assert format_reward(completion, gold) == fmt


# Completions for the 8 rows of MATH_FILE, chosen so TRL's accuracy_reward returns 1, 0 and None (a gold it cannot
# parse: "B") and think_format_reward both 1 and 0.
COMPLETIONS = ["<think>halve</think> \\boxed{\\frac{2}{4}}", "<think>9*2</think> \\boxed{3\\sqrt{2}}",
               "\\boxed{(2, 1)}", "<think>a</think>\\boxed{[0,1)}", "<think>7 is prime</think> \\boxed{B}",
               "<think></think>72", "\\boxed{\\pi/4}", "x^2+1"]


def test_trl_reward_functions_score_exactly_as_trl():
    from trl.rewards import accuracy_reward, think_format_reward

    problems = load_problems(str(MATH_FILE))
    terms = parse_reward("trl.rewards:accuracy_reward,trl.rewards:think_format_reward:0.2")
    assert [(t.name, t.weight, t.batched) for t in terms] == [("trl.rewards:accuracy_reward", 1.0, True),
                                                             ("trl.rewards:think_format_reward", 0.2, True)]
    totals, stats = score_completions(COMPLETIONS, problems, terms)
    # the oracle: TRL's own functions on the inputs TRL builds (a chat prompt's completion is one assistant
    # message; the `solution` column as written), aggregated as GRPOTrainer does (weighted nansum)
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    accuracy = accuracy_reward(completions, solution=[r["solution"] for r in ROWS])
    think = think_format_reward(completions)
    assert accuracy == [1.0, 1.0, 0.0, 1.0, None, 0.0, 1.0, 0.0]  # pinned, so a TRL change is noticed
    assert think == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    expected = [(a or 0.0) + 0.2 * t for a, t in zip(accuracy, think)]  # no row has every term None
    assert totals == pytest.approx(expected)
    applied = [a for a in accuracy if a is not None]  # TRL logs each reward's mean over the rows it applies to
    assert stats["reward/trl.rewards:accuracy_reward_sum"] == sum(applied) == 4.0
    assert stats["reward/trl.rewards:accuracy_reward_count"] == 7
    assert stats["reward/trl.rewards:think_format_reward_count"] == 8


def test_none_rewards_are_aggregated_as_trl_does(tmp_path, monkeypatch):
    module = tmp_path / "none_rewards.py"
    module.write_text(
        "def first(completions, **kwargs):\n    return [1.0, None, None, 0.0]\n"
        "def second(prompts, completions, level, **kwargs):\n"
        "    assert level == ['L1', 'L2', 'L3', 'L4']\n    return [None, 0.5, None, 2.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    problems = [Problem(f"q{i}", "1", columns={"level": f"L{i + 1}"}) for i in range(4)]
    totals, stats = score_completions(["a", "b", "c", "d"], problems, parse_reward("none_rewards:first,"
                                                                                   "none_rewards:second:2"))
    # row 0: 1.0; row 1: 2 x 0.5; row 2: every term None -> unscorable (NaN); row 3: 0 + 2 x 2.0
    assert totals[:2] == [1.0, 1.0] and math.isnan(totals[2]) and totals[3] == 4.0
    assert (stats["reward/none_rewards:first_sum"], stats["reward/none_rewards:first_count"]) == (1.0, 2)
    assert (stats["reward/none_rewards:second_sum"], stats["reward/none_rewards:second_count"]) == (2.5, 2)


def test_unscorable_completions_leave_the_baseline_with_zero_advantage():
    # group [1, NaN, 0, 2]: mean over the three scorable = 1, std (Bessel) = sqrt((0 + 1 + 1) / 2) = 1
    advantages = group_advantages(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]))
    assert advantages[0].tolist() == pytest.approx([0.0, 0.0, -1 / (1 + 1e-4), 1 / (1 + 1e-4)], abs=1e-6)
    # a group whose scorable rewards tie, or with one scorable completion, carries no signal
    tied = torch.tensor([[1.0, float("nan"), 1.0], [float("nan"), 3.0, float("nan")], [0.0, 1.0, float("nan")]])
    assert uniform_groups(tied).tolist() == [True, True, False]
    assert group_advantages(tied)[:2].abs().sum() == 0
    # without NaN nothing changes: [1, 0, 0, 1] has mean 0.5 and std 0.5774
    assert group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))[0].tolist() == pytest.approx(
        [0.8659, -0.8659, -0.8659, 0.8659], abs=1e-4)


def test_batched_rewards_get_prompts_ids_and_trainer_state(tmp_path, monkeypatch):
    module = tmp_path / "seen_rewards.py"
    module.write_text("SEEN = {}\ndef spy(completions, prompts, completion_ids, trainer_state, **kwargs):\n"
                      "    SEEN.update(prompts=prompts, completions=completions, ids=completion_ids,\n"
                      "                step=trainer_state.global_step, columns=sorted(kwargs))\n"
                      "    return [float(len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import seen_rewards
    from transformers import TrainerState

    problems = [Problem("q", "1", columns={"answer": "1", "question": "q"})]
    totals, _ = score_completions(["abc"], problems, parse_reward("seen_rewards:spy"), [[5, 6, 2]],
                                  {"trainer_state": TrainerState(global_step=3)})
    assert totals == [3.0]  # a string prompt's completion is the text itself
    assert seen_rewards.SEEN == {"prompts": ["q"], "completions": ["abc"], "ids": [[5, 6, 2]], "step": 3,
                                 "columns": ["answer", "question"]}


# ----------------------------------------------------------------------------------------------- end to end

TERMS = "trl.rewards:accuracy_reward,trl.rewards:think_format_reward:0.2,learnable:sevens_dense:0.5"


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_chat_math_file_trains_on_two_ranks_with_trl_rewards(tmp_path, tiny_model, ds_config):
    """The chat-format MATH-style file trains on 2 CPU ranks with TRL's rewards beside a rule reward; every logged
    completion's reward is what TRL's functions (and the rule) give it; the run then evaluates every row."""
    from trl.rewards import accuracy_reward, think_format_reward

    sys.path.insert(0, str(ROOT / "tests"))
    from learnable import sevens_dense

    out = tmp_path / "run"
    run(["--ds_config", zero_config(tmp_path, ds_config), "--model", str(tiny_model), "--output_dir", str(out),
         "--dataset", str(MATH_FILE), "--reward", TERMS, "--max_steps", "2", "--rollouts_per_step", "4",
         "--group_size", "4", "--train_batch_size", "4", "--max_new_tokens", "8", "--lr", "1e-2",
         "--kl_weight", "0.05", "--log_completions_steps", "1", "--save_steps", "0"], tmp_path)
    rank0, rank1 = records(out)
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]  # ranks in lockstep
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and not any(m["update_skipped"] for m in metrics)  # the rule term gives a signal
    for m in metrics:
        assert {"reward/trl.rewards:accuracy_reward", "reward/trl.rewards:think_format_reward",
                "reward/learnable:sevens_dense"} <= set(m)
    solutions = {r["prompt"][-1]["content"]: r["solution"] for r in ROWS}
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert logged
    for row in logged:
        message = [[{"role": "assistant", "content": row["completion"]}]]
        accuracy = accuracy_reward(message, solution=[solutions[row["question"]]])[0]
        expected = (accuracy or 0.0) + 0.2 * think_format_reward(message)[0] + 0.5 * sevens_dense(
            row["completion"], row["gold"])
        assert row["reward"] == pytest.approx(expected, abs=1e-6)
    if ds_config == "zero2.json":  # evaluation reads the same file with the same columns: no row lost
        summary = json.loads(_evaluate(out, tmp_path).read_text())
        assert summary["n"] == len(ROWS) and summary["scorer"] == "auto"


def _evaluate(run_dir: Path, tmp_path: Path) -> Path:
    eval_script = load_script("eval")
    output = tmp_path / "eval"
    assert eval_script.main([str(run_dir / "final"), "--data", str(MATH_FILE), "--max_new_tokens", "4",
                             "--output_dir", str(output)]) == 0
    return output / "summary.json"
