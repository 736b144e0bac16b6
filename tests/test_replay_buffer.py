"""The distributed replay buffer: after scoring, the step's groups are pooled over the ranks and dealt out with even
token counts (--balance_ranks); with dynamic sampling, groups with a signal are pooled. The gradient is the whole
step's whatever rank holds which group, so balancing changes the weights by float rounding only."""

import json
import random

import pytest

from grpo_ds.experience import balanced_assignment
from helpers import TINY_FLAGS, records, run

# ----------------------------------------------------------------------------------------------- the deal


def test_balanced_assignment_by_hand():
    # costs 8, 7, 6, 5, 4, 3 over 2 ranks, 3 each: 8 -> r0; 7 -> r1; 6 -> r1 (7 < 8); 5 -> r0 (8 < 13);
    # 4 -> r0 (13 = 13, lower rank), r0 is full; 3 -> r1: sums 17 and 16 (in order: 21 and 12)
    assert balanced_assignment([8, 7, 6, 5, 4, 3], 2) == [[0, 3, 4], [1, 2, 5]]
    assert balanced_assignment([1, 1, 1, 1], 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError):
        balanced_assignment([1, 2, 3], 2)


def test_balanced_assignment_properties():
    rng = random.Random(0)
    for _ in range(3000):
        ranks, per_rank = rng.randint(2, 5), rng.randint(1, 6)
        costs = [rng.randint(1, 500) for _ in range(ranks * per_rank)]
        deal = balanced_assignment(costs, ranks)
        assert sorted(i for part in deal for i in part) == list(range(len(costs)))  # every item once
        assert all(len(part) == per_rank for part in deal)  # equal counts: ranks run the same micro-batches
        loads = [sum(costs[i] for i in part) for part in deal]
        assert max(loads) - min(loads) <= max(costs)  # no rank more than one item's cost ahead
        for k in range(per_rank - 1):  # lockstep: every rank's k-th item costs at least any rank's (k+1)-th
            assert min(costs[part[k]] for part in deal) >= max(costs[part[k + 1]] for part in deal)


def test_balanced_assignment_puts_like_costs_at_like_positions():
    """Under ZeRO-2 the ranks meet at each micro-batch's gradient reduction, so a step costs the sum over
    positions of the slowest rank's item. Costs 9, 1, 1, 1, 5, 5 over 2 ranks: rounds (9, 5), (5, 1), (1, 1); the
    round's costlier item to the lighter rank: 9 -> r0, 5 (item 4) -> r1; r1 (5) is lighter: 5 (item 5) -> r1,
    1 (item 1) -> r0; both 10: 1 (item 2) -> r0, 1 (item 3) -> r1. Slowest per position 9 + 5 + 1 = 15; dealt by
    sums alone in index order ([0, 1, 2] and [3, 4, 5]) it is 9 + 5 + 5 = 19."""
    costs = [9, 1, 1, 1, 5, 5]
    deal = balanced_assignment(costs, 2)
    assert deal == [[0, 1, 2], [4, 5, 3]]
    assert sum(max(costs[part[k]] for part in deal) for k in range(3)) == 15


def test_every_rank_shuffles_its_micro_batches_alike():
    """The deal's positions survive the shuffle only if every rank permutes its groups the same way."""
    from types import SimpleNamespace

    from grpo_ds.config import Config
    from grpo_ds.trainer import Run

    def plan(rank: int):
        layout = SimpleNamespace(gradient_accumulation_steps=2)
        return Run.update_plan(SimpleNamespace(cfg=Config(), layout=layout, world=2, rank=rank), step=3)

    assert plan(0).shuffle_seed == plan(1).shuffle_seed


def test_a_group_costs_its_prompt_once_and_g_blocks_of_its_longest_completion():
    """A packed pass pads a group's completions to its longest, so that is what the deal balances: group 0 (prompt
    2 real tokens after 1 of padding, completions of 2 and 4 tokens) costs 2 + 2 x 4 = 10, not its 2 + 6 = 8 tokens;
    group 1 (prompt 3, completions 3 and 3) costs 3 + 2 x 3 = 9. A tool result inside an episode (row 1's third and
    fourth columns: attended, not trained) counts as completion."""
    import torch

    from grpo_ds.generation import Rollout
    from grpo_ds.trainer import Groups, group_tokens

    attention = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0],
                              [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    trained = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])

    def groups(rows: slice) -> Groups:  # the rows' groups of 2 (the ids do not enter the cost)
        n = len(attention[rows])
        rollout = Rollout(torch.ones(n, 8, dtype=torch.long), attention[rows], trained[rows],
                          torch.zeros(n, dtype=torch.bool))
        return Groups([None] * (n // 2), rollout, [], torch.zeros(n // 2, 2), {}, 0.0)

    assert group_tokens(groups(slice(0, 2)), 2) == 10
    assert group_tokens(groups(slice(2, 4)), 2) == 9
    assert group_tokens(groups(slice(0, 4)), 2) == 19


# ----------------------------------------------------------------------------------------------- in training


def metrics(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


NATURAL = list(TINY_FLAGS)
NATURAL[NATURAL.index("--max_new_tokens") + 1] = "16"  # lengths vary: an EOS ends some completions early


@pytest.mark.slow
def test_balancing_deals_even_tokens_and_keeps_the_gradient(tmp_path, tiny_model):
    """Same rollouts (seeded per rank and step), dealt two ways: the first step's weights agree to float rounding,
    and the tokens over the ranks add up the same."""
    flags = ["--model", str(tiny_model), "--max_steps", "1", *NATURAL, "--rollouts_per_step", "8",
             "--train_batch_size", "8"]
    run([*flags, "--output_dir", str(tmp_path / "on")], tmp_path)
    run([*flags, "--output_dir", str(tmp_path / "off"), "--balance_ranks", "false"], tmp_path)
    on, off = records(tmp_path / "on"), records(tmp_path / "off")
    assert on[0][0]["fingerprint"] == on[1][0]["fingerprint"]  # ranks in lockstep
    assert on[0][0]["fingerprint"] == pytest.approx(off[0][0]["fingerprint"], rel=1e-5)
    a, b = metrics(tmp_path / "on")[0], metrics(tmp_path / "off")[0]
    assert a["reward_mean"] == b["reward_mean"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert a["rank_tokens_max"] + a["rank_tokens_min"] == b["rank_tokens_max"] + b["rank_tokens_min"]  # 2 ranks
    assert {"update_wait_s", "update_wait_s_max"} <= set(a)


@pytest.mark.slow
def test_dynamic_sampling_pools_groups_with_a_signal(tmp_path, tiny_model):
    """A sparse reward ties many groups: pooled over the ranks, the first step needs no more rounds than each rank
    finding its own B groups; the groups trained on all carry a signal unless the rounds ran out."""
    sparse = [f if f != "learnable:sevens_dense" else "learnable:has_seven" for f in TINY_FLAGS]
    flags = ["--model", str(tiny_model), "--max_steps", "2", *sparse, "--dynamic_sampling", "true",
             "--max_sampling_rounds", "6"]
    run([*flags, "--output_dir", str(tmp_path / "pooled")], tmp_path)
    run([*flags, "--output_dir", str(tmp_path / "apart"), "--balance_ranks", "false"], tmp_path)
    pooled, apart = metrics(tmp_path / "pooled"), metrics(tmp_path / "apart")
    assert pooled[0]["sampling_rounds"] <= apart[0]["sampling_rounds"]
    for row in pooled:
        assert row["groups_drawn"] == 4 * row["sampling_rounds"]
        assert row["groups_kept"] == 4 or row["sampling_rounds"] == 6
    rank0, rank1 = records(tmp_path / "pooled")
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
