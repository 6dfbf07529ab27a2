"""Where a run came from, as DVC records it: the experiment it belongs to, and the hashes that
dvc.lock holds for its prepared data and its train stage.

These become MLflow tags, so a run leads back to the DVC state that made it (and `dvc exp show`'s
experiment name leads to the run). Everything is read from the working directory, which in a
queued experiment is that experiment's own copy, and is optional: a stage run outside DVC, or
before the stage it asks about has run, simply gets fewer tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from dlpipe import paths

LOCK_FILE = Path("dvc.lock")


def experiment_name() -> str | None:
    """The DVC experiment being run (`dvc exp run` sets DVC_EXP_NAME), or None."""
    return os.environ.get("DVC_EXP_NAME") or None


def folder_safe(name: str) -> str:
    """`name` usable as part of a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def lock_entry(stage: str, lock: Path = LOCK_FILE) -> dict[str, Any] | None:
    """The stage's entry in dvc.lock; None when the file, or the entry, is missing or broken."""
    try:
        raw = yaml.safe_load(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    stages = raw.get("stages") if isinstance(raw, dict) else None
    entry = stages.get(stage) if isinstance(stages, dict) else None
    return entry if isinstance(entry, dict) else None


def out_md5(entry: dict[str, Any], path: Path) -> str | None:
    """The md5 dvc.lock records for the output `path` of a stage entry."""
    for out in entry.get("outs") or []:
        if isinstance(out, dict) and out.get("path") == path.as_posix() and out.get("md5"):
            return str(out["md5"])
    return None


def entry_digest(entry: dict[str, Any]) -> str:
    """A short hash of a whole dvc.lock entry (command, deps, params and outs hashes)."""
    blob = json.dumps(entry, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_tags(dataset: str, lock: Path = LOCK_FILE) -> dict[str, str]:
    """`dvc_data_md5`: the DVC hash of data/prepared/<dataset> (the train stage logs it)."""
    entry = lock_entry(f"prepare@{dataset}", lock)
    md5 = out_md5(entry, paths.PREPARED_DIR / dataset) if entry else None
    return {"dvc_data_md5": md5} if md5 else {}


def train_stage_tags(model: str, lock: Path = LOCK_FILE) -> dict[str, str]:
    """`dvc_train_lock` (the hash of train@<model>'s dvc.lock entry) and `dvc_model_md5` (its
    model folder's DVC hash): logged by the evaluate stage, which runs once the entry is written."""
    entry = lock_entry(f"train@{model}", lock)
    if entry is None:
        return {}
    tags = {"dvc_train_lock": entry_digest(entry)}
    md5 = out_md5(entry, paths.MODELS_DIR / model)
    if md5:
        tags["dvc_model_md5"] = md5
    return tags


# Changed tracked files that are not code: params.yaml (what `dvc exp run -S` writes: its own
# flag), and what DVC itself writes, dvc.lock and the uncached outputs under reports/.
PARAMS_FILE = "params.yaml"
DVC_RECORDS = ("dvc.lock", f"{paths.REPORTS_DIR.as_posix()}/")


def git_state() -> dict[str, str]:
    """The commit being run and two dirty flags ('unknown' outside a git checkout): `git_dirty`
    for edited code (any tracked file but params.yaml and DVC's records), `params_dirty` for an
    edited params.yaml, so a DVC experiment's overrides do not look like a code change."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        changed = git("diff", "--name-only", "--no-renames", "HEAD").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": "unknown", "params_dirty": "unknown"}
    code = [f for f in changed if f != PARAMS_FILE and not f.startswith(DVC_RECORDS)]
    return {
        "git_sha": sha,
        "git_dirty": str(bool(code)).lower(),
        "params_dirty": str(PARAMS_FILE in changed).lower(),
    }
