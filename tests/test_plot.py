"""The metrics plot (grpo_ds.plot, scripts/plot_run.py): runs overlaid, one line per run in each panel, clear
errors for a folder without metrics and for mismatched labels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_ds.plot import PANELS, plot_runs

ROOT = Path(__file__).resolve().parent.parent


def write_run(folder: Path, steps: int, with_eval: bool) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "reward_mean": 0.1 * step, "success_rate": 0.05 * step, "clean_rate": 0.5,
                   "kl": None if step == 2 else 0.01 * step,  # a skipped update logs null
                   "completion_len_mean": 60 + step, "clip_frac": 0.0, "step_s": 90.0}
            if with_eval and step % 2 == 0:
                row["eval_accuracy"] = 0.1 * step
            f.write(json.dumps(row) + "\n")
    return folder


def test_plot_overlays_runs_one_line_each(tmp_path, monkeypatch):
    import matplotlib.axes

    a = write_run(tmp_path / "a", steps=4, with_eval=True)
    b = write_run(tmp_path / "b", steps=3, with_eval=False)
    lines = []
    original = matplotlib.axes.Axes.plot

    def record(ax, *args, **kwargs):  # every line drawn: (panel title, label, xs, ys)
        lines.append((ax.get_title(), kwargs.get("label"), list(args[0]), list(args[1])))
        return original(ax, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    out = plot_runs([str(a), str(b)], str(tmp_path / "out" / "m.png"), ["run a", "run b"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the title is set after the lines are drawn, so lines are grouped per panel in PANELS order
    drawn = [(label, xs, ys) for _, label, xs, ys in lines]
    assert drawn[0] == ("run a", [1, 2, 3, 4], pytest.approx([0.1, 0.2, 0.3, 0.4]))
    assert drawn[1] == ("run b", [1, 2, 3], pytest.approx([0.1, 0.2, 0.3]))
    eval_lines = [d for d in drawn if d[2] == pytest.approx([0.2, 0.4])]
    assert [d[0] for d in eval_lines] == ["run a"]  # run b logged no eval: no line, no error
    assert len(drawn) == 2 * (len(PANELS) - 1) + 1


def test_plot_script_errors_are_one_line(tmp_path):
    run = write_run(tmp_path / "a", steps=2, with_eval=False)
    script = str(ROOT / "scripts" / "plot_run.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = subprocess.run([sys.executable, script, str(tmp_path / "nope")], capture_output=True, text=True,
                             env=env)
    assert missing.returncode == 2 and "metrics.jsonl: not found (not a run folder?)" in missing.stderr
    labels = subprocess.run([sys.executable, script, str(run), "--labels", "x", "y"], capture_output=True,
                            text=True, env=env)
    assert labels.returncode == 2 and "--labels: 2 labels for 1 runs" in labels.stderr
    ok = subprocess.run([sys.executable, script, str(run)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and (run / "metrics.png").exists()
