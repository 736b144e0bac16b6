"""The one door to DeepSpeed and torch.distributed: process-group setup, DeepSpeed config assembly, the policy and
reference engines, ZeRO-3 gathering and collectives.

The same code path serves one plain `python` process, N CPU ranks (gloo) and N GPUs: only the launcher and the JSON
differ.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import BatchLayout, Config

log = logging.getLogger("grpo_ds.distributed")

AUTO = "auto"


# ----------------------------------------------------------------------------- process group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_MINUTES = 10.0  # DeepSpeed's own default (DEEPSPEED_TIMEOUT) and NCCL's: no legitimate wait changes


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> tuple[int, int]:
    """Join (or, for a plain `python` run, create) the process group; returns (rank, world_size). Each rank gets
    its share of the CPU threads: N ranks on C cores oversubscribe badly with C threads each.

    `timeout_minutes` (--dist_timeout) bounds every collective, on every backend: a rank that waits longer for a
    peer fails instead of waiting forever. A peer that dies outright closes its sockets, and gloo fails at once; one
    that vanishes without closing them (a frozen process, a lost node, any NCCL peer) is only noticed at the
    timeout. Under NCCL, collectives run on the GPU and only torch's watchdog thread sees the timeout: with
    TORCH_NCCL_ASYNC_ERROR_HANDLING 3 (torch 2.13's default, set here unless the environment chose) it ends the
    process at the timeout; 0 would leave it waiting, so it is warned about. TORCH_NCCL_BLOCKING_WAIT=1 (off:
    each collective then blocks the CPU until the GPU finishes it, losing the overlap of communication and compute)
    raises the timeout in the training loop instead, which then names the step and phase it was in."""
    if not timeout_minutes > 0:
        raise ValueError(f"--dist_timeout {timeout_minutes}: must be positive (minutes a rank waits for its peers)")
    if "RANK" not in os.environ:  # no launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    import faulthandler
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not on_gpu() and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not torch.distributed.is_initialized():
        backend = get_accelerator().communication_backend_name()
        if backend == "nccl":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # read when the group is created
            if os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0":
                log.warning("TORCH_NCCL_ASYNC_ERROR_HANDLING=0: a lost peer will leave this rank waiting forever "
                            "instead of failing after --dist_timeout %g min", timeout_minutes)
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
        if not on_gpu():
            unlink_shm_buffer()
    if not faulthandler.is_enabled():  # a watchdog's abort (NCCL timeout) prints where each thread was
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a stderr without a file descriptor
            faulthandler.enable()
    if on_gpu():
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm file per rank and never removes it: every run (killed or
    not) leaked 138 MB of RAM on 2 ranks, 13 GB after a day of tests here. Once every rank has mapped every file
    (true after init, hence the barrier), each rank unlinks its own name; the memory lives until the processes
    exit, then the kernel frees it."""
    torch.distributed.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def shutdown(synchronize: bool) -> None:
    """Leave the process group before the interpreter exits. `synchronize` (every rank got here normally) first
    waits for all ranks: a rank that destroyed its group while a peer was still finishing aborted at exit
    ("terminate called without an active exception": 2 of 8 two-rank bench runs here, 0 of 16 with the barrier).
    After an error, no barrier: the peers may never arrive."""
    if torch.distributed.is_initialized():
        if synchronize:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class PeerLost(RuntimeError):
    """A collective failed because another rank died or stopped answering; the trainer has already logged where
    (step and phase) and how to resume."""


EXIT_PEER_LOST = 4

# How a lost peer shows in a collective's error: gloo's messages (a peer that died closes its connections; one that
# stopped answering times out), and torch's distributed errors (NCCL, the rendezvous store)
_PEER_LOSS_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                       "Application timeout caused pair closure", "Broken pipe", "Connection refused",
                       "communicator was aborted")


def is_peer_loss(err: BaseException) -> bool:
    """Whether `err`, raised on this rank, says that a peer rank is gone or stopped answering."""
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _PEER_LOSS_MESSAGES)


def run(main: Callable[[], int]) -> int:
    """main()'s exit code, after leaving the process group (waiting for every rank only if main returned). After
    PeerLost (already logged) the exit code is EXIT_PEER_LOST and the group is left as it is: a barrier, or a
    destroy that flushes NCCL work, could wait on the lost peer. Nor does the process return to the interpreter: its
    exit would tear down the process group's threads still blocked on the peer, and the C++ runtime then aborts
    ("terminate called without an active exception", exit -6 instead of 4, seen here on rank 0). The rank's lines
    are flushed and the process ends at once."""
    try:
        code = main()
    except PeerLost:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)
    except BaseException:
        shutdown(synchronize=False)
        raise
    shutdown(synchronize=True)
    return code


def launch_command(script: str, nproc: int, flags: list[str], always_launcher: bool = False) -> list[str]:
    """The command that runs `script` with `nproc` ranks under the deepspeed launcher of this interpreter's
    environment (found even when its bin/ is not on PATH); one rank runs as a plain process unless
    `always_launcher`."""
    if nproc == 1 and not always_launcher:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(free_port()), script, *flags]


def on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def world_size() -> int:
    """Ranks in the process group (1 before it is up)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    torch.distributed.barrier()


def all_reduce_sum(values_K: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy, on the tensor's own device)."""
    out = values_K.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def all_reduce_max_dict(values: dict[str, float]) -> dict[str, float]:
    """The largest of each named value over ranks in one all-reduce (every rank must pass the same keys; for a
    minimum, pass the negated value)."""
    keys = sorted(values)
    out = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(keys, out.cpu().tolist()))


def all_reduce_dict(values: dict[str, float]) -> dict[str, float]:
    """Sum each named value over ranks in one all-reduce (float64; every rank must pass the same keys)."""
    keys = sorted(values)
    summed = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device()))
    return dict(zip(keys, summed.cpu().tolist()))


def all_gather_cat(values_K: torch.Tensor) -> torch.Tensor:
    """Concatenate equally sized 1-D tensors from every rank, in rank order."""
    parts = [torch.empty_like(values_K) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, values_K.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (small payloads: eval results, per-rank records)."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (for decisions that must be taken together)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device())).item() > 0)


def any_rank_after(work: Callable[[], str], hours: float = 24.0) -> str:
    """Rank 0 runs `work()` alone (it returns an error message, or "" on success) while the other ranks wait; every
    rank gets rank 0's message. The wait is on a gloo group of its own with a timeout of `hours`, not bounded by
    --dist_timeout: converting a large checkpoint takes rank 0 longer than the default 10 minutes, which aborted
    the waiting ranks. Gloo notices a rank 0 that dies at once (its sockets close); only a frozen one is waited
    for until the timeout."""
    from datetime import timedelta

    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(hours=hours))
    try:
        message = [work() if torch.distributed.get_rank() == 0 else ""]
        torch.distributed.broadcast_object_list(message, src=0, group=group)
    finally:
        torch.distributed.destroy_process_group(group)
    return message[0]


# ----------------------------------------------------------------------------- DeepSpeed config


def load_ds_json(path: str) -> dict:
    """The DeepSpeed JSON; a missing file or invalid JSON is one line naming the file (and the line)."""
    candidates = [Path(path), Path(__file__).resolve().parent.parent / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ValueError(f"--ds_config '{path}': file not found")
    try:
        raw = json.loads(found.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return raw


def _fill(ds: dict, key: str, value, flag: str, source: str, section: Optional[dict] = None) -> None:
    """Set `key` to the flag's value where the JSON says "auto" or nothing; refuse a different number."""
    where = ds if section is None else section
    current = where.get(key, AUTO)
    if current != AUTO and current != value:
        raise ValueError(f"{source}: {key}={current} contradicts {flag}; set it to \"auto\" or remove it")
    where[key] = value


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(raw: dict, cfg: Config, layout: BatchLayout, gpu: bool, source: str = "") -> tuple[dict, str]:
    """The engine config for the policy: the JSON's engine settings with batch sizes, optimizer, scheduler,
    clipping, precision and monitors filled from the flags. Returns (config, precision)."""
    source = source or cfg.ds_config
    ds = copy.deepcopy(raw)
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.train_batch_size, f"--train_batch_size {cfg.train_batch_size}",
          source)
    _fill(ds, "gradient_accumulation_steps", layout.gradient_accumulation_steps,
          f"--gradient_accumulation_steps {layout.gradient_accumulation_steps}", source)
    _fill(ds, "train_batch_size", cfg.train_batch_size * layout.gradient_accumulation_steps * layout.world_size,
          "--train_batch_size x gradient_accumulation_steps x ranks", source)
    _fill(ds, "gradient_clipping", cfg.max_norm, f"--max_norm {cfg.max_norm}", source)

    zero = ds.setdefault("zero_optimization", {})
    if zero_stage(ds) not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3")
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)

    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(ds, "lr", cfg.lr, f"--lr {cfg.lr}", source, params)
    _fill(ds, "weight_decay", cfg.weight_decay, f"--weight_decay {cfg.weight_decay}", source, params)
    for key, value in (("betas", [0.9, 0.999]), ("eps", 1e-8)):
        if params.get(key, AUTO) == AUTO:
            params[key] = value
    if not gpu and not offload_optimizer and optimizer["type"].lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)  # FusedAdam is a CUDA kernel; torch's AdamW serves CPU ranks
    if cfg.warmup_steps > 0 and "scheduler" not in ds:
        ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr,
                                                          "warmup_num_steps": cfg.warmup_steps,
                                                          "warmup_type": "linear"}}
    for key, value in ds.get("scheduler", {}).get("params", {}).items():
        if value == AUTO:
            ds["scheduler"]["params"][key] = {"warmup_max_lr": cfg.lr, "warmup_num_steps": cfg.warmup_steps,
                                              "warmup_min_lr": 0.0}.get(key, value)

    precision = resolve_precision(ds, cfg.precision, gpu, source)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds.pop("fp16", None)

    if cfg.report_to == "tensorboard":
        ds["tensorboard"] = {"enabled": True, "output_path": str(Path(cfg.output_dir) / "tensorboard"),
                             "job_name": run_name(cfg)}
    elif cfg.report_to == "wandb":
        ds["wandb"] = {"enabled": True, "project": "grpo_ds", "group": run_name(cfg)}
    ds.setdefault("steps_per_print", 10 ** 9)  # the trainer logs; DeepSpeed's own step prints are noise here
    return ds, precision


def resolve_precision(ds: dict, requested: str, gpu: bool, source: str) -> str:
    """bf16 or fp32. 'auto' follows the JSON on GPUs and picks fp32 on a CPU-only host, where bf16 matrix products
    run ~40x slower than fp32 (no AVX-512 BF16 units), so the same JSON serves both."""
    if ds.get("fp16", {}).get("enabled") in (True, AUTO):
        raise ValueError(f"{source}: fp16 is not supported (GRPO's small log-prob differences underflow); "
                         f"use \"bf16\"")
    if requested != "auto":
        return requested
    json_bf16 = ds.get("bf16", {}).get("enabled", False) in (True, AUTO)
    if gpu:
        return "bf16" if json_bf16 else "fp32"
    if json_bf16:
        log.info("CPU-only host: computing in fp32, not the JSON's bf16 (bf16 matmuls are ~40x slower on CPUs "
                 "without BF16 units); pass --precision bf16 to force it")
    return "fp32"


def reference_ds_config(policy_ds: dict, cfg: Config, world: int) -> dict:
    """The frozen reference's engine: no optimizer; ZeRO-3-partitioned (--reference_partitioned, the default, on
    more than one rank; always under a ZeRO-3 policy or with --reference_offload, which needs ZeRO-3), else
    replicated (stage 0). A single rank has nothing to partition over, and a ZeRO-3 reference there only costs: its
    fetch hooks on every layer, and on a CPU host with 2 threads a policy generate 30% slower beside it (measured,
    docs/PERFORMANCE.md)."""
    partitioned = cfg.reference_partitioned and world > 1
    stage = 3 if zero_stage(policy_ds) == 3 or cfg.reference_offload or partitioned else 0
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = policy_ds["zero_optimization"].get(
            "stage3_param_persistence_threshold", AUTO)
        if zero["stage3_param_persistence_threshold"] == AUTO:
            zero.pop("stage3_param_persistence_threshold")
    if cfg.reference_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu()}
    return {"train_micro_batch_size_per_gpu": policy_ds["train_micro_batch_size_per_gpu"],
            "gradient_accumulation_steps": 1, "bf16": {"enabled": policy_ds["bf16"]["enabled"]},
            "zero_optimization": _without_linear_wrapper(zero), "steps_per_print": 10 ** 9}


def _without_linear_wrapper(zero: dict) -> dict:
    """A ZeRO-3 inference engine's section: no memory_efficient_linear, which DeepSpeed would otherwise install
    process-wide in place of torch's F.linear (see torch_linear) for a backward pass this engine never runs."""
    if zero.get("stage") == 3:
        zero["memory_efficient_linear"] = False
    return zero


def reward_model_ds_config(policy_ds: dict, offload: bool = False) -> dict:
    """The reward model's engine (grpo_ds/reward_model.py): an inference engine like the partitioned reference,
    always ZeRO-3 (each rank holds 1/W of the weights; a forward gathers them layer by layer), with the policy's
    precision and persistence threshold; `offload` (--reward_model_offload) keeps the partitions in CPU memory."""
    zero: dict = {"stage": 3}
    threshold = policy_ds.get("zero_optimization", {}).get("stage3_param_persistence_threshold", AUTO)
    if threshold != AUTO:
        zero["stage3_param_persistence_threshold"] = threshold
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu()}
    return {"train_micro_batch_size_per_gpu": policy_ds["train_micro_batch_size_per_gpu"],
            "gradient_accumulation_steps": 1, "bf16": {"enabled": policy_ds.get("bf16", {}).get("enabled") is True},
            "zero_optimization": _without_linear_wrapper(zero), "steps_per_print": 10 ** 9}


def run_name(cfg: Config) -> str:
    return cfg.run_name or Path(cfg.output_dir).name


# ----------------------------------------------------------------------------- engines


def _load_under(ds: dict, load):
    """Run `load()` with transformers' DeepSpeed hook set for this config: under ZeRO-3 `from_pretrained` then
    partitions each weight as it is read (zero.Init), so no rank ever holds a model that only fits partitioned."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if zero_stage(ds) != 3:
        return load()
    hook = HfDeepSpeedConfig(ds)  # noqa: F841 (kept alive for the duration of load())
    try:
        return load()
    finally:
        unset_hf_deepspeed_config()


def init_policy(load_model: Callable[[], torch.nn.Module], ds: dict):
    """The policy's training engine around the model that `load_model()` returns (loaded under ZeRO-3's
    partitioning hook when the config asks for stage 3)."""
    import deepspeed

    model = _load_under(ds, load_model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters only
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=trainable)
    return engine


def init_reference(load_model: Callable[[], torch.nn.Module], ds: dict):
    """A frozen engine (no optimizer, eval mode) around `load_model()`."""
    import deepspeed

    model = _load_under(ds, load_model)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def gathered(engine):
    """Every parameter whole on every rank for the duration (ZeRO-3); a no-op for other stages."""
    if not is_zero3(engine):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))


def gathered_in_buckets(engine, items: list, bucket_bytes: int):
    """Yield `items` (each a (key, [parameters]) pair) in buckets of about `bucket_bytes` of full-size parameters,
    each bucket's parameters whole on every rank while it is out (ZeRO-3: one GatheredParameters per bucket, so no
    rank ever holds more than one bucket beyond its shard; other stages: no gathering). Every rank must iterate to
    the end, together: the gathers are collectives."""
    zero3 = is_zero3(engine)

    def numel(param):
        return param.ds_numel if hasattr(param, "ds_numel") else param.numel()

    bucket, size = [], 0
    for key, params in items:
        nbytes = sum(numel(p) * p.element_size() for p in params)
        if bucket and size + nbytes > bucket_bytes:
            yield from _gathered_bucket(bucket, zero3)
            bucket, size = [], 0
        bucket.append((key, params))
        size += nbytes
    if bucket:
        yield from _gathered_bucket(bucket, zero3)


def _gathered_bucket(bucket: list, zero3: bool):
    if not zero3:
        yield bucket
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, params in bucket for p in params]):
        yield bucket


@contextlib.contextmanager
def gathered_for_generation(engine, enabled: bool):
    """Under ZeRO-3, gather every parameter once for the whole generation phase and lift DeepSpeed's per-module
    fetch hooks meanwhile (DeepSpeed's own unwrap_model_for_generation): otherwise every decoding step gathers each
    layer again, or at least runs every hook (measured on an H200, Qwen2.5-0.5B: 6.7x slower rollout than ZeRO-2
    with the parameters gathered but the hooks left on). No gathering for other stages, or when disabled for models
    that do not fit on one device (then generate() must run with synced_gpus). Generation runs torch's own
    F.linear in every case (torch_linear)."""
    if enabled and is_zero3(engine):
        from deepspeed.runtime.zero import unwrap_model_for_generation

        gathering = unwrap_model_for_generation(engine)
    else:
        gathering = contextlib.nullcontext()
    with gathering, torch_linear():
        yield


@contextlib.contextmanager
def torch_linear():
    """torch's own `torch.nn.functional.linear` for the duration of a pass without a backward.

    A ZeRO-3 engine (DeepSpeed >= 0.19, zero_optimization.memory_efficient_linear, on by default) replaces
    F.linear process-wide with an autograd Function that re-gathers each weight in the backward pass rather than
    keep it from the forward: it saves memory in training only, and costs every linear layer of every model in the
    process its overhead (the embedded model's generate 12% slower with 2 threads on the 2-core CPU, 8% with 1).
    Generation and the reference and old log-prob passes have no backward, so they run torch's; the training pass
    keeps whatever the policy's config chose. The reference and reward-model engines never install it
    (reference_ds_config)."""
    import torch.nn.functional as F

    installed = F.linear
    if installed is torch._C._nn.linear:
        yield
        return
    F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = installed


def weights_fingerprint(engine) -> torch.Tensor:
    """A float64 checksum of every parameter (gathered under ZeRO-3), equal on all ranks when they are in sync."""
    with gathered(engine), torch.no_grad():
        params = list(engine.module.parameters())
        return torch.stack([p.double().sum() * (i + 1) for i, p in enumerate(params)]).sum().cpu()
