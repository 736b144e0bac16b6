"""A reward model as a reward term (`--reward_model PATH`, the term `model` in `--reward`): a Hugging Face sequence
classifier with one output (`AutoModelForSequenceClassification`, num_labels 1) that scores each prompt and
completion, as TRL's GRPOTrainer scores with an `nn.Module` reward function.

    scorer = RewardModel(path, distributed.reward_model_ds_config(policy_ds, offload=False))
    scorer(prompts, completions)  # -> [float, ...], one per completion (TRL's batched convention)

Rendering. Each pair is rendered through the reward model's OWN chat template, not the policy's: a string prompt
becomes `[{"role": "user", "content": prompt}]`, a chat prompt stays its list of messages, and the completion is
appended as the assistant's message (a chat completion, `[{"role": "assistant", ...}]`, as it is). The text is then
tokenized without adding special tokens (the template holds them), as TRL does. A tokenizer without a chat template
gets a plain transcript, "User: ...\\nAssistant: ...", tokenized with its special tokens. (TRL concatenates a string
prompt and its completion as they are; here a string prompt is the dataset's question, which the policy saw inside
its own template, so the reward model sees it inside its own.)

Truncation. A text longer than `max_length` tokens keeps its LAST `max_length` tokens: what is cut is the start of
the rendering (template header, system prompt, the beginning of the question), not the end of the completion,
which the classifier reads its score from (only a completion longer than `max_length` loses its own beginning). `num_truncated` counts them; the first one is logged.

Score. `logits[:, 0]` of the model on each right-padded micro-batch (texts sorted by length, so a micro-batch wastes
little on padding; the scores come back in the caller's order), padded with the model's own `pad_token_id` (the
classifier pools at the last token that is not padding, so padding with another id would move the pooled position).

Partitioning. The model lives in a DeepSpeed inference engine partitioned like the reference model (ZeRO-3, its
parameters optionally offloaded; `distributed.reward_model_ds_config`). ZeRO-3 gathers each layer's weights from
every rank during a forward, so every rank must run the same number of forwards: the texts are scored in
micro-batches of a fixed size, the ranks agree on the largest count of micro-batches, and a rank with fewer runs
one-token forwards to keep step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch

from . import distributed

log = logging.getLogger("grpo_ds.reward_model")

FLAG = "--reward_model"


def check_reward_model(path: str) -> str:
    """Refuse, from the config alone (no weights loaded), anything but a sequence classifier with one output: a
    missing path, a folder without config.json, a causal LM, a classifier with several labels. Returns what
    `from_pretrained` should load (the folder, or the hub id)."""
    from transformers import AutoConfig

    local = Path(path).expanduser()
    if local.is_file():
        raise ValueError(f"{FLAG} {path}: a file, not a Hugging Face model folder or hub id")
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"{FLAG} {path}: folder has no config.json (not a Hugging Face model folder)")
        path = str(local)
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ValueError(f"{FLAG} {path}: path does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{FLAG} {path}: cannot read its config ({first})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    classifier = [a for a in architectures if a.endswith("ForSequenceClassification")]
    need = "a reward model is a ...ForSequenceClassification checkpoint with num_labels 1"
    if not classifier:
        what = (f"a causal LM ({', '.join(architectures)})" if any(a.endswith("ForCausalLM") for a in architectures)
                else f"a {', '.join(architectures)}" if architectures else "a checkpoint that names no architecture")
        raise ValueError(f"{FLAG} {path}: {what}, not a sequence classifier with one label; {need}")
    if config.num_labels != 1:
        raise ValueError(f"{FLAG} {path}: a sequence classifier with {config.num_labels} labels ({classifier[0]}), "
                         f"not one; {need} (the reward is its single logit)")
    return path


def render(tokenizer, prompt, completion) -> tuple[str, bool]:
    """(text, add_special_tokens): the prompt and completion as the reward model reads them (see the module
    docstring). Chat messages may carry other keys (tool calls, names): they reach the template as they are."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if isinstance(completion, str):
        messages.append({"role": "assistant", "content": completion})
    else:
        messages.extend(completion)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False), False
    return "\n".join(f"{m['role'].capitalize()}: {_text(m.get('content'))}" for m in messages), True


def _text(content) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


class RewardModel:
    """A sequence classifier with one output as a batched reward function (TRL's convention):
    `scorer(prompts, completions, completion_ids=None, **columns) -> list[float]`; extra keyword arguments
    (dataset columns, trainer_state, ...) are accepted and ignored.

    `path`: a folder or hub id, checked first (check_reward_model) so a wrong checkpoint is refused before any
    weight loads. `ds_config`: the engine's DeepSpeed config, `distributed.reward_model_ds_config(policy_ds,
    offload)`; it sets the precision (bf16 when enabled, else fp32). `micro_batch_size`: texts per forward.
    `max_length`: tokens kept per text, from the end (at most the model's
    max_position_embeddings). The process group must be up (distributed.init_distributed)."""

    __name__ = "model"  # the term's name in logs and in --reward

    def __init__(self, path: str, ds_config: dict, micro_batch_size: int = 8, max_length: int = 2048):
        if micro_batch_size < 1:
            raise ValueError(f"{FLAG}: micro_batch_size must be at least 1, got {micro_batch_size}")
        if max_length < 1:
            raise ValueError(f"{FLAG}: max_length must be at least 1, got {max_length}")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = check_reward_model(path)
        self.micro_batch_size, self.max_length = micro_batch_size, max_length
        self.num_truncated = 0
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") is True else torch.float32

        def load():
            model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=dtype)
            model.config.use_cache = False
            return model

        self.engine = distributed.init_reference(load, ds_config)
        config = self.engine.module.config
        if config.pad_token_id is None:
            # batches of more than one need a pad id to find each row's last token; take the tokenizer's
            pad = self.tokenizer.pad_token_id
            pad = self.tokenizer.eos_token_id if pad is None else pad
            if pad is None:
                raise ValueError(f"{FLAG} {path}: neither the model nor its tokenizer defines a pad or EOS token")
            log.warning("%s %s: the model defines no pad_token_id; padding with the tokenizer's %d", FLAG, path, pad)
            config.pad_token_id = pad
        self.pad_token_id = int(config.pad_token_id)
        positions = getattr(config, "max_position_embeddings", None)
        if positions and positions < self.max_length:
            log.info("%s: texts cut to %d tokens, the model's max_position_embeddings", FLAG, positions)
            self.max_length = positions

    def tokenize(self, prompts: list, completions: list) -> list[list[int]]:
        """Token ids of each rendered pair, cut to the last max_length tokens."""
        rows = []
        for prompt, completion in zip(prompts, completions, strict=True):
            text, special = render(self.tokenizer, prompt, completion)
            ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
            if len(ids) > self.max_length:
                if self.num_truncated == 0:
                    log.warning("%s: a text of %d tokens keeps its last %d (the start of the prompt is cut)", FLAG,
                                len(ids), self.max_length)
                self.num_truncated += 1
                ids = ids[-self.max_length:]
            rows.append(ids)
        return rows

    def __call__(self, prompts: list, completions: list, completion_ids: Optional[list] = None,
                 **columns) -> list[float]:
        rows = self.tokenize(prompts, completions)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
        num_batches = math.ceil(len(rows) / self.micro_batch_size)
        if distributed.is_zero3(self.engine) and distributed.world_size() > 1:
            # ZeRO-3 forwards gather weights from every rank: all ranks run the same number
            num_batches = max(distributed.all_gather_objects(num_batches))
        scores: list[float] = [0.0] * len(rows)
        with torch.no_grad():
            for b in range(num_batches):
                index = order[b * self.micro_batch_size:(b + 1) * self.micro_batch_size]
                if not index:  # this rank has run out: a one-token forward keeps it in step with the others
                    self._forward([[self.pad_token_id]])
                    continue
                for i, score in zip(index, self._forward([rows[i] for i in index]), strict=True):
                    scores[i] = score
        return scores

    def _forward(self, batch: list[list[int]]) -> list[float]:
        """logits[:, 0] of the right-padded batch."""
        width = max(len(ids) for ids in batch)
        ids_BT = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            ids_BT[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask_BT[i, :len(ids)] = 1
        out = self.engine(input_ids=ids_BT.to(self.engine.device), attention_mask=mask_BT.to(self.engine.device))
        return out.logits[:, 0].float().cpu().tolist()
