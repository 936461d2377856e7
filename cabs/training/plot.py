"""``training.png``: the three panels that show what CABS did in a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_training"]


def plot_training(
    records: list[dict[str, Any]], evaluations: list[dict[str, Any]], path: Path, *, title: str = ""
) -> None:
    """Draw training loss vs examples seen, batch size vs step, test accuracy at evaluations.

    Args:
        records: the ``metrics.jsonl`` objects, one per step.
        evaluations: the records that carry ``test_accuracy``.
        path: where to write the PNG.
        title: the figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    figure, (loss_axes, batch_axes, accuracy_axes) = plt.subplots(1, 3, figsize=(13.5, 3.8), layout="constrained")
    examples = [record["examples_seen"] for record in records]
    loss_axes.plot(examples, [record["loss"] for record in records], linewidth=0.8, alpha=0.5, label="mini-batch")
    smoothed = _running_mean([record["loss"] for record in records], 0.9)
    loss_axes.plot(examples, smoothed, linewidth=1.6, label="running mean")
    loss_axes.set(xlabel="examples seen", ylabel="training loss", yscale="log", title="training loss")
    loss_axes.legend(frameon=False)

    batch_axes.plot([record["step"] for record in records], [record["batch_size"] for record in records], color="C2")
    batch_axes.set(xlabel="step", ylabel="batch size", title="CABS batch size")

    accuracy_axes.plot(
        [record["examples_seen"] for record in evaluations],
        [100 * record["test_accuracy"] for record in evaluations],
        marker="o",
        color="C3",
    )
    accuracy_axes.set(xlabel="examples seen", ylabel="test accuracy (%)", title="test accuracy")
    for axes in (loss_axes, batch_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _running_mean(values: list[float], smoothing: float) -> list[float]:
    """Exponential running average, started at the first value so it has no start-up bias."""
    smoothed, average = [], None
    for value in values:
        average = value if average is None else smoothing * average + (1 - smoothing) * value
        smoothed.append(average)
    return smoothed
