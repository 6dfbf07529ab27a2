"""The raw IMDB reviews as one frame format, from the canonical archive or from a CSV export.

Both roads end in the same frames (`review_id`, `label`, `text`; neg by id, then pos by id), so
what the later stages see does not depend on where the reviews came from. The canonical tarball
is read member by member straight from the archive: nothing is extracted, and members that could
escape a folder (absolute paths, `..`, links, devices) refuse the whole archive up front.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from dlpipe.errors import DlpipeError

# (split, folder) pairs making up each output split, in row order.
SPLIT_FOLDERS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("train", "neg"), ("train", "pos")),
    "test": (("test", "neg"), ("test", "pos")),
    "unsup": (("train", "unsup"),),
}
LABEL_OF_FOLDER = {"neg": 0, "pos": 1, "unsup": -1}
_REVIEW = re.compile(r"aclImdb/(train|test)/(neg|pos|unsup)/(\d+)_(\d+)\.txt")


def frame(review_ids: list[str], labels: list[int], texts: list[str]) -> pd.DataFrame:
    """The raw IMDB frame with its fixed dtypes."""
    return pd.DataFrame(
        {
            "review_id": pd.array(review_ids, dtype="string"),
            "label": np.asarray(labels, dtype=np.int8),
            "text": pd.array(texts, dtype="string"),
        }
    )


def check_member_safe(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a member that could write outside a folder if the archive were ever extracted."""
    name = member.name
    norm = posixpath.normpath(name.replace("\\", "/"))
    absolute = name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) is not None
    if absolute or ".." in norm.split("/") or member.issym() or member.islnk() or member.isdev():
        raise DlpipeError(f"unsafe member in archive {archive}: {name!r}")


def read_aclimdb_archive(path: Path) -> dict[str, pd.DataFrame]:
    """Read `aclImdb_v1.tar.gz` into {"train", "test", "unsup"} frames without extracting it."""
    path = Path(path)
    texts: dict[tuple[str, str], dict[int, str]] = {
        key: {} for keys in SPLIT_FOLDERS.values() for key in keys
    }
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                check_member_safe(member, path)
            for member in tqdm(members, desc="aclImdb", unit="file", disable=None):
                match = _REVIEW.fullmatch(posixpath.normpath(member.name))
                if match is None or not member.isfile():
                    continue
                split, folder, review_id = match[1], match[2], int(match[3])
                bucket = texts.get((split, folder))
                if bucket is None:  # e.g. a test/unsup folder, which the dataset does not have
                    continue
                if review_id in bucket:
                    raise DlpipeError(f"archive {path}: duplicate review id in {member.name!r}")
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                try:
                    bucket[review_id] = handle.read().decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DlpipeError(
                        f"archive {path}: {member.name!r} is not UTF-8: {err}"
                    ) from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DlpipeError(f"cannot read archive {path}: {err}") from None

    frames = {}
    for out_split, keys in SPLIT_FOLDERS.items():
        ids: list[str] = []
        labels: list[int] = []
        rows: list[str] = []
        for split, folder in keys:
            bucket = texts[(split, folder)]
            if sorted(bucket) != list(range(len(bucket))) or not bucket:
                raise DlpipeError(
                    f"archive {path}: aclImdb/{split}/{folder} must hold reviews 0..N-1 "
                    f"(found {len(bucket)} files); incomplete archive?"
                )
            for review_id in range(len(bucket)):
                ids.append(f"{split}/{folder}/{review_id}")
                labels.append(LABEL_OF_FOLDER[folder])
                rows.append(bucket[review_id])
        frames[out_split] = frame(ids, labels, rows)
    return frames


def read_imdb_csv(path: Path, split: str) -> pd.DataFrame:
    """Read one CSV export file (`label,text`, neg rows then pos rows; unsup: `text`) as a frame.

    Review ids come from the row position: the export keeps each folder's files in id order.
    """
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"unknown IMDB split {split!r}")
    try:
        data = pd.read_csv(path, keep_default_na=False, dtype={"text": str}, encoding="utf-8")
    except (OSError, ValueError, EOFError, zlib.error, pd.errors.ParserError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DlpipeError(f"cannot read {path}: {first}") from None
    columns = ["text"] if split == "unsup" else ["label", "text"]
    if list(data.columns) != columns:
        raise DlpipeError(f"{path}: columns {list(data.columns)}, expected {columns}")
    texts = data["text"].tolist()
    if split == "unsup":
        ids = [f"train/unsup/{i}" for i in range(len(data))]
        return frame(ids, [-1] * len(data), texts)
    labels = data["label"]
    if not pd.api.types.is_integer_dtype(labels) or not labels.isin([0, 1]).all():
        raise DlpipeError(f"{path}: labels must be 0 or 1")
    if not labels.is_monotonic_increasing:
        raise DlpipeError(f"{path}: rows must be all negatives (0) first, then positives (1)")
    negatives = int((labels == 0).sum())
    ids = [f"{split}/neg/{i}" for i in range(negatives)]
    ids += [f"{split}/pos/{i}" for i in range(len(data) - negatives)]
    return frame(ids, labels.tolist(), texts)
