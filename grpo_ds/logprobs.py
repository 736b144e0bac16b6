"""Per-token log-probs (and entropies) of completion tokens under a model: the math shared by the reference pass,
the old-log-prob pass and the update. Rows that share a prompt share one forward pass (pack_by_prompt).

Shape legend: N sequences, T positions, C completion positions (the last C of T), V vocabulary, U distinct prompts,
S packed positions, K kept logit positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def position_ids(attention_mask_NT: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them; without them a left-padded prompt's
    log-probs in training would differ from those of the sampling pass."""
    return (attention_mask_NT.long().cumsum(dim=1) - 1).clamp(min=0)


def selective_log_softmax(logits_NCV: torch.Tensor, ids_NC: torch.Tensor, chunk_rows: int = 8,
                          with_entropy: bool = False):
    """log_softmax(logits)[ids] computed chunk by chunk of rows: the chosen logit minus logsumexp, in fp32 (bf16
    logsumexp over 150k entries loses the small log-probs). Without gradients (the reference and old-log-prob
    passes) only one chunk of rows is in fp32 at a time; in training, logsumexp keeps each chunk's fp32 copy for
    backward, so bf16 logits are held in fp32 too until then (fp32 logits are used as they are). With
    `with_entropy`, also each position's entropy of the softmax (no gradient),
    from the same chunk: logsumexp - sum(p * logits). Returns logprobs_NC, or (logprobs_NC, entropies_NC)."""
    chunks, entropies = [], []
    for start in range(0, logits_NCV.shape[0], chunk_rows):
        rows_ncv = logits_NCV[start:start + chunk_rows].float()
        chosen_nc = rows_ncv.gather(-1, ids_NC[start:start + chunk_rows].unsqueeze(-1)).squeeze(-1)
        lse_nc = torch.logsumexp(rows_ncv, dim=-1)
        chunks.append(chosen_nc - lse_nc)
        if with_entropy:
            with torch.no_grad():
                entropies.append(lse_nc - (torch.softmax(rows_ncv, dim=-1) * rows_ncv).sum(dim=-1))
    logprobs_NC = torch.cat(chunks)
    return (logprobs_NC, torch.cat(entropies)) if with_entropy else logprobs_NC


def completion_logprobs(model, sequences_NT: torch.Tensor, attention_mask_NT: torch.Tensor,
                        num_completion: int, temperature: float = 1.0, with_entropy: bool = False):
    """log p(token) for the last `num_completion` tokens of each sequence, shape N x C (and, with `with_entropy`,
    the entropy of the sampling distribution at each of those positions). Only the logits that predict completion
    tokens are computed (`logits_to_keep`), and divided by the sampling temperature so that the probabilities are
    those the tokens were sampled from.

    Rows that share a prompt (a group's rows) share its forward pass: see pack_by_prompt. Otherwise, and for
    attention implementations that take no custom mask (flash-attention), every row runs whole."""
    config = getattr(model, "module", model).config
    packable = getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")  # they take a custom mask
    packed = (pack_by_prompt(sequences_NT, attention_mask_NT, num_completion, next(model.parameters()).dtype,
                             config.hidden_size) if packable else None)
    if packed is None:
        logits_NCV = model(input_ids=sequences_NT, attention_mask=attention_mask_NT,
                           position_ids=position_ids(attention_mask_NT), use_cache=False,
                           logits_to_keep=num_completion + 1).logits[:, :-1]
    else:
        logits_UKV = model(input_ids=packed.ids_US, attention_mask=packed.mask_U1SS, position_ids=packed.positions_US,
                           use_cache=False, logits_to_keep=packed.keep_K).logits
        logits_NCV = logits_UKV[packed.unique_N.unsqueeze(1), packed.logit_index_NC]
    if temperature != 1.0:
        logits_NCV = logits_NCV / temperature
    return selective_log_softmax(logits_NCV, sequences_NT[:, -num_completion:], with_entropy=with_entropy)


@dataclass
class Packed:
    ids_US: torch.Tensor  # one sequence per distinct prompt: [left padding, prompt, completion 1, ..., completion K]
    positions_US: torch.Tensor
    mask_U1SS: torch.Tensor  # additive: 0 where a query may attend, the dtype's minimum elsewhere
    keep_K: torch.Tensor  # the positions whose logits are needed
    unique_N: torch.Tensor  # row n's packed sequence
    logit_index_NC: torch.Tensor  # row n's logit for its completion token c, as an index into keep_K


def pack_by_prompt(sequences_NT: torch.Tensor, attention_mask_NT: torch.Tensor, num_completion: int,
                   mask_dtype: torch.dtype, hidden_size: int) -> Optional[Packed]:
    """Lay each distinct prompt once, followed by the completions of all rows that share it, each completion
    attending to the prompt and to itself only, at the positions it has in its own row: the same log-probs as
    whole rows (a test checks values and gradients) for fewer tokens. G rows of a group: P + G*C tokens instead
    of G*(P + C).

    None when no two rows share a prompt, or when packing would cost more: per layer, the linear layers cost
    ~24 h^2 per token and attention ~4 h per query-key pair, and a packed sequence of S = P + G*C positions pays
    attention over all S^2 pairs (its mask is not causal-shaped), so long completions are better left unpacked."""
    n, t = sequences_NT.shape
    p, c = t - num_completion, num_completion
    if p < 1 or n < 2:
        return None
    device = sequences_NT.device
    keys_UT, unique_N = torch.unique(torch.cat([sequences_NT[:, :p], attention_mask_NT[:, :p]], dim=1), dim=0,
                                     return_inverse=True)
    u = len(keys_UT)
    if u == n:
        return None
    slot_N = torch.zeros(n, dtype=torch.long)  # the row's completion block within its packed sequence
    counts = torch.zeros(u, dtype=torch.long)
    for row, seq in enumerate(unique_N.tolist()):
        slot_N[row] = counts[seq]
        counts[seq] += 1
    k = int(counts.max())
    s = p + k * c
    if u * (6 * hidden_size * s + s * s) >= n * (6 * hidden_size * t + t * t):
        return None
    prompt_mask_UP = keys_UT[:, p:]
    ids_US = torch.zeros(u, s, dtype=sequences_NT.dtype, device=device)
    ids_US[:, :p] = keys_UT[:, :p]
    length_U = prompt_mask_UP.sum(dim=1)
    positions_US = torch.zeros(u, s, dtype=torch.long, device=device)
    positions_US[:, :p] = position_ids(prompt_mask_UP)
    block = torch.arange(c, device=device)
    # keys a query may see: prompt keys (real tokens, causal), and its own completion block (causal)
    allowed_USS = torch.zeros(u, s, s, dtype=torch.bool, device=device)
    causal_PP = torch.ones(p, p, dtype=torch.bool, device=device).tril()
    allowed_USS[:, :p, :p] = causal_PP & prompt_mask_UP.bool().unsqueeze(1)
    causal_CC = torch.ones(c, c, dtype=torch.bool, device=device).tril()
    for row in range(n):
        seq, start = int(unique_N[row]), p + int(slot_N[row]) * c
        ids_US[seq, start:start + c] = sequences_NT[row, p:]
        positions_US[seq, start:start + c] = length_U[seq] + block
        allowed_USS[seq, start:start + c, :p] = prompt_mask_UP[seq].bool()
        allowed_USS[seq, start:start + c, start:start + c] = causal_CC
    allowed_USS |= torch.eye(s, dtype=torch.bool, device=device)  # padding queries see themselves: no empty row
    mask_U1SS = torch.zeros(u, 1, s, s, dtype=mask_dtype, device=device)
    mask_U1SS.masked_fill_(~allowed_USS.unsqueeze(1), torch.finfo(mask_dtype).min)
    # logits: the prompt's last position predicts every completion's first token; block position j-1 token j
    starts = p + torch.arange(k, device=device).unsqueeze(1) * c
    keep_K = torch.cat([torch.tensor([p - 1], device=device), (starts + block[:-1]).flatten()])
    logit_index_NC = torch.zeros(n, c, dtype=torch.long, device=device)
    logit_index_NC[:, 1:] = 1 + slot_N.to(device).unsqueeze(1) * (c - 1) + block[:-1]
    return Packed(ids_US, positions_US, mask_U1SS, keep_K, unique_N, logit_index_NC)
