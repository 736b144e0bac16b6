"""The memory planner's arithmetic, checked against hand counts and real models' parameter counts."""

from transformers import LlamaConfig, LlamaForCausalLM

from grpo_ds.memory import (GIB, ModelShape, RunShape, architecture, decode_bound, estimate, host_estimate,
                            qwen2_config_dict)


def test_parameter_count_matches_a_real_model():
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    assert ModelShape.from_config(config).num_parameters == sum(p.numel() for p in model.parameters())


def test_smollm2_shape_is_135m():
    # SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 9 heads of 64, 3 KV heads, 49152 tokens, tied embeddings
    shape = ModelShape(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64,
                       tied=True)
    assert shape.num_parameters == 134_515_008


def test_zero3_partitions_what_zero2_replicates():
    shape = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, head_dim=16, tied=True)
    P = shape.num_parameters
    z2 = estimate(shape, RunShape(num_devices=4, zero_stage=2))
    z3 = estimate(shape, RunShape(num_devices=4, zero_stage=3))
    # bf16: 2 bytes per weight; the optimizer keeps fp32 master + two moments = 12 bytes, partitioned by 4
    assert z2["policy_weights"] == 2 * P and z3["policy_weights"] == 2 * P // 4
    assert z2["reference"] == z3["reference"] == 2 * P // 4  # the reference is partitioned by default
    assert estimate(shape, RunShape(num_devices=4, zero_stage=2, reference_partitioned=False))["reference"] == 2 * P
    assert z2["optimizer"] == z3["optimizer"] == 12 * P // 4
    # ZeRO-3 gathers the whole policy for generation, ZeRO-2 already holds it
    assert z3["gathered_policy"] == 2 * P - 2 * P // 4 and z2["gathered_policy"] == 0
    offloaded = estimate(shape, RunShape(num_devices=4, zero_stage=3, offload=True))
    assert offloaded["optimizer"] == 0 and offloaded["policy_weights"] == 0
    # fp32: DeepSpeed still keeps its own fp32 copy of the partition next to the two moments
    assert estimate(shape, RunShape(num_devices=4, zero_stage=2, precision="fp32"))["optimizer"] == 12 * P // 4
    # reduce buckets as in the shipped JSONs (both larger than this model: the bucket holds all its gradients)
    assert z2["gradients"] == 2 * P // 4 + 2 * P and z3["gradients"] == 2 * P // 4 + 2 * P
    # with offload the reduced gradient partition lives on the host (host_estimate's 16 bytes): the bucket stays
    assert offloaded["gradients"] == 2 * P
    # ZeRO-3 training keeps fetched parameters up to stage3_max_live_parameters: all of them by default
    assert z3["gathered_params"] == 2 * P - 2 * P // 4
    few_live = estimate(shape, RunShape(num_devices=4, zero_stage=3, max_live_parameters=1))
    assert few_live["gathered_params"] == 2 * 2 * (P // 2) - 2 * P // 4  # two layers' worth, less what is held


def test_kv_cache_by_hand():
    shape = ModelShape(vocab=10, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, tied=True)
    run = RunShape(num_devices=2, zero_stage=2, rollouts_per_step=4, group_size=3, prompt_tokens=10,
                   max_new_tokens=6)
    # 2 prompts per device x 3 completions = 6 rows; 16 tokens; K and V for 2 layers x 2 heads x 16 dims x 2 bytes
    assert estimate(shape, run)["kv_cache"] == 6 * 16 * (2 * 2 * 2 * 16 * 2)


def test_checkpointing_keeps_fewer_activations():
    shape = ModelShape(vocab=1000, hidden=256, intermediate=512, layers=12, heads=8, kv_heads=8, head_dim=32,
                       tied=True)
    with_ckpt = estimate(shape, RunShape(num_devices=1, zero_stage=2))["activations"]
    without = estimate(shape, RunShape(num_devices=1, zero_stage=2, gradient_checkpointing=False))["activations"]
    assert without > 5 * with_ckpt
    assert estimate(shape, RunShape(num_devices=1, zero_stage=2))["total"] < 80 * GIB


def test_qwen2_config_builds_the_shape_it_describes():
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, tied=True)
    config = AutoConfig.for_model(**qwen2_config_dict(shape))
    assert ModelShape.from_config(config) == shape
    model = AutoModelForCausalLM.from_config(config)
    qkv_biases = shape.layers * (shape.heads + 2 * shape.kv_heads) * shape.head_dim  # Qwen2's only biases
    assert sum(p.numel() for p in model.parameters()) == shape.num_parameters + qkv_biases


def test_builtin_qwen_half_b_counts_the_published_parameters():
    shape = architecture("Qwen/Qwen2.5-0.5B-Instruct")
    assert shape is architecture("qwen2.5-0.5b") and architecture("llama-9b") is None
    # 494,032,768: Qwen2.5-0.5B's count, also what scripts/gpu_check.py's model reported (docs/bench/)
    assert shape.num_parameters + shape.layers * (shape.heads + 2 * shape.kv_heads) * shape.head_dim == 494_032_768


def test_decode_bound_by_hand():
    # 2 layers x 1 KV head x 4 dims x 2 (K and V) x 2 bytes = 32 bytes per token of cache
    shape = ModelShape(vocab=10, hidden=8, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=4, tied=True)
    # a step reads 1000 params x 2 bytes + 4 rows x (10 + 20/2) tokens x 32 bytes = 2000 + 2560 = 4560 bytes,
    # at 4560 bytes/s that is one step per second, 4 tokens (one per row)
    assert decode_bound(shape, params=1000, rows=4, prompt_tokens=10, new_tokens=20, bytes_per_s=4560) == 4.0


def test_generation_without_gathering_streams_two_layers():
    shape = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=4, heads=4, kv_heads=4, head_dim=16, tied=True)
    gathered = estimate(shape, RunShape(num_devices=2, zero_stage=3, precision="bf16"))
    streamed = estimate(shape, RunShape(num_devices=2, zero_stage=3, precision="bf16", gather_for_generation=False))
    P = shape.num_parameters
    assert gathered["gathered_policy"] == P * 2 - P * 2 // 2  # the half this device does not hold
    assert streamed["gathered_policy"] == (P // 4) * 2 * 2  # a layer and the prefetched next one, bf16
    assert estimate(shape, RunShape(num_devices=2, zero_stage=2, gather_for_generation=False))["gathered_policy"] == 0


def test_lora_by_hand():
    # 2 layers; per layer r x (in + out) for q (64+64), k (64+32), v (64+32), o (64+64), gate, up (64+128 each),
    # down (128+64): 128 + 96 + 96 + 128 + 192 + 192 + 192 = 1024; rank 4: 4096 per layer, 8192 in all
    shape = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, tied=True)
    assert shape.lora_parameters(4) == 8192
    P, L = shape.num_parameters, 8192
    full = estimate(shape, RunShape(num_devices=2, zero_stage=2, precision="fp32"))
    lora = estimate(shape, RunShape(num_devices=2, zero_stage=2, precision="fp32", lora_r=4))
    # the adapters' gradients and optimizer state only; no reference (the policy with its adapters off)
    assert lora["optimizer"] == 12 * L // 2 and full["optimizer"] == 12 * P // 2
    assert lora["gradients"] == 4 * L // 2 + 4 * L
    assert lora["reference"] == 0 and full["reference"] == 4 * P // 2
    assert lora["policy_weights"] == 4 * (P + L)  # the frozen base, whole under ZeRO-2, and the adapters


def test_host_memory_with_offload_by_hand():
    from grpo_ds.memory import PROCESS_BYTES, host_estimate

    shape = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, tied=True)
    P = shape.num_parameters
    host = host_estimate(shape, RunShape(num_devices=2, zero_stage=3, offload=True))
    # fp32 master, two moments and fp32 gradients (16 bytes) and the fp32 parameters (4 bytes), halved by 2 ranks
    assert host["offloaded_optimizer"] == 16 * P // 2 and host["offloaded_parameters"] == 4 * P // 2
    assert host["total"] == 16 * P // 2 + 4 * P // 2 + PROCESS_BYTES
    assert host_estimate(shape, RunShape(num_devices=2, zero_stage=2))["total"] == PROCESS_BYTES


def test_cpu_only_footprint_counts_the_cpu_process_not_the_gpu_terms():
    from grpo_ds.memory import CPU_PROCESS_BYTES, FRAMEWORK_BYTES, GIB, PROCESS_BYTES, cpu_peak, host_estimate

    # A CPU rank loads no CUDA libraries: its process before any model measured 0.37 GiB (torch, DeepSpeed,
    # transformers, the tokenizer, the gloo group), not the GPU host's 1 GiB, and it has no CUDA context.
    assert 0.37 * GIB <= CPU_PROCESS_BYTES < PROCESS_BYTES
    shape = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, tied=True)
    P = shape.num_parameters
    run = RunShape(num_devices=2, zero_stage=3, offload=True, precision="fp32")
    device = estimate(shape, run)
    # device pieces without the framework term, then the offloaded optimizer (16 B) and parameters (4 B) per
    # parameter halved by 2 ranks, then the CPU process
    expected = device["total"] - FRAMEWORK_BYTES + 16 * P // 2 + 4 * P // 2 + CPU_PROCESS_BYTES
    assert cpu_peak(shape, run) == expected
    assert host_estimate(shape, run, cpu_only=True)["process"] == CPU_PROCESS_BYTES


def test_the_static_engine_keeps_its_kv_cache_through_training():
    """--rollout_engine compiled allocates its KV cache once (rows x (prompt + new tokens)) and only resets it, so it
    is resident in the training phase too; while decoding, the shared prefill's cache sits beside it."""
    shape = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, tied=True)
    run = dict(num_devices=2, zero_stage=2, rollouts_per_step=4, group_size=4, prompt_tokens=10, max_new_tokens=6,
               train_batch_size=8)
    hf = estimate(shape, RunShape(**run))
    static = estimate(shape, RunShape(**run, rollout_engine="compiled"))
    # bf16 K and V: 2 x 2 layers x 2 KV heads x 16 dims x 2 bytes = 256 bytes per token; 4 / 2 ranks x 4 = 8 rows
    assert "static_kv_cache" not in hf and hf["kv_cache"] == 8 * 16 * 256  # generate's cache, 10 + 6 tokens
    assert static["static_kv_cache"] == 8 * 16 * 256 == 32768
    assert static["kv_cache"] == 8 * 9 * 256  # the prefill's cache of the prompts less their last token
    # here training is the larger phase (its logits alone: 8 x 7 x 1000 x 2 + 8 x 6 x 1000 x 4 bytes), so the
    # static cache adds its whole size to the peak
    assert static["total"] - hf["total"] == 32768
    # a rollout batch size bounds the rows generated together, and so the cache
    assert estimate(shape, RunShape(**run, rollout_engine="compiled", rollout_batch_size=4))["static_kv_cache"] \
        == 4 * 16 * 256


def test_reward_model_parameters_match_a_real_classifier():
    from transformers import LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    shape = ModelShape.from_config(config)
    # by hand: attention 16 x 8 x (2x2 + 2x1) = 768, MLP 3 x 16 x 32 = 1536, two norms 32: 2336 a layer, two layers
    # 4672; embeddings 100 x 16 = 1600; final norm 16; score head 16 x 1: 6304
    assert shape.classifier_parameters == 6304
    assert sum(p.numel() for p in LlamaForSequenceClassification(config).parameters()) == 6304


def test_reward_model_by_hand():
    policy = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, head_dim=16, tied=True)
    rm = ModelShape(vocab=100, hidden=16, intermediate=32, layers=2, heads=2, kv_heads=1, head_dim=8, tied=False)
    R = 6304  # test_reward_model_parameters_match_a_real_classifier
    common = dict(num_devices=4, zero_stage=3, train_batch_size=2, prompt_tokens=10, max_new_tokens=6)
    without = estimate(policy, RunShape(**common))
    with_rm = estimate(policy, RunShape(**common, reward_model=rm))
    # bf16, partitioned over 4 ranks like the reference: 2 x 6304 / 4 = 3152 bytes held
    assert with_rm["reward_model"] == 3152
    # a forward keeps live what ZeRO-3 fetched: the whole 6304 parameters (below stage3_max_live_parameters), less
    # the partition already held: 12608 - 3152
    assert with_rm["reward_gathered"] == 9456
    # one micro-batch of 2 texts x 16 tokens = 32 tokens, 2 bytes, 4 x 16 + 3 x 32 = 160 values a token
    assert with_rm["reward_activations"] == 32 * 2 * 160 == 10240
    # the scoring phase (19696 bytes) is smaller than generation and training here: only the held partition adds
    assert with_rm["total"] - without["total"] == 3152
    assert "reward_model" not in without and "offloaded_reward_model" not in host_estimate(policy, RunShape(**common))

    # a reward-model micro-batch of 1024 texts: 1024 x 16 x 2 x 160 = 5242880 bytes of activations, more than
    # generation's 1.39 MB (96 rows' KV cache and logits, the gathered policy): the scoring phase is the peak, the
    # resident pieces plus 9456 + 5242880
    big = estimate(policy, RunShape(**common, reward_model=rm, reward_batch_size=1024))
    assert big["reward_activations"] == 5242880
    resident = sum(big[k] for k in ("policy_weights", "gradients", "optimizer", "reference", "framework",
                                    "reward_model"))
    assert big["total"] == resident + 9456 + 5242880

    # offloaded: nothing held on the device, all 12608 bytes gathered for a forward, 4 x 6304 / 4 on the host
    off = RunShape(**common, reward_model=rm, reward_model_offload=True)
    assert estimate(policy, off)["reward_model"] == 0 and estimate(policy, off)["reward_gathered"] == 12608
    assert host_estimate(policy, off)["offloaded_reward_model"] == 6304


def test_plan_memory_counts_a_reward_model_config(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import load_script

    rm = tmp_path / "rm.json"
    rm.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"],
                              "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "num_key_value_heads": 1}))
    plan = load_script("plan_memory")
    assert plan.main(["--model", "qwen2.5-0.5b", "--num_gpus", "4", "--zero", "3", "--reward_model", str(rm)]) == 0
    out = capsys.readouterr().out
    assert "reward model 0.00B" in out and "| reward_model | 0.00 |" in out and "| reward_activations |" in out
    assert plan.main(["--model", "qwen2.5-0.5b", "--reward_model", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --reward_model '{tmp_path / 'none'}': path does not exist"


def test_plan_memory_flags_said_to_be_the_trainers_are(capsys):
    """A planner flag whose help says "as the trainer's flag" must be one (--prompt_tokens is not: the trainer reads
    prompts from the dataset)."""
    import dataclasses
    import re
    import sys
    from pathlib import Path

    import pytest

    from grpo_ds.config import Config

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import load_script

    with pytest.raises(SystemExit):
        load_script("plan_memory").main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    claimed = re.findall(r"--(\w+) \w+ as the trainer's flag", help_text)
    fields = {f.name for f in dataclasses.fields(Config)}
    assert "rollouts_per_step" in claimed and set(claimed) <= fields
    assert "--prompt_tokens PROMPT_TOKENS tokens in the longest prompt" in help_text
