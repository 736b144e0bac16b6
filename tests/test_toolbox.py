"""The GRPO toolbox on 2 CPU ranks through the deepspeed launcher: each loss, sampling and reward option of the
late-2026 peers runs, keeps the ranks in lockstep and logs what it did. The math of each is tested by hand in
test_loss.py / test_rewards.py and against TRL in test_trl_equality.py."""

import json

import pytest

from helpers import TINY_FLAGS, records, run, zero_config

pytestmark = pytest.mark.slow


def metrics(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def in_sync(out) -> list:
    rank0, rank1 = records(out)
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    return rank0


SPARSE = [f if f != "learnable:sevens_dense" else "learnable:has_seven" for f in TINY_FLAGS]


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_dynamic_sampling_keeps_groups_with_a_signal(tmp_path, tiny_model, ds_config):
    out = tmp_path / "run"
    run(["--ds_config", zero_config(tmp_path, ds_config), "--model", str(tiny_model), "--output_dir", str(out),
         "--max_steps", "3", "--dynamic_sampling", "true", "--max_sampling_rounds", "3", *SPARSE], tmp_path)
    in_sync(out)
    rows = metrics(out)
    assert any(r["sampling_rounds"] > 1 for r in rows)  # ties were dropped and more prompts drawn
    # which groups were trained on (tests/run_train.py records their rewards): 2 per rank, and every group with a
    # signal that the rounds found, up to 2 per rank (groups_kept); tied groups only fill what is left
    for rank0_row, rank1_row, row in zip(*records(out), rows):
        trained = rank0_row["trained_rewards"] + rank1_row["trained_rewards"]
        assert len(rank0_row["trained_rewards"]) == len(rank1_row["trained_rewards"]) == 2
        assert sum(len(set(group)) > 1 for group in trained) == row["groups_kept"], (trained, row)
    for row in rows:
        assert row["groups_drawn"] == 4 * row["sampling_rounds"]  # rollouts_per_step per round, over both ranks
        assert row["groups_kept"] <= 4 and row["groups_kept"] <= row["groups_drawn"] - row["frac_zero_std_groups"] \
            * row["groups_drawn"] + 1e-9
        assert row["sampling_rounds"] == 3 or row["groups_kept"] == 4  # it stops once both ranks have 2 each


def test_dynamic_sampling_resumes_exactly(tmp_path, tiny_model):
    """Every round advances the data cursor, and the checkpoint holds it: 2 + 2 steps draw what 4 steps draw."""
    flags = ["--model", str(tiny_model), *SPARSE, "--dynamic_sampling", "true", "--max_sampling_rounds", "3",
             "--save_steps", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run([*flags, "--output_dir", str(straight), "--max_steps", "4"], tmp_path)
    run([*flags, "--output_dir", str(split), "--max_steps", "2"], tmp_path)
    run([*flags, "--output_dir", str(split), "--max_steps", "4", "--resume_from", "latest"], tmp_path)
    a, b = metrics(straight), metrics(split)
    for key in ("reward_mean", "groups_drawn", "groups_kept", "sampling_rounds", "loss"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4), key
    assert records(split)[0][-1]["fingerprint"] == pytest.approx(records(straight)[0][-1]["fingerprint"], rel=1e-6)


def test_cispo_truncation_masking_and_overlong_shaping(tmp_path, tiny_model):
    out = tmp_path / "run"
    run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "2", *TINY_FLAGS,
         "--loss_type", "cispo", "--clip_eps_high", "5.0", "--mask_truncated_completions", "true",
         "--overlong_buffer", "4", "--overlong_penalty", "0.5", "--epochs_per_step", "2"], tmp_path)
    rows = in_sync(out)
    assert len({r["fingerprint"] for r in rows}) == 2
    for row in metrics(out):
        assert row["truncated_frac"] > 0  # 8 tokens from a random model: most rows are cut
        assert -0.5 <= row["overlong_penalty"] < 0  # and pay for it, at most 0.5 each
        assert row["entropy"] > 0


def test_gspo_delta_top_entropy_and_kl_in_reward(tmp_path, tiny_model):
    out = tmp_path / "run"
    run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "2", *TINY_FLAGS,
         "--importance_sampling_level", "sequence", "--delta", "1.5", "--top_entropy_quantile", "0.2",
         "--kl_in_reward", "true", "--kl_estimator", "k2", "--epochs_per_step", "2"], tmp_path)
    rows = in_sync(out)
    assert len({r["fingerprint"] for r in rows}) == 2
    logged = metrics(out)
    assert logged[0]["kl_reward"] == 0.0  # before any update the policy is the reference
    assert logged[1]["kl_reward"] < 0  # afterwards the KL costs reward...
    # the loss has no KL term, but the logged KL is the policy's to the reference: 0 in step 1's first epoch, > 0
    # once the first epoch's optimizer step has moved the policy
    assert all(r["kl"] > 0 for r in logged)


def test_weighted_rewards_are_logged_apart(tmp_path, tiny_model):
    out = tmp_path / "run"
    flags = [f if f != "learnable:sevens_dense" else "learnable:sevens:1.0,learnable:has_seven:0.5"
             for f in TINY_FLAGS]
    run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "2", *flags], tmp_path)
    for row in metrics(out):
        assert row["reward_mean"] == pytest.approx(row["reward/learnable:sevens"]
                                                   + 0.5 * row["reward/learnable:has_seven"], rel=1e-6)
