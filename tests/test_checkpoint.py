"""Checkpoints: exact resume on 2 CPU ranks (ZeRO-2 and ZeRO-3), atomic publication under a crash mid-save, a full
disk, preemption by SIGTERM, rotation, the Hugging Face export, and non-finite steps skipped on all ranks alike."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from grpo_ds import checkpoint
from helpers import TINY_FLAGS, records, run, start, zero_config

pytestmark = pytest.mark.slow


def metrics(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model, ds_config):
    flags = ["--ds_config", zero_config(tmp_path, ds_config), "--model", str(tiny_model), *TINY_FLAGS,
             "--save_steps", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run([*flags, "--output_dir", str(straight), "--max_steps", "4"], tmp_path)
    run([*flags, "--output_dir", str(split), "--max_steps", "2"], tmp_path)
    assert checkpoint.latest_checkpoint(str(split)).name == "step_0000002"
    run([*flags, "--output_dir", str(split), "--max_steps", "4", "--resume_from", "latest"], tmp_path)
    assert not (split / "checkpoints" / "step_0000002" / checkpoint.UNIVERSAL).exists()  # same layout: direct load

    a, b = metrics(straight), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # the log continues, no step twice
    for row_a, row_b in zip(a, b):
        for key in ("loss", "reward_mean", "kl", "grad_norm", "completion_len_mean"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-7), (row_a["step"], key)
    # the weights after step 4 are the same too
    assert records(split)[0][-1]["fingerprint"] == pytest.approx(records(straight)[0][-1]["fingerprint"], rel=1e-6)

    if ds_config == "zero3.json":
        # the export of the gathered ZeRO-3 weights and the export rebuilt from the DeepSpeed files agree exactly
        from transformers import AutoModelForCausalLM

        rebuilt = checkpoint.export_checkpoint(str(split / "checkpoints"), str(tmp_path / "rebuilt"))
        ids = torch.arange(1, 30).unsqueeze(0)
        with torch.no_grad():
            final = AutoModelForCausalLM.from_pretrained(split / "final")(ids).logits
            other = AutoModelForCausalLM.from_pretrained(rebuilt)(ids).logits
        assert torch.equal(final, other)
        # --model and the evaluation scripts take the checkpoint folder itself (exported once to the cache)
        from grpo_ds.models import resolve_model

        with torch.no_grad():
            resolved = AutoModelForCausalLM.from_pretrained(resolve_model(str(split / "checkpoints")))(ids).logits
        assert torch.equal(final, resolved)
        # the tied output layer is stored once, as the model's own save_pretrained would
        from safetensors import safe_open

        with safe_open(split / "final" / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


def test_rotation_keeps_the_newest(tmp_path, tiny_model):
    out = tmp_path / "run"
    run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "4", "--save_steps", "1",
         "--save_total_limit", "2", *TINY_FLAGS], tmp_path, nprocs=1)
    assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == ["step_0000003", "step_0000004"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def test_kill_in_the_middle_of_a_save_leaves_latest_complete(tmp_path, tiny_model):
    out = tmp_path / "run"
    flags = ["--model", str(tiny_model), "--output_dir", str(out), "--save_steps", "1", *TINY_FLAGS]
    run([*flags, "--max_steps", "4"], tmp_path, nprocs=1, fault="kill_in_save2", expect=-signal.SIGKILL)
    root = out / "checkpoints"
    assert list(root.glob(".staging-*")), "the killed save left its staging folder behind"
    assert (root / "latest").read_text().strip() == "step_0000001"
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_0000001"]
    # resuming from it works, and the half-written checkpoint is cleared by the next save
    run([*flags, "--max_steps", "3", "--resume_from", "latest"], tmp_path, nprocs=1)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert not list(root.glob(".staging-*"))


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = run(["--model", str(tiny_model), "--output_dir", str(out), "--save_steps", "1", "--max_steps", "2",
                *TINY_FLAGS], tmp_path, nprocs=1, fault="disk_full_save2")
    assert (f"checkpoint at step 2 failed (OSError: [Errno 28] No space left on device: "
            in proc.stderr)
    assert f"the previous checkpoint {out / 'checkpoints' / 'step_0000001'} is intact" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert [r["step"] for r in metrics(out)] == [1, 2]  # training went on


def test_sigterm_checkpoints_and_resumes(tmp_path, tiny_model):
    out = tmp_path / "run"
    flags = ["--model", str(tiny_model), "--output_dir", str(out), "--save_steps", "0", *TINY_FLAGS]
    proc = start([*flags, "--max_steps", "500"], tmp_path)
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the run did not log 2 steps within 240 s (exit code {proc.poll()}); its output ends: "
                        f"{proc.communicate()[0][-2000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # to the launcher and both ranks, as a scheduler does
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not stop within 120 s of SIGTERM; its output ends: {proc.communicate()[0][-2000:]}")
    assert proc.returncode != 0
    assert "Resume with the same command plus --resume_from latest" in output
    saved = checkpoint.latest_checkpoint(str(out))
    assert saved is not None
    stopped_at = checkpoint.read_state(saved)["step"]
    assert 2 <= stopped_at < 500
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped_at + 1))
    run([*flags, "--max_steps", str(stopped_at + 2), "--resume_from", "latest"], tmp_path)
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped_at + 3))


def test_non_finite_loss_on_one_rank_skips_the_step_on_both(tmp_path, tiny_model):
    out = tmp_path / "run"
    run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "3", "--save_steps", "0",
         *TINY_FLAGS], tmp_path, fault="nan_rank1_step2")
    rank0, rank1 = records(out)
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]  # no split-brain update
    assert rank0[1]["fingerprint"] == rank0[0]["fingerprint"]  # step 2's update was skipped...
    assert rank0[2]["fingerprint"] != rank0[1]["fingerprint"]  # ...and step 3 trained again
    assert [r["metrics"]["skipped_steps"] for r in rank0] == [0, 1, 0]


def test_repeated_non_finite_steps_stop_the_run(tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "10", "--save_steps", "0",
                "--max_nonfinite_skips", "2", *TINY_FLAGS], tmp_path, nprocs=1, fault="nan_always", expect=3)
    assert "non-finite: 2 consecutive optimizer steps skipped for non-finite gradients (last at step 2)" in proc.stdout
    assert records(out, nprocs=1)[0][0]["metrics"]["grad_norm"] is None  # nothing measured: null in the log


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_a_preemption_in_the_middle_of_a_step_resumes_exactly(tmp_path, tiny_model, ds_config):
    """SIGTERM while step 3 generates: the step is abandoned (nothing was updated), step 2's checkpoint is written,
    and the resumed run redoes step 3 exactly as the uninterrupted run did it."""
    flags = ["--ds_config", zero_config(tmp_path, ds_config), "--model", str(tiny_model), *TINY_FLAGS,
             "--save_steps", "0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run([*flags, "--output_dir", str(straight), "--max_steps", "4"], tmp_path)
    proc = run([*flags, "--output_dir", str(split), "--max_steps", "4"], tmp_path, fault="sigterm_mid_step3",
               expect=143)
    assert "stopped by SIGTERM after step 2" in proc.stdout
    assert checkpoint.latest_checkpoint(str(split)).name == "step_0000002"
    assert [r["step"] for r in metrics(split)] == [1, 2]  # the abandoned step logged nothing
    run([*flags, "--output_dir", str(split), "--max_steps", "4", "--resume_from", "latest"], tmp_path)
    a, b = metrics(straight), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        for key in ("loss", "reward_mean", "kl", "grad_norm", "completion_len_mean"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-7), (row_a["step"], key)
    assert records(split)[0][-1]["fingerprint"] == pytest.approx(records(straight)[0][-1]["fingerprint"], rel=1e-6)
