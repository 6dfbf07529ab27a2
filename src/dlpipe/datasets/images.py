"""Format `images`: a folder of labelled pictures, no code needed.

    datasets:
      pets: {format: images, path: data/own/pets, image_size: [32, 32], channels: 3}

The folder holds `<class>/<file>`, or `train/<class>/<file>` and `test/<class>/<file>` (and
optionally `val/...`); the classes are the folder names, sorted. Files may be PNG, JPEG, BMP or
WebP, grayscale or colour, any size: each is decoded, laid on white where transparent, converted
to `channels` and resized to `image_size` as `dlpipe.inputs.images.resized` does, which is also how
a served model reads its pictures. Missing splits are held out of the training pictures, seeded
and stratified. Pictures are decoded on every core.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field
from tqdm import tqdm

from dlpipe.data.pictures import prepare_images
from dlpipe.data.splits import stratified_split, stratified_subset
from dlpipe.datasets import DatasetFormat, DatasetSettings, SplitSize
from dlpipe.errors import DlpipeError
from dlpipe.inputs.images import IMAGE_SUFFIXES, IMAGES, resized

SPLIT_FOLDERS = ("train", "val", "test")
Side = Annotated[int, Field(ge=1, le=4096)]


class ImageFolderSettings(DatasetSettings):
    """datasets.<name> for format images."""

    format: Literal["images"]
    image_size: tuple[Side, Side] = (32, 32)  # [height, width] every picture is resized to
    channels: Literal[1, 3] = 3  # 1: grayscale, 3: RGB
    test_size: SplitSize = 0.2  # held out of the pictures when the folder has no test/
    on_bad_image: Literal["fail", "skip"] = "fail"  # skip: leave it out, counted in the card
    raw_input: Literal["resize", "digit"] = "resize"  # digit: served pictures read MNIST-style


def _class_files(folder: Path, where: str) -> dict[str, list[Path]]:
    """{class: its picture files, sorted} of a `<class>/<file>` folder."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise DlpipeError(
            f"{folder}: {len(stray)} file(s) outside a class folder (first {stray[0]}); "
            f"{where} must hold one folder per class"
        )
    if not classes:
        raise DlpipeError(f"{folder}: no class folders; {where} must hold one folder per class")
    found: dict[str, list[Path]] = {}
    for class_dir in classes:
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        for file in files:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise DlpipeError(
                    f"{file}: not a picture file (PNG, JPEG, BMP or WebP expected); "
                    "move it out of the class folder"
                )
        found[class_dir.name] = files
    return found


def _layout(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: files}} for the splits the folder has (`train` at least)."""
    if not root.is_dir():
        what = "a file" if root.exists() else "no such folder"
        raise DlpipeError(f"{root}: {what}; an images dataset's path is a folder of class folders")
    subfolders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if subfolders and subfolders <= set(SPLIT_FOLDERS):
        if "train" not in subfolders:
            raise DlpipeError(f"{root}: has {sorted(subfolders)} but no train/ folder")
        return {s: _class_files(root / s, f"{root}/{s}") for s in SPLIT_FOLDERS if s in subfolders}
    return {"train": _class_files(root, str(root))}


def _decode_all(
    files: Sequence[Path], settings: ImageFolderSettings
) -> tuple[np.ndarray, list[bool], list[str]]:
    """uint8 [N, C, H, W] pictures of `files` (threads on every core: decoding releases the
    GIL), whether each was readable, and the problems of those that were not."""
    height, width = settings.image_size

    def load(path: Path) -> np.ndarray | str:
        try:
            return resized(path.read_bytes(), str(path), settings.channels, height, width)
        except (DlpipeError, OSError) as err:
            return str(err)

    images = np.zeros((len(files), settings.channels, height, width), dtype=np.uint8)
    ok: list[bool] = []
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(load, files)
        for i, result in enumerate(
            tqdm(decoded, total=len(files), desc="pictures", unit="file", disable=None)
        ):
            ok.append(not isinstance(result, str))
            if isinstance(result, str):
                problems.append(result)
            else:
                images[i] = result  # straight into the array: no second copy of every picture
    return images, ok, problems


Pool = tuple[np.ndarray, np.ndarray]  # pictures and their labels


def _hold_out(
    images: np.ndarray,
    labels: np.ndarray,
    size: int | float,
    seed: int,
    names: Sequence[str],
    key: str,
) -> tuple[Pool, Pool]:
    """(the rest, `size` rows held out: seeded, stratified)."""
    keep, held = stratified_split(labels, size, seed, names, key)
    return (images[keep], labels[keep]), (images[held], labels[held])


def prepare(
    settings: ImageFolderSettings, raw_dir: Path, out_dir: Path, seed: int
) -> dict[str, Any]:
    """Read every picture, split, write the image splits; return the data card."""
    layout = _layout(raw_dir)
    names = sorted(layout["train"])
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise DlpipeError(
            f"{raw_dir}: a classifier needs two or more class folders (found {found})"
        )
    key = f"datasets.{out_dir.name}"
    for split, classes in layout.items():
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise DlpipeError(
                f"{raw_dir}/{split}: classes {unknown} have no training pictures in {raw_dir}/train"
            )
    pools: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: list[str] = []
    for split, classes in layout.items():
        files = [file for name in names for file in classes.get(name, [])]
        labels = np.array(
            [i for i, name in enumerate(names) for _ in classes.get(name, [])], dtype=np.int64
        )
        images, ok, problems = _decode_all(files, settings)
        if problems and settings.on_bad_image == "fail":
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DlpipeError(f"{problems[0]}{more}; fix or remove it, or set on_bad_image: skip")
        skipped += problems
        keep = np.asarray(ok, dtype=bool)
        pools[split] = images[keep], labels[keep]
    if skipped:
        print(f"prepare: warning: skipped {len(skipped)} unreadable picture(s)", file=sys.stderr)
    train_x, train_y = pools["train"]
    if len(train_y) == 0:
        raise DlpipeError(f"{raw_dir}: no pictures")
    if "test" in pools:
        test_x, test_y = pools["test"]
    else:
        (train_x, train_y), (test_x, test_y) = _hold_out(
            train_x, train_y, settings.test_size, seed, names, f"{key}.test_size"
        )
    sample = stratified_subset(train_y, settings.max_train, seed)
    train_x, train_y = train_x[sample], train_y[sample]
    sample = stratified_subset(test_y, settings.max_test, seed)
    test_x, test_y = test_x[sample], test_y[sample]
    if "val" in pools:
        val_x, val_y = pools["val"]
    else:
        (train_x, train_y), (val_x, val_y) = _hold_out(
            train_x, train_y, settings.val_size, seed, names, f"{key}.val_size"
        )
    splits = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}
    leaked = _shared_pictures(train_x, test_x)
    if leaked:
        print(
            f"prepare: warning: {leaked} test picture(s) are also in the training split "
            "(identical pixels after resizing): the test score overstates accuracy",
            file=sys.stderr,
        )
    extra = {"skipped_pictures": len(skipped), "test_pictures_also_in_train": leaked}
    return prepare_images(splits, names, out_dir, settings.raw_input, card_extra=extra)


def _shared_pictures(train: np.ndarray, test: np.ndarray) -> int:
    """How many test pictures have exactly the pixels of some training picture."""
    seen = {hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in train}
    return sum(hashlib.blake2b(image.tobytes(), digest_size=16).digest() in seen for image in test)


FORMAT = DatasetFormat(
    name="images",
    settings=ImageFolderSettings,
    inputs=IMAGES,
    prepare=prepare,
    smoke={"max_train": 4000, "max_test": 1000},
)
