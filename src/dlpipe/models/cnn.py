"""The classic Keras starter convnet, with a few knobs, for any image dataset.

On 1x28x28 images the defaults reproduce the Keras example layer for layer (93,322 parameters),
so results compare with the well-known ~99% baseline; other channels and sizes get the same
layers, with the dense layer sized to what the convolutions leave. `width` scales every channel
and hidden unit, `batch_norm` adds BatchNorm2d after each convolution, and `dropout` acts before
the output layer. Inputs are normalised inside the model by the dataset's per-channel mean and
std (meta.json), so serving code only has to send pixels / 255.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from dlpipe.config import Probability, Strict
from dlpipe.errors import DlpipeError
from dlpipe.family import DataMeta, Family
from dlpipe.inputs.images import IMAGES, normalize


class CNNConfig(Strict):
    """train.cnn.model in params.yaml."""

    width: Annotated[int, Field(ge=1, le=8)] = 1
    batch_norm: bool = False
    dropout: Probability = 0.0


def feature_side(side: int) -> int:
    """What the three unpadded 3x3 convolutions and two 2x2 pools leave of `side` pixels."""
    return ((side - 2) // 2 - 2) // 2 - 2


SMALLEST_SIDE = 18  # feature_side(18) == 1


class CNN(nn.Module):
    """Conv(32) pool Conv(64) pool Conv(64) -> Linear(64) -> Linear(classes), all 3x3 and ReLU."""

    def __init__(self, config: CNNConfig, meta: DataMeta) -> None:
        super().__init__()
        if min(meta.height, meta.width) < SMALLEST_SIDE:
            raise DlpipeError(
                f"datasets.{meta.dataset or '<dataset>'}: {meta.height}x{meta.width} images are "
                f"too small for the cnn family's layers; the smallest that works is "
                f"{SMALLEST_SIDE}x{SMALLEST_SIDE} (set image_size)"
            )
        self.mean, self.std = meta.mean, meta.std
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
            *conv(meta.channels, c1, pool=True),  # 28 -> 26 -> 13
            *conv(c1, c2, pool=True),  # 13 -> 11 -> 5
            *conv(c2, c2, pool=False),  # 5 -> 3
            nn.Flatten(),
        )  # fmt: skip
        dropout = [nn.Dropout(config.dropout)] if config.dropout > 0 else []
        self.classifier = nn.Sequential(
            nn.Linear(c2 * feature_side(meta.height) * feature_side(meta.width), hidden),
            nn.ReLU(),
            *dropout,
            nn.Linear(hidden, meta.num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B, C, H, W] in [0, 1] (any memory format) -> logits [B, classes]."""
        return self.classifier(self.features(normalize(images, self.mean, self.std)))


FAMILY = Family(
    name="cnn",
    inputs=IMAGES,
    config=CNNConfig,
    build=CNN,
    smoke={"epochs": 2, "batch_size": 64, "lr": 0.001},
)
