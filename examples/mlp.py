"""A two-layer perceptron on MNIST: the smallest model family, and the template for a new one.

To add it to the pipeline (README, "How to add a model"): copy this file to
src/dlpipe/models/mlp.py, add a `train.mlp` section to params.yaml, and add
`mlp: {dataset: mnist, inputs: images}` to the `train` and `evaluate` foreach lists of dvc.yaml.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from dlpipe.config import Probability, Strict
from dlpipe.family import DataMeta, Family
from dlpipe.inputs.images import IMAGES

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MLPConfig(Strict):
    """train.mlp.model in params.yaml: every key validated, with its range."""

    hidden: Annotated[int, Field(ge=1, le=8192)] = 256
    dropout: Probability = 0.1


class MLP(nn.Module):
    """Flatten -> Linear(hidden) -> ReLU -> Dropout -> Linear(classes)."""

    def __init__(self, config: MLPConfig, meta: DataMeta) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, meta.num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B, 1, 28, 28] in [0, 1] -> logits [B, classes]."""
        return self.net((images - MNIST_MEAN) / MNIST_STD)


FAMILY = Family(
    name="mlp",
    dataset="mnist",
    inputs=IMAGES,  # batches of images; PNG/JPEG in, as for the CNN, when served
    config=MLPConfig,
    build=MLP,
    smoke={"epochs": 2, "batch_size": 64, "lr": 0.001},  # `make smoke`: two quick epochs
)
