"""Per-epoch checkpoints that let an interrupted training stage pick up where it stopped.

They live outside DVC's outputs (DVC deletes outputs before rerunning a stage), in a folder named
by a hash of everything that defines the training: its params and the digest of its data. A changed
config therefore never resumes from a stale checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from dlpipe.io import atomic_path

CHECKPOINT_FILE = "last.pt"
# Part of every training key: a checkpoint of another layout is never read (2: per-process RNG
# states and the loss scaler, for data-parallel training).
CHECKPOINT_FORMAT = 2


def file_digest(paths: list[Path]) -> str:
    """sha256 over the named files' bytes, in order: the identity of a prepared dataset."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def training_key(model: str, settings: dict[str, Any], data_digest: str) -> str:
    blob = json.dumps(
        {"model": model, "settings": settings, "data": data_digest, "format": CHECKPOINT_FORMAT},
        sort_keys=True,
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
