"""Start the trainer as users do: under the deepspeed launcher with N CPU ranks, or as one plain process."""

import os
import subprocess
from pathlib import Path

from grpo_ds.distributed import free_port, launch_command  # noqa: F401 (free_port: for the tests)

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "run_train.py"

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
