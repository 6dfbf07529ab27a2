"""The fetch stage's work: MNIST's four files and the IMDB reviews into data/raw/{mnist,imdb}.

A data mirror (`DLPIPE_DATA_MIRROR`: a folder or URL base holding mnist/ and imdb/) is tried
before the canonical URLs, so the pipeline runs offline. Every file goes through the download
cache (`.dlpipe/downloads`, see `download`) and is checked against the pinned checksums in
`sources`, so a second fetch downloads nothing. Both outputs are built in a temp folder inside
`out_dir` and each is swapped in only once both are complete, so a failed or interrupted fetch
never leaves partial data for DVC to cache; anything else in `out_dir` is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from dlpipe.config import FetchConfig
from dlpipe.data.archive import SPLIT_FOLDERS, read_aclimdb_archive, read_imdb_csv
from dlpipe.data.download import SourcesExhaustedError, fetch_file, is_url, local_path
from dlpipe.data.sources import DEFAULT_SOURCES, Sources
from dlpipe.errors import DlpipeError
from dlpipe.paths import project_root, resolve_from_root

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where verified downloads are kept between runs (outside any DVC temp copy)."""
    return project_root() / ".dlpipe" / "downloads"


def resolve_mirror(mirror: str | None) -> str | None:
    """The mirror as an absolute folder or a URL base without trailing slash; None when unset."""
    if not mirror:
        return None
    if is_url(mirror):
        return mirror.rstrip("/")
    path = local_path(mirror)
    if path is None:
        raise DlpipeError(f"DLPIPE_DATA_MIRROR={mirror}: use a folder or an http(s) URL")
    folder = Path(resolve_from_root(str(path)))
    if not folder.is_dir():
        raise DlpipeError(f"DLPIPE_DATA_MIRROR={mirror}: no such folder ({folder})")
    return str(folder)


def fetch_all(
    out_dir: Path,
    cfg: FetchConfig,
    mirror: str | None,
    *,
    sources: Sources = DEFAULT_SOURCES,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Write `out_dir/mnist/*.gz` and `out_dir/imdb/{train,test,unsup}.parquet`; return a summary.

    `out_dir/mnist` and `out_dir/imdb` are replaced only after everything is downloaded and
    verified; on any failure they are left as they were and the temp folder is removed.
    """
    out_dir = Path(out_dir)
    base = resolve_mirror(mirror)
    cache = cache_dir or default_cache_dir()
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Inside out_dir, so the renames below stay on one file system.
    build = Path(tempfile.mkdtemp(prefix=".fetch-", dir=out_dir))
    try:
        summary = {
            "mnist": _fetch_mnist(build / "mnist", cfg, base, sources, cache),
            "imdb": _fetch_imdb(build / "imdb", cfg, base, sources, cache),
        }
        for dataset in summary:
            _swap_into_place(build / dataset, out_dir / dataset)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # only while empty: never anyone else's files
                out_dir.rmdir()
        raise
    shutil.rmtree(build, ignore_errors=True)  # with the replaced outputs, moved aside into it
    for dataset, info in summary.items():
        info["dir"] = str(out_dir / dataset)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """One human line per dataset, for the stage's output."""
    lines = []
    for dataset, info in summary.items():
        rows = info.get("rows")
        counts = f" ({', '.join(f'{k} {v:,}' for k, v in rows.items())} rows)" if rows else ""
        lines.append(
            f"{dataset}: {len(info['files'])} files{counts}, {info['bytes'] / 1e6:.1f} MB "
            f"in {info['dir']}, from {info['origin']}, {info['seconds']:.2f}s"
        )
    return lines


def _in_mirror(mirror: str, *parts: str) -> str:
    return "/".join([mirror, *parts]) if is_url(mirror) else str(Path(mirror, *parts))


def _origin(used: dict[str, str], mirror: str | None) -> str:
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


def _fetch_mnist(
    folder: Path, cfg: FetchConfig, mirror: str | None, sources: Sources, cache_dir: Path
) -> dict[str, Any]:
    start = time.perf_counter()
    folder.mkdir()
    used: dict[str, str] = {}
    for remote in sources.mnist_files:
        candidates = [_in_mirror(mirror, "mnist", remote.name)] if mirror else []
        candidates += [f"{url.rstrip('/')}/{remote.name}" for url in sources.mnist_url_bases]
        cached, used[remote.name] = fetch_file(candidates, remote, cache_dir, cfg)
        shutil.copyfile(cached, folder / remote.name)
    files = {name: (folder / name).stat().st_size for name in used}
    return {
        "files": files,
        "bytes": sum(files.values()),
        "sources": used,
        "origin": _origin(used, mirror),
        "seconds": time.perf_counter() - start,
    }


def _fetch_imdb(
    folder: Path, cfg: FetchConfig, mirror: str | None, sources: Sources, cache_dir: Path
) -> dict[str, Any]:
    start = time.perf_counter()
    frames: dict[str, pd.DataFrame] | None = None
    used: dict[str, str] = {}
    if mirror and sources.imdb_csv_files:
        frames, used = _imdb_from_csv(cfg, mirror, sources, cache_dir)
    if frames is None:
        remote = sources.imdb_archive
        candidates = [_in_mirror(mirror, "imdb", remote.name)] if mirror else []
        candidates += list(sources.imdb_archive_urls)
        archive, used[remote.name] = fetch_file(candidates, remote, cache_dir, cfg)
        frames = read_aclimdb_archive(archive)
    folder.mkdir()
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
        "origin": _origin(used, mirror),
        "seconds": time.perf_counter() - start,
    }


def _imdb_from_csv(
    cfg: FetchConfig, mirror: str, sources: Sources, cache_dir: Path
) -> tuple[dict[str, pd.DataFrame] | None, dict[str, str]]:
    """The frames from the mirror's CSV export, or None when the mirror has no (complete) export.

    A missing file falls back to the archive; a corrupt one is fatal like any checksum error.
    """
    splits = {remote.name.split(".", 1)[0]: remote for remote in sources.imdb_csv_files}
    if set(splits) != set(SPLIT_FOLDERS):
        raise ValueError(f"imdb_csv_files must be one per split {sorted(SPLIT_FOLDERS)}")
    paths: dict[str, Path] = {}
    used: dict[str, str] = {}
    try:
        for split, remote in splits.items():
            source = _in_mirror(mirror, "imdb", remote.name)
            paths[split], used[remote.name] = fetch_file([source], remote, cache_dir, cfg)
    except SourcesExhaustedError:
        log.warning("mirror %s has no complete IMDB CSV export; using aclImdb_v1.tar.gz", mirror)
        return None, {}
    return {split: read_imdb_csv(paths[split], split) for split in SPLIT_FOLDERS}, used


def _swap_into_place(new: Path, dest: Path) -> None:
    """Replace the folder `dest` by `new`; the old one is moved aside beside `new` (and back if the
    move in fails), so `dest` is at no time a mix of old and new files."""
    if not (dest.exists() or dest.is_symlink()):
        os.rename(new, dest)
        return
    aside = new.with_name(f"{new.name}.old")
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
