"""Using a trained model: loading a model or a training run for generation, asking it the way it was trained (the
run's system prompt and response prefix, read from its config.json), and the pieces of the `ask` command.

    .venv/bin/python scripts/ask.py runs/quickstart "Tom has 3 apples and buys 4 more. How many apples does he have?"
    .venv/bin/python scripts/ask.py runs/quickstart --compare embedded --file questions.jsonl
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import Config
from .data import SYSTEM_PROMPT, Problem, read_gold, render_prompt
from .generation import Sampling, generate
from .models import load_model, load_tokenizer, resolve_model
from .rewards import extract_answer, extract_last_number, is_correct, is_correct_lenient
from .tools import Toolbox, ToolFormat

log = logging.getLogger("grpo_ds.inference")


# ----------------------------------------------------------------------------- loading


def pick_device() -> torch.device:
    """This rank's GPU when there is one (LOCAL_RANK under a launcher), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU and fp32 on a CPU, where bf16 matrix products are much slower (see distributed.py)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("bf16", "fp32"):
        raise ValueError(f"--dtype '{name}': expected auto, bf16 or fp32")
    return torch.bfloat16 if name == "bf16" else torch.float32


def _is_run_config(path: Path) -> bool:
    """A grpo_ds run's config.json (not a Hugging Face model's, which shares the name)."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and "rollouts_per_step" in values and "group_size" in values


def training_config(spec: str) -> Optional[dict]:
    """The training config of the run behind `spec`, or None: for a run's output folder, its final/ or exports/step_N
    folder, its checkpoints folder or one checkpoint (whose trainer_state.json holds the config)."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    for candidate in (path, path.parent, path.parent.parent):
        if _is_run_config(candidate / "config.json"):
            return json.loads((candidate / "config.json").read_text())
    if (path / "latest").is_file():  # a checkpoints folder: its newest checkpoint
        path = path / (path / "latest").read_text().strip()
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            return json.loads(state.read_text()).get("config")
        except ValueError:
            return None
    return None


def resolve_run(spec: str) -> str:
    """A training run's output folder stands for its exported policy (`OUTPUT_DIR/final`); anything else goes to
    models.resolve_model (hub id, Hugging Face folder, DeepSpeed checkpoint, .gguf, 'embedded')."""
    path = Path(spec).expanduser()
    if path.is_dir() and _is_run_config(path / "config.json"):
        if not (path / "final" / "config.json").is_file():
            raise ValueError(f"MODEL '{spec}': a training run without final/ (not finished?); pass one of its "
                             f"checkpoints, {path / 'checkpoints'}")
        spec = str(path / "final")
    return resolve_model(spec)


@dataclass(frozen=True)
class PromptFormat:
    """How questions are put to a model: its system prompt (None: none), the worked example shown before the
    question (None: none) and the response prefix its answers start with; and, for a run trained with --tools or
    --environment, those tools (their schemas in the prompt, the same tool loop: docs/AGENTS.md). A trained model is
    asked the way it was trained: the defaults come from its run's config.json."""

    system_prompt: Optional[str] = SYSTEM_PROMPT
    response_prefix: str = ""
    source: str = "defaults"
    example: Optional[tuple[str, str] | list[dict]] = None
    toolbox: Optional[Toolbox] = None
    max_episode_tokens: int = 0
    turn_prefix: Optional[str] = None  # what opens the model's turns after tool results (None: response_prefix)

    def render(self, tokenizer, question: str) -> str:
        return render_prompt(tokenizer, question, self.system_prompt, self.response_prefix, self.example,
                             self.toolbox.schemas if self.toolbox is not None else None)


def prompt_format(spec: Optional[str], system_prompt: Optional[str] = None,
                  response_prefix: Optional[str] = None, tools: bool = True) -> PromptFormat:
    """The prompt format for model `spec`: what is given here ('default', 'none' or text for the system prompt),
    else the training run's settings, else the training defaults. The worked example is the run's (none without
    one). `tools=False` asks without the run's tools: no schemas in the prompt, no tool loop, and a worked example
    that calls tools keeps only its question and final answer."""
    trained = training_config(spec) if spec else None
    if system_prompt is None:
        system_prompt = (trained or {}).get("system_prompt", "default")
    if response_prefix is None:
        response_prefix = (trained or {}).get("response_prefix", "")
    text = {"default": SYSTEM_PROMPT, "none": None}.get(system_prompt, system_prompt)
    trained = trained or {}
    toolbox = (Toolbox.from_flags(trained.get("tools") or "", trained.get("environment") or "",
                                  trained.get("tool_timeout", 10.0), trained.get("max_tool_calling_iterations"))
               if tools else None)
    example = Config(**{k: trained.get(k) or "" for k in ("example_question", "example_answer")},
                     example_tool_call=(trained.get("example_tool_call") or "") if toolbox else "").example(toolbox)
    return PromptFormat(text, response_prefix, "the training run's config.json" if trained else "defaults",
                        example, toolbox, trained.get("max_episode_tokens") or 0, trained.get("turn_prefix"))


def load(spec: str, dtype: str = "auto", device: Optional[torch.device] = None):
    """(model, tokenizer) ready for generation: eval mode, KV cache on, on `device` (default: pick_device())."""
    device = device or pick_device()
    path = resolve_run(spec)
    tokenizer = load_tokenizer(path)
    model = load_model(path, pick_dtype(dtype, device)).to(device)
    model.eval()
    model.config.use_cache = True  # load_model turns it off for training forwards
    return model, tokenizer


# ----------------------------------------------------------------------------- the ask command


@dataclass
class Answer:
    text: str
    num_tokens: int
    truncated: bool


def read_questions(path: str) -> list[tuple[str, Optional[str]]]:
    """(question, gold or None) from a .jsonl file ('question' and optional 'answer' fields, GSM8K's '#### n'
    accepted) or a text file with one question per line."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--file '{path}': file not found")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: file is empty")
    if file.suffix.lower() != ".jsonl":
        return [(line.strip(), None) for line in lines]
    items = []
    for lineno, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'question' field")
        answer = row.get("answer")
        gold = None if answer is None else (read_gold(answer) or str(answer).strip())
        items.append((row["question"], gold))
    return items


def answer_all(spec: str, questions: list[str], sampling: Sampling, fmt: PromptFormat, *, batch_size: int = 16,
               dtype: str = "auto", seed: int = 0) -> list[Answer]:
    """One answer per question from model `spec`, in batches."""
    model, tokenizer = load(spec, dtype)
    prompts = [fmt.render(tokenizer, q) for q in questions]
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        if fmt.toolbox is None:
            rollout = generate(model, tokenizer, prompts[start:start + batch_size], sampling)
        else:  # the run's tool loop, as in training
            batch = [Problem(q, "", columns={"question": q}) for q in questions[start:start + batch_size]]
            session = fmt.toolbox.session([p.columns for p in batch],
                                          ToolFormat(tokenizer, fmt.response_prefix, fmt.turn_prefix))
            batch_prompts, group_size = session.prompts(batch, 1, lambda p: fmt.render(tokenizer, p.question))
            rollout = generate(model, tokenizer, batch_prompts, sampling, group_size=group_size, tools=session,
                               max_episode_tokens=fmt.max_episode_tokens)
        out += [Answer(text, int(n), bool(t)) for text, n, t in
                zip(rollout.texts(tokenizer), rollout.completion_mask_NC.sum(dim=1), rollout.truncated_N)]
    return out


def verdict(text: str, gold: Optional[str]) -> str:
    """One line: the strict <answer> content, the last number, and, with a gold answer, whether each is right."""
    strict, lenient = extract_answer(text), extract_last_number(text)
    line = f"answer: {strict!r}   last number: {lenient:g}" if lenient is not None else f"answer: {strict!r}"
    if gold is not None:
        line += (f"   gold {gold}: strict {'right' if is_correct(text, gold) else 'wrong'}, "
                 f"lenient {'right' if is_correct_lenient(text, gold) else 'wrong'}")
    return line


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int) -> str:
    """Two texts in two columns of `width` characters in total, wrapped, with a title over each."""
    column = max(20, (width - 3) // 2)

    def lines(text: str) -> list[str]:
        out = []
        for paragraph in text.splitlines() or [""]:
            out.extend(textwrap.wrap(paragraph, column) or [""])
        return out

    left_lines, right_lines = [left_title, "-" * column, *lines(left)], [right_title, "-" * column, *lines(right)]
    height = max(len(left_lines), len(right_lines))
    left_lines += [""] * (height - len(left_lines))
    right_lines += [""] * (height - len(right_lines))
    return "\n".join(f"{a:<{column}} | {b}".rstrip() for a, b in zip(left_lines, right_lines))
