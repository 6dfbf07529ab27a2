"""`dlpipe sweep`: the grid and its checks, the one-screen `dvc exp show`, and (slow) a real
sweep of three queued trials on two workers (one runs two), each its own MLflow run under one
parent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from support.families import REPO_ROOT
from support.sweeps import baseline_project, check_output, cli

from dlpipe.dvc_queue import trial_env
from dlpipe.errors import DlpipeError
from dlpipe.sweep import exp_show_args, trial_overrides


def raw_params() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    return raw


PARAMS = str(REPO_ROOT / "params.yaml")


# --- the grid ------------------------------------------------------------------------------------


def test_the_grid_is_dvcs_expansion_of_the_override_grammar() -> None:
    grid = [
        "train.cnn.lr=0.001,0.002",
        "train.cnn.batch_size=range(32,97,32)",
        "evaluate.latency_batch_sizes=[1,256],[1]",
        "train.cnn.optimizer=adamw",
    ]
    trials = trial_overrides(PARAMS, "cnn", grid)
    assert len(trials) == 2 * 3 * 2
    assert trials[0] == [
        "train.cnn.lr=0.001",
        "train.cnn.batch_size=32",
        "evaluate.latency_batch_sizes=[1,256]",
        "train.cnn.optimizer=adamw",
    ]
    assert trials[-1][:3] == [
        "train.cnn.lr=0.002",
        "train.cnn.batch_size=96",
        "evaluate.latency_batch_sizes=[1]",
    ]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("+train.cnn.extra=1", "expected KEY=VALUES"),
        ("~train.cnn.lr", "expected KEY=VALUES"),
        ("train.cnn.lr=interval(0,1)", "does not support sweep type"),
        ("train.cnn.lr=[1,", "-S train.cnn.lr=[1,:"),
    ],
)
def test_grid_syntax_errors_are_one_line(item: str, message: str) -> None:
    with pytest.raises(DlpipeError, match="-S") as caught:
        trial_overrides(PARAMS, "cnn", [item])
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["train.rnn.lr=0.1"], "a sweep of cnn varies train.cnn.* and evaluate.* only"),
        (["datasets.mnist.max_train=100"], "on the baseline's data"),
        (["train.cnn.lrr=0.1"], "trial train.cnn.lrr=0.1: Could not override 'train.cnn.lrr'"),
        (["train.cnn.lr=0.1", "train.cnn.lr=0.2"], "-S train.cnn.lr is given twice"),
        (
            ["train.cnn.lr=0.001,-1"],
            "trial train.cnn.lr=-1: train.cnn.lr: Input should be greater than 0",
        ),
        (["train.cnn.model.width=1,0"], "trial train.cnn.model.width=0: train.cnn.model.width"),
    ],
)
def test_a_bad_trial_is_one_line_before_anything_is_queued(items: list[str], message: str) -> None:
    with pytest.raises(DlpipeError) as caught:
        trial_overrides(PARAMS, "cnn", items)
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_model_is_swept_by_its_name_and_checked_by_its_family(tmp_path: Path) -> None:
    """A model is a family on a dataset: a second CNN model, `wide`, is swept as train.wide.*
    and its trials are checked against the cnn family's schema."""
    raw = raw_params()
    raw["train"]["wide"] = {**raw["train"]["cnn"], "model": {"width": 2}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert trial_overrides(str(params), "wide", ["train.wide.model.width=2,3"]) == [
        ["train.wide.model.width=2"],
        ["train.wide.model.width=3"],
    ]
    with pytest.raises(DlpipeError, match="trial train.wide.model.width=0: train.wide.model.width"):
        trial_overrides(str(params), "wide", ["train.wide.model.width=2,0"])
    with pytest.raises(DlpipeError, match="a sweep of wide varies train.wide.\\* and evaluate"):
        trial_overrides(str(params), "wide", ["train.cnn.lr=0.1"])


def test_trials_import_their_own_copy_and_share_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    env = trial_env(jobs=2)
    assert env["PYTHONPATH"] == os.pathsep.join(["src", "/elsewhere"])
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["PATH"].startswith(str(Path(sys.executable).parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert trial_env(jobs=8)["OMP_NUM_THREADS"] == "3"


def test_usage_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copyfile(REPO_ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    cases = [
        (["sweep"], "give a MODEL and at least one -S"),
        (["sweep", "cnn"], "give a MODEL and at least one -S"),
        (["sweep", "--show", "-S", "train.cnn.lr=1"], "--show takes no -S"),
        (["sweep", "gan", "-S", "train.gan.lr=1"], "unknown model 'gan'; params.yaml trains"),
        (["sweep", "cnn", "-S", "train.cnn.lr=1", "--jobs", "0"], "--jobs 0: must be at least 1"),
        (["sweep", "cnn", "-S", "train.cnn.lr=0,1"], "train.cnn.lr: Input should be greater"),
    ]
    for argv, message in cases:
        code, out, err = cli(capsys, *argv)
        assert code == 2 and out == "", (argv, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / ".dvc").exists()  # nothing was queued
    monkeypatch.chdir(tmp_path.parent)
    code, _, err = cli(capsys, "sweep", "cnn", "-S", "train.cnn.lr=1")
    assert code == 2 and "run `dlpipe sweep` from the project root" in err


def test_a_sweep_that_cannot_queue_every_trial_runs_none(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    _mlflow_db_template: Path,
) -> None:
    """DVC fails to queue the grid: every trial name is taken out of the queue again (a grid
    queued halfway runs none), nothing runs, and the parent run ends FAILED with one error line."""
    from dlpipe import sweep

    for name in ("params.yaml", "dvc.yaml"):
        shutil.copyfile(REPO_ROOT / name, tmp_path / name)
    shutil.copyfile(_mlflow_db_template, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(sweep, "check_baseline", lambda dataset: None)
    calls: list[tuple[str, ...]] = []

    def dvc(*args: str) -> str:
        calls.append(args)
        raise DlpipeError(f"`dvc {' '.join(args[:3])} ...` failed: ERROR: no space left")

    monkeypatch.setattr(sweep, "dvc", dvc)
    code, _, err = cli(capsys, "sweep", "cnn", "-S", "train.cnn.lr=0.001,0.002")
    assert code == 2 and err == "error: `dvc exp run --queue ...` failed: ERROR: no space left\n"
    queued, removed = calls  # the whole grid in one `dvc exp run --queue`, DVC expanding it
    assert queued[:5] == ("exp", "run", "--queue", "-f", "-s")
    assert queued[-2:] == ("train@cnn", "evaluate@cnn") and "train.cnn.lr=0.001,0.002" in queued
    prefix = queued[queued.index("-n") + 1]
    assert removed == ("queue", "remove", f"{prefix}-1", f"{prefix}-2")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dlpipe")
    assert experiment is not None
    [parent] = client.search_runs([experiment.experiment_id])
    assert parent.info.status == "FAILED" and parent.data.tags["sweep_family"] == "cnn"
    assert parent.data.params == {
        "grid.train.cnn.lr": "0.001,0.002",
        "sweep.trials": "2",
        "sweep.jobs": "1",
    }
    assert prefix == f"cnn-{parent.info.run_id[:6]}"
    sweep_parent = [a for a in queued if a.startswith("mlflow.sweep_parent=")]
    assert sweep_parent == [f"mlflow.sweep_parent='{parent.info.run_id}'"]


# --- dvc exp show, narrowed ----------------------------------------------------------------------


def test_exp_show_keeps_what_varies_and_the_headline_metrics() -> None:
    """DVC's own table of this project's commit, narrowed: the experiment, when, and each
    model's three headline metrics (nothing varies between the workspace and HEAD's params)."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--md", *exp_show_args(["cnn", "rnn"])],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    header = [cell.strip() for cell in done.stdout.splitlines()[0].strip("|").split("|")]
    assert header[:2] == ["Experiment", "Created"]
    assert sorted(header[2:]) == sorted(
        f"reports/models/{model}/{name}"
        for model in ("cnn", "rnn")
        for name in (
            "eval.json:test_accuracy",
            "train.json:best.val_accuracy",
            "train.json:train_time_s",
        )
    )


# --- a real sweep --------------------------------------------------------------------------------

GRID = ["-S", "train.cnn.lr=0.001,0.002,0.004", "-S", "train.cnn.batch_size=128"]


@pytest.mark.slow
@pytest.mark.integration
def test_a_sweep_of_three_trials_on_two_workers(tmp_path: Path, data_mirror: str) -> None:
    mirror = data_mirror
    repo, env = baseline_project(tmp_path, mirror)
    dvc = [sys.executable, "-m", "dvc"]
    try:
        start = time.monotonic()
        sweep = [sys.executable, "-m", "dlpipe.cli", "sweep", "cnn", *GRID, "--jobs", "2"]
        out = check_output(sweep, repo, env, timeout=1800)
        print(f"sweep of 3 trials on 2 workers: {time.monotonic() - start:.0f} s\n{out}")

        client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("dlpipe")
        assert experiment is not None
        [parent] = client.search_runs(
            [experiment.experiment_id], filter_string="tags.sweep_family = 'cnn'"
        )
        assert parent.info.status == "FINISHED"
        assert parent.data.params["grid.train.cnn.lr"] == "0.001,0.002,0.004"
        assert parent.data.metrics["trials_finished"] == 3
        parent_id = parent.info.run_id
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
        )
        names = {run.data.tags["dvc_exp_name"] for run in runs}
        assert len(runs) == 3 and len(names) == 3, [r.data.tags for r in runs]
        assert names == set(parent.data.tags["dvc_exp_names"].split(","))
        assert {run.info.status for run in runs} == {"FINISHED"}
        grid = {(run.data.params["train.lr"], run.data.params["train.batch_size"]) for run in runs}
        assert grid == {(lr, "128") for lr in ("0.001", "0.002", "0.004")}
        for run in runs:  # its own checkpoint folder; its own code; params, not code, edited
            name = run.data.tags["dvc_exp_name"]
            assert run.data.tags["checkpoint_dir"].endswith(f"-{name}")
            assert (run.data.tags["git_dirty"], run.data.tags["params_dirty"]) == ("false", "true")
            assert run.data.tags["dvc_data_md5"].endswith(".dir")
            assert run.data.tags["dvc_train_lock"]
            assert "test_accuracy" in run.data.metrics
            log = check_output([*dvc, "queue", "logs", name], repo, env)
            assert "Running stage 'train@cnn'" in log and "resuming from epoch" not in log, log
        assert len({run.data.tags["checkpoint_dir"] for run in runs}) == 3
        # three evaluations registered at once: the champion is still the best of all
        champion = client.get_model_version_by_alias("dlpipe-cnn", "champion")
        scores = [
            r.data.metrics["test_accuracy"]
            for r in client.search_runs([experiment.experiment_id])
            if "test_accuracy" in r.data.metrics
        ]
        assert float(champion.tags["test_accuracy"]) == max(scores)

        shown = json.loads(check_output([*dvc, "exp", "show", "--json"], repo, env))
        exps = {exp["name"] for commit in shown for exp in commit.get("experiments") or []}
        assert names <= exps
        for name in names:  # the sweep's table: each trial, its params and its MLflow run
            [line] = [line for line in out.splitlines() if line.startswith(name)]
            assert {r.info.run_id[:8] for r in runs if r.data.tags["dvc_exp_name"] == name} <= set(
                line.split()
            )
        assert "train.cnn.batch_size" in out and "pixel_mean" not in out
    finally:
        subprocess.run([*dvc, "queue", "stop"], cwd=repo, env=env, capture_output=True)
