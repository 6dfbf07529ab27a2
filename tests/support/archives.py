"""Builders of raw downloads: a tiny aclImdb archive and CSV exports shaped like the real ones."""

from __future__ import annotations

import csv
import gzip
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Tiny IMDB: (split folder, label folder) -> texts by review id. Twelve train/neg reviews so that
# numeric id order (2 < 10) differs from name order; texts carry CSV-hostile characters.
TINY_IMDB: dict[tuple[str, str], list[str]] = {
    ("train", "neg"): [
        'He said "no", then left, sadly.',
        "  leading and trailing spaces  ",
        "A bad film.<br /><br />Really.",
        "NA",
        *[f"negative review number {i}" for i in range(4, 12)],
    ],
    ("train", "pos"): ["Bromwell High is a cartoon comedy. It ran", "Ünïcödé — fine 😀", "N/A"],
    ("test", "neg"): ["null", 'Meh; 4/10, "quoted"'],
    ("test", "pos"): ["Great: 9/10!"],
    ("train", "unsup"): ["first unlabeled, with comma", "second", "None", "third\tone"],
}
RATING = {"neg": 3, "pos": 8, "unsup": 0}


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def make_acl_archive() -> Callable[..., Path]:
    """Writes an aclImdb-shaped tar.gz (ids in scrambled order, plus files the reader ignores)."""

    def make(path: Path, extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
        with tarfile.open(path, "w:gz") as tar:
            _tar_add(tar, "aclImdb/README", b"Large Movie Review Dataset v1.0\n")
            _tar_add(tar, "aclImdb/train/labeledBow.feat", b"0 0:1 1:2\n")
            _tar_add(tar, "aclImdb/train/urls_pos.txt", b"http://www.imdb.com/title/x\n")
            for (split, folder), texts in TINY_IMDB.items():
                for review_id in reversed(range(len(texts))):
                    name = f"aclImdb/{split}/{folder}/{review_id}_{RATING[folder]}.txt"
                    _tar_add(tar, name, texts[review_id].encode("utf-8"))
            if extra is not None:
                extra(tar)
        return path

    return make


@pytest.fixture
def make_csv_export() -> Callable[[Path], dict[str, Path]]:
    """Writes the mirror's CSV export (gzip, CRLF, minimal quoting) of the tiny IMDB data."""

    def write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(rows)
        path.write_bytes(gzip.compress(buffer.getvalue().encode("utf-8"), mtime=0))
        return path

    def make(folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for split in ("train", "test"):
            rows: list[list[object]] = [[0, t] for t in TINY_IMDB[(split, "neg")]]
            rows += [[1, t] for t in TINY_IMDB[(split, "pos")]]
            files[split] = write(folder / f"{split}.csv.gz", ["label", "text"], rows)
        unsup: list[list[object]] = [[t] for t in TINY_IMDB[("train", "unsup")]]
        files["unsup"] = write(folder / "unsup.csv.gz", ["text"], unsup)
        return files

    return make
