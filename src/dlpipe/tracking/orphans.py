"""Runs that a killed process left RUNNING: found and ended KILLED, with the reason as a tag.

A stage that starts or reopens a run tags it with its owner (`dlpipe_owner`: host, pid and the
process's start time, so a reused pid is not taken for the owner). A RUNNING run is an orphan when
its owner is on this machine and that process is gone, or, when it is owned on another machine
(or by no process dlpipe knows of), when nothing has been logged to it for `mlflow.orphan_after_s`
seconds: a live training logs system metrics every few seconds. The next train or evaluate stage
of the same model ends its orphans, whatever their checkpoint key, and so does `dlpipe sync`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

OWNER_TAG = "dlpipe_owner"
REASON_TAG = "killed_reason"
HEARTBEAT = "system/cpu_utilization_percentage"  # logged every system_metrics_interval_s


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before it may hold spaces


def owner() -> str:
    """This process, as the owner tag names it."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def owner_alive(tag: str) -> bool | None:
    """Whether the process a run's owner tag names still runs; None when that cannot be known
    here (another machine, or no tag)."""
    host, _, rest = tag.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return not started or _start_time(pid) in ("", started)


def last_activity_ms(client: MlflowClient, run: Any) -> int:
    """When the run last showed life: its latest heartbeat metric, else its start."""
    history = client.get_metric_history(run.info.run_id, HEARTBEAT)
    return max([int(run.info.start_time), *(int(m.timestamp) for m in history)])


def end_orphans(
    client: MlflowClient,
    experiment_id: str,
    model: str | None,
    keep: Collection[str],
    stale_after_s: float,
) -> list[str]:
    """End as KILLED every orphan among the RUNNING runs of `model` (of every model when None)
    but those in `keep`; one line per run ended."""
    only = f" and tags.model = '{model}'" if model else " and tags.model LIKE '%'"
    running = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING'{only}", max_results=1000
    )
    lines = []
    for run in running:
        if run.info.run_id in keep:
            continue
        tag = run.data.tags.get(OWNER_TAG, "")
        alive = owner_alive(tag)
        if alive:
            continue
        last = last_activity_ms(client, run)
        idle_s = time.time() - last / 1000
        if alive is None and idle_s < stale_after_s:
            continue
        if alive is False:
            reason = f"its process ({tag}) is gone"
        else:
            reason = f"nothing logged for {idle_s:.0f} s (owner: {tag or 'unknown'})"
        client.set_tag(run.info.run_id, REASON_TAG, reason)
        client.set_terminated(run.info.run_id, "KILLED", end_time=last)
        name = run.data.tags.get("model", "?")
        lines.append(
            f"MLflow run {run.info.run_id} of {name} left RUNNING: marked KILLED, {reason}"
        )
    return lines
