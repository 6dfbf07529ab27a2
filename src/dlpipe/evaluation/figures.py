"""Evaluation figures as PNG files (and a markdown table for text mistakes)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dlpipe.io import atomic_path  # noqa: E402
from dlpipe.tables import format_table  # noqa: E402


def _save(fig: plt.Figure, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_confusion(
    confusion: list[list[int]], label_names: list[str], title: str, dest: Path
) -> None:
    """scikit-learn's confusion-matrix display, shaded by each row's shares (so small classes
    read as clearly as large ones) and labelled with the counts."""
    from sklearn.metrics import ConfusionMatrixDisplay

    counts = np.asarray(confusion)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.2 + 0.5 * len(label_names)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), constrained_layout=True)
    display = ConfusionMatrixDisplay(shares, display_labels=label_names)
    display.plot(
        ax=ax,
        cmap="Blues",
        colorbar=False,
        im_kw={"vmin": 0, "vmax": 1},
        xticks_rotation=45 if len(label_names) > 5 else "horizontal",
        text_kw={"fontsize": 8},
    )
    for (i, j), text in np.ndenumerate(display.text_):
        text.set_text(str(counts[i, j]))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    _save(fig, dest)


def plot_misclassified(
    images: np.ndarray,
    labels: list[str],
    predicted: list[str],
    confidence: np.ndarray,
    dest: Path,
) -> None:
    """A grid of wrongly classified pictures (uint8 [N, C, H, W], grayscale or colour), most
    confident mistakes first."""
    count = len(images)
    cols = min(8, max(1, count))
    rows = max(1, -(-count // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, guess, conf in zip(
        axes.flat, images, labels, predicted, confidence, strict=False
    ):
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray")
        else:
            ax.imshow(image.transpose(1, 2, 0))
        ax.set_title(f"{label}→{guess} ({conf:.0%})", fontsize=8, color="crimson")
    fig.suptitle("misclassified test pictures (actual→predicted, confidence)", fontsize=9)
    fig.tight_layout()
    _save(fig, dest)


def mistakes_markdown(rows: list[dict[str, str]], dest: Path) -> None:
    """The most confident text mistakes as a markdown table (text shortened)."""
    table = []
    for row in rows:
        text = " ".join(row["text"].split()).replace("|", "\\|")
        text = text if len(text) <= 200 else text[:197] + "..."
        table.append([text, row["actual"], row["predicted"], row["confidence"]])
    markdown = format_table(["text", "actual", "predicted", "confidence"], table, markdown=True)
    with atomic_path(dest) as tmp:
        tmp.write_text(markdown + "\n", encoding="utf-8")
