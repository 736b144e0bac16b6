"""Grouped generation and completion masks.

Shape legend: B prompts on this rank, G completions per prompt, N = B * G, P prompt length (left-padded),
C completion length (right-padded), T = P + C.

Masks come from positions, never from token values: a chat template's EOS (e.g. `<|im_end|>`) also closes the
system and user turns inside the prompt, and the pad token is often the EOS itself, so "token != pad" is wrong
both ways. The prompt mask is the tokenizer's; the completion mask is 1 up to and including the first EOS that
`generate` produced, and 0 after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from .models import position_ids


@dataclass
class Rollout:
    sequences_NT: torch.Tensor
    attention_mask_NT: torch.Tensor
    completion_mask_NC: torch.Tensor
    truncated_N: torch.Tensor  # bool: no EOS within the generation budget

    @property
    def completion_ids_NC(self) -> torch.Tensor:
        return self.sequences_NT[:, -self.completion_mask_NC.shape[1]:]


def completion_mask(completion_ids_NC: torch.Tensor, eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_NC, truncated_N): 1 on every position up to and including the first EOS; a row without an EOS is
    kept whole and flagged as truncated.

    >>> completion_mask(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]]), [2])
    (tensor([[1, 1, 0, 0],
            [1, 1, 1, 1]]), tensor([False,  True]))
    """
    is_eos_NC = torch.isin(completion_ids_NC, torch.tensor(list(eos_token_ids), device=completion_ids_NC.device))
    # Number of EOS tokens strictly before each position: zero up to and including the first EOS.
    eos_before_NC = torch.cumsum(is_eos_NC.long(), dim=1) - is_eos_NC.long()
    mask_NC = (eos_before_NC == 0).long()
    return mask_NC, ~is_eos_NC.any(dim=1)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the generation config's (often a list, e.g. `<|im_end|>` and
    `<|endoftext|>`) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model and tokenizer define no EOS token; completions could never end")
    return ids


class _StopWhen(StoppingCriteria):
    def __init__(self, predicate: Callable[[], bool]):
        self.predicate = predicate

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.predicate(), dtype=torch.bool, device=input_ids.device)


def _shared_prefill(model, encoded, first: int, count: int, group_size: int) -> DynamicCache:
    """The KV cache of prompts [first, first + count) minus their last token, computed once per prompt and
    repeated for the group's rows; generate() then feeds only the last prompt token before sampling."""
    device = next(model.parameters()).device
    ids_BP = encoded["input_ids"][first:first + count, :-1].to(device)
    mask_BP = encoded["attention_mask"][first:first + count, :-1].to(device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids_BP, attention_mask=mask_BP, position_ids=position_ids(mask_BP),
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(group_size)
    return cache


@torch.no_grad()
def generate_groups(model, tokenizer, prompts: list[str], *, group_size: int, max_new_tokens: int,
                    temperature: float, top_p: float, rollout_batch_size: int = 0, max_length: int = 0,
                    synced_gpus: bool = False, should_stop: Optional[Callable[[], bool]] = None,
                    fixed_length: bool = False, share_prefill: bool = True) -> Rollout:
    """All `group_size` completions of every prompt, in batched `generate` calls of `rollout_batch_size` rows
    (0: all N rows in one call). Prompts are tokenized once, left-padded, and each is repeated G times in a row,
    so rows [g * G, (g + 1) * G) form prompt g's group. `synced_gpus` keeps ZeRO-3 ranks stepping together when
    parameters are gathered per forward. `max_length` (0: none) caps prompt + completion. `should_stop` ends
    decoding early (the caller then abandons the rollout), so a preemption signal is honoured within one token.
    `fixed_length` suppresses EOS until max_new_tokens, so every completion has the same length (benchmarks).
    `share_prefill` runs each prompt's forward pass once and copies its KV cache to the G rows of its group
    (instead of G identical prefills); it applies when every call holds whole groups (rollout_batch_size a
    multiple of group_size, or 0).
    """
    assert tokenizer.padding_side == "left", "generation needs left padding"
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids_NP = encoded["input_ids"].repeat_interleave(group_size, dim=0).to(device)
    prompt_mask_NP = encoded["attention_mask"].repeat_interleave(group_size, dim=0).to(device)
    num_prompt = prompt_ids_NP.shape[1]
    if max_length:
        if num_prompt >= max_length:
            raise ValueError(f"--max_length {max_length}: a prompt has {num_prompt} tokens, no room to generate")
        max_new_tokens = min(max_new_tokens, max_length - num_prompt)
    eos_ids = eos_token_ids(model, tokenizer)
    n = prompt_ids_NP.shape[0]
    chunk = rollout_batch_size or n
    stopping = StoppingCriteriaList([_StopWhen(should_stop)]) if should_stop is not None else None
    completions = []
    share = share_prefill and chunk % group_size == 0 and num_prompt > 1
    for start in range(0, n, chunk):
        cache = _shared_prefill(model, encoded, start // group_size, chunk // group_size, group_size) if share else None
        out = model.generate(
            input_ids=prompt_ids_NP[start:start + chunk], attention_mask=prompt_mask_NP[start:start + chunk],
            past_key_values=cache,
            do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if fixed_length else 0,
            eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True, synced_gpus=synced_gpus,
            stopping_criteria=stopping)
        completions.append(out[:, num_prompt:])
    width = max(c.shape[1] for c in completions)
    completion_ids_NC = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    for start, c in zip(range(0, n, chunk), completions):
        completion_ids_NC[start:start + c.shape[0], :c.shape[1]] = c
    # A chunk shorter than `width` stopped because every one of its rows had emitted an EOS, so the padding added
    # here always lies after a row's first EOS and stays outside the mask.
    mask_NC, truncated_N = completion_mask(completion_ids_NC, eos_ids)
    return Rollout(
        sequences_NT=torch.cat([prompt_ids_NP, completion_ids_NC], dim=1),
        attention_mask_NT=torch.cat([prompt_mask_NP, mask_NC], dim=1),
        completion_mask_NC=mask_NC,
        truncated_N=truncated_N,
    )
