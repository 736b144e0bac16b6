"""The sampler's log-probs: recorded by both engines while sampling, equal to the trainer's recomputation at the same
temperature, and logged against it every step (TRL's sampling/* metrics), so a sampler/trainer temperature mismatch
shows; the importance-sampling correction of that mismatch with TRL's modes, by hand and against TRL's loss."""

import json
import math

import pytest
import torch

from grpo_ds.generation import Sampling, StaticDecoder, generate
from grpo_ds.logprobs import completion_logprobs
from grpo_ds.loss import BatchTotals, GRPOLoss, sampling_correction
from helpers import TINY_FLAGS, build_tokenizer, build_varied_model, run
from test_trl_equality import MAX_NEW_TOKENS, TRLLoss, batch

# ----------------------------------------------------------------------------------------------- the correction


def test_sampling_correction_modes_by_hand():
    # two sequences; log-ratios old - sampler: row 0 [ln 2, ln 4 (masked out), ...], row 1 [ln 0.5, ln 0.25]
    old = torch.log(torch.tensor([[2.0, 4.0], [0.5, 0.25]]))
    sampler = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # per token: ratios 2, (masked: 1), 0.5, 0.25
    assert sampling_correction(old, sampler, mask, "token_truncate", clip_min=0.4, clip_max=1.5).flatten().tolist() == \
        pytest.approx([1.5, 1.0, 0.5, 0.4])
    assert sampling_correction(old, sampler, mask, "token_mask", clip_min=0.4, clip_max=1.5).flatten().tolist() == \
        pytest.approx([0.0, 1.0, 0.5, 0.0])
    # per sequence: row 0 exp(ln 2) = 2; row 1 exp(ln 0.5 + ln 0.25) = 0.125
    assert sampling_correction(old, sampler, mask, "sequence_truncate", clip_min=0.4, clip_max=1.5).flatten().tolist() == \
        pytest.approx([1.5, 0.4])
    assert sampling_correction(old, sampler, mask, "sequence_mask", clip_min=None, clip_max=3.0).flatten().tolist() == \
        pytest.approx([2.0, 0.125])
    assert sampling_correction(old, sampler, mask, "sequence_mask", clip_min=0.2, clip_max=1.5).flatten().tolist() == \
        pytest.approx([0.0, 0.0])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_the_correction_weighs_the_loss_as_trl_does(loss_type, mode):
    """TRL multiplies the per-token policy loss by its importance-sampling ratio after the entropy mask and before
    the KL term (GRPOTrainer._compute_loss with use_vllm); the same weights here give the same loss and gradient."""
    logp, old, ref, entropies, advantages, mask = batch()
    sampler = old + torch.randn(old.shape, generator=torch.Generator().manual_seed(3)) * 0.3
    weights = sampling_correction(old, sampler, mask, mode, clip_max=1.2)
    assert not torch.allclose(weights, torch.ones_like(weights))  # the correction acts on this batch
    ours_leaf = logp.clone().requires_grad_(True)
    ours, _ = GRPOLoss(0.2, 0.04, loss_type)(ours_leaf, old, ref, advantages, mask,
                                             BatchTotals.single(mask, MAX_NEW_TOKENS), entropies_NC=entropies,
                                             sampling_weights_NC=weights)
    ours.backward()
    trl_leaf = logp.clone().requires_grad_(True)
    trl = TRLLoss(trl_leaf, entropies, loss_type=loss_type)
    trl.use_vllm, trl.vllm_importance_sampling_correction = True, True
    original = trl._compute_loss

    def with_ratio(model, inputs):
        return original(model, {**inputs, "importance_sampling_ratio": weights})

    trl._compute_loss = with_ratio
    theirs = trl(old, ref, advantages, mask)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_leaf.grad, trl_leaf.grad, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- the sampler


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_varied_model(tmp_path_factory.mktemp("varied") / "model")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), build_tokenizer()


PROMPTS = ["<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nhi<|im_end|>\n"]


def sampled(model, tokenizer, sampling: Sampling, engine=None):
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    return generate(model, tokenizer, PROMPTS, sampling, group_size=3, engine=engine)


@pytest.mark.parametrize("engine", ["hf", "static"])
@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.3])
def test_sampler_logprobs_equal_the_trainers_at_the_same_temperature(varied, engine, temperature):
    model, tokenizer = varied
    rollout = sampled(model, tokenizer, Sampling(12, temperature), StaticDecoder(model) if engine == "static" else None)
    mask = rollout.completion_mask_NC.bool()
    assert mask.sum() > 12
    with torch.no_grad():  # greedy tokens come from the plain softmax (temperature 1)
        trainer = completion_logprobs(model, rollout.sequences_NT, rollout.attention_mask_NT,
                                      rollout.completion_mask_NC.shape[1], temperature or 1.0)
    diff = (rollout.sampler_logprobs_NC - trainer)[mask].abs()
    assert float(diff.max()) < 1e-4
    assert float(rollout.sampler_logprobs_NC[~mask].abs().sum()) == 0.0  # nothing outside the mask


def test_a_temperature_mismatch_shows_in_the_log_probs(varied):
    """The class of bug TRL had: the sampler draws at temperature 0.5, the trainer scores at 1. The ratio between
    the two distributions reaches 2 and more on some token."""
    model, tokenizer = varied
    rollout = sampled(model, tokenizer, Sampling(12, 0.5))
    mask = rollout.completion_mask_NC.bool()
    with torch.no_grad():
        trainer = completion_logprobs(model, rollout.sequences_NT, rollout.attention_mask_NT,
                                      rollout.completion_mask_NC.shape[1], 1.0)
    log_ratio = (rollout.sampler_logprobs_NC - trainer)[mask].abs()
    assert float(log_ratio.max()) > math.log(2)


def test_with_top_p_the_sampler_describes_the_nucleus(varied):
    model, tokenizer = varied
    rollout = sampled(model, tokenizer, Sampling(12, 1.0, top_p=0.5))
    mask = rollout.completion_mask_NC.bool()
    with torch.no_grad():
        trainer = completion_logprobs(model, rollout.sequences_NT, rollout.attention_mask_NT,
                                      rollout.completion_mask_NC.shape[1], 1.0)
    # renormalized over the nucleus: never below the full softmax's, and above it somewhere
    assert bool(((rollout.sampler_logprobs_NC - trainer)[mask] >= -1e-5).all())
    assert float((rollout.sampler_logprobs_NC - trainer)[mask].max()) > 0.05


# ----------------------------------------------------------------------------------------------- in training


def metrics(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_logs_the_mismatch_and_catches_a_temperature_bug(tmp_path, tiny_model):
    flags = ["--model", str(tiny_model), "--max_steps", "1", *TINY_FLAGS, "--temperature", "0.5"]
    run([*flags, "--output_dir", str(tmp_path / "ok")], tmp_path, nprocs=1)
    ok = metrics(tmp_path / "ok")[0]
    assert ok["sampling/sampling_logp_difference/max"] < 1e-4
    assert ok["sampling/importance_sampling_ratio/min"] == pytest.approx(1.0, abs=1e-4)
    assert ok["sampling/importance_sampling_ratio/max"] == pytest.approx(1.0, abs=1e-4)
    # the same run with the trainer scoring at temperature 1 (tests/run_train.py's fault): the metric shows it
    run([*flags, "--output_dir", str(tmp_path / "bug")], tmp_path, nprocs=1, fault="trainer_temperature_1")
    bug = metrics(tmp_path / "bug")[0]
    assert bug["sampling/sampling_logp_difference/max"] > 0.1


@pytest.mark.slow
def test_sampler_logprobs_as_old_skip_the_second_pass(tmp_path, tiny_model):
    """Off-policy (2 epochs): with --sampler_logprobs_as_old the old log-probs are the sampler's (no second pass);
    the correction then sees no mismatch (ratio 1)."""
    flags = ["--model", str(tiny_model), "--max_steps", "1", *TINY_FLAGS, "--epochs_per_step", "2",
             "--importance_sampling_correction", "true", "--importance_sampling_mode", "token_truncate"]
    run([*flags, "--output_dir", str(tmp_path / "two"), "--sampler_logprobs_as_old", "true"], tmp_path, nprocs=1)
    row = metrics(tmp_path / "two")[0]
    assert row["sampling/sampling_logp_difference/max"] == 0.0  # the old log-probs ARE the sampler's
    assert row["sampling/importance_sampling_ratio/mean"] == 1.0
