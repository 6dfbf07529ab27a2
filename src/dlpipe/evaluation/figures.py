"""Evaluation figures as PNG files (and a markdown table for text mistakes)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dlpipe.io import atomic_path  # noqa: E402


def _save(fig: plt.Figure, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_confusion(
    confusion: list[list[int]], label_names: list[str], title: str, dest: Path
) -> None:
    """Counts with row-normalised shading, so small classes read as clearly as large ones."""
    counts = np.asarray(confusion)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.2 + 0.5 * len(label_names)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), constrained_layout=True)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(label_names))
    ax.set_xticks(ticks, label_names, rotation=45 if len(label_names) > 5 else 0)
    ax.set_yticks(ticks, label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for i in ticks:
        for j in ticks:
            color = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=color)
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
    lines = ["| text | actual | predicted | confidence |", "| --- | --- | --- | --- |"]
    for row in rows:
        text = " ".join(row["text"].split()).replace("|", "\\|")
        text = text if len(text) <= 200 else text[:197] + "..."
        lines.append(f"| {text} | {row['actual']} | {row['predicted']} | {row['confidence']} |")
    with atomic_path(dest) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
