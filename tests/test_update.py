"""The update phase alone, across real ranks: the normalization contract that makes W ranks (or G GPUs) compute the
gradient of the whole step. The same 8-row experience, updated once by 1 rank accumulating 4 micro-batches and once
by 2 ranks accumulating 2 each, must give the same weights for every loss type of config.LOSS_TYPES (and GSPO's
sequence-level ratio), and that change must be minus the gradient of the step's objective written out here."""

import json
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import ROOT, environment, launch_command
from update_contract import C, CISPO_CAP, VARIANTS, experience

pytestmark = pytest.mark.slow


def launch(nprocs: int, model, out) -> None:
    cmd = launch_command(str(ROOT / "tests" / "update_contract.py"), nprocs, [str(model), str(out)],
                         always_launcher=True)
    proc = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def updated(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("contract")
    launch(1, tiny_model, out)
    launch(2, tiny_model, out)
    return out


@pytest.mark.parametrize("loss_type", list(VARIANTS))
def test_two_ranks_update_as_one_rank_with_accumulation(updated, tiny_model, loss_type):
    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    one = torch.load(updated / f"weights_{loss_type}_1.pt")
    two = torch.load(updated / f"weights_{loss_type}_2.pt")
    moved = sum(float((one[k] - initial[k]).abs().sum()) for k in one)
    assert moved > 1e-3  # the update did something (SGD at lr 1: the change is minus the gradient)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7, msg=name)
        # the changes themselves agree, not only the (much larger) weights
        torch.testing.assert_close(two[name] - initial[name], one[name] - initial[name], rtol=1e-4, atol=1e-7,
                                   msg=name)
    stats = [json.loads((updated / f"stats_{w}.json").read_text())[loss_type] for w in (1, 2)]
    assert stats[0]["finite_steps"] == stats[1]["finite_steps"] == [True]  # one optimizer step in both layouts
    assert stats[1]["grad_norms"][0] == pytest.approx(stats[0]["grad_norms"][0], rel=1e-5)
    # the one-rank run saw all 27 completion tokens; each rank of the two saw its own share
    assert stats[0]["num_tokens"] == 27 and stats[0]["clipped_tokens"] > 0


def whole_step_objective(model, loss_type: str) -> torch.Tensor:
    """The step's objective over all 8 rows in one piece, written out here (not with GRPOLoss): per token
    -min(r A, clip(r, 0.8, 1.2) A) + 0.1 k3, aggregated as each loss type defines it; cispo's policy term is
    -min(r, cap).detach() A logp; GSPO's ratio is one per sequence, exp of its mean token log-ratio."""
    exp = experience(model)
    pos = (exp.attention_mask_NT.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=exp.sequences_NT, attention_mask=exp.attention_mask_NT, position_ids=pos).logits
    logp = torch.log_softmax(logits[:, -C - 1:-1].float(), dim=-1).gather(
        -1, exp.sequences_NT[:, -C:, None]).squeeze(-1)
    mask = exp.completion_mask_NC.float()
    ratio = torch.exp(logp - exp.old_logprobs_NC)
    if loss_type == "gspo":  # one ratio per sequence: exp of the mean log-ratio over its completion tokens
        mean_log_ratio = ((logp - exp.old_logprobs_NC) * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)
        ratio = torch.exp(mean_log_ratio)
    a = exp.advantages_N.unsqueeze(1)
    log_ratio = exp.ref_logprobs_NC - logp
    if loss_type == "cispo":
        policy_term = -ratio.clamp(max=CISPO_CAP).detach() * a * logp
    else:
        policy_term = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    per_token = (policy_term + 0.1 * (torch.exp(log_ratio) - log_ratio - 1)) * mask
    if loss_type in ("grpo", "gspo"):  # mean over sequences of each sequence's token mean
        return (per_token.sum(dim=1) / mask.sum(dim=1)).mean()
    if loss_type == "bnpo":  # mean over the 4 micro-batches (rows 0-1, 2-3, 4-5, 6-7) of their token means
        return sum(per_token[i:i + 2].sum() / mask[i:i + 2].sum() for i in range(0, 8, 2)) / 4
    if loss_type == "dr_grpo":  # sum over tokens / (sequences x max_new_tokens)
        return per_token.sum() / (8 * C)
    if loss_type in ("dapo", "cispo"):  # token mean over the whole step
        return per_token.sum() / mask.sum()
    raise AssertionError(f"no objective written for loss type {loss_type!r}: add it here")


@pytest.mark.parametrize("loss_type", list(VARIANTS))
def test_the_update_is_the_gradient_of_the_whole_step(updated, tiny_model, loss_type):
    """Not only do the layouts agree: the change is exactly minus the gradient of the whole step's objective (SGD
    at lr 1), so a scale error common to every layout is caught too."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    whole_step_objective(model, loss_type).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    one = torch.load(updated / f"weights_{loss_type}_1.pt")
    for name, grad in grads.items():
        torch.testing.assert_close(one[name] - initial[name], -grad, rtol=1e-4, atol=1e-7, msg=name)
