"""Tests for grpo_ds.data: answers, the arithmetic generator, file/hub loading, prompts and the sampler."""
from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from grpo_ds import data
from grpo_ds.data import (SYSTEM_PROMPT, Problem, PromptSampler, arithmetic_problem, arithmetic_problems,
                          gsm8k_final_answer, load_problems, render_chat, render_prompt)

# ----------------------------------------------------------------------------------------------- answers


def test_gsm8k_final_answer_on_gsm8k_style_solutions():
    natalia = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    thousands = "She earns 250 * 4 = <<250*4=1000>>1000 dollars.\n#### 1,000"
    negative = "The temperature falls 5 - 8 = <<5-8=-3>>-3 degrees.\n#### -3"
    decimal = "Each costs 5 / 2 = <<5/2=2.5>>2.5 dollars.\n#### 2.5"
    assert gsm8k_final_answer(natalia) == "72"
    assert gsm8k_final_answer(thousands) == "1000"
    assert gsm8k_final_answer(negative) == "-3"
    assert gsm8k_final_answer(decimal) == "2.5"
    assert gsm8k_final_answer("#### 12\nOops, recounted.\n#### 1,234,567") == "1234567"  # the LAST marker counts
    for bad in ("no marker at all: 72", "#### ", "#### n/a", "#### 3, 4"):
        assert gsm8k_final_answer(bad) is None, bad


# ------------------------------------------------------------------------------------ arithmetic problems

# The test's own reading of every phrasing: regex -> operation. Numbers are operands in application order.
PHRASES = [
    (r"has (\d+) apples\.", "start"), (r"has (\d+) bags of apples with (\d+) apples in each bag", "start_prod"),
    (r"buys (\d+) more", "add"), (r"gives (\d+) to (?:his|her) sister", "sub"),
    (r"picks (\d+) bags with (\d+) apples in each", "add_prod"),
    (r"gives (\d+) apples to each of (\d+) neighbors", "sub_prod"),
    (r"shares them equally among (\d+) friends", "div"),
    (r"has (\d+) pencils in the classroom", "start"),
    (r"has (\d+) boxes of pencils with (\d+) pencils in each box", "start_prod"),
    (r"orders (\d+) more", "add"), (r"hands out (\d+) to students", "sub"),
    (r"buys (\d+) boxes with (\d+) pencils each", "add_prod"),
    (r"gives (\d+) pencils to each of (\d+) groups", "sub_prod"),
    (r"splits them equally among (\d+) tables", "div"),
    (r"has \$(\d+) in a piggy bank", "start"), (r"saves \$(\d+) per week for (\d+) weeks", "start_prod"),
    (r"earns \$(\d+) walking dogs", "add"), (r"spends \$(\d+) on a book", "sub"),
    (r"saves \$(\d+) per week for (\d+) more weeks", "add_prod"),
    (r"buys (\d+) tickets that cost \$(\d+) each", "sub_prod"),
    (r"divides the money equally into (\d+) envelopes", "div"),
    (r"A bakery has (\d+) cookies\.", "start"),
    (r"bakes (\d+) trays of cookies with (\d+) cookies on each", "start_prod"),
    (r"bakes (\d+) more(?! trays)", "add"), (r"sells (\d+)(?= and|,|\.)", "sub"),
    (r"bakes (\d+) more trays of (\d+) cookies", "add_prod"), (r"sells (\d+) boxes of (\d+) cookies", "sub_prod"),
    (r"packs them equally into (\d+) boxes", "div"),
    (r"has (\d+) books on a shelf", "start"), (r"has (\d+) shelves with (\d+) books on each shelf", "start_prod"),
    (r"receives (\d+) donated books", "add"), (r"lends out (\d+)", "sub"),
    (r"receives (\d+) boxes of (\d+) new books", "add_prod"),
    (r"lends (\d+) books to each of (\d+) schools", "sub_prod"),
    (r"spreads them equally across (\d+) carts", "div"),
    (r"has (\d+) stickers\.", "start"),
    (r"has (\d+) sheets of stickers with (\d+) stickers on each sheet", "start_prod"),
    (r"gets (\d+) more from a friend", "add"), (r"uses (\d+) to decorate a notebook", "sub"),
    (r"buys (\d+) packs with (\d+) stickers in each", "add_prod"),
    (r"puts (\d+) stickers on each of (\d+) cards", "sub_prod"), (r"shares them equally among (\d+) classmates", "div"),
]
OPERATIONS = {"start_prod": 1, "add": 1, "sub": 1, "add_prod": 2, "sub_prod": 2, "div": 1}


def read_steps(question: str) -> list[tuple[str, list[int]]]:
    """(operation, operands) in text order, asserting every number in the question was understood."""
    found = sorted((m.start(), op, [int(g) for g in m.groups()])
                   for pattern, op in PHRASES for m in re.finditer(pattern, question))
    assert sum(len(nums) for _, _, nums in found) == len(re.findall(r"\d+", question)), question
    return [(op, nums) for _, op, nums in found]


def evaluate(question: str) -> tuple[int, int]:
    """(answer, number of arithmetic operations) re-derived from the text; checks every intermediate value."""
    steps = read_steps(question)
    assert steps[0][0] in ("start", "start_prod") and all(not op.startswith("start") for op, _ in steps[1:]), question
    value, count = 0, 0
    for op, nums in steps:
        amount = nums[0] * nums[1] if len(nums) == 2 else nums[0]
        if op.startswith("start"):
            value = amount
        elif op.startswith("add"):
            value += amount
        elif op.startswith("sub"):
            value -= amount
        else:
            assert op == "div" and op == steps[-1][0] and value % amount == 0, question  # exact and last
            value //= amount
        count += OPERATIONS.get(op, 0)
        assert value >= 0, question
    return value, count


@pytest.mark.parametrize("difficulty,largest", [(1, 20), (2, 50), (3, 100)])
def test_arithmetic_answers_are_correct(difficulty, largest):
    rng = random.Random(difficulty)
    problems = [arithmetic_problem(rng, difficulty) for _ in range(600)]
    seen_ops: Counter = Counter()
    for problem in problems:
        value, count = evaluate(problem.question)
        assert problem.answer == str(value) and int(problem.answer) >= 0, problem
        assert count == difficulty, problem  # the difficulty is the number of operations
        assert max(int(n) for n in re.findall(r"\d+", problem.question)) <= largest, problem
        seen_ops.update(op for op, _ in read_steps(problem.question))
    assert len({p.question.split(" ")[0] for p in problems}) > 5  # several stories and names show up
    if difficulty == 1:
        assert set(seen_ops) == {"start", "add", "sub"}
    if difficulty == 3:
        assert {"div", "add_prod", "sub_prod", "start_prod"} <= set(seen_ops)


def test_every_story_is_generated():
    rng = random.Random(0)
    questions = [arithmetic_problem(rng, 3).question for _ in range(300)]
    for noun in ("apples", "pencils", "dollars", "cookies", "books", "stickers"):
        assert any(noun in q for q in questions), noun


def test_arithmetic_problems_deterministic_and_disjoint():
    assert arithmetic_problems("train", 200, 2, 7) == arithmetic_problems("train", 200, 2, 7)
    assert arithmetic_problems("train", 200, 2, 7) != arithmetic_problems("train", 200, 2, 8)
    for difficulty in (1, 2, 3):
        train = arithmetic_problems("train", 2000, difficulty, 0)
        test = arithmetic_problems("test", 300, difficulty, 0)
        assert len(train) == 2000 and len(test) == 300
        train_q, test_q = {p.question for p in train}, {p.question for p in test}
        assert len(train_q) == 2000 and len(test_q) == 300  # no duplicates within a split
        assert not train_q & test_q
        assert all(isinstance(p, Problem) and int(p.answer) >= 0 for p in train + test)


def test_arithmetic_through_load_problems():
    assert len(load_problems("arithmetic")) == 5000
    assert load_problems("arithmetic", "test", num_problems=50, difficulty=1, seed=3) == \
        arithmetic_problems("test", 50, 1, 3)
    with pytest.raises(ValueError, match=re.escape("--split 'validation': expected 'train' or 'test'")):
        load_problems("arithmetic", "validation")
    with pytest.raises(ValueError, match=re.escape("--difficulty 4: expected 1, 2 or 3")):
        load_problems("arithmetic", difficulty=4)
    with pytest.raises(ValueError, match=re.escape("--num_problems 0: expected a positive integer")):
        load_problems("arithmetic", num_problems=0)
    with pytest.raises(ValueError, match=r"--num_problems 9000: only \d+ distinct difficulty-1 'test' problems"):
        load_problems("arithmetic", "test", num_problems=9000, difficulty=1)


# -------------------------------------------------------------------------------------------- file loading

ROWS = [{"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
        {"question": "Big?", "answer": "Yes.\n#### 1,000"},
        {"question": "Plain?", "answer": "72"}]
EXPECTED = [Problem("What is 2 + 3?", "5"), Problem("Big?", "1000"), Problem("Plain?", "72")]


def write_jsonl(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_load_jsonl_json_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS + [""])  # a trailing blank line is fine
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "obj.json").write_text(json.dumps({"data": ROWS}))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for path in (jsonl, tmp_path / "list.json", tmp_path / "obj.json", tmp_path / "d.parquet"):
        assert load_problems(str(path), "test") == EXPECTED, path  # split is ignored for files
    assert load_problems(jsonl, num_problems=2) == EXPECTED[:2]
    numeric = write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": 7}])
    assert load_problems(numeric) == [Problem("q", "7")]


@pytest.mark.parametrize("lines,message", [
    ([ROWS[0], ROWS[1], "not json"], ":3: malformed JSON (Expecting value)"),
    ([ROWS[0], {"answer": "#### 1"}], ":2: none of the columns prompt, question, problem; name the one to use with "
                                      "--prompt_column (the row has answer)"),
    ([{"question": "q"}], ":1: none of the columns answer, solution, ground_truth; name the one to use with "
                          "--answer_column (the row has question)"),
    ([{"question": 5, "answer": "#### 1"}], ":1: column 'question' is neither a string nor a list of chat messages"),
    ([{"question": "q", "answer": ["#### 1", "#### 2"]}], ":1: column 'answer' holds no readable gold answer (a "
                                                         "number, '#### x', \\boxed{x} or a short answer): "
                                                         "\"['#### 1', '#### 2']\""),
    ([ROWS[0], "", ROWS[1], ROWS[0], ROWS[0], ROWS[0], {"question": "q", "answer": "It is seventy-two."}],
     ":7: column 'answer' holds no readable gold answer (a number, '#### x', \\boxed{x} or a short answer): "
     "'It is seventy-two.'"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "x.jsonl", lines)
    with pytest.raises(ValueError) as excinfo:
        load_problems(path, bad_answers="error")
    assert str(excinfo.value) == path + message


def test_bad_answer_is_cut_to_60_chars(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "word " * 40}])
    with pytest.raises(ValueError) as excinfo:
        load_problems(path, bad_answers="error")
    assert str(excinfo.value) == (f"{path}:1: column 'answer' holds no readable gold answer (a number, '#### x', "
                                  f"\\boxed{{x}} or a short answer): {('word ' * 12)!r}")


def test_skip_bad_answers_logs_count(tmp_path, caplog):
    bad = {"question": "q", "answer": "#### n/a"}
    path = write_jsonl(tmp_path / "x.jsonl", [bad, ROWS[0], bad])
    with caplog.at_level(logging.WARNING, logger="grpo_ds.data"):
        assert load_problems(path) == [EXPECTED[0]]
    warnings = [r for r in caplog.records if r.name == "grpo_ds.data"]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == (f"{path}: skipped 2 of 3 rows whose gold answer cannot be read (first "
                                        f"{path}:1: '#### n/a'); --bad_answers error stops instead")
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [bad, bad])
    with pytest.raises(ValueError) as excinfo:
        load_problems(only_bad, bad_answers="skip")
    assert str(excinfo.value) == (f"{only_bad}: no usable rows (2 without a readable gold answer; first "
                                  f"{only_bad}:1: '#### n/a')")


def test_file_level_errors(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    cases = {missing: f"--dataset '{missing}': file not found",
             "x.csv": "--dataset 'x.csv': unsupported file type; use .jsonl, .json or .parquet"}
    for name in ("empty.jsonl", "empty.json", "empty.parquet"):
        (tmp_path / name).write_text("")
        cases[str(tmp_path / name)] = f"{tmp_path / name}: file is empty"
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    cases[blank] = f"{blank}: file is empty"
    (tmp_path / "bad.json").write_text('[\n{"question": "q",\n oops}]')
    bad_json = tmp_path / "bad.json"
    cases[str(bad_json)] = f"{bad_json}:3: malformed JSON (Expecting property name enclosed in double quotes)"
    for dataset, message in cases.items():
        with pytest.raises(ValueError) as excinfo:
            load_problems(dataset)
        assert str(excinfo.value) == message
    with pytest.raises(ValueError) as excinfo:
        load_problems(missing, bad_answers="x")  # flags are checked before the file is touched
    assert str(excinfo.value) == "--bad_answers 'x': expected 'skip' or 'error'"


def test_json_rows_are_named_by_row_number(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"data": [ROWS[0], {"question": "q"}]}))
    with pytest.raises(ValueError) as excinfo:
        load_problems(str(path))
    assert str(excinfo.value) == (f"{path} (row 2): none of the columns answer, solution, ground_truth; name the one "
                                  f"to use with --answer_column (the row has question)")


def test_hub_failure_is_one_line_and_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # These flags are read when the libraries are imported, so set the already-imported values too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ValueError) as excinfo:
        load_problems("nonexistent-org/nonexistent-ds")
    message = str(excinfo.value)
    assert time.monotonic() - start < 60
    assert "\n" not in message
    assert re.fullmatch(r"--dataset 'nonexistent-org/nonexistent-ds': cannot load from the Hugging Face hub "
                        r"\(\w+: .+\); pass a local \.jsonl/\.json/\.parquet file or 'arithmetic'", message), message


# ------------------------------------------------------------------------------------------------- prompts

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<pad>": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                        unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_render_prompt_with_chat_template():
    question = "Tom has 12 apples. How many apples does Tom have now?"
    prompt = render_prompt(tiny_tokenizer(CHATML), question)
    assert prompt == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert render_prompt(tiny_tokenizer(CHATML), "Q?", system_prompt="Be brief.").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>")


def test_render_prompt_without_chat_template():
    """One transcript format for models without a chat template, whoever asks (training, eval, ask, serve)."""
    prompt = render_prompt(tiny_tokenizer(None), "What is 2 + 2?")
    assert prompt == f"System: {SYSTEM_PROMPT}\nUser: What is 2 + 2?\nAssistant:"
    assert render_prompt(tiny_tokenizer(None), "Hi?", None) == "User: Hi?\nAssistant:"  # no system prompt
    chat = render_chat(tiny_tokenizer(None), [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                              {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])
    assert chat == "System: S\nUser: U\nAssistant: A\nUser: V\nAssistant:"


def test_render_prompt_puts_the_worked_example_before_the_question():
    """Few-shot: the example is an earlier user turn and the assistant's answer, between system prompt and question."""
    prompt = render_prompt(tiny_tokenizer(CHATML), "Q?", "Be brief.", "<think>", ("1 + 1?", "<think>1 + 1 = 2</think>"))
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 1?<|im_end|>\n"
                      "<|im_start|>assistant\n<think>1 + 1 = 2</think><|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
                      "<|im_start|>assistant\n<think>")
    assert render_prompt(tiny_tokenizer(None), "Q?", None, "", ("1 + 1?", "2")) == \
        "User: 1 + 1?\nAssistant: 2\nUser: Q?\nAssistant:"


def test_render_prompt_ends_with_the_response_prefix():
    with_template = render_prompt(tiny_tokenizer(CHATML), "Q?", response_prefix="<think>\n")
    assert with_template == render_prompt(tiny_tokenizer(CHATML), "Q?") + "<think>\n"
    assert with_template.endswith("<|im_start|>assistant\n<think>\n")
    assert render_prompt(tiny_tokenizer(None), "Q?", response_prefix=" <think>").endswith("Assistant: <think>")


def test_system_prompt_names_both_tags():
    assert SYSTEM_PROMPT.startswith("A conversation between User and Assistant.")
    assert SYSTEM_PROMPT.endswith("<think> reasoning process here </think>\n<answer> answer here </answer>")


# ------------------------------------------------------------------------------------------------- sampler

PROBLEMS = [Problem(f"q{i}", str(i)) for i in range(10)]


def test_sampler_covers_each_problem_once_per_epoch():
    sampler = PromptSampler(PROBLEMS, seed=1)
    first, second = sampler.next_batch(10), sampler.next_batch(10)
    assert sorted(p.answer for p in first) == sorted(p.answer for p in PROBLEMS)
    assert sorted(p.answer for p in second) == sorted(p.answer for p in PROBLEMS)
    assert first != second  # each epoch draws a new permutation
    assert first != PromptSampler(PROBLEMS, seed=2).next_batch(10)  # the seed matters
    assert first == PromptSampler(PROBLEMS, seed=1).next_batch(10)  # and is all that matters


def test_partial_batch_continues_into_next_epoch():
    sampler = PromptSampler(PROBLEMS, seed=0)
    batches = [sampler.next_batch(4) for _ in range(3)]  # 12 problems: an epoch of 10 plus 2
    assert all(len(b) == 4 for b in batches)
    flat = [p for b in batches for p in b]
    reference = PromptSampler(PROBLEMS, seed=0)
    assert flat == reference.next_batch(10) + reference.next_batch(2)
    assert sampler.state_dict() == {"epoch": 1, "cursor": 2}


def test_sampler_resumes_exactly():
    sampler = PromptSampler(PROBLEMS, seed=5)
    for _ in range(7):
        sampler.next_batch(3)
    state = sampler.state_dict()
    future = [sampler.next_batch(3) for _ in range(8)]
    resumed = PromptSampler(PROBLEMS, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through a checkpoint
    assert [resumed.next_batch(3) for _ in range(8)] == future


def test_split_does_not_depend_on_python_hash_seed():
    import os
    import subprocess
    import sys

    code = "from grpo_ds.data import arithmetic_problems as a; print([p.question for p in a('test', 20, 2, 0)])"
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(Path(data.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([p.question for p in arithmetic_problems("test", 20, 2, 0)])


def test_non_utf8_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(ValueError) as excinfo:
        load_problems(str(path))
    assert str(excinfo.value).startswith(f"{path}: not UTF-8 text (")
