"""GRPO must raise the reward on a task a tiny model can learn in seconds. This catches sign, masking and
normalization bugs that unit tests miss: with any of them the reward stays flat or falls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_train(tmp_path: Path, model: Path, *flags: str) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--model", str(model), "--output_dir", str(out),
           "--reward", "learnable:sevens", "--log_completions_steps", "0", "--gradient_checkpointing", "false",
           *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_raises_the_reward(tmp_path, tiny_model, loss_type):
    # the reward is the fraction of '7' characters in the completion; a random 58-token model starts near 1/58
    rows, out = run_train(tmp_path, tiny_model, "--max_steps", "20", "--rollouts_per_step", "4", "--group_size", "8",
                          "--train_batch_size", "16", "--max_new_tokens", "8", "--lr", "1e-2", "--kl_weight", "0.0",
                          "--loss_type", loss_type)
    rewards = [r["reward_mean"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 0.3 and last > 5 * first, rewards
    # the exported policy is the trained one: greedy decoding now favours the rewarded token
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "7" in tokenizer.decode(generated[0, ids["input_ids"].shape[1]:])


def test_kl_penalty_holds_the_policy_near_the_reference(tmp_path, tiny_model):
    # same task, with a large KL weight and several updates per rollout: the KL is measured, positive, and the
    # penalty keeps it far smaller than the unpenalized run's
    flags = ["--max_steps", "8", "--rollouts_per_step", "4", "--group_size", "8", "--train_batch_size", "8",
             "--gradient_accumulation_steps", "1", "--max_new_tokens", "8", "--lr", "1e-2"]
    free, _ = run_train(tmp_path / "free", tiny_model, *flags, "--kl_weight", "0.0")
    held, _ = run_train(tmp_path / "held", tiny_model, *flags, "--kl_weight", "1.0")
    assert all(r["old_logprobs_s"] > 0 for r in held)  # 4 optimizer steps per rollout: off-policy, old pass runs
    assert held[-1]["kl"] > 0
    assert free[-1]["kl"] == 0.0  # kl_weight 0: no reference model at all, so nothing is measured
    assert held[-1]["reward_mean"] < free[-1]["reward_mean"]


def test_evaluation_during_training_changes_nothing_else(tmp_path, tiny_model):
    flags = ["--max_steps", "2", "--rollouts_per_step", "2", "--group_size", "4", "--train_batch_size", "8",
             "--max_new_tokens", "6", "--lr", "1e-2", "--kl_weight", "0.0", "--save_steps", "0"]
    plain, _ = run_train(tmp_path / "plain", tiny_model, *flags)
    evaluated, out = run_train(tmp_path / "eval", tiny_model, *flags, "--eval_steps", "1", "--eval_limit", "5")
    for row in evaluated:
        assert 0.0 <= row["eval_accuracy"] <= 1.0 and 0.0 <= row["eval_accuracy_lenient"] <= 1.0
        assert row["eval_s"] > 0
    # the training trajectory is the one without evaluation (each round reseeds and update() calls train(), so this
    # alone cannot show that evaluate() restores the RNG and the mode: test_eval checks that directly)
    assert [r["reward_mean"] for r in evaluated] == [r["reward_mean"] for r in plain]
    assert [r["loss"] for r in evaluated] == [r["loss"] for r in plain]
    assert (out / "metrics.png").is_file()


def test_a_step_without_signal_leaves_the_weights_alone(tmp_path, tiny_model):
    # every completion gets the same reward, so every advantage is 0: without the skip, AdamW would turn the float
    # noise of the KL gradient into a full-size step
    from helpers import records, run

    out = tmp_path / "run"
    run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0",
         "--rollouts_per_step", "2", "--group_size", "4", "--train_batch_size", "8", "--max_new_tokens", "6",
         "--reward", "learnable:constant", "--lr", "1e-2", "--kl_weight", "0.1"], tmp_path, nprocs=1)
    rows = records(out, nprocs=1)[0]
    assert [r["metrics"]["update_skipped"] for r in rows] == [1, 1]
    # nothing was measured by the update: metrics.jsonl says null, never the string "nan", and holds only numbers
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["kl"] for row in logged] == [None, None] and [row["clip_frac"] for row in logged] == [None, None]
    assert all(v is None or isinstance(v, (int, float)) for row in logged for v in row.values())
    assert rows[0]["fingerprint"] == rows[1]["fingerprint"]
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert all(torch.equal(initial[k], final[k]) for k in final)


def test_the_closing_summary_says_what_happened_and_what_next():
    from grpo_ds.config import Config
    from grpo_ds.trainer import summary

    history = [{"step": 1, "reward_mean": 0.023, "update_skipped": 0}, {"step": 2, "reward_mean": 0.0,
                                                                         "update_skipped": 1},
               {"step": 3, "reward_mean": 0.1406, "update_skipped": 0}]
    text = summary(Config(output_dir="runs/quickstart"), history, 190.0)
    assert text.splitlines() == [
        "done: 3 step(s) in 3.2 min",
        "  reward     0.023 at step 1 -> 0.141 at step 3 (2 of 3 steps updated the policy)",
        "  model      runs/quickstart/final",
        "  plot       runs/quickstart/metrics.png",
        "  metrics    runs/quickstart/metrics.jsonl",
        "  next       bash scripts/eval_gsm8k.sh runs/quickstart --limit 200   # its held-out problems, greedy"]
