"""Checksums of the files one stage hands to the next: a flipped byte is an error, not an answer.

A stage that writes a folder of outputs (prepare: `data/prepared/<dataset>`; train:
`data/models/<name>`) lists the sha256 of each file in `SHA256SUMS` beside them, in the format of
`sha256sum` (so `sha256sum -c SHA256SUMS` checks a folder by hand). Readers take a file's bytes
through `read_verified`, which hashes exactly the bytes it returns: a file changed after it was
written (bit rot, a bad copy, an edit) stops the reader with one line naming the file and the
stage to rerun. A zip's CRC (npz) catches some of this, torch.load of a flipped weight nothing.

The manifest is written last, after every file it lists, and the prepare stage removes the old one
first: where it is required, a folder whose writer was interrupted is never taken as complete.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from dlpipe.errors import DlpipeError
from dlpipe.io import atomic_path

MANIFEST = "SHA256SUMS"
_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, digests: Mapping[str, str]) -> Path:
    """`folder/SHA256SUMS` listing `digests` (file name -> sha256 hex), written atomically."""
    path = folder / MANIFEST
    with atomic_path(path) as tmp:
        tmp.write_text(
            "".join(f"{digests[name]}  {name}\n" for name in sorted(digests)), encoding="utf-8"
        )
    return path


def write_manifest_of(folder: Path, names: Iterable[str]) -> Path:
    """The manifest of the named files as they are on disk now (call it after writing them)."""
    return write_manifest(folder, {name: file_sha256(folder / name) for name in names})


def seal(folder: Path) -> Path:
    """The manifest of every file in `folder` (not hidden ones: temporary files), once a stage
    has written them all."""
    names = [
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST
    ]
    return write_manifest_of(folder, names)


def remove_manifest(folder: Path) -> None:
    """Before rewriting a folder: until the new manifest is written, it is not complete."""
    (folder / MANIFEST).unlink(missing_ok=True)


def read_manifest(folder: Path, rerun: str) -> dict[str, str] | None:
    """File name -> sha256 from `folder/SHA256SUMS`; None when there is none."""
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise DlpipeError(f"{path}: unreadable ({err}); rerun `{rerun}`") from None
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _LINE.fullmatch(line)
        if match is None:
            raise DlpipeError(f"{path}: line {number} is not `<sha256>  <file>`; rerun `{rerun}`")
        digests[match[2]] = match[1]
    return digests


def read_verified(path: Path, rerun: str, *, required: bool = True) -> bytes:
    """The bytes of `path`, checked against the SHA256SUMS of its folder.

    `rerun` is the command that rewrites the folder (`dvc repro prepare@<dataset>`). Without a
    manifest the file is an error when `required` (its writer did not finish, or predates
    checksums), else returned unchecked (models logged before checksums existed)."""
    expected = _listed_digest(path, rerun, required)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DlpipeError(f"{path}: missing; rerun `{rerun}`") from None
    _check(path, expected, sha256_hex(data), rerun)
    return data


def verify_file(path: Path, rerun: str) -> None:
    """`read_verified` for a file too big to hold in memory (a prepared split, which its reader
    then memory-maps): hashed a block at a time, nothing kept."""
    expected = _listed_digest(path, rerun, required=True)
    try:
        digest = file_sha256(path)
    except FileNotFoundError:
        raise DlpipeError(f"{path}: missing; rerun `{rerun}`") from None
    _check(path, expected, digest, rerun)


def _listed_digest(path: Path, rerun: str, required: bool) -> str | None:
    folder = path.parent
    digests = read_manifest(folder, rerun)
    if digests is None:
        if required:
            raise DlpipeError(
                f"{folder / MANIFEST}: missing (the stage writing {folder} did not finish, or "
                f"predates checksums); rerun `{rerun}`"
            )
        return None
    if path.name not in digests and path.exists():
        raise DlpipeError(f"{path}: not listed in {folder / MANIFEST}; rerun `{rerun}`")
    return digests.get(path.name)


def _check(path: Path, expected: str | None, digest: str, rerun: str) -> None:
    if expected is not None and digest != expected:
        raise DlpipeError(f"{path}: checksum mismatch (file corrupted or edited); rerun `{rerun}`")


def verify_listed(folder: Path, rerun: str, skip_suffix: str) -> None:
    """Check every file the manifest lists except those ending in `skip_suffix` (the big ones,
    which their reader checks as it reads them)."""
    for name in read_manifest(folder, rerun) or {}:
        if not name.endswith(skip_suffix):
            read_verified(folder / name, rerun)


def listed_digest(folder: Path, names: Iterable[str], rerun: str) -> str:
    """One sha256 for the named files of `folder`, made from the sha256s its SHA256SUMS lists
    (the files' readers check their bytes against them): the files' identity without reading
    them a second time."""
    digests = read_manifest(folder, rerun) or {}
    lines = []
    for name in names:
        if name not in digests:
            listed = folder / MANIFEST
            raise DlpipeError(f"{folder / name}: not listed in {listed}; rerun `{rerun}`")
        lines.append(f"{digests[name]}  {name}\n")
    return sha256_hex("".join(lines).encode())
