"""Helpers shared by the tests: tiny random chat models built offline, the trainer started as users start it (the
deepspeed launcher with N CPU ranks, or one plain process), what tests/run_train.py records, and the entry-point
scripts loaded as modules."""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

from grpo_ds.distributed import free_port, launch_command  # noqa: F401 (free_port: for the tests)

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "run_train.py"

# ----------------------------------------------------------------------------- tiny models

# A tiny random chat model, built offline: a character-level tokenizer with a ChatML template whose EOS
# (`<|im_end|>`) also closes every turn, as SmolLM2's and Qwen's do, and a 2-layer Llama.
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz .,?!+-*/=<>()\n") + ["<answer>", "</answer>", "<think>",
                                                                       "</think>"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# For agent tests: every printable ASCII character, so that tool calls (JSON, underscores) are spelled exactly
ASCII_CHARS = [c for c in map(chr, range(32, 127)) if c not in ("<", ">")] + ["<", ">", "\n"]


def build_tokenizer(chars: list = CHARS):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(chars))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.add_tokens(["<answer>", "</answer>", "<think>", "</think>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(path, seed: int = 0, hidden: int = 32, layers: int = 2, chars: list = CHARS) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chars)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_varied_model(path, scale: float = 20.0, seed: int = 0, hidden: int = 32) -> Path:
    """build_tiny_model's model with every weight matrix multiplied by `scale`. At the default init (std 0.02) the tiny
    model repeats one token whatever it is asked, which would let a test of batching or sharding pass even if
    completions were attached to the wrong prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(Path(path), seed=seed, hidden=hidden)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(scale)
    model.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- launching the trainer

# small and fast: 4 prompts x 4 completions of 8 tokens, a reward the tiny model can learn, weights that move
TINY_FLAGS = ["--rollouts_per_step", "4", "--group_size", "4", "--train_batch_size", "4", "--max_new_tokens", "8",
              "--reward", "learnable:sevens_dense", "--lr", "1e-2", "--kl_weight", "0.05", "--log_completions_steps", "1"]


def command(nprocs: int, flags: list) -> list:
    return launch_command(str(RUNNER), nprocs, flags)


def environment(fault: str = "") -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(GRPO_DS_NO_PROGRESS="1", PYTHONPATH=str(ROOT), GRPO_DS_TEST_FAULT=fault)
    return env


def run(flags: list, cwd: Path, nprocs: int = 2, fault: str = "", expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(nprocs, flags), cwd=cwd, env=environment(fault), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == expect, (proc.returncode, proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def start(flags: list, cwd: Path, nprocs: int = 2) -> subprocess.Popen:
    """In a session of its own, so that a signal can go to the whole process group, as a terminal's Ctrl-C or a
    scheduler's SIGTERM does."""
    return subprocess.Popen(command(nprocs, flags), cwd=cwd, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def node_command(node_rank: int, num_nodes: int, master_port: int, flags: list) -> list:
    """One node's share of a multi-node launch with one rank per node, as `deepspeed --hostfile` runs it on each
    host (its per-node launcher, deepspeed.launcher.launch); on one host with 127.0.0.1 as the master, N of them
    are N simulated nodes."""
    import base64
    import sys

    world = base64.urlsafe_b64encode(json.dumps({f"node{i}": [0] for i in range(num_nodes)}).encode()).decode()
    return [sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world}", f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1", f"--master_port={master_port}", str(RUNNER), *flags]


def start_nodes(flags: list, cwds: list, fault: str = "") -> list:
    """len(cwds) simulated nodes of one rank each (node i started in cwds[i]), each in a session of its own;
    their output is merged into stdout. One CPU thread per rank: both share this host."""
    port = free_port()
    env = {**environment(fault), "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen(node_command(i, len(cwds), port, flags), cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for i, cwd in enumerate(cwds)]


def zero_config(tmp_path, name: str) -> str:
    """A copy of ds_configs/NAME in which every parameter is partitioned wherever ZeRO-3 applies: the policy under
    zero3*.json, and the reference (a ZeRO-3 inference engine, --reference_partitioned) under any of them. The tiny
    model's parameters are all below DeepSpeed's persistence threshold (kept whole on every rank to save
    communication), so without this the tests would not see ZeRO-3's partitioning."""
    config = json.loads((ROOT / "ds_configs" / name).read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def records(out, nprocs: int = 2) -> list:
    """Per rank, the rows tests/run_train.py recorded after every step."""
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nprocs)]


def load_script(name: str):
    """scripts/NAME.py as a module (its main(argv) is what the command runs)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
