"""Start the trainer as users do: under the deepspeed launcher with N CPU ranks, or as one plain process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "run_train.py"

# small and fast: 4 prompts x 4 completions of 8 tokens, a reward the tiny model can learn, weights that move
TINY_FLAGS = ["--rollouts_per_step", "4", "--group_size", "4", "--train_batch_size", "4", "--max_new_tokens", "8",
              "--reward", "learnable:sevens_dense", "--lr", "1e-2", "--kl_weight", "0.05", "--log_completions_steps", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(nprocs: int, flags: list) -> list:
    if nprocs == 1:
        return [sys.executable, str(RUNNER), *flags]
    # the `deepspeed` command of this interpreter's environment, found even when its bin/ is not on PATH
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*launcher, "--num_gpus", str(nprocs), "--master_port", str(free_port()), str(RUNNER), *flags]


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
