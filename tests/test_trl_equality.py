"""grpo_ds's loss against TRL 1.16's own: GRPOTrainer._compute_loss called on the same tensors (the policy's
log-probs and entropies handed to it in place of a forward pass), for every loss type and option both have. The
values and the gradients must be equal: a TRL user's config translates to grpo_ds's flags with the same meaning."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from grpo_ds.loss import BatchTotals, GRPOLoss

N, C, MAX_NEW_TOKENS = 6, 7, 9


class FakeAccelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class TRLLoss:
    """Just enough of a GRPOTrainer for its _compute_loss (and get_high_entropy_mask) to run on given tensors."""

    _compute_loss = GRPOTrainer._compute_loss
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask

    def __init__(self, logps, entropies, *, loss_type="grpo", beta=0.04, epsilon=0.2, epsilon_high=None,
                 importance_sampling_level="token", delta=None, top_entropy_quantile=1.0):
        self.logps, self.entropies = logps, entropies
        self.loss_type, self.beta, self.importance_sampling_level = loss_type, beta, importance_sampling_level
        self.epsilon_low, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.top_entropy_quantile = top_entropy_quantile
        self.args = SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1)
        self.accelerator = FakeAccelerator()
        self.model = SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.max_completion_length = MAX_NEW_TOKENS
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        return self.logps, self.entropies, None

    def __call__(self, old, ref, advantages, mask):
        inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2),
                  "completion_ids": torch.zeros(N, C, dtype=torch.long), "completion_mask": mask,
                  "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
                  "num_items_in_batch": mask.sum()}
        return self._compute_loss(self.model, inputs)


def batch(seed: int = 0):
    """Log-probs with ratios inside and outside every clip range, entropies, advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, C, generator=g) * 3
    old = logp + torch.randn(N, C, generator=g) * 0.4
    ref = logp + torch.randn(N, C, generator=g) * 0.3
    entropies = torch.rand(N, C, generator=g) * 4
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.5, 0.9, -0.2])
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(C).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return logp, old, ref, entropies, advantages, mask


def both(loss_type: str = "grpo", truncated=None, **options):
    """(grpo_ds loss, grpo_ds grad, TRL loss, TRL grad) on the same batch."""
    logp, old, ref, entropies, advantages, mask = batch()
    trl_names = {"clip_eps_high": "epsilon_high", "kl_weight": "beta"}
    ours_options = {k: v for k, v in options.items()}
    trl_options = {trl_names.get(k, k): v for k, v in options.items()}
    if truncated is not None:  # TRL's mask_truncated_completions: the rows leave the loss's mask
        mask = mask * (~truncated).unsqueeze(1).float()
    kl_weight = ours_options.pop("kl_weight", 0.04)
    ours_leaf = logp.clone().requires_grad_(True)
    loss_fn = GRPOLoss(0.2, kl_weight, loss_type, ours_options.pop("clip_eps_high", None), **ours_options)
    ours, _ = loss_fn(ours_leaf, old, ref, advantages, mask, BatchTotals.single(mask, MAX_NEW_TOKENS),
                      entropies_NC=entropies)
    ours.backward()
    trl_leaf = logp.clone().requires_grad_(True)
    trl_options.setdefault("beta", 0.04)
    theirs = TRLLoss(trl_leaf, entropies, loss_type=loss_type, **trl_options)(old, ref, advantages, mask)
    theirs.backward()
    return ours, ours_leaf.grad, theirs, trl_leaf.grad


def assert_same(ours, ours_grad, theirs, theirs_grad):
    assert ours.item() != 0.0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_types(loss_type):
    assert_same(*both(loss_type))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gspo_sequence_level_importance_sampling(loss_type):
    assert_same(*both(loss_type, importance_sampling_level="sequence"))


def test_cispo():
    assert_same(*both("cispo", clip_eps_high=1.1))  # a cap inside the batch's ratios: some weights are clipped


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_sided_clipping(loss_type):
    assert_same(*both(loss_type, delta=1.3))


@pytest.mark.parametrize("quantile", [0.2, 0.5])
def test_top_entropy_masking(quantile):
    assert_same(*both("grpo", top_entropy_quantile=quantile))


def test_truncated_completions_masked():
    assert_same(*both("dapo", truncated=torch.tensor([False, True, False, False, True, False])))


def test_without_kl():
    assert_same(*both("grpo", kl_weight=0.0))


def test_options_change_the_loss():
    """Each option really acts on this batch (otherwise equality with TRL would prove little)."""
    base = both("grpo")[0].item()
    for options in (dict(importance_sampling_level="sequence"), dict(delta=1.3), dict(top_entropy_quantile=0.2)):
        assert both("grpo", **options)[0].item() != pytest.approx(base, abs=1e-6), options
    assert both("cispo", clip_eps_high=1.1)[0].item() != pytest.approx(both("dapo")[0].item(), abs=1e-6)
