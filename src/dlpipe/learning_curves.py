"""PNG figures people look at: rendered here because `dvc plots show` needs a CDN offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dlpipe.io import atomic_path  # noqa: E402

TRAIN_STYLE: dict[str, Any] = {"linestyle": "--", "alpha": 0.7}
VAL_STYLE: dict[str, Any] = {"marker": "o", "markersize": 4}


def plot_history(histories: dict[str, list[dict[str, float]]], dest: Path) -> None:
    """Loss and accuracy per epoch (train dashed, validation solid), one colour per model."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (name, rows) in zip(colors, histories.items(), strict=False):
        epochs = [int(r["epoch"]) for r in rows]
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            for split, style in (("train", TRAIN_STYLE), ("val", VAL_STYLE)):
                values = [r[f"{split}_{metric}"] for r in rows]
                ax.plot(epochs, values, color=color, label=f"{name} {split}", **style)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
