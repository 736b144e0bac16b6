"""`train(cfg)`: GRPO on DeepSpeed. Setup once, then per step: rollout -> experience -> update -> log.

Each rank owns whole groups: it samples its own slice of the step's prompts, generates all G completions of each,
scores them and computes their advantages without talking to other ranks. Ranks meet inside DeepSpeed (gradient
reduction, ZeRO-3 gathering) and in a few small collectives per step: whether any rank has a learning signal or a
stop signal, the token count of each optimizer step (the loss's normalization), and one all-reduce of the step's
metrics.

Shape legend: B prompts on this rank, G group_size, N = B * G completions, C completion positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoint, distributed
from .config import BatchLayout, Config, LoraSettings, dumps, validate
from .data import Problem, PromptSampler, load_problems, render_problem
from .eval import evaluate
from .experience import Experience, balanced_assignment
from .generation import Rollout, Sampling, StaticDecoder, generate
from .logprobs import completion_logprobs
from .loss import (BatchTotals, GRPOLoss, entropy_threshold, group_advantages, kl_estimate, sampling_correction,
                   uniform_groups)
from .metrics import MetricsLogger, setup_logging
from .models import check_lora_targets, load_model, load_tokenizer, resolve_model
from .plot import plot_runs
from .remote_reward import RemoteReward
from .reward_model import RewardModel, check_reward_model
from .rewards import (RewardAbort, WeightedReward, overlong_penalties, parse_reward, required_columns,
                      score_completions)
from .tools import Toolbox, ToolFormat

log = logging.getLogger("grpo_ds.trainer")

NUM_LOGGED_COMPLETIONS = 4  # per logging step: the first completions of rank 0's first group


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from (seed, step, rank, ...), so every rank and step samples independently and a
    resumed run re-derives the same streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class Preempted(Exception):
    """Raised on every rank after a SIGTERM/SIGINT once the checkpoint is written; the message says how to resume."""


class RewardAbortedRun(ValueError):
    """A reward source failed for good mid-run (e.g. --reward_url unreachable after its retries); raised on every
    rank once the last complete step is checkpointed."""


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps were skipped for non-finite gradients."""


@dataclass
class Where:
    """The step and phase this rank is in (rollout, reference, update, log, eval, save; export after the last step),
    so that a rank that loses a peer can say where."""

    step: int = 0
    phase: str = "setup"
    since: float = field(default_factory=time.perf_counter)

    def enter(self, step: int, phase: str) -> None:
        self.step, self.phase, self.since = step, phase, time.perf_counter()


@contextlib.contextmanager
def peer_loss_reported(run: "Run"):
    """A collective that fails because another rank died or stopped answering (within --dist_timeout) ends this
    rank with one line naming the step and phase and the checkpoint to resume from, then PeerLost (exit code 4)
    instead of a traceback from deep inside a collective."""
    try:
        yield
    except distributed.PeerLost:
        raise
    except Exception as err:  # noqa: BLE001 - only a lost peer is reworded; anything else is re-raised as it is
        if not distributed.is_peer_loss(err):
            raise
        where, saved = run.where, checkpoint.latest_checkpoint(run.cfg.output_dir)
        # gloo's first sentence, without its source location: "Connection closed by peer [10.0.0.2]:41417"
        reason = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", str(err).strip()).split(". ")[0].splitlines()
        reason = reason[0] if reason and reason[0] else type(err).__name__
        log.error("rank %d: lost a peer during %s of step %d after %.0f s: %s; %s; resume with --resume_from latest",
                  run.rank, where.phase, where.step, time.perf_counter() - where.since, reason[:300],
                  f"the last complete checkpoint is {saved}" if saved else "no checkpoint was written yet")
        raise distributed.PeerLost(f"lost a peer during {where.phase} of step {where.step}") from err


class StopSignal:
    """SIGTERM and SIGINT set a flag that the loop checks at safe points (after generation, after each step)
    instead of killing the process mid-update. A scheduler or the deepspeed launcher may deliver SIGTERM more than
    once (to the process group, then to each rank), so repeats are ignored; a second SIGINT (Ctrl-C twice) stops at
    once."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: finishing safely and writing a checkpoint (Ctrl-C again to abort)",
                        self.received)
        elif signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the step


def train(cfg: Config, on_step_end: Optional[Callable] = None) -> list[dict]:
    """Run GRPO as configured; returns the per-step metrics of this invocation (identical on every rank).
    `on_step_end(step=, policy=, reference=, metrics=)` is called on every rank after each step (tests use it)."""
    run = setup(cfg)
    history = []
    with StopSignal() as stop, peer_loss_reported(run):
        for step in range(run.start_step + 1, cfg.max_steps + 1):
            started = time.perf_counter()
            run.where.enter(step, "rollout")
            groups = rollout(run, step, stop)  # 1. prompts -> G completions each -> rewards
            run.where.enter(step, "reference")
            experience, timings = make_experience(run, groups)  # 2. advantages, reference and old log-probs
            run.where.enter(step, "update")
            stats = (update(run.policy, experience, run.loss_fn, run.update_plan(step))  # 3. optimizer steps,
                     if experience.has_signal else UpdateStats())  # none when no group on any rank has a signal
            run.where.enter(step, "log")
            metrics = log_step(run, step, groups, experience, stats, timings, time.perf_counter() - started)  # 4.
            history.append({"step": step, **metrics})
            if on_step_end is not None:
                on_step_end(step=step, policy=run.policy, reference=run.reference, metrics=metrics)
            run.check_nonfinite(stats, step)
            run.where.enter(step, "save")
            run.save_and_export(step)  # 5. checkpoint, exports
            if distributed.any_rank(stop.received is not None):
                run.preempt(stop.received or "a signal on another rank", step)
    with peer_loss_reported(run):
        run.where.enter(run.where.step, "export")
        return finish(run, history)


# ----------------------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything a step needs, built once by setup()."""

    cfg: Config
    layout: BatchLayout
    rank: int
    world: int
    tokenizer: object
    policy: object  # the DeepSpeed engine being trained
    reference: Optional[object]  # a frozen engine, or None when kl_weight is 0
    loss_fn: GRPOLoss
    rewards: list  # the weighted reward terms (rewards.parse_reward)
    sampler: PromptSampler
    sampling: Sampling
    eval_problems: list[Problem]
    logger: MetricsLogger
    output_dir: Path
    export_dtype: torch.dtype
    engine: object = None  # the compiled engine, the vLLM client, or None for Hugging Face's generate
    toolbox: Optional[Toolbox] = None  # --tools and --environment: rollouts are episodes
    tool_format: Optional[ToolFormat] = None
    example: Optional[tuple[str, str] | list[dict]] = None  # the worked example before every question (cfg.example)
    start_step: int = 0
    saved_step: int = 0
    consecutive_skips: int = 0
    started: float = field(default_factory=time.perf_counter)
    where: Where = field(default_factory=Where)

    def prompt(self, problem: Problem | str) -> str:
        """The prompt text of a problem (or a bare question), as training, evaluation, ask and serve render it."""
        problem = Problem(problem, "") if isinstance(problem, str) else problem
        return render_problem(self.tokenizer, problem, self.cfg.system_prompt_text(), self.cfg.response_prefix,
                              self.example, self.toolbox.schemas if self.toolbox is not None else None)

    def update_plan(self, step: int) -> "UpdatePlan":
        return UpdatePlan(micro_batch_size=self.cfg.train_batch_size,
                          accumulation=self.layout.gradient_accumulation_steps, epochs=self.cfg.epochs_per_step,
                          world_size=self.world, max_new_tokens=self.cfg.max_new_tokens,
                          temperature=self.cfg.temperature, group_size=self.cfg.group_size,
                          shuffle_seed=(self.cfg.seed, step),  # every rank alike: see UpdatePlan
                          correction=((self.cfg.importance_sampling_mode, self.cfg.importance_sampling_clip_min,
                                       self.cfg.importance_sampling_clip_max)
                                      if self.cfg.importance_sampling_correction else None))

    def save(self, step: int) -> None:
        state = {"step": step, "sampler": self.sampler.state_dict(), "consecutive_skips": self.consecutive_skips,
                 "world_size": self.world, "zero_stage": distributed.zero_stage(self.policy.config),
                 "config": self.cfg.to_dict()}
        t0 = time.perf_counter()
        try:
            path = checkpoint.save(self.policy, self.tokenizer, self.cfg.output_dir, step, state,
                                   self.cfg.save_total_limit)
        except checkpoint.CheckpointError as err:  # e.g. a full disk: keep training, the next save may succeed
            log.error("%s", err)
            return
        self.saved_step = step
        log.info("checkpoint %s written in %.1f s", path, time.perf_counter() - t0)

    def save_and_export(self, step: int) -> None:
        cfg = self.cfg
        if cfg.save_steps and (step % cfg.save_steps == 0 or step == cfg.max_steps):
            self.save(step)
        if cfg.export_steps and step % cfg.export_steps == 0 and step != cfg.max_steps:
            checkpoint.export_hf(self.policy, self.tokenizer, str(self.output_dir / "exports" / f"step_{step}"),
                                 self.export_dtype)

    def preempt(self, signal_name: str, step: int) -> None:
        """Write the checkpoint of `step` (unless it exists) and raise Preempted on every rank."""
        if step > self.saved_step:
            self.save(step)
        raise Preempted(f"stopped by {signal_name} after step {step}; checkpoint "
                        f"{checkpoint.latest_checkpoint(self.cfg.output_dir)}. Resume with the same command plus "
                        f"--resume_from latest")

    def check_nonfinite(self, stats: "UpdateStats", step: int) -> None:
        for finite in stats.finite_steps:
            self.consecutive_skips = 0 if finite else self.consecutive_skips + 1
        if self.consecutive_skips >= self.cfg.max_nonfinite_skips:
            raise NonFiniteError(f"{self.consecutive_skips} consecutive optimizer steps skipped for non-finite "
                                 f"gradients (last at step {step}); lower --lr or check the data. The last good "
                                 f"checkpoint is {checkpoint.latest_checkpoint(self.cfg.output_dir)}")


def setup(cfg: Config) -> Run:
    """Check everything that can be refused, then load the models and engines, and resume if asked."""
    rank, world = distributed.init_distributed(cfg.dist_timeout)
    setup_logging(rank)
    layout = validate(cfg, world)
    ds_config, precision = distributed.build_ds_config(distributed.load_ds_json(cfg.ds_config), cfg, layout,
                                                       distributed.on_gpu())
    remote = None
    if cfg.reward_url:  # a dead or slow scorer is refused now, not at the first step
        remote = RemoteReward(cfg.reward_url, cfg.reward_url_timeout, cfg.reward_url_retries)
        remote.check()
    vllm = connect_vllm(cfg) if cfg.rollout_engine == "vllm" else None
    if cfg.reward_model:  # the checkpoint's head, read from its config alone
        check_reward_model(cfg.reward_model)
    rewards = parse_reward(cfg.reward, {"remote": remote, "model": _reward_model_pending})
    toolbox = Toolbox.from_flags(cfg.tools, cfg.environment, cfg.tool_timeout, cfg.max_tool_calling_iterations)
    if toolbox is not None and toolbox.has_reward:  # the environment owns a reward: one more term, as TRL
        rewards.append(WeightedReward(toolbox.environment_name, toolbox.reward, 1.0, batched=True))
    example = cfg.example(toolbox)  # with --example_tool_call the tools run now: a bad example stops here
    if not rewards:
        raise ValueError(f"--reward {cfg.reward}: no reward term; 'none' needs an --environment whose class defines "
                         f"get_reward()")
    if toolbox is not None and distributed.zero_stage(ds_config) == 3 and not cfg.zero3_gather_for_generation:
        raise ValueError("--tools/--environment: episodes decode a different number of turns on each rank, which "
                         "ZeRO-3's per-token gathering cannot follow; use --zero3_gather_for_generation true")
    columns = dict(prompt_column=cfg.prompt_column, answer_column=cfg.answer_column)
    problems = load_problems(cfg.dataset, "train", num_problems=cfg.num_problems, difficulty=cfg.difficulty,
                             seed=cfg.seed, bad_answers=cfg.bad_answers, **columns)
    check_reward_columns(rewards, problems, cfg.dataset)
    eval_problems = (load_problems(cfg.eval_dataset or cfg.dataset, "test", num_problems=cfg.eval_limit,
                                   difficulty=cfg.difficulty, seed=cfg.seed, bad_answers=cfg.bad_answers, **columns)
                     if cfg.eval_steps else [])
    if example is not None and any(p.messages for p in problems):
        log.warning("--example_question: the dataset's prompts are chat conversations, rendered as written; the "
                    "worked example (and --system_prompt) apply to question strings only")
    resume_path = checkpoint.resolve_resume(cfg.output_dir, cfg.resume_from)
    resume_state = None
    if resume_path is not None:
        resume_state = checkpoint.read_state(resume_path)
        checkpoint.check_compatible(resume_state, world, distributed.zero_stage(ds_config), resume_path, cfg.lora_r)
        if checkpoint.needs_universal(resume_state, world, distributed.zero_stage(ds_config)):
            ds_config = checkpoint.universal_ds_config(ds_config)  # another layout: DeepSpeed's universal loading
    _prepare_output_dir(cfg, rank, resume_path, resume_state["step"] if resume_state else 0)
    checkpoint.check_shared(cfg.output_dir)
    model_path = resolve_model(cfg.model)
    lora = LoraSettings.from_config(cfg)
    if lora is not None:
        check_lora_targets(model_path, lora)
    _configure_wandb(cfg)
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        (output_dir / "config.json").write_text(dumps(cfg) + "\n")
        (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    log.info("%d rank(s), ZeRO-%d, %s; %d prompts x %d completions per step (%d per rank), micro-batch %d, "
             "%d optimizer step(s) per step%s", world, distributed.zero_stage(ds_config), precision,
             cfg.rollouts_per_step, cfg.group_size, layout.completions_per_rank, cfg.train_batch_size,
             layout.optimizer_steps_per_step, " (on-policy: no old-log-prob pass)" if layout.on_policy else "")

    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tokenizer = load_tokenizer(model_path)
    policy = distributed.init_policy(lambda: load_model(model_path, dtype, cfg.gradient_checkpointing, lora),
                                     ds_config)
    # With LoRA the reference is the policy with its adapters off: no second model, engine or copy of the weights
    reference = (distributed.init_reference(lambda: load_model(model_path, dtype),
                                            distributed.reference_ds_config(ds_config, cfg, world))
                 if cfg.kl_weight > 0 and lora is None else None)
    run = Run(cfg=cfg, layout=layout, rank=rank, world=world, tokenizer=tokenizer, policy=policy,
              reference=reference, loss_fn=loss_from(cfg),
              rewards=rewards, sampler=PromptSampler(problems, cfg.seed),
              sampling=Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.fixed_length),
              eval_problems=eval_problems, logger=None, output_dir=output_dir,
              export_dtype={"auto": dtype, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.export_dtype],
              toolbox=toolbox, example=example,
              tool_format=ToolFormat(tokenizer, cfg.response_prefix, cfg.turn_prefix) if toolbox else None)
    run.engine = vllm or rollout_engine(cfg, policy)
    if cfg.reward_model:  # partitioned over the ranks like the reference (ZeRO-3), offloaded on request
        scorer = RewardModel(cfg.reward_model,
                             distributed.reward_model_ds_config(ds_config, cfg.reward_model_offload),
                             micro_batch_size=cfg.train_batch_size)
        run.rewards = [dataclasses.replace(t, fn=scorer) if t.name == "model" else t for t in run.rewards]
    if resume_path is not None:
        state = checkpoint.load(policy, resume_path)
        _warn_config_changes(state["config"], cfg)
        run.start_step = run.saved_step = state["step"]
        run.consecutive_skips = state["consecutive_skips"]
        run.sampler.load_state_dict(state["sampler"])
        log.info("resumed from %s at step %d", resume_path, run.start_step)
    run.logger = MetricsLogger(cfg.output_dir, rank, cfg.max_steps, monitor=policy.monitor,
                               first_step=run.start_step + 1)
    return run


def _reward_model_pending(prompts, completions, **kwargs):
    """Stands for the 'model' term until setup() has loaded the reward model."""
    raise AssertionError("the reward model is scored before it was loaded")


def check_reward_columns(rewards: list, problems: list[Problem], dataset: str) -> None:
    """Refuse a TRL-style reward whose required arguments no dataset column fills (TRL's accuracy_reward needs
    `solution`), before any model loads."""
    have = set(problems[0].columns) if problems else set()
    for term in rewards:
        missing = [name for name in required_columns(term) if name not in have]
        if missing:
            raise ValueError(f"--reward {term.name}: needs the dataset column '{missing[0]}', which --dataset "
                             f"{dataset} does not have (its columns: {', '.join(sorted(have)) or 'none'})")


def connect_vllm(cfg: Config):
    """The vLLM server's client (--rollout_engine vllm), checked before any model loads: a missing server is one
    line naming the flags, not a failure at the first step."""
    from .vllm_engine import VLLMEngine  # only a vLLM run loads it

    engine = VLLMEngine(cfg.vllm_server_host, cfg.vllm_server_port, cfg.vllm_server_timeout, cfg.vllm_sync_bucket_mb)
    health = engine.check()
    distributed.barrier()  # every rank has read the server's weights version before the first sync
    log.info("rollout engine: vllm (server %s serving %s; weights synced after every update)", engine.url,
             health["model"])
    return engine


def rollout_engine(cfg: Config, policy):
    """The static, compiled decoding engine, or None for Hugging Face's generate (the vLLM client comes from
    connect_vllm); the choice is logged. 'auto' picks the static engine wherever it can run: on GPUs its
    CUDA-graph decode step removes generate's launch overhead; on a CPU it runs eager and wins by doing less work
    (attention over the filled cache only, ended rows dropped, no cache regrown every token: docs/PERFORMANCE.md).
    ZeRO-3 without gathering for generation fetches each layer per token on every rank in step, which only
    generate's synced_gpus does."""
    gathers = not distributed.is_zero3(policy) or cfg.zero3_gather_for_generation
    choice = cfg.rollout_engine
    if choice == "auto":
        choice = "compiled" if gathers else "hf"
    if choice == "compiled" and not gathers:
        raise ValueError("--rollout_engine compiled: needs the policy gathered for generation under ZeRO-3 "
                         "(--zero3_gather_for_generation true); use --rollout_engine hf")
    log.info("rollout engine: %s%s", choice, {
        "compiled": " (static KV cache, on-device sampling" + (", CUDA-graph decode step)" if distributed.on_gpu()
                                                                else "; eager on a CPU)"),
        "hf": " (Hugging Face generate" + ("; auto picks it under ZeRO-3 without gathering for generation)"
                                           if cfg.rollout_engine == "auto" else ")")}[choice])
    return StaticDecoder(policy.module) if choice == "compiled" else None


def loss_from(cfg: Config) -> GRPOLoss:
    """The loss the flags ask for; with --kl_in_reward the KL is in the rewards, not in the loss."""
    return GRPOLoss(cfg.clip_eps, 0.0 if cfg.kl_in_reward else cfg.kl_weight, cfg.loss_type, cfg.clip_eps_high,
                    importance_sampling_level=cfg.importance_sampling_level, delta=cfg.delta,
                    top_entropy_quantile=cfg.top_entropy_quantile, kl_estimator=cfg.kl_estimator)


def _configure_wandb(cfg: Config) -> None:
    if cfg.report_to == "wandb" and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        log.info("wandb: no WANDB_API_KEY, logging offline under %s (sync later with 'wandb sync')", cfg.output_dir)
    os.environ.setdefault("WANDB_DIR", cfg.output_dir)


def _prepare_output_dir(cfg: Config, rank: int, resume_path: Optional[Path], resume_step: int) -> None:
    """Refuse to mix two runs in one folder; on resume, drop log rows past the checkpoint (they will be redone)."""
    output_dir = Path(cfg.output_dir)
    existing = checkpoint.latest_checkpoint(cfg.output_dir)
    if existing is not None and resume_path is None and not cfg.overwrite and not cfg.resume_from:
        raise ValueError(f"--output_dir {cfg.output_dir}: holds another run's checkpoints (latest {existing.name}); "
                         f"pass --resume_from latest to continue it or --overwrite to start over")
    if rank != 0:
        return
    if cfg.overwrite and resume_path is None:
        for name in (checkpoint.CHECKPOINTS, "exports", "final", "final_adapter"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "completions.jsonl"):
        path = output_dir / name
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(row + "\n" for row in rows))


def _warn_config_changes(saved: dict, cfg: Config) -> None:
    harmless = {"max_steps", "resume_from", "overwrite", "save_steps", "save_total_limit", "export_steps",
                "report_to", "log_completions_steps", "run_name", "output_dir", "config"}
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in harmless and saved.get(k) != v)
    if changed:
        log.warning("resuming with changed settings: %s (the trajectory will differ from an uninterrupted run)",
                    ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed))


# ----------------------------------------------------------------------------- 1. rollout


@dataclass
class Groups:
    """This rank's B groups for the update: their prompts, G completions each and the completions' rewards; and
    what the rollout cost to get them (`drawn`: sums over every completion generated this step, for the logs)."""

    problems_B: list[Problem]
    rollout: Rollout
    texts_N: list[str]
    rewards_BG: torch.Tensor
    drawn: dict
    seconds: float
    rounds: int = 1
    extra_columns: dict = field(default_factory=dict)  # what reward functions logged per completion (log_extra)


class RewardReports:
    """What TRL passes a batched reward besides the data, for one scoring call: `trainer_state` (a transformers
    TrainerState whose global_step counts the GRPO steps done, max_steps the run's), `log_metric(name, value)`
    (averaged over the step's calls and ranks, logged as logged/<name>) and `log_extra(column, values)` (a value per
    completion, shown in completions.jsonl)."""

    def __init__(self):
        self.metrics: dict[str, list[float]] = {}
        self.columns: dict[str, list] = {}

    def extras(self, step: int, max_steps: int) -> dict:
        from transformers import TrainerState

        return {"trainer_state": TrainerState(global_step=step - 1, max_steps=max_steps),
                "log_metric": lambda name, value: self.metrics.setdefault(str(name), []).append(float(value)),
                "log_extra": lambda column, values: self.columns.setdefault(str(column), []).extend(values)}

    def metric_sums(self) -> dict:
        return {f"logged/{name}_{part}": float(sum(values) if part == "sum" else len(values))
                for name, values in self.metrics.items() for part in ("sum", "count")}


def rollout(run: Run, step: int, stop: StopSignal) -> Groups:
    """Sample the step's prompts (every rank draws the same global batch and keeps its slice), generate G
    completions per prompt with the policy's live weights (gathered once under ZeRO-3), and score them.

    With --dynamic_sampling (DAPO), groups whose rewards all tie are set aside and further rounds of prompts are
    drawn until the ranks hold B groups with a signal each (pooled over the ranks with --balance_ranks, else on
    every rank), or --max_sampling_rounds is reached; ranks decide together, so they stay in lockstep. Every round
    advances the data cursor, so a resumed run draws what this one drew.

    With --balance_ranks (and several ranks) the step's groups are then pooled over the ranks and dealt out B to a
    rank with token counts as even as possible (share_groups), so that no rank waits for one whose completions ran
    long."""
    cfg, B = run.cfg, run.layout.prompts_per_rank
    pooled = cfg.balance_ranks and run.world > 1
    sampler_before = run.sampler.state_dict()
    started = time.perf_counter()
    with_signal, tied, drawn = [], [], {}
    for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        batch = sample_round(run, step, round_, stop, sampler_before)
        for name, value in batch.drawn.items():
            drawn[name] = drawn.get(name, 0.0) + value
        for b in range(B):
            (tied if bool(uniform_groups(batch.rewards_BG[b:b + 1])) else with_signal).append((batch, b, round_))
        if not cfg.dynamic_sampling:
            break
        if pooled:
            found = float(distributed.all_reduce_sum(torch.tensor([float(len(with_signal))],
                                                                  device=run.policy.device)))
            if found >= B * run.world:
                break
        elif not distributed.any_rank(len(with_signal) < B):
            break
    if pooled:
        groups = share_groups(run, step, with_signal, tied, drawn)
        groups.seconds, groups.rounds = time.perf_counter() - started, round_ + 1
        return groups
    with_signal, tied = [(batch, b) for batch, b, _ in with_signal], [(batch, b) for batch, b, _ in tied]
    if not cfg.dynamic_sampling:
        chosen = [(batch, b) for b in range(B)]  # every group, in order
    else:
        chosen = with_signal[:B] + tied[:max(0, B - len(with_signal))]
        if len(with_signal) < B:
            log.warning("step %d: dynamic sampling found %d of %d groups with a signal on rank %d in %d rounds "
                        "(--max_sampling_rounds); training on them and %d tied groups", step, len(with_signal), B,
                        run.rank, round_ + 1, B - len(with_signal))
    drawn["groups_kept"] = float(min(len(with_signal), B))
    groups = take_groups(chosen, cfg.group_size, run.tokenizer.pad_token_id)
    groups.drawn, groups.seconds, groups.rounds = drawn, time.perf_counter() - started, round_ + 1
    return groups


def sample_round(run: Run, step: int, round_: int, stop: StopSignal, sampler_before: dict) -> Groups:
    """One draw of the step's rollouts_per_step prompts: this rank's B prompts, G completions each, scored."""
    cfg, B, G = run.cfg, run.layout.prompts_per_rank, run.cfg.group_size
    problems_B = run.sampler.next_batch(cfg.rollouts_per_step)[run.rank * B:(run.rank + 1) * B]
    torch.manual_seed(seed_for(cfg.seed, step, run.rank, *([round_] if round_ else [])))
    run.policy.eval()
    vllm = cfg.rollout_engine == "vllm"
    # the server holds the weights of the last sync: send them again when an optimizer step changed them (and at
    # the first rollout, since the server started from the model's folder or another run's weights)
    sync = run.engine.sync_weights(run.policy) if vllm and round_ == 0 else None
    session = (run.toolbox.session([p.columns for p in problems_B for _ in range(G)], run.tool_format)
               if run.toolbox is not None else None)  # with tools: each row's environment, reset, and its tools
    prompts, group_size = (session.prompts(problems_B, G, run.prompt) if session is not None
                           else ([run.prompt(p) for p in problems_B], G))
    t0 = time.perf_counter()
    with distributed.gathered_for_generation(run.policy, cfg.zero3_gather_for_generation and not vllm):
        result = generate(run.policy.module, run.tokenizer, prompts,
                          run.sampling, group_size=group_size, batch_size=cfg.rollout_batch_size,
                          max_length=cfg.max_length, share_prefill=cfg.share_prefill,
                          should_stop=lambda: stop.received is not None,
                          synced_gpus=(distributed.is_zero3(run.policy) and not cfg.zero3_gather_for_generation
                                       and not vllm),
                          engine=run.engine, tools=session, max_episode_tokens=cfg.max_episode_tokens or 0)
    seconds = time.perf_counter() - t0
    if distributed.any_rank(stop.received is not None):  # nothing updated yet: abandon this step on all ranks
        run.sampler.load_state_dict(sampler_before)
        run.preempt(stop.received or "a signal on another rank", step - 1)
    texts_N = result.texts(run.tokenizer)
    completion_ids = [row[mask.bool()].tolist() for row, mask in zip(result.completion_ids_NC.cpu(),
                                                                   result.episode_mask_NC.cpu())]
    reported, failure = RewardReports(), None
    try:
        extras = {**reported.extras(step, cfg.max_steps),
                  **({"environments": session.environments} if session is not None else {})}
        rewards, stats = score_completions(texts_N, [p for p in problems_B for _ in range(G)], run.rewards,
                                           completion_ids, extras, result.messages_N)
    except RewardAbort as err:  # a remote scorer that stays unreachable: save what we have and stop, all ranks
        failure = str(err)
    if cfg.reward_url and distributed.any_rank(failure is not None):
        run.sampler.load_state_dict(sampler_before)  # this step never happened
        if step - 1 > run.saved_step:
            run.save(step - 1)
        why = next(f for f in distributed.all_gather_objects(failure) if f)  # every rank joins the gather
        raise RewardAbortedRun(f"{why}; stopped at step {step}, checkpoint "
                               f"{checkpoint.latest_checkpoint(cfg.output_dir)} (resume with --resume_from latest)")
    if failure is not None:
        raise RewardAbortedRun(failure)
    lengths_N = result.completion_mask_NC.sum(dim=1).tolist()
    if cfg.overlong_buffer:
        penalties = overlong_penalties(lengths_N, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        rewards = [r + penalty for r, penalty in zip(rewards, penalties)]
        stats["overlong_penalty"] = sum(penalties) / len(penalties)
    rewards_BG = torch.tensor(rewards, dtype=torch.float32).view(B, G)
    n = float(B * G)
    scored = rewards_BG.double()[~torch.isnan(rewards_BG)]  # NaN: no reward term applied (TRL's None)
    rates = ("success_rate", "format_rate", "clean_rate", "overlong_penalty")
    drawn = {"completions": n, "groups": float(B), "scored": float(scored.numel()),
             "reward_sum": float(scored.sum()), "reward_sq_sum": float((scored ** 2).sum()),
             "zero_std_groups": float(uniform_groups(rewards_BG).sum()), "completion_tokens": float(sum(lengths_N)),
             "truncated": float(result.truncated_N.sum()), "generation_s": seconds,
             **{name: value * n for name, value in stats.items() if name in rates},
             **{name: float(value) for name, value in stats.items() if name.startswith("reward/")},
             **reported.metric_sums(), "reward_errors": float(stats["reward_errors"]),
             **(session.metric_sums() if session is not None else {}),
             **({"weight_sync_s": sync["seconds"] if run.rank == 0 else 0.0, "weight_sync_bytes": sync["bytes"]}
                if sync is not None else {})}
    return Groups(problems_B, result, texts_N, rewards_BG, drawn, seconds, extra_columns=reported.columns)


def share_groups(run: Run, step: int, with_signal: list, tied: list, drawn: dict) -> Groups:
    """The distributed replay buffer: every rank's groups (with their rewards) are gathered, the step's B x ranks
    groups are chosen (all of them; with --dynamic_sampling those with a signal first, earliest round first, then
    tied ones if too few), and dealt out B to a rank by balanced_assignment over what each group costs a packed
    forward pass (group_tokens: its prompt once, G completions padded to its longest), in lockstep: each rank's
    k-th group costs about what the others' k-th groups cost. Every rank computes the same deal."""
    cfg, B, G, world = run.cfg, run.layout.prompts_per_rank, run.cfg.group_size, run.world
    mine = [(round_, run.rank, b, signal, one_group(batch, b, G))
            for signal, candidates in ((True, with_signal), (False, tied)) for batch, b, round_ in candidates]
    pool = sorted((entry for part in distributed.all_gather_objects(mine) for entry in part),
                  key=lambda e: (not e[3], e[0], e[1], e[2]))  # signal first, then by round, rank, index
    num_signal = sum(1 for e in pool if e[3])
    chosen = pool[:B * world]
    if cfg.dynamic_sampling and num_signal < B * world and run.rank == 0:
        log.warning("step %d: dynamic sampling found %d of %d groups with a signal in %d rounds "
                    "(--max_sampling_rounds); training on them and %d tied groups", step, num_signal, B * world,
                    cfg.max_sampling_rounds, B * world - num_signal)
    drawn["groups_kept"] = float(min(num_signal, B * world)) / world  # summed over the ranks in the logs
    costs = [group_tokens(e[4], G) for e in chosen]
    assigned = balanced_assignment(costs, world)[run.rank]
    groups = take_groups([(chosen[i][4], 0) for i in assigned], G, run.tokenizer.pad_token_id)
    groups.drawn = drawn
    return groups


def one_group(batch: Groups, b: int, group_size: int) -> Groups:
    """Group b of a round's batch on its own, on the CPU, without the padding columns none of its rows uses (so it
    travels small between ranks)."""
    rows = slice(b * group_size, (b + 1) * group_size)
    r = batch.rollout
    seq, att, mask = r.sequences_NT[rows].cpu(), r.attention_mask_NT[rows].cpu(), r.completion_mask_NC[rows].cpu()
    num_prompt = seq.shape[1] - mask.shape[1]
    used = att[:, :num_prompt].any(dim=0).nonzero()
    start = int(used[0]) if len(used) else num_prompt - 1
    completion_used = att[:, num_prompt:].any(dim=0).nonzero()  # an episode's tool results included
    keep = int(completion_used[-1]) + 1 if len(completion_used) else 1
    sampler = None if r.sampler_logprobs_NC is None else r.sampler_logprobs_NC[rows, :keep].cpu()
    rollout_ = Rollout(seq[:, start:num_prompt + keep], att[:, start:num_prompt + keep], mask[:, :keep],
                       r.truncated_N[rows].cpu(), sampler,
                       None if r.tool_mask_NC is None else r.tool_mask_NC[rows, :keep].cpu(),
                       None if r.messages_N is None else r.messages_N[rows])
    return Groups([batch.problems_B[b]], rollout_, batch.texts_N[rows], batch.rewards_BG[b:b + 1].cpu(), {}, 0.0)


def group_tokens(groups: Groups, group_size: int) -> float:
    """What groups cost packed forward passes: each prompt's tokens once, plus G completion blocks as wide as the
    group's longest completion (an episode's tool results included). A packed pass pads every completion of a
    micro-batch to its longest, so a group whose completions mostly ended early still costs G times its longest:
    the deal balances what the ranks compute, not the tokens they hold."""
    r = groups.rollout
    G = group_size
    num_prompt = r.sequences_NT.shape[1] - r.completion_mask_NC.shape[1]
    prompt_B = r.attention_mask_NT[::G, :num_prompt].sum(dim=1)
    episode_NC = r.episode_mask_NC.bool()
    columns = torch.arange(1, episode_NC.shape[1] + 1, device=episode_NC.device)
    extent_N = (episode_NC * columns).amax(dim=1)  # one past each completion's last token, 0 when empty
    return float((prompt_B + G * extent_N.view(-1, G).amax(dim=1)).sum())


def take_groups(chosen: list[tuple[Groups, int]], group_size: int, pad_id: int) -> Groups:
    """One batch of the chosen groups (group b of a round's batch each), prompts re-padded on the left and
    completions on the right to the widest among them."""
    if len({id(batch) for batch, _ in chosen}) == 1 and [b for _, b in chosen] == list(range(len(chosen))):
        return dataclasses.replace(chosen[0][0])  # one round, every group in order: nothing to re-pad
    G = group_size
    widths = [(batch.rollout.sequences_NT.shape[1] - batch.rollout.completion_mask_NC.shape[1],
               batch.rollout.completion_mask_NC.shape[1]) for batch, _ in chosen]
    P, C = max(p for p, _ in widths), max(c for _, c in widths)
    sequences, attention, masks, truncated, sampled, tool_masks, messages = [], [], [], [], [], [], []
    for (batch, b), (p, c) in zip(chosen, widths):
        rows = slice(b * G, (b + 1) * G)
        seq, att = batch.rollout.sequences_NT[rows].cpu(), batch.rollout.attention_mask_NT[rows].cpu()
        mask = batch.rollout.completion_mask_NC[rows].cpu()
        pad = lambda t, left, right, value: torch.nn.functional.pad(t, (left, right), value=value)  # noqa: E731
        sequences.append(pad(seq, P - p, C - c, pad_id))
        attention.append(pad(att, P - p, C - c, 0))
        masks.append(pad(mask, 0, C - c, 0))
        truncated.append(batch.rollout.truncated_N[rows].cpu())
        if batch.rollout.sampler_logprobs_NC is not None:
            sampled.append(pad(batch.rollout.sampler_logprobs_NC[rows].cpu(), 0, C - c, 0.0))
        if batch.rollout.tool_mask_NC is not None:
            tool_masks.append(pad(batch.rollout.tool_mask_NC[rows].cpu(), 0, C - c, 0))
            messages += batch.rollout.messages_N[rows]
    rollout_ = Rollout(torch.cat(sequences), torch.cat(attention), torch.cat(masks), torch.cat(truncated),
                       torch.cat(sampled) if len(sampled) == len(chosen) else None,
                       torch.cat(tool_masks) if len(tool_masks) == len(chosen) else None,
                       messages if len(tool_masks) == len(chosen) else None)
    return Groups([batch.problems_B[b] for batch, b in chosen], rollout_,
                  [t for batch, b in chosen for t in batch.texts_N[b * G:(b + 1) * G]],
                  torch.stack([batch.rewards_BG[b].cpu() for batch, b in chosen]), {}, 0.0)


# ----------------------------------------------------------------------------- 2. experience


def make_experience(run: Run, groups: Groups) -> tuple[Experience, dict]:
    """Advantages within each group (a batch std, if asked for, spans all ranks), then the reference and, when the
    update is off-policy, the old log-probs, micro-batch by micro-batch without gradients.

    A step in which every group on every rank tied carries no policy-gradient signal. Its update would still move
    the weights: AdamW scales the float noise of a near-zero KL gradient up to a full lr-sized step (seen here: KL
    0 -> 0.08 after one such step at lr 1e-4). So it skips the log-prob passes and the update.

    With --kl_in_reward the reference and old log-probs come first: each completion's reward loses kl_weight x its
    summed KL before the advantages are taken (OpenRLHF, verl). With --mask_truncated_completions, completions
    without an EOS leave the loss after the advantages (TRL)."""
    cfg, rollout_ = run.cfg, groups.rollout
    rewards_BG = groups.rewards_BG
    experience = Experience(rollout_.sequences_NT.cpu(), rollout_.attention_mask_NT.cpu(),
                            rollout_.completion_mask_NC.cpu(), rewards_BG.flatten(), torch.zeros(rewards_BG.numel()),
                            sampler_logprobs_NC=(None if rollout_.sampler_logprobs_NC is None
                                                 else rollout_.sampler_logprobs_NC.cpu()))
    timings = {"reference_s": 0.0, "old_logprobs_s": 0.0}
    if cfg.kl_in_reward:
        experience.ref_logprobs_NC, experience.old_logprobs_NC = logprob_passes(run, experience, timings, old=True)
        kl_N = (kl_estimate(experience.old_logprobs_NC, experience.ref_logprobs_NC, cfg.kl_estimator)
                * experience.completion_mask_NC).sum(dim=1)
        groups.drawn["kl_reward"] = float(-cfg.kl_weight * kl_N.sum())
        rewards_BG = rewards_BG - cfg.kl_weight * kl_N.view_as(rewards_BG)
    if cfg.scale_rewards == "batch":  # over every scorable reward of the step, on all ranks
        every = distributed.all_gather_cat(rewards_BG.flatten().to(run.policy.device))
        batch_std = float(every[~torch.isnan(every)].std())
    else:
        batch_std = None
    experience.advantages_N = group_advantages(rewards_BG, cfg.scale_rewards, batch_std).flatten()
    experience.has_signal = distributed.any_rank(bool(experience.advantages_N.any()))
    if experience.has_signal and not cfg.kl_in_reward:
        experience.ref_logprobs_NC, experience.old_logprobs_NC = logprob_passes(
            run, experience, timings, old=not run.layout.on_policy)
    if cfg.mask_truncated_completions:
        experience.completion_mask_NC = experience.completion_mask_NC * ~rollout_.truncated_N.cpu().unsqueeze(1)
    return experience, timings


def logprob_passes(run: Run, experience: Experience, timings: dict, old: bool):
    """(reference log-probs or None, old log-probs or None), timed. With --sampler_logprobs_as_old the old
    log-probs are the ones the rollout engine recorded, and the second pass is skipped."""
    cfg, mb = run.cfg, run.cfg.train_batch_size
    if old and cfg.sampler_logprobs_as_old and experience.sampler_logprobs_NC is not None:
        return logprob_passes(run, experience, timings, old=False)[0], experience.sampler_logprobs_NC
    t0 = time.perf_counter()
    ref = None
    if run.reference is not None:
        ref = logprobs_by_micro_batch(run.reference, experience, mb, cfg.temperature)
    elif cfg.lora_r and cfg.kl_weight > 0:  # the base model is the policy with its adapters off
        with run.policy.module.disable_adapter():
            ref = logprobs_by_micro_batch(run.policy, experience, mb, cfg.temperature)
    timings["reference_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    old_NC = logprobs_by_micro_batch(run.policy, experience, mb, cfg.temperature) if old else None
    timings["old_logprobs_s"] += time.perf_counter() - t0
    return ref, old_NC


@torch.no_grad()
def logprobs_by_micro_batch(engine, experience: Experience, micro_batch_size: int,
                            temperature: float) -> torch.Tensor:
    """Log-probs of every completion token under `engine`, N x C, computed per micro-batch with padding trimmed.
    Every rank runs the same number of forwards, as ZeRO-3's parameter gathering requires. No backward follows, so
    torch's own F.linear serves it (distributed.torch_linear)."""
    was_training = engine.training
    engine.eval()
    out_NC = torch.zeros(experience.completion_mask_NC.shape, dtype=torch.float32)
    with distributed.torch_linear():
        for start in range(0, len(experience), micro_batch_size):
            index = torch.arange(start, min(start + micro_batch_size, len(experience)))
            batch = experience.select(index)
            c = batch.num_completion_positions
            out_NC[index, :c] = completion_logprobs(engine, batch.sequences_NT.to(engine.device),
                                                    batch.attention_mask_NT.to(engine.device), c, temperature).cpu()
    engine.train(was_training)
    return out_NC


# ----------------------------------------------------------------------------- 3. update


@dataclass(frozen=True)
class UpdatePlan:
    """How one rank's experience becomes optimizer steps."""

    micro_batch_size: int
    accumulation: int  # micro-batches per optimizer step, on each rank
    epochs: int
    world_size: int
    max_new_tokens: int  # the dr_grpo constant
    temperature: float
    group_size: int  # whole groups are shuffled together, so a micro-batch holds whole prompts
    # None: the stored order (tests). The same on every rank, so the ranks' micro-batches hold the same positions
    # of their groups: the deal (balanced_assignment) puts groups of like cost at like positions, and under ZeRO-2
    # the ranks meet at every micro-batch's gradient reduction.
    shuffle_seed: Optional[tuple] = None
    correction: Optional[tuple] = None  # (mode, clip_min, clip_max) of the sampling correction; None: off


@dataclass
class UpdateStats:
    """Sums over this rank's micro-batches (ratios are taken after the all-reduce)."""

    loss: float = 0.0  # sum of loss contributions: the step's loss summed over its optimizer steps
    kl_sum: float = 0.0
    clipped_tokens: float = 0.0
    num_tokens: float = 0.0
    entropy_sum: float = 0.0  # the policy's entropy at each completion token, summed
    grad_norms: list = field(default_factory=list)  # one per finite optimizer step (the global norm)
    finite_steps: list = field(default_factory=list)  # one bool per optimizer step
    nonfinite_losses: list = field(default_factory=list)  # where a micro-batch's loss was not finite
    # sampler vs trainer log-probs, over the first epoch's tokens (the trainer's: the old log-probs)
    sampling_diff_sum: float = 0.0
    sampling_diff_max: float = 0.0
    sampling_tokens: float = 0.0
    sampling_ratio_sum: float = 0.0
    sampling_ratio_count: float = 0.0
    sampling_ratio_min: float = math.inf
    sampling_ratio_max: float = 0.0
    wait_s: float = 0.0  # time this rank waited for the others before each optimizer step's gradient reduction

    def record_mismatch(self, old_NC: torch.Tensor, sampler_NC: torch.Tensor, mask_NC: torch.Tensor,
                        weights: Optional[torch.Tensor]) -> None:
        """TRL's sampling metrics: |old - sampler| per token, and the importance ratio (the correction's weights
        when it is on, per token or per sequence; else the raw per-token ratio exp(old - sampler))."""
        keep = mask_NC.bool()
        diff = (old_NC - sampler_NC).abs()[keep].float()
        ratio = (torch.exp(old_NC - sampler_NC)[keep] if weights is None
                 else weights.flatten() if weights.shape[1] == 1 else weights[keep]).float()
        self.sampling_diff_sum += float(diff.sum())
        self.sampling_tokens += float(diff.numel())
        self.sampling_diff_max = max(self.sampling_diff_max, float(diff.max()) if diff.numel() else 0.0)
        if ratio.numel():
            self.sampling_ratio_sum += float(ratio.sum())
            self.sampling_ratio_count += float(ratio.numel())
            self.sampling_ratio_min = min(self.sampling_ratio_min, float(ratio.min()))
            self.sampling_ratio_max = max(self.sampling_ratio_max, float(ratio.max()))


def update(policy, experience: Experience, loss_fn: GRPOLoss, plan: UpdatePlan) -> UpdateStats:
    """`plan.epochs` passes over the experience in micro-batches; one optimizer step per `plan.accumulation`
    micro-batches. Every rank must call it with the same number of micro-batches.

    The normalization contract (loss.py): GRPOLoss returns each micro-batch's share of its optimizer step's loss,
    given the step's totals over every rank (one all-reduce of token counts per epoch, for dapo). DeepSpeed divides
    each backward by gradient_accumulation_steps and averages gradients over ranks; multiplying the share by
    accumulation x ranks undoes exactly that, so W ranks with A micro-batches each give the gradient of the whole
    step computed in one piece."""
    stats = UpdateStats()
    policy.train()
    device = policy.device
    for epoch in range(plan.epochs):
        shuffle = (torch.Generator().manual_seed(seed_for(*plan.shuffle_seed, epoch))
                   if plan.shuffle_seed is not None else None)
        micro_batches = list(experience.micro_batches(plan.micro_batch_size, shuffle, plan.group_size))
        local_tokens = torch.tensor([sum(float(m.completion_mask_NC.sum()) for m in
                                         micro_batches[i:i + plan.accumulation])
                                     for i in range(0, len(micro_batches), plan.accumulation)], dtype=torch.float64)
        step_tokens = distributed.all_reduce_sum(local_tokens.to(device)).cpu()
        for i, batch in enumerate(micro_batches):
            totals = BatchTotals(num_sequences=plan.micro_batch_size * plan.accumulation * plan.world_size,
                                 num_tokens=int(step_tokens[i // plan.accumulation]),
                                 num_micro_batches=plan.accumulation * plan.world_size,
                                 max_new_tokens=plan.max_new_tokens)
            logprobs_NC, entropies_NC = completion_logprobs(
                policy, batch.sequences_NT.to(device), batch.attention_mask_NT.to(device),
                batch.num_completion_positions, plan.temperature, with_entropy=True)
            mask_NC = batch.completion_mask_NC.to(device)
            if loss_fn.top_entropy_quantile < 1:  # the cut is taken over this micro-batch's tokens on every rank
                tokens = torch.cat(distributed.all_gather_objects(entropies_NC[mask_NC.bool()].cpu()))
                totals = dataclasses.replace(totals, entropy_threshold=entropy_threshold(
                    tokens.unsqueeze(0), torch.ones_like(tokens.unsqueeze(0)), loss_fn.top_entropy_quantile))
            old_NC = logprobs_NC.detach() if batch.old_logprobs_NC is None else batch.old_logprobs_NC.to(device)
            ref_NC = None if batch.ref_logprobs_NC is None else batch.ref_logprobs_NC.to(device)
            weights = None
            if batch.sampler_logprobs_NC is not None:
                sampler_NC = batch.sampler_logprobs_NC.to(device)
                if plan.correction is not None:
                    weights = sampling_correction(old_NC, sampler_NC, mask_NC, *plan.correction)
                if epoch == 0:
                    stats.record_mismatch(old_NC, sampler_NC, mask_NC, weights)
            loss, metrics = loss_fn(logprobs_NC, old_NC, ref_NC, batch.advantages_N.to(device), mask_NC, totals,
                                    entropies_NC=entropies_NC, sampling_weights_NC=weights)
            finite = bool(torch.isfinite(loss))
            if not finite:
                stats.nonfinite_losses.append(f"rank {torch.distributed.get_rank()} epoch {epoch} micro-batch {i}")
            if plan.world_size > 1 and (i + 1) % plan.accumulation == 0:
                # this backward reduces the gradients over the ranks: how long did this rank wait for the others?
                t0 = time.perf_counter()
                distributed.barrier()
                stats.wait_s += time.perf_counter() - t0
            policy.backward(loss * totals.num_micro_batches)
            # An optimizer step only at the accumulation boundary. DeepSpeed skips it on every rank alike when the
            # all-reduced gradient norm is not finite (a NaN on one rank poisons the sum).
            policy.step()
            if (i + 1) % plan.accumulation == 0:
                grad_norm = float(policy.get_global_grad_norm() or 0.0)
                stats.finite_steps.append(math.isfinite(grad_norm))
                if math.isfinite(grad_norm):
                    stats.grad_norms.append(grad_norm)
            if finite:
                stats.loss += loss.item()
                stats.kl_sum += float(metrics["kl_sum"])
                stats.clipped_tokens += float(metrics["clipped_tokens"])
                stats.num_tokens += float(metrics["num_tokens"])
                stats.entropy_sum += float(metrics["entropy_sum"])
    return stats


# ----------------------------------------------------------------------------- 4. log


def log_step(run: Run, step: int, groups: Groups, experience: Experience, stats: UpdateStats, timings: dict,
             step_s: float) -> dict:
    """The step's metrics over all ranks (one all-reduce of named sums), written to metrics.jsonl and the
    monitors; sample completions; evaluation on the held-out split when due. Rewards and rates describe every
    completion the rollout drew (with dynamic sampling, more than were trained on); the loss, KL, clipping and
    entropy describe the update."""
    drawn = dict(groups.drawn)
    if any(term.batched for term in run.rewards):  # log_metric names may differ by rank: sum over their union
        for name in set().union(*distributed.all_gather_objects([k for k in drawn if k.startswith("logged/")])):
            drawn.setdefault(name, 0.0)
    total = distributed.all_reduce_dict({
        **drawn, "loss": stats.loss, "kl_sum": stats.kl_sum, "clipped_tokens": stats.clipped_tokens,
        "num_tokens": stats.num_tokens, "entropy_sum": stats.entropy_sum,
        "skipped_steps": float(stats.finite_steps.count(False)), "grad_norm_sum": sum(stats.grad_norms),
        "grad_norm_count": float(len(stats.grad_norms)),
        "sampling_diff_sum": stats.sampling_diff_sum, "sampling_tokens": stats.sampling_tokens,
        "sampling_ratio_sum": stats.sampling_ratio_sum, "sampling_ratio_count": stats.sampling_ratio_count,
        "update_wait_s": stats.wait_s,
    })
    trained = group_tokens(groups, run.cfg.group_size)
    extremes = distributed.all_reduce_max_dict({"diff_max": stats.sampling_diff_max, "update_wait_s": stats.wait_s,
                                                "rank_tokens_max": trained, "rank_tokens_min_negated": -trained,
                                                "ratio_max": stats.sampling_ratio_max,
                                                "engine_compiles": float(getattr(run.engine, "compiles", 0)),
                                                "ratio_min_negated": -stats.sampling_ratio_min})
    tokens, n, world = total["num_tokens"], total["completions"], run.world
    scored = total["scored"]
    reward_mean = total["reward_sum"] / scored if scored else None
    measured = bool(tokens)  # None (null in metrics.jsonl): no update this step, so nothing was measured
    metrics = {
        "loss": total["loss"] / run.layout.optimizer_steps_per_step,
        "kl": total["kl_sum"] / tokens if measured else None,
        "entropy": total["entropy_sum"] / tokens if measured else None,
        # every rank reports the same global norm, so the sum over ranks counts each one `world` times
        "grad_norm": total["grad_norm_sum"] / total["grad_norm_count"] if total["grad_norm_count"] else None,
        "skipped_steps": int(total["skipped_steps"] / world),
        "reward_mean": reward_mean,
        "reward_std": max(total["reward_sq_sum"] / scored - reward_mean ** 2, 0.0) ** 0.5 if scored else None,
        "success_rate": total["success_rate"] / n,
        "format_rate": total["format_rate"] / n,
        "clean_rate": total["clean_rate"] / n,
        # each term's mean over the completions it applies to (a TRL reward's None does not count), as TRL logs it
        **{name[:-4]: total[name] / total[name[:-4] + "_count"] if total[name[:-4] + "_count"] else None
           for name in sorted(total) if name.startswith(("reward/", "logged/")) and name.endswith("_sum")},
        **({"overlong_penalty": total["overlong_penalty"] / n} if "overlong_penalty" in total else {}),
        **({"kl_reward": total["kl_reward"] / n} if "kl_reward" in total else {}),
        "reward_errors": int(total["reward_errors"]),
        "frac_zero_std_groups": total["zero_std_groups"] / total["groups"],
        "clip_frac": total["clipped_tokens"] / tokens if measured else None,
        "completion_len_mean": total["completion_tokens"] / n,
        "truncated_frac": total["truncated"] / n,
        "update_skipped": int(not experience.has_signal),
        "lr": run.policy.get_lr()[0],
        "rollout_s": groups.seconds, **timings,
        "train_s": step_s - groups.seconds - sum(timings.values()),
        "step_s": step_s,
        "rollout_tokens_per_s": total["completion_tokens"] / max(total["generation_s"] / world, 1e-9),
        # the update's balance over the ranks: tokens (prompt once + completions) each rank trained on, and the
        # time ranks waited for each other before the gradient reductions (mean and worst rank)
        "rank_tokens_max": extremes["rank_tokens_max"], "rank_tokens_min": -extremes["rank_tokens_min_negated"],
        "update_wait_s": total["update_wait_s"] / world, "update_wait_s_max": extremes["update_wait_s"],
        # the compiled engine's decode-step graphs so far (the most on any rank): bounded by the shape buckets
        **({"engine_compiles": int(extremes["engine_compiles"])} if isinstance(run.engine, StaticDecoder) else {}),
    }
    if "tool_calls" in total:  # episodes with tools (TRL's tools/* names where TRL has them)
        metrics.update({"tools/call_frequency": total["tool_calls"] / n,
                        "tools/failure_frequency": total["tool_errors"] / total["tool_calls"]
                        if total["tool_calls"] else 0.0,
                        "tool_errors": int(total["tool_errors"]),
                        "tools/turns_mean": total["tool_turns"] / n,
                        "tools/tool_tokens_mean": total["tool_tokens"] / n,
                        "tools/dropped_results": int(total["tool_dropped"]),
                        **{f"tools/calls/{name[len('tool_calls/'):]}": total[name] / n
                           for name in sorted(total) if name.startswith("tool_calls/")}})
    if total["sampling_tokens"]:  # sampler vs trainer, named as TRL logs them
        metrics.update({"sampling/sampling_logp_difference/mean": total["sampling_diff_sum"] / total["sampling_tokens"],
                        "sampling/sampling_logp_difference/max": extremes["diff_max"],
                        "sampling/importance_sampling_ratio/min": -extremes["ratio_min_negated"],
                        "sampling/importance_sampling_ratio/mean": total["sampling_ratio_sum"]
                        / total["sampling_ratio_count"],
                        "sampling/importance_sampling_ratio/max": extremes["ratio_max"]})
    if "weight_sync_s" in total:  # rank 0's time and bytes (the other ranks report 0)
        metrics.update({"vllm/weight_sync_s": total["weight_sync_s"],
                        "vllm/weight_sync_mib": total["weight_sync_bytes"] / 2 ** 20})
    if run.cfg.dynamic_sampling:
        metrics.update(groups_drawn=int(total["groups"]), groups_kept=int(total["groups_kept"]),
                       sampling_rounds=groups.rounds)
    if metrics["skipped_steps"]:
        where = [w for rank_list in distributed.all_gather_objects(stats.nonfinite_losses) for w in rank_list]
        log.warning("step %d: %d optimizer step(s) skipped for a non-finite gradient norm (non-finite loss at: %s)",
                    step, metrics["skipped_steps"], "; ".join(where) or "none")
    if run.cfg.eval_steps and (step % run.cfg.eval_steps == 0 or step == run.cfg.max_steps):
        metrics.update(evaluate_policy(run))
    run.logger.log(step, metrics)
    if run.cfg.log_completions_steps and (step == 1 or step % run.cfg.log_completions_steps == 0):
        problem = groups.problems_B[0]
        rows = []
        for i in range(min(NUM_LOGGED_COMPLETIONS, run.cfg.group_size)):
            reward = float(groups.rewards_BG[0, i])
            rows.append({"question": problem.question, "gold": problem.answer, "completion": groups.texts_N[i],
                         "reward": None if math.isnan(reward) else reward,
                         **({"episode": groups.rollout.messages_N[i]} if groups.rollout.messages_N else {}),
                         **{column: values[i] for column, values in groups.extra_columns.items() if i < len(values)}})
        run.logger.completions(step, rows)
    return metrics


def evaluate_policy(run: Run) -> dict:
    """Greedy accuracy on the held-out problems, every rank a share (RNG and train mode restored afterwards).
    Under ZeRO-3 the policy is gathered as for the rollout: whole, or with --zero3_gather_for_generation false
    (a model too large for one device) layer by layer, the ranks generating in step."""
    cfg = run.cfg
    run.where.enter(run.where.step, "eval")
    with distributed.gathered_for_generation(run.policy, cfg.zero3_gather_for_generation):
        summary, _ = evaluate(run.policy.module, run.tokenizer, run.eval_problems,
                              max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                              batch_size=cfg.rollout_batch_size or 16, seed=cfg.seed,
                              system_prompt=cfg.system_prompt_text(), response_prefix=cfg.response_prefix,
                              turn_prefix=cfg.turn_prefix,
                              example=run.example,
                              synced_gpus=distributed.is_zero3(run.policy) and not cfg.zero3_gather_for_generation,
                              toolbox=run.toolbox, max_episode_tokens=cfg.max_episode_tokens or 0)
    return {"eval_accuracy": summary["accuracy_strict"], "eval_accuracy_lenient": summary["accuracy_lenient"],
            "eval_format_rate": summary["format_rate"], "eval_clean_rate": summary["clean_rate"],
            "eval_s": summary["seconds"]}


# ----------------------------------------------------------------------------- the end


def finish(run: Run, history: list[dict]) -> list[dict]:
    """Export the final policy and the plot, and say in a few lines what happened and what to run next."""
    run.logger.close()
    output_dir = run.output_dir
    if run.rank == 0:
        plot_runs([str(output_dir)], str(output_dir / "metrics.png"))
    checkpoint.export_hf(run.policy, run.tokenizer, str(output_dir / "final"), run.export_dtype,
                         adapter_path=str(output_dir / "final_adapter"), base_name=_base_name(run.cfg.model))
    if run.rank == 0:
        log.info("%s", summary(run.cfg, history, time.perf_counter() - run.started))
    return history


def summary(cfg: Config, history: list[dict], seconds: float) -> str:
    """The closing lines of a run: reward at its first and last step, where the model and plot are, what next."""
    out = Path(cfg.output_dir)
    lines = [f"done: {len(history)} step(s) in {seconds / 60:.1f} min"]
    if history:
        first, last = history[0], history[-1]
        updated = sum(1 for h in history if not h["update_skipped"])
        lines.append(f"  reward     {first['reward_mean']:.3f} at step {first['step']} -> {last['reward_mean']:.3f} "
                     f"at step {last['step']} ({updated} of {len(history)} steps updated the policy)")
    lines += [f"  model      {out / 'final'}", f"  plot       {out / 'metrics.png'}",
              f"  metrics    {out / 'metrics.jsonl'}",
              f"  next       bash scripts/eval_gsm8k.sh {out} --limit 200   # its held-out problems, greedy"]
    return "\n".join(lines)


def _base_name(model: str) -> str:
    """--model as an adapter folder should name its base: local paths made absolute, the rest as given."""
    return str(Path(model).resolve()) if Path(model).expanduser().exists() else model
