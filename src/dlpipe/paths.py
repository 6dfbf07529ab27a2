"""Where things live, also when DVC runs a stage in a temporary copy of the repo.

`dvc exp run --temp` and `--queue` execute stages inside `<root>/.dvc/tmp/exps/<name>/`; state that
must outlive such a copy (the MLflow store, training checkpoints) is placed under the real root.
"""

from __future__ import annotations

import os
from pathlib import Path

_DVC_TEMP_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("data/models")
REPORTS_DIR = Path("reports")
MODEL_REPORTS_DIR = REPORTS_DIR / "models"  # one folder per family: train, evaluate


def project_root(cwd: Path | None = None) -> Path:
    """The user's checkout: the working directory, or the repo a DVC temp experiment came from."""
    here = str((cwd or Path.cwd()).resolve())
    if _DVC_TEMP_MARKER in here + os.sep:
        return Path((here + os.sep).split(_DVC_TEMP_MARKER, 1)[0])
    return Path(here)


def resolve_from_root(value: str, cwd: Path | None = None) -> str:
    """A user-given path that may be relative: relative to the project root, not the temp copy."""
    if "://" in value or Path(value).is_absolute():
        return value
    return str((project_root(cwd) / value).resolve())
