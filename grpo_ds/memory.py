"""Per-device memory estimate for a GRPO run: what each piece of the step costs, under ZeRO-2 or ZeRO-3, with or
without offload. Pure arithmetic on the model's config; scripts/plan_memory.py prints it.

The pieces (bytes per device, P parameters, W devices, b bytes per compute element):
- policy weights: P*b, or P*b/W under ZeRO-3;
- gradients: P*b/W (ZeRO-2 and 3 both partition them; on the host with offload) plus DeepSpeed's reduce bucket
  (the shipped JSONs: 2e8 elements for ZeRO-2, 5e7 for ZeRO-3);
- optimizer: fp32 master weights and AdamW's two moments, 12P/W (DeepSpeed's ZeRO optimizers keep their own fp32
  copy of the partition even when the model computes in fp32); 0 on the device with offload_optimizer;
- reference: P*b/W partitioned (the default, and always under ZeRO-3), P*b replicated (--reference_partitioned
  false under ZeRO-2), 0 on the device with --reference_offload;
- generation: under ZeRO-3 the whole policy is gathered for the phase (P*b; two layers at a time with
  --zero3_gather_for_generation false), plus the KV cache of the rows generated
  together and one step's fp32 logits;
- the static engine (--rollout_engine compiled, RunShape.rollout_engine; what 'auto' picks unless ZeRO-3
  runs without gathering for generation): its KV cache, rows x (prompt + new tokens), is allocated once and kept
  through the training phase (refilled by the next rollout, never freed), so it
  is resident; while decoding, the prompts' shared prefill cache (rows x (prompt - 1) tokens) sits beside it;
- training: the logits kept for backward (micro x C x V), the fp32 working set of the log-softmax over one chunk
  of 8 rows (8 x C x V x 4), and activations: with
  checkpointing one hidden state per layer plus one layer recomputed in full, without it every layer's; under
  ZeRO-3 the parameters fetched for the forward and backward stay until stage3_max_live_parameters (1e9 in
  zero3.json, so the whole policy for models below 1B parameters).
- reward model (--reward_model, a sequence classifier with R parameters): partitioned like the reference, R*b/W,
  0 on the device with --reward_model_offload; its scoring phase (after generation, before the reference's
  log-probs) gathers what ZeRO-3 keeps live during a forward (as the policy's training, up to
  stage3_max_live_parameters) and holds one micro-batch's inference activations: the residual stream, the normed
  input, the attention projections and output (about 4 hidden states per token) and the gated MLP's gate, up and
  their product (3 intermediate ones), one layer at a time.
Attention is taken as memory-efficient (SDPA / flash: no T x T matrix is stored).

Not counted: with bf16 logits, training keeps every chunk's fp32 copy for backward (logsumexp saves its input), so
the log-softmax holds micro x C x V x 4 bytes at the loss, not one chunk's (fp32 logits are used as they are, not
copied).

With LoRA (rank r on every linear layer of the blocks) the trainable parameters are the adapters' L: gradients and
optimizer state shrink to L's, the base weights stay whole (frozen; ZeRO-3 still partitions them), and there is no
reference (the policy with its adapters off).

Host memory (with offload, and always on a CPU-only host where the "device" is the host): the offloaded optimizer
(fp32 master, two moments and the fp32 gradient partition DeepSpeed's CPU Adam steps on, 16 bytes per trainable
parameter / W), the offloaded parameters (their fp32 partition, 4P/W; the device keeps none; the same for an
offloaded reference, and 4R/W for an offloaded reward model), and the process itself (Python, torch, DeepSpeed, the tokenizer: PROCESS_BYTES).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
FRAMEWORK_BYTES = int(1.0 * GIB)  # CUDA context, allocator slack, libraries: a measured order of magnitude
PROCESS_BYTES = int(1.0 * GIB)  # host memory of a rank's Python process before any model (torch, DeepSpeed, ...)
# The same on a CPU-only host, where no CUDA libraries load: 0.37 GiB measured (torch, DeepSpeed and transformers
# imported, the tokenizer loaded, the gloo group up; docs/PERFORMANCE.md, "Memory planning")
CPU_PROCESS_BYTES = int(0.4 * GIB)


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(vocab=config.vocab_size, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def num_parameters(self) -> int:
        """Llama-style decoder (gated MLP, RMSNorm); attention biases and the like are below 0.1%."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attention + mlp + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.hidden

    @property
    def classifier_parameters(self) -> int:
        """The same decoder as a sequence classifier with one output (a reward model): the input embeddings, no LM
        head, a score head of one row."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        per_layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden + self.hidden + self.hidden

    def lora_parameters(self, r: int) -> int:
        """Adapter parameters at rank r on every linear layer of the blocks (peft's 'all-linear'): r x (in + out)
        for q, k, v, o, gate, up and down."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = ((self.hidden + q_out) + 2 * (self.hidden + kv_out) + (q_out + self.hidden)
                     + 2 * (self.hidden + self.intermediate) + (self.intermediate + self.hidden))
        return r * per_layer * self.layers


# Qwen2.5 (vocab 151936 for the tied small models, 152064 for the others), as in their published config.json files.
ARCHITECTURES = {
    "qwen2.5-0.5b": ModelShape(151936, 896, 4864, 24, 14, 2, 64, True),
    "qwen2.5-1.5b": ModelShape(151936, 1536, 8960, 28, 12, 2, 128, True),
    "qwen2.5-7b": ModelShape(152064, 3584, 18944, 28, 28, 4, 128, False),
    "qwen2.5-14b": ModelShape(152064, 5120, 13824, 48, 40, 8, 128, False),
    "qwen2.5-32b": ModelShape(152064, 5120, 27648, 64, 40, 8, 128, False),
}


def architecture(name: str) -> ModelShape | None:
    """A built-in architecture by name ('qwen2.5-7b', 'Qwen/Qwen2.5-7B-Instruct'), or None."""
    return ARCHITECTURES.get(name.lower().removeprefix("qwen/").removesuffix("-instruct"))


def qwen2_config_dict(shape: ModelShape) -> dict:
    """A transformers config.json for a Qwen2 model of this shape (the fields Qwen2.5's files set), so a model with
    the real architecture and random weights can be built where no hub is reachable."""
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": shape.vocab,
            "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "tie_word_embeddings": shape.tied, "hidden_act": "silu",
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "use_sliding_window": False, "attention_dropout": 0.0, "initializer_range": 0.02}


@dataclass(frozen=True)
class RunShape:
    num_devices: int
    zero_stage: int  # 2 or 3
    offload: bool = False  # optimizer and parameters in CPU memory (zero3_offload.json)
    precision: str = "bf16"
    reference: bool = True  # kl_weight > 0
    reference_offload: bool = False
    reference_partitioned: bool = True  # ZeRO-3 reference whatever the policy's stage (the trainer's default)
    rollouts_per_step: int = 32
    group_size: int = 12
    prompt_tokens: int = 256
    max_new_tokens: int = 512
    train_batch_size: int = 16  # completions per micro-batch
    rollout_batch_size: int = 0  # rows per generate call; 0 = all of a rank's completions
    gradient_checkpointing: bool = True
    gather_for_generation: bool = True  # --zero3_gather_for_generation: whole policy gathered while generating
    reduce_bucket_elements: int | None = None  # None: the shipped JSON's (2e8 for ZeRO-2, 5e7 for ZeRO-3)
    max_live_parameters: int = 1_000_000_000  # ZeRO-3's stage3_max_live_parameters
    lora_r: int = 0  # LoRA rank on every linear layer of the blocks (0: full fine-tuning)
    rollout_engine: str = "hf"  # --rollout_engine: "hf" (generate) or "compiled" (the static KV cache engine)
    reward_model: ModelShape | None = None  # --reward_model's shape (a sequence classifier), or None
    reward_model_offload: bool = False
    reward_batch_size: int = 0  # texts per reward-model forward; 0 = train_batch_size


def estimate(model: ModelShape, run: RunShape) -> dict[str, int]:
    """Bytes per device for each piece, and `total` (the peak: the larger of the generation and training phases
    on top of what stays resident)."""
    W, P, b = run.num_devices, model.num_parameters, (2 if run.precision == "bf16" else 4)
    T = model.lora_parameters(run.lora_r) if run.lora_r else P  # trainable parameters
    zero3 = run.zero_stage == 3
    offload = run.offload
    bucket = run.reduce_bucket_elements or (50_000_000 if zero3 else 200_000_000)
    has_reference = run.reference and not run.lora_r  # with LoRA: the policy with its adapters off
    total_tokens = run.prompt_tokens + run.max_new_tokens
    rows = run.rollout_batch_size or (run.rollouts_per_step // W) * run.group_size
    kv_per_token = 2 * model.layers * model.kv_heads * model.head_dim * b
    static = run.rollout_engine == "compiled"
    resident = {
        "policy_weights": 0 if offload else ((P + T * (run.lora_r > 0)) * b // (W if zero3 else 1)),
        # with offload_optimizer the reduced gradient partition goes to the host (its fp32 copy is in the 16 bytes
        # host_estimate counts per trainable parameter); the device keeps the reduce bucket
        "gradients": (0 if offload else T * b // W) + min(bucket, T) * b,
        "optimizer": 0 if offload else 12 * T // W,
        "reference": (0 if not has_reference or run.reference_offload
                      else P * b // W if zero3 or run.reference_partitioned else P * b),
        "framework": FRAMEWORK_BYTES,
    }
    if static:  # the static engine's cache, sized once for rows x (prompt + new tokens) and kept between rollouts
        resident["static_kv_cache"] = rows * total_tokens * kv_per_token
    generation = {
        # ZeRO-3 gathers the whole policy for generation, or else streams it a layer (and a prefetched one) at a time
        "gathered_policy": (0 if not zero3 else P * b - resident["policy_weights"] if run.gather_for_generation
                            else (P // model.layers) * b * 2),
        # generate's growing cache; with the static engine, the shared prefill's cache beside the static one
        "kv_cache": rows * ((run.prompt_tokens - 1) if static else total_tokens) * kv_per_token,
        "generation_logits": rows * model.vocab * 4,
    }
    micro, C, H = run.train_batch_size, run.max_new_tokens, model.hidden
    tokens = micro * total_tokens
    per_layer_full = tokens * b * (10 * H + 4 * model.intermediate)  # norms, q/k/v/o, residuals, gated MLP
    activations = (model.layers * tokens * H * b + per_layer_full if run.gradient_checkpointing
                   else model.layers * per_layer_full)
    training = {
        # ZeRO-3 keeps what it fetched for the forward/backward up to stage3_max_live_parameters (at least a layer
        # and the prefetched next one)
        "gathered_params": (max(min(run.max_live_parameters, P), 2 * (P // model.layers)) * b
                            - resident["policy_weights"] if zero3 else 0),
        "activations": activations,
        "logits": micro * (C + 1) * model.vocab * b + 8 * C * model.vocab * 4,
    }
    scoring = {}
    if run.reward_model is not None:
        rm = run.reward_model
        R = rm.classifier_parameters
        resident["reward_model"] = 0 if run.reward_model_offload else R * b // W
        rm_tokens = (run.reward_batch_size or run.train_batch_size) * total_tokens
        live = max(min(run.max_live_parameters, R), 2 * (R // rm.layers))  # as the policy's gathered_params
        scoring = {
            "reward_gathered": live * b - resident["reward_model"],
            "reward_activations": rm_tokens * b * (4 * rm.hidden + 3 * rm.intermediate),
        }
    out = {**resident, **generation, **scoring, **training}
    out["total"] = sum(resident.values()) + max(sum(generation.values()), sum(scoring.values()),
                                                sum(training.values()))
    return out


def host_estimate(model: ModelShape, run: RunShape, cpu_only: bool = False) -> dict[str, int]:
    """Bytes of host memory per rank beyond the device's: the offloaded optimizer and parameters, and the process
    itself. On a CPU-only host the device IS the host: cpu_peak() adds the two."""
    W, P = run.num_devices, model.num_parameters
    T = model.lora_parameters(run.lora_r) if run.lora_r else P
    out = {
        "offloaded_optimizer": 16 * T // W if run.offload else 0,
        "offloaded_parameters": 4 * P // W if run.offload else 0,
        "offloaded_reference": (4 * P // W if run.reference_offload and run.reference and not run.lora_r else 0),
        **({"offloaded_reward_model": 4 * run.reward_model.classifier_parameters // W if run.reward_model_offload
            else 0} if run.reward_model is not None else {}),
        "process": CPU_PROCESS_BYTES if cpu_only else PROCESS_BYTES,
    }
    out["total"] = sum(out.values())
    return out


def cpu_peak(model: ModelShape, run: RunShape) -> int:
    """A rank's whole footprint on a CPU-only host, where the device is the host: the device pieces without the
    GPU framework term, plus the host's (offloaded states, the process). This is the live set: glibc's default
    allocator keeps freed tensors in the RSS on top of it (docs/PERFORMANCE.md, "Memory planning")."""
    return estimate(model, run)["total"] - FRAMEWORK_BYTES + host_estimate(model, run, cpu_only=True)["total"]


def decode_bound(model: ModelShape, params: int, rows: int, prompt_tokens: float, new_tokens: int,
                 bytes_per_s: float, elem_bytes: int = 2) -> float:
    """Tokens/s that decoding `rows` sequences together on one device cannot exceed: each decoding step reads
    every weight once and the KV cache written so far (at its mean length over the completion)."""
    kv_per_token = 2 * model.layers * model.kv_heads * model.head_dim * elem_bytes
    bytes_per_step = params * elem_bytes + rows * (prompt_tokens + new_tokens / 2) * kv_per_token
    return rows * bytes_per_s / bytes_per_step


def report(model: ModelShape, run: RunShape, device_gib: float, cpu_only: bool = False) -> str:
    parts, host = estimate(model, run), host_estimate(model, run, cpu_only)
    lora = f", LoRA r={run.lora_r} ({model.lora_parameters(run.lora_r) / 1e6:.1f}M trainable)" if run.lora_r else ""
    rm = (f", reward model {run.reward_model.classifier_parameters / 1e9:.2f}B"
          f"{' (offloaded)' if run.reward_model_offload else ''}" if run.reward_model is not None else "")
    lines = [f"{model.num_parameters / 1e9:.2f}B parameters, {run.num_devices} device(s), ZeRO-{run.zero_stage}"
             f"{' + offload' if run.offload else ''}, {run.precision}{lora}{rm}",
             "| piece | GiB per device |", "| --- | --- |"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in parts.items() if name != "total"]
    verdict = "fits" if parts["total"] <= device_gib * GIB else "does NOT fit"
    lines.append(f"| **peak** | **{parts['total'] / GIB:.2f}** ({verdict} in {device_gib:g} GiB) |")
    lines += ["", "| host memory per rank | GiB |", "| --- | --- |"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in host.items() if name != "total"]
    if cpu_only:  # the device is the host: one footprint
        lines.append(f"| device peak above less its framework term (a CPU-only host) "
                     f"| {(parts['total'] - FRAMEWORK_BYTES) / GIB:.2f} |")
        lines.append(f"| **peak per rank** | **{cpu_peak(model, run) / GIB:.2f}** |")
        lines += ["", "This is the live set. glibc's default allocator keeps freed tensors in the RSS on top of it "
                      "(0.4 to 3.2 GiB more in the runs of docs/PERFORMANCE.md, 'Memory planning'); "
                      "MALLOC_MMAP_THRESHOLD_=131072 returns them, at a speed cost."]
    else:
        lines.append(f"| **peak per rank** | **{host['total'] / GIB:.2f}** |")
    return "\n".join(lines)
