"""download(): fallback across sources, retries, and fatal integrity failures leaving no files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from dlpipe.data import download as dl
from dlpipe.data.download import (
    MIRROR_HINT,
    ChecksumError,
    SourcesExhaustedError,
    TruncatedError,
    download,
    download_from,
)

if TYPE_CHECKING:
    from conftest import Server

GOOD = b"the real bytes " * 1000
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
GOOD_MD5 = hashlib.md5(GOOD).hexdigest()
BAD = GOOD[:-1] + b"!"
BAD_SHA = hashlib.sha256(BAD).hexdigest()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "BACKOFF_BASE_S", 0.0)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_http_download_verifies_and_lands(http_server: Server, tmp_path: Path) -> None:
    http_server.serve("/good.gz", GOOD)
    dest = tmp_path / "out" / "good.gz"
    path = download([http_server.url("/good.gz")], dest, sha256=GOOD_SHA, md5=GOOD_MD5)
    assert path == dest
    assert dest.read_bytes() == GOOD
    assert leftovers(dest.parent) == ["good.gz"]


def test_checksum_mismatch_is_fatal_and_leaves_nothing(http_server: Server, tmp_path: Path) -> None:
    http_server.serve("/bad.gz", BAD)
    http_server.serve("/good.gz", GOOD)
    dest = tmp_path / "file.gz"
    sources = [http_server.url("/bad.gz"), http_server.url("/good.gz")]
    with pytest.raises(ChecksumError) as err:
        download(sources, dest, sha256=GOOD_SHA)
    message = str(err.value)
    assert message == (
        f"checksum mismatch for file.gz from {sources[0]}: "
        f"expected sha256 {GOOD_SHA}, got {BAD_SHA}"
    )
    assert "\n" not in message
    assert http_server.hits["/good.gz"] == 0, "a corrupt source must not fall through"
    assert leftovers(tmp_path) == []


def test_md5_mismatch_is_fatal(http_server: Server, tmp_path: Path) -> None:
    http_server.serve("/good.gz", GOOD)
    with pytest.raises(ChecksumError, match=f"expected md5 {'0' * 32}, got {GOOD_MD5}"):
        download([http_server.url("/good.gz")], tmp_path / "f", sha256=GOOD_SHA, md5="0" * 32)
    assert leftovers(tmp_path) == []


def test_truncated_body_is_fatal_and_leaves_nothing(http_server: Server, tmp_path: Path) -> None:
    short = GOOD[:1000]
    http_server.serve("/short.gz", short, length=len(GOOD))
    http_server.serve("/good.gz", GOOD)
    dest = tmp_path / "file.gz"
    sources = [http_server.url("/short.gz"), http_server.url("/good.gz")]
    with pytest.raises(TruncatedError) as err:
        download(sources, dest, sha256=GOOD_SHA)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"truncated download of file.gz from {sources[0]}: ")
    assert f"got 1000 of {len(GOOD)} bytes" in message
    assert f"expected sha256 {GOOD_SHA}, got {hashlib.sha256(short).hexdigest()}" in message
    assert http_server.hits["/good.gz"] == 0
    assert leftovers(tmp_path) == []


def test_404_falls_back_without_retrying(http_server: Server, tmp_path: Path) -> None:
    http_server.serve("/good.gz", GOOD)
    sources = [http_server.url("/missing.gz"), http_server.url("/good.gz")]
    _, used = download_from(sources, tmp_path / "f.gz", sha256=GOOD_SHA, retries=3)
    assert used == sources[1]
    assert http_server.hits["/missing.gz"] == 1


def test_server_error_is_retried_then_falls_back(http_server: Server, tmp_path: Path) -> None:
    http_server.serve("/flaky.gz", b"oops", status=503)
    http_server.serve("/good.gz", GOOD)
    sources = [http_server.url("/flaky.gz"), http_server.url("/good.gz")]
    _, used = download_from(sources, tmp_path / "f.gz", sha256=GOOD_SHA, retries=2)
    assert used == sources[1]
    assert http_server.hits["/flaky.gz"] == 3


def test_connection_refused_is_retried_with_backoff_then_falls_back(
    http_server: Server, closed_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    http_server.serve("/good.gz", GOOD)
    calls: list[str] = []
    sleeps: list[float] = []
    real_get = requests.get

    def counting_get(url: str, **kwargs: Any) -> requests.Response:
        calls.append(url)
        return real_get(url, **kwargs)

    monkeypatch.setattr(dl.requests, "get", counting_get)
    monkeypatch.setattr(dl.time, "sleep", sleeps.append)
    monkeypatch.setattr(dl, "BACKOFF_BASE_S", 0.5)
    refused = f"http://127.0.0.1:{closed_port}/f.gz"
    _, used = download_from(
        [refused, http_server.url("/good.gz")], tmp_path / "f.gz", sha256=GOOD_SHA, retries=3
    )
    assert used == http_server.url("/good.gz")
    assert calls.count(refused) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_local_sources_missing_then_file_url(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "f.gz").write_bytes(GOOD)
    sources = [str(tmp_path / "nowhere" / "f.gz"), (mirror / "f.gz").as_uri()]
    dest = tmp_path / "out" / "f.gz"
    _, used = download_from(sources, dest, sha256=GOOD_SHA)
    assert used == sources[1]
    assert dest.read_bytes() == GOOD


def test_corrupt_local_file_is_fatal(tmp_path: Path) -> None:
    (tmp_path / "f.gz").write_bytes(BAD)
    with pytest.raises(ChecksumError, match=f"got {BAD_SHA}"):
        download([str(tmp_path / "f.gz")], tmp_path / "out" / "f.gz", sha256=GOOD_SHA)
    assert leftovers(tmp_path / "out") == []


def test_all_sources_down_suggests_a_mirror(closed_port: int, tmp_path: Path) -> None:
    sources = [f"http://127.0.0.1:{closed_port}/a.gz", f"http://127.0.0.1:{closed_port}/b.gz"]
    with pytest.raises(SourcesExhaustedError) as err:
        download(sources, tmp_path / "f.gz", sha256=GOOD_SHA, retries=1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not fetch f.gz: tried ")
    assert all(f"{s} (connection failed, 2 attempts)" in message for s in sources)
    assert message.endswith(MIRROR_HINT)
    assert "DLPIPE_DATA_MIRROR" in message
    assert leftovers(tmp_path) == []


def test_no_hint_when_a_local_mirror_was_tried(closed_port: int, tmp_path: Path) -> None:
    sources = [str(tmp_path / "missing.gz"), f"http://127.0.0.1:{closed_port}/a.gz"]
    with pytest.raises(SourcesExhaustedError) as err:
        download(sources, tmp_path / "f.gz", sha256=GOOD_SHA, retries=0)
    assert f"{sources[0]} (not found)" in str(err.value)
    assert "DLPIPE_DATA_MIRROR" not in str(err.value)


def test_existing_good_file_is_kept_and_bad_one_replaced(
    http_server: Server, closed_port: int, tmp_path: Path
) -> None:
    dest = tmp_path / "f.gz"
    dest.write_bytes(GOOD)
    _, used = download_from([f"http://127.0.0.1:{closed_port}/f.gz"], dest, sha256=GOOD_SHA)
    assert used == "cached"
    dest.write_bytes(BAD)
    http_server.serve("/good.gz", GOOD)
    download([http_server.url("/good.gz")], dest, sha256=GOOD_SHA)
    assert dest.read_bytes() == GOOD
