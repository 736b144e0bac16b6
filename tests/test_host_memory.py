"""return_freed_memory: freed tensors go back to the OS on a CPU rank (RSS measured in a fresh process)."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import sys, torch
sys.path.insert(0, {root!r})
from grpo_ds import distributed

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if {apply}:
    assert distributed.return_freed_memory()
big = torch.ones(4 << 20)  # 16 MiB, mapped; freeing it makes glibc raise its threshold
del big
before = rss_mib()
blocks, pins = [], []
for _ in range(64):  # 64 blocks of 4 MiB (256 MiB), each followed by a small one that stays in use
    blocks.append(torch.ones(1 << 20))
    pins.append(torch.ones(16 << 10))
del blocks
print(rss_mib() - before)
"""


def retained_mib(apply: bool) -> float:
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=root, apply=apply)], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_freed_blocks_return_to_the_os_on_cpu_ranks():
    assert retained_mib(apply=False) > 200  # glibc's default keeps the 256 MiB freed below a live block
    assert retained_mib(apply=True) < 32


def test_an_explicit_environment_setting_wins(monkeypatch):
    from grpo_ds import distributed

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert distributed.return_freed_memory() is False
