"""Tests for grpo_ds.loss: advantages, the KL estimators, GRPOLoss for every loss_type and the normalization
contract (micro-batch contributions sum to the whole step's loss and gradient).

Every expected number is worked out by hand in the comments; the code under test is never used to produce one.
"""

import math

import pytest
import torch

from grpo_ds.loss import BatchTotals, GRPOLoss, entropy_threshold, group_advantages, kl_estimate, kl_k3

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# ----------------------------------------------------------------------------- group_advantages


def test_group_advantages_group_hand_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0],
                            [0.0, 0.0, 4.0]])
    # group 0: mean 2, deviations (-1, 0, 1), Bessel var (1 + 0 + 1) / 2 = 1, std 1
    #   -> (-1, 0, 1) / (1 + 1e-4) = (-0.99990001, 0, 0.99990001)
    # group 1: mean 4/3, deviations (-4/3, -4/3, 8/3), var (16/9 + 16/9 + 64/9) / 2 = 16/3, std 4/sqrt(3) = 2.3094011
    #   -> (-4/3, -4/3, 8/3) / 2.3095011 = (-0.5773253, -0.5773253, 1.1546506)
    expected = torch.tensor([[-1 / 1.0001, 0.0, 1 / 1.0001],
                             [-0.5773253, -0.5773253, 1.1546506]])
    out = group_advantages(rewards, "group")
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_group_advantages_docstring_example():
    # mean 0.5, deviations +-0.5, Bessel var 4 * 0.25 / 3 = 1/3, std 0.5773503 -> 0.5 / 0.5774503 = 0.8658756
    out = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.8658756, -0.8658756, -0.8658756, 0.8658756]]), atol=1e-6,
                               rtol=0)


def test_group_advantages_batch_uses_given_std():
    rewards = torch.tensor([[1.0, 0.0],
                            [3.0, 1.0]])
    # group means 0.5 and 2 -> deviations (0.5, -0.5) and (1, -1); every group divided by the same 2 + 1e-4
    expected = torch.tensor([[0.5 / 2.0001, -0.5 / 2.0001],
                             [1 / 2.0001, -1 / 2.0001]])
    torch.testing.assert_close(group_advantages(rewards, "batch", batch_std=2.0), expected, atol=1e-7, rtol=0)
    # the two groups keep their relative scale (group 1's spread is twice group 0's), unlike "group" scaling
    out = group_advantages(rewards, "batch", batch_std=2.0)
    assert torch.allclose(out[1], 2 * out[0])


def test_group_advantages_batch_needs_std():
    with pytest.raises(ValueError, match="batch_std"):
        group_advantages(torch.ones(2, 3), "batch")


def test_group_advantages_none_is_centered_only():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 3.0],
                            [2.0, 2.0, 5.0, 3.0]])
    # means 1 and 3 -> r - mean, no scaling
    expected = torch.tensor([[0.0, -1.0, -1.0, 2.0],
                             [-1.0, -1.0, 2.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards, "none"), expected, atol=0, rtol=0)


def test_group_advantages_unknown_mode():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.ones(1, 2), "rank")


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_group_advantages_shape_preserved(mode):
    rewards = torch.arange(15, dtype=torch.float32).view(3, 5) % 4
    out = group_advantages(rewards, mode, batch_std=1.5)
    assert out.shape == (3, 5)
    # every group's advantages are centered
    torch.testing.assert_close(out.sum(dim=1), torch.zeros(3), atol=1e-5, rtol=0)


# The rewards a group saturates at: the math reward pays 1.1 (correct + format), 0.1 (format only) or 0; the seed
# reward 1, 0.5, 0.01 or 0. group_size 12 is the default. The docstring promises exactly zero advantages.
@pytest.mark.parametrize("mode", ["group", "batch", "none"])
@pytest.mark.parametrize("value", [0.0, 0.5, 1.0, 0.01, 0.1, 1.1])
def test_group_advantages_identical_rewards_exactly_zero(value, mode):
    rewards = torch.tensor([[value] * 12, [1.0, 0.0] * 6])
    out = group_advantages(rewards, mode, batch_std=0.5)
    assert out.shape == (2, 12)
    assert torch.equal(out[0], torch.zeros(12)), out[0]
    assert (out[1] != 0).all()


# ----------------------------------------------------------------------------- kl_k3


def test_kl_k3_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-2.0, -1.0, -0.5])
    # log_ratio = ref - logp = (-1, 1, 0):
    #   exp(-1) - (-1) - 1 = 0.3678794;  exp(1) - 1 - 1 = 0.7182818;  exp(0) - 0 - 1 = 0
    expected = torch.tensor([0.3678794, 0.7182818, 0.0])
    torch.testing.assert_close(kl_k3(logp, ref), expected, atol=1e-6, rtol=0)


def test_kl_k3_zero_when_policy_equals_reference():
    logp = -torch.rand(4, 7) * 10
    assert torch.equal(kl_k3(logp, logp.clone()), torch.zeros(4, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_k3_non_negative_on_random_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(2000, generator=g, dtype=dtype) * 3
    ref = torch.randn(2000, generator=g, dtype=dtype) * 3
    kl = kl_k3(logp, ref)
    assert (kl >= 0).all()
    assert (kl > 0).any()


# ----------------------------------------------------------------------------- GRPOLoss on a 2 x 3 example

# old log-probs -1 everywhere; the ratios exp(logp - old) are chosen by hand:
#   row 0 (A = +1):   1.0, 1.5, 0.5
#   row 1 (A = -0.5): 1.1, 0.7, [0.1: masked]
# with clip_eps 0.2 the clipped ratios are clamp(r, 0.8, 1.2):
#   row 0: r*A = (1, 1.5, 0.5), clip*A = (1, 1.2, 0.8), min = (1, 1.2, 0.5) -> per-token loss (-1, -1.2, -0.5)
#          token 1 is clipped (1.2 < 1.5): no gradient
#   row 1: r*A = (-0.55, -0.35), clip*A = (-0.55, -0.4), min = (-0.55, -0.4) -> per-token loss (0.55, 0.4)
#          token 1 is clipped (-0.4 < -0.35): no gradient
#   the masked token would be clipped too (clip*A = -0.4 < r*A = -0.05) but must not be counted
# per-token gradient d/dlogp of -r*A (unclipped tokens only) = -r*A:
#   row 0: (-1, 0, -0.5), row 1: (0.55, 0, 0)
# sums: row 0 -2.7 over 3 tokens, row 1 0.95 over 2 tokens; all tokens -1.75 over 5
RATIOS = [[1.0, 1.5, 0.5], [1.1, 0.7, 0.1]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -0.5]
MAX_NEW = 4


def example(requires_grad=True):
    old = torch.full((2, 3), -1.0)
    logp = (old + torch.log(torch.tensor(RATIOS))).clone().requires_grad_(requires_grad)
    return logp, old, torch.tensor(ADV), torch.tensor(MASK)


# (loss_type, totals, expected loss, expected gradient)
HAND_CASES = [
    # the batch is the whole step: num_sequences 2, num_tokens 5, one micro-batch
    ("grpo", BatchTotals(2, 5, 1, MAX_NEW),
     # (-2.7 / 3 + 0.95 / 2) / 2 = (-0.9 + 0.475) / 2; weights 1 / (3 * 2) and 1 / (2 * 2)
     -0.2125, [[-1 / 6, 0.0, -0.5 / 6], [0.55 / 4, 0.0, 0.0]]),
    ("bnpo", BatchTotals(2, 5, 1, MAX_NEW),
     # -1.75 / 5 / 1; weight 1 / 5
     -0.35, [[-0.2, 0.0, -0.1], [0.11, 0.0, 0.0]]),
    ("dr_grpo", BatchTotals(2, 5, 1, MAX_NEW),
     # -1.75 / (2 * 4); weight 1 / 8
     -0.21875, [[-0.125, 0.0, -0.0625], [0.06875, 0.0, 0.0]]),
    ("dapo", BatchTotals(2, 5, 1, MAX_NEW),
     # -1.75 / 5; weight 1 / 5
     -0.35, [[-0.2, 0.0, -0.1], [0.11, 0.0, 0.0]]),
    # the batch is one of two micro-batches of a step with 4 sequences and 7 tokens (the other has 2)
    ("grpo", BatchTotals(4, 7, 2, MAX_NEW),
     # (-0.9 + 0.475) / 4; weights 1 / (3 * 4), 1 / (2 * 4)
     -0.10625, [[-1 / 12, 0.0, -0.5 / 12], [0.55 / 8, 0.0, 0.0]]),
    ("bnpo", BatchTotals(4, 7, 2, MAX_NEW),
     # -1.75 / 5 / 2; weight 1 / 10
     -0.175, [[-0.1, 0.0, -0.05], [0.055, 0.0, 0.0]]),
    ("dr_grpo", BatchTotals(4, 7, 2, MAX_NEW),
     # -1.75 / (4 * 4); weight 1 / 16
     -0.109375, [[-1 / 16, 0.0, -0.5 / 16], [0.55 / 16, 0.0, 0.0]]),
    ("dapo", BatchTotals(4, 7, 2, MAX_NEW),
     # -1.75 / 7; weight 1 / 7
     -0.25, [[-1 / 7, 0.0, -0.5 / 7], [0.55 / 7, 0.0, 0.0]]),
]


@pytest.mark.parametrize("loss_type,totals,expected_loss,expected_grad", HAND_CASES)
def test_grpo_loss_hand_example(loss_type, totals, expected_loss, expected_grad):
    logp, old, adv, mask = example()
    loss, metrics = GRPOLoss(clip_eps=0.2, kl_weight=0.0, loss_type=loss_type)(logp, old, None, adv, mask, totals)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor(expected_grad), atol=1e-6, rtol=0)
    # two clipped tokens (row 0 token 1, row 1 token 1); the masked one is not counted
    assert metrics["clipped_tokens"].item() == 2
    assert metrics["num_tokens"].item() == 5
    assert metrics["kl_sum"].item() == 0


def test_batch_totals_single():
    mask = torch.tensor(MASK)
    assert BatchTotals.single(mask, 7) == BatchTotals(num_sequences=2, num_tokens=5, num_micro_batches=1,
                                                      max_new_tokens=7)


def test_unknown_loss_type():
    logp, old, adv, mask = example()
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLoss(loss_type="ppo")(logp, old, None, adv, mask, BatchTotals.single(mask, MAX_NEW))


# garbage written at the masked position (row 1, token 2) of the policy, old and reference log-probs
GARBAGE = {
    "moderate": (3.0, -7.0, 5.0),
    "large": (1e4, -1e4, 1e4),  # exp() of these overflows: masking must not let inf * 0 = nan through
    # what the trainer can really feed: _logprobs_by_micro_batch zero-fills the reference columns trimmed from a
    # micro-batch, while the policy's log-prob of a pad token after the EOS can be very low (-100): exp(0 + 100)
    "zero_filled_ref": (-100.0, -100.0, 0.0),
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_positions_contribute_nothing(loss_type, garbage):
    logp, old, adv, mask = example(requires_grad=False)
    ref = logp + torch.tensor([[0.0, -1.0, 1.0], [math.log(2), 0.0, 0.0]])
    loss_fn = GRPOLoss(clip_eps=0.2, kl_weight=0.1, loss_type=loss_type)
    totals = BatchTotals.single(mask, MAX_NEW)

    clean = logp.clone().requires_grad_(True)
    loss_clean, m_clean = loss_fn(clean, old, ref, adv, mask, totals)
    (grad_clean,) = torch.autograd.grad(loss_clean, clean)

    g_logp, g_old, g_ref = GARBAGE[garbage]
    dirty = logp.clone()
    dirty[1, 2] = g_logp
    dirty.requires_grad_(True)
    old_dirty, ref_dirty = old.clone(), ref.clone()
    old_dirty[1, 2], ref_dirty[1, 2] = g_old, g_ref
    loss_dirty, m_dirty = loss_fn(dirty, old_dirty, ref_dirty, adv, mask, totals)
    (grad_dirty,) = torch.autograd.grad(loss_dirty, dirty)

    assert torch.isfinite(loss_dirty), loss_dirty
    assert loss_dirty.item() == pytest.approx(loss_clean.item(), abs=1e-7)
    assert torch.equal(grad_dirty[1, 2], torch.tensor(0.0)), grad_dirty
    torch.testing.assert_close(grad_dirty, grad_clean, atol=1e-7, rtol=0)
    for key in ("kl_sum", "clipped_tokens", "num_tokens"):
        assert m_dirty[key].item() == pytest.approx(m_clean[key].item(), abs=1e-6), key


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_gradient_is_plain_policy_gradient(loss_type):
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 4, generator=g) * 5).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 1],
                         [1, 0, 0, 0],
                         [1, 1, 0, 0]])
    # 4 + 1 + 2 = 7 tokens, 3 sequences, max_new_tokens 5; ratio exp(0) = 1, nothing clipped, per token -A
    totals = BatchTotals.single(mask, 5)
    weight = {
        "grpo": torch.tensor([[1 / (4 * 3)], [1 / (1 * 3)], [1 / (2 * 3)]]),  # 1 / (len_i * N)
        "bnpo": torch.full((3, 1), 1 / 7),  # 1 / tokens of the micro-batch
        "dr_grpo": torch.full((3, 1), 1 / (3 * 5)),  # 1 / (N * max_new_tokens)
        "dapo": torch.full((3, 1), 1 / 7),  # 1 / tokens of the step
    }[loss_type]
    expected_grad = -adv.unsqueeze(1) * mask * weight
    # loss: grpo -(1 * 4/4 - 2 * 1/1 + 0.5 * 2/2) / 3 = 0.5/3; the others -(4 - 2 + 1) * weight = -3 * weight
    expected_loss = {"grpo": 0.5 / 3, "bnpo": -3 / 7, "dr_grpo": -3 / 15, "dapo": -3 / 7}[loss_type]
    loss, metrics = GRPOLoss(clip_eps=0.2, kl_weight=0.0, loss_type=loss_type)(
        logp, logp.detach(), None, adv, mask, totals)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=0)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert metrics["clipped_tokens"].item() == 0


# ratios (A = +1 row 0; A = -1 row 1), all tokens real, dapo over the 4 tokens (weight 1/4):
#   row 0: r = 1.25, 1.0   row 1: r = 0.75, 1.5
CLIP_RATIOS = [[1.25, 1.0], [0.75, 1.5]]


@pytest.mark.parametrize("clip_eps_high,expected_loss,expected_grad,expected_clipped", [
    # symmetric [0.8, 1.2]:
    #   1.25 * +1: clip 1.2 < 1.25 -> clipped, loss -1.2, grad 0
    #   1.0  * +1: loss -1, grad -1
    #   0.75 * -1: r*A = -0.75, clip*A = -0.8 -> clipped, loss 0.8, grad 0
    #   1.5  * -1: r*A = -1.5 < clip*A = -1.2 -> NOT clipped (the pessimistic min), loss 1.5, grad +1.5
    #   loss (-1.2 - 1 + 0.8 + 1.5) / 4 = 0.025
    (None, 0.025, [[0.0, -0.25], [0.0, 0.375]], 2),
    # clip-higher [0.8, 1.28]: 1.25 is inside now -> loss -1.25, grad -1.25; the lower bound is unchanged
    #   loss (-1.25 - 1 + 0.8 + 1.5) / 4 = 0.0125
    (0.28, 0.0125, [[-0.3125, -0.25], [0.0, 0.375]], 1),
])
def test_clipping(clip_eps_high, expected_loss, expected_grad, expected_clipped):
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor(CLIP_RATIOS)).requires_grad_(True)
    mask = torch.ones(2, 2, dtype=torch.long)
    loss_fn = GRPOLoss(clip_eps=0.2, kl_weight=0.0, loss_type="dapo", clip_eps_high=clip_eps_high)
    loss, metrics = loss_fn(logp, old, None, torch.tensor([1.0, -1.0]), mask, BatchTotals.single(mask, 2))
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor(expected_grad), atol=1e-6, rtol=0)
    assert metrics["clipped_tokens"].item() == expected_clipped


# KL on the 2 x 3 example with kl_weight 0.1 and ref - logp = [[0, -1, 1], [ln 2, 0, (masked)]]:
#   k3 = exp(d) - d - 1: row 0 (0, exp(-1) = 0.3678794, e - 2 = 0.7182818), row 1 (2 - ln 2 - 1 = 0.3068528, 0)
#   kl_sum over the 5 tokens = 1.3930140; row sums 1.0861612 and 0.3068528
#   d k3 / d logp = 1 - exp(d): row 0 (0, 1 - exp(-1), 1 - e), row 1 (1 - 2, 0)
KL_SUM = math.exp(-1) + (math.e - 2) + (1 - math.log(2))


@pytest.mark.parametrize("loss_type,expected_loss", [
    # (-1.75 + 0.1 * 1.393014) / 5
    ("dapo", (-1.75 + 0.1 * KL_SUM) / 5),
    ("bnpo", (-1.75 + 0.1 * KL_SUM) / 5),
    # (-1.75 + 0.1 * 1.393014) / (2 * 4)
    ("dr_grpo", (-1.75 + 0.1 * KL_SUM) / 8),
    # ((-2.7 + 0.1 * 1.0861612) / 3 + (0.95 + 0.1 * 0.3068528) / 2) / 2
    ("grpo", ((-2.7 + 0.1 * (math.exp(-1) + math.e - 2)) / 3 + (0.95 + 0.1 * (1 - math.log(2))) / 2) / 2),
])
def test_kl_term(loss_type, expected_loss):
    logp, old, adv, mask = example()
    ref = logp.detach() + torch.tensor([[0.0, -1.0, 1.0], [math.log(2), 0.0, 3.0]])
    loss, metrics = GRPOLoss(clip_eps=0.2, kl_weight=0.1, loss_type=loss_type)(
        logp, old, ref, adv, mask, BatchTotals.single(mask, MAX_NEW))
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert metrics["kl_sum"].item() == pytest.approx(KL_SUM, abs=1e-6)
    assert metrics["num_tokens"].item() == 5
    if loss_type == "dapo":
        (grad,) = torch.autograd.grad(loss, logp)
        policy = torch.tensor([[-1.0, 0.0, -0.5], [0.55, 0.0, 0.0]])
        kl = torch.tensor([[0.0, 1 - math.exp(-1), 1 - math.e], [1 - 2.0, 0.0, 0.0]])
        torch.testing.assert_close(grad, (policy + 0.1 * kl) / 5, atol=1e-6, rtol=0)


def test_kl_term_skipped_without_reference_or_weight():
    logp, old, adv, mask = example(requires_grad=False)
    ref = logp + 1.0  # k3 = e - 2 per token, would change the loss if used
    totals = BatchTotals.single(mask, MAX_NEW)
    base, _ = GRPOLoss(kl_weight=0.0, loss_type="dapo")(logp, old, None, adv, mask, totals)
    no_ref, m1 = GRPOLoss(kl_weight=0.1, loss_type="dapo")(logp, old, None, adv, mask, totals)
    no_weight, m2 = GRPOLoss(kl_weight=0.0, loss_type="dapo")(logp, old, ref, adv, mask, totals)
    with_kl, m3 = GRPOLoss(kl_weight=0.1, loss_type="dapo")(logp, old, ref, adv, mask, totals)
    assert base.item() == pytest.approx(-0.35, abs=1e-6)
    assert no_ref.item() == pytest.approx(-0.35, abs=1e-6) and m1["kl_sum"].item() == 0
    # weight 0 keeps KL out of the loss, yet the KL is still measured (5 tokens x (e - 2), as below)
    assert no_weight.item() == pytest.approx(-0.35, abs=1e-6)
    assert m2["kl_sum"].item() == pytest.approx(5 * (math.e - 2), abs=1e-5)
    # 5 tokens x (e - 2) = 3.5914091; loss (-1.75 + 0.35914091) / 5
    assert m3["kl_sum"].item() == pytest.approx(5 * (math.e - 2), abs=1e-5)
    assert with_kl.item() == pytest.approx((-1.75 + 0.1 * 5 * (math.e - 2)) / 5, abs=1e-6)


# ----------------------------------------------------------------------------- the normalization contract

LENGTHS = [5, 1, 3, 2, 4, 5, 1, 2]  # completion tokens of the 8 sequences; 23 in all
C, MAX_NEW_TOKENS = 5, 6
CLIP, KL_WEIGHT = 0.2, 0.05


def step_batch():
    g = torch.Generator().manual_seed(7)
    n = len(LENGTHS)
    mask = (torch.arange(C).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    logp = -torch.rand(n, C, generator=g) * 4
    old = logp + 0.3 * torch.randn(n, C, generator=g)  # off-policy: some ratios leave [0.8, 1.2]
    ref = logp + 0.5 * torch.randn(n, C, generator=g)
    adv = torch.randn(n, generator=g)
    return logp, old, ref, adv, mask


def reference_per_token(logp, old, ref, adv):
    """The per-token objective written out independently: -min(r A, clip(r) A) + beta k3."""
    r = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    return -torch.minimum(r * a, torch.clamp(r, 1 - CLIP, 1 + CLIP) * a) + KL_WEIGHT * k3


def micro_batch_contributions(loss_type, leaf, old, ref, adv, mask):
    """The step cut as 2 ranks x 2 micro-batches of 2 rows, each trimmed to its own completion width, as
    Experience.select does. Returns the 4 contributions (graphs attached to `leaf`)."""
    totals = BatchTotals(num_sequences=8, num_tokens=int(mask.sum()), num_micro_batches=4,
                         max_new_tokens=MAX_NEW_TOKENS)
    loss_fn = GRPOLoss(clip_eps=CLIP, kl_weight=KL_WEIGHT, loss_type=loss_type)
    out = []
    for start in range(0, 8, 2):
        rows = slice(start, start + 2)
        width = int(mask[rows].sum(dim=1).max())
        loss, _ = loss_fn(leaf[rows, :width], old[rows, :width], ref[rows, :width], adv[rows], mask[rows, :width],
                          totals)
        out.append(loss)
    return out


def test_step_batch_is_not_degenerate():
    logp, old, ref, adv, mask = step_batch()
    assert mask.sum().item() == 23
    r = torch.exp(logp - old)[mask.bool()]
    assert ((r > 1 + CLIP) | (r < 1 - CLIP)).any() and ((r > 1 - CLIP) & (r < 1 + CLIP)).any()


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo"])
def test_micro_batch_contributions_sum_to_whole_batch(loss_type):
    logp, old, ref, adv, mask = step_batch()
    loss_fn = GRPOLoss(clip_eps=CLIP, kl_weight=KL_WEIGHT, loss_type=loss_type)

    whole_leaf = logp.clone().requires_grad_(True)
    whole, _ = loss_fn(whole_leaf, old, ref, adv, mask, BatchTotals.single(mask, MAX_NEW_TOKENS))
    (whole_grad,) = torch.autograd.grad(whole, whole_leaf)

    # anchor the whole-batch value on the independent formula
    per_token = reference_per_token(logp, old, ref, adv) * mask
    expected = {"dapo": per_token.sum() / 23,
                "dr_grpo": per_token.sum() / (8 * MAX_NEW_TOKENS),
                "grpo": (per_token.sum(dim=1) / mask.sum(dim=1)).mean()}[loss_type]
    assert whole.item() == pytest.approx(expected.item(), abs=1e-6)

    leaf = logp.clone().requires_grad_(True)
    parts = micro_batch_contributions(loss_type, leaf, old, ref, adv, mask)
    grads = [torch.autograd.grad(p, leaf)[0] for p in parts]
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), abs=1e-6)
    torch.testing.assert_close(sum(grads), whole_grad, atol=1e-6, rtol=0)


def test_bnpo_is_mean_of_micro_batch_token_means():
    logp, old, ref, adv, mask = step_batch()
    leaf = logp.clone().requires_grad_(True)
    parts = micro_batch_contributions("bnpo", leaf, old, ref, adv, mask)
    per_token = reference_per_token(logp, old, ref, adv) * mask
    # token counts per micro-batch: 5+1 = 6, 3+2 = 5, 4+5 = 9, 1+2 = 3
    means = [per_token[i:i + 2].sum() / mask[i:i + 2].sum() for i in range(0, 8, 2)]
    assert [int(mask[i:i + 2].sum()) for i in range(0, 8, 2)] == [6, 5, 9, 3]
    expected = sum(means) / 4
    total = sum(p.item() for p in parts)
    assert total == pytest.approx(expected.item(), abs=1e-6)
    # with unequal micro-batch lengths this is not the whole batch's token mean (TRL's documented bnpo behaviour)
    whole_token_mean = per_token.sum() / mask.sum()
    assert abs(total - whole_token_mean.item()) > 1e-3


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_deepspeed_scaling_recovers_whole_batch_gradient(loss_type):
    """DeepSpeed divides each micro-batch loss by gradient_accumulation_steps (2) and averages over ranks (2); the
    trainer multiplies each contribution by num_micro_batches (4) first, so the result is the plain sum."""
    logp, old, ref, adv, mask = step_batch()
    leaf = logp.clone().requires_grad_(True)
    parts = micro_batch_contributions(loss_type, leaf, old, ref, adv, mask)
    accumulation, ranks, num_micro_batches = 2, 2, 4
    rank_grads = []
    for rank in range(ranks):
        accumulated = torch.zeros_like(logp)
        for part in parts[rank * accumulation:(rank + 1) * accumulation]:
            accumulated += torch.autograd.grad(part * num_micro_batches / accumulation, leaf, retain_graph=True)[0]
        rank_grads.append(accumulated)
    deepspeed_grad = sum(rank_grads) / ranks

    # the target: the gradient of the whole step's objective, written out independently of GRPOLoss
    target_leaf = logp.clone().requires_grad_(True)
    per_token = reference_per_token(target_leaf, old, ref, adv) * mask
    objective = {"dapo": lambda: per_token.sum() / 23,
                 "dr_grpo": lambda: per_token.sum() / (8 * MAX_NEW_TOKENS),
                 "grpo": lambda: (per_token.sum(dim=1) / mask.sum(dim=1)).mean(),
                 # the mean of the 4 micro-batches' token means (rows 0-1, 2-3, 4-5, 6-7)
                 "bnpo": lambda: sum(per_token[i:i + 2].sum() / mask[i:i + 2].sum() for i in range(0, 8, 2)) / 4,
                 }[loss_type]()
    (target,) = torch.autograd.grad(objective, target_leaf)
    torch.testing.assert_close(deepspeed_grad, target, atol=1e-6, rtol=0)
    assert deepspeed_grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the toolbox: GSPO, CISPO, delta,
# top-entropy masking, KL estimators (each also equals TRL's own: tests/test_trl_equality.py)


def one_row(logp, old, ref=None, advantage=1.0):
    leaf = torch.tensor([logp], requires_grad=True)
    mask = torch.ones(1, len(logp))
    ref_t = None if ref is None else torch.tensor([ref])
    return leaf, torch.tensor([old]), ref_t, torch.tensor([advantage]), mask


def test_gspo_one_ratio_per_sequence():
    leaf, old, _, adv, mask = one_row([-1.0, -2.0], [-1.5, -1.6])
    # token log-ratios 0.5 and -0.4, mean 0.05: w = exp(0.05) = 1.0512711, inside [0.8, 1.2]: loss -w per token,
    # the sequence mean -1.0512711; d/dlogp_t of -exp(mean) = -w / 2 = -0.5256355 for both tokens
    loss, _ = GRPOLoss(0.2, 0.0, "grpo", importance_sampling_level="sequence")(
        leaf, old, None, adv, mask, BatchTotals.single(mask, 2))
    assert loss.item() == pytest.approx(-1.0512711, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(leaf.grad, torch.tensor([[-0.5256355, -0.5256355]]), atol=1e-6, rtol=0)
    # per token instead: exp(0.5) = 1.6487 is clipped to 1.2 (no gradient), exp(-0.4) = 0.6703200 is not
    leaf, old, _, adv, mask = one_row([-1.0, -2.0], [-1.5, -1.6])
    loss, _ = GRPOLoss(0.2, 0.0, "grpo")(leaf, old, None, adv, mask, BatchTotals.single(mask, 2))
    assert loss.item() == pytest.approx(-(1.2 + 0.6703200) / 2, abs=1e-6)


def test_cispo_clipped_detached_weight_times_logprob():
    leaf, old, _, adv, mask = one_row([-1.0, -2.0], [-1.5, -1.6])
    # w = (1.6487213, 0.6703200), capped at 1.3 -> (1.3, 0.67032), detached; per token -w A logp =
    # (1.3, 1.3406400); aggregated as dapo over 2 tokens: 1.3203200; gradient -w / 2 = (-0.65, -0.33516)
    loss, metrics = GRPOLoss(0.2, 0.0, "cispo", clip_eps_high=1.3)(leaf, old, None, adv, mask,
                                                                     BatchTotals.single(mask, 2))
    assert loss.item() == pytest.approx(1.3203200, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(leaf.grad, torch.tensor([[-0.65, -0.33516]]), atol=1e-5, rtol=0)
    assert metrics["clipped_tokens"].item() == 1  # the first token's weight was capped, and still has a gradient


def test_delta_bounds_negative_advantage_tokens():
    # A = -1, ratio e = 2.7182818: without delta -min(-2.718, -1.2) = 2.718, growing with the ratio; delta 1.5
    # caps the unclipped ratio: -min(-1.5, -1.2) = 1.5, and the capped term passes no gradient
    leaf, old, _, adv, mask = one_row([-1.0], [-2.0], advantage=-1.0)
    unbounded, _ = GRPOLoss(0.2, 0.0, "grpo")(leaf, old, None, adv, mask, BatchTotals.single(mask, 1))
    assert unbounded.item() == pytest.approx(2.7182818, abs=1e-6)
    leaf, old, _, adv, mask = one_row([-1.0], [-2.0], advantage=-1.0)
    bounded, _ = GRPOLoss(0.2, 0.0, "grpo", delta=1.5)(leaf, old, None, adv, mask, BatchTotals.single(mask, 1))
    assert bounded.item() == pytest.approx(1.5, abs=1e-6)
    bounded.backward()
    assert leaf.grad.item() == 0.0


def test_top_entropy_quantile_trains_the_high_entropy_tokens_only():
    leaf = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    mask = torch.ones(1, 4)
    entropies = torch.tensor([[0.1, 0.5, 0.9, 2.0]])
    # the 0.5 quantile of (0.1, 0.5, 0.9, 2.0) is 0.7 (midway between 0.5 and 0.9): tokens 3 and 4 train.
    # On-policy, A = 1: -1 on each, 0 elsewhere; grpo's token mean over all 4 tokens: -0.5; gradient -1/4 there
    loss, metrics = GRPOLoss(0.2, 0.0, "grpo", top_entropy_quantile=0.5)(
        leaf, leaf.detach(), None, torch.tensor([1.0]), mask, BatchTotals.single(mask, 4), entropies_NC=entropies)
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(leaf.grad, torch.tensor([[0.0, 0.0, -0.25, -0.25]]), atol=1e-7, rtol=0)
    assert metrics["entropy_sum"].item() == pytest.approx(3.5)
    # a threshold from all ranks (in BatchTotals) overrides the local one: 1.0 leaves only the last token
    leaf.grad = None
    totals = BatchTotals(1, 4, 1, 4, entropy_threshold=1.0)
    loss, _ = GRPOLoss(0.2, 0.0, "grpo", top_entropy_quantile=0.5)(
        leaf, leaf.detach(), None, torch.tensor([1.0]), mask, totals, entropies_NC=entropies)
    assert loss.item() == pytest.approx(-0.25, abs=1e-6)


def test_entropy_threshold_is_the_quantile_of_the_masked_tokens():
    entropies = torch.tensor([[0.1, 0.5, 0.9, 7.0], [0.3, 0.2, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # masked values 0.1, 0.5, 0.9, 0.3, 0.2 sorted 0.1 0.2 0.3 0.5 0.9: the 0.8 quantile (q = 0.2) is at index
    # 3.2: 0.5 + 0.2 * 0.4 = 0.58; the 7.0 and 9.0s lie outside the mask and do not count
    assert entropy_threshold(entropies, mask, 0.2) == pytest.approx(0.58)


@pytest.mark.parametrize("estimator, expected", [("k1", 1.0), ("k2", 0.5), ("k3", math.exp(-1))])
def test_kl_estimators_hand_values(estimator, expected):
    # logp 0, ref -1: log r = ref - logp = -1; k1 = -log r = 1, k2 = (log r)^2 / 2 = 0.5, k3 = e^-1 - (-1) - 1
    assert kl_estimate(torch.tensor(0.0), torch.tensor(-1.0), estimator).item() == pytest.approx(expected)


def test_kl_estimator_in_the_loss():
    leaf = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    ref = torch.tensor([[-2.0, -2.0]])
    # on-policy with A = 0: the loss is the KL term alone, kl_weight 0.5 x mean of k2 = (0.5, 0) -> 0.5 x 0.25
    loss, metrics = GRPOLoss(0.2, 0.5, "grpo", kl_estimator="k2")(leaf, leaf.detach(), ref, torch.tensor([0.0]),
                                                                  mask, BatchTotals.single(mask, 2))
    assert loss.item() == pytest.approx(0.125)
    assert metrics["kl_sum"].item() == pytest.approx(0.5)


def test_kl_is_measured_when_it_is_in_the_reward():
    # --kl_in_reward: the loss has no KL term (kl_weight 0), but the logged KL must still be the policy's distance
    # from the reference. logp (-1, -2), ref (-2, -2): k2 per token = (0.5, 0), sum 0.5; k3 = e^-1 - (-1) - 1 =
    # 0.3678794 and 0
    from grpo_ds.config import Config
    from grpo_ds.trainer import loss_from

    leaf = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    ref = torch.tensor([[-2.0, -2.0]])
    for estimator, expected in (("k2", 0.5), ("k3", 0.3678794)):
        loss_fn = loss_from(Config(kl_in_reward=True, kl_weight=0.5, kl_estimator=estimator))
        loss, metrics = loss_fn(leaf, leaf.detach(), ref, torch.tensor([0.0]), mask, BatchTotals.single(mask, 2))
        assert loss.item() == 0.0  # A = 0 and no KL term in the loss
        assert metrics["kl_sum"].item() == pytest.approx(expected, abs=1e-6)
