"""IMDB sentiment: the 50k labelled reviews (and 50k unlabeled) of Maas et al. 2011, fetched
from the canonical archive (or a mirror's CSV export) with pinned sha256s into one frame format,
then prepared as texts (dlpipe.data.text).

Both roads end in the same frames (`review_id`, `label`, `text`; neg by id, then pos by id), so
what the later stages see does not depend on where the reviews came from. The canonical tarball
is read member by member straight from the archive: nothing is extracted, and members that could
escape a folder (absolute paths, `..`, links, devices) refuse the whole archive up front.
"""

from __future__ import annotations

import logging
import posixpath
import re
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field
from tqdm import tqdm

from dlpipe.data.columns import batches, check_columns
from dlpipe.data.download import (
    RemoteFile,
    SourcesExhaustedError,
    fetch_file,
    in_mirror,
    origin,
)
from dlpipe.data.splits import stratified_split, stratified_subset
from dlpipe.data.text import LabelledTexts, TextColumn, TextSettings, prepare_texts
from dlpipe.datasets import DatasetFormat, FetchContext
from dlpipe.errors import DlpipeError
from dlpipe.inputs.tokens import TOKENS

log = logging.getLogger(__name__)

LABEL_NAMES = ("negative", "positive")

IMDB_ARCHIVE = RemoteFile(
    "aclImdb_v1.tar.gz",
    "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
)
IMDB_ARCHIVE_URLS: tuple[str, ...] = (
    "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
)

# The CSV export a data mirror may hold under imdb/ (only mirrors have it; no canonical URL).
# Names are `<split>.csv.gz`, one per IMDB split.
IMDB_CSV_FILES: tuple[RemoteFile, ...] = (
    RemoteFile(
        "train.csv.gz",
        "cbc41dac47c1920eceffdfac3fc0d9672b2a74b7a34530faa596bf31a74494c5",
    ),
    RemoteFile(
        "test.csv.gz",
        "c7a55369304c9ac8f81e94941ef1bc255e7a3f672fa54c8074c9d76db374e218",
    ),
    RemoteFile(
        "unsup.csv.gz",
        "2ddf053487bc407557a7d226bb64121e4c11d9c18c8db30804b451b7385b2c96",
    ),
)


@dataclass(frozen=True)
class ImdbSources:
    """Where IMDB's files come from; tests pass their own."""

    csv_files: tuple[RemoteFile, ...] = IMDB_CSV_FILES
    archive: RemoteFile = IMDB_ARCHIVE
    archive_urls: tuple[str, ...] = IMDB_ARCHIVE_URLS


class ImdbSettings(TextSettings):
    """datasets.<name> for format imdb: the 25k training reviews split into train and val."""

    format: Literal["imdb"]
    val_size: Annotated[int, Field(ge=10, le=12500)] = 5000
    train_on_unsup: bool = True  # the 50k unlabeled reviews feed the vocabulary and vectors


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


def fetch(folder: Path, context: FetchContext) -> dict[str, Any]:
    """`folder/{train,test,unsup}.parquet`: from the mirror's CSV export when it has one, else
    from the canonical archive."""
    sources = context.sources.get("imdb", ImdbSources())
    mirror = context.mirror
    start = time.perf_counter()
    frames: dict[str, pd.DataFrame] | None = None
    used: dict[str, str] = {}
    if mirror and sources.csv_files:
        frames, used = _from_csv(context, sources)
    if frames is None:
        remote = sources.archive
        candidates = [in_mirror(mirror, "imdb", remote.name)] if mirror else []
        candidates += list(sources.archive_urls)
        archive, used[remote.name] = fetch_file(
            candidates, remote, context.cache_dir, context.config
        )
        frames = read_aclimdb_archive(archive)
    folder.mkdir(parents=True)
    files = {}
    for split, data in frames.items():
        path = folder / f"{split}.parquet"
        data.to_parquet(path, index=False, engine="pyarrow")
        files[path.name] = path.stat().st_size
    return {
        "files": files,
        "bytes": sum(files.values()),
        "rows": {split: len(data) for split, data in frames.items()},
        "sources": used,
        "origin": origin(used, mirror),
        "seconds": time.perf_counter() - start,
    }


def _from_csv(
    context: FetchContext, sources: ImdbSources
) -> tuple[dict[str, pd.DataFrame] | None, dict[str, str]]:
    """The frames from the mirror's CSV export, or None when the mirror has no (complete) export.

    A missing file falls back to the archive; a corrupt one is fatal like any checksum error.
    """
    assert context.mirror is not None
    splits = {remote.name.split(".", 1)[0]: remote for remote in sources.csv_files}
    if set(splits) != set(SPLIT_FOLDERS):
        raise ValueError(f"csv_files must be one per split {sorted(SPLIT_FOLDERS)}")
    paths: dict[str, Path] = {}
    used: dict[str, str] = {}
    try:
        for split, remote in splits.items():
            source = in_mirror(context.mirror, "imdb", remote.name)
            paths[split], used[remote.name] = fetch_file(
                [source], remote, context.cache_dir, context.config
            )
    except SourcesExhaustedError:
        log.warning(
            "mirror %s has no complete IMDB CSV export; using aclImdb_v1.tar.gz", context.mirror
        )
        return None, {}
    return {split: read_imdb_csv(paths[split], split) for split in SPLIT_FOLDERS}, used


def read_raw(raw_dir: Path, split: str) -> LabelledTexts:
    """One fetched split: its ids and labels read, its texts left in the file to stream."""
    path = raw_dir / f"{split}.parquet"
    if not path.exists():
        raise DlpipeError(f"{path}: missing; run the fetch stage first (dvc repro fetch)")
    rows = pd.concat(list(batches(path, ["review_id", "label"])), ignore_index=True)
    check_columns(path, ["text"])
    return LabelledTexts(
        rows["review_id"].to_numpy(dtype=str),
        rows["label"].to_numpy(dtype=np.int64),
        TextColumn.in_table(path, "text", np.arange(len(rows))),
    )


def prepare(settings: ImdbSettings, raw_dir: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    """Split train into train/val, then prepare the texts (the tokenizer and the word vectors
    learn from the training split and, with train_on_unsup, the unlabeled reviews)."""
    train_all, test = read_raw(raw_dir, "train"), read_raw(raw_dir, "test")
    train_all = train_all.take(stratified_subset(train_all.labels, settings.max_train, seed))
    test = test.take(stratified_subset(test.labels, settings.max_test, seed))
    for name, rows in (("train", train_all), ("test", test)):
        if not np.isin(rows.labels, [0, 1]).all():
            raise DlpipeError(f"{raw_dir / name}.parquet: labels must be 0 or 1")
    keep, val = stratified_split(train_all.labels, settings.val_size, seed)
    splits = {"train": train_all.take(keep), "val": train_all.take(val), "test": test}
    unlabeled = [read_raw(raw_dir, "unsup").texts] if settings.train_on_unsup else []
    return prepare_texts(splits, unlabeled, LABEL_NAMES, settings, out_dir, seed)


FORMAT = DatasetFormat(
    name="imdb",
    settings=ImdbSettings,
    inputs=TOKENS,
    prepare=prepare,
    fetch=fetch,
    smoke={
        "max_train": 8000,
        "max_test": 2000,
        "max_unlabeled": 8000,
        "val_size": 1000,
        "vocab_size": 2000,
        "max_len": 128,
    },
)
