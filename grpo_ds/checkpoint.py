"""Checkpoints that resume exactly, published atomically; the Hugging Face export of a DeepSpeed checkpoint.

Layout under OUTPUT_DIR/checkpoints:

    step_0000010/                     a complete checkpoint: DeepSpeed's files (model, optimizer, scheduler, ZeRO
                                      partitions), trainer_state.json, rng_state_rank{R}.pt, hf/ (config, tokenizer)
    latest                            the name of the newest complete checkpoint, replaced last
    .staging-step_0000020-1a2b3c4d/   a checkpoint being written (ignored, removed by the next save)
    .replaced-step_0000020/           during a re-save of a step, its previous checkpoint (removed once replaced)

A checkpoint is written into its staging folder; once every rank has written all of its files, each node flushes
them to disk (fsync of every file and directory), the folder is renamed into place and `latest` is replaced (a
flushed temporary file renamed over it, then the folder's entry flushed), so a crash or power loss at any point
leaves `latest` naming a complete checkpoint. Re-saving a step that exists keeps that true throughout: `latest`
names the new copy while the old one moves aside, and the old one while the new one moves into place.

Every rank writes into the staging folder that rank 0 creates, so the output folder must be one that every rank
sees (one filesystem that every node mounts); check_shared() refuses a run whose ranks do not share it.
DeepSpeed writes the files; this module decides where and when they become visible.

Resuming on another number of ranks or ZeRO stage goes through DeepSpeed's universal checkpoint: rank 0 converts
the checkpoint once with DeepSpeed's ds_to_universal into step_N/universal/ (published like a checkpoint: written
aside, verified, renamed), and every rank loads it with DeepSpeed's universal loading (`checkpoint.load_universal`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import distributed
from .config import LoraSettings

log = logging.getLogger("grpo_ds.checkpoint")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STAGING = ".staging-"
REPLACED = ".replaced-"
STATE_FILE = "trainer_state.json"
HF_DIR = "hf"


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints, oldest first (staging folders are never listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / STATE_FILE).is_file())


def latest_checkpoint(output_dir: str) -> Optional[Path]:
    root = checkpoint_root(output_dir)
    latest = root / LATEST
    if latest.is_file():
        path = root / latest.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    done = complete_checkpoints(root)  # `latest` missing (first save interrupted before it): newest complete one
    return done[-1] if done else None


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--resume_from '{path}': not a grpo_ds checkpoint ({STATE_FILE}: {err})") from None


def resolve_resume(output_dir: str, resume_from: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from, or None to start fresh. 'latest' in a folder without checkpoints starts
    fresh, so a preemptible job can always be launched with --resume_from latest."""
    if not resume_from:
        return None
    if resume_from == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            log.info("--resume_from latest: no checkpoint in %s yet, starting from step 0",
                     checkpoint_root(output_dir))
        return path
    path = Path(resume_from)
    if path.is_dir() and (path / LATEST).is_file():  # a checkpoints folder: take its latest
        path = path / (path / LATEST).read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume_from '{resume_from}': no grpo_ds checkpoint there (expected {STATE_FILE})")
    return path


def check_compatible(state: dict, world_size: int, zero_stage: int, path: Path, lora_r: int = 0) -> None:
    """Refuse, before any model loads, a resume that DeepSpeed cannot do from these files."""
    saved_lora = state.get("config", {}).get("lora_r", 0)
    if (saved_lora > 0) != (lora_r > 0):
        hint = f"add --lora_r {saved_lora}" if saved_lora else "drop --lora_r"
        raise ValueError(f"--lora_r {lora_r}: the checkpoint '{path}' holds "
                         f"{'LoRA adapters (rank ' + str(saved_lora) + ')' if saved_lora else 'a full fine-tune'}; "
                         f"{hint} to resume it")
    saved = (state["world_size"], state["zero_stage"])
    if not needs_universal(state, world_size, zero_stage):
        return
    layouts = (f"--resume_from '{path}': written by {saved[0]} rank(s) under ZeRO-{saved[1]}, this run has "
               f"{world_size} rank(s) under ZeRO-{zero_stage}")
    if 0 in (saved[1], zero_stage):
        # ZeRO-0 keeps a plain optimizer state dict, which ds_to_universal cannot read and universal loading skips
        raise ValueError(f"{layouts}; a change of ranks or stage needs ZeRO-1, 2 or 3 on both sides (DeepSpeed's "
                         f"universal checkpoint), else resume with {saved[0]} rank(s) under ZeRO-{saved[1]}")
    if saved[1] == 3 and zero_stage != 3:
        # ds_to_universal stores a ZeRO-3 checkpoint's parameters as bare flat tensors; ZeRO-1/2's universal loader
        # reads {"param": tensor} in the parameter's shape (IndexError in load_hp_checkpoint_state)
        raise ValueError(f"{layouts}; DeepSpeed's universal checkpoint takes ZeRO-3 to ZeRO-3 only (any number of "
                         f"ranks): resume under ZeRO-3")


def needs_universal(state: dict, world_size: int, zero_stage: int) -> bool:
    """Whether the checkpoint was written by another number of ranks or ZeRO stage than this run's."""
    return (state["world_size"], state["zero_stage"]) != (world_size, zero_stage)


def universal_ds_config(ds_config: dict) -> dict:
    """The engine config with DeepSpeed's universal loading on (it must be set before the engine is built)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(engine, tokenizer, output_dir: str, step: int, trainer_state: dict, save_total_limit: int) -> Path:
    """Write a checkpoint for `step` on every rank and publish it; returns its path. Every rank must call it.
    A failed write (a full disk, say) leaves the previous checkpoint and `latest` untouched and raises
    CheckpointError on every rank."""
    rank = torch.distributed.get_rank()
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    name, error = None, ""
    if rank == 0:
        try:
            remove_leftovers(root)
            # a fresh name each time: an interrupted re-save may have left `latest` naming a staging folder
            staging = root / f"{STAGING}{tag}-{uuid.uuid4().hex[:8]}"
            staging.mkdir(parents=True)
            name = staging.name
        except OSError as err:
            error = f"{type(err).__name__}: {err}"
    name, error = distributed.all_gather_objects((name, error))[0]  # rank 0's
    if error:
        raise CheckpointError(_failed(step, error, output_dir))
    staging = root / name
    try:
        # With LoRA, only the adapters and their optimizer state: the frozen base is the model the run started from
        with _frozen_aliases_excluded(engine):
            engine.save_checkpoint(str(staging), tag=tag, client_state={"step": step}, save_latest=False,
                                   exclude_frozen_parameters=is_peft(engine.module))
        torch.save(rng_state(), staging / tag / f"rng_state_rank{rank}.pt")
        if rank == 0:
            base_model(engine.module).config.save_pretrained(staging / tag / HF_DIR)
            tokenizer.save_pretrained(staging / tag / HF_DIR)
            (staging / tag / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        if distributed.is_peer_loss(err):  # inside DeepSpeed's save: the any_rank below would only fail again
            raise
        error = f"{type(err).__name__}: {err}"
    if not distributed.any_rank(bool(error)):
        # Durable before visible: every rank has written, now each node flushes the whole folder (one rank per
        # node: the page cache belongs to the node, and a file another node wrote costs nothing to flush here)
        try:
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                fsync_tree(staging / tag)
        except OSError as err:
            error = f"{type(err).__name__}: {err}"
    if distributed.any_rank(bool(error)):
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(_failed(step, error or "another rank failed", output_dir))
    if rank == 0:
        try:
            publish(root, staging, tag)
            rotate(root, save_total_limit, keep=root / tag)
        except OSError as err:  # `latest` still names a complete checkpoint, whichever
            error = f"{type(err).__name__}: {err}"
    if distributed.any_rank(bool(error)):  # also every rank's wait for the publication
        raise CheckpointError(_failed(step, error or "rank 0 could not publish it", output_dir))
    return root / tag


def publish(root: Path, staging: Path, tag: str) -> None:
    """Move the complete, flushed checkpoint `staging`/`tag` to `root`/`tag` and point `latest` at it; `latest`
    names a complete checkpoint at every moment. When `tag` exists (a step saved again, by a run resumed from an
    earlier checkpoint), deleting it before the rename would leave `latest` naming a missing or half-deleted
    folder: instead it moves aside, and if `latest` names it, `latest` names the new copy (still in staging) while
    it moves, and its new place while the new copy moves into place; it is deleted last."""
    final = root / tag
    if final.exists():
        aside = root / f"{REPLACED}{tag}-{uuid.uuid4().hex[:8]}"
        named = latest_target(root) == final
        if named:
            point_latest(root, f"{staging.name}/{tag}")
        os.replace(final, aside)
        fsync_path(root)
        if named:
            point_latest(root, aside.name)
    os.replace(staging / tag, final)
    fsync_path(root)
    point_latest(root, tag)
    remove_leftovers(root)  # the old copy, this staging folder (DeepSpeed's zero_to_fp32.py beside the tag)


def latest_target(root: Path) -> Optional[Path]:
    """The folder that `latest` names (complete or not), or None."""
    pointer = root / LATEST
    return root / pointer.read_text().strip() if pointer.is_file() else None


def point_latest(root: Path, name: str) -> None:
    """Replace `latest` with `name`, durably: a temporary file written and flushed, renamed over it, and the
    folder's entry flushed."""
    pointer = root / f".{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / LATEST)
    fsync_path(root)


def remove_leftovers(root: Path) -> None:
    """Delete the staging and set-aside folders of interrupted saves, except one that `latest` names (a save
    interrupted in the middle of a re-save leaves `latest` naming one of them)."""
    if not root.is_dir():
        return
    named = latest_target(root)
    for stale in [*root.glob(f"{STAGING}*"), *root.glob(f"{REPLACED}*")]:
        if named is None or not (named == stale or stale in named.parents):
            shutil.rmtree(stale, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory, deepest first, so that a directory is flushed after
    the entries it holds."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def check_shared(output_dir: str) -> None:
    """Refuse, on every rank and before any model loads, an output folder that some rank cannot see. Every rank
    writes its part of each checkpoint into the staging folder that rank 0 creates, so ranks on several nodes need
    a folder on a filesystem that every node mounts; a node-local path of the same name would split each
    checkpoint across the nodes without an error. Rank 0 writes a file with a fresh token; every rank reads it."""
    if torch.distributed.get_world_size() == 1:
        return
    rank = torch.distributed.get_rank()
    token = distributed.all_gather_objects(uuid.uuid4().hex)[0]  # rank 0's
    probe = Path(output_dir) / f".shared-check-{token}"
    if rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    distributed.barrier()
    try:
        sees = probe.read_text() == token
    except OSError:
        sees = False
    seen = distributed.all_gather_objects((sees, socket.gethostname()))  # also: everyone has read before the unlink
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [f"{r} ({host})" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise ValueError(f"--output_dir {output_dir}: rank(s) {', '.join(blind)} cannot see the file rank 0 "
                         f"({seen[0][1]}) wrote there; every rank writes its part of each checkpoint into this "
                         f"folder, so it must be on a filesystem that every node mounts")


@contextlib.contextmanager
def _frozen_aliases_excluded(engine):
    """DeepSpeed's exclude_frozen_parameters drops frozen parameters by their first name only, so an output layer
    tied to the embeddings (a second name for a frozen tensor as large as the vocabulary) was still saved with
    every LoRA checkpoint; drop every frozen name while saving."""
    if not is_peft(engine.module):
        yield
        return
    original = engine.module_state_dict

    def adapters_only(*args, **kwargs):
        state = original(*args, **kwargs)
        for name, param in engine.module.named_parameters(remove_duplicate=False):
            if not param.requires_grad:
                state.pop(name, None)
        return state

    engine.module_state_dict = adapters_only
    try:
        yield
    finally:
        del engine.module_state_dict  # the class's method again


def _failed(step: int, error: str, output_dir: str) -> str:
    previous = latest_checkpoint(output_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return f"checkpoint at step {step} failed ({error}); {kept}"


def rotate(root: Path, limit: int, keep: Path) -> None:
    """Delete the oldest complete checkpoints beyond `limit` (0 keeps all); never `keep`, the newest."""
    if limit <= 0:
        return
    done = [p for p in complete_checkpoints(root) if p != keep]
    for old in done[:max(0, len(done) - (limit - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load(engine, path: Path) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG states from `path`; returns the trainer state. A
    checkpoint of another world size or ZeRO stage is converted (once) and loaded as a universal checkpoint; the
    engine must then have been built with universal_ds_config."""
    state = read_state(path)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    load_dir, tag = path.parent, path.name
    if needs_universal(state, world, engine.zero_optimization_stage()) or engine.load_universal_checkpoint():
        # (also when the user's JSON asks for universal loading: that engine cannot read a checkpoint directly)
        assert engine.load_universal_checkpoint(), "a resharded resume needs universal_ds_config's engine"
        load_dir, tag = path, universal_checkpoint(engine, path).name
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True,
                                          load_module_strict=not is_peft(engine.module))
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
    # A rank the checkpoint did not have keeps the run's seeded state: sampling and shuffling are re-seeded from
    # (seed, step, rank) every step anyway
    rng_file = path / f"rng_state_rank{rank}.pt"
    if rng_file.is_file() or state["world_size"] == world:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


UNIVERSAL = "universal"
UNIVERSAL_DONE = "grpo_ds_universal.json"


def universal_checkpoint(engine, path: Path) -> Path:
    """path/universal: `path` converted by DeepSpeed's ds_to_universal, built by rank 0 on first use (the other
    ranks wait) and published only when complete: converted into a staging folder, verified, renamed. It lives
    inside the checkpoint, so rotation deletes both and a re-saved step never meets a stale conversion."""
    target = path / UNIVERSAL
    names = trainable_names(engine)

    def convert() -> str:
        if universal_problem(target, names) is None:
            return ""
        staging = path / f".{UNIVERSAL}-staging"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            t0 = time.perf_counter()
            convert_to_universal(path, staging / UNIVERSAL)
            problem = universal_problem(staging / UNIVERSAL, names, check_done=False)
            if problem is not None:
                raise CheckpointError(f"ds_to_universal produced an incomplete folder ({problem})")
            (staging / UNIVERSAL / UNIVERSAL_DONE).write_text(json.dumps({"source": str(path)}) + "\n")
            if target.exists():  # an older, incomplete attempt
                shutil.rmtree(target)
            os.replace(staging / UNIVERSAL, target)
            log.info("converted %s to a universal checkpoint in %.1f s", path, time.perf_counter() - t0)
            return ""
        except Exception as err:  # noqa: BLE001 - the other ranks wait for this one: tell them
            return f"{type(err).__name__}: {err}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    error = distributed.any_rank_after(convert)
    if error:
        raise CheckpointError(f"converting {path} to a universal checkpoint failed ({error})")
    return target


def trainable_names(engine) -> list[str]:
    """The names under which DeepSpeed's optimizer knows the trained parameters (with LoRA, the adapters)."""
    return [name for name, p in engine.module.named_parameters() if p.requires_grad]


def universal_problem(folder: Path, names: list[str], check_done: bool = True) -> Optional[str]:
    """Why `folder` is not a complete universal checkpoint for parameters `names` (None when it is)."""
    if check_done and not (folder / UNIVERSAL_DONE).is_file():
        return "missing" if not folder.exists() else "not marked complete"
    if not (folder / "zero" / "optimizer_state.pt").is_file():
        return "no zero/optimizer_state.pt"
    for name in names:
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            if not (folder / "zero" / name / f"{state}.pt").is_file():
                return f"no zero/{name}/{state}.pt"
    return None


def convert_to_universal(path: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal from `path` into `out`, run as its users run it (its own process, its output
    kept for the error message), then completed so that either ZeRO family loads it.

    --inject_missing_state: the converter asks for a `universal_checkpoint_info` that only Megatron-style models
    record; a Hugging Face model has no tensor- or pipeline-parallel slices to describe, so DeepSpeed's own default
    (the version key alone) is exact."""
    import subprocess
    import sys

    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                           "--output_folder", str(out), "--inject_missing_state"],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        raise CheckpointError(f"ds_to_universal exited with {proc.returncode}: {lines[-1] if lines else ''}")
    _complete_for_both_families(out)


def _complete_for_both_families(folder: Path) -> None:
    """ds_to_universal writes what the loader of the source's own ZeRO family reads. From a ZeRO-1/2 source this
    adds, without touching a tensor, the metadata that ZeRO-3's loader reads (DeepSpeed 0.19), so one conversion
    serves ZeRO-1, 2 and 3 targets:

    - the model-states file under ZeRO-3's name too (the engine globs `mp_rank_*_model_states.pt` under ZeRO-1/2
      and `zero_pp_rank_0_mp_rank_*_model_states.pt` under ZeRO-3); it holds the scheduler, the step counters and
      the client state, and no weights that a universal load reads;
    - in zero/optimizer_state.pt, `optimizer_state_dict`: ZeRO-3's loader takes the AdamW step and hyperparameters
      from there; ZeRO-1/2's converter keeps the hyperparameters as `param_groups` and the step in each
      parameter's step.pt.
    (The other way, ZeRO-3 to ZeRO-1/2, is refused by check_compatible.)"""
    if list(folder.glob("zero_pp_rank_*model_states.pt")):  # from ZeRO-3
        return
    os.link(folder / "mp_rank_00_model_states.pt", folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")  # no copy
    zero = folder / "zero"
    optim_path = zero / "optimizer_state.pt"
    optim = torch.load(optim_path, weights_only=False)
    step = torch.load(next(zero.glob("*/step.pt")), weights_only=False)
    optim["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]}
    torch.save(optim, optim_path)


# ----------------------------------------------------------------------------- export


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A grpo_ds checkpoint folder (step_N), or a folder holding DeepSpeed's `latest` pointer."""
    return path.is_dir() and ((path / STATE_FILE).is_file() or (path / LATEST).is_file())


def export_checkpoint(path: str, out: str, dtype: Optional[torch.dtype] = None,
                      resolve_base: Optional[Callable[[str], str]] = None) -> Path:
    """Convert a DeepSpeed checkpoint (ZeRO-1/2/3, any number of ranks) to a Hugging Face folder: DeepSpeed's
    zero_to_fp32 reassembles the fp32 master weights; the config and tokenizer come from the checkpoint's hf/. A
    LoRA checkpoint holds the adapters only: they are merged into the run's base model (its --model, found with
    `resolve_base`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(path)
    if (ckpt / LATEST).is_file() and not (ckpt / STATE_FILE).is_file():
        ckpt = ckpt / (ckpt / LATEST).read_text().strip()
    if not (ckpt / HF_DIR / "config.json").is_file():
        raise ValueError(f"'{path}': not a grpo_ds checkpoint (no {HF_DIR}/config.json beside the DeepSpeed files)")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    run_config = read_state(ckpt).get("config", {})
    if run_config.get("lora_r"):
        if resolve_base is None:
            raise ValueError(f"'{path}': a LoRA checkpoint; exporting it needs its base model ({run_config['model']})")
        model = merge_lora(AutoModelForCausalLM.from_pretrained(resolve_base(run_config["model"]),
                                                                dtype=torch.float32), state, run_config)
    else:
        config = AutoConfig.from_pretrained(ckpt / HF_DIR)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"'{path}': the checkpoint lacks weights for {', '.join(missing[:5])}")
    if dtype is not None:
        model.to(dtype)
    model.config.use_cache = True
    save_model_folder(model, AutoTokenizer.from_pretrained(ckpt / HF_DIR), Path(out))
    return Path(out)


def is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def base_model(module):
    """The model under a peft wrapper (its config is the base model's), or the module itself."""
    return module.get_base_model() if is_peft(module) else module


def merge_lora(base, adapter_state: dict, run_config: dict):
    """`base` (a loaded model) with the run's LoRA adapters (peft state-dict keys, as the engine names them) merged
    in by peft itself."""
    from peft import get_peft_model

    model = get_peft_model(base, LoraSettings.from_config(run_config).peft_config())
    result = model.load_state_dict(adapter_state, strict=False)
    if result.unexpected_keys or not any("lora_" in key for key in adapter_state):
        raise CheckpointError(f"the LoRA weights do not fit the base model (unexpected: {result.unexpected_keys[:3]})")
    return model.merge_and_unload()


def folder_problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete Hugging Face model folder (None when it is): it must hold config.json, naming
    the model's architecture (entries cached by older versions have "architectures": null, which peers such as
    TRL cannot load), and every weight file (one safetensors file, or all the shards its index names, or a
    PyTorch .bin)."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    if not (path / "config.json").is_file():
        return "no config.json"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return f"unreadable {index.name}"
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            return f"no weights ({missing[0]})"
    elif not ((path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()):
        return "no weights (model.safetensors)"
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return "unreadable config.json"
    return None if architectures else "config.json names no architectures"


def untied_state_dict(module, dtype: Optional[torch.dtype] = None) -> dict:
    """The module's state dict on the CPU with each tied parameter under its first name only (lm_head tied to the
    embeddings is stored once; from_pretrained re-ties it), as contiguous copies cast to `dtype` if given."""
    seen, tied = set(), set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous().clone() for k, v in module.state_dict().items()
            if k not in tied}


def save_model_folder(model, tokenizer, path: Path, state_dict: Optional[dict] = None) -> None:
    """A Hugging Face folder (config.json, generation_config.json, model.safetensors, tokenizer) written by whichever
    process calls it. transformers 5's save_pretrained writes no weights on a rank other than 0 once
    torch.distributed is initialized (`should_save_on_this_rank`), which made a cache built by rank 1 a
    tokenizer-only folder; the cache must not depend on which rank builds it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # save_pretrained names the model class in config.json; saving the config alone does not, and a config built
    # from GGUF metadata or by from_config has none: peers stop on it (TRL reads config.architectures[0])
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(path)
    save_file(state_dict if state_dict is not None else untied_state_dict(model), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def export_hf(engine, tokenizer, path: str, dtype: Optional[torch.dtype] = None,
              adapter_path: Optional[str] = None, base_name: Optional[str] = None) -> None:
    """Save the live policy as a Hugging Face folder (weights gathered under ZeRO-3, tokenizer and chat template
    included), written by rank 0; every rank must call it. A LoRA policy is saved merged (a plain model that loads
    with transformers alone) and, at `adapter_path`, as a peft adapter folder whose base model is `base_name`."""
    module = engine.module
    state = None
    with distributed.gathered(engine):
        if torch.distributed.get_rank() == 0:
            state = untied_state_dict(module, dtype)
    if torch.distributed.get_rank() == 0:
        if is_peft(module):
            save_model_folder(merged_copy(module, state), tokenizer, Path(path))
            if adapter_path is not None:
                save_adapter_folder(module, state, tokenizer, Path(adapter_path), base_name)
        else:
            module.config.use_cache = True
            save_model_folder(module, tokenizer, Path(path), state)
    distributed.barrier()


def merged_copy(module, state: dict):
    """A plain model with the peft `module`'s adapters merged, built on the CPU from its full `state` (the live
    module stays as it is, adapters and all)."""
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        copy_ = get_peft_model(AutoModelForCausalLM.from_config(base_model(module).config),
                               copy.deepcopy(module.peft_config["default"]))
    copy_.load_state_dict(state, strict=False, assign=True)
    copy_.get_base_model().tie_weights()
    merged = copy_.merge_and_unload()
    missing = [n for n, p in merged.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"merging the adapters: no weights for {', '.join(missing[:5])}")
    merged.config.use_cache = True
    return merged


def save_adapter_folder(module, state: dict, tokenizer, path: Path, base_name: Optional[str]) -> None:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors) and the tokenizer; its
    base_model_name_or_path is the run's --model as given, so it resolves wherever the base does."""
    import copy

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(module.peft_config["default"])
    if base_name:
        config.base_model_name_or_path = base_name
    config.save_pretrained(path)
    adapter = get_peft_model_state_dict(module, state_dict=state)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
