"""Evaluation (grpo_ds.eval, scripts/eval.py) and quick inference (grpo_ds.inference, scripts/ask.py): scoring real
completions with the rewards' own extractors, the gold-solutions check, pass@k and maj@k, the command end to end on
a tiny model, 2 ranks reproducing 1 process, a training run asked the way it was trained, and the ask command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_ds import eval as ev
from grpo_ds.config import Config
from grpo_ds.data import Problem, render_prompt
from grpo_ds.generation import Sampling, generate
from grpo_ds.inference import load, side_by_side
from grpo_ds.rewards import extract_last_number, math_reward
from helpers import ROOT, load_script

eval_script, ask_script = load_script("eval"), load_script("ask")


def greedy_alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy completion of one prompt generated on its own (no batch, no padding)."""
    return generate(model, tokenizer, [prompt], Sampling(max_new_tokens, temperature=0.0)).texts(tokenizer)[0]

# Completions as models write them on GSM8K: (completion, gold, strict, lenient, format), each judged by hand.
REAL_COMPLETIONS = [
    # trained format, right
    ("<think>\nJanet's ducks lay 16 eggs. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 are left. She sells them "
     "at $2 each: 9 * 2 = 18.\n</think>\n<answer>$18</answer>", "18", True, True, True),
    # an untrained chat model: right, but no tags, so only the lenient score counts it
    ("To find out how much Janet makes, we subtract the eggs she uses: 16 - 3 - 4 = 9. Then 9 x $2 = $18. "
     "So Janet makes $18 every day.", "18", False, True, False),
    # right in the tags, then chatter with another number: strict right, lenient wrong
    ("<think>2 bolts of blue, half as much white is 1, total 3.</think>\n<answer>3</answer>\nI hope this helps "
     "with step 2!", "3", True, False, True),
    # thousands separator and a unit inside the tags
    ("<think>80,000 + 50,000 = 130,000 spent; 200,000 - 130,000 = 70,000 profit</think>\n<answer>70,000 "
     "dollars</answer>", "70000", True, True, True),
    # well formed but wrong
    ("<think>3 sprints * 60 meters = 180</think>\n<answer>180 meters</answer>", "540", False, False, True),
    # cut off by max_new_tokens mid-thought: the lenient score still finds a number
    ("<think>First the cost of the tickets: 3 * 12 = 36. Then", "36", False, True, False),
    # LaTeX boxed, no tags
    ("The total is $4 \\times 5 = \\boxed{20}$.", "20", False, True, False),
    # a decimal answer written with trailing zeros
    ("<think>15 / 2 = 7.5</think><answer>7.50</answer>", "7.5", True, True, True),
    # two answers: the first counts (as in the reward), the last number is the second
    ("<think>12?</think><answer>12</answer> wait, 2 more: <answer>14</answer>", "14", False, True, True),
]


def test_score_texts_on_real_completions_agrees_with_the_reward():
    texts = [c for c, *_ in REAL_COMPLETIONS]
    problems = [Problem(f"q{i}", gold) for i, (_, gold, *_) in enumerate(REAL_COMPLETIONS)]
    rows = ev.score_texts(texts, problems)
    for row, (text, gold, strict, lenient, formatted) in zip(rows, REAL_COMPLETIONS):
        assert (row["correct"], row["correct_lenient"], row["format"]) == (strict, lenient, formatted), text
        # the eval's strict score is exactly what the training reward pays 1.0 for
        assert row["correct"] == (math_reward(text, gold) >= 1.0)
    summary = ev.summarize(rows)
    n = len(REAL_COMPLETIONS)
    assert summary["n"] == n and summary["num_samples"] == 1
    assert summary["accuracy_strict"] == pytest.approx(sum(r[2] for r in REAL_COMPLETIONS) / n)
    assert summary["accuracy_lenient"] == pytest.approx(sum(r[3] for r in REAL_COMPLETIONS) / n)
    assert summary["format_rate"] == pytest.approx(sum(r[4] for r in REAL_COMPLETIONS) / n)
    assert rows[3]["extracted"] == "70,000 dollars" and rows[3]["predicted"] == 70000.0
    assert rows[1]["extracted"] is None and rows[1]["lenient"] == 18.0


def test_pass_at_k_and_majority_vote():
    samples = {  # gold: three samples each
        "5": ["<answer>5</answer>", "<answer>3</answer>", "<answer>3</answer>"],  # pass; majority 3 is wrong
        "7": ["<answer>7</answer>", "no idea", "<answer>7.0</answer>"],  # pass; majority 7 (7 == 7.0) is right
        "2": ["<answer>1</answer>", "<answer>4</answer>", "so it is 2"],  # strict fails; tie 1/4 goes to 1: wrong
    }
    texts = [t for group in samples.values() for t in group]
    problems = [Problem("q", gold) for gold, group in samples.items() for _ in group]
    summary = ev.summarize(ev.score_texts(texts, problems), num_samples=3)
    assert summary["n"] == 3
    assert summary["accuracy_strict"] == pytest.approx(3 / 9)
    assert summary["pass_at_k"] == pytest.approx(2 / 3)
    assert summary["pass_at_k_lenient"] == pytest.approx(3 / 3)
    assert summary["maj_at_k"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not a positive multiple of --num_samples 2"):
        ev.summarize(ev.score_texts(texts, problems), num_samples=2)


GOLD_SOLUTIONS = [  # written in GSM8K's style: calculator annotations, currency, thousands, decimals
    ("Janet's ducks lay 16 eggs per day...", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes "
     "9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"),
    ("A robe takes 2 bolts of blue fiber...", "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount "
     "of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3"),
    ("Josh decides to try flipping a house...", "The cost of the house and repairs came out to 80,000+50,000="
     "$<<80000+50000=130000>>130,000\nHe increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000"
     "\nSo the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of "
     "200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70,000"),
    ("Tickets cost $2.50 each...", "3 tickets cost 3 * 2.50 = $<<3*2.5=7.5>>7.50 in total.\n#### 7.5"),
    ("The temperature was 5 degrees and fell 8...", "5 - 8 = <<5-8=-3>>-3\n#### -3"),
    ("A row with no final answer", "It is 12 minus 5, which leaves 7."),  # skipped, as load_problems skips it
]


def test_gold_solutions_score_full_lenient(tmp_path, capsys):
    data = tmp_path / "gold.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GOLD_SOLUTIONS))
    out = tmp_path / "out"
    assert eval_script.main(["--score_gold", "--data", str(data), "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == len(GOLD_SOLUTIONS) - 1
    assert summary["accuracy_lenient"] == 1.0
    assert summary["accuracy_strict"] == 0.0  # reference solutions have no <answer> tags
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["18", "3", "70000", "7.5", "-3"]
    assert "accuracy, lenient last number" in capsys.readouterr().out


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory) -> Path:
    from helpers import build_varied_model

    return build_varied_model(tmp_path_factory.mktemp("varied") / "model")


QUESTIONS = ["what is 2+2?", "tom has 3 apples and buys 4 more. how many?", "how many eggs are left?",
             "a train goes 60 km in 2 hours. speed?", "is 7 prime?", "12 times 12?", "half of 9?"]


def numeric_gold(value) -> str:
    return str(int(value)) if value == int(value) else str(value)


@pytest.fixture(scope="module")
def dataset_with_known_answers(varied_model, tmp_path_factory) -> tuple[Path, list[str], list[bool]]:
    """A problem file whose golds make the expected score known: each completion is generated alone (no batch,
    no padding); even problems get the last number of their completion as gold, odd ones a number it lacks."""
    model, tokenizer = load(str(varied_model))
    alone = [greedy_alone(model, tokenizer, render_prompt(tokenizer, q), 24) for q in QUESTIONS]
    golds, expected = [], []
    for i, text in enumerate(alone):
        last = extract_last_number(text)
        right = i % 2 == 0 and last is not None
        golds.append(numeric_gold(last) if right else "987654")
        expected.append(right)
    assert sum(expected[:6]) >= 1, "the varied model should write numbers; the test would be vacuous"
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": g}) + "\n" for q, g in zip(QUESTIONS, golds)))
    return path, alone, expected


def read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_eval_end_to_end_files_and_numbers(varied_model, dataset_with_known_answers, tmp_path, capsys):
    data, alone, expected = dataset_with_known_answers
    out = tmp_path / "eval"
    argv = [str(varied_model), "--data", str(data), "--limit", "6", "--max_new_tokens", "24", "--batch_size", "4",
            "--output_dir", str(out)]
    assert eval_script.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = read_predictions(out)
    assert summary["n"] == 6 == len(rows)
    assert [r["question"] for r in rows] == QUESTIONS[:6]  # in the file's order despite length-sorted batches
    # batched, length-sorted, left-padded generation gives each problem the completion it gets alone
    assert [r["completion"] for r in rows] == alone[:6]
    assert [r["correct_lenient"] for r in rows] == expected[:6]
    for key, field in (("accuracy_strict", "correct"), ("accuracy_lenient", "correct_lenient"),
                       ("format_rate", "format"), ("mean_completion_tokens", "num_tokens"),
                       ("truncated_rate", "truncated")):
        assert summary[key] == pytest.approx(sum(r[field] for r in rows) / len(rows)), key
    assert summary["accuracy_lenient"] == pytest.approx(sum(expected[:6]) / 6)
    assert summary["completion_tokens"] == sum(r["num_tokens"] for r in rows)
    assert summary["tokens_per_s"] == pytest.approx(summary["completion_tokens"] / summary["seconds"], rel=1e-2)
    assert all(1 <= r["num_tokens"] <= 24 for r in rows)
    assert all(r["truncated"] == (r["num_tokens"] == 24) for r in rows if r["truncated"])
    assert summary["temperature"] == 0.0 and summary["world_size"] == 1
    printed = capsys.readouterr().out
    assert "accuracy, strict <answer>" in printed and "tokens/s" in printed


def test_response_prefix_starts_every_answer(varied_model, dataset_with_known_answers, tmp_path):
    """--response_prefix is part of the prompt: each completion is what the model writes after the prefix."""
    data, _, _ = dataset_with_known_answers
    out = tmp_path / "eval"
    assert eval_script.main([str(varied_model), "--data", str(data), "--limit", "2", "--max_new_tokens", "8",
                             "--response_prefix", "<think>\n", "--output_dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["response_prefix"] == "<think>\n"
    model, tokenizer = load(str(varied_model))
    prompts = [render_prompt(tokenizer, q) + "<think>\n" for q in QUESTIONS[:2]]
    expected = [greedy_alone(model, tokenizer, p, 8) for p in prompts]
    assert [r["completion"] for r in read_predictions(out)] == expected


def fake_run(varied_model, tmp_path, **settings) -> Path:
    """A training run's output folder: final/ (the varied model) and the run's config.json."""
    import shutil

    from grpo_ds.config import Config

    run = tmp_path / "run"
    shutil.copytree(varied_model, run / "final")
    values = {**Config().to_dict(), "dataset": "arithmetic", "difficulty": 1, "max_new_tokens": 6, **settings}
    (run / "config.json").write_text(json.dumps(values))
    return run


def test_a_run_with_a_worked_example_is_asked_with_it(varied_model, tmp_path):
    """The run's worked example goes before every held-out question, for the run and for a base model --like it."""
    example = ("Tom has 2 apples. He buys 3 more. How many apples does Tom have now?", "<think>2 + 3 = 5</think>")
    run = fake_run(varied_model, tmp_path, system_prompt="Be brief.", response_prefix="<think>",
                   example_question=example[0], example_answer=example[1])
    from grpo_ds.data import load_problems

    problems = load_problems("arithmetic", "test", num_problems=2, difficulty=1)
    model, tokenizer = load(str(varied_model))
    expected = [greedy_alone(model, tokenizer, render_prompt(tokenizer, p.question, "Be brief.", "<think>", example), 6)
                for p in problems]
    without = [greedy_alone(model, tokenizer, render_prompt(tokenizer, p.question, "Be brief.", "<think>"), 6)
               for p in problems]
    assert expected != without  # the example changes what this model writes, so the check below can fail
    for model_arg, out in ([str(run)], tmp_path / "run"), ([str(varied_model), "--like", str(run)], tmp_path / "like"):
        assert eval_script.main(model_arg + ["--limit", "2", "--output_dir", str(out)]) == 0
        assert [r["completion"] for r in read_predictions(out)] == expected
        assert json.loads((out / "summary.json").read_text())["example"] == list(example)


def test_a_training_run_is_asked_the_way_it_was_trained(varied_model, tmp_path, capsys):
    """A run folder as MODEL: its system prompt, response prefix, held-out problems and budget are the defaults."""
    run = fake_run(varied_model, tmp_path, system_prompt="Be brief.", response_prefix="<think>")
    out = tmp_path / "eval"
    assert eval_script.main([str(run), "--limit", "3", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["system_prompt"], summary["response_prefix"]) == ("Be brief.", "<think>")
    assert summary["data"] == "arithmetic" and summary["max_new_tokens"] == 6
    from grpo_ds.data import load_problems

    problems = load_problems("arithmetic", "test", num_problems=3, difficulty=1)
    model, tokenizer = load(str(varied_model))
    expected = [greedy_alone(model, tokenizer, render_prompt(tokenizer, p.question, "Be brief.", "<think>"), 6)
                for p in problems]
    rows = read_predictions(out)
    assert [r["question"] for r in rows] == [p.question for p in problems]
    assert [r["completion"] for r in rows] == expected
    # --like: another model (here the same weights) asked exactly as the run was trained, for base comparisons
    assert eval_script.main([str(varied_model), "--like", str(run), "--limit", "3", "--output_dir",
                             str(tmp_path / "like")]) == 0
    assert [r["completion"] for r in read_predictions(tmp_path / "like")] == expected
    assert eval_script.main([str(varied_model), "--like", str(varied_model)]) == 2
    # a flag still wins over the run's setting, and ask reads the run the same way
    assert eval_script.main([str(run), "--limit", "1", "--response_prefix", "", "--output_dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["response_prefix"] == ""
    capsys.readouterr()
    assert ask_script.main([str(run / "final"), problems[0].question, "--max_new_tokens", "6"]) == 0
    assert expected[0].strip() in capsys.readouterr().out


@pytest.mark.slow
def test_two_ranks_reproduce_one_process(varied_model, dataset_with_known_answers, tmp_path):
    data, _, _ = dataset_with_known_answers
    common = [str(varied_model), "--data", str(data), "--max_new_tokens", "16", "--batch_size", "2"]
    # one thread everywhere: the same batch then gives bit-identical logits in both runs (a different thread count
    # changes the summation order, and a near-tie in greedy decoding could flip)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert eval_script.main([*common, "--output_dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "eval_gsm8k.sh"), *common, "--nproc", "2",
                           "--output_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    one, two = read_predictions(tmp_path / "one"), read_predictions(tmp_path / "two")
    assert len(one) == len(QUESTIONS)
    # same completions, scores and token counts, problem by problem (the first difference is shown if any)
    diff = next(((a, b) for a, b in zip(one, two) if a != b), None)
    assert one == two, f"first differing prediction: {diff}; 2-rank log: {proc.stderr[-1500:]}"
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert summaries[1]["world_size"] == 2
    for key in ("n", "accuracy_strict", "accuracy_lenient", "format_rate", "completion_tokens"):
        assert summaries[0][key] == summaries[1][key], key


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_the_global_rng_and_the_mode(varied_model, training):
    """The trainer evaluates between steps: evaluate() reseeds per batch and samples, yet the caller's RNG stream
    and train/eval mode must come back as they were."""
    model, tokenizer = load(str(varied_model))
    model.train(training)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(4)  # what the caller would draw next without an evaluation between
    torch.set_rng_state(state)
    ev.evaluate(model, tokenizer, [Problem(q, "3") for q in QUESTIONS[:2]], max_new_tokens=6, batch_size=4,
                num_samples=2, seed=7)
    assert torch.equal(torch.rand(4), expected)
    assert model.training is training


def test_sampling_is_seeded_and_reports_pass_and_maj(varied_model):
    model, tokenizer = load(str(varied_model))
    problems = [Problem(q, "3") for q in QUESTIONS[:3]]
    model.train()  # evaluate switches to eval mode and back
    kwargs = dict(max_new_tokens=12, batch_size=6, num_samples=3, seed=1)
    summary, rows = ev.evaluate(model, tokenizer, problems, **kwargs)
    assert model.training
    assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(3) for s in range(3)]
    assert len({r["completion"] for r in rows}) > 3  # temperature 1.0 by default: samples differ
    assert summary["n"] == 3 and summary["num_samples"] == 3
    # golds chosen after the fact (the samples do not depend on them): problem 0's gold is what its second sample
    # answered (strict: the tagged number; the varied model never tags, so lenient: its last number)
    numbers = [extract_last_number(r["completion"]) for r in rows]
    assert numbers[1] is not None, "the varied model should write numbers; the test would be vacuous"
    gold = str(numbers[1])
    graded = [Problem(QUESTIONS[0], gold), Problem(QUESTIONS[1], "987654"), Problem(QUESTIONS[2], "987654")]
    summary, again = ev.evaluate(model, tokenizer, graded, **kwargs)
    assert [r["completion"] for r in again] == [r["completion"] for r in rows]
    assert summary["pass_at_k_lenient"] == pytest.approx(1 / 3)  # problem 0 only, by its second sample
    assert summary["accuracy_lenient"] == pytest.approx(sum(n == numbers[1] for n in numbers[:3]) / 9)
    assert summary["pass_at_k"] == 0.0 and summary["maj_at_k"] == 0.0  # no sample tags an answer
    _, again = ev.evaluate(model, tokenizer, problems, **kwargs)
    assert again == rows  # seeded per batch: the same samples
    _, other_seed = ev.evaluate(model, tokenizer, problems, **{**kwargs, "seed": 2})
    assert other_seed != rows


@pytest.mark.parametrize("argv, message", [
    (["m", "--num_samples", "4", "--temperature", "0"], "--num_samples 4 with --temperature 0"),
    (["m", "--limit", "0"], "--limit 0: expected a positive integer"),
    (["m", "--top_p", "1.5", "--temperature", "1"], "--top_p 1.5"),
    ([], "give a MODEL (or --score_gold)"),
    (["--score_gold", "--data", "missing.jsonl"], "--data 'missing.jsonl': file not found"),
])
def test_bad_flags_fail_with_one_line(argv, message, capsys):
    assert eval_script.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


# ----------------------------------------------------------------------------- quick inference (ask)


def test_arithmetic_difficulty_defaults_to_trainings():
    """Without a training run, `--data arithmetic` is asked at training's default difficulty (1), not another."""
    args = eval_script.parser().parse_args(["embedded", "--data", "arithmetic"])
    eval_script.fill_defaults(args)
    assert args.difficulty == Config().difficulty == 1


def test_ask_one_question_and_compare(varied_model, tmp_path, capsys):
    assert ask_script.main([str(varied_model), "what is 2+2?", "--max_new_tokens", "12"]) == 0
    alone = capsys.readouterr().out
    assert "=== Q1: what is 2+2?" in alone and "--> answer:" in alone
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "what is 2+2?", "answer": "#### 4"}) + "\n")
    assert ask_script.main([str(varied_model), "--file", str(questions), "--compare", str(varied_model),
                     "--max_new_tokens", "12"]) == 0
    compared = capsys.readouterr().out
    assert "[gold: 4]" in compared and "BASE  --> answer" in compared and "MODEL --> answer" in compared
    assert "strict wrong" in compared or "strict right" in compared


def test_side_by_side_columns():
    text = side_by_side("BASE", "short", "MODEL", "a longer answer that wraps " * 3, width=60)
    lines = text.splitlines()
    assert lines[0].startswith("BASE") and "| MODEL" in lines[0]
    assert all(line.index("|") == lines[0].index("|") for line in lines)  # one column boundary
    assert len(lines) > 3  # the long answer wrapped onto several lines


def test_ask_needs_a_question(varied_model, capsys):
    assert ask_script.main([str(varied_model)]) == 2
    assert "give either a question or --file" in capsys.readouterr().err


def test_doctests_pass():
    import doctest

    result = doctest.testmod(ev)
    assert result.failed == 0 and result.attempted >= 3


@pytest.mark.parametrize("synced_gpus, calls", [(False, {0: [[0, 1], [4]], 1: [[2, 3]]}),
                                                 (True, {0: [[0, 1], [4]], 1: [[2, 3], [4]]})])
def test_synced_generation_gives_every_rank_the_same_number_of_calls(monkeypatch, synced_gpus, calls):
    """Layer-by-layer ZeRO-3 generation is a collective per forward: with synced_gpus every rank must call
    generate as often as the others. 3 batches over 2 ranks: rank 1 steps along in a padding call (the plan's last
    batch), whose completions it drops."""
    from grpo_ds.generation import Rollout

    made = []

    def fake_generate(model, tokenizer, prompts, sampling, *, group_size, synced_gpus=False):
        made.append((rank, [int(p) for p in prompts], synced_gpus))
        n = len(prompts) * group_size
        return Rollout(torch.zeros(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.long),
                       torch.ones(n, 1, dtype=torch.long), torch.zeros(n, dtype=torch.bool))

    monkeypatch.setattr(ev, "generate", fake_generate)
    tokenizer = type("Tok", (), {"batch_decode": lambda self, ids, **kw: ["x"] * len(ids)})()
    plan = [[0, 1], [2, 3], [4]]
    for rank in (0, 1):
        out = ev.generate_share(None, tokenizer, ["0", "1", "2", "3", "4"], plan, rank, 2, num_samples=1, seed=0,
                                sampling=Sampling(4), synced_gpus=synced_gpus)
        assert sorted(out) == sorted(i for b in range(rank, 3, 2) for i in plan[b])  # a padding call adds nothing
    assert {r: [p for rank_, p, _ in made if rank_ == r] for r in (0, 1)} == calls
    assert all(synced == synced_gpus for _, _, synced in made)


def test_eval_module_imports_no_deepspeed():
    code = "import sys, grpo_ds.eval, grpo_ds.inference; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_math_verify_scorer_reads_expressions():
    pytest.importorskip("math_verify", reason="the [math] extra (math-verify) is not installed; .ci/run installs it")
    texts = ["<think>half</think><answer>\\frac{1}{2}</answer>", "It is 1/2 of it, so $\\frac{2}{4}$.",
             "<answer>0.4</answer>"]
    problems = [Problem("q", "0.5")] * 3
    numeric = ev.score_texts(texts, problems)
    verified = ev.score_texts(texts, problems, scorer="math_verify")
    # numeric reads "\frac{1}{2}" as 1/2 too, but not "$\frac{2}{4}$" at the end of a sentence as the last number
    assert [r["correct"] for r in verified] == [True, False, False]
    assert [r["correct_lenient"] for r in verified] == [True, True, False]
    assert [r["correct"] for r in numeric] == [True, False, False]
    with pytest.raises(ValueError, match="--scorer 'exact'"):
        ev.score_texts(texts, problems, scorer="exact")
