"""`train(cfg)`: GRPO on DeepSpeed, one step at a time, in numbered phases.

Each rank owns whole groups: it samples its own slice of the step's prompts, generates all G completions of each,
scores them and computes their advantages without talking to other ranks. Ranks meet only inside DeepSpeed
(gradient reduction, ZeRO-3 gathering) and in two small all-reduces per step (token totals for the loss, metrics).

Shape legend: B prompts on this rank, G group_size, N = B * G completions, C completion positions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoint
from . import distributed as dist
from .config import Config, dumps, validate
from .data import PromptSampler, load_problems, render_prompt
from .eval import evaluate
from .experience import Experience, ReplayBuffer
from .loss import BatchTotals, GRPOLoss, group_advantages, uniform_groups
from .metrics import MetricsLogger, setup_logging
from .plot import plot_runs
from .models import completion_logprobs, load_model, load_tokenizer, resolve_model
from .rewards import get_reward_fn, score_completions
from .rollout import generate_groups

log = logging.getLogger("grpo_ds.trainer")

NUM_LOGGED_COMPLETIONS = 4  # per logging step: the first completions of rank 0's first group


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from (seed, step, rank, ...), so every rank and step samples independently and a
    resumed run re-derives the same streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class Preempted(Exception):
    """Raised on every rank after a SIGTERM/SIGINT once the checkpoint is written; the message says how to resume."""


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps were skipped for non-finite gradients."""


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


def train(cfg: Config, on_step_end: Optional[Callable] = None) -> list[dict]:
    """Run GRPO as configured; returns the per-step metrics of this invocation (identical on every rank).
    `on_step_end(step=, policy=, reference=, metrics=)` is called on every rank after each step (tests use it)."""
    # 0. setup: everything that can be refused is checked before any model is loaded
    rank, world = dist.init_distributed()
    setup_logging(rank)
    layout = validate(cfg, world)
    ds_config, precision = dist.build_ds_config(dist.load_ds_json(cfg.ds_config), cfg, layout, dist.on_gpu())
    reward_fn = get_reward_fn(cfg.reward)
    problems = load_problems(cfg.dataset, "train", num_problems=cfg.num_problems, difficulty=cfg.difficulty,
                             seed=cfg.seed, bad_answers=cfg.bad_answers)
    eval_problems = (load_problems(cfg.eval_dataset or cfg.dataset, "test", num_problems=cfg.eval_limit,
                                   difficulty=cfg.difficulty, seed=cfg.seed, bad_answers=cfg.bad_answers)
                     if cfg.eval_steps else [])
    resume_path = checkpoint.resolve_resume(cfg.output_dir, cfg.resume_from)
    resume_step = 0
    if resume_path is not None:
        resume_state = checkpoint.read_state(resume_path)
        checkpoint.check_compatible(resume_state, world, dist.zero_stage(ds_config), resume_path)
        resume_step = resume_state["step"]
    _prepare_output_dir(cfg, rank, resume_path, resume_step)
    model_path = resolve_model(cfg.model)
    if cfg.report_to == "wandb" and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        log.info("wandb: no WANDB_API_KEY, logging offline under %s (sync later with 'wandb sync')", cfg.output_dir)
    os.environ.setdefault("WANDB_DIR", cfg.output_dir)
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        (output_dir / "config.json").write_text(dumps(cfg) + "\n")
        (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    log.info("%d rank(s), ZeRO-%d, %s; %d prompts x %d completions per step (%d per rank), micro-batch %d, "
             "%d optimizer step(s) per step%s", world, dist.zero_stage(ds_config), precision, cfg.rollouts_per_step,
             cfg.group_size, layout.completions_per_rank, cfg.train_batch_size, layout.optimizer_steps_per_step,
             " (on-policy: no old-log-prob pass)" if layout.on_policy else "")

    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    export_dtype = {"auto": dtype, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.export_dtype]
    tokenizer = load_tokenizer(model_path)
    policy = dist.init_policy(lambda: load_model(model_path, dtype, cfg.gradient_checkpointing), ds_config)
    reference = (dist.init_reference(lambda: load_model(model_path, dtype), dist.reference_ds_config(ds_config, cfg))
                 if cfg.kl_weight > 0 else None)
    loss_fn = GRPOLoss(cfg.clip_eps, cfg.kl_weight, cfg.loss_type, cfg.clip_eps_high)
    sampler = PromptSampler(problems, cfg.seed)
    start_step, consecutive_skips = 0, 0
    if resume_path is not None:
        state = checkpoint.load(policy, resume_path)
        _warn_config_changes(state["config"], cfg)
        start_step, consecutive_skips = state["step"], state["consecutive_skips"]
        sampler.load_state_dict(state["sampler"])
        log.info("resumed from %s at step %d", resume_path, start_step)
    logger = MetricsLogger(cfg.output_dir, rank, cfg.max_steps, monitor=policy.monitor, first_step=start_step + 1)
    device = policy.device
    B, G, mb = layout.prompts_per_rank, cfg.group_size, cfg.train_batch_size
    history = []
    saved_step = start_step

    def save_checkpoint(at_step: int) -> None:
        nonlocal saved_step
        state = {"step": at_step, "sampler": sampler.state_dict(), "consecutive_skips": consecutive_skips,
                 "world_size": world, "zero_stage": dist.zero_stage(ds_config), "config": cfg.to_dict()}
        t0 = time.perf_counter()
        try:
            path = checkpoint.save(policy, tokenizer, cfg.output_dir, at_step, state, cfg.save_total_limit)
        except checkpoint.CheckpointError as err:  # e.g. a full disk: keep training, the next save may succeed
            log.error("%s", err)
            return
        saved_step = at_step
        log.info("checkpoint %s written in %.1f s", path, time.perf_counter() - t0)

    with StopSignal() as stop:
        for step in range(start_step + 1, cfg.max_steps + 1):
            t_step = time.perf_counter()
            sampler_before = sampler.state_dict()

            # 1. sample prompts: every rank draws the same global batch and keeps its own slice
            problems_B = sampler.next_batch(cfg.rollouts_per_step)[rank * B:(rank + 1) * B]
            prompts_B = [render_prompt(tokenizer, p.question, response_prefix=cfg.response_prefix) for p in problems_B]

            # 2. generate G completions per prompt, batched, parameters gathered once under ZeRO-3
            t0 = time.perf_counter()
            torch.manual_seed(seed_for(cfg.seed, step, rank))
            policy.eval()
            with dist.gathered_for_generation(policy, cfg.zero3_gather_for_generation):
                rollout = generate_groups(
                    policy.module, tokenizer, prompts_B, group_size=G, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, rollout_batch_size=cfg.rollout_batch_size,
                    max_length=cfg.max_length, fixed_length=cfg.fixed_length, share_prefill=cfg.share_prefill,
                    should_stop=lambda: stop.received is not None,
                    synced_gpus=dist.is_zero3(policy) and not cfg.zero3_gather_for_generation)
            rollout_s = time.perf_counter() - t0
            if dist.any_rank(stop.received is not None):  # nothing updated yet: abandon this step on all ranks
                sampler.load_state_dict(sampler_before)
                _preempt(stop.received or "a signal on another rank", step - 1, saved_step, save_checkpoint, cfg)

            # 3. score: decode exactly the masked completion tokens, reward each against its prompt's answer
            ids_NC, mask_NC = rollout.completion_ids_NC.cpu(), rollout.completion_mask_NC.cpu()
            texts_N = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(ids_NC, mask_NC)],
                                             skip_special_tokens=True)
            golds_N = [p.answer for p in problems_B for _ in range(G)]
            rewards, reward_stats = score_completions(texts_N, golds_N, reward_fn)
            rewards_BG = torch.tensor(rewards, dtype=torch.float32).view(B, G)

            # 4. advantages within each group (the batch std, if asked for, spans all ranks)
            batch_std = (float(dist.all_gather_cat(rewards_BG.flatten().to(device)).std())
                         if cfg.scale_rewards == "batch" else None)
            advantages_N = group_advantages(rewards_BG, cfg.scale_rewards, batch_std).flatten()
            # A step in which every group on every rank tied carries no policy-gradient signal. Its update would
            # still move the weights: AdamW scales the float noise of a near-zero KL gradient up to a full lr-sized
            # step (seen here: KL 0 -> 0.08 after one such step at lr 1e-4). So skip it, and its reference pass.
            has_signal = dist.any_rank(bool(advantages_N.any()))

            # 5. reference (and, off-policy, old) log-probs, micro-batch by micro-batch without gradients
            t0 = time.perf_counter()
            experience = Experience(rollout.sequences_NT.cpu(), rollout.attention_mask_NT.cpu(), mask_NC,
                                    rewards_BG.flatten(), advantages_N)
            if reference is not None and has_signal:
                experience.ref_logprobs_NC = _logprobs_by_micro_batch(reference, experience, mb, cfg.temperature)
            reference_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            if not layout.on_policy and has_signal:
                experience.old_logprobs_NC = _logprobs_by_micro_batch(policy, experience, mb, cfg.temperature)
            old_logprobs_s = time.perf_counter() - t0

            # 6. fill the buffer; 7. update: epochs_per_step seeded passes, one optimizer step per
            #    gradient_accumulation_steps micro-batches
            t0 = time.perf_counter()
            buffer = ReplayBuffer(experience)
            policy.train()
            accum = layout.gradient_accumulation_steps
            sums = torch.zeros(5, dtype=torch.float64)  # loss, kl_sum, clipped_tokens, num_tokens, skipped steps
            grad_norms, nonfinite = [], []
            for epoch in range(cfg.epochs_per_step if has_signal else 0):
                shuffle = torch.Generator().manual_seed(seed_for(cfg.seed, step, rank, epoch))
                micro_batches = list(buffer.micro_batches(mb, shuffle, group_size=G))
                # dapo divides by the token count of the whole optimizer step on all ranks: one all-reduce per epoch
                local_tokens = torch.tensor([sum(float(m.completion_mask_NC.sum()) for m in micro_batches[i:i + accum])
                                             for i in range(0, len(micro_batches), accum)], dtype=torch.float64)
                step_tokens = dist.all_reduce_sum(local_tokens.to(device)).cpu()
                for i, batch in enumerate(micro_batches):
                    totals = BatchTotals(num_sequences=mb * accum * world, num_tokens=int(step_tokens[i // accum]),
                                         num_micro_batches=accum * world, max_new_tokens=cfg.max_new_tokens)
                    logprobs_NC = completion_logprobs(policy, batch.sequences_NT.to(device),
                                                      batch.attention_mask_NT.to(device),
                                                      batch.num_completion_positions, cfg.temperature)
                    old_NC = (logprobs_NC.detach() if batch.old_logprobs_NC is None
                              else batch.old_logprobs_NC.to(device))
                    ref_NC = None if batch.ref_logprobs_NC is None else batch.ref_logprobs_NC.to(device)
                    loss, stats = loss_fn(logprobs_NC, old_NC, ref_NC, batch.advantages_N.to(device),
                                          batch.completion_mask_NC.to(device), totals)
                    finite = bool(torch.isfinite(loss))
                    if not finite:
                        nonfinite.append(f"step {step} rank {rank} epoch {epoch} micro-batch {i}")
                    # DeepSpeed divides by gradient_accumulation_steps and averages gradients over ranks; the loss
                    # is already this micro-batch's share of the step's total, so undo both (loss.py, "contract").
                    policy.backward(loss * totals.num_micro_batches)
                    # An optimizer step only at the accumulation boundary. DeepSpeed skips it on every rank alike
                    # when the all-reduced gradient norm is not finite (a NaN on one rank poisons the sum).
                    policy.step()
                    if (i + 1) % accum == 0:
                        grad_norm = float(policy.get_global_grad_norm() or 0.0)
                        if math.isfinite(grad_norm):
                            grad_norms.append(grad_norm)
                            consecutive_skips = 0
                        else:
                            sums[4] += 1
                            consecutive_skips += 1
                    if finite:
                        sums[:4] += torch.stack([loss.detach().double().cpu(), stats["kl_sum"].double().cpu(),
                                                 stats["clipped_tokens"].double().cpu(),
                                                 stats["num_tokens"].double().cpu()])
            train_s = time.perf_counter() - t0

            # 8. log: one all-reduce of sums, then ratios
            metrics = _reduce_metrics(sums, rewards_BG, reward_stats, mask_NC, rollout.truncated_N, layout,
                                      grad_norms, device)
            metrics.update(update_skipped=int(not has_signal), lr=policy.get_lr()[0], rollout_s=rollout_s, reference_s=reference_s,
                           old_logprobs_s=old_logprobs_s, train_s=train_s, step_s=time.perf_counter() - t_step,
                           rollout_tokens_per_s=metrics.pop("completion_tokens") / max(rollout_s, 1e-9))
            if metrics["skipped_steps"]:
                where = [w for rank_list in dist.all_gather_objects(nonfinite) for w in rank_list]
                log.warning("step %d: %d optimizer step(s) skipped for a non-finite gradient norm (non-finite loss "
                            "at: %s)", step, metrics["skipped_steps"], "; ".join(where) or "none")
            if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == cfg.max_steps):
                with dist.gathered_for_generation(policy, True):
                    summary, _ = evaluate(policy.module, tokenizer, eval_problems,
                                          max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                          batch_size=cfg.rollout_batch_size or 16, seed=cfg.seed,
                                          response_prefix=cfg.response_prefix)
                metrics.update(eval_accuracy=summary["accuracy_strict"],
                               eval_accuracy_lenient=summary["accuracy_lenient"],
                               eval_format_rate=summary["format_rate"], eval_s=summary["seconds"])
            history.append({"step": step, **metrics})
            logger.log(step, metrics)
            if cfg.log_completions_steps and (step == 1 or step % cfg.log_completions_steps == 0):
                logger.completions(step, [{"question": problems_B[0].question, "gold": golds_N[i],
                                           "completion": texts_N[i], "reward": rewards[i]}
                                          for i in range(min(NUM_LOGGED_COMPLETIONS, G))])
            if on_step_end is not None:
                on_step_end(step=step, policy=policy, reference=reference, metrics=metrics)
            if consecutive_skips >= cfg.max_nonfinite_skips:
                raise NonFiniteError(f"{consecutive_skips} consecutive optimizer steps skipped for non-finite "
                                   f"gradients (last at step {step}); lower --lr or check the data. The last good "
                                   f"checkpoint is {checkpoint.latest_checkpoint(cfg.output_dir)}")

            # 9. checkpoint and export
            if cfg.save_steps and (step % cfg.save_steps == 0 or step == cfg.max_steps):
                save_checkpoint(step)
            if cfg.export_steps and step % cfg.export_steps == 0 and step != cfg.max_steps:
                checkpoint.export_hf(policy, tokenizer, str(output_dir / "exports" / f"step_{step}"), export_dtype)
            if dist.any_rank(stop.received is not None):
                _preempt(stop.received or "a signal on another rank", step, saved_step, save_checkpoint, cfg)

    logger.close()
    if rank == 0:
        plot_runs([cfg.output_dir], str(output_dir / "metrics.png"))
    checkpoint.export_hf(policy, tokenizer, str(output_dir / "final"), export_dtype)
    log.info("saved the final policy to %s", output_dir / "final")
    return history


def _preempt(signal_name: str, step: int, saved_step: int, save_checkpoint, cfg: Config) -> None:
    """Write the checkpoint of `step` (unless it exists) and raise Preempted on every rank."""
    if step > saved_step:
        save_checkpoint(step)
    raise Preempted(f"stopped by {signal_name} after step {step}; checkpoint "
                    f"{checkpoint.latest_checkpoint(cfg.output_dir)}. Resume with the same command plus "
                    f"--resume_from latest")


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
        for name in (checkpoint.CHECKPOINTS, "exports", "final"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "completions.jsonl"):
        path = output_dir / name
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(row + "\n" for row in rows))


def _warn_config_changes(saved: dict, cfg: Config) -> None:
    harmless = {"max_steps", "resume_from", "overwrite", "save_steps", "save_total_limit", "export_steps",
                "report_to", "log_completions_steps", "run_name", "output_dir"}
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in harmless and saved.get(k) != v)
    if changed:
        log.warning("resuming with changed settings: %s (the trajectory will differ from an uninterrupted run)",
                    ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed))


def _reduce_metrics(sums: torch.Tensor, rewards_BG: torch.Tensor, reward_stats: dict, mask_NC: torch.Tensor,
                    truncated_N: torch.Tensor, layout, grad_norms: list, device) -> dict:
    """Step metrics over all ranks, from one all-reduce of local sums."""
    B, G = rewards_BG.shape
    n_local = float(B * G)
    local = torch.cat([sums, torch.tensor([
        rewards_BG.sum(), (rewards_BG.double() ** 2).sum(), n_local, reward_stats["success_rate"] * n_local,
        reward_stats["format_rate"] * n_local, reward_stats["reward_errors"], float(uniform_groups(rewards_BG).sum()),
        float(B), float(mask_NC.sum()), float(truncated_N.sum()), sum(grad_norms), float(len(grad_norms))],
        dtype=torch.float64)])
    (loss_sum, kl_sum, clipped, tokens, skipped, r_sum, r_sq, n, correct, formatted, reward_errors, zero_std, groups,
     completion_tokens, truncated, norm_sum, norm_count) = dist.all_reduce_sum(local.to(device)).cpu().tolist()
    world = layout.world_size
    reward_mean = r_sum / n
    return {
        "loss": loss_sum / layout.optimizer_steps_per_step,
        "kl": kl_sum / tokens if tokens else float("nan"),  # nan: no update, so nothing was measured
        # every rank reports the same global norm, so the sum over ranks counts each one world times
        "grad_norm": norm_sum / norm_count if norm_count else float("nan"),
        "skipped_steps": int(skipped / world),
        "reward_mean": reward_mean,
        "reward_std": max(r_sq / n - reward_mean ** 2, 0.0) ** 0.5,
        "success_rate": correct / n,
        "format_rate": formatted / n,
        "reward_errors": int(reward_errors),
        "frac_zero_std_groups": zero_std / groups,
        "clip_frac": clipped / tokens if tokens else float("nan"),
        "completion_len_mean": completion_tokens / n,
        "truncated_frac": truncated / n,
        "completion_tokens": completion_tokens,
    }


@torch.no_grad()
def _logprobs_by_micro_batch(engine, experience: Experience, micro_batch_size: int,
                             temperature: float) -> torch.Tensor:
    """Log-probs of every completion token under `engine`, N x C, computed per micro-batch with padding trimmed.
    Every rank runs the same number of forwards, as ZeRO-3's parameter gathering requires."""
    was_training = engine.training
    engine.eval()
    out_NC = torch.zeros(experience.completion_mask_NC.shape, dtype=torch.float32)
    for start in range(0, len(experience), micro_batch_size):
        index = torch.arange(start, min(start + micro_batch_size, len(experience)))
        batch = experience.select(index)
        c = batch.num_completion_positions
        out_NC[index, :c] = completion_logprobs(engine, batch.sequences_NT.to(engine.device),
                                                batch.attention_mask_NT.to(engine.device), c, temperature).cpu()
    engine.train(was_training)
    return out_NC
