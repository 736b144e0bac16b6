"""The `Experience` record: one rank's rows of a step (sequences, masks, rewards, advantages, old and reference
log-probs), cut into micro-batches with padding trimmed.

Shape legend: N completions, T = P + C total positions (P prompt, left-padded; C completion, right-padded).
Every per-token tensor over completions (`*_NC`) is aligned with the last C columns of `sequences_NT`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class Experience:
    sequences_NT: torch.Tensor  # prompt + completion token ids
    # 1 on real prompt tokens and on completion tokens up to the first EOS (with tools: the whole episode, the tool
    # results included, as context)
    attention_mask_NT: torch.Tensor
    # 1 on the completion tokens the loss sees (first EOS included): with tools, only the model's own tokens, so the
    # loss, KL, entropy, clip fraction and token counts never see a tool result (generation.episodes)
    completion_mask_NC: torch.Tensor
    rewards_N: torch.Tensor
    advantages_N: torch.Tensor
    old_logprobs_NC: Optional[torch.Tensor] = None  # None when on-policy: the detached current log-probs serve
    ref_logprobs_NC: Optional[torch.Tensor] = None  # None when kl_weight == 0
    sampler_logprobs_NC: Optional[torch.Tensor] = None  # what the rollout engine recorded while sampling
    has_signal: bool = True  # some group on some rank has non-zero advantages (the same on every rank)

    def __len__(self) -> int:
        return self.sequences_NT.shape[0]

    @property
    def num_completion_positions(self) -> int:
        return self.completion_mask_NC.shape[1]

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows in `index`, with the padding columns that every selected row shares removed: leading prompt
        columns where no row has a real token, trailing completion columns where no row has a completion token."""
        rows = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rows.update({name: value[index] for name, value in rows.items() if isinstance(value, torch.Tensor)})
        num_prompt = self.sequences_NT.shape[1] - self.num_completion_positions
        prompt_used = rows["attention_mask_NT"][:, :num_prompt].any(dim=0).nonzero()
        start = int(prompt_used[0]) if len(prompt_used) else num_prompt
        completion_used = rows["completion_mask_NC"].any(dim=0).nonzero()
        keep_c = int(completion_used[-1]) + 1 if len(completion_used) else 1
        end = num_prompt + keep_c
        for name in ("sequences_NT", "attention_mask_NT"):
            rows[name] = rows[name][:, start:end]
        for name in ("completion_mask_NC", "old_logprobs_NC", "ref_logprobs_NC", "sampler_logprobs_NC"):
            if rows[name] is not None:
                rows[name] = rows[name][:, :keep_c]
        return Experience(**rows)

    def micro_batches(self, micro_batch_size: int, generator: Optional[torch.Generator] = None,
                      group_size: int = 1) -> Iterator["Experience"]:
        """Micro-batches of exactly `micro_batch_size` rows (the config guarantees it divides the rows): a random
        permutation from `generator`, or the stored order when None. With `group_size` G dividing the micro-batch
        (rows [g*G, (g+1)*G) being prompt g's group), whole groups are shuffled instead of rows, so a micro-batch
        holds whole prompts: no prompt is padded to another's length, and its rows share one packed forward."""
        n = len(self)
        assert n % micro_batch_size == 0, (n, micro_batch_size)
        if generator is None:
            order = torch.arange(n)
        elif group_size > 1 and micro_batch_size % group_size == 0 and n % group_size == 0:
            groups = torch.randperm(n // group_size, generator=generator)
            order = (groups.unsqueeze(1) * group_size + torch.arange(group_size)).flatten()
        else:
            order = torch.randperm(n, generator=generator)
        for start in range(0, n, micro_batch_size):
            yield self.select(order[start:start + micro_batch_size])


def balanced_assignment(costs: list[float], num_ranks: int) -> list[list[int]]:
    """Which items each rank takes, in the order it should run them: len(costs) / num_ranks items each, dealt in
    lockstep. Items go by decreasing cost (ties by index) in rounds of num_ranks, one to each rank, the round's
    costliest to the least-loaded rank so far (ties: lower rank). Each rank's k-th item comes from round k, so
    the ranks' k-th items cost alike: under ZeRO-2 the ranks meet at every micro-batch's gradient reduction, so
    a step costs the sum over micro-batches of the slowest rank's, which sorting into rounds makes smallest; the
    load rule keeps the ranks' sums within one item's cost of each other (as verl balances sequence lengths over
    data-parallel ranks). The same on every rank: no communication needed.

    >>> balanced_assignment([9, 1, 1, 1, 5, 5], 2)  # rounds (9, 5) (5, 1) (1, 1): sums 11 and 11
    [[0, 1, 2], [4, 5, 3]]
    >>> balanced_assignment([10, 9, 2, 1], 2)  # in order would be 19 and 3
    [[0, 3], [1, 2]]
    """
    if len(costs) % num_ranks:
        raise ValueError(f"balanced_assignment: {len(costs)} items do not split evenly over {num_ranks} ranks")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads, taken = [0.0] * num_ranks, [[] for _ in range(num_ranks)]
    for start in range(0, len(order), num_ranks):
        ranks = sorted(range(num_ranks), key=lambda r: (loads[r], r))  # lightest first
        for rank, i in zip(ranks, order[start:start + num_ranks]):
            taken[rank].append(i)
            loads[rank] += costs[i]
    return taken
