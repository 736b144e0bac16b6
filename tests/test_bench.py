"""scripts/bench.py end to end on the tiny model: the figures it reports are consistent with the run's own rows."""

import json
import statistics
import subprocess
import sys

import pytest

from launch import ROOT, environment

pytestmark = pytest.mark.slow


def test_bench_reports_medians_of_the_measured_steps(tmp_path, tiny_model):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", str(tiny_model), "--steps", "3",
         "--warmup", "1", "--fixed_length", "true", "--max_new_tokens", "10", "--rollouts_per_step", "2",
         "--group_size", "4", "--train_batch_size", "4", "--output_dir", str(out)],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    steps = result["steps"]
    assert [s["step"] for s in steps] == [2, 3, 4]  # the warm-up step is not measured
    # fixed length: EOS suppressed, every completion exactly max_new_tokens long
    assert all(s["completion_len_mean"] == 10 and s["truncated_frac"] == 1.0 for s in steps)
    assert result["median"]["step_s"] == statistics.median(s["step_s"] for s in steps)
    assert result["completions_per_s"] == pytest.approx(8 / result["median"]["step_s"])
    assert result["completion_tokens_per_s"] == pytest.approx(80 / result["median"]["step_s"])
    assert len(result["peak_memory_gib_per_rank"]) == 1 and result["peak_memory_gib_per_rank"][0] > 0.1
    assert "completions/s (end to end)" in proc.stdout
