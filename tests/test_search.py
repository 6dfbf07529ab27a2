"""`dlpipe sweep --search`: the space, the pruner as a training sees it, the CLI's one-line
errors, and (slow) two workers in their own clones sharing one study on PostgreSQL, one of them
killed mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from support.families import REPO_ROOT
from support.sweeps import baseline_project, check_output, cli
from support.tiny import TinyProject, run_stage_here

from dlpipe import search
from dlpipe.errors import DlpipeError
from dlpipe.io import read_json
from dlpipe.search import Space, hydra_value
from dlpipe.training import pruning

PARAMS = str(REPO_ROOT / "params.yaml")


# --- the space -----------------------------------------------------------------------------------


def test_the_space_is_hydras_sweep_grammar_as_optuna_distributions() -> None:
    space = Space.parse(
        [
            "train.cnn.lr=tag(log, interval(0.0001, 0.01))",
            "train.cnn.batch_size=choice(64, 128)",
            "train.cnn.optimizer=adam,adamw",
            "train.cnn.epochs=range(1, 5)",
            "train.cnn.model.width=range(1, 6, 2)",
            "train.cnn.model.dropout=interval(0, 0.5)",
            "train.cnn.grad_clip=tag(int, interval(1, 3))",
            "train.cnn.weight_decay=0.05",
        ]
    )
    assert space.varied == {
        "train.cnn.lr": FloatDistribution(0.0001, 0.01, log=True),
        "train.cnn.batch_size": CategoricalDistribution([64, 128]),
        "train.cnn.optimizer": CategoricalDistribution(["adam", "adamw"]),
        "train.cnn.epochs": IntDistribution(1, 4),
        "train.cnn.model.width": IntDistribution(1, 5, step=2),
        "train.cnn.model.dropout": FloatDistribution(0.0, 0.5),
        "train.cnn.grad_clip": IntDistribution(1, 3),
    }
    assert space.fixed == {"train.cnn.weight_decay": "0.05"}
    space.check(PARAMS, "cnn")  # every choice and both ends of every range pass the schema


@pytest.mark.parametrize("value", [1e-5, 0.1, 3, "adamw", "it's", True, None])
def test_a_sampled_value_reads_back_as_itself(value: Any) -> None:
    [override] = OverridesParser.create().parse_overrides([f"a.b={hydra_value(value)}"])
    assert override.value() == value


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["train.cnn.lr=0.1"], "a search needs an -S that varies"),
        (["train.cnn.lr=interval(0.1, 0.01)"], "an interval needs low < high"),
        (["train.cnn.lr=tag(log, interval(0, 1))"], "a log interval needs low > 0"),
        (["train.cnn.lr=choice([1], [2])"], "plain values, not lists"),
        (["train.cnn.epochs=range(5, 1)"], "the range is empty"),
        (["train.cnn.lr=interval("], "-S train.cnn.lr=interval(:"),
        (["train.cnn.lr=choice(0.1, 0.2)", "train.cnn.lr=0.1"], "-S train.cnn.lr is given twice"),
        (["train.rnn.lr=choice(0.1, 0.2)"], "a sweep of cnn varies train.cnn.* and evaluate.*"),
        (["train.cnn.lr=choice(0.1, -1)"], "train.cnn.lr: Input should be greater than 0"),
        (["train.cnn.lrr=choice(0.1, 0.2)"], "Could not override 'train.cnn.lrr'"),
    ],
)
def test_a_bad_space_is_one_line(items: list[str], message: str) -> None:
    with pytest.raises(DlpipeError) as caught:
        Space.parse(items).check(PARAMS, "cnn")
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


# --- the training's side -------------------------------------------------------------------------


def study_with_a_finished_trial(
    url: str, values: list[float], warmup_epochs: int = 0
) -> optuna.Study:
    """A study as `create_study` leaves it (its pruner's settings), one trial completed with
    `values` reported per epoch, and one trial running: the training's."""
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    settings = {"kind": "median", "startup_trials": 1, "warmup_epochs": warmup_epochs}
    study.set_user_attr("pruner", settings)
    done = study.ask()
    for epoch, value in enumerate(values, 1):
        done.report(value, epoch)
    study.tell(done, max(values))
    study.ask()  # trial 1, RUNNING
    return study


def search_env(monkeypatch: pytest.MonkeyPatch, url: str, number: int = 1) -> None:
    monkeypatch.setenv(pruning.STORAGE_ENV, url)
    monkeypatch.setenv(pruning.STUDY_ENV, "s")
    monkeypatch.setenv(pruning.TRIAL_ENV, str(number))


def test_a_trial_worse_than_the_median_stops_after_that_epoch(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train stage, as a search's worker starts it: it reports each epoch to its trial, is
    pruned after epoch 1 (below the finished trial's 0.99), ends FINISHED with one epoch logged,
    the trial and the run both saying where it stopped; train.json says it stopped early."""
    url = f"sqlite:///{tiny_project.root.parent / 'search.db'}"
    study_with_a_finished_trial(url, [0.99, 0.995])
    search_env(monkeypatch, url)
    tiny_project.write_params(tiny_project.with_train("cnn", epochs=3))
    assert run_stage_here("train", "cnn", monkeypatch) == 0

    trial = optuna.load_study(study_name="s", storage=url).trials[1]
    assert list(trial.intermediate_values) == [1] and trial.user_attrs[pruning.PRUNED_AT] == 1
    summary = read_json(Path("reports/models/cnn/train.json"))
    assert summary["stopped_early"] is True and summary["epochs"] == 1, summary
    client = MlflowClient(tiny_project.tracking_uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id],  # type: ignore[union-attr]
    )
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1
    assert run.data.tags["optuna_study"] == "s" and run.data.tags["optuna_trial"] == "1"
    assert run.data.tags[pruning.PRUNED_AT] == "1"


@pytest.mark.integration
def test_rank_zeros_pruner_stops_every_process(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (2 processes, gloo) rank 0 asks the pruner and every process stops at the
    same epoch: the stage ends cleanly (a rank still waiting for an epoch would hang it)."""
    url = f"sqlite:///{tiny_project.root.parent / 'search.db'}"
    study_with_a_finished_trial(url, [0.99, 0.995])
    search_env(monkeypatch, url)
    tiny_project.write_params(tiny_project.with_train("cnn", epochs=3, batch_size=32, nproc=2))
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "train.py"), "cnn"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = read_json(Path("reports/models/cnn/train.json"))
    assert (summary["world_size"], summary["epochs"], summary["stopped_early"]) == (2, 1, True)
    trial = optuna.load_study(study_name="s", storage=url).trials[1]
    assert trial.user_attrs[pruning.PRUNED_AT] == 1


def test_warmup_epochs_are_never_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'search.db'}"
    study_with_a_finished_trial(url, [0.99, 0.995, 0.996], warmup_epochs=1)
    search_env(monkeypatch, url)
    report = pruning.trial_from_env()
    assert report is not None
    assert report(1, 0.5) is False  # epoch 1 is warm-up
    assert report(2, 0.5) is True and report.pruned_at == 2
    good = pruning.trial_from_env({**os.environ})  # a good trial is never stopped
    assert good is not None and good(3, 0.999) is False


def test_a_trial_another_worker_failed_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its worker was taken for dead (no heartbeat) and the trial marked FAIL: the training,
    still running, stops at its next epoch rather than training for nothing."""
    url = f"sqlite:///{tmp_path / 'search.db'}"
    study = study_with_a_finished_trial(url, [0.9])
    search_env(monkeypatch, url)
    report = pruning.trial_from_env()
    assert report is not None
    study.tell(1, state=TrialState.FAIL)
    assert report(1, 0.95) is True and report.pruned_at == 0


def test_an_unreachable_study_stops_the_training_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    search_env(monkeypatch, "postgresql://dlpipe:s3cret@127.0.0.1:1/optuna")
    with pytest.raises(DlpipeError) as caught:
        pruning.trial_from_env()
    message = str(caught.value)
    assert message.startswith("search trial 1 of study 's': ") and "\n" not in message
    assert "s3cret" not in message
    search_env(monkeypatch, f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(DlpipeError, match="search trial 1 of study 's'"):
        pruning.trial_from_env()


def test_no_search_no_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pruning.TRIAL_ENV, raising=False)
    assert pruning.trial_from_env() is None and not pruning.in_search()


def test_the_storage_is_given_or_the_environments_or_the_projects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(pruning.STORAGE_ENV, raising=False)
    assert search.storage_url(None) == f"sqlite:///{tmp_path / '.dlpipe' / 'search.db'}"
    monkeypatch.setenv(pruning.STORAGE_ENV, "sqlite:////team/search.db")
    assert search.storage_url(None) == "sqlite:////team/search.db"
    assert search.storage_url("sqlite:///x.db") == "sqlite:///x.db"
    # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; psycopg2 is what the postgres extra brings
    monkeypatch.setattr(search.importlib.util, "find_spec", lambda name: None)
    assert search.storage_url("postgresql://u:p@db/optuna") == "postgresql+psycopg2://u:p@db/optuna"


# --- the command line ----------------------------------------------------------------------------


def test_search_usage_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_bytes((REPO_ROOT / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    optuna.create_study(storage=storage, study_name="other")
    lr = "train.cnn.lr=choice(0.001, 0.002)"
    cases = [
        (["sweep", "cnn", "-S", lr, "--search", "0"], "--search 0: must be at least 1 trial"),
        (["sweep", "cnn", "-S", lr, "--search", "2", "-j", "2"], "start more workers with --join"),
        (["sweep", "cnn", "-S", lr, "--search", "2", "--pruner", "hyperband"], "--pruner"),
        (["sweep", "cnn", "-S", lr, "--search", "2", "--study", "a b"], "--study 'a b'"),
        (["sweep", "cnn", "-S", "train.cnn.lr=0.1", "--search", "2"], "an -S that varies"),
        (["sweep", "--join", "s", "-S", lr], "--join STUDY takes no MODEL, -S or --search"),
        (["sweep", "--join", "gone", "--storage", storage], "no study 'gone' in the search"),
        (["sweep", "--show", "--study", "gone", "--storage", storage], "(studies: other)"),
        (["sweep", "--join", "other", "--storage", storage], "study 'other' was not made (whole)"),
        (
            ["sweep", "--show", "--study", "s", "--storage", "postgresql://u:pw@127.0.0.1:1/x"],
            "://***@127.0.0.1:1/x: ",  # the driver named (postgresql+psycopg2), the password not
        ),
    ]
    for argv, message in cases:
        code, out, err = cli(capsys, *argv)
        assert code == 2 and out == "", (argv, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert "pw@" not in err
    assert optuna.get_all_study_names(storage) == ["other"]  # no bad search created a study


# --- a real search -------------------------------------------------------------------------------

GOOD, BAD = 0.004, 1e-9  # learning rates: a recipe, and one that learns nothing
EPOCHS = 3


def clone(repo: Path, folder: Path, env: dict[str, str]) -> Path:
    """A worker's own working copy: a git clone sharing the baseline's DVC cache (hard links),
    with the baseline's outputs (the CNN's stages) checked out."""
    check_output(["git", "clone", "-q", str(repo), str(folder)], repo, env)
    dvc = [sys.executable, "-m", "dvc"]
    check_output([*dvc, "cache", "dir", "--local", str(repo / ".dvc" / "cache")], folder, env)
    check_output([*dvc, "config", "--local", "cache.type", "hardlink,copy"], folder, env)
    check_output([*dvc, "checkout", "-q", "--with-deps", "evaluate@cnn"], folder, env)
    return folder


def worker(folder: Path, env: dict[str, str], study: str) -> subprocess.Popen[str]:
    """`dlpipe sweep --join STUDY` in `folder`, in its own process group (killed as a whole,
    like a machine lost)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dlpipe.cli", "sweep", "--join", study],
        cwd=folder,
        env={**env, "PYTHONPATH": str(folder / "src")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(condition: Any, timeout: float, what: str, process: subprocess.Popen[str]) -> None:
    """Until `condition()`; failing with `process`'s output when it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{what}: not seen; the worker printed:\n{process.communicate()[0]}")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.integration
def test_two_workers_share_one_search_on_postgresql(
    tmp_path: Path, data_mirror: str, postgres_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study lives in PostgreSQL; each worker is a clone of its own. The first worker is
    killed mid-trial (its whole process group: a machine lost): its trial is marked FAIL and the
    study goes on with two workers. The trials are enqueued so that pruning is certain: two good
    learning rates first, then three that learn nothing, each pruned after its first epoch."""
    repo, env = baseline_project(tmp_path, data_mirror)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    env[pruning.STORAGE_ENV] = postgres_uri
    copies = [clone(repo, tmp_path / f"worker{n}", env) for n in (1, 2)]

    monkeypatch.chdir(copies[0])  # the study is created as `dlpipe sweep --search` creates it
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    url = search.storage_url(None)  # $DLPIPE_SEARCH_STORAGE, with the driver at hand
    study = search.create_study(
        "cnn",
        [f"train.cnn.lr=tag(log, interval({BAD}, 0.01))", f"train.cnn.epochs={EPOCHS}"],
        6,
        "params.yaml",
        url,
        name="lr",
        startup_trials=1,
        heartbeat_s=1,
    )
    enqueued = optuna.load_study(study_name=study, storage=url)
    for lr in (GOOD, GOOD, GOOD, BAD, BAD, BAD):
        enqueued.enqueue_trial({"train.cnn.lr": lr})

    def states() -> list[TrialState]:
        return [t.state for t in enqueued.get_trials(deepcopy=False)]

    doomed = worker(copies[0], env, study)
    wait_for(lambda: states()[0] == TrialState.RUNNING, 120, "trial 0 running", doomed)
    time.sleep(3)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()

    start = time.monotonic()
    workers = [worker(copy, env, study) for copy in copies]  # the first copy's worker restarted
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    print(f"search of 5 trials on 2 workers: {time.monotonic() - start:.0f} s")
    for w, out in zip(workers, outputs, strict=True):
        print(out)
        assert w.returncode == 0, out

    trials = optuna.load_study(study_name=study, storage=url).get_trials()
    assert [t.state for t in trials][0] == TrialState.FAIL  # the killed worker's
    assert len(trials) == 6 and trials[0].params["train.cnn.lr"] == GOOD
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("dlpipe")
    assert experiment is not None
    [parent] = client.search_runs(  # its trials' runs have the study's tag too
        [experiment.experiment_id],
        filter_string=f"tags.sweep_family = 'cnn' and tags.optuna_study = '{study}'",
    )
    runs = {
        int(r.data.tags["optuna_trial"]): r
        for r in client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        )
    }
    assert set(runs) >= {1, 2, 3, 4, 5}
    for trial in trials[1:]:
        run = runs[trial.number]
        epochs = len(client.get_metric_history(run.info.run_id, "val_accuracy"))
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        assert run.data.tags["dvc_exp_name"] == trial.user_attrs["dvc_exp"] == f"lr-{trial.number}"
        assert float(run.data.params["train.lr"]) == trial.params["train.cnn.lr"]
        assert epochs == len(trial.intermediate_values)
        if trial.state == TrialState.PRUNED:  # stopped early: fewer epochs logged
            assert epochs < EPOCHS and run.data.tags[pruning.PRUNED_AT] == str(epochs)
        else:
            assert trial.state == TrialState.COMPLETE and epochs == EPOCHS
            assert trial.value == max(trial.intermediate_values.values())
        if trial.params["train.cnn.lr"] == BAD:  # below the finished trials' median at once
            assert trial.state == TrialState.PRUNED and epochs == 1, trial
    assert TrialState.COMPLETE in {t.state for t in trials}
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == study_best(trials)
    assert parent.data.metrics["trials_fail"] == 1 and parent.data.metrics["trials_pruned"] >= 3

    for copy in copies:  # each trial is a DVC experiment in the copy that ran it
        listed = check_output(
            [sys.executable, "-m", "dvc", "exp", "list", "--name-only"], copy, env
        )
        ran_here = {
            t.user_attrs["dvc_exp"] for t in trials[1:] if str(copy) in t.user_attrs["worker"]
        }
        assert ran_here and ran_here <= set(listed.split())
    shown = check_output(
        [sys.executable, "-m", "dlpipe.cli", "sweep", "--show", "--study", study], repo, env
    )
    assert f"study {study}: 6 of 6 trials of cnn" in shown and shown.count("pruned") >= 3, shown
    # Trials run in DVC's temp copies: the workspace of the worker never killed is untouched.
    # (The first copy's may not be: `dvc exp run` writes a trial's params into the workspace
    # while it stashes them, and the SIGKILL can land in that moment.)
    params = yaml.safe_load((copies[1] / "params.yaml").read_text(encoding="utf-8"))
    assert params["train"]["cnn"]["epochs"] != EPOCHS


def study_best(trials: list[optuna.trial.FrozenTrial]) -> str:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return str(max(complete, key=lambda t: t.value or 0.0).user_attrs["dvc_exp"])
