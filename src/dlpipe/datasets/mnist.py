"""MNIST: the canonical IDX files, fetched with pinned sha256s, decoded and split into image
arrays; served pictures are read with the digit rule (centred by mass, as MNIST was made)."""

from __future__ import annotations

import gzip
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from dlpipe.data.download import RemoteFile, fetch_file, in_mirror, origin
from dlpipe.data.pictures import prepare_images
from dlpipe.data.splits import stratified_split, stratified_subset
from dlpipe.datasets import DatasetFormat, DatasetSettings, FetchContext
from dlpipe.errors import DlpipeError
from dlpipe.inputs.images import IMAGES

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
NUM_CLASSES = 10
IMAGE_SIZE = 28  # pixels a side
MEAN, STD = 0.1307, 0.3081  # the training images' pixel statistics, as every MNIST model uses
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

MNIST_FILES: tuple[RemoteFile, ...] = (
    RemoteFile(
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    RemoteFile(
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
)

# The URL bases torchvision tries, in its order.
MNIST_URL_BASES: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


@dataclass(frozen=True)
class MnistSources:
    """Where MNIST's four files come from; tests pass their own."""

    files: tuple[RemoteFile, ...] = MNIST_FILES
    url_bases: tuple[str, ...] = MNIST_URL_BASES


class MnistSettings(DatasetSettings):
    """datasets.<name> for format mnist: the 60k training images split into train and val."""

    format: Literal["mnist"]
    val_size: Annotated[int, Field(ge=10, le=30000)] = 5000


def fetch(folder: Path, context: FetchContext) -> dict[str, Any]:
    """The four canonical files into `folder`, each verified against its pinned sha256."""
    sources = context.sources.get("mnist", MnistSources())
    start = time.perf_counter()
    folder.mkdir(parents=True)
    used: dict[str, str] = {}
    for remote in sources.files:
        mirror = context.mirror
        candidates = [in_mirror(mirror, "mnist", remote.name)] if mirror else []
        candidates += [f"{url.rstrip('/')}/{remote.name}" for url in sources.url_bases]
        cached, used[remote.name] = fetch_file(
            candidates, remote, context.cache_dir, context.config
        )
        shutil.copyfile(cached, folder / remote.name)
    files = {name: (folder / name).stat().st_size for name in used}
    return {
        "files": files,
        "bytes": sum(files.values()),
        "sources": used,
        "origin": origin(used, context.mirror),
        "seconds": time.perf_counter() - start,
    }


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or raw) as a uint8 array, its magic number and dimensions checked."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise DlpipeError(f"{path}: cannot read IDX file: {err}") from None
    if len(data) < 8:
        raise DlpipeError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise DlpipeError(
            f"{path}: bad IDX magic {magic}, expected {IMAGES_MAGIC} or {LABELS_MAGIC}"
        )
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and dims[1:] != [IMAGE_SIZE, IMAGE_SIZE]:
        raise DlpipeError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DlpipeError(f"{path}: {len(data)} bytes, header says {expected} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(raw_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] and labels [N] of one canonical split, cross-checked."""
    images_file, labels_file = FILES[split]
    images, labels = read_idx(raw_dir / images_file), read_idx(raw_dir / labels_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise DlpipeError(f"{raw_dir}: {images_file} / {labels_file} are swapped or malformed")
    if len(images) != len(labels):
        raise DlpipeError(f"{raw_dir}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DlpipeError(f"{raw_dir / labels_file}: label {labels.max()} outside 0-9")
    return images, labels


def prepare(settings: MnistSettings, raw_dir: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    """Decode, split train into train/val, write the image splits; return the data card."""
    train_x, train_y = load_split(raw_dir, "train")
    test_x, test_y = load_split(raw_dir, "test")
    sample = stratified_subset(train_y, settings.max_train, seed)
    train_x, train_y = train_x[sample], train_y[sample]
    sample = stratified_subset(test_y, settings.max_test, seed)
    test_x, test_y = test_x[sample], test_y[sample]
    keep, val = stratified_split(train_y, settings.val_size, seed)
    splits = {
        "train": (train_x[keep][:, None], train_y[keep]),
        "val": (train_x[val][:, None], train_y[val]),
        "test": (test_x[:, None], test_y),
    }
    names = [str(digit) for digit in range(NUM_CLASSES)]
    return prepare_images(splits, names, out_dir, raw_input="digit", norm=([MEAN], [STD]))


FORMAT = DatasetFormat(
    name="mnist",
    settings=MnistSettings,
    inputs=IMAGES,
    prepare=prepare,
    fetch=fetch,
    smoke={"max_train": 6000, "max_test": 2000, "val_size": 1000},
)
