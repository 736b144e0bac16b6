"""The one generation path of training, evaluation, ask and serve: sampling settings, batched generation of groups of
completions, and completion masks.

Prompts are rendered by data.render_prompt / data.render_chat, so every caller asks a model the same way.

Shape legend: B prompts, G completions per prompt (group_size), N = B * G rows, P prompt length (left-padded),
C completion length (right-padded), T = P + C.

Masks come from positions, never from token values: a chat template's EOS (e.g. `<|im_end|>`) also closes the
system and user turns inside the prompt, and the pad token is often the EOS itself, so "token != pad" is wrong
both ways. The prompt mask is the tokenizer's; the completion mask is 1 up to and including the first EOS that
`generate` produced, and 0 after it.

With tools (tools.Session), a completion is an episode: the model's turns and the tool results between them
(`episodes`). The attention mask covers the whole episode (the results are context), the completion mask only the
model's own tokens (each turn up to and including its EOS): the loss, KL, entropy, clip fraction and lengths read
the completion mask, so tool-result tokens never receive gradient (TRL's tool_mask); `tool_mask_NC` marks them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
from transformers import (Cache, DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList)
from transformers.cache_utils import StaticLayer

from .logprobs import position_ids

if TYPE_CHECKING:
    from .tools import Session


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn. temperature 0 is greedy decoding. top_k=0 and repetition_penalty=1.0 override
    whatever a model's generation_config suggests, so a sampled completion comes from the plain (temperature-scaled,
    nucleus-truncated) softmax that GRPO's log-probs describe."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    fixed_length: bool = False  # suppress EOS until max_new_tokens (benchmarks)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens {self.max_new_tokens}: expected a positive integer")
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: expected >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p {self.top_p}: expected a value in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self, max_new_tokens: Optional[int] = None) -> dict:
        """Hugging Face generate's arguments. Temperature and top-p are not among them: _SamplerLogprobs applies
        them (sampling_scores, as HF's warpers do) as the last logits processor, so that it sees the distribution
        each token is drawn from; HF's own warpers are kept off (temperature 1, top-p 1, top-k 0)."""
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        common = {"max_new_tokens": budget, "min_new_tokens": budget if self.fixed_length else 0,
                  "repetition_penalty": 1.0}
        if self.greedy:
            return {**common, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {**common, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


@dataclass
class Rollout:
    sequences_NT: torch.Tensor
    attention_mask_NT: torch.Tensor  # prompt tokens, and the whole completion (an episode's tool results too)
    completion_mask_NC: torch.Tensor  # the model's own tokens: what the loss sees
    truncated_N: torch.Tensor  # bool: no EOS within the generation budget
    # the log-probability of each sampled token under the distribution it was drawn from (after temperature and
    # top-p; greedy: the plain softmax), recorded while sampling; 0 outside the completion mask
    sampler_logprobs_NC: Optional[torch.Tensor] = None
    # with tools: 1 on the tool-result tokens of each episode (context, never trained), and each episode's
    # conversation (the model's turns and the tool results, as chat messages)
    tool_mask_NC: Optional[torch.Tensor] = None
    messages_N: Optional[list] = None

    @property
    def completion_ids_NC(self) -> torch.Tensor:
        return self.sequences_NT[:, -self.completion_mask_NC.shape[1]:]

    @property
    def episode_mask_NC(self) -> torch.Tensor:
        """The whole completion: the model's tokens and, in an episode, the tool results between its turns."""
        return self.attention_mask_NT[:, -self.completion_mask_NC.shape[1]:]

    def texts(self, tokenizer) -> list[str]:
        """Each completion decoded from exactly its tokens, an episode's tool results included (the EOS, a special
        token, leaves no text)."""
        ids_NC, mask_NC = self.completion_ids_NC.cpu(), self.episode_mask_NC.cpu()
        return tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(ids_NC, mask_NC)], skip_special_tokens=True)


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


class _SamplerLogprobs(LogitsProcessor):
    """The last logits processor of Hugging Face's generate: applies the sampling transform (sampling_scores) and
    records, for each row, the log-probability of the token then drawn from those scores (read from the next
    step's input_ids, so only one step's log-softmax is ever held)."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.previous_NV: Optional[torch.Tensor] = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self._take(input_ids[:, -1])
        scores = sampling_scores(scores, self.sampling)
        self.previous_NV = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, tokens_N: torch.Tensor) -> None:
        if self.previous_NV is not None:
            self.logprobs.append(self.previous_NV.gather(1, tokens_N.unsqueeze(1)).squeeze(1))
            self.previous_NV = None

    def finish(self, completion_ids_NC: torch.Tensor) -> torch.Tensor:
        """N x C: the recorded log-probs, the last drawn token's included."""
        if completion_ids_NC.shape[1]:
            self._take(completion_ids_NC[:, -1])
        logprobs = self.logprobs[:completion_ids_NC.shape[1]]
        if not logprobs:
            return torch.zeros(completion_ids_NC.shape, dtype=torch.float32, device=completion_ids_NC.device)
        return torch.stack(logprobs, dim=1)


class _StopWhen(StoppingCriteria):
    def __init__(self, predicate: Callable[[], bool]):
        self.predicate = predicate

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.predicate(), dtype=torch.bool, device=input_ids.device)


def left_pad(tokenizer, prompts: Union[list[str], list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BP, mask_BP) of prompts given as text (tokenized without special tokens: a rendered chat template has
    them already) or as token ids, left-padded to the longest."""
    if prompts and isinstance(prompts[0], str):
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return encoded["input_ids"], encoded["attention_mask"]
    width = max(len(ids) for ids in prompts)
    ids_BP = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + list(ids) for ids in prompts])
    mask_BP = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    return ids_BP, mask_BP


def _shared_prefill(model, ids_BP: torch.Tensor, mask_BP: torch.Tensor, group_size: int) -> DynamicCache:
    """The KV cache of these prompts minus their last token, computed once per prompt and repeated for the group's
    rows; generate() then feeds only the last prompt token before sampling."""
    ids_BP, mask_BP = ids_BP[:, :-1], mask_BP[:, :-1]
    cache = DynamicCache(config=model.config)
    model(input_ids=ids_BP, attention_mask=mask_BP, position_ids=position_ids(mask_BP), cache=cache,
          use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(group_size)
    return cache


def _prefill_continued(model, prompt_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, prompt_of_R: torch.Tensor,
                       suffix_RS: torch.Tensor, suffix_mask_RS: torch.Tensor) -> tuple[DynamicCache, torch.Tensor,
                                                                                       torch.Tensor]:
    """Rows that continue shared prompts: row r is prompt `prompt_of_R[r]` (of B, left-padded alike) followed by its
    own suffix (left-padded too, so a masked gap may lie between the two; positions skip it). Each prompt the rows
    use runs its forward once and its cache is copied to its rows; the rows' suffixes minus their last token then
    run on top. Returns (the cache of the rows' first T - 1 positions, ids_RT, mask_RT), T = P + S: the last column
    is the first decode step, as in generate()."""
    used_U, prompt_of_R = torch.unique(prompt_of_R, return_inverse=True)
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt_BP[used_U], attention_mask=prompt_mask_BP[used_U],
          position_ids=position_ids(prompt_mask_BP[used_U]), cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_select_indices(prompt_of_R)
    ids_RT = torch.cat([prompt_BP[used_U][prompt_of_R], suffix_RS], dim=1)
    mask_RT = torch.cat([prompt_mask_BP[used_U][prompt_of_R], suffix_mask_RS], dim=1)
    p = prompt_BP.shape[1]
    if suffix_RS.shape[1] > 1:
        model(input_ids=suffix_RS[:, :-1], attention_mask=mask_RT[:, :-1],
              position_ids=position_ids(mask_RT[:, :-1])[:, p:], cache=cache, use_cache=True, logits_to_keep=1)
    return cache, ids_RT, mask_RT


@torch.no_grad()
def continue_rows(model, tokenizer, prompt_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, prompt_of_R: list[int],
                  suffixes: list[list[int]], sampling: Sampling, *, batch_size: int = 0,
                  should_stop: Optional[Callable[[], bool]] = None,
                  engine: Optional["StaticDecoder"] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One more turn for rows that each continue one of B shared prompts with their own tokens (an episode's
    turns and tool results so far): the same tokens as `generate` on the whole rows, but each prompt is prefilled
    once per call instead of once per row (see _prefill_continued). In calls of `batch_size` rows (0: all), with
    either engine. Returns (completion ids R x C, the sampler's log-probs R x C, completion mask R x C)."""
    device = prompt_BP.device
    eos_ids = eos_token_ids(model, tokenizer)
    chunk = batch_size or len(suffixes)
    completions, sampler_logprobs = [], []
    for start in range(0, len(suffixes), chunk):
        rows = slice(start, start + chunk)
        ids_BP, mask_BP = prompt_BP, prompt_mask_BP
        suffix_RS, suffix_mask_RS = left_pad(tokenizer, suffixes[rows])
        if engine is not None:  # its cache is sized in buckets: pad the prompts so the whole row fills whole ones
            extra = -(ids_BP.shape[1] + suffix_RS.shape[1]) % engine.bucket
            ids_BP = torch.nn.functional.pad(ids_BP, (extra, 0), value=tokenizer.pad_token_id)
            mask_BP = torch.nn.functional.pad(mask_BP, (extra, 0), value=0)
        cache, ids_RT, mask_RT = _prefill_continued(
            model, ids_BP, mask_BP, torch.tensor(prompt_of_R[rows], device=device), suffix_RS.to(device),
            suffix_mask_RS.to(device))
        if engine is not None:
            ids_RC, logprobs_RC = engine.decode(ids_RT, mask_RT, 1, sampling, sampling.max_new_tokens, eos_ids,
                                                tokenizer.pad_token_id, should_stop, prefix=cache)
        else:
            ids_RC, logprobs_RC = _hf_decode(model, ids_RT, mask_RT, cache, sampling, sampling.max_new_tokens,
                                             eos_ids, tokenizer.pad_token_id,
                                             [_StopWhen(should_stop)] if should_stop else [])
        completions.append(ids_RC)
        sampler_logprobs.append(logprobs_RC)
    ids_NC, logprobs_NC = _stack(completions, sampler_logprobs, chunk, tokenizer.pad_token_id, device)
    mask_NC, _ = completion_mask(ids_NC, eos_ids)
    return ids_NC, logprobs_NC * mask_NC, mask_NC


def _hf_decode(model, ids_NT: torch.Tensor, mask_NT: torch.Tensor, cache: Optional[DynamicCache], sampling: Sampling,
               max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, criteria: list,
               synced_gpus: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's `generate` on these rows (from `cache` when prefilled: all but the last column): (completion
    ids N x C, the sampler's log-prob of each, N x C)."""
    recorder = _SamplerLogprobs(sampling)
    out = model.generate(
        input_ids=ids_NT, attention_mask=mask_NT, **({"cache": cache} if cache is not None else {}),
        eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True, synced_gpus=synced_gpus,
        stopping_criteria=StoppingCriteriaList(criteria) if criteria else None,
        logits_processor=LogitsProcessorList([recorder]), **sampling.generate_kwargs(max_new_tokens))
    completion_NC = out[:, ids_NT.shape[1]:]
    return completion_NC, recorder.finish(completion_NC)


def _stack(completions: list[torch.Tensor], sampler_logprobs: list[torch.Tensor], chunk: int, pad_id: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The calls' completions (and sampler log-probs) as one N x C block, right-padded to the widest call. A call
    narrower than the widest stopped because every one of its rows had emitted an EOS, so the padding added here
    always lies after a row's first EOS and stays outside the mask."""
    n = sum(c.shape[0] for c in completions)
    width = max(c.shape[1] for c in completions)
    completion_ids_NC = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    logprobs_NC = torch.zeros((n, width), dtype=torch.float32, device=device)
    for start, c, lp in zip(range(0, n, chunk), completions, sampler_logprobs):
        completion_ids_NC[start:start + c.shape[0], :c.shape[1]] = c
        logprobs_NC[start:start + lp.shape[0], :lp.shape[1]] = lp
    return completion_ids_NC, logprobs_NC


@torch.no_grad()
def generate(model, tokenizer, prompts: Union[list[str], list[list[int]]], sampling: Sampling, *,
             group_size: int = 1, batch_size: int = 0, max_length: int = 0, share_prefill: bool = True,
             synced_gpus: bool = False, should_stop: Optional[Callable[[], bool]] = None,
             stopping: Optional[StoppingCriteria] = None, engine: Optional["StaticDecoder"] = None,
             tools: Optional["Session"] = None, max_episode_tokens: int = 0) -> Rollout:
    """`group_size` completions of every prompt, in batched `generate` calls of `batch_size` rows (0: all N rows in
    one call). Prompts (text or token ids) are left-padded once and each is repeated G times in a row, so rows
    [b * G, (b + 1) * G) form prompt b's group.

    `max_length` (0: none) caps prompt + completion. `synced_gpus` keeps ZeRO-3 ranks stepping together when
    parameters are gathered per forward. `should_stop` ends decoding early (the caller then abandons the rollout),
    so a preemption signal is honoured within one token; `stopping` is any further StoppingCriteria (the server
    follows its rows with one). `share_prefill` runs each prompt's forward pass once and copies its KV cache to the
    G rows of its group (instead of G identical prefills), when every call holds whole groups.

    `engine` None decodes with Hugging Face's `generate`; a StaticDecoder decodes with its static KV cache (and, on
    a GPU, a compiled decode step replayed as a CUDA graph): the same Rollout layout, masks and flags.

    `tools` (a tools.Session with one row per completion) makes each completion an episode: see `episodes`.
    `prompts` may then also hold one prompt per row (group_size 1), when an environment's reset changed them."""
    assert tokenizer.padding_side == "left", "generation needs left padding"
    if tools is not None:
        if stopping is not None or synced_gpus or sampling.fixed_length:
            raise ValueError("tool rollouts take no StoppingCriteria, synced_gpus or fixed_length")
        return episodes(model, tokenizer, prompts, sampling, tools, group_size=group_size, batch_size=batch_size,
                        max_length=max_length, share_prefill=share_prefill, should_stop=should_stop, engine=engine,
                        max_episode_tokens=max_episode_tokens)
    device = next(model.parameters()).device
    ids_BP, mask_BP = left_pad(tokenizer, prompts)
    ids_BP, mask_BP = ids_BP.to(device), mask_BP.to(device)
    prompt_ids_NP = ids_BP.repeat_interleave(group_size, dim=0)
    prompt_mask_NP = mask_BP.repeat_interleave(group_size, dim=0)
    num_prompt = prompt_ids_NP.shape[1]
    max_new_tokens = sampling.max_new_tokens
    if max_length:
        if num_prompt >= max_length:
            raise ValueError(f"--max_length {max_length}: a prompt has {num_prompt} tokens, no room to generate")
        max_new_tokens = min(max_new_tokens, max_length - num_prompt)
    eos_ids = eos_token_ids(model, tokenizer)
    n = prompt_ids_NP.shape[0]
    chunk = batch_size or n
    criteria = ([_StopWhen(should_stop)] if should_stop is not None else []) + ([stopping] if stopping else [])
    share = share_prefill and group_size > 1 and chunk % group_size == 0 and num_prompt > 1
    completions, sampler_logprobs = [], []
    for start in range(0, n, chunk):
        first, count = start // group_size, chunk // group_size
        if engine is not None:
            if stopping is not None or synced_gpus:
                raise ValueError("the static decoding engine takes no StoppingCriteria and no synced_gpus")
            whole_groups = chunk % group_size == 0
            ids, mask, g = ((ids_BP[first:first + count], mask_BP[first:first + count], group_size) if whole_groups
                            else (prompt_ids_NP[start:start + chunk], prompt_mask_NP[start:start + chunk], 1))
            ids_NC, logprobs_NC = engine.decode(ids, mask, g, sampling, max_new_tokens, eos_ids,
                                                tokenizer.pad_token_id, should_stop)
            completions.append(ids_NC)
            sampler_logprobs.append(logprobs_NC)
            continue
        cache = (_shared_prefill(model, ids_BP[first:first + count], mask_BP[first:first + count], group_size)
                 if share else None)
        ids_NC, logprobs_NC = _hf_decode(model, prompt_ids_NP[start:start + chunk],
                                         prompt_mask_NP[start:start + chunk], cache, sampling, max_new_tokens,
                                         eos_ids, tokenizer.pad_token_id, criteria, synced_gpus)
        completions.append(ids_NC)
        sampler_logprobs.append(logprobs_NC)
    completion_ids_NC, logprobs_NC = _stack(completions, sampler_logprobs, chunk, tokenizer.pad_token_id, device)
    mask_NC, truncated_N = completion_mask(completion_ids_NC, eos_ids)
    return Rollout(
        sequences_NT=torch.cat([prompt_ids_NP, completion_ids_NC], dim=1),
        attention_mask_NT=torch.cat([prompt_mask_NP, mask_NC], dim=1),
        completion_mask_NC=mask_NC,
        truncated_N=truncated_N,
        sampler_logprobs_NC=logprobs_NC * mask_NC,
    )


def episodes(model, tokenizer, prompts: Union[list[str], list[list[int]]], sampling: Sampling, session: "Session", *,
             group_size: int = 1, batch_size: int = 0, max_length: int = 0, share_prefill: bool = True,
             should_stop: Optional[Callable[[], bool]] = None, engine: Optional["StaticDecoder"] = None,
             max_episode_tokens: int = 0) -> Rollout:
    """Multi-turn rollouts: every row decodes a turn (the first for all rows at once, as `generate`, shared
    prefills included); the session runs the tools each row's turn called and returns the tokens of the results;
    the rows that go on decode their next turn after them, each from its own history (prompt, turns and results
    as tokens, never re-tokenized, so the sequence trained on is the one sampled), while rows that called no tool
    are done. Either engine decodes every turn.

    Budgets, per row: `sampling.max_new_tokens` counts the model's tokens over all turns; `max_episode_tokens`
    (0: twice that) caps the whole episode, results included; `max_length` caps prompt + episode. A turn cut by a
    budget before its EOS ends the episode, flagged truncated; results that would leave no room for a model token
    are not shown and the episode ends there (TRL drops them likewise).

    Later turns run in one batch of the rows that go on. No KV cache is kept between turns, but with
    `share_prefill` each group's prompt (often most of a row: the tool schemas, a worked example) is prefilled once
    per turn and only each row's own turns and results on top (continue_rows); without it every row is prefilled
    whole. The rows that called a tool wait for the round's slowest tool (each call bounded by the session's
    timeout); the others have finished."""
    budget = sampling.max_new_tokens
    cap = max_episode_tokens or 2 * budget
    first = generate(model, tokenizer, prompts, dataclasses.replace(sampling, max_new_tokens=min(budget, cap)),
                     group_size=group_size, batch_size=batch_size, max_length=max_length, share_prefill=share_prefill,
                     should_stop=should_stop, engine=engine)
    eos = set(eos_token_ids(model, tokenizer))
    n, num_prompt = first.sequences_NT.shape[0], first.sequences_NT.shape[1] - first.completion_mask_NC.shape[1]
    prompt_NP, prompt_mask_NP = first.sequences_NT[:, :num_prompt], first.attention_mask_NT[:, :num_prompt]
    prompt_rows = [ids[m.bool()].tolist() for ids, m in zip(prompt_NP.cpu(), prompt_mask_NP.cpu())]
    shared = share_prefill and group_size > 1
    ids = [[] for _ in range(n)]  # each episode's tokens, after the prompt
    is_model = [[] for _ in range(n)]  # 1: the model's token, 0: a tool result's
    logprobs = [[] for _ in range(n)]
    used = [0] * n  # the model's tokens so far
    truncated = [False] * n

    def episode_room(row: int) -> int:
        """How many more tokens, of the model's or the tools', row's episode may hold."""
        left = cap - len(ids[row])
        return min(left, max_length - len(prompt_rows[row]) - len(ids[row])) if max_length else left

    def room(row: int) -> int:
        """How many more model tokens row's episode may take."""
        return min(budget - used[row], episode_room(row))

    def add_turn(row: int, turn_ids_C: torch.Tensor, turn_logprobs_C: torch.Tensor, limit: int) -> list[int]:
        turn, turn_logprobs = turn_ids_C.tolist()[:limit], turn_logprobs_C.tolist()[:limit]
        ids[row] += turn
        is_model[row] += [1] * len(turn)
        logprobs[row] += turn_logprobs
        used[row] += len(turn)
        return turn

    latest = {}
    for row, (row_ids, mask, lp) in enumerate(zip(first.completion_ids_NC.cpu(), first.completion_mask_NC.cpu(),
                                                  first.sampler_logprobs_NC.cpu())):
        latest[row] = add_turn(row, row_ids[mask.bool()], lp[mask.bool()], budget)
    active = list(range(n))
    while active:
        turns, rooms = {}, {}
        stopping = should_stop is not None and should_stop()
        for row in active:
            ended = bool(latest[row]) and latest[row][-1] in eos
            truncated[row] = not ended
            turns[row] = latest[row][:-1] if ended else latest[row]
            rooms[row] = episode_room(row) if ended and used[row] < budget and not stopping else 0
        results = session.respond(turns, rooms)  # the tools run here; rows without results are done
        active = [row for row in active if row in results]
        if not active:
            break
        for row in active:
            ids[row] += results[row]
            is_model[row] += [0] * len(results[row])
            logprobs[row] += [0.0] * len(results[row])
        limits = {row: room(row) for row in active}
        turn_sampling = dataclasses.replace(sampling, max_new_tokens=max(limits.values()))
        if shared:  # each group's prompt prefilled once, its rows' own turns and results on top
            out_ids, out_logprobs, out_mask = continue_rows(
                model, tokenizer, prompt_NP[::group_size], prompt_mask_NP[::group_size],
                [row // group_size for row in active], [ids[row] for row in active], turn_sampling,
                batch_size=batch_size, should_stop=should_stop, engine=engine)
        else:
            out = generate(model, tokenizer, [prompt_rows[row] + ids[row] for row in active], turn_sampling,
                           group_size=1, batch_size=batch_size, share_prefill=False, should_stop=should_stop,
                           engine=engine)
            out_ids, out_logprobs, out_mask = out.completion_ids_NC, out.sampler_logprobs_NC, out.completion_mask_NC
        for i, row in enumerate(active):
            mask = out_mask[i].cpu().bool()
            latest[row] = add_turn(row, out_ids[i].cpu()[mask], out_logprobs[i].cpu()[mask], limits[row])
    device = prompt_NP.device
    width = max(len(row_ids) for row_ids in ids)
    sequences_NC = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    episode_NC, model_NC = torch.zeros((n, width), dtype=torch.long), torch.zeros((n, width), dtype=torch.long)
    logprobs_NC = torch.zeros((n, width), dtype=torch.float32)
    for row in range(n):
        length = len(ids[row])
        sequences_NC[row, :length] = torch.tensor(ids[row], dtype=torch.long)
        episode_NC[row, :length] = 1
        model_NC[row, :length] = torch.tensor(is_model[row], dtype=torch.long)
        logprobs_NC[row, :length] = torch.tensor(logprobs[row], dtype=torch.float32)
    return Rollout(
        sequences_NT=torch.cat([prompt_NP, sequences_NC.to(device)], dim=1),
        attention_mask_NT=torch.cat([prompt_mask_NP, episode_NC.to(device)], dim=1),
        completion_mask_NC=model_NC.to(device),
        truncated_N=torch.tensor(truncated, device=device),
        sampler_logprobs_NC=(logprobs_NC * model_NC).to(device),
        tool_mask_NC=(episode_NC - model_NC).to(device),
        messages_N=session.messages,
    )


# ----------------------------------------------------------------------------- the static, compiled engine


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def sample_next(scores_RV: torch.Tensor, sampling: Sampling, rows_R: Optional[torch.Tensor] = None,
                num_rows: Optional[int] = None) -> torch.Tensor:
    """The next token of each row from its sampling_scores, on the device, as Hugging Face's generate draws it:
    the argmax when greedy, else torch.multinomial's own draw (softmax / q, q ~ Exp(1), argmax). The noise q is
    drawn for all `num_rows` rows of the batch (default: these), ended or not, and used for the rows still
    decoding, `rows_R`, so the random stream stays generate's after rows have left the batch."""
    if sampling.greedy:
        return scores_RV.argmax(dim=-1)
    n = scores_RV.shape[0] if num_rows is None else num_rows
    q_NV = torch.empty(n, scores_RV.shape[1], dtype=scores_RV.dtype, device=scores_RV.device).exponential_()
    q_RV = q_NV if rows_R is None or len(rows_R) == n else q_NV.index_select(0, rows_R)
    return (torch.softmax(scores_RV, dim=-1) / q_RV).argmax(dim=-1)


def sampling_scores(logits_NV: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The scores tokens are drawn from, as Hugging Face's warpers make them: temperature, then top-p (its
    TopPLogitsWarper: drop the lowest tokens whose cumulative probability stays within 1 - top_p, keep at least
    one). Greedy decoding keeps the logits (its recorded log-probs are the plain softmax's)."""
    if sampling.greedy:
        return logits_NV
    scores = logits_NV / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - sampling.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_index, remove), -float("inf"))
    return scores


class _FilledLayer(StaticLayer):
    """A static cache layer that hands attention only the slots written so far (`window`, set by the decoder before
    each step): the tensors are allocated once per shape, but a step at position t reads t slots, not the whole
    budget's. Rows that have ended can leave (`keep`)."""

    window: int = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return keys[:, :, :self.window], values[:, :, :self.window]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window, 0

    def keep(self, rows_R: torch.Tensor) -> None:
        self.keys, self.values = self.keys.index_select(0, rows_R), self.values.index_select(0, rows_R)
        if self.keys.device.type == "cuda":  # new tensors: fixed addresses for the CUDA graphs of the new shape
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)


class StaticDecoder:
    """The 'compiled' rollout engine: a decode loop over a static KV cache that does only the work that exists.

    Hugging Face's `generate` grows its cache by concatenation every token (a copy of the whole cache per token, so
    quadratic in the completion's length), runs every kernel of every layer from Python and keeps decoding rows that
    have ended; on a GPU, decoding a small model is then bound by launch overhead, not by memory bandwidth. Here:

    - the cache is allocated once for a shape (rows x prompt + new tokens) and written in place; attention reads
      only its filled part (`_FilledLayer`: exactly on a CPU, in windows of `window_bucket` slots when compiled);
    - rows that have ended leave the batch (at the host's checks, every `check_every` tokens: on a CPU as soon as
      a quarter of the rows have ended, compiled once half have, so row counts stay few), so the long tail of one
      row does not cost a whole batch;
    - tokens are drawn on the device with the random numbers `generate`'s multinomial draws, for every row, ended
      or not (one exponential per vocabulary entry and row), so the same seed gives the same tokens;
    - on a GPU the one-token step is compiled by torch.compile with CUDA graphs ('reduce-overhead').

    It reads the model's live parameters (no copy): the trainer passes the policy's module, and under ZeRO-3 calls
    it inside the gather of the whole policy.

    Shapes are bucketed so that compiles stay few on real data, where the prompt width changes every step: prompts
    are left-padded to a multiple of `bucket` tokens (masked, so the tokens drawn do not change), and the cache is
    sized for that width plus the budget. Every distinct (rows, cache length, window) decoded is one compile;
    `compiles` counts them, and dynamo's per-function limit is raised to what max_length allows, so a new shape
    compiles instead of silently falling back to eager execution (torch's default after 8)."""

    def __init__(self, model, compile: Optional[bool] = None, check_every: int = 8, bucket: int = 64,
                 window_bucket: int = 128, max_shapes: int = 256):
        self.model = model
        device = next(model.parameters()).device
        self.compile = device.type == "cuda" if compile is None else compile
        self.check_every = check_every
        self.bucket = bucket if self.compile else 1  # eager execution gains nothing from padding
        self.window_bucket = window_bucket if self.compile else 1
        self.compact_at = 0.5 if self.compile else 0.75  # compact once live rows are at most this share
        self.shapes: set[tuple[int, int, int]] = set()  # (rows, cache length, window) decoded: compiles, if compiled
        self.cache = None
        self.shape = None
        if self.compile:
            import torch._dynamo

            limit = torch._dynamo.config.cache_size_limit
            torch._dynamo.config.cache_size_limit = max(limit, max_shapes)
        # On a GPU: CUDA graphs ("reduce-overhead"); elsewhere inductor's fused kernels, if asked for
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.step = torch.compile(self._step, mode=mode, dynamic=False) if self.compile else self._step

    @property
    def compiles(self) -> int:
        """Compiled decode-step graphs so far (0 when not compiling): one per distinct (rows, cache length, window)."""
        return len(self.shapes) if self.compile else 0

    def _step(self, tokens_N1: torch.Tensor, position_N1: torch.Tensor, mask_NL: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens_N1, attention_mask=mask_NL, position_ids=position_N1, cache=self.cache,
                            use_cache=True).logits
        return logits[:, -1].float()

    def _cache_for(self, rows: int, length: int):
        """The static cache for this shape: allocated on first use, refilled (not reallocated) afterwards; stale
        slots are never read, as attention sees only the filled window."""
        if self.shape != (rows, length):
            layers = [_FilledLayer(length) for _ in range(self.model.config.num_hidden_layers)]
            self.cache, self.shape = Cache(layers=layers), (rows, length)
        return self.cache

    @torch.no_grad()
    def decode(self, ids_BP: torch.Tensor, mask_BP: torch.Tensor, group_size: int, sampling: Sampling,
               max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
               should_stop: Optional[Callable[[], bool]] = None,
               prefix: Optional[DynamicCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion ids N x C, the sampler's log-prob of each, N x C) (C <= max_new_tokens: decoding ends once
        every row has emitted an EOS) for B prompts, each repeated group_size times. The prompts (minus their last
        token) are prefilled once each and their cache repeated for the group; the last prompt token is the first
        decode step, as in generate(). `prefix`, when given, is that cache already computed for every row
        (group_size 1, the width a whole number of buckets: continue_rows prefills so).

        Shape legend here: R rows still decoding (R <= N), W the attention window (filled slots, bucketed)."""
        if prefix is not None and (group_size != 1 or ids_BP.shape[1] % self.bucket):
            raise ValueError("decode(prefix=...): rows of their own (group_size 1), whole buckets wide")
        width = -(-ids_BP.shape[1] // self.bucket) * self.bucket  # the prompt width's bucket
        if width > ids_BP.shape[1]:  # masked left padding: the same positions, the same tokens, one shape per bucket
            extra = width - ids_BP.shape[1]
            ids_BP = torch.nn.functional.pad(ids_BP, (extra, 0), value=pad_id)
            mask_BP = torch.nn.functional.pad(mask_BP, (extra, 0), value=0)
        n, p = ids_BP.shape[0] * group_size, ids_BP.shape[1]
        device = ids_BP.device
        length = p + max_new_tokens
        cache = self._cache_for(n, length)
        if prefix is None:
            prefix = DynamicCache(config=self.model.config)
            if p > 1:
                self.model(input_ids=ids_BP[:, :-1], attention_mask=mask_BP[:, :-1],
                           position_ids=position_ids(mask_BP[:, :-1]), cache=prefix, use_cache=True,
                           logits_to_keep=1)
                prefix.batch_repeat_interleave(group_size)
        dtype = next(self.model.parameters()).dtype
        for i, layer in enumerate(cache.layers):
            if not layer.is_initialized:  # allocate the static tensors for this shape (once per cache)
                empty = torch.zeros(n, self.model.config.num_key_value_heads, 1, self._head_dim(), dtype=dtype,
                                    device=device)
                layer.lazy_initialization(empty, empty)
            if p > 1:
                layer.keys[:, :, :p - 1].copy_(prefix.layers[i].keys)
                layer.values[:, :, :p - 1].copy_(prefix.layers[i].values)
            layer.cumulative_length.fill_(p - 1)
        del prefix
        mask_RL = torch.ones(n, length, dtype=mask_BP.dtype, device=device)  # later positions: causally hidden
        mask_RL[:, :p] = mask_BP.repeat_interleave(group_size, dim=0)
        tokens_R = ids_BP[:, -1].repeat_interleave(group_size)
        position_R = mask_RL[:, :p].sum(dim=1) - 1
        rows_R = torch.arange(n, device=device)  # the row (of N) each decoded row is
        eos_N = torch.tensor(list(eos_ids), device=device)
        finished_N = torch.zeros(n, dtype=torch.bool, device=device)
        ended_at_N = torch.zeros(n, dtype=torch.long, device=device)  # the step of each row's first EOS
        out_NC = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs_NC = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
        rng_states = []  # the random state before each draw since the last check, to undo draws past the end
        for t in range(max_new_tokens):
            window = min(length, -(-(p + t) // self.window_bucket) * self.window_bucket)  # slots filled after this step
            for layer in cache.layers:
                layer.window = window
            self.shapes.add((len(rows_R), length, window))
            logits_RV = self.step(tokens_R.unsqueeze(1), position_R.unsqueeze(1), mask_RL[:, :window])
            if sampling.fixed_length:
                logits_RV[:, eos_N] = -float("inf")
            scores_RV = sampling_scores(logits_RV, sampling)
            if not sampling.greedy:
                rng_states.append(_rng_state(device))
            drawn_R = sample_next(scores_RV, sampling, rows_R, n)
            logprobs_NC[rows_R, t] = torch.log_softmax(scores_RV.float(), dim=-1).gather(
                1, drawn_R.unsqueeze(1)).squeeze(1)
            tokens_R = torch.where(finished_N[rows_R], pad_id, drawn_R)
            out_NC[rows_R, t] = tokens_R
            ended_R = ~finished_N[rows_R] & torch.isin(tokens_R, eos_N)
            ended_at_N[rows_R] = torch.where(ended_R, t, ended_at_N[rows_R])
            finished_N[rows_R] |= ended_R
            position_R = position_R + 1
            if (t + 1) % self.check_every == 0 or t + 1 == max_new_tokens:
                live_R = ~finished_N[rows_R]
                live = int(live_R.sum())
                if live == 0:  # generate() stops right after the last row's EOS: so do we
                    last = int(ended_at_N.max())
                    if last < t and rng_states:  # draws made after it: restore the stream generate leaves
                        _set_rng_state(device, rng_states[len(rng_states) - (t - last)])
                    return out_NC[:, :last + 1], logprobs_NC[:, :last + 1]
                if should_stop is not None and should_stop():
                    return out_NC[:, :t + 1], logprobs_NC[:, :t + 1]
                rng_states.clear()
                if live <= self.compact_at * len(rows_R):  # the ended rows leave the batch
                    keep_R = live_R.nonzero().squeeze(1)
                    for layer in cache.layers:
                        layer.keep(keep_R)
                    rows_R, tokens_R, position_R = rows_R[keep_R], tokens_R[keep_R], position_R[keep_R]
                    mask_RL = mask_RL[keep_R]
                    self.shape = None  # the cache holds fewer rows now: the next call allocates a whole one
        return out_NC, logprobs_NC

    def _head_dim(self) -> int:
        config = self.model.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
