"""Prepared splits held in memory as tensors; batches are index slices, never per-sample Python.

Text batches are bucketed by length: shuffled rows are grouped into pools, sorted by length inside
each pool and cut into batches, so a batch pads only to its own longest review.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dlpipe.errors import DlpipeError

BUCKET_POOL_BATCHES = 50


@dataclass(frozen=True)
class Split:
    """One split: `features` (images, or tokens + lengths) and integer `labels`, all tensors."""

    features: dict[str, Tensor]
    labels: Tensor
    channels_last: bool = False

    @property
    def is_text(self) -> bool:
        return "tokens" in self.features

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Split:
        """The whole split on `device`: MNIST and IMDB fit in any GPU, so no loader is needed."""
        move = (lambda t: t.to(device)) if device.type != "cpu" else (lambda t: t)
        return replace(
            self,
            features={k: move(v) for k, v in self.features.items()},
            labels=move(self.labels),
        )

    def batch(self, index: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        """Model inputs and targets for the rows in `index` (a tensor on the split's device)."""
        targets = self.labels[index]
        if self.is_text:
            lengths = self.features["lengths"][index]
            width = int(lengths.max())
            return (self.features["tokens"][index, :width].long(), lengths.long()), targets
        images = self.features["images"][index].unsqueeze(1).float().div_(255.0)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images,), targets

    def batch_indices(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Row indices per batch: shuffled when a generator is given, length-bucketed for text."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator else torch.arange(n)
        if self.is_text:
            lengths = self.features["lengths"].cpu()
            pool = batch_size * BUCKET_POOL_BATCHES if generator else n
            order = torch.cat(
                [chunk[torch.argsort(lengths[chunk], stable=True)] for chunk in order.split(pool)]
            )
        batches = list(order.split(batch_size))
        if generator is not None and self.is_text:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        device = self.labels.device
        return [b.to(device) for b in batches]


def load_split(prepared_dir: Path, split: str, channels_last: bool = False) -> Split:
    """Read `<prepared_dir>/<split>.npz` written by a prepare stage."""
    path = prepared_dir / f"{split}.npz"
    if not path.exists():
        raise DlpipeError(f"{path}: missing; run the prepare stage first (dvc repro)")
    with np.load(path) as arrays:
        labels = torch.from_numpy(arrays["labels"].astype(np.int64))
        if "tokens" in arrays:
            features = {
                "tokens": torch.from_numpy(arrays["tokens"]),
                "lengths": torch.from_numpy(arrays["lengths"].astype(np.int64)).clamp_(min=1),
            }
        else:
            features = {"images": torch.from_numpy(arrays["images"])}
    return Split(features, labels, channels_last=channels_last)
