"""Pinned, verified downloads with pooch, each file tried from several sources in turn.

pooch keeps the files in a cache folder and checks every one against its pinned sha256, a cached
one too before reusing it. It downloads into a temp file beside the cached one and moves that into
place only once verified, so no partial or unverified file ever carries the final name. It retries
what may be transient `retries` times, waiting 1 s, 2 s, ...: connection errors, timeouts, HTTP
5xx, a body cut short of its Content-Length (urllib3 raises on it) and checksum mismatches. It
draws tqdm progress bars and logs each download.

What pooch lacks is kept here:
- several sources per file, tried in order (a pooch object knows one URL per file). A source that
  does not have the file (HTTP 4xx, missing local file) is skipped at once, as retrying cannot help;
  one that keeps failing is skipped after its retries; a checksum mismatch that persists ends
  everything: trying elsewhere would paper over a broken or tampered mirror.
- local folders as sources: pooch downloads only over HTTP(S), FTP, SFTP and DOI.
- one-line `DlpipeError`s in place of pooch's and requests' exceptions.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pooch
import requests

from dlpipe.config import FetchConfig
from dlpipe.errors import DlpipeError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
MIRROR_HINT = (
    "no network? set DLPIPE_DATA_MIRROR to a folder holding one subfolder per dataset "
    "(e.g. DLPIPE_DATA_MIRROR=/path/to/shared/datasets)"
)


@dataclass(frozen=True)
class RemoteFile:
    """A file known by name and sha256 (pooch's `registry` entry for it): the checksums are the
    trust anchor of the pipeline, checked whichever mirror or URL the bytes came from."""

    name: str
    sha256: str


# pooch's downloader interface: (url, temp file to write, the calling pooch object).
Downloader = Callable[[str, str, object], None]


class ChecksumError(DlpipeError):
    """A source delivered bytes that hash differently from the pinned checksum."""


class SourcesExhaustedError(DlpipeError):
    """No source could deliver the file (missing, unreachable, HTTP error, broken connection)."""


class _Unavailable(Exception):
    """This source does not have the file. Not a requests error, so pooch does not retry it."""


def is_url(source: str) -> bool:
    """True for the sources fetched over HTTP(S)."""
    return source.startswith(("http://", "https://"))


def local_path(source: str) -> Path | None:
    """The file a local source names (plain path or file:// URL); None for anything else."""
    if source.startswith("file://"):
        return Path(url2pathname(urlparse(source).path))
    if "://" in source:
        return None
    return Path(source)


def fetch_file(
    sources: Sequence[str], remote: RemoteFile, cache_dir: Path, cfg: FetchConfig
) -> tuple[Path, str]:
    """`cache_dir/<name>` holding exactly `remote`, and where it came from: the source that
    delivered it, or "cached" when the cache already had it."""
    tried: list[str] = []
    for source in sources:
        url = is_url(source)
        pup = pooch.create(
            path=cache_dir,
            base_url="",  # unused: `urls` gives this file's one source
            registry={remote.name: f"sha256:{remote.sha256}"},
            urls={remote.name: source},
            retry_if_failed=cfg.retries if url else 0,  # a local copy has nothing transient
        )
        try:
            action = pup.fetch(
                remote.name,
                downloader=_http_downloader(cfg) if url else _copy_local,
                processor=_action,
            )
        except _Unavailable as err:
            tried.append(f"{source} ({err})")
        except requests.RequestException as err:
            tried.append(f"{source} ({_reason(err)}, {cfg.retries + 1} attempts)")
        except ValueError as err:  # pooch's checksum mismatch (the only ValueError it raises here)
            got = re.search(r"but got (\w+)", str(err))
            detail = f"expected sha256 {remote.sha256}, got {got[1]}" if got else str(err)
            message = f"checksum mismatch for {remote.name} from {source}: {detail}"
            raise ChecksumError(message) from None
        else:
            return cache_dir / remote.name, "cached" if action == "fetch" else source
        log.warning("%s: unavailable from %s", remote.name, tried[-1])
    hint = "" if any(local_path(s) is not None for s in sources) else f"; {MIRROR_HINT}"
    what = "; ".join(tried) if tried else "no sources given"
    raise SourcesExhaustedError(f"could not fetch {remote.name}: tried {what}{hint}")


def _action(path: str, action: str, pup: object) -> str:
    """pooch processor: how the file was got ("fetch" when the cache had it, else "download" or
    "update")."""
    return action


def _http_downloader(cfg: FetchConfig) -> Downloader:
    """pooch's HTTP downloader with our timeouts, a progress bar on a terminal, and HTTP 4xx
    (but 429) as "not here": pooch would retry every HTTP error."""
    inner = pooch.HTTPDownloader(
        progressbar=sys.stderr.isatty(),
        chunk_size=CHUNK_BYTES,
        timeout=(cfg.connect_timeout_s, cfg.read_timeout_s),
        # identity: the checksums are of the bytes as published, never of a re-encoding.
        headers={"Accept-Encoding": "identity"},
    )

    def download(url: str, output_file: str, pup: object) -> None:
        try:
            inner(url, output_file, pup)
        except requests.HTTPError as err:
            code = err.response.status_code if err.response is not None else 0
            if 400 <= code < 500 and code != 429:
                raise _Unavailable(f"HTTP {code}") from None
            raise

    return download


def _copy_local(url: str, output_file: str, pup: object) -> None:
    """pooch downloader for a local file or file:// URL: a copy, which pooch then verifies."""
    path = local_path(url)
    if path is None:
        raise _Unavailable("unsupported URL scheme")
    try:
        shutil.copyfile(path, output_file)
    except FileNotFoundError:
        raise _Unavailable("not found") from None
    except OSError as err:
        raise _Unavailable(err.strerror or type(err).__name__) from None


def _reason(err: requests.RequestException) -> str:
    """A few words for a failure pooch gave up retrying."""
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code}"
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "connection dropped mid-download: truncated body"
    if isinstance(err, requests.Timeout):
        return "timed out"
    if isinstance(err, requests.ConnectionError):
        return "connection failed"
    return type(err).__name__


def in_mirror(mirror: str, *parts: str) -> str:
    """A file's place in the data mirror (a folder or a URL base)."""
    return "/".join([mirror, *parts]) if is_url(mirror) else str(Path(mirror, *parts))


def origin(used: dict[str, str], mirror: str | None) -> str:
    """Where a dataset's files came from, in a word or two."""
    kinds = set()
    for source in used.values():
        if source == "cached":
            kinds.add("download cache")
        elif mirror is not None and source.startswith(mirror):
            kinds.add(f"mirror {mirror}")
        else:
            kinds.add("canonical URL")
    return " + ".join(sorted(kinds))
