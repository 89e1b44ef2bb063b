"""Curves written as PNG beside a run (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


Points = list[tuple[float, float]]


def plot_curves(path: str | Path, series: dict[str, Points | dict[str, Points]], title: str,
                xlabel: str = "step", notes: dict[str, list[str]] | None = None) -> Path | None:
    """One panel per series of (x, y) points, or per {line name: points} (several lines with a
    legend: e.g. the train reward beside the held-out score); empty ones are left out.
    ``notes``: {line name: one text per point}, written beside the points (e.g. coefficients)."""
    series = {k: ({n: p for n, p in v.items() if p} if isinstance(v, dict) else v) for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (name, lines) in zip(axes[0], series.items()):
        for label, points in (lines.items() if isinstance(lines, dict) else [(None, lines)]):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
            for x, y, text in zip(xs, ys, (notes or {}).get(label, [])):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        if isinstance(lines, dict):
            ax.legend(fontsize="small")
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
