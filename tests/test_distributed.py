"""Real multi-process runs: 2 CPU ranks (gloo) through the deepspeed launcher, for zero2.json and zero3.json."""

import json
import math
from pathlib import Path

import pytest

from helpers import TINY_FLAGS, build_varied_model, records, run, zero_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_two_ranks_train_in_sync(tmp_path, tiny_model, ds_config):
    out = tmp_path / "run"
    shm_before = set(Path("/dev/shm").glob("deepspeed_*"))
    run(["--ds_config", zero_config(tmp_path, ds_config), "--model", str(tiny_model), "--output_dir", str(out),
         "--max_steps", "3", *TINY_FLAGS], tmp_path)
    rank0, rank1 = records(out)
    assert [r["step"] for r in rank0] == [1, 2, 3]
    fingerprints = [r["fingerprint"] for r in rank0]
    # after every step both ranks hold the same policy weights...
    assert fingerprints == [r["fingerprint"] for r in rank1]
    # ...and those weights did change from step to step (the ranks agree on something that moves)
    assert len(set(fingerprints)) == 3
    for row in rank0:
        for key in ("loss", "kl", "grad_norm", "reward_mean", "step_s", "rollout_tokens_per_s"):
            assert math.isfinite(row["metrics"][key]), (key, row["metrics"])
    # metrics are reduced over ranks before logging: both ranks report the same values
    assert [r["metrics"]["reward_mean"] for r in rank0] == [r["metrics"]["reward_mean"] for r in rank1]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert (out / "final" / "config.json").is_file() and (out / "completions.jsonl").is_file()
    held = [r["reference_held"] for r in (rank0[0], rank1[0])]
    full = rank0[0]["reference_full"]
    # each rank holds only its partition of the reference (half, up to padding), not all of it: under ZeRO-3 as
    # the policy, and under ZeRO-2 too (--reference_partitioned, the default)
    assert all(h < 0.6 * full for h in held), (held, full)
    assert sum(held) >= full
    # DeepSpeed's memory_efficient_linear replaces F.linear process-wide with a slower autograd Function (37% of a
    # decode step on this CPU). The partitioned reference (no backward) never installs it, so under a ZeRO-2 policy
    # torch's linear stays in place throughout; a ZeRO-3 policy keeps DeepSpeed's default for its training pass,
    # and generation and the log-prob passes (no backward) run torch's all the same
    assert {r["torch_linear"] for r in rank0 + rank1} == {ds_config == "zero2.json"}
    assert all(r["linear_without_backward"] == [True] for r in rank0 + rank1)
    # DeepSpeed's CPU all-reduce buffers (69 MB of RAM per rank in /dev/shm) do not outlive the run
    assert set(Path("/dev/shm").glob("deepspeed_*")) <= shm_before


def metrics_of(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_zero3_without_gathering_generates_what_gathering_does(tmp_path, tiny_model):
    """--zero3_gather_for_generation false fetches each layer per token (synced ranks) instead of gathering the
    whole policy once: slower, for models that do not fit one device, and the same completions."""
    common = ["--ds_config", zero_config(tmp_path, "zero3.json"), "--model", str(tiny_model), "--max_steps", "2",
              *TINY_FLAGS]
    gathered, layered = tmp_path / "gathered", tmp_path / "layered"
    run([*common, "--output_dir", str(gathered)], tmp_path)
    run([*common, "--output_dir", str(layered), "--zero3_gather_for_generation", "false"], tmp_path)
    a, b = metrics_of(gathered), metrics_of(layered)
    for key in ("reward_mean", "completion_len_mean", "truncated_frac"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    rank0, rank1 = records(layered)
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    completions = [[json.loads(line)["completion"] for line in (out / "completions.jsonl").read_text().splitlines()]
                   for out in (gathered, layered)]
    assert completions[0] == completions[1]


def test_zero3_offload_trains_in_sync(tmp_path, tiny_model):
    out = tmp_path / "run"
    run(["--ds_config", zero_config(tmp_path, "zero3_offload.json"), "--model", str(tiny_model), "--output_dir",
         str(out), "--max_steps", "2", *TINY_FLAGS], tmp_path)
    rank0, rank1 = records(out)
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    assert rank0[0]["fingerprint"] != rank0[1]["fingerprint"]
    held = [r["reference_held"] for r in (rank0[0], rank1[0])]
    assert all(h < 0.6 * rank0[0]["reference_full"] for h in held)  # the reference is partitioned too
    assert (out / "final" / "config.json").is_file()


def test_evaluation_under_zero3_gives_every_rank_the_same_result(tmp_path, tiny_model):
    out = tmp_path / "run"
    run(["--ds_config", zero_config(tmp_path, "zero3.json"), "--model", str(tiny_model), "--output_dir", str(out),
         "--max_steps", "2", "--eval_steps", "1", "--eval_limit", "5", *TINY_FLAGS], tmp_path)
    rank0, rank1 = records(out)
    for a, b in zip(rank0, rank1):
        assert a["metrics"]["eval_accuracy_lenient"] == b["metrics"]["eval_accuracy_lenient"]
        assert a["metrics"]["eval_s"] > 0
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    logged = metrics_of(out)
    assert all("eval_accuracy" in row for row in logged)


def test_evaluation_under_zero3_without_gathering_matches_the_gathered_one(tmp_path):
    """--zero3_gather_for_generation false is for a policy too large for one device: the held-out evaluation must
    not gather it whole either, and must score what the gathered path scores. 5 problems in batches of 2 are 3
    batches, 2 for rank 0 and 1 for rank 1: generating layer by layer, rank 1 must step along in a third call."""
    model = build_varied_model(tmp_path / "varied")  # completions that differ from prompt to prompt
    common = ["--ds_config", zero_config(tmp_path, "zero3.json"), "--model", str(model), "--max_steps", "1",
              "--eval_steps", "1", "--eval_limit", "5", "--rollout_batch_size", "2", *TINY_FLAGS]
    gathered, layered = tmp_path / "gathered", tmp_path / "layered"
    run([*common, "--output_dir", str(gathered)], tmp_path)
    run([*common, "--output_dir", str(layered), "--zero3_gather_for_generation", "false"], tmp_path)
    (g0,), (g1,) = records(gathered)
    (l0,), (l1,) = records(layered)
    assert g0["full_gathers"] >= 2 and g1["full_gathers"] >= 2  # the spy sees the gathered path (rollout, eval)
    assert l0["full_gathers"] == l1["full_gathers"] == 0  # neither the rollout nor the evaluation gathered it
    assert l0["fingerprint"] == g0["fingerprint"]  # the same weights were evaluated...
    completions = g0["eval_completions"]
    assert len(completions) == 5 and len(set(completions)) > 1
    assert l0["eval_completions"] == l1["eval_completions"] == completions  # ...with the same completions
    for key in ("eval_accuracy", "eval_accuracy_lenient", "eval_format_rate", "eval_clean_rate"):
        assert l0["metrics"][key] == g0["metrics"][key], key


def test_batch_scaled_rewards_and_several_epochs_per_step(tmp_path, tiny_model):
    """--scale_rewards batch (one std over both ranks' rewards) and --epochs_per_step 2 (two optimizer steps per
    rollout, the second off-policy: the old-log-prob pass runs) on 2 ranks."""
    out = tmp_path / "run"
    run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "2", "--scale_rewards", "batch",
         "--epochs_per_step", "2", *TINY_FLAGS], tmp_path)
    rank0, rank1 = records(out)
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    assert len({r["fingerprint"] for r in rank0}) == 2
    for row in metrics_of(out):
        assert row["old_logprobs_s"] > 0 and row["skipped_steps"] == 0
        # the first epoch is on-policy (every ratio 1, nothing clipped); the second is off-policy and lr 1e-2 moves
        # the tiny model far enough that some ratios leave [0.8, 1.2]: clipped, but at most the second half
        assert 0 < row["clip_frac"] <= 0.5


def test_export_steps_write_loadable_folders(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "3", "--export_steps", "1",
         "--save_steps", "0", *TINY_FLAGS], tmp_path, nprocs=1)
    exports = sorted(p.name for p in (out / "exports").iterdir())
    assert exports == ["step_1", "step_2"]  # the last step's export is final/
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(out / name)(ids).logits
                  for name in ("exports/step_1", "exports/step_2", "final")]
    assert not torch.equal(logits[0], logits[1]) and not torch.equal(logits[1], logits[2])


def test_a_replicated_reference_under_zero2(tmp_path, tiny_model):
    out = tmp_path / "run"
    run(["--ds_config", zero_config(tmp_path, "zero2.json"), "--model", str(tiny_model), "--output_dir", str(out),
         "--max_steps", "2", "--reference_partitioned", "false", *TINY_FLAGS], tmp_path)
    rank0, rank1 = records(out)
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    full = rank0[0]["reference_full"]
    assert [rank0[0]["reference_held"], rank1[0]["reference_held"]] == [full, full]  # a whole copy on each rank
