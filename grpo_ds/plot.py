"""A picture of one or more runs: the per-step metrics of metrics.jsonl against step, runs overlaid.

Each step's value is drawn as a faint point and, over it, a trailing moving average as a solid line, so that the
trend shows through the noise of a few prompts per step. A panel is drawn only when it says something: a metric that
no run logged (held-out accuracy without --eval_steps) or that is zero at every step (the clip fraction of an
on-policy update, where the ratio is exactly 1) is left out rather than drawn empty or flat.
"""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics

PANELS = (("reward_mean", "reward mean"), ("success_rate", "success rate (strict)"),
          ("clean_rate", "clean answer block rate"),
          ("kl", "KL to reference"), ("completion_len_mean", "completion length (tokens)"),
          ("clip_frac", "clip fraction"), ("step_s", "seconds per step"),
          ("eval_accuracy", "held-out accuracy (strict)"))
UNSMOOTHED = {"eval_accuracy"}  # already a mean over the held-out problems, logged every eval_steps steps


def moving_average(values: list[float], window: int) -> list[float]:
    """The trailing mean of the last `window` values at each point (of the values so far at the first points).

    >>> moving_average([1.0, 2.0, 3.0, 4.0], 2)
    [1.0, 1.5, 2.5, 3.5]
    """
    out = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1):i + 1]
        out.append(sum(recent) / len(recent))
    return out


def trend_window(num_steps: int) -> int:
    """Steps averaged by the trend line: about a sixth of the run, 1 to 10 (60 steps: 10; 6 steps: 1, no smoothing)."""
    return max(1, min(10, num_steps // 6))


def panel_series(runs: list[tuple[str, list[dict]]]) -> list[tuple[str, str, list[tuple[str, list, list]]]]:
    """The panels worth drawing, in PANELS order: (key, title, [(run label, steps, values)]), leaving out a metric
    that no run logged and one that is zero at every logged step of every run."""
    panels = []
    for key, title in PANELS:
        series = []
        for label, metrics in runs:
            points = [(m["step"], m[key]) for m in metrics
                      if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
            if points:
                steps, values = zip(*points)
                series.append((label, list(steps), list(values)))
        if any(value != 0 for _, _, values in series for value in values):
            panels.append((key, title, series))
    return panels


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> Path:
    """Write a PNG with one panel per metric worth drawing; each run is one colour, labelled by its folder name."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = labels or [Path(d).name for d in run_dirs]
    runs = [(label, read_metrics(d)) for label, d in zip(labels, run_dirs)]
    panels = panel_series(runs)
    window = trend_window(max((len(metrics) for _, metrics in runs), default=0))
    colors = {label: f"C{i}" for i, (label, _) in enumerate(runs)}
    cols = max(1, min(4, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (key, title, series) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        for label, steps, values in series:
            if key in UNSMOOTHED or window == 1:
                ax.plot(steps, values, color=colors[label], label=label, linewidth=1.2, marker=".")
                continue
            ax.plot(steps, values, color=colors[label], linestyle="none", marker=".", markersize=3, alpha=0.35)
            ax.plot(steps, moving_average(values, window), color=colors[label], label=label, linewidth=1.6)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if panels:
        axes.flat[0].legend(fontsize=8)
    else:
        axes.flat[0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center", transform=axes.flat[0].transAxes)
    if window > 1:
        fig.suptitle(f"points: each step; lines: mean of the last {window} steps", fontsize=9)
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
