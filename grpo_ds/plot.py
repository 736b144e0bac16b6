"""A picture of one or more runs: the per-step metrics of metrics.jsonl against step, runs overlaid."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics

PANELS = (("reward_mean", "reward mean"), ("success_rate", "success rate (strict)"),
          ("clean_rate", "clean answer block rate"),
          ("kl", "KL to reference"), ("completion_len_mean", "completion length (tokens)"),
          ("clip_frac", "clip fraction"), ("step_s", "seconds per step"),
          ("eval_accuracy", "held-out accuracy (strict)"))


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> Path:
    """Write a PNG with one panel per metric; each run is one line, labelled by its folder name."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = labels or [Path(d).name for d in run_dirs]
    runs = [(label, read_metrics(d)) for label, d in zip(labels, run_dirs)]
    cols = 4
    rows = -(-len(PANELS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, PANELS):
        drawn = False
        for label, metrics in runs:
            points = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.2)
                drawn = True
        if not drawn:  # say why the panel is empty rather than leave a blank frame
            hint = " (train with --eval_steps)" if key.startswith("eval_") else ""
            ax.text(0.5, 0.5, f"not logged{hint}", ha="center", va="center", fontsize=9, transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
