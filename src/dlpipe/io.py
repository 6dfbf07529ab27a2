"""Atomic writes: an output is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest` that replaces it only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: Path) -> Any:
    """A JSON file written by an earlier stage; a missing or broken one is a user-level error."""
    from dlpipe.errors import DlpipeError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DlpipeError(f"{path}: missing; run the earlier stages first (dvc repro)") from None
    except json.JSONDecodeError as err:
        raise DlpipeError(f"{path}: not valid JSON ({err})") from None


def write_json_atomic(dest: Path, payload: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_npz_atomic(dest: Path, **arrays: np.ndarray) -> None:
    with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy stub: **kwargs vs allow_pickle


def read_user_file(path: Path) -> bytes:
    """A file the user named; missing, unreadable or not a regular file is a user-level error."""
    from dlpipe.errors import DlpipeError

    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DlpipeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DlpipeError(f"{path}: is a directory, not a file") from None
    except OSError as err:
        raise DlpipeError(f"{path}: cannot read ({err.strerror or err})") from None
