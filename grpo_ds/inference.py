"""Inference with a trained model: loading a model or a run for generation, batched greedy or sampled generation
with completion masks, and the quick `ask` command (one question, a file of them, or base vs trained side by side).

    python scripts/ask.py runs/quickstart "Tom has 3 apples and buys 4 more. How many apples does he have?"
    python scripts/ask.py runs/quickstart --compare embedded --file questions.jsonl

Shape legend: N rows (prompts x samples), P prompt length (left-padded), C completion length.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import SYSTEM_PROMPT, render_prompt
from .models import load_model, load_tokenizer, resolve_model
from .rewards import extract_answer, extract_last_number, is_correct, is_correct_lenient
from .rollout import completion_mask, eos_token_ids


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


def resolve_run(spec: str) -> str:
    """A training run's output folder stands for its exported policy (`OUTPUT_DIR/final`); anything else goes to
    models.resolve_model (hub id, Hugging Face folder, DeepSpeed checkpoint, .gguf, 'embedded')."""
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        spec = str(path / "final")
    return resolve_model(spec)


def load(spec: str, dtype: str = "auto", device: torch.device | None = None):
    """(model, tokenizer) ready for generation: eval mode, KV cache on, on `device` (default: pick_device())."""
    device = device or pick_device()
    path = resolve_run(spec)
    tokenizer = load_tokenizer(path)
    model = load_model(path, pick_dtype(dtype, device)).to(device)
    model.eval()
    model.config.use_cache = True  # load_model turns it off for training forwards
    return model, tokenizer


# ----------------------------------------------------------------------------- generation


@dataclass
class Completion:
    text: str        # decoded completion up to its first EOS (the EOS itself is a special token, not text)
    num_tokens: int  # completion tokens, the EOS included (what the training metrics count)
    truncated: bool  # no EOS within max_new_tokens


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """generate() arguments for greedy decoding (temperature 0) or for sampling from the plain softmax. top_k=0 and
    repetition_penalty=1.0 override whatever the model's generation_config suggests, as in training, so a sampled
    evaluation draws from the distribution that GRPO trained."""
    if temperature < 0:
        raise ValueError(f"--temperature {temperature}: expected >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p {top_p}: expected a value in (0, 1]")
    if temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "repetition_penalty": 1.0}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0, "repetition_penalty": 1.0}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0) -> list[Completion]:
    """One completion per prompt, in a single left-padded `generate` call. The completion mask comes from
    rollout.completion_mask (positions up to the first EOS), never from token values: the pad token is often the
    EOS itself. Callers batch and sort; this does neither."""
    assert tokenizer.padding_side == "left", "generation needs left padding"
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids_NP = encoded["input_ids"].to(device)
    eos_ids = eos_token_ids(model, tokenizer)
    out_NT = model.generate(input_ids=prompt_ids_NP, attention_mask=encoded["attention_mask"].to(device),
                            max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                            use_cache=True, **sampling_kwargs(temperature, top_p))
    completion_ids_NC = out_NT[:, prompt_ids_NP.shape[1]:].cpu()
    mask_NC, truncated_N = completion_mask(completion_ids_NC, eos_ids)
    texts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids_NC, mask_NC)],
                                   skip_special_tokens=True)
    return [Completion(text, int(n), bool(t)) for text, n, t in zip(texts, mask_NC.sum(dim=1), truncated_N)]


def render(tokenizer, question: str, prompt: str = "train", response_prefix: str = "") -> str:
    """Prompt text for a question. 'train': the chat template with the training system prompt (the tutorial's
    <think>/<answer> instructions) and the training run's `response_prefix`; 'plain': the question alone as the
    user's turn, as anyone would ask it."""
    if prompt == "train":
        return render_prompt(tokenizer, question, SYSTEM_PROMPT, response_prefix)
    if prompt != "plain":
        raise ValueError(f"--prompt '{prompt}': expected 'train' or 'plain'")
    if getattr(tokenizer, "chat_template", None) is None:
        return f"Question: {question}\nAnswer:"
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


# ----------------------------------------------------------------------------- the ask command


def read_questions(path: str) -> list[tuple[str, str | None]]:
    """(question, gold or None) from a .jsonl file ('question' and optional 'answer' fields, GSM8K's '#### n'
    accepted) or a text file with one question per line."""
    from .data import gsm8k_final_answer

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
        gold = None if answer is None else (gsm8k_final_answer(str(answer)) or str(answer).strip())
        items.append((row["question"], gold))
    return items


def verdict(text: str, gold: str | None) -> str:
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


def ask_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ask.py", description="Answer one question (or a file of them) with a model or a training run; "
                                   "--compare BASE shows the base model's answers beside it.")
    parser.add_argument("model", help="Hub id, Hugging Face folder, a run's output folder (its final/), DeepSpeed "
                                      "checkpoint, .gguf file or 'embedded'.")
    parser.add_argument("question", nargs="?", help="The question (or use --file).")
    parser.add_argument("--file", help="A .jsonl file with 'question' (and optional 'answer') fields, or a text "
                                       "file with one question per line.")
    parser.add_argument("--compare", metavar="BASE", help="A second model, shown on the left (e.g. the base model).")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="Most tokens per answer.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default).")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling threshold when sampling.")
    parser.add_argument("--prompt", default="train", choices=["train", "plain"],
                        help="'train': chat template + the training system prompt; 'plain': the question alone.")
    parser.add_argument("--response_prefix", default="", help="Text every answer starts with, as the training "
                        "run's --response_prefix (with --prompt train).")
    parser.add_argument("--batch_size", type=int, default=16, help="Questions per generate call.")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for sampling.")
    return parser


def answer_all(spec: str, items: list[tuple[str, str | None]], args) -> list[Completion]:
    model, tokenizer = load(spec, args.dtype)
    prompts = [render(tokenizer, question, args.prompt, args.response_prefix) for question, _ in items]
    torch.manual_seed(args.seed)
    out = []
    for start in range(0, len(prompts), args.batch_size):
        out += generate(model, tokenizer, prompts[start:start + args.batch_size], max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p)
    return out


def ask_main(argv: list[str] | None = None) -> int:
    args = ask_parser().parse_args(argv)
    try:
        if (args.question is None) == (args.file is None):
            raise ValueError("ask.py: give either a question or --file, not both or neither")
        if args.max_new_tokens < 1 or args.batch_size < 1:
            raise ValueError("--max_new_tokens and --batch_size: expected positive integers")
        items = read_questions(args.file) if args.file else [(args.question, None)]
        answers = answer_all(args.model, items, args)
        base = answer_all(args.compare, items, args) if args.compare else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    width = shutil.get_terminal_size((160, 24)).columns
    for i, (question, gold) in enumerate(items):
        print(f"\n=== Q{i + 1}: {question}" + (f"   [gold: {gold}]" if gold is not None else ""))
        if base is None:
            print(answers[i].text.strip())
            print(f"--> {verdict(answers[i].text, gold)}")
            continue
        print(side_by_side(f"BASE {args.compare}", base[i].text.strip(), f"MODEL {args.model}",
                           answers[i].text.strip(), width))
        print(f"BASE  --> {verdict(base[i].text, gold)}")
        print(f"MODEL --> {verdict(answers[i].text, gold)}")
    return 0
