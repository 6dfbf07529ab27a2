"""Per-epoch checkpoints that let an interrupted training stage pick up where it stopped.

They live outside DVC's outputs (DVC deletes outputs before rerunning a stage), in a folder named
by a hash of everything that defines the training: its params, the digest of its data and the
digest of its code. A changed config, data or model/trainer code therefore never resumes from a
stale checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dlpipe.io import atomic_path

if TYPE_CHECKING:
    from dlpipe.family import Family

CHECKPOINT_FILE = "last.pt"


def file_digest(paths: list[Path]) -> str:
    """sha256 over the named files' bytes, in order: the identity of a prepared dataset."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


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

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        return state

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
