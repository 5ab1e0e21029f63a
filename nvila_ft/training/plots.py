"""A PNG of the training curve (loss, eval loss, learning rate) from the Trainer's log history."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(log_history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Write `path` (PNG); returns None when there is nothing to plot."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    rates = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        loss_axis.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        loss_axis.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.grid(alpha=0.3)
    if rates:
        rate_axis = loss_axis.twinx()
        rate_axis.plot(*zip(*rates), "--", color="tab:gray", alpha=0.6, label="learning rate")
        rate_axis.set_ylabel("learning rate")
    handles = [h for ax in figure.axes for h in ax.get_legend_handles_labels()[0]]
    labels = [lbl for ax in figure.axes for lbl in ax.get_legend_handles_labels()[1]]
    loss_axis.legend(handles, labels, loc="upper right")
    if title:
        loss_axis.set_title(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
