"""Plots of training runs: loss curves, and held-out loss against position in the context.

Written as PNG files next to the runs (matplotlib with the Agg backend: no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

from . import checkpoint

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth_by_position(losses: list[float], bins: int = 64) -> tuple[list[float], list[float]]:
    """Mean loss over `bins` equal ranges of positions (NaN entries skipped) -> (centre positions, means)."""
    size = max(1, math.ceil(len(losses) / bins))
    centres, means = [], []
    for start in range(0, len(losses), size):
        values = [x for x in losses[start : start + size] if not math.isnan(x)]
        if values:
            centres.append(start + (min(size, len(losses) - start) - 1) / 2)
            means.append(sum(values) / len(values))
    return centres, means


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> list[Path]:
    """loss.png (training loss and held-out loss against tokens) and position.png (final held-out loss against
    position in the context) for one or more runs, overlaid; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = labels or [Path(d).name for d in run_dirs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_dir, label in zip(run_dirs, labels):
        records = checkpoint.read_metrics(run_dir)
        train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
        held_out = [(r["tokens"], r["eval_loss"]) for r in records if "eval_loss" in r]
        line = ax.plot(*zip(*train), label=f"{label} train", alpha=0.8)[0] if train else None
        if held_out:
            ax.plot(*zip(*held_out), "o--", color=line.get_color() if line else None, label=f"{label} held-out")
    ax.set(xlabel="training tokens", ylabel="loss (nats / token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = [out_dir / "loss.png"]
    fig.savefig(written[0], dpi=120)
    plt.close(fig)

    curves = {}
    for run_dir, label in zip(run_dirs, labels):
        summary = checkpoint.load_state(run_dir).get("summary") or {}
        if summary.get("loss_by_position"):
            curves[label] = summary["loss_by_position"]
    if curves:
        written.append(out_dir / "position.png")
        plot_position(curves, written[-1])
    return written


def plot_position(curves: dict[str, list[float]], path: str | Path, window: int | None = None) -> None:
    """Held-out loss against position in the context, one line per {label: loss_by_position}; a dotted line
    marks the window when given."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, losses in curves.items():
        ax.plot(*smooth_by_position(losses), label=label)
    if window:
        ax.axvline(window, color="grey", linestyle=":", label=f"window {window}")
    ax.set(xlabel="position in the context (tokens of history)", ylabel="held-out loss (nats / token)",
           title="Held-out loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(run_dir: str | Path) -> list[Path]:
    """The plots of one run, into its own folder."""
    return plot_runs([run_dir], run_dir)
