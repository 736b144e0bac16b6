"""The metrics plot (grpo_ds.plot, scripts/plot_run.py): runs overlaid, each step a faint point under a moving
average, no panel for a metric that was never logged or is zero throughout, clear errors for a folder without
metrics and for mismatched labels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_ds.plot import moving_average, plot_runs, trend_window

ROOT = Path(__file__).resolve().parent.parent


def write_run(folder: Path, steps: int, with_eval: bool) -> Path:
    """A hand-made metrics.jsonl: the reward climbs by 0.1 a step, the clip fraction is 0 at every step (an on-policy
    update), a skipped update logs a null KL at step 2, and with_eval adds held-out accuracy every 2 steps."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "reward_mean": 0.1 * step, "success_rate": 0.05 * step, "clean_rate": 0.5,
                   "kl": None if step == 2 else 0.01 * step,
                   "completion_len_mean": 60 + step, "clip_frac": 0.0, "step_s": 90.0}
            if with_eval and step % 2 == 0:
                row["eval_accuracy"] = 0.1 * step
            f.write(json.dumps(row) + "\n")
    return folder


def record_plot(monkeypatch) -> list:
    """Every line drawn, as (panel title, label, xs, ys, has a line): the title is set before a panel's lines."""
    import matplotlib.axes

    lines = []
    original = matplotlib.axes.Axes.plot

    def record(ax, *args, **kwargs):
        lines.append((ax.get_title(), kwargs.get("label"), list(args[0]), list(args[1]),
                      kwargs.get("linestyle") != "none"))
        return original(ax, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    return lines


def test_moving_average_by_hand():
    # trailing window of 3: [2], [2, 4], [2, 4, 6], [4, 6, 8], [6, 8, 1]
    assert moving_average([2.0, 4.0, 6.0, 8.0, 1.0], 3) == pytest.approx([2.0, 3.0, 4.0, 6.0, 5.0])
    assert moving_average([5.0, 7.0], 1) == [5.0, 7.0]
    assert moving_average([], 4) == []
    assert (trend_window(6), trend_window(12), trend_window(60), trend_window(600)) == (1, 2, 10, 10)


def test_points_under_a_trend_line_per_run(tmp_path, monkeypatch):
    """12 steps: a window of 2; each run draws its raw points (no line) and its moving average (a line, labelled)."""
    a = write_run(tmp_path / "a", steps=12, with_eval=True)
    b = write_run(tmp_path / "b", steps=6, with_eval=False)
    lines = record_plot(monkeypatch)
    out = plot_runs([str(a), str(b)], str(tmp_path / "out" / "m.png"), ["run a", "run b"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reward = [line for line in lines if line[0] == "reward mean"]
    assert [(label, has_line) for _, label, _, _, has_line in reward] == \
        [(None, False), ("run a", True), (None, False), ("run b", True)]
    raw_a, trend_a = reward[0], reward[1]
    assert raw_a[2] == list(range(1, 13)) and raw_a[3] == pytest.approx([0.1 * s for s in range(1, 13)])
    # mean of the last 2 steps: 0.1, (0.1 + 0.2) / 2, (0.2 + 0.3) / 2, ...
    assert trend_a[3] == pytest.approx([0.1] + [0.1 * s - 0.05 for s in range(2, 13)])
    kl = [line for line in lines if line[0] == "KL to reference" and line[1] == "run a"][0]
    assert kl[2] == [1] + list(range(3, 13))  # the null at step 2 is left out, not drawn as 0
    held_out = [line for line in lines if line[0] == "held-out accuracy (strict)"]
    assert [(label, xs) for _, label, xs, _, _ in held_out] == [("run a", [2, 4, 6, 8, 10, 12])]  # not smoothed


def test_no_panel_for_a_metric_always_zero_or_never_logged(tmp_path, monkeypatch):
    run = write_run(tmp_path / "a", steps=6, with_eval=False)
    lines = record_plot(monkeypatch)
    titles = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda ax, title, **kw: titles.append(title) or original(ax, title, **kw))
    plot_runs([str(run)], str(tmp_path / "m.png"))
    assert "clip fraction" not in titles  # 0 at every step
    assert "held-out accuracy (strict)" not in titles  # never logged
    assert titles == ["reward mean", "success rate (strict)", "clean answer block rate", "KL to reference",
                      "completion length (tokens)", "seconds per step"]
    assert all(has_line for *_, has_line in lines)  # 6 steps: a window of 1, the points joined, nothing to average


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
