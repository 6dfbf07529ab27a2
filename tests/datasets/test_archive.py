"""Reading aclImdb straight from the tarball, the CSV export, and refusing unsafe archives."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from support.archives import TINY_IMDB

from dlpipe.datasets.imdb import frame, read_aclimdb_archive, read_imdb_csv
from dlpipe.errors import DlpipeError


def expected_frames() -> dict[str, pd.DataFrame]:
    """The tiny data as the raw format must hold it, built independently of the readers."""
    frames = {}
    for split in ("train", "test"):
        neg, pos = TINY_IMDB[(split, "neg")], TINY_IMDB[(split, "pos")]
        ids = [f"{split}/neg/{i}" for i in range(len(neg))]
        ids += [f"{split}/pos/{i}" for i in range(len(pos))]
        frames[split] = frame(ids, [0] * len(neg) + [1] * len(pos), neg + pos)
    unsup = TINY_IMDB[("train", "unsup")]
    frames["unsup"] = frame(
        [f"train/unsup/{i}" for i in range(len(unsup))], [-1] * len(unsup), unsup
    )
    return frames


def assert_frames_equal(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame]) -> None:
    assert list(got) == list(want)
    for split in want:
        pd.testing.assert_frame_equal(got[split], want[split])


def test_reads_archive_without_extracting(
    make_acl_archive: Callable[..., Path], tmp_path: Path
) -> None:
    archive = make_acl_archive(tmp_path / "aclImdb_v1.tar.gz")
    frames = read_aclimdb_archive(archive)
    assert_frames_equal(frames, expected_frames())
    train = frames["train"]
    assert list(train.columns) == ["review_id", "label", "text"]
    assert str(train["label"].dtype) == "int8"
    assert train["review_id"].iloc[:3].tolist() == ["train/neg/0", "train/neg/1", "train/neg/2"]
    assert train["review_id"].iloc[10:13].tolist() == [
        "train/neg/10",
        "train/neg/11",
        "train/pos/0",
    ]
    assert train["text"].iloc[1] == "  leading and trailing spaces  "
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aclImdb_v1.tar.gz"]


def test_csv_export_gives_the_same_frames(
    make_acl_archive: Callable[..., Path],
    make_csv_export: Callable[[Path], dict[str, Path]],
    tmp_path: Path,
) -> None:
    from_archive = read_aclimdb_archive(make_acl_archive(tmp_path / "a.tar.gz"))
    files = make_csv_export(tmp_path / "csv")
    from_csv = {split: read_imdb_csv(path, split) for split, path in files.items()}
    assert_frames_equal(from_csv, from_archive)


def test_csv_ids_follow_label_counts(tmp_path: Path) -> None:
    path = tmp_path / "train.csv.gz"
    path.write_bytes(gzip.compress(b'label,text\r\n0,a\r\n0,"b, c"\r\n1,d\r\n'))
    got = read_imdb_csv(path, "train")
    assert got["review_id"].tolist() == ["train/neg/0", "train/neg/1", "train/pos/0"]
    assert got["label"].tolist() == [0, 0, 1]
    assert got["text"].tolist() == ["a", "b, c", "d"]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"label,text\r\n1,a\r\n0,b\r\n", "negatives (0) first"),
        (b"label,text\r\n0,a\r\n2,b\r\n", "labels must be 0 or 1"),
        (b"text\r\na\r\n", "columns ['text'], expected ['label', 'text']"),
    ],
)
def test_malformed_csv_is_refused(tmp_path: Path, body: bytes, message: str) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(body)
    with pytest.raises(DlpipeError, match=re.escape(message)):
        read_imdb_csv(path, "train")


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("../evil.txt"),
        _member("aclImdb/../../evil.txt"),
        _member("/etc/evil.txt"),
        _member("aclImdb/train/pos/99_9.txt", tarfile.SYMTYPE, "/etc/passwd"),
        _member("aclImdb/train/pos/98_9.txt", tarfile.LNKTYPE, "aclImdb/README"),
        _member("aclImdb/dev", tarfile.CHRTYPE),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device"],
)
def test_unsafe_members_refuse_the_archive(
    make_acl_archive: Callable[..., Path], tmp_path: Path, member: tarfile.TarInfo
) -> None:
    def add(tar: tarfile.TarFile) -> None:
        tar.addfile(member, io.BytesIO(b"") if member.isreg() else None)

    archive = make_acl_archive(tmp_path / "evil.tar.gz", extra=add)
    with pytest.raises(DlpipeError) as err:
        read_aclimdb_archive(archive)
    assert str(err.value) == f"unsafe member in archive {archive}: {member.name!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz"]


def test_non_utf8_review_is_refused(make_acl_archive: Callable[..., Path], tmp_path: Path) -> None:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("aclImdb/test/pos/1_9.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"\xff\xfe"))

    with pytest.raises(DlpipeError, match=r"'aclImdb/test/pos/1_9.txt' is not UTF-8"):
        read_aclimdb_archive(make_acl_archive(tmp_path / "a.tar.gz", extra=add))


def test_missing_review_ids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "gap.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("aclImdb/train/neg/1_2.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DlpipeError, match="aclImdb/train/neg must hold reviews 0..N-1"):
        read_aclimdb_archive(path)


def test_not_a_gzip_archive_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "junk.tar.gz"
    path.write_bytes(b"not an archive")
    with pytest.raises(DlpipeError, match=f"cannot read archive {path}"):
        read_aclimdb_archive(path)
