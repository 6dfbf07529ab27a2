"""A two-layer perceptron for any image dataset: the smallest model family, and the template for a
new one.

To add it to the pipeline (README, "How to add a model"): copy this file to
src/dlpipe/models/mlp.py and add a `train.mlp` section to params.yaml naming it and a dataset
(`family: mlp`, `dataset: mnist`). dvc.yaml's stages come from params.yaml: nothing else changes.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from dlpipe.config import Probability, Strict
from dlpipe.family import DataMeta, Family
from dlpipe.inputs.images import IMAGES, normalize


class MLPConfig(Strict):
    """train.<model>.model in params.yaml: every key validated, with its range."""

    hidden: Annotated[int, Field(ge=1, le=8192)] = 256
    dropout: Probability = 0.1


class MLP(nn.Module):
    """Flatten -> Linear(hidden) -> ReLU -> Dropout -> Linear(classes)."""

    def __init__(self, config: MLPConfig, meta: DataMeta) -> None:
        super().__init__()
        self.mean, self.std = meta.mean, meta.std  # the dataset's, from its meta.json
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(meta.channels * meta.height * meta.width, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, meta.num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B, C, H, W] in [0, 1] -> logits [B, classes]."""
        return self.net(normalize(images, self.mean, self.std))


FAMILY = Family(
    name="mlp",
    inputs=IMAGES,  # batches of images; pictures in, as for the CNN, when served
    config=MLPConfig,
    build=MLP,
    smoke={"epochs": 2, "batch_size": 64, "lr": 0.001},  # `make smoke`: two quick epochs
)
