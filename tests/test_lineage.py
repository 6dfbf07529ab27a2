"""Lineage both ways: a run carries the git commit, what was edited (code or params), its DVC
experiment, and dvc.lock's hashes of its data and train stage; its duration stays its training's
after the evaluate stage adds to it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from support.tiny import TinyProject, tiny_mnist_arrays

from dlpipe import lineage
from dlpipe.evaluation.run import evaluate
from dlpipe.integrity import seal
from dlpipe.io import read_json
from dlpipe.lineage import git_state
from dlpipe.tracking.run import StageRun
from dlpipe.training.run import train


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


STAGES: dict[str, dict[str, Any]] = {  # dvc.lock's entries, as DVC writes them
    "prepare@mnist": {
        "cmd": "python stages/prepare.py mnist",
        "outs": [{"path": "data/prepared/mnist", "md5": "d41d8cd9.dir", "nfiles": 4}],
    },
    "train@cnn": {
        "cmd": "python stages/train.py cnn",
        "params": {"params.yaml": {"seed": 42}},
        "outs": [
            {"path": "data/models/cnn", "md5": "0cc175b9.dir", "nfiles": 4},
            {"path": "reports/models/cnn/train.json", "md5": "92eb5ffe"},
        ],
    },
}


def write_lock(folder: Path, stages: dict[str, dict[str, Any]]) -> Path:
    path = folder / "dvc.lock"
    path.write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}), encoding="utf-8")
    return path


def add_mnist_test_split(project: TinyProject) -> None:
    """What prepare@mnist writes beyond the training fixture: the test split (80 images)."""
    prepared = project.root / "data" / "prepared" / "mnist"
    np.savez(prepared / "test.npz", **tiny_mnist_arrays(80, seed=5))
    seal(prepared)


def test_dvc_lock_hashes_of_the_data_and_the_train_stage(tmp_path: Path) -> None:
    lock = write_lock(tmp_path, STAGES)
    assert lineage.data_tags("mnist", lock) == {"dvc_data_md5": "d41d8cd9.dir"}
    assert lineage.data_tags("imdb", lock) == {}
    tags = lineage.train_stage_tags("cnn", lock)
    assert tags["dvc_model_md5"] == "0cc175b9.dir" and len(tags["dvc_train_lock"]) == 16

    changed = {**STAGES["train@cnn"], "params": {"params.yaml": {"seed": 43}}}
    write_lock(tmp_path, {"train@cnn": changed})
    assert lineage.train_stage_tags("cnn", lock)["dvc_train_lock"] != tags["dvc_train_lock"]
    assert lineage.train_stage_tags("rnn", lock) == {}

    lock.write_text("stages: [not, a, mapping")
    assert lineage.train_stage_tags("cnn", lock) == {} == lineage.data_tags("mnist", lock)
    assert lineage.data_tags("mnist", tmp_path / "missing.lock") == {}


def test_a_reopened_run_keeps_its_end_time(tiny_project: TinyProject) -> None:
    client = MlflowClient(tiny_project.tracking_uri)
    run = StageRun(tiny_project.tracking_uri, required=True)
    run.start("lineage", "r", None, {}, {}, 1.0)
    run.end("FINISHED")
    assert run.run_id is not None
    ended = client.get_run(run.run_id).info.end_time
    time.sleep(0.05)

    later = StageRun(tiny_project.tracking_uri, required=True)
    later.reopen(run.run_id)
    later.log_metrics({"test_accuracy": 0.9})
    later.end("FINISHED")
    info = client.get_run(run.run_id)
    assert (info.info.status, info.info.end_time) == ("FINISHED", ended)
    assert info.data.metrics["test_accuracy"] == 0.9


@pytest.mark.integration
def test_a_trial_run_carries_its_lineage_and_its_training_s_duration(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train then evaluate, as a queued sweep trial runs them: DVC experiment, parent run,
    data hash at training; train stage hash at evaluation; the run's end time stays put."""
    client = MlflowClient(tiny_project.tracking_uri)
    experiment = client.create_experiment("dlpipe")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    params = tiny_project.with_mlflow(sweep_parent=parent)
    write_lock(tiny_project.root, {"prepare@mnist": STAGES["prepare@mnist"]})
    monkeypatch.setenv("DVC_EXP_NAME", "cnn-abc123-1")
    add_mnist_test_split(tiny_project)

    train("cnn", params)
    run_id = read_json(Path("data/models/cnn/mlflow_run.json"))["run_id"]
    trained = client.get_run(run_id)
    tags = trained.data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["dvc_exp_name"] == "cnn-abc123-1"
    assert tags["dvc_data_md5"] == "d41d8cd9.dir"
    assert tags["checkpoint_dir"].startswith("cnn-") and tags["checkpoint_dir"].endswith("-1")
    assert tags["params_dirty"] == "unknown"  # not a git checkout

    write_lock(tiny_project.root, STAGES)
    time.sleep(1.0)  # evaluation ends well after the training
    evaluate("cnn", params)
    evaluated = client.get_run(run_id)
    assert evaluated.info.end_time == trained.info.end_time
    assert evaluated.info.status == "FINISHED" and "test_accuracy" in evaluated.data.metrics
    assert (
        evaluated.data.tags["dvc_train_lock"] == lineage.train_stage_tags("cnn")["dvc_train_lock"]
    )
    assert evaluated.data.tags["dvc_model_md5"] == "0cc175b9.dir"
    version = client.get_model_version_by_alias("dlpipe-cnn", "candidate")
    assert (version.tags["test_split_rows"], version.tags["test_split_full"]) == ("80", "true")
