"""The classic Keras MNIST convnet (93,322 parameters at the defaults), with a few knobs.

Defaults reproduce the Keras example layer for layer, so results compare with the well-known
~99% baseline. `width` scales every channel and hidden unit, `batch_norm` adds BatchNorm2d after
each convolution, and `dropout` acts before the output layer.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from dlpipe.config import Probability, Strict
from dlpipe.family import DataMeta, Family
from dlpipe.inputs.images import IMAGES

# Normalising inside the model means serving code only has to send pixels / 255.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class CNNConfig(Strict):
    """train.cnn.model in params.yaml."""

    width: Annotated[int, Field(ge=1, le=8)] = 1
    batch_norm: bool = False
    dropout: Probability = 0.0


class CNN(nn.Module):
    """Conv(32) pool Conv(64) pool Conv(64) -> Linear(64) -> Linear(classes), all 3x3 and ReLU."""

    def __init__(self, config: CNNConfig, meta: DataMeta) -> None:
        super().__init__()
        c1, c2, hidden = 32 * config.width, 64 * config.width, 64 * config.width

        def conv(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
            # A bias before BatchNorm is cancelled by its mean subtraction, so drop it.
            norm = [nn.BatchNorm2d(c_out)] if config.batch_norm else []
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, bias=not config.batch_norm)
            # ReLU after the pool, not before: max-pooling commutes with any non-decreasing
            # function, so the network computes exactly Keras's conv-ReLU-pool, but ReLU and its
            # backward touch a quarter of the values (they were a fifth of a CPU training step).
            return [conv, *norm, *([nn.MaxPool2d(2)] if pool else []), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(1, c1, pool=True),  # 28 -> 26 -> 13
            *conv(c1, c2, pool=True),  # 13 -> 11 -> 5
            *conv(c2, c2, pool=False),  # 5 -> 3
            nn.Flatten(),
        )  # fmt: skip
        dropout = [nn.Dropout(config.dropout)] if config.dropout > 0 else []
        self.classifier = nn.Sequential(
            nn.Linear(c2 * 3 * 3, hidden), nn.ReLU(), *dropout, nn.Linear(hidden, meta.num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B, 1, 28, 28] in [0, 1] (any memory format) -> logits [B, classes]."""
        x = (images - MNIST_MEAN) / MNIST_STD
        return self.classifier(self.features(x))


FAMILY = Family(
    name="cnn",
    dataset="mnist",
    inputs=IMAGES,
    config=CNNConfig,
    build=CNN,
    smoke={"epochs": 2, "batch_size": 64, "lr": 0.001},
)
