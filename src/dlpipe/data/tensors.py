"""Prepared splits held in memory as tensors; batches are index slices, never per-sample Python.

Text batches are bucketed by length: shuffled rows are grouped into pools, sorted by length inside
each pool and cut into batches, so a batch pads only to its own longest review (rounded up to a
multiple of WIDTH_STEP tokens).

An epoch's batches are planned on the host in one go (`Split.batches`): the row order, each
batch's padded width and, under data parallelism, each process's slice of every batch. The rows
then reach the device in one copy, and making a batch never waits for the device.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dlpipe.errors import DlpipeError
from dlpipe.integrity import verify_file, verify_listed

BUCKET_POOL_BATCHES = 50
# A text batch's width is its longest row rounded up to a multiple of this: a few batch shapes,
# not hundreds, so the allocator reuses freed blocks (on the CPU, glibc's heap otherwise grows
# with every new shape, by the steps of an epoch) and a GPU's kernels see few shapes.
WIDTH_STEP = 32


@dataclass(frozen=True)
class Batch:
    """One process's rows of one batch, planned on the host.

    `index` is on the split's device; `width` is the longest row's length (rounded up to
    WIDTH_STEP) for text, 0 for images, so cutting the batch needs no device-to-host read.
    `share` weights the loss: this process's rows over an even share of the global batch (1.0
    but for an uneven last batch), so that the gradients DistributedDataParallel averages are
    the global batch's mean gradient."""

    index: Tensor
    width: int = 0
    share: float = 1.0


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
        """The whole split on `device`: the built-in datasets fit in any GPU, so no loader."""
        move = (lambda t: t.to(device)) if device.type != "cpu" else (lambda t: t)
        return replace(
            self,
            features={k: move(v) for k, v in self.features.items()},
            labels=move(self.labels),
        )

    def batch(self, index: Tensor, width: int = 0) -> tuple[tuple[Tensor, ...], Tensor]:
        """Model inputs and targets for the rows in `index` (a tensor on the split's device).
        Text rows are cut to `width`, or to their longest when it is 0 (a read from the device:
        `batches` plans widths on the host instead)."""
        targets = self.labels[index]
        if self.is_text:
            lengths = self.features["lengths"][index]
            width = width or int(lengths.max())
            return (self.features["tokens"][index, :width].long(), lengths.long()), targets
        images = self.features["images"][index].float().div_(255.0)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images,), targets

    def batch_indices(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Row indices per batch, on the host: shuffled when a generator is given,
        length-bucketed for text."""
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
            batches = [
                batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()
            ]
        return batches

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[Batch]:
        """Process `rank`'s part of every batch of `batch_indices` (each global batch is cut
        into `world_size` slices: every process sees the same order and takes the same number of
        steps). A last batch with fewer rows than processes is dropped (at most world_size - 1
        rows of an epoch; none in one process)."""
        # Widths come from a numpy copy of the lengths: host arithmetic, never a tensor read.
        lengths = self.features["lengths"].cpu().numpy() if self.is_text else None
        widest = self.features["tokens"].shape[1] if self.is_text else 0
        mine: list[Tensor] = []
        planned: list[tuple[int, float]] = []
        for rows in self.batch_indices(batch_size, generator):
            if len(rows) < world_size:
                continue
            part = rows.tensor_split(world_size)[rank]
            width = 0
            if lengths is not None:
                longest = int(lengths[part.numpy()].max())
                width = min(-(-longest // WIDTH_STEP) * WIDTH_STEP, widest)
            mine.append(part)
            planned.append((width, len(part) * world_size / len(rows)))
        if not mine:
            return []
        index = torch.cat(mine).to(self.labels.device)  # one copy for the whole epoch
        views = index.split([len(part) for part in mine])
        return [
            Batch(view, width, share) for view, (width, share) in zip(views, planned, strict=True)
        ]

    def steps(self, batch_size: int, world_size: int = 1) -> int:
        """len(self.batches(batch_size, ..., world_size=world_size)), without planning them."""
        full, rest = divmod(len(self), batch_size)
        return full + int(rest >= max(1, world_size))


def load_split(prepared_dir: Path, split: str, channels_last: bool = False) -> Split:
    """Memory-map `<prepared_dir>/<split>.npz` written by a prepare stage (images uint8
    [N, C, H, W], or tokens and lengths), its bytes first checked against the folder's SHA256SUMS
    (and the small files beside it, meta.json and tokenizer.json, which the stages read next); a
    changed or incomplete folder is one DlpipeError line. Mapped, a split costs page cache the
    kernel can drop, not memory the process holds, however many rows it has."""
    path = prepared_dir / f"{split}.npz"
    rerun = f"dvc repro prepare@{prepared_dir.name}"
    if not path.exists():
        raise DlpipeError(f"{path}: missing; run the prepare stage first (dvc repro)")
    verify_file(path, rerun)
    verify_listed(prepared_dir, rerun, skip_suffix=".npz")
    try:
        arrays = map_npz(path)
        labels = torch.from_numpy(arrays["labels"].astype(np.int64))
        if "tokens" in arrays:
            features = {
                "tokens": torch.from_numpy(arrays["tokens"]),
                "lengths": torch.from_numpy(arrays["lengths"].astype(np.int64)).clamp_(min=1),
            }
        else:
            images = arrays["images"]
            if images.ndim != 4:
                raise ValueError(f"images of shape {images.shape}, expected [N, C, H, W]")
            features = {"images": torch.from_numpy(images)}
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, struct.error) as err:
        raise DlpipeError(f"{path}: not a prepared split ({err}); rerun `{rerun}`") from None
    return Split(features, labels, channels_last=channels_last)


def map_npz(path: Path) -> dict[str, np.ndarray]:
    """Each `<name>.npy` member of an uncompressed .npz (np.savez's) memory-mapped by name.

    Copy-on-write, so that torch can wrap the arrays; nothing writes to them."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not an uncompressed .npy")
            handle.seek(info.header_offset)
            local = handle.read(30)  # the local file header; its name and extra field follow
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }[version]
            shape, fortran_order, dtype = read_header(handle)
            if dtype.hasobject:
                raise ValueError(f"member {info.filename!r} holds Python objects")
            arrays[info.filename.removesuffix(".npy")] = np.memmap(
                path,
                dtype=dtype,
                mode="c",
                offset=handle.tell(),
                shape=shape,
                order="F" if fortran_order else "C",
            )
    return arrays
