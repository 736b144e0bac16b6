#!/usr/bin/env python
"""TRL's GRPOTrainer on the work grpo_ds's bench does, for `scripts/bench.py --vs trl` (needs the `bench` extra:
pip install -e '.[bench]'). Takes grpo_ds's training flags and writes a bench.json of the same shape.

The translation (TRL's GRPOConfig counts completions, not prompts):
- per_device_train_batch_size = --train_batch_size (completions per micro-batch);
- gradient_accumulation_steps = a rank's completions / micro-batch, steps_per_generation the same, so one
  generation of rollouts_per_step x group_size completions feeds exactly one optimizer step, on-policy (TRL then
  skips the old-log-prob pass, as grpo_ds does);
- the same prompts in the same order: the dataset is grpo_ds's PromptSampler's batches laid end to end, unshuffled,
  rendered by the same chat template and system prompt;
- num_generations, max_completion_length, temperature, top_p, beta, epsilon, loss_type, scale_rewards, lr, weight
  decay, clipping, gradient checkpointing and precision from the same flags; fixed length by min_new_tokens;
- the reward is the same function (grpo_ds.rewards), applied to the completion's text;
- several ranks: the DeepSpeed JSON of --ds_config ("auto" values are filled by transformers).

Per step (one optimizer step): step_s from the trainer's step callbacks, rollout_s the time in TRL's _generate,
reference_s the reference model's log-prob pass, train_s the rest of the step (scoring, forward and backward,
optimizer).
"""

import os
import resource
import sys
import time

import torch

from bench import bench_config, bench_parser, summarize, write_json  # scripts/bench.py, beside this file
from grpo_ds import distributed
from grpo_ds.config import Config, validate
from grpo_ds.data import PromptSampler, load_problems, prompt_messages
from grpo_ds.models import resolve_model
from grpo_ds.rewards import get_reward_fn


def build_dataset(cfg: Config, num_steps: int):
    from datasets import Dataset

    problems = load_problems(cfg.dataset, "train", num_problems=cfg.num_problems, difficulty=cfg.difficulty,
                             seed=cfg.seed, bad_answers=cfg.bad_answers)
    sampler = PromptSampler(problems, cfg.seed)
    rows = [p for _ in range(num_steps) for p in sampler.next_batch(cfg.rollouts_per_step)]
    if cfg.response_prefix:
        raise ValueError("--vs trl: TRL's conversational prompts take no --response_prefix; compare without one")
    # the same turns grpo_ds renders: system prompt (or none), worked example (or none), question
    return Dataset.from_list([{"prompt": prompt_messages(p.question, cfg.system_prompt_text(), cfg.example()),
                               "answer": p.answer} for p in rows])


def main() -> int:
    args = vars(bench_parser().parse_args())
    steps, warmup, json_path = args.pop("steps"), args.pop("warmup"), args.pop("json")
    args.pop("local_rank")
    cfg = bench_config(args, "runs/bench_trl", warmup + steps)
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = validate(cfg, world)
    if layout.micro_batches_per_epoch != layout.gradient_accumulation_steps or cfg.epochs_per_step != 1:
        print("error: --vs trl compares one optimizer step per GRPO step (the default layout)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as grpo_ds does for its ranks

    from trl import GRPOConfig, GRPOTrainer
    from transformers import TrainerCallback

    reward_fn = get_reward_fn(cfg.reward)

    def reward(completions, answer, **_):
        return [float(reward_fn(c[-1]["content"] if isinstance(c, list) else c, a))
                for c, a in zip(completions, answer)]

    ds_config = None
    if world > 1:
        ds_config = distributed.load_ds_json(cfg.ds_config)
        ds_config.pop("optimizer", None)  # transformers builds its own AdamW from the arguments below
        ds_config.pop("scheduler", None)
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and cfg.precision in ("auto", "bf16")
    targs = GRPOConfig(
        output_dir=cfg.output_dir, seed=cfg.seed, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=layout.gradient_accumulation_steps,
        steps_per_generation=layout.gradient_accumulation_steps, num_iterations=1,
        num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.kl_weight, epsilon=cfg.clip_eps,
        epsilon_high=cfg.clip_high(), loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_norm,
        lr_scheduler_type="constant", warmup_steps=cfg.warmup_steps,
        gradient_checkpointing=cfg.gradient_checkpointing, bf16=bf16, fp16=False, use_cpu=not on_gpu,
        generation_kwargs={"min_new_tokens": cfg.max_new_tokens} if cfg.fixed_length else None,
        shuffle_dataset=False, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        deepspeed=ds_config, model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
    )
    timers = {"rollout_s": 0.0, "reference_s": 0.0}
    records: list[dict] = []

    class Timed(GRPOTrainer):
        def _generate(self, *a, **k):
            start = time.perf_counter()
            try:
                return super()._generate(*a, **k)
            finally:
                timers["rollout_s"] += time.perf_counter() - start

        def _get_per_token_logps_and_entropies(self, model, *a, **k):
            if model is not self.ref_model:
                return super()._get_per_token_logps_and_entropies(model, *a, **k)
            start = time.perf_counter()
            try:
                return super()._get_per_token_logps_and_entropies(model, *a, **k)
            finally:
                timers["reference_s"] += time.perf_counter() - start

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            timers.update(rollout_s=0.0, reference_s=0.0, start=time.perf_counter())

        def on_step_end(self, *_, **__):
            step_s = time.perf_counter() - timers["start"]
            records.append({"step": len(records) + 1, "step_s": step_s, "rollout_s": timers["rollout_s"],
                            "reference_s": timers["reference_s"], "old_logprobs_s": 0.0,
                            "train_s": step_s - timers["rollout_s"] - timers["reference_s"]})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs and records:
                records[-1]["completion_len_mean"] = logs["completions/mean_length"]

    model_path = resolve_model(cfg.model)
    started = time.time()
    trainer = Timed(model=model_path, reward_funcs=reward, args=targs, train_dataset=build_dataset(cfg, cfg.max_steps),
                    callbacks=[StepTimer()])
    if world > 1 and not on_gpu:  # DeepSpeed's CPU all-reduce buffers in /dev/shm would outlive the job
        distributed.unlink_shm_buffer()
    trainer.train()
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    for r in records:  # rollout tokens over all ranks per second of generation, as grpo_ds reports it
        r["rollout_tokens_per_s"] = (cfg.rollouts_per_step * cfg.group_size * r.get("completion_len_mean", 0)
                                     / r["rollout_s"]) if r["rollout_s"] else 0.0
    zero = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    result = summarize(
        cfg, records[warmup:], implementation="trl", trl_version=__import__("trl").__version__, world_size=world,
        deepspeed_zero_stage=zero, device="cuda" if on_gpu else "cpu", warmup_steps=warmup, measured_steps=steps,
        wall_s=round(time.time() - started, 1),
        peak_memory_gib_rank0=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3))
    write_json(result, json_path, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(distributed.run(main))
