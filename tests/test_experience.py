"""Tests for grpo_ds.experience: Experience.select (row selection with shared padding trimmed) and
Experience.micro_batches."""

import pytest
import torch

from grpo_ds.experience import Experience

# Three rows, P = 4 prompt columns (left-padded), C = 4 completion columns (right-padded), T = 8.
#              prompt mask    completion mask
#   row 0:     0 0 1 1        1 1 0 0
#   row 1:     0 1 1 1        1 0 0 0
#   row 2:     1 1 1 1        1 1 1 0
# No row uses completion column 3: it is padding for every selection.
P, C = 4, 4
PROMPT_MASK = [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
COMPLETION_MASK = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]


def make_experience(with_logprobs=True) -> Experience:
    n = 3
    sequences = torch.arange(n * (P + C)).view(n, P + C) + 100  # distinct ids: row i column j = 100 + 8 i + j
    completion_mask = torch.tensor(COMPLETION_MASK)
    attention = torch.cat([torch.tensor(PROMPT_MASK), completion_mask], dim=1)
    old = ref = None
    if with_logprobs:
        old = -torch.arange(n * C, dtype=torch.float32).view(n, C) - 1  # row i column j = -(4 i + j + 1)
        ref = old * 10
    return Experience(sequences_NT=sequences, attention_mask_NT=attention, completion_mask_NC=completion_mask,
                      rewards_N=torch.tensor([1.0, 0.0, 0.5]), advantages_N=torch.tensor([0.7, -1.1, 0.4]),
                      old_logprobs_NC=old, ref_logprobs_NC=ref)


@pytest.mark.parametrize("rows,start,keep_c", [
    # row 0 alone: prompt starts at column 2, completion uses columns 0..1 -> keep 2
    ([0], 2, 2),
    # rows 0 and 1: prompt starts at column 1 (row 1), completion columns 0..1 (row 0)
    ([0, 1], 1, 2),
    # row 1 alone: prompt column 1, one completion column
    ([1], 1, 1),
    # row 2 alone: no leading padding, completion columns 0..2
    ([2], 0, 3),
    # every row, in another order: prompt column 0, completion 0..2
    ([2, 0, 1], 0, 3),
])
def test_select_trims_shared_padding(rows, start, keep_c):
    exp = make_experience()
    index = torch.tensor(rows)
    sel = exp.select(index)
    assert len(sel) == len(rows)
    assert sel.num_completion_positions == keep_c
    # sequences/attention: columns [start, P + keep_c) of the selected rows, in the index's order
    torch.testing.assert_close(sel.sequences_NT, exp.sequences_NT[index][:, start:P + keep_c], rtol=0, atol=0)
    torch.testing.assert_close(sel.attention_mask_NT, exp.attention_mask_NT[index][:, start:P + keep_c], rtol=0,
                               atol=0)
    torch.testing.assert_close(sel.completion_mask_NC, exp.completion_mask_NC[index][:, :keep_c], rtol=0, atol=0)
    torch.testing.assert_close(sel.old_logprobs_NC, exp.old_logprobs_NC[index][:, :keep_c], rtol=0, atol=0)
    torch.testing.assert_close(sel.ref_logprobs_NC, exp.ref_logprobs_NC[index][:, :keep_c], rtol=0, atol=0)
    torch.testing.assert_close(sel.rewards_N, exp.rewards_N[index], rtol=0, atol=0)
    torch.testing.assert_close(sel.advantages_N, exp.advantages_N[index], rtol=0, atol=0)


def test_select_hand_values_row_0():
    sel = make_experience().select(torch.tensor([0]))
    # row 0 is 100..107; prompt columns 2, 3 are 102, 103; completion columns 0, 1 are 104, 105
    assert sel.sequences_NT.tolist() == [[102, 103, 104, 105]]
    assert sel.attention_mask_NT.tolist() == [[1, 1, 1, 1]]
    assert sel.completion_mask_NC.tolist() == [[1, 1]]
    assert sel.old_logprobs_NC.tolist() == [[-1.0, -2.0]]
    assert sel.ref_logprobs_NC.tolist() == [[-10.0, -20.0]]


def test_select_keeps_completion_alignment():
    """The last C' columns of the trimmed sequences are the completion: the completion tokens of each selected
    row are unchanged and still line up with their masks and log-probs."""
    exp = make_experience()
    for rows in ([0], [1], [0, 1], [1, 2], [2, 1, 0]):
        index = torch.tensor(rows)
        sel = exp.select(index)
        c = sel.num_completion_positions
        assert sel.sequences_NT.shape[1] - c >= 1  # some prompt is left
        for i, row in enumerate(rows):
            completion = exp.sequences_NT[row, P:][exp.completion_mask_NC[row].bool()]
            assert torch.equal(sel.sequences_NT[i, -c:][sel.completion_mask_NC[i].bool()], completion)
            # attention over the completion part equals the completion mask
            assert torch.equal(sel.attention_mask_NT[i, -c:], sel.completion_mask_NC[i])
            # the real prompt tokens are all kept
            real_prompt = exp.sequences_NT[row, :P][exp.attention_mask_NT[row, :P].bool()]
            kept = sel.sequences_NT[i, :-c][sel.attention_mask_NT[i, :-c].bool()]
            assert torch.equal(kept, real_prompt)


def test_select_optional_fields_stay_none():
    sel = make_experience(with_logprobs=False).select(torch.tensor([1, 0]))
    assert sel.old_logprobs_NC is None and sel.ref_logprobs_NC is None
    assert sel.sequences_NT.shape == (2, 3 + 2)  # prompt from column 1, two completion columns


def test_select_only_one_optional_field():
    exp = make_experience()
    exp.old_logprobs_NC = None
    sel = exp.select(torch.tensor([0]))
    assert sel.old_logprobs_NC is None
    assert sel.ref_logprobs_NC.tolist() == [[-10.0, -20.0]]


def test_select_does_not_modify_the_source():
    exp = make_experience()
    before = exp.sequences_NT.clone()
    exp.select(torch.tensor([0]))
    assert torch.equal(exp.sequences_NT, before)
    assert exp.num_completion_positions == C


# ----------------------------------------------------------------------------- micro-batches


def buffer_of(n: int) -> Experience:
    """n rows of varied prompt and completion lengths; rewards_N = row number identifies a row."""
    p, c = 5, 6
    prompt_len = torch.arange(n) % p + 1
    completion_len = torch.arange(n) % c + 1
    prompt_mask = (torch.arange(p).unsqueeze(0) >= p - prompt_len.unsqueeze(1)).long()
    completion_mask = (torch.arange(c).unsqueeze(0) < completion_len.unsqueeze(1)).long()
    sequences = torch.arange(n * (p + c)).view(n, p + c)
    exp = Experience(sequences, torch.cat([prompt_mask, completion_mask], dim=1), completion_mask,
                     rewards_N=torch.arange(n, dtype=torch.float32), advantages_N=torch.zeros(n),
                     old_logprobs_NC=torch.arange(n * c, dtype=torch.float32).view(n, c))
    return exp


def order_of(buffer, micro_batch_size, generator):
    return [int(r) for mb in buffer.micro_batches(micro_batch_size, generator) for r in mb.rewards_N]


@pytest.mark.parametrize("micro_batch_size", [1, 3, 4, 12])
def test_micro_batches_cover_every_row_once(micro_batch_size):
    buffer = buffer_of(12)
    assert len(buffer) == 12
    batches = list(buffer.micro_batches(micro_batch_size, torch.Generator().manual_seed(0)))
    assert len(batches) == 12 // micro_batch_size
    assert all(len(mb) == micro_batch_size for mb in batches)
    rows = [int(r) for mb in batches for r in mb.rewards_N]
    assert sorted(rows) == list(range(12))
    # each micro-batch carries its rows' own data (old log-probs row r start at 6 r), trimmed consistently
    for mb in batches:
        for i, r in enumerate(mb.rewards_N.long().tolist()):
            c = mb.num_completion_positions
            assert mb.old_logprobs_NC[i].tolist() == [float(6 * r + j) for j in range(c)]
            assert mb.ref_logprobs_NC is None


def test_micro_batches_seeded_order():
    buffer = buffer_of(12)
    first = order_of(buffer, 4, torch.Generator().manual_seed(123))
    again = order_of(buffer, 4, torch.Generator().manual_seed(123))
    other = order_of(buffer, 4, torch.Generator().manual_seed(124))
    assert first == again
    assert first != other
    assert first != list(range(12))  # a shuffle, not the stored order
    assert sorted(other) == list(range(12))


def test_micro_batches_without_generator_keep_stored_order():
    buffer = buffer_of(8)
    assert order_of(buffer, 2, None) == list(range(8))
    batches = list(buffer.micro_batches(4))
    assert [mb.rewards_N.tolist() for mb in batches] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]


def test_micro_batches_shuffle_whole_groups_when_they_fit():
    buffer = buffer_of(12)  # 3 groups of 4: rows 0-3, 4-7, 8-11
    batches = list(buffer.micro_batches(4, torch.Generator().manual_seed(0), group_size=4))
    groups = [sorted(int(r) // 4 for r in mb.rewards_N) for mb in batches]
    assert all(len(set(g)) == 1 for g in groups)  # each micro-batch is exactly one group
    assert sorted(g[0] for g in groups) == [0, 1, 2]
    orders = {tuple(order_of_groups(buffer, seed)) for seed in range(10)}
    assert len(orders) > 1  # still shuffled, seeded
    # groups of 2 in micro-batches of 4: two whole groups each
    for mb in buffer.micro_batches(4, torch.Generator().manual_seed(1), group_size=2):
        pairs = sorted(int(r) // 2 for r in mb.rewards_N)
        assert pairs[0::2] == pairs[1::2]
    # a micro-batch of 6 cannot hold whole groups of 4: rows are shuffled as before, each once
    rows = [int(r) for mb in buffer.micro_batches(6, torch.Generator().manual_seed(2), group_size=4)
            for r in mb.rewards_N]
    assert sorted(rows) == list(range(12))


def order_of_groups(buffer, seed):
    return [int(mb.rewards_N[0]) // 4 for mb in buffer.micro_batches(4, torch.Generator().manual_seed(seed),
                                                                       group_size=4)]
