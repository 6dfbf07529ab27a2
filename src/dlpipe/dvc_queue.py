"""Queued DVC experiments run to the end, even when DVC's queue loses its workers.

`dvc exp run --run-all -j N` starts N celery workers and follows the experiments' logs. With more
than one worker a worker can die, or stop early, while experiments are still queued (the
filesystem broker's control messages get corrupted: treeverse/dvc#10398, treeverse/dvc#10428,
iterative/dvc-task#73), and `--run-all` then waits for ever for an experiment no one will start.
`run_queued` runs it under a watchdog that reads the queue's state (its files; no control
messages) every few seconds. When the queue stops moving for a grace period (some of ours queued
and no worker running anything, or some of ours running with no worker left to run them), it
stops following, stops what is left of the workers and starts new ones, a few times at most.
Also: `dvc`, DVC's command line with its errors as one line, and the workers' environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from dlpipe.errors import DlpipeError

CELERY_DIR = Path(".dvc/tmp/exps/celery")  # dvc_task writes each worker's pid and exit code here
UNFINISHED = ("Queued", "Running")
LOST = "Lost"  # left Running by a worker that is gone: nothing will finish it
LOCK_BUSY = "Unable to acquire lock"  # DVC's error when another DVC process holds the repo
LOCK_RETRIES = 30  # a second apart


def trial_env(jobs: int) -> dict[str, str]:
    """The queue workers' environment: this venv's `python` and `dvc` first on PATH, each trial
    importing its own copy's code, one share of the cores per worker."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in ("src", env.get("PYTHONPATH")) if p)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    return env


def dvc(*args: str, env: Mapping[str, str] | None = None, log: Path | None = None) -> str:
    """`dvc ARGS` in the project; its stdout (or, with `log`, everything it printed written
    there), or one DlpipeError line with DVC's own error. A repo busy with another DVC process
    (its lock taken) is tried again, up to LOCK_RETRIES times."""
    command = [sys.executable, "-m", "dvc", *args]
    for attempt in range(LOCK_RETRIES + 1):
        if log is None:
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            output = done.stderr + done.stdout
        else:
            with log.open("w", encoding="utf-8") as out:
                done = subprocess.run(
                    command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env
                )
            output = log.read_text(encoding="utf-8", errors="replace")
        if done.returncode == 0 or LOCK_BUSY not in output or attempt == LOCK_RETRIES:
            break
        time.sleep(1.0)  # a queue worker still finishing holds the repo's lock for a moment
    if done.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["?"]
        raise DlpipeError(f"`dvc {' '.join(args[:3])} ...` failed: {errors[0]}")
    return done.stdout or ""


class Queue(Protocol):
    """What the watchdog reads and does; `DvcQueue` is DVC's, a test plays its own."""

    def states(self) -> dict[str, str]: ...
    def workers(self) -> list[int]: ...
    def follow(self, jobs: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]: ...
    def restart(self, jobs: int, env: Mapping[str, str]) -> None: ...


class DvcQueue:
    """The project's DVC experiment queue."""

    def states(self) -> dict[str, str]:
        """Every queued experiment's state (Queued, Running, Success, Failed), by name."""
        from dvc.repo import Repo

        with Repo(".") as repo:
            return {
                str(entry["name"] or entry["rev"]): str(entry["status"])
                for entry in repo.experiments.celery_queue.status()
            }

    def workers(self) -> list[int]:
        """The pids of the queue's workers still running."""
        alive = []
        for info in CELERY_DIR.glob("dvc-exp-worker-*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                process = json.loads(info.read_text(encoding="utf-8"))
                if process["returncode"] is None:
                    os.kill(int(process["pid"]), 0)
                    alive.append(int(process["pid"]))
        return alive

    def follow(self, jobs: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "--run-all", "-j", str(jobs)]
        return subprocess.Popen(cmd, env=dict(env))

    def restart(self, jobs: int, env: Mapping[str, str]) -> None:
        for pid in self.workers():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.workers() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.workers():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        cmd = [sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)]
        subprocess.run(cmd, env=dict(env), check=False, stdout=subprocess.DEVNULL)


def run_queued(
    names: Sequence[str],
    jobs: int,
    env: Mapping[str, str],
    queue: Queue | None = None,
    poll_s: float = 5.0,
    grace_s: float = 60.0,
    restarts: int = 3,
) -> dict[str, str]:
    """Run the queue until none of `names` is queued or running; each one's final state
    (`LOST` for one left running by a worker that is gone, Queued when restarts ran out)."""
    queue = queue or DvcQueue()
    follower: subprocess.Popen[bytes] | None = queue.follow(jobs, env)
    stuck_since: float | None = None
    try:
        while True:
            every = queue.states()
            ours = {name: every.get(name, "Missing") for name in names}
            if not any(state in UNFINISHED for state in ours.values()):
                return ours
            workers = queue.workers()
            busy = bool(workers) and "Running" in every.values()
            queued = "Queued" in ours.values()
            stuck = (queued and not busy) or (not queued and not workers)
            stuck_since = (stuck_since or time.monotonic()) if stuck else None
            if stuck_since is not None and time.monotonic() - stuck_since >= grace_s:
                if not queued or restarts == 0:
                    return {n: LOST if s == "Running" else s for n, s in ours.items()}
                left = sum(state in UNFINISHED for state in ours.values())
                print(
                    f"sweep: DVC's queue stopped with {left} trial(s) unfinished "
                    "(treeverse/dvc#10398): starting its workers again",
                    file=sys.stderr,
                )
                if follower is not None:
                    follower.terminate()
                    follower.wait()
                    follower = None
                queue.restart(jobs, env)
                restarts -= 1
                stuck_since = None
            time.sleep(poll_s)
    finally:
        if follower is not None and follower.poll() is None:
            follower.terminate()
            follower.wait()
