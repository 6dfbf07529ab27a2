"""Metrics kept on disk while the tracking store does not answer, and their delivery.

A run whose store stops answering appends the metrics still to come (and its end) to
`.dlpipe/spool/<run id>.jsonl`; `sync` (`dlpipe sync`, or the evaluate stage) delivers them once
the store answers, exactly once per (key, step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from dlpipe.errors import DlpipeError, first_line, redact
from dlpipe.paths import project_root
from dlpipe.tracking.store import check_store, recorded_store


def spool_dir() -> Path:
    return project_root() / ".dlpipe" / "spool"


def append(path: Path, records: list[dict[str, Any]]) -> None:
    """Append JSON lines and fsync: a record in the spool survives a crash right after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
        handle.flush()
        os.fsync(handle.fileno())


def read_spool(path: Path) -> list[dict[str, Any]]:
    """The spool's records; a line cut short by a crash mid-append is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def deliver_spool(path: Path, client: MlflowClient) -> tuple[int, int]:
    """Log a spool file's metrics to its run, skipping every (key, step) the run already has, so
    that delivering twice (or after a delivery cut short) duplicates nothing; then record the
    run's end if the training could not, and delete the file. Returns (delivered, skipped)."""
    from mlflow.entities import Metric

    records = read_spool(path)
    run_id = path.stem
    latest = {(r["key"], r["step"]): r for r in records if "key" in r}  # one value per step
    have = {
        key: {m.step for m in client.get_metric_history(run_id, key)}
        for key in {key for key, _ in latest}
    }
    new = [
        Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
        for (key, step), r in latest.items()
        if step not in have[key]
    ]
    for start in range(0, len(new), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=new[start : start + 1000])
    ends = [r for r in records if "status" in r]
    if ends and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, ends[-1]["status"], ends[-1]["end_time"])
    path.unlink()
    return len(new), len(latest) - len(new)


def sync(run_id: str | None = None) -> list[str]:
    """Deliver the spooled metrics of `run_id` (default: of every run) to their stores; one line
    per run delivered. A store that still fails is one DlpipeError line (its spool is kept)."""
    paths = [spool_dir() / f"{run_id}.jsonl"] if run_id else sorted(spool_dir().glob("*.jsonl"))
    done = []
    for path in (p for p in paths if p.is_file()):
        [header, *_] = read_spool(path) or [{}]
        uri = recorded_store(header.get("tracking_uri"), str(path), path.stem)
        check_store(uri)
        try:
            delivered, skipped = deliver_spool(path, MlflowClient(uri))
        except Exception as err:  # any backend: its own exception types
            raise DlpipeError(
                f"{path}: delivery to {redact(uri)} failed: {first_line(err)}"
            ) from None
        done.append(
            f"MLflow run {path.stem}: delivered {delivered} spooled metric values"
            + (f" ({skipped} it already had)" if skipped else "")
        )
    return done
