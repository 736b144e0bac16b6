"""Resuming on another number of ranks or ZeRO stage (DeepSpeed's universal checkpoint): the weights and both AdamW
moments the resumed run starts from equal the ones the checkpointing run ended with, parameter by parameter, as
DeepSpeed gathers them whole on each side (safe_get_full_fp32_param / safe_get_full_optimizer_state, in
tests/run_train.py); the step count and the global data order continue; what cannot be done is refused in one
line before any model loads."""

import json

import pytest
import torch

from grpo_ds import checkpoint
from helpers import TINY_FLAGS, records, run, zero_config

LORA = ["--lora_r", "4", "--lora_alpha", "8"]

# (ranks, ZeRO config) of the run that writes the checkpoint -> of the run that resumes it, and extra flags
CASES = {
    "1_to_2_ranks": (1, "zero2.json", 2, "zero2.json", []),
    "2_to_1_ranks": (2, "zero2.json", 1, "zero2.json", []),
    "zero2_to_zero3": (1, "zero2.json", 2, "zero3.json", []),
    "zero3_2_to_1_ranks": (2, "zero3.json", 1, "zero3.json", []),
    "lora_1_to_2_ranks": (1, "zero2.json", 2, "zero2.json", LORA),
    "lora_zero3_2_to_1_ranks": (2, "zero3.json", 1, "zero3.json", LORA),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_resume_on_another_layout(tmp_path, tiny_model, monkeypatch, case):
    src_ranks, src_config, dst_ranks, dst_config, extra = CASES[case]
    # a warmup gives the scheduler a state to restore; not with LoRA, whose zero-initialized B would keep A's
    # gradient (and moments) zero through a first step at learning rate 0
    warmup = [] if extra == LORA else ["--warmup_steps", "10"]
    flags = ["--model", str(tiny_model), *TINY_FLAGS, *warmup, *extra]
    src, dst = tmp_path / "src", tmp_path / "dst"
    monkeypatch.setenv("GRPO_DS_TEST_DUMP_STEP", "2")  # the full state after step 2, and right after a resume
    # 3 steps straight through, checkpointing after step 2
    run([*flags, "--ds_config", zero_config(tmp_path, src_config), "--output_dir", str(src), "--max_steps", "3",
         "--save_steps", "2"], tmp_path, nprocs=src_ranks)
    saved = src / "checkpoints" / "step_0000002"
    # step 3 again, on the other layout, from the step-2 checkpoint
    run([*flags, "--ds_config", zero_config(tmp_path, dst_config), "--output_dir", str(dst), "--max_steps", "3",
         "--resume_from", str(saved)], tmp_path, nprocs=dst_ranks)
    assert (saved / "universal" / checkpoint.UNIVERSAL_DONE).is_file()

    # what the resumed run loaded is what the first run had after step 2, exactly, parameter by parameter
    before = torch.load(src / "full_state_step2.pt", weights_only=False)
    after = torch.load(dst / "full_state_loaded.pt", weights_only=False)
    assert sorted(after["params"]) == sorted(before["params"])
    if extra == LORA:
        assert before["params"] and all("lora_" in name for name in before["params"])
    for name, states in before["params"].items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(after["params"][name][key], states[key]), (name, key)
        assert states["exp_avg_sq"].abs().sum() > 0, name  # a real optimizer state, not a fresh one
    assert after["adam_steps"] == before["adam_steps"] and before["adam_steps"][0] > 0
    assert after["global_steps"] == before["global_steps"]
    assert after["lr_scheduler"] == before["lr_scheduler"]
    assert not warmup or before["lr_scheduler"]["last_batch_iteration"] > 0

    # the step count and the data order continue: step 3 draws what the uninterrupted run drew at step 3
    straight, resumed = records(src, src_ranks), records(dst, dst_ranks)
    assert [[r["step"] for r in rank] for rank in resumed] == [[3]] * dst_ranks
    assert all(rank[0]["drawn"] == straight[0][2]["drawn"] for rank in resumed)
    assert [json.loads(line)["step"] for line in (dst / "metrics.jsonl").read_text().splitlines()] == [3]
    state = checkpoint.read_state(checkpoint.latest_checkpoint(str(dst)))
    assert (state["step"], state["world_size"]) == (3, dst_ranks)


@pytest.mark.slow
def test_the_other_ranks_outwait_a_long_conversion(tmp_path, tiny_model):
    """Rank 0 converts alone while the others wait: a conversion longer than --dist_timeout (default 10 minutes;
    here 1) must not abort the resume."""
    flags = ["--model", str(tiny_model), *TINY_FLAGS, "--ds_config", zero_config(tmp_path, "zero2.json")]
    src, dst = tmp_path / "src", tmp_path / "dst"
    run([*flags, "--output_dir", str(src), "--max_steps", "2"], tmp_path, nprocs=1)
    run([*flags, "--output_dir", str(dst), "--max_steps", "3", "--resume_from", str(src / "checkpoints"),
         "--dist_timeout", "1"], tmp_path, fault="slow_conversion")
    assert [json.loads(line)["step"] for line in (dst / "metrics.jsonl").read_text().splitlines()] == [3]


def test_a_change_of_layout_with_zero0_is_refused(refuse, tmp_path):
    """(ZeRO-3 to ZeRO-1/2, the other refusal: tests/test_bad_input.py)"""
    saved = tmp_path / "step_0000002"
    saved.mkdir()
    (saved / checkpoint.STATE_FILE).write_text(json.dumps({"step": 2, "world_size": 2, "zero_stage": 0,
                                                           "config": {}}))
    refuse(f"--resume_from '{saved}': written by 2 rank(s) under ZeRO-0, this run has 1 rank(s) under ZeRO-2; a "
           f"change of ranks or stage needs ZeRO-1, 2 or 3 on both sides (DeepSpeed's universal checkpoint), else "
           f"resume with 2 rank(s) under ZeRO-0", resume_from=str(saved))
