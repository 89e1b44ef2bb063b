"""Curves written as PNG beside a run (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def plot_curves(path: str | Path, series: dict[str, list[tuple[float, float]]], title: str,
                xlabel: str = "step") -> Path | None:
    """One panel per series of (x, y) points; series with no points are left out."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def history_series(log_history: list[dict], keys: list[str]) -> dict[str, list[tuple[float, float]]]:
    """transformers' ``trainer.state.log_history`` -> {key: [(step, value), ...]}."""
    return {k: [(h["step"], h[k]) for h in log_history if k in h] for k in keys}
