"""Phases of the GRPO step alone, on hand-built inputs: take_groups (the groups dynamic sampling keeps, from
several rounds, re-padded into one batch) and make_experience's truncation masking."""

from types import SimpleNamespace

import torch

from grpo_ds import distributed
from grpo_ds.config import Config
from grpo_ds.data import Problem
from grpo_ds.generation import Rollout
from grpo_ds.trainer import Groups, make_experience, take_groups

PAD = 99  # the pad id take_groups re-pads with; the rounds' own padding is 0, so each is seen apart
G = 2


def round_a() -> Groups:
    """B = 2 groups of G = 2; prompt width 3, completion width 2."""
    rollout = Rollout(sequences_NT=torch.tensor([[1, 2, 3, 10, 11], [1, 2, 3, 12, 0],
                                                 [0, 4, 5, 13, 14], [0, 4, 5, 15, 0]]),
                      attention_mask_NT=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0],
                                                      [0, 1, 1, 1, 1], [0, 1, 1, 1, 0]]),
                      completion_mask_NC=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]]),
                      truncated_N=torch.tensor([True, False, True, False]))
    return Groups([Problem("a0", "1"), Problem("a1", "2")], rollout, ["a0", "a1", "a2", "a3"],
                  torch.tensor([[0.0, 1.0], [1.0, 0.0]]), {"completions": 4.0}, 1.5)


def round_b() -> Groups:
    """B = 2 groups of G = 2; prompt width 2, completion width 3."""
    rollout = Rollout(sequences_NT=torch.tensor([[6, 7, 20, 21, 22], [6, 7, 23, 0, 0],
                                                 [8, 9, 24, 0, 0], [8, 9, 25, 26, 0]]),
                      attention_mask_NT=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0],
                                                      [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]),
                      completion_mask_NC=torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]),
                      truncated_N=torch.tensor([True, False, False, False]))
    return Groups([Problem("b0", "3"), Problem("b1", "4")], rollout, ["b0", "b1", "b2", "b3"],
                  torch.tensor([[0.5, 0.0], [2.0, 2.0]]), {"completions": 4.0}, 2.5)


def test_take_groups_repads_groups_from_two_rounds():
    a, b = round_a(), round_b()
    groups = take_groups([(a, 1), (b, 0)], G, PAD)  # round a's second group, then round b's first
    # widest prompt 3 (a's), widest completion 3 (b's): a's rows gain a completion column on the right, b's rows a
    # prompt column on the left, both filled with PAD in the sequences and 0 in the masks
    assert groups.rollout.sequences_NT.tolist() == [[0, 4, 5, 13, 14, PAD], [0, 4, 5, 15, 0, PAD],
                                                    [PAD, 6, 7, 20, 21, 22], [PAD, 6, 7, 23, 0, 0]]
    assert groups.rollout.attention_mask_NT.tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0],
                                                         [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]]
    assert groups.rollout.completion_mask_NC.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert groups.rollout.truncated_N.tolist() == [True, False, True, False]
    assert [p.question for p in groups.problems_B] == ["a1", "b0"]
    assert groups.texts_N == ["a2", "a3", "b0", "b1"]
    assert groups.rewards_BG.tolist() == [[1.0, 0.0], [0.5, 0.0]]
    # the rounds are untouched
    assert round_a().rollout.sequences_NT.tolist() == a.rollout.sequences_NT.tolist()


def test_take_groups_reorders_within_one_round_and_keeps_a_whole_round_as_is():
    a = round_a()
    swapped = take_groups([(a, 1), (a, 0)], G, PAD)  # same widths: nothing to pad, rows in the chosen order
    assert swapped.rollout.sequences_NT.tolist() == [[0, 4, 5, 13, 14], [0, 4, 5, 15, 0],
                                                     [1, 2, 3, 10, 11], [1, 2, 3, 12, 0]]
    assert swapped.rollout.completion_mask_NC.tolist() == [[1, 1], [1, 0], [1, 1], [1, 0]]
    assert swapped.rewards_BG.tolist() == [[1.0, 0.0], [0.0, 1.0]] and swapped.texts_N == ["a2", "a3", "a0", "a1"]
    whole = take_groups([(a, 0), (a, 1)], G, PAD)
    assert torch.equal(whole.rollout.sequences_NT, a.rollout.sequences_NT) and whole.texts_N == a.texts_N


def test_truncated_completions_leave_the_mask(monkeypatch):
    """--mask_truncated_completions: rows without an EOS keep their advantage (computed over the whole group) but
    no longer count in the loss: their completion mask is all zero, the others' untouched."""
    monkeypatch.setattr(distributed, "any_rank", lambda flag: flag)  # a world of one
    a = round_a()
    cfg = Config(group_size=G, kl_weight=0.0, mask_truncated_completions=True)
    run = SimpleNamespace(cfg=cfg, reference=None, layout=SimpleNamespace(on_policy=True),
                          policy=SimpleNamespace(device=torch.device("cpu")))
    experience, _ = make_experience(run, a)
    # rows 0 and 2 were truncated (no EOS); rows 1 and 3 ended
    assert experience.completion_mask_NC.tolist() == [[0, 0], [1, 0], [0, 0], [1, 0]]
    # advantages are taken before the masking: group rewards (0, 1) and (1, 0) -> -/+ 1 / (std 0.7071 + 1e-4)
    torch.testing.assert_close(experience.advantages_N, torch.tensor([-0.70701, 0.70701, 0.70701, -0.70701]),
                               atol=1e-5, rtol=0)
    unmasked, _ = make_experience(SimpleNamespace(**{**vars(run), "cfg": Config(group_size=G, kl_weight=0.0)}),
                                  round_a())
    assert unmasked.completion_mask_NC.tolist() == [[1, 1], [1, 0], [1, 1], [1, 0]]
