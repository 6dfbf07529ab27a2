"""Atomic writes: an output is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


@dataclass(frozen=True)
class Blocks:
    """An array written a block of rows at a time, never whole in memory: its shape, its dtype
    and the blocks (C-ordered rows, in order)."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    blocks: Iterable[np.ndarray]


def write_npz_atomic(dest: Path, **arrays: np.ndarray | Blocks) -> None:
    """np.savez's file, byte for byte (each array an uncompressed `<name>.npy` member, so a
    reader can memory-map it), with `Blocks` streamed into their members."""
    with (
        atomic_path(dest) as tmp,
        open(tmp, "wb") as handle,
        zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                if isinstance(array, Blocks):
                    _write_blocks(member, array, f"{dest}: {name}")
                else:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _write_blocks(member: IO[bytes], array: Blocks, what: str) -> None:
    shape_only = np.broadcast_to(np.zeros((), array.dtype), array.shape)  # no memory
    np.lib.format.write_array_header_1_0(
        member, np.lib.format.header_data_from_array_1_0(shape_only)
    )
    rows = 0
    for block in array.blocks:
        if block.shape[1:] != array.shape[1:]:
            raise ValueError(f"{what}: a block of shape {block.shape}, rows of {array.shape[1:]}")
        member.write(np.ascontiguousarray(block, dtype=array.dtype).tobytes())
        rows += len(block)
    if rows != array.shape[0]:
        raise ValueError(f"{what}: {rows} rows written, {array.shape[0]} declared")


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
