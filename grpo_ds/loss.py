"""Advantages, the KL estimator and the GRPO loss with its normalization contract. Pure math: tensors and numbers
in, tensors and a metrics dict out; no deepspeed, no torch.distributed (tests/test_loss.py enforces it).

Shape legend: B prompts, G completions per prompt (group_size), N = B * G completions, C completion positions.

The normalization contract
--------------------------
One optimizer step consumes `num_micro_batches` micro-batches (gradient accumulation x ranks). `GRPOLoss` returns,
for one micro-batch, that micro-batch's *contribution* to the step's objective, so that the contributions of all
micro-batches on all ranks SUM to the loss of the whole step computed in one piece. What each `loss_type` divides by:

- grpo:    per sequence, the mean over its completion tokens; then the mean over the step's sequences
           (the tiny-grpo tutorial, DeepSeekMath eq. 3). Contribution = sum of sequence means / num_sequences.
- bnpo:    per micro-batch, the sum over its tokens / its token count; then the mean over micro-batches
           (TRL's "local batch": the result depends on the micro-batch size, as TRL documents).
- dr_grpo: sum over all tokens / (num_sequences x max_new_tokens), a constant (Dr. GRPO, arXiv:2503.20783).
- dapo:    sum over all tokens / the token count of the whole step, all ranks (DAPO, arXiv:2503.14476).

`BatchTotals` carries those step-wide counts as plain numbers; the trainer computes them before the update (one
all-reduce for the token count) so the loss itself calls no collective. DeepSpeed then divides every micro-batch
loss by its gradient_accumulation_steps and averages gradients over ranks, so the trainer multiplies the
contribution by `num_micro_batches` before `engine.backward` to undo exactly that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

ADVANTAGE_EPS = 1e-4  # as TRL; keeps (r - mean) / std finite for groups whose rewards barely differ


def group_advantages(rewards_BG: torch.Tensor, scale_rewards: str = "group",
                     batch_std: Optional[float] = None) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath, arXiv:2402.03300, section 4.1.2): each completion's reward minus
    its group's mean, divided by a standard deviation (Bessel-corrected, as torch.std and TRL):

    - "group": the group's own std, `(r - mean_g) / (std_g + eps)`;
    - "batch": one std over every reward of the step (`batch_std`, computed over all ranks by the caller), which
      keeps the relative scale of easy and hard prompts (Understanding R1-Zero, arXiv:2503.20783);
    - "none":  `r - mean_g`, no scaling.

    A group whose rewards are all equal gets zero advantages: it carries no learning signal. A NaN reward marks an
    unscorable completion (every reward term returned None, TRL's convention): it is left out of its group's mean
    and std and gets advantage 0, as in TRL.

    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))  # mean 0.5, std 0.5774
    tensor([[ 0.8659, -0.8659, -0.8659,  0.8659]])
    >>> group_advantages(torch.tensor([[1.0, float("nan"), 0.0]]))  # mean 0.5, std 0.7071
    tensor([[ 0.7070,  0.0000, -0.7070]])
    """
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    if scale_rewards == "batch" and batch_std is None:
        raise ValueError("scale_rewards='batch' needs batch_std, the std of all rewards of the step")
    scorable_BG = ~torch.isnan(rewards_BG)
    if scorable_BG.all():
        mean_B1, std_B1 = rewards_BG.mean(dim=1, keepdim=True), rewards_BG.std(dim=1, keepdim=True)
    else:
        count_B1 = scorable_BG.sum(dim=1, keepdim=True)
        mean_B1 = rewards_BG.nan_to_num(0.0).sum(dim=1, keepdim=True) / count_B1.clamp(min=1)
        squares_B1 = ((rewards_BG - mean_B1) ** 2).nan_to_num(0.0).sum(dim=1, keepdim=True)
        std_B1 = (squares_B1 / (count_B1 - 1).clamp(min=1)).sqrt()
    # A float32 mean of equal values is not always that value (12 x 1.1 is off by ~1e-7), and dividing the residue
    # by a ~1e-7 std would turn "no signal" into a small systematic push; equal groups get exactly zero.
    centered_BG = (rewards_BG - mean_B1).masked_fill(uniform_groups(rewards_BG).unsqueeze(1) | ~scorable_BG, 0.0)
    if scale_rewards == "group":
        return centered_BG / (std_B1 + ADVANTAGE_EPS)
    if scale_rewards == "batch":
        return centered_BG / (batch_std + ADVANTAGE_EPS)
    return centered_BG


def uniform_groups(rewards_BG: torch.Tensor) -> torch.Tensor:
    """B bools: the groups whose rewards are all equal (zero advantages, no learning signal), NaN rewards
    (unscorable completions) set aside; a group with fewer than two scorable completions is uniform too."""
    scorable_BG = ~torch.isnan(rewards_BG)
    if scorable_BG.all():
        return (rewards_BG == rewards_BG[:, :1]).all(dim=1)
    high_B = rewards_BG.nan_to_num(-math.inf).amax(dim=1)
    low_B = rewards_BG.nan_to_num(math.inf).amin(dim=1)
    return (high_B == low_B) | (scorable_BG.sum(dim=1) < 2)


SAMPLING_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampling_correction(old_logprobs_NC: torch.Tensor, sampler_logprobs_NC: torch.Tensor,
                        completion_mask_NC: torch.Tensor, mode: str = "sequence_mask",
                        clip_min: Optional[float] = None, clip_max: Optional[float] = 3.0) -> torch.Tensor:
    """Importance weights for the mismatch between the rollout engine's sampling distribution and the trainer's
    (TRL's vllm_importance_sampling_correction; "Your efficient RL framework secretly brings you off-policy RL",
    Yao et al. 2025): ratio = exp(old - sampler) per token ("token_*", N x C) or exp of its sum over the sequence
    ("sequence_*", N x 1); "*_truncate" clamps it to [clip_min, clip_max], "*_mask" sets it to 0 outside. Masked
    positions count as a ratio of 1.

    >>> old, sampler, mask = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -2.0]]), torch.ones(1, 2)
    >>> sampling_correction(old, sampler, mask, "token_truncate", clip_max=2.0)  # exp(1) = 2.72 -> 2
    tensor([[2., 1.]])
    >>> sampling_correction(old, sampler, mask, "sequence_mask", clip_max=2.0)  # exp(1) > 2: masked out
    tensor([[0.]])
    """
    if mode not in SAMPLING_CORRECTION_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}")
    diff_NC = torch.nan_to_num((old_logprobs_NC - sampler_logprobs_NC) * completion_mask_NC, nan=0.0)
    ratio = torch.exp(diff_NC.sum(dim=1, keepdim=True) if mode.startswith("sequence") else diff_NC)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(policy || reference) from the sampled token's log-probs (Schulman, "Approximating
    KL divergence", 2020), with log r = ref - logp:

    - k1: `-log r`, unbiased, high variance, can be negative for a token;
    - k2: `(log r)^2 / 2`, biased, low variance, >= 0;
    - k3: `r - 1 - log r`, unbiased, low variance, >= 0, exactly 0 where the models agree (GRPO's, TRL's).

    >>> [round(float(kl_estimate(torch.tensor(0.0), torch.tensor(-1.0), e)), 4) for e in KL_ESTIMATORS]
    [1.0, 0.5, 0.3679]
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown kl_estimator {estimator!r}")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k3 estimator (see kl_estimate): `exp(ref - logp) - (ref - logp) - 1`."""
    return kl_estimate(logprobs, ref_logprobs, "k3")


def entropy_threshold(entropies_NC: torch.Tensor, mask_NC: torch.Tensor, top_entropy_quantile: float) -> float:
    """The entropy above which a token is among the top `top_entropy_quantile` of these tokens (TRL's
    get_high_entropy_mask on one process: the (1 - q) quantile of the masked entropies). The trainer computes it
    over every rank's tokens of the micro-batch and passes it in BatchTotals.

    >>> entropy_threshold(torch.tensor([[0.1, 0.5, 0.9, 7.0]]), torch.tensor([[1, 1, 1, 0]]), 0.5)
    0.5
    """
    values = entropies_NC[mask_NC.bool()].float()
    if values.numel() == 0:
        return float("inf")
    return float(torch.quantile(values, 1 - top_entropy_quantile))


@dataclass(frozen=True)
class BatchTotals:
    """Counts over the whole optimizer step (every micro-batch it accumulates, on every rank)."""

    num_sequences: int
    num_tokens: int  # completion tokens (completion mask == 1)
    num_micro_batches: int  # gradient_accumulation_steps x data-parallel ranks
    max_new_tokens: int  # the dr_grpo constant
    entropy_threshold: Optional[float] = None  # top_entropy_quantile's cut over every rank's micro-batch tokens

    @classmethod
    def single(cls, completion_mask_NC: torch.Tensor, max_new_tokens: int) -> "BatchTotals":
        """The totals when the given batch is the whole step (one micro-batch, one rank)."""
        return cls(completion_mask_NC.shape[0], int(completion_mask_NC.sum()), 1, max_new_tokens)


def aggregate(per_token_NC: torch.Tensor, mask_NC: torch.Tensor, loss_type: str,
              totals: BatchTotals) -> torch.Tensor:
    """This micro-batch's contribution to the step's loss under `loss_type` (see the module docstring)."""
    mask_NC = mask_NC.to(per_token_NC.dtype)
    masked_sum = (per_token_NC * mask_NC).sum()
    if loss_type == "grpo":
        per_sequence_N = (per_token_NC * mask_NC).sum(dim=1) / mask_NC.sum(dim=1).clamp(min=1)
        return per_sequence_N.sum() / totals.num_sequences
    if loss_type == "bnpo":
        return masked_sum / mask_NC.sum().clamp(min=1) / totals.num_micro_batches
    if loss_type == "dr_grpo":
        return masked_sum / (totals.num_sequences * totals.max_new_tokens)
    if loss_type in ("dapo", "cispo"):
        return masked_sum / max(totals.num_tokens, 1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


class GRPOLoss:
    """The PPO-clipped GRPO objective with a KL penalty (DeepSeekMath eq. 3), negated for minimization, and the
    variants peers offer, each as TRL 1.16's GRPOTrainer computes it (tests/test_trl_equality.py):

        per_token = -min(w * A, clip(w, 1 - clip_eps, 1 + clip_eps_high) * A) + kl_weight * KL

    - `w`, the importance weight: `exp(logp - old_logp)` per token (importance_sampling_level "token"), or one per
      sequence, `exp(mean over its tokens of logp - old_logp)`, clipped per sequence (GSPO, arXiv:2507.18071);
    - `delta`: two-sided clipping, the unclipped `w` capped at delta too, so a negative advantage cannot make a
      token's loss grow without bound (TRL's delta);
    - loss_type "cispo" (MiniMax-M1, arXiv:2506.13585): `-min(w, clip_eps_high).detach() * A * logp`, a clipped,
      detached importance weight on a REINFORCE term, so clipped tokens still pass a gradient; aggregated as dapo;
    - `top_entropy_quantile` q < 1: only the tokens whose policy entropy is in the top q of the micro-batch's tokens
      (over all ranks) carry the policy term (Beyond the 80/20 rule, arXiv:2506.01939); the KL term keeps all;
    - `kl_estimator`: k1, k2 or k3 (kl_estimate).

    On-policy (old = logp.detach()) the ratio is 1 and the gradient is the plain policy gradient `-A * grad logp`.
    Positions where completion_mask is 0 (prompt, padding, anything after the first EOS) contribute nothing.
    """

    def __init__(self, clip_eps: float = 0.2, kl_weight: float = 0.01, loss_type: str = "grpo",
                 clip_eps_high: Optional[float] = None, *, importance_sampling_level: str = "token",
                 delta: Optional[float] = None, top_entropy_quantile: float = 1.0, kl_estimator: str = "k3"):
        if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}")
        self.clip_low = clip_eps
        self.clip_high = clip_eps if clip_eps_high is None else clip_eps_high
        self.kl_weight = kl_weight
        self.loss_type = loss_type
        self.importance_sampling_level = importance_sampling_level
        self.delta = delta
        self.top_entropy_quantile = top_entropy_quantile
        self.kl_estimator = kl_estimator

    def __call__(self, logprobs_NC: torch.Tensor, old_logprobs_NC: torch.Tensor,
                 ref_logprobs_NC: Optional[torch.Tensor], advantages_N: torch.Tensor,
                 completion_mask_NC: torch.Tensor, totals: BatchTotals,
                 entropies_NC: Optional[torch.Tensor] = None,
                 sampling_weights_NC: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """Returns (loss contribution, metrics). Metrics are sums over this micro-batch's completion tokens, so
        the caller can add them over micro-batches and ranks before dividing by `num_tokens`; `kl_sum` is the
        policy's KL to the reference whenever `ref_logprobs_NC` is given, even when kl_weight is 0.
        `sampling_weights_NC` (N x C or N x 1, from sampling_correction) multiplies each token's policy loss, after
        the entropy mask and before the KL term, as TRL applies its vLLM importance-sampling correction."""
        mask_NC = completion_mask_NC.to(logprobs_NC.dtype)
        # Zero the inputs outside the mask before any arithmetic: a masked position may hold any value (padding
        # after EOS, trimmed columns), and an inf there would turn 0 * inf into NaN in the forward or backward.
        keep_NC = completion_mask_NC.bool()
        logprobs_NC = torch.where(keep_NC, logprobs_NC, 0.0)
        old_logprobs_NC = torch.where(keep_NC, old_logprobs_NC, 0.0)
        if ref_logprobs_NC is not None:
            ref_logprobs_NC = torch.where(keep_NC, ref_logprobs_NC, 0.0)
        log_ratio_NC = logprobs_NC - old_logprobs_NC
        if self.importance_sampling_level == "sequence":  # one weight per sequence, broadcast over its tokens
            log_weight = ((log_ratio_NC * mask_NC).sum(dim=1) / mask_NC.sum(dim=1).clamp(min=1.0)).unsqueeze(1)
        else:
            log_weight = log_ratio_NC
        weight = torch.exp(log_weight)  # N x C, or N x 1 at the sequence level
        advantages_N1 = advantages_N.to(logprobs_NC.dtype).unsqueeze(1)
        if self.loss_type == "cispo":
            per_token = -torch.clamp(weight, max=self.clip_high).detach() * advantages_N1 * logprobs_NC
            clipped = (weight > self.clip_high) & (advantages_N1 > 0)
        else:
            clipped_weight = torch.clamp(weight, 1 - self.clip_low, 1 + self.clip_high)
            unclipped_weight = weight if self.delta is None else torch.clamp(weight, max=self.delta)
            unclipped, clipped_term = unclipped_weight * advantages_N1, clipped_weight * advantages_N1
            per_token = -torch.min(unclipped, clipped_term)
            clipped = clipped_term < unclipped
        if self.top_entropy_quantile < 1.0:
            if entropies_NC is None:
                raise ValueError("top_entropy_quantile < 1 needs the tokens' entropies")
            threshold = (totals.entropy_threshold if totals.entropy_threshold is not None
                         else entropy_threshold(entropies_NC, completion_mask_NC, self.top_entropy_quantile))
            high_entropy_NC = ((entropies_NC * mask_NC) >= threshold) & keep_NC
            per_token = per_token * high_entropy_NC
        if sampling_weights_NC is not None:
            per_token = per_token * sampling_weights_NC.to(per_token.dtype)
        per_token_NC = per_token.expand_as(logprobs_NC) if per_token.shape != logprobs_NC.shape else per_token
        if ref_logprobs_NC is not None:
            # Measured whenever the reference is given, also with kl_weight 0 (--kl_in_reward puts the penalty in
            # the rewards): the logged KL is the policy's distance from the reference, not the loss term's size.
            kl_NC = kl_estimate(logprobs_NC, ref_logprobs_NC, self.kl_estimator)
            if self.kl_weight > 0:
                per_token_NC = per_token_NC + self.kl_weight * kl_NC
        else:
            kl_NC = torch.zeros_like(logprobs_NC)
        loss = aggregate(per_token_NC, completion_mask_NC, self.loss_type, totals)
        with torch.no_grad():
            metrics = {
                "kl_sum": (kl_NC * mask_NC).sum(),
                "clipped_tokens": (clipped.expand_as(mask_NC).to(mask_NC.dtype) * mask_NC).sum(),
                "num_tokens": mask_NC.sum(),
            }
            if entropies_NC is not None:
                metrics["entropy_sum"] = (entropies_NC.to(mask_NC.dtype) * mask_NC).sum()
        return loss, metrics
