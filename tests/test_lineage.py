"""Lineage: a run carries the git commit and what was edited (code or params); its duration stays
its training's after the evaluate stage adds to it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import TinyProject
from mlflow.tracking import MlflowClient

from dlpipe.tracking import TrainingRun, git_state


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@dlpipe.invalid", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


def test_the_dirty_flags_tell_code_edits_from_param_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = ["params.yaml", "dvc.lock", "reports/models/cnn/eval.json", "src/code.py"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a: 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "base")
    monkeypatch.chdir(tmp_path)
    assert git_state()["git_dirty"] == "false" and git_state()["params_dirty"] == "false"

    (tmp_path / "params.yaml").write_text("a: 2\n")  # what `dvc exp run -S` does
    for name in files[1:3]:  # what DVC writes: its lock file, uncached outputs
        (tmp_path / name).write_text("a: 2\n")
    state = git_state()
    assert (state["git_dirty"], state["params_dirty"]) == ("false", "true")

    (tmp_path / "src/code.py").write_text("a: 2\n")
    assert git_state()["git_dirty"] == "true"
    (tmp_path / "untracked.py").write_text("")
    git(tmp_path, "checkout", "--", "src/code.py")
    assert git_state()["git_dirty"] == "false"  # untracked files are not the code run

    monkeypatch.chdir(tmp_path / "..")
    assert git_state() == {"git_sha": "unknown", "git_dirty": "unknown", "params_dirty": "unknown"}


def test_a_reopened_run_keeps_its_end_time(tiny_project: TinyProject) -> None:
    client = MlflowClient(tiny_project.tracking_uri)
    run = TrainingRun(tiny_project.tracking_uri, required=True)
    run.start("lineage", "r", None, {}, {}, 1.0)
    run.end("FINISHED")
    assert run.run_id is not None
    ended = client.get_run(run.run_id).info.end_time
    time.sleep(0.05)

    later = TrainingRun(tiny_project.tracking_uri, required=True)
    later.reopen(run.run_id)
    later.log_metrics({"test_accuracy": 0.9})
    later.end("FINISHED")
    info = client.get_run(run.run_id)
    assert (info.info.status, info.info.end_time) == ("FINISHED", ended)
    assert info.data.metrics["test_accuracy"] == 0.9
