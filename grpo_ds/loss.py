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

    A group whose rewards are all equal gets zero advantages: it carries no learning signal.

    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))  # mean 0.5, std 0.5774
    tensor([[ 0.8659, -0.8659, -0.8659,  0.8659]])
    """
    centered_BG = rewards_BG - rewards_BG.mean(dim=1, keepdim=True)
    # A float32 mean of equal values is not always that value (12 x 1.1 is off by ~1e-7), and dividing the residue
    # by a ~1e-7 std would turn "no signal" into a small systematic push; equal groups get exactly zero.
    centered_BG = centered_BG.masked_fill(uniform_groups(rewards_BG).unsqueeze(1), 0.0)
    if scale_rewards == "group":
        return centered_BG / (rewards_BG.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    if scale_rewards == "batch":
        if batch_std is None:
            raise ValueError("scale_rewards='batch' needs batch_std, the std of all rewards of the step")
        return centered_BG / (batch_std + ADVANTAGE_EPS)
    if scale_rewards == "none":
        return centered_BG
    raise ValueError(f"unknown scale_rewards {scale_rewards!r}")


def uniform_groups(rewards_BG: torch.Tensor) -> torch.Tensor:
    """B bools: the groups whose rewards are all equal (zero advantages, no learning signal)."""
    return (rewards_BG == rewards_BG[:, :1]).all(dim=1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference) (Schulman, "Approximating KL divergence", 2020):
    `exp(ref - logp) - (ref - logp) - 1`. Unbiased, always >= 0, and exactly 0 where the two models agree."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


@dataclass(frozen=True)
class BatchTotals:
    """Counts over the whole optimizer step (every micro-batch it accumulates, on every rank)."""

    num_sequences: int
    num_tokens: int  # completion tokens (completion mask == 1)
    num_micro_batches: int  # gradient_accumulation_steps x data-parallel ranks
    max_new_tokens: int  # the dr_grpo constant

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
    if loss_type == "dapo":
        return masked_sum / max(totals.num_tokens, 1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


class GRPOLoss:
    """The PPO-clipped GRPO objective with a k3 KL penalty (DeepSeekMath eq. 3), negated for minimization:

        per_token = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A) + kl_weight * k3

    with `ratio = exp(logp - old_logp)`. On-policy (old = logp.detach()) the ratio is 1 and the gradient is the
    plain policy gradient `-A * grad logp`. Positions where completion_mask is 0 (prompt, padding, anything after
    the first EOS) contribute nothing.
    """

    def __init__(self, clip_eps: float = 0.2, kl_weight: float = 0.01, loss_type: str = "grpo",
                 clip_eps_high: Optional[float] = None):
        self.clip_low = clip_eps
        self.clip_high = clip_eps if clip_eps_high is None else clip_eps_high
        self.kl_weight = kl_weight
        self.loss_type = loss_type

    def __call__(self, logprobs_NC: torch.Tensor, old_logprobs_NC: torch.Tensor,
                 ref_logprobs_NC: Optional[torch.Tensor], advantages_N: torch.Tensor,
                 completion_mask_NC: torch.Tensor, totals: BatchTotals) -> tuple[torch.Tensor, dict]:
        """Returns (loss contribution, metrics). Metrics are sums over this micro-batch's completion tokens, so
        the caller can add them over micro-batches and ranks before dividing by `num_tokens`."""
        mask_NC = completion_mask_NC.to(logprobs_NC.dtype)
        # Zero the inputs outside the mask before any arithmetic: a masked position may hold any value (padding
        # after EOS, trimmed columns), and an inf there would turn 0 * inf into NaN in the forward or backward.
        keep_NC = completion_mask_NC.bool()
        logprobs_NC = torch.where(keep_NC, logprobs_NC, 0.0)
        old_logprobs_NC = torch.where(keep_NC, old_logprobs_NC, 0.0)
        if ref_logprobs_NC is not None:
            ref_logprobs_NC = torch.where(keep_NC, ref_logprobs_NC, 0.0)
        ratio_NC = torch.exp(logprobs_NC - old_logprobs_NC)
        advantages_N1 = advantages_N.to(logprobs_NC.dtype).unsqueeze(1)
        unclipped_NC = ratio_NC * advantages_N1
        clipped_NC = torch.clamp(ratio_NC, 1 - self.clip_low, 1 + self.clip_high) * advantages_N1
        per_token_NC = -torch.min(unclipped_NC, clipped_NC)
        if ref_logprobs_NC is not None and self.kl_weight > 0:
            kl_NC = kl_k3(logprobs_NC, ref_logprobs_NC)
            per_token_NC = per_token_NC + self.kl_weight * kl_NC
        else:
            kl_NC = torch.zeros_like(logprobs_NC)
        loss = aggregate(per_token_NC, completion_mask_NC, self.loss_type, totals)
        with torch.no_grad():
            metrics = {
                "kl_sum": (kl_NC * mask_NC).sum(),
                "clipped_tokens": ((clipped_NC < unclipped_NC).to(mask_NC.dtype) * mask_NC).sum(),
                "num_tokens": mask_NC.sum(),
            }
        return loss, metrics
