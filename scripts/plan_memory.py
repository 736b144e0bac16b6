#!/usr/bin/env python
"""Estimate per-device memory of a GRPO run and say whether it fits (see grpo_ds/memory.py for the model).

    .venv/bin/python scripts/plan_memory.py --model Qwen/Qwen2.5-7B-Instruct --num_gpus 8 --zero 3
    .venv/bin/python scripts/plan_memory.py --model qwen2.5-32b --num_gpus 8 --zero 3 --offload
    .venv/bin/python scripts/plan_memory.py --model embedded --num_gpus 2 --zero 2 --precision fp32 --cpu  # 2 CPU ranks
    .venv/bin/python scripts/plan_memory.py --model qwen2.5-7b --num_gpus 8 --zero 2 --lora_r 16             # LoRA
    .venv/bin/python scripts/plan_memory.py --model qwen2.5-7b --num_gpus 8 --zero 3 --reward_model qwen2.5-1.5b

The device table is per GPU; the host table is the host memory each rank needs beyond it (offloaded optimizer and
parameters, the process). With --cpu (a CPU-only host, where the device is the host) the two add up.

--model and --reward_model take a config.json, a model folder, 'embedded', a hub id (needs the hub), or one of the
built-in architectures below (their published config.json numbers), so the planner works offline. A reward model is
counted as that decoder with a one-output score head instead of the LM head.
"""

import argparse
import json
import sys
from pathlib import Path

from grpo_ds.memory import ARCHITECTURES, ModelShape, RunShape, architecture, report


def model_shape(spec: str) -> ModelShape:
    if architecture(spec) is not None:
        return architecture(spec)
    from transformers import AutoConfig, PretrainedConfig

    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        return ModelShape.from_config(PretrainedConfig(**json.loads(path.read_text())))
    from grpo_ds.models import resolve_model

    return ModelShape.from_config(AutoConfig.from_pretrained(resolve_model(spec)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"config.json, folder, hub id, 'embedded' or one of "
                                                       f"{', '.join(ARCHITECTURES)}")
    parser.add_argument("--num_gpus", type=int, default=8, help="data-parallel devices")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=2, help="ZeRO stage")
    parser.add_argument("--offload", action="store_true", help="optimizer and parameters in CPU memory")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--gpu_gib", type=float, default=80.0, help="device memory to fit in")
    parser.add_argument("--no_reference", action="store_true", help="kl_weight 0: no reference model")
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank on every linear layer (0: full fine-tuning)")
    parser.add_argument("--cpu", action="store_true", help="a CPU-only host: the device is the host")
    parser.add_argument("--reference_offload", action="store_true")
    parser.add_argument("--replicated_reference", action="store_true",
                        help="--reference_partitioned false: a whole reference on every device (ZeRO-2 only)")
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--no_gather_for_generation", action="store_true",
                        help="--zero3_gather_for_generation false: generate without gathering the whole policy")
    parser.add_argument("--rollout_engine", choices=("hf", "compiled"), default="hf",
                        help="the trainer's --rollout_engine; its 'auto' picks compiled (unless ZeRO-3 runs without "
                             "gathering for generation), whose static KV cache stays allocated through training; "
                             "default hf (Hugging Face generate), as the planner's validation figures were measured")
    parser.add_argument("--reward_model", default=None,
                        help="the reward model's config.json, folder, hub id or built-in architecture (a sequence "
                             "classifier, partitioned like the reference)")
    parser.add_argument("--reward_model_offload", action="store_true", help="the reward model in CPU memory")
    parser.add_argument("--reward_batch_size", type=int, default=0,
                        help="texts per reward-model forward (default: --train_batch_size)")
    for flag, default in (("rollouts_per_step", 32), ("group_size", 12), ("max_new_tokens", 512),
                          ("train_batch_size", 16), ("rollout_batch_size", 0)):
        parser.add_argument(f"--{flag}", type=int, default=default, help=f"as the trainer's flag (default {default})")
    parser.add_argument("--prompt_tokens", type=int, default=256,
                        help="tokens in the longest prompt, as the model sees it (chat template, system prompt and "
                             "worked example included); the trainer has no such flag, it reads the prompts from "
                             "the dataset (default 256)")
    args = parser.parse_args(argv)
    shapes = {}
    for flag, spec in (("--model", args.model), ("--reward_model", args.reward_model)):
        try:
            shapes[flag] = model_shape(spec) if spec else None
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0]
            first = first.split(": ", 1)[-1] if first.startswith("--model ") else first  # resolve_model's flag
            print(f"error: {flag} {spec!r}: {first}", file=sys.stderr)
            return 2
    shape = shapes["--model"]
    run = RunShape(num_devices=args.num_gpus, zero_stage=args.zero, offload=args.offload, precision=args.precision,
                   reference=not args.no_reference, reference_offload=args.reference_offload,
                   reference_partitioned=not args.replicated_reference,
                   rollouts_per_step=args.rollouts_per_step, group_size=args.group_size,
                   prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                   train_batch_size=args.train_batch_size, rollout_batch_size=args.rollout_batch_size,
                   gradient_checkpointing=not args.no_gradient_checkpointing,
                   gather_for_generation=not args.no_gather_for_generation, lora_r=args.lora_r,
                   rollout_engine=args.rollout_engine, reward_model=shapes["--reward_model"],
                   reward_model_offload=args.reward_model_offload, reward_batch_size=args.reward_batch_size)
    print(report(shape, run, args.gpu_gib, cpu_only=args.cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
