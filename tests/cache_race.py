"""One rank of the cache-race test (tests/test_model_cache.py): joins a 2-rank gloo group, then resolves the
embedded model, rank 1 first: rank 0 waits until rank 1 holds the conversion lock (or has finished), so the rank
that converts is the one that transformers' save_pretrained refuses to write weights on."""

import fcntl
import json
import os
import sys
import time
from pathlib import Path

import torch

from grpo_ds import models


def lock_is_held(lock_path: Path) -> bool:
    if not lock_path.exists():
        return False
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def main() -> int:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    spec = sys.argv[1]
    if rank == 0:
        deadline = time.monotonic() + 120
        root = models.cache_dir()
        # wait until rank 1 is converting (a lock file exists and is held) or has published its folder
        while time.monotonic() < deadline:
            entries = list(root.glob("*/*")) if root.exists() else []
            if any(lock_is_held(p) for p in entries if p.name.endswith(".lock")) or any(
                    p.is_dir() and not p.name.startswith(".") and ".tmp" not in p.name for p in entries):
                break
            time.sleep(0.05)
        else:
            raise SystemExit("rank 1 never took the lock")
    path = models.resolve_model(spec)
    Path(os.environ["RACE_OUT"], f"rank{rank}.json").write_text(json.dumps({"path": path}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
