"""Verified downloads: try each source in turn and never leave a partial or unverified file.

A source that cannot deliver (missing file, refused connection, HTTP error, timeout) is skipped,
after retries with backoff where the failure may be transient. Bytes that do arrive but hash wrong,
or stop short of their Content-Length, end everything at once: trying elsewhere would paper over
a broken or tampered mirror.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from dlpipe.errors import DlpipeError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
BACKOFF_BASE_S = 0.5  # retry k (0-based) sleeps BACKOFF_BASE_S * 2**k; tests set it to 0
MIRROR_HINT = (
    "no network? set DLPIPE_DATA_MIRROR to a folder holding mnist/ and imdb/ "
    "(e.g. DLPIPE_DATA_MIRROR=/path/to/shared/datasets)"
)


class IntegrityError(DlpipeError):
    """Bytes arrived but are not the expected ones; fatal, never retried elsewhere."""


class ChecksumError(IntegrityError):
    """The content hashes differently from the pinned checksum."""


class TruncatedError(IntegrityError):
    """The server sent fewer bytes than its Content-Length announced."""


class SourcesExhaustedError(DlpipeError):
    """No source could deliver the file (missing, unreachable, HTTP error)."""


class _Unavailable(Exception):
    """This source cannot deliver the file; `transient` failures are worth a retry."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


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


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give; mkstemp/mkdtemp use owner-only ones."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    sources: Sequence[str],
    dest: Path,
    *,
    sha256: str,
    md5: str | None = None,
    connect_timeout_s: float = 10.0,
    read_timeout_s: float = 60.0,
    retries: int = 3,
    desc: str | None = None,
) -> Path:
    """Put the file with this checksum at `dest`, from the first source that has it."""
    path, _ = download_from(
        sources,
        dest,
        sha256=sha256,
        md5=md5,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
        retries=retries,
        desc=desc,
    )
    return path


def download_from(
    sources: Sequence[str],
    dest: Path,
    *,
    sha256: str,
    md5: str | None = None,
    connect_timeout_s: float = 10.0,
    read_timeout_s: float = 60.0,
    retries: int = 3,
    desc: str | None = None,
) -> tuple[Path, str]:
    """`download`, also saying which source delivered ("cached" when `dest` was already right)."""
    dest = Path(dest)
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest, "cached"
    dest.parent.mkdir(parents=True, exist_ok=True)
    timeouts = (connect_timeout_s, read_timeout_s)
    tried: list[str] = []
    for source in sources:
        attempts = retries + 1 if is_url(source) else 1
        for attempt in range(attempts):
            try:
                _fetch_one(source, dest, sha256, md5, timeouts, desc or dest.name)
                return dest, source
            except _Unavailable as err:
                if err.transient and attempt + 1 < attempts:
                    delay = BACKOFF_BASE_S * 2**attempt
                    log.warning("%s: %s from %s; retrying in %.1fs", dest.name, err, source, delay)
                    time.sleep(delay)
                    continue
                note = f", {attempt + 1} attempts" if attempt else ""
                tried.append(f"{source} ({err.reason}{note})")
                log.warning("%s: %s unavailable (%s)", dest.name, source, err.reason)
                break
    hint = "" if any(local_path(s) is not None for s in sources) else f"; {MIRROR_HINT}"
    what = "; ".join(tried) if tried else "no sources given"
    raise SourcesExhaustedError(f"could not fetch {dest.name}: tried {what}{hint}")


def _fetch_one(
    source: str,
    dest: Path,
    sha256: str,
    md5: str | None,
    timeouts: tuple[float, float],
    desc: str,
) -> None:
    """One attempt: stream into a temp file beside `dest`, verify, then move it into place."""
    with _open_source(source, timeouts) as (chunks, length):
        fd, part = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                got_sha, got_md5, size = _copy(chunks, out, length, desc)
            if length is not None and size < length:
                raise TruncatedError(
                    f"truncated download of {dest.name} from {source}: got {size} of {length} "
                    f"bytes (expected sha256 {sha256}, got {got_sha})"
                )
            if got_sha != sha256:
                raise ChecksumError(
                    f"checksum mismatch for {dest.name} from {source}: "
                    f"expected sha256 {sha256}, got {got_sha}"
                )
            if md5 is not None and got_md5 != md5:
                raise ChecksumError(
                    f"checksum mismatch for {dest.name} from {source}: "
                    f"expected md5 {md5}, got {got_md5}"
                )
            os.chmod(part, default_mode())
            os.replace(part, dest)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise


def _copy(
    chunks: Iterable[bytes], out: IO[bytes], length: int | None, desc: str
) -> tuple[str, str, int]:
    """Write chunks to `out`, hashing as they pass; returns (sha256, md5, byte count)."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    size = 0
    with tqdm(
        total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None
    ) as bar:
        try:
            for chunk in chunks:
                out.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        except (urllib3.exceptions.ReadTimeoutError, requests.Timeout):
            raise _Unavailable("read timed out", transient=True) from None
        except (urllib3.exceptions.HTTPError, requests.RequestException):
            # The connection broke mid-body. With a known length this is a truncated body, which
            # the caller reports as fatal from the byte count; without one it is just a failure.
            if length is None:
                raise _Unavailable("connection broken", transient=True) from None
    return sha.hexdigest(), md5.hexdigest(), size


def _read_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    """A local file's chunks; a read error makes the source unavailable (a write error does not)."""
    try:
        yield from iter(lambda: fh.read(CHUNK_BYTES), b"")
    except OSError as err:
        raise _Unavailable(err.strerror or type(err).__name__) from None


@contextmanager
def _open_source(
    source: str, timeouts: tuple[float, float]
) -> Iterator[tuple[Iterable[bytes], int | None]]:
    """The source's bytes as chunks, and its announced length when known."""
    path = local_path(source)
    if path is not None:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise _Unavailable("not found") from None
        except OSError as err:
            raise _Unavailable(err.strerror or type(err).__name__) from None
        with fh:
            yield _read_chunks(fh), os.fstat(fh.fileno()).st_size
        return
    if not is_url(source):
        raise _Unavailable("unsupported URL scheme")
    try:
        # identity: the checksums are of the bytes as published, never of a re-encoding.
        resp = requests.get(
            source, stream=True, timeout=timeouts, headers={"Accept-Encoding": "identity"}
        )
    except requests.Timeout:
        raise _Unavailable("timed out", transient=True) from None
    except requests.ConnectionError:
        raise _Unavailable("connection failed", transient=True) from None
    except requests.RequestException as err:
        raise _Unavailable(type(err).__name__) from None
    with resp:
        if resp.status_code >= 400:
            code = resp.status_code
            raise _Unavailable(f"HTTP {code}", transient=code >= 500 or code == 429)
        header = resp.headers.get("Content-Length")
        length = int(header) if header and header.isdigit() else None
        yield resp.raw.stream(CHUNK_BYTES, decode_content=False), length
