"""Per-token log-probs (and entropies) of completion tokens under a model: the math shared by the reference pass,
the old-log-prob pass and the update. Rows that share a prompt share one forward pass (pack_by_prompt).

Shape legend: N sequences, T positions, C completion positions (the last C of T), V vocabulary, U distinct prompts,
S packed positions, K kept logit positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


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
    attention other than plain sdpa (eager, flash-attention, softcapped or sliding-window attention), every row
    runs whole."""
    config = getattr(model, "module", model).config
    packable = (getattr(config, "_attn_implementation", "sdpa") == "sdpa"
                and not getattr(config, "attn_logit_softcapping", None)
                and not (getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None)))
    packed = pack_by_prompt(sequences_NT, attention_mask_NT, num_completion) if packable else None
    if packed is None:
        logits_NCV = model(input_ids=sequences_NT, attention_mask=attention_mask_NT,
                           position_ids=position_ids(attention_mask_NT), use_cache=False,
                           logits_to_keep=num_completion + 1).logits[:, :-1]
    else:
        logits_UKV = model(input_ids=packed.ids_US, position_ids=packed.positions_US, use_cache=False,
                           logits_to_keep=packed.keep_K, shared_prompt=packed.layout).logits
        logits_NCV = logits_UKV[packed.unique_N.unsqueeze(1), packed.logit_index_NC]
    if temperature != 1.0:
        logits_NCV = logits_NCV / temperature
    return selective_log_softmax(logits_NCV, sequences_NT[:, -num_completion:], with_entropy=with_entropy)


@dataclass
class SharedPrompt:
    """Where a packed sequence's parts are: the prompt's P positions, then K blocks of C completion positions, and
    which keys each part may attend to (True: attend)."""

    p: int
    c: int
    k: int
    prompt_U1PP: torch.Tensor  # the prompt's queries: causal over its real tokens (padding sees itself)
    blocks_X1CL: torch.Tensor  # X = U * K blocks, L = P + C keys: the prompt's real tokens, then its own block, causal


@dataclass
class Packed:
    ids_US: torch.Tensor  # one sequence per distinct prompt: [left padding, prompt, completion 1, ..., completion K]
    positions_US: torch.Tensor
    layout: SharedPrompt
    keep_K: torch.Tensor  # the positions whose logits are needed
    unique_N: torch.Tensor  # row n's packed sequence
    logit_index_NC: torch.Tensor  # row n's logit for its completion token c, as an index into keep_K


def pack_by_prompt(sequences_NT: torch.Tensor, attention_mask_NT: torch.Tensor,
                   num_completion: int) -> Optional[Packed]:
    """Lay each distinct prompt once, followed by the completions of all rows that share it, each completion
    attending to the prompt and to itself only, at the positions it has in its own row: the same log-probs as
    whole rows (a test checks values and gradients) for fewer tokens. G rows of a group: P + G*C tokens through
    the linear layers instead of G*(P + C), and attention over P^2 / 2 + G*C*(P + C) query-key pairs, not
    G*(P + C)^2 (shared_prompt_attention runs the prompt and each completion block apart, never the dense
    (P + G*C)^2 square), so packing pays at every length. None when no two rows share a prompt."""
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
    prompt_mask_UP = keys_UT[:, p:].to(device)
    ids_US = torch.zeros(u, s, dtype=sequences_NT.dtype, device=device)
    ids_US[:, :p] = keys_UT[:, :p]
    length_U = prompt_mask_UP.sum(dim=1)
    positions_US = torch.zeros(u, s, dtype=torch.long, device=device)
    positions_US[:, :p] = position_ids(prompt_mask_UP)
    block = torch.arange(c, device=device)
    for row in range(n):
        seq, start = int(unique_N[row]), p + int(slot_N[row]) * c
        ids_US[seq, start:start + c] = sequences_NT[row, p:]
        positions_US[seq, start:start + c] = length_U[seq] + block
    # blocks no row fills (a prompt with fewer rows than the most) hold padding: computed, never read
    real_UP = prompt_mask_UP.bool()
    prompt_U1PP = (torch.ones(p, p, dtype=torch.bool, device=device).tril() & real_UP.unsqueeze(1)
                   | torch.eye(p, dtype=torch.bool, device=device)).unsqueeze(1)
    blocks_X1CL = torch.cat([real_UP.unsqueeze(1).unsqueeze(2).expand(u, k, c, p),
                             torch.ones(c, c, dtype=torch.bool, device=device).tril().expand(u, k, c, c)],
                            dim=3).reshape(u * k, 1, c, p + c)
    # logits: the prompt's last position predicts every completion's first token; block position j-1 token j
    starts = p + torch.arange(k, device=device).unsqueeze(1) * c
    keep_K = torch.cat([torch.tensor([p - 1], device=device), (starts + block[:-1]).flatten()])
    logit_index_NC = torch.zeros(n, c, dtype=torch.long, device=device)
    logit_index_NC[:, 1:] = 1 + slot_N.to(device).unsqueeze(1) * (c - 1) + block[:-1]
    return Packed(ids_US, positions_US, SharedPrompt(p, c, k, prompt_U1PP, blocks_X1CL), keep_K, unique_N,
                  logit_index_NC)


def shared_prompt_attention(module, query_UHSD: torch.Tensor, key_UGSD: torch.Tensor, value_UGSD: torch.Tensor,
                            attention_mask=None, scaling: Optional[float] = None, dropout: float = 0.0,
                            shared_prompt: Optional[SharedPrompt] = None, **kwargs):
    """Attention over a packed sequence (pack_by_prompt) in two parts: the prompt's queries over the prompt, and
    every completion block's queries over [the prompt's keys, its own block's keys], the blocks batched. The
    same result as one attention under the packed block mask, without computing its (P + K*C)^2 square.
    H query heads, G key-value heads. Reached through `_sdpa_or_shared_prompt`."""
    lay = shared_prompt
    u, h, _, d = query_UHSD.shape
    p, c, k = lay.p, lay.c, lay.k
    rep = h // key_UGSD.shape[1]
    key_UHSD = key_UGSD.repeat_interleave(rep, dim=1) if rep > 1 else key_UGSD
    value_UHSD = value_UGSD.repeat_interleave(rep, dim=1) if rep > 1 else value_UGSD
    sdpa = torch.nn.functional.scaled_dot_product_attention
    prompt_UHPD = sdpa(query_UHSD[:, :, :p], key_UHSD[:, :, :p], value_UHSD[:, :, :p], attn_mask=lay.prompt_U1PP,
                       dropout_p=dropout, scale=scaling)

    def blocks(x_UHSD):  # U x H x (K*C) x D -> (U*K) x H x C x D
        return x_UHSD[:, :, p:].reshape(u, h, k, c, d).transpose(1, 2).reshape(u * k, h, c, d)

    def with_prompt(x_UHSD):  # each block's keys or values, after the prompt's: (U*K) x H x (P + C) x D
        shared = x_UHSD[:, :, :p].unsqueeze(1).expand(u, k, h, p, d).reshape(u * k, h, p, d)
        return torch.cat([shared, blocks(x_UHSD)], dim=2)

    blocks_XHCD = sdpa(blocks(query_UHSD), with_prompt(key_UHSD), with_prompt(value_UHSD), attn_mask=lay.blocks_X1CL,
                       dropout_p=dropout, scale=scaling)
    blocks_UHKD = blocks_XHCD.reshape(u, k, h, c, d).transpose(1, 2).reshape(u, h, k * c, d)
    return torch.cat([prompt_UHPD, blocks_UHKD], dim=2).transpose(1, 2).contiguous(), None


def _sdpa_or_shared_prompt(module, query, key, value, attention_mask, *args, shared_prompt=None, **kwargs):
    """transformers' "sdpa" attention, unless the forward pass carries a packed layout (`shared_prompt=`, passed
    down to every attention call with the model's other keyword arguments, and replayed with them when gradient
    checkpointing recomputes a layer): then shared_prompt_attention. Registered in place of "sdpa" at import."""
    if shared_prompt is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    return shared_prompt_attention(module, query, key, value, attention_mask, *args, shared_prompt=shared_prompt,
                                   **kwargs)


AttentionInterface.register("sdpa", _sdpa_or_shared_prompt)
