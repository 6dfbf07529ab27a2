"""fetch_file(): pooch's verified cache, fallback across sources, retries, one-line failures."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pooch.core
import pytest
import requests
from support.servers import Route

from dlpipe.config import FetchConfig
from dlpipe.data.download import (
    MIRROR_HINT,
    ChecksumError,
    RemoteFile,
    SourcesExhaustedError,
    fetch_file,
)

if TYPE_CHECKING:
    from support.servers import Server

GOOD = b"the real bytes " * 1000
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
BAD = GOOD[:-1] + b"!"
BAD_SHA = hashlib.sha256(BAD).hexdigest()
FILE = RemoteFile("f.gz", GOOD_SHA)


def cfg(retries: int = 1) -> FetchConfig:
    return FetchConfig(connect_timeout_s=1.0, read_timeout_s=1.0, retries=retries)


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """pooch's waits between retries, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(pooch.core, "time", SimpleNamespace(sleep=waits.append))
    return waits


class Sequenced(dict[str, list[Route]]):
    """Routes for the shared test server whose answers change: each request takes the next one
    of its path's list, and the last one repeats."""

    def get(self, path: str, default: Any = None) -> Any:
        answers = super().get(path)
        if answers is None:
            return default
        return answers.pop(0) if len(answers) > 1 else answers[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_http_download_verifies_and_lands_in_the_cache(http_server: Server, tmp_path: Path) -> None:
    url = http_server.serve("/good.gz", GOOD)
    path, used = fetch_file([url], FILE, tmp_path / "cache", cfg())
    assert (path, used) == (tmp_path / "cache" / "f.gz", url)
    assert path.read_bytes() == GOOD
    assert leftovers(tmp_path / "cache") == ["f.gz"]


def test_asks_for_the_published_bytes_with_the_configured_timeouts(
    http_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    real_get = requests.get

    def get(url: str, **kwargs: Any) -> requests.Response:
        calls.append(kwargs)
        return real_get(url, **kwargs)

    monkeypatch.setattr(requests, "get", get)
    config = FetchConfig(connect_timeout_s=2.5, read_timeout_s=7.0, retries=0)
    fetch_file([http_server.serve("/good.gz", GOOD)], FILE, tmp_path / "cache", config)
    [kwargs] = calls
    assert kwargs["timeout"] == (2.5, 7.0)
    # The checksums are of the bytes as published, never of a re-encoding.
    assert kwargs["headers"] == {"Accept-Encoding": "identity"}


def test_checksum_mismatch_is_fatal_and_leaves_nothing(
    http_server: Server, tmp_path: Path, sleeps: list[float]
) -> None:
    sources = [http_server.serve("/bad.gz", BAD), http_server.serve("/good.gz", GOOD)]
    with pytest.raises(ChecksumError) as err:
        fetch_file(sources, FILE, tmp_path / "cache", cfg(retries=1))
    assert str(err.value) == (
        f"checksum mismatch for f.gz from {sources[0]}: expected sha256 {GOOD_SHA}, got {BAD_SHA}"
    )
    assert http_server.hits["/bad.gz"] == 2, "pooch retries a mismatch once with retries=1"
    assert sleeps == [1]
    assert http_server.hits["/good.gz"] == 0, "a corrupt source must not fall through"
    assert leftovers(tmp_path / "cache") == []


def test_dropped_connection_is_retried_and_the_full_body_kept(
    http_server: Server, tmp_path: Path
) -> None:
    http_server.routes = Sequenced({"/f.gz": [Route(GOOD[:1000], length=len(GOOD)), Route(GOOD)]})
    url = http_server.url("/f.gz")
    path, used = fetch_file([url], FILE, tmp_path / "cache", cfg(retries=1))
    assert (used, path.read_bytes()) == (url, GOOD)
    assert http_server.hits["/f.gz"] == 2


def test_truncated_body_is_never_accepted(http_server: Server, tmp_path: Path) -> None:
    short = http_server.serve("/short.gz", GOOD[:1000], length=len(GOOD))
    with pytest.raises(SourcesExhaustedError) as err:
        fetch_file([short], FILE, tmp_path / "cache", cfg(retries=2))
    assert str(err.value) == (
        f"could not fetch f.gz: tried {short} "
        f"(connection dropped mid-download: truncated body, 3 attempts); {MIRROR_HINT}"
    )
    assert http_server.hits["/short.gz"] == 3
    assert leftovers(tmp_path / "cache") == []


def test_truncated_source_falls_back_after_its_retries(http_server: Server, tmp_path: Path) -> None:
    sources = [
        http_server.serve("/short.gz", GOOD[:1000], length=len(GOOD)),
        http_server.serve("/good.gz", GOOD),
    ]
    _, used = fetch_file(sources, FILE, tmp_path / "cache", cfg(retries=1))
    assert used == sources[1]
    assert http_server.hits["/short.gz"] == 2


def test_404_falls_back_without_retrying(http_server: Server, tmp_path: Path) -> None:
    sources = [http_server.url("/missing.gz"), http_server.serve("/good.gz", GOOD)]
    _, used = fetch_file(sources, FILE, tmp_path / "cache", cfg(retries=3))
    assert used == sources[1]
    assert http_server.hits["/missing.gz"] == 1


def test_server_error_is_retried_then_falls_back(
    http_server: Server, tmp_path: Path, sleeps: list[float]
) -> None:
    sources = [http_server.serve("/flaky.gz", b"oops", status=503), http_server.url("/good.gz")]
    http_server.serve("/good.gz", GOOD)
    _, used = fetch_file(sources, FILE, tmp_path / "cache", cfg(retries=2))
    assert used == sources[1]
    assert http_server.hits["/flaky.gz"] == 3
    assert sleeps == [1, 2]


def test_all_sources_down_suggests_a_mirror(
    closed_port: int, tmp_path: Path, sleeps: list[float]
) -> None:
    sources = [f"http://127.0.0.1:{closed_port}/a.gz", f"http://127.0.0.1:{closed_port}/b.gz"]
    with pytest.raises(SourcesExhaustedError) as err:
        fetch_file(sources, FILE, tmp_path / "cache", cfg(retries=3))
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"could not fetch f.gz: tried {sources[0]} (connection failed, 4 attempts); "
        f"{sources[1]} (connection failed, 4 attempts); {MIRROR_HINT}"
    )
    assert sleeps == [1, 2, 3] * 2
    assert leftovers(tmp_path / "cache") == []


def test_local_sources_missing_then_file_url(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "f.gz").write_bytes(GOOD)
    sources = [str(tmp_path / "nowhere" / "f.gz"), (mirror / "f.gz").as_uri()]
    path, used = fetch_file(sources, FILE, tmp_path / "cache", cfg())
    assert used == sources[1]
    assert path.read_bytes() == GOOD


def test_corrupt_local_file_is_fatal_at_once(tmp_path: Path, sleeps: list[float]) -> None:
    (tmp_path / "f.gz").write_bytes(BAD)
    with pytest.raises(ChecksumError, match=f"expected sha256 {GOOD_SHA}, got {BAD_SHA}$"):
        fetch_file([str(tmp_path / "f.gz")], FILE, tmp_path / "cache", cfg(retries=3))
    assert sleeps == [], "a local copy is not retried"
    assert leftovers(tmp_path / "cache") == []


def test_no_hint_when_a_local_mirror_was_tried(tmp_path: Path) -> None:
    sources = [str(tmp_path / "missing.gz"), "ftp://example.invalid/f.gz"]
    with pytest.raises(SourcesExhaustedError) as err:
        fetch_file(sources, FILE, tmp_path / "cache", cfg(retries=0))
    assert str(err.value) == (
        f"could not fetch f.gz: tried {sources[0]} (not found); "
        f"{sources[1]} (unsupported URL scheme)"
    )


def test_cached_file_is_kept_and_a_bad_one_replaced(
    http_server: Server, closed_port: int, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "f.gz").write_bytes(GOOD)
    _, used = fetch_file([f"http://127.0.0.1:{closed_port}/f.gz"], FILE, cache, cfg())
    assert used == "cached"
    (cache / "f.gz").write_bytes(BAD)
    url = http_server.serve("/good.gz", GOOD)
    path, used = fetch_file([url], FILE, cache, cfg())
    assert (used, path.read_bytes()) == (url, GOOD)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_only_on_a_terminal(
    http_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tty: bool
) -> None:
    stderr = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    fetch_file([http_server.serve("/good.gz", GOOD)], FILE, tmp_path / "cache", cfg())
    assert ("100%" in stderr.getvalue()) is tty
