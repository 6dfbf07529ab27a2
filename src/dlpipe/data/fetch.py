"""The fetch stage's work: every dataset whose format downloads (the built-ins) into
data/raw/<name>; a user's own files are read where their `path` says, and not copied.

A data mirror (`DLPIPE_DATA_MIRROR`: a folder or URL base holding one folder per dataset,
named as the dataset) is tried before the canonical URLs, so the pipeline runs offline. Every file
goes through the download cache (`.dlpipe/downloads`, see `download`) and is checked against the
pinned checksums of its format, so a second fetch downloads nothing. All outputs are built in a
temp folder inside `out_dir` and each is swapped in only once all are complete, so a failed or
interrupted fetch never leaves partial data for DVC to cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlpipe.config import FetchConfig, Params
from dlpipe.data.download import is_url, local_path
from dlpipe.datasets import DatasetFormat, FetchContext, get_format
from dlpipe.errors import DlpipeError
from dlpipe.io import write_json_atomic
from dlpipe.paths import project_root, resolve_from_root

FETCHED_FILE = "fetched.json"


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


def fetched_datasets(params: Params, out_dir: Path) -> dict[str, DatasetFormat]:
    """{name: format} of the datasets the fetch stage downloads, each checked to live at
    `out_dir/<name>`, where the fetch writes it."""
    found = {}
    for name, entry in params.datasets.items():
        fmt = get_format(entry.format)
        if fmt.fetch is None:
            continue
        if Path(entry.path) != out_dir / name:
            raise DlpipeError(
                f"{params.source}: datasets.{name}.path: the fetch stage writes {fmt.name} to "
                f"{out_dir / name}; set path: {out_dir / name}"
            )
        found[name] = fmt
    return found


def fetch_all(
    out_dir: Path,
    cfg: FetchConfig,
    mirror: str | None,
    datasets: Mapping[str, DatasetFormat],
    *,
    sources: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Write `out_dir/<name>` for each of `datasets` with its format's fetch; return a summary.

    Each `out_dir/<name>` is replaced only after everything is downloaded and verified; on any
    failure they are left as they were and the temp folder is removed.
    """
    out_dir = Path(out_dir)
    context = FetchContext(
        cfg, resolve_mirror(mirror), cache_dir or default_cache_dir(), dict(sources or {})
    )
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Inside out_dir, so the renames below stay on one file system.
    build = Path(tempfile.mkdtemp(prefix=".fetch-", dir=out_dir))
    try:
        summary = {}
        for name, fmt in datasets.items():
            assert fmt.fetch is not None
            summary[name] = fmt.fetch(build / name, context)
        for name in summary:
            _swap_into_place(build / name, out_dir / name)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # only while empty: never anyone else's files
                out_dir.rmdir()
        raise
    shutil.rmtree(build, ignore_errors=True)  # with the replaced outputs, moved aside into it
    for name, info in summary.items():
        info["dir"] = str(out_dir / name)
    # What this fetch wrote, file by file: the stage's record, and never an empty output (a
    # project of the user's own datasets alone downloads nothing).
    fetched = {
        name: {"format": fmt.name, "files": summary[name]["files"]}
        for name, fmt in datasets.items()
    }
    write_json_atomic(out_dir / FETCHED_FILE, {"datasets": fetched})
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
