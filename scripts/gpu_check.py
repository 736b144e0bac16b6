#!/usr/bin/env python
"""GPU check: short ZeRO-2 and ZeRO-3 runs on a model of a real architecture with random weights, for each
rollout engine, and rollout-only throughput at a larger shape; one JSON.

    .venv/bin/python scripts/gpu_check.py                                 # Qwen2.5-0.5B's shape, tokenizer from the hub
    .venv/bin/python scripts/gpu_check.py --arch qwen2.5-1.5b --tokenizer TOKENIZER_FOLDER --out docs/bench/x.json
    .venv/bin/python scripts/gpu_check.py --engines hf,compiled --rollout_only 64x8x512  # both engines, two shapes

Part 1, full steps: for each ZeRO stage and each engine (--engines), scripts/bench.py under the launcher at
--rollouts_per_step x --group_size x --max_new_tokens (default 8 x 8 x 256: 64 rows per GPU of 256 tokens).
Part 2, rollout only (--rollout_only PROMPTSxGROUPxTOKENS per GPU, e.g. 64x8x512 = 512 rows of 512 tokens): one
process generates with each engine, no update, so a shape whose full steps would take minutes is measured in
seconds; its compile time (the first call) is reported apart from the steady tokens/s.

Weights cannot be downloaded on every GPU machine, so the model is built from the architecture's config (the
built-in Qwen2.5 shapes of grpo_ds/memory.py or a config.json) with random bf16 weights; any tokenizer folder
serves (its ids must fit the architecture's vocabulary). Each ZeRO stage runs scripts/bench.py under the deepspeed
launcher on all visible GPUs (fixed-length completions, the `hash` reward so every step updates), and the JSON
records per stage: seconds per step and phase, rollout tokens/s, peak GPU memory per rank next to
scripts/plan_memory.py's estimate, and the decode throughput as a fraction of the memory-bandwidth bound
(each decoding step must read the weights and the KV cache once; the bandwidth is measured here with a copy).
The optimizer is torch's AdamW (`torch_adam`), so no FusedAdam kernel is compiled during the check.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpo_ds.distributed import launch_command  # noqa: E402
from grpo_ds.memory import ModelShape, RunShape, architecture, decode_bound, estimate, qwen2_config_dict  # noqa: E402

GIB = 1024 ** 3


def copy_bandwidth(gib: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (the median of `repeats`)."""
    n = int(gib * GIB) // 4
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / sorted(times[2:])[len(times[2:]) // 2]


def build_model(config: dict, tokenizer_spec: str, folder: Path, dtype: torch.dtype) -> int:
    """Save a random-weight model of `config` with the tokenizer into `folder`; returns the parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_spec)
    if len(tokenizer) > config["vocab_size"]:
        raise ValueError(f"--tokenizer {tokenizer_spec}: {len(tokenizer)} tokens do not fit the architecture's "
                         f"vocabulary of {config['vocab_size']}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf_config = AutoConfig.for_model(**{**config, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad,
                                        "bos_token_id": tokenizer.bos_token_id})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    count = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def prompt_tokens(folder: Path, args) -> float:
    """Mean prompt length in tokens of the run's first prompts (for the KV-cache term of the bandwidth bound)."""
    from grpo_ds.data import load_problems, render_prompt
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    problems = load_problems("arithmetic", "train", num_problems=64, difficulty=args.difficulty, seed=0)
    lengths = [len(tokenizer(render_prompt(tokenizer, p.question)).input_ids) for p in problems]
    return sum(lengths) / len(lengths)


def rollout_only(model_dir: Path, args, spec: str, engine: str) -> dict:
    """Generation alone at PROMPTSxGROUPxTOKENS (fixed length): the first call (compile, cache allocation) and the
    median of the next --rollout_repeats, tokens/s and peak memory."""
    from grpo_ds.data import load_problems, render_prompt
    from grpo_ds.generation import Sampling, StaticDecoder, generate
    from grpo_ds.models import load_model, load_tokenizer

    prompts, group, tokens = (int(x) for x in spec.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype).to(device)
    model.config.use_cache = True
    model.eval()
    problems = load_problems("arithmetic", "train", num_problems=prompts, difficulty=args.difficulty, seed=0)
    texts = [render_prompt(tokenizer, p.question) for p in problems]
    sampling = Sampling(tokens, temperature=1.0, fixed_length=True)
    decoder = StaticDecoder(model) if engine == "compiled" else None
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(1 + args.rollout_repeats):
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        rollout = generate(model, tokenizer, texts, sampling, group_size=group, engine=decoder)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = sorted(times[1:])[len(times[1:]) // 2]
    generated = int(rollout.completion_mask_NC.sum())
    result = {"engine": engine, "shape": spec, "rows": prompts * group, "new_tokens": tokens,
              "first_call_s": round(times[0], 2), "steady_s": round(steady, 3),
              "compile_and_setup_s": round(times[0] - steady, 2), "tokens_per_s": round(generated / steady, 1),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None}
    del model, decoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_stage(stage: int, model_dir: Path, work: Path, args, gpus: int, engine: str = "hf") -> dict:
    ds = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    ds["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True}}
    ds_path = work / f"zero{stage}.json"
    ds_path.write_text(json.dumps(ds))
    out_json = work / f"bench_zero{stage}_{engine}.json"
    flags = ["--ds_config", str(ds_path), "--model", str(model_dir), "--dataset", "arithmetic",
             "--difficulty", str(args.difficulty), "--reward", "hash", "--fixed_length", "true",
             "--rollouts_per_step", str(args.rollouts_per_step), "--group_size", str(args.group_size),
             "--max_new_tokens", str(args.max_new_tokens), "--train_batch_size", str(args.train_batch_size),
             "--kl_weight", str(args.kl_weight), "--gradient_checkpointing", "true",
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(out_json),
             "--output_dir", str(work / f"run_zero{stage}_{engine}"), "--report_to", "none",
             "--rollout_engine", engine]
    command = launch_command(str(ROOT / "scripts" / "bench.py"), gpus, flags, always_launcher=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.time()
    proc = subprocess.run(command, cwd=ROOT, env=env)
    result = {"zero_stage": stage, "engine": engine, "exit_code": proc.returncode,
              "wall_s": round(time.time() - started, 1)}
    if proc.returncode == 0 and out_json.exists():
        result.update(json.loads(out_json.read_text()))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen2.5-0.5b", help="a built-in architecture (grpo_ds/memory.py) or a "
                                                               "config.json")
    parser.add_argument("--tokenizer", default="Qwen/Qwen2.5-0.5B-Instruct", help="tokenizer folder or hub id")
    parser.add_argument("--out", default="docs/bench/gpu_check.json", help="the JSON to write")
    parser.add_argument("--stages", default="2,3", help="ZeRO stages to run, comma-separated")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rollouts_per_step", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--kl_weight", type=float, default=0.04)
    parser.add_argument("--difficulty", type=int, default=2)
    parser.add_argument("--engines", default="hf,compiled", help="rollout engines to compare, comma-separated")
    parser.add_argument("--rollout_only", default="", help="PROMPTSxGROUPxTOKENS per GPU for generation-only "
                                                           "throughput, e.g. 64x8x512 (empty: skip)")
    parser.add_argument("--rollout_repeats", type=int, default=2, help="timed calls after the first, rollout only")
    args = parser.parse_args()

    shape = architecture(args.arch)
    if shape is not None:
        config = qwen2_config_dict(shape)
    elif Path(args.arch).is_file():
        config = json.loads(Path(args.arch).read_text())
    else:
        print(f"error: --arch {args.arch!r}: neither a built-in architecture nor a config.json file", file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if gpu else 1
    report = {"arch": args.arch, "torch": torch.__version__, "settings": vars(args),
              "device": torch.cuda.get_device_name(0) if gpu else "cpu", "num_devices": gpus}
    if gpu:
        report["copy_bandwidth_gb_s"] = round(copy_bandwidth() / 1e9, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="grpo_ds_gpu_check_") as tmp:
        work, model_dir = Path(tmp), Path(tmp) / "model"
        started = time.time()
        params = build_model(config, args.tokenizer, model_dir, torch.bfloat16 if gpu else torch.float32)
        report["parameters"] = params
        report["build_model_s"] = round(time.time() - started, 1)
        from transformers import AutoConfig
        shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
        prompt_len = prompt_tokens(model_dir, args)
        report["prompt_tokens_mean"] = round(prompt_len, 1)
        report["stages"] = []
        engines = [e for e in args.engines.split(",") if e]
        for stage, engine in ((int(s), e) for s in args.stages.split(",") for e in engines):
            result = run_stage(stage, model_dir, work, args, gpus, engine)
            rows = args.rollouts_per_step * args.group_size // gpus
            planned = estimate(shape, RunShape(num_devices=gpus, zero_stage=stage, precision="bf16" if gpu else "fp32",
                                               reference=args.kl_weight > 0,
                                               rollouts_per_step=args.rollouts_per_step, group_size=args.group_size,
                                               prompt_tokens=round(prompt_len), max_new_tokens=args.max_new_tokens,
                                               train_batch_size=args.train_batch_size))
            result["planned_peak_gib"] = round(planned["total"] / GIB, 2)
            if gpu and "median" in result:
                bound = decode_bound(shape, params, rows, prompt_len, args.max_new_tokens,
                                     report["copy_bandwidth_gb_s"] * 1e9)
                per_rank = result["median"]["rollout_tokens_per_s"] / gpus
                result["decode_bound_tokens_per_s_per_rank"] = round(bound, 1)
                result["rollout_fraction_of_bandwidth_bound"] = round(per_rank / bound, 4)
            report["stages"].append(result)
            out.write_text(json.dumps(report, indent=2) + "\n")  # after each stage: a later failure keeps it
        report["rollout_only"] = []
        if args.rollout_only:
            prompts, group, tokens = (int(x) for x in args.rollout_only.split("x"))
            for engine in engines:
                result = rollout_only(model_dir, args, args.rollout_only, engine)
                if gpu:
                    bound = decode_bound(shape, params, prompts * group, prompt_len, tokens,
                                         report["copy_bandwidth_gb_s"] * 1e9)
                    result["decode_bound_tokens_per_s"] = round(bound, 1)
                    result["fraction_of_bandwidth_bound"] = round(result["tokens_per_s"] / bound, 4)
                report["rollout_only"].append(result)
                out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ngpu check: {report['device']} x{gpus}, {args.arch} ({params / 1e6:.0f}M parameters, random weights)")
    print("| ZeRO | engine | exit | s/step | rollout s | reference s | train s | rollout tok/s | peak GiB/rank "
          "| planned GiB | of bandwidth bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["stages"]:
        m = r.get("median", {})
        cells = [m.get(k) for k in ("step_s", "rollout_s", "reference_s", "train_s", "rollout_tokens_per_s")]
        peak = ", ".join(f"{p:.2f}" for p in r.get("peak_memory_gib_per_rank", []))
        fraction = r.get("rollout_fraction_of_bandwidth_bound")
        print(f"| {r['zero_stage']} | {r['engine']} | {r['exit_code']} | "
              + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
              + f" | {peak or '-'} | {r['planned_peak_gib']} | {'-' if fraction is None else f'{fraction:.1%}'} |")
    for r in report["rollout_only"]:
        print(f"rollout only, {r['shape']} ({r['rows']} rows), {r['engine']}: {r['tokens_per_s']:.0f} tokens/s, "
              f"first call {r['first_call_s']} s (compile and setup {r['compile_and_setup_s']} s), "
              f"{r.get('fraction_of_bandwidth_bound', 0):.1%} of the bandwidth bound, peak {r['peak_memory_gib']} GiB")
    print(f"-> {out}")
    return 0 if all(r["exit_code"] == 0 for r in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
