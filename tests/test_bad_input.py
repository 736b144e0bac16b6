"""Bad input is refused with one clear line naming the file (and line) or the flag, before any model is loaded."""

import json
import subprocess
import sys

from helpers import ROOT, environment


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


GOOD = json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"})


def test_dataset_problems(refuse, tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    refuse(f"--dataset '{missing}': file not found", dataset=missing)
    empty = write(tmp_path / "empty.jsonl", "")
    refuse(f"{empty}: file is empty", dataset=empty)
    broken = write(tmp_path / "broken.jsonl", GOOD + "\n{\"question\": \n")
    refuse(f"{broken}:2: malformed JSON (Expecting value)", dataset=broken)
    no_question = write(tmp_path / "noq.jsonl", GOOD + "\n" + json.dumps({"answer": "#### 4"}) + "\n")
    refuse(f"{no_question}:2: none of the columns prompt, question, problem; name the one to use with "
           f"--prompt_column (the row has answer)", dataset=no_question)
    no_number = write(tmp_path / "nonum.jsonl", json.dumps({"question": "q?", "answer": "#### many"}) + "\n")
    refuse(f"{no_number}:1: column 'answer' holds no readable gold answer (a number, '#### x', \\boxed{{x}} or a "
           f"short answer): '#### many'", dataset=no_number, bad_answers="error")
    refuse(f"{no_number}: no usable rows (1 without a readable gold answer; first {no_number}:1: '#### many')",
           dataset=no_number)


def test_ds_config_problems(refuse, tmp_path):
    invalid = write(tmp_path / "bad.json", '{\n  "zero_optimization": {"stage": 2},\n  "bf16": \n}\n')
    refuse(f"{invalid}:4: invalid JSON (Expecting value)", ds_config=invalid)
    contradicting = write(tmp_path / "mb.json", json.dumps({"train_micro_batch_size_per_gpu": 8}))
    refuse(f"{contradicting}: train_micro_batch_size_per_gpu=8 contradicts --train_batch_size 2; set it to "
           f"\"auto\" or remove it", ds_config=contradicting)
    refuse("--ds_config 'nowhere.json': file not found", ds_config="nowhere.json")


def test_flag_problems(refuse, tmp_path):
    refuse("--model './nope': path does not exist", model="./nope")
    refuse("--group_size 1: must be at least 2 (advantages compare the completions of a group)", group_size=1)
    refuse("--reward 'nosuchmodule:fn': cannot import module 'nosuchmodule' (ModuleNotFoundError: No module named "
           "'nosuchmodule')", reward="nosuchmodule:fn")


def test_output_dir_with_another_runs_checkpoints(refuse, tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_0000004"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 3}))
    refuse(f"--output_dir {tmp_path / 'run'}: holds another run's checkpoints (latest step_0000004); pass "
           f"--resume_from latest to continue it or --overwrite to start over")
    # resuming it under a layout DeepSpeed's universal checkpoint cannot take is refused before loading anything
    refuse(f"--resume_from '{step}': written by 2 rank(s) under ZeRO-3, this run has 1 rank(s) under ZeRO-2; "
           f"DeepSpeed's universal checkpoint takes ZeRO-3 to ZeRO-3 only (any number of ranks): resume under "
           f"ZeRO-3", resume_from="latest")
    refuse(f"--resume_from '{tmp_path}': no grpo_ds checkpoint there (expected trainer_state.json)",
           resume_from=str(tmp_path))


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--group_size", "1"], cwd=tmp_path,
                          env=environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: --group_size 1: must be at least 2 (advantages compare "
                                                    "the completions of a group)")
