"""Per-epoch checkpoints that let an interrupted training stage pick up where it stopped.

They live outside DVC's outputs (DVC deletes outputs before rerunning a stage), in a folder named
by a hash of everything that defines the training: its params, the digest of its data and the
digest of its code. A changed config, data or model/trainer code therefore never resumes from a
stale checkpoint.

Beside `last.pt`, `last.pt.sha256` holds its checksum. A checkpoint that does not match it (a
flipped byte, a bad copy) or does not load is never resumed: it is moved to
`.dlpipe/checkpoints/corrupt/` with a one-line warning and the training starts from scratch. A
night's training lost is bad; a stage that stops until someone deletes a file, or a model resumed
from weights nobody wrote, is worse.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dlpipe.integrity import sha256_hex
from dlpipe.io import atomic_path

if TYPE_CHECKING:
    from dlpipe.family import Family

CHECKPOINT_FILE = "last.pt"
CHECKSUM_FILE = "last.pt.sha256"
CORRUPT_FOLDER = "corrupt"  # beside the checkpoint folders: kept when a training clears its own


def code_digest(family: Family) -> str:
    """sha256 over the source that defines a training: the family's module, its input kind's
    module and the dlpipe.training package, so that an edit to any of them (even one that keeps
    the weights' shapes) never resumes weights trained by the old code."""
    modules = [f"dlpipe.models.{family.name}", type(family.inputs).__module__, "dlpipe.training"]
    digest = hashlib.sha256()
    for name in modules:
        source = Path(str(importlib.import_module(name).__file__))
        files = sorted(source.parent.rglob("*.py")) if source.name == "__init__.py" else [source]
        for file in files:
            digest.update(f"{name}:{file.relative_to(source.parent)}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def training_key(model: str, settings: dict[str, Any], data_digest: str, code: str) -> str:
    blob = json.dumps(
        {"model": model, "settings": settings, "data": data_digest, "code": code}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CheckpointStore:
    """One folder holding the latest checkpoint of one training configuration."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / CHECKPOINT_FILE
        self.checksum = folder / CHECKSUM_FILE

    def load(self) -> dict[str, Any] | None:
        """The checkpoint, or None when there is none or it cannot be trusted (then moved aside,
        with a warning)."""
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        if not self.checksum.is_file():
            problem = f"has no {CHECKSUM_FILE}"
        elif sha256_hex(data) not in self._listed():
            problem = "is corrupted (checksum mismatch)"
        else:
            try:
                state: dict[str, Any] = torch.load(
                    io.BytesIO(data), map_location="cpu", weights_only=True
                )
                return state
            except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError, ...
                problem = f"does not load ({(str(err).splitlines() or [type(err).__name__])[0]})"
        aside = self._move_aside()
        print(
            f"warning: checkpoint {self.path} {problem}; moved to {aside}, training from scratch",
            file=sys.stderr,
        )
        return None

    def save(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        digest = sha256_hex(data)
        # While last.pt is replaced the checksum file lists the old and the new checksum: an
        # interruption between the two writes leaves a last.pt that matches one of them.
        self._write_checksums([digest, *self._listed()])
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(data)
        self._write_checksums([digest])

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _listed(self) -> list[str]:
        try:
            return self.checksum.read_text(encoding="ascii").split()
        except (OSError, UnicodeDecodeError):
            return []

    def _write_checksums(self, digests: list[str]) -> None:
        with atomic_path(self.checksum) as tmp:
            tmp.write_text("".join(f"{d}\n" for d in dict.fromkeys(digests)), encoding="ascii")

    def _move_aside(self) -> Path:
        """The untrusted checkpoint, kept for inspection where no training resumes or clears it."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self.folder.parent / CORRUPT_FOLDER / f"{self.folder.name}-{stamp}.pt"
        aside.parent.mkdir(parents=True, exist_ok=True)
        self.path.replace(aside)
        self.checksum.unlink(missing_ok=True)
        return aside
