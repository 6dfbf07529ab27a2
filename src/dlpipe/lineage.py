"""Where a run came from, as DVC records it: the experiment it belongs to."""

from __future__ import annotations

import os
import re


def experiment_name() -> str | None:
    """The DVC experiment being run (`dvc exp run` sets DVC_EXP_NAME), or None."""
    return os.environ.get("DVC_EXP_NAME") or None


def folder_safe(name: str) -> str:
    """`name` usable as part of a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)
