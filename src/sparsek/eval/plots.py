"""Plots of evaluations: task accuracy against distance.

Written as PNG files (matplotlib with the Agg backend: no display needed). Held-out loss against position is
`sparsek.train.plots.plot_position`, which plots training runs too.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_task_accuracy(results: dict[str, dict], path, *, window: int | None = None, title: str = "") -> None:
    """Accuracy against distance, one panel per task, one line per model: results {model name: evaluate_tasks
    output}. A dotted line marks the window when given."""
    tasks = sorted({task for result in results.values() for task in result})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, result in results.items():
            rows = result.get(task, [])
            ax.plot([r["distance"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=name)
        if window:
            ax.axvline(window, color="grey", linestyle=":", label=f"window {window}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("distance from the fact to the answer (tokens)")
        ax.set_ylabel("exact-match accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
