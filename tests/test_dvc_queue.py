"""The queue watchdog against a scripted queue: each poll reads the next state of DVC's queue, on
a clock that only the watchdog's own sleeps move."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from typing import Any

import pytest

from dlpipe import dvc_queue
from dlpipe.dvc_queue import LOST, run_queued
from dlpipe.errors import DlpipeError

GRACE, POLL = 60.0, 5.0


class Follower:
    """`dvc exp run --run-all`: running until it is stopped or the script says it ended."""

    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.returncode = -15

    def wait(self) -> int | None:
        return self.returncode


class ScriptedQueue:
    """Plays `script`, one (states, live workers) per poll, the last one for ever; a restart
    jumps to `after_restart` when given."""

    def __init__(self, script: list[tuple[dict[str, str], int]], after_restart: Any = None):
        self.script, self.after_restart = list(script), after_restart
        self.restarts: list[int] = []
        self.followers: list[Follower] = []
        self._now: tuple[dict[str, str], int] = self.script[0]

    def states(self) -> dict[str, str]:
        self._now = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return dict(self._now[0])

    def workers(self) -> list[int]:
        return list(range(self._now[1]))

    def follow(self, jobs: int, env: Mapping[str, str]) -> Follower:
        self.followers.append(Follower())
        return self.followers[-1]

    def restart(self, jobs: int, env: Mapping[str, str]) -> None:
        self.restarts.append(jobs)
        if self.after_restart is not None:
            self.script = list(self.after_restart)


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [0.0]
    monkeypatch.setattr(dvc_queue.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(dvc_queue.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    return now


def watch(queue: ScriptedQueue, restarts: int = 3) -> dict[str, str]:
    return run_queued(["t-1", "t-2"], 2, {}, queue, poll_s=POLL, grace_s=GRACE, restarts=restarts)  # type: ignore[arg-type]


def test_a_queue_that_moves_is_left_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """Slow starts and long trainings are no stall: workers take a while to start, a trial runs
    for longer than the grace period, another experiment keeps the workers busy."""
    queue = ScriptedQueue(
        [({"t-1": "Queued", "t-2": "Queued"}, 0)] * 5  # workers starting
        + [({"other": "Running", "t-1": "Queued", "t-2": "Queued"}, 2)] * 30
        + [({"t-1": "Running", "t-2": "Queued"}, 2)] * 30
        + [({"t-1": "Success", "t-2": "Running"}, 1)] * 30
        + [({"t-1": "Success", "t-2": "Failed"}, 0)]
    )
    assert watch(queue) == {"t-1": "Success", "t-2": "Failed"}
    assert queue.restarts == [] and capsys.readouterr().err == ""
    assert queue.followers[0].returncode == -15  # the follower is never left behind


def test_workers_gone_with_trials_queued_are_started_again(
    capsys: pytest.CaptureFixture[str], clock: list[float]
) -> None:
    queue = ScriptedQueue(
        [({"t-1": "Success", "t-2": "Queued"}, 0)],
        after_restart=[({"t-1": "Success", "t-2": "Running"}, 1)] * 3
        + [({"t-1": "Success", "t-2": "Success"}, 0)],
    )
    assert watch(queue) == {"t-1": "Success", "t-2": "Success"}
    assert queue.restarts == [2]
    assert GRACE <= clock[0] <= GRACE + 5 * POLL
    assert queue.followers[0].returncode == -15  # stopped following before the restart
    err = capsys.readouterr().err
    assert "1 trial(s) unfinished (treeverse/dvc#10398): starting its workers again" in err


def test_live_workers_that_take_nothing_are_replaced() -> None:
    """Workers alive but idle while trials wait: the broker no longer reaches them."""
    queue = ScriptedQueue(
        [({"t-1": "Queued", "t-2": "Queued"}, 2)],
        after_restart=[({"t-1": "Success", "t-2": "Success"}, 0)],
    )
    assert watch(queue) == {"t-1": "Success", "t-2": "Success"}
    assert queue.restarts == [2]


def test_a_trial_left_running_by_a_dead_worker_is_lost_not_waited_for() -> None:
    queue = ScriptedQueue([({"t-1": "Success", "t-2": "Running"}, 0)])
    assert watch(queue) == {"t-1": "Success", "t-2": LOST}
    assert queue.restarts == []  # no new worker would take it up


def test_restarts_are_bounded(clock: list[float]) -> None:
    queue = ScriptedQueue([({"t-1": "Queued"}, 0)])
    assert watch(queue, restarts=2) == {"t-1": "Queued", "t-2": "Missing"}
    assert queue.restarts == [2, 2]
    assert clock[0] < 3 * (GRACE + 2 * POLL)


def test_a_repo_busy_with_another_dvc_process_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A queue worker that is finishing holds the repo's lock for a moment: `dvc exp list` right
    after the queue ends is tried again, and an error that is not the lock is one line at once."""
    answers = [(1, "ERROR: Unable to acquire lock. Most likely another DVC process is running")] * 2
    answers.append((0, "exp-1\n"))
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        code, text = answers.pop(0)
        out, err = (text, "") if code == 0 else ("", text)
        return subprocess.CompletedProcess(command, code, stdout=out, stderr=err)

    monkeypatch.setattr(dvc_queue.subprocess, "run", run)
    monkeypatch.setattr(dvc_queue.time, "sleep", lambda seconds: None)
    assert dvc_queue.dvc("exp", "list", "--name-only") == "exp-1\n" and len(calls) == 3
    answers.extend([(1, "ERROR: unexpected error - no such experiment")] * 2)
    with pytest.raises(DlpipeError, match="no such experiment"):
        dvc_queue.dvc("exp", "remove", "x")
    assert len(calls) == 4 and len(answers) == 1
