"""MLflow tracking of the train stage: what one run records (params, metrics, tags, system
metrics, dataset, a reloadable model), a real tracking server, an unreachable one, logging
failures that must not lose the training, and where the default store lives.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow.entities import DatasetInput, LoggedModelOutput, Run
from mlflow.tracking import MlflowClient
from support.families import REPO_ROOT, dataset_of
from support.servers import MlflowServer
from support.tiny import TinyProject, hook_after_epoch, use_tiny_project

from dlpipe.cli import main as cli_main
from dlpipe.config import flatten, train_config
from dlpipe.data.tensors import load_split
from dlpipe.errors import DlpipeError, redact
from dlpipe.family import load_trained
from dlpipe.integrity import listed_digest
from dlpipe.paths import project_root
from dlpipe.tracking.run import StageRun
from dlpipe.tracking.spool import sync
from dlpipe.tracking.store import check_store, recorded_store, tracking_uri
from dlpipe.training import run as run_module

EPOCH_METRICS = [
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "epoch_time_s",
    "samples_per_s",
]
SHARED_PARAMS = [
    "train.lr", "train.batch_size", "train.epochs", "model.name", "model.family", "seed"
]  # fmt: skip
TAGS = ["model", "model_family", "dataset", "git_sha", "device", "torch_version"]


def use_store(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    """Point MLflow's fluent API (`runs:/` URIs) at `uri` for the rest of one test."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", uri)


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def saved_model(name: str, root: Path) -> torch.nn.Module:
    """The stage's own output, data/models/<name>/model.pt, loaded into a fresh model."""
    model, info, family = load_trained(root / "data/models" / name)
    assert info["model"] == name and family.name == info["family"]
    return model


def dataset_inputs(run: Run) -> list[DatasetInput]:
    assert run.inputs is not None
    return list(run.inputs.dataset_inputs)


def model_outputs(run: Run) -> list[LoggedModelOutput]:
    assert run.outputs is not None
    return list(run.outputs.model_outputs)


def wait_for_system_metrics(uri: str) -> None:
    """Hold the active run open until MLflow's monitor has logged a first sample (≤ 20 s): the
    tiny trainings end within the sampling interval, and a run ended before the first sample
    gets no system metrics at all."""
    active = mlflow.active_run()
    assert active is not None
    run_id, client = active.info.run_id, MlflowClient(uri)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(k.startswith("system/") for k in client.get_run(run_id).data.metrics):
            return
        time.sleep(0.1)
    raise AssertionError("no system metrics within 20 s")


# --- one tracked training of each kind, shared by the tests that only read it --------------------


@dataclass
class Trained:
    project: TinyProject
    client: MlflowClient
    runs: dict[str, Run]
    summaries: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, _mlflow_db_template: Path) -> Trained:
    """`run.train` of the CNN and the Transformer in one tiny project with a sqlite store; the
    cwd, environment and `run.Trainer` are restored before the tests read the results."""
    folder = tmp_path_factory.mktemp("tracked")
    with (
        pytest.MonkeyPatch.context() as patch,
        use_tiny_project(folder, patch, _mlflow_db_template) as project,
    ):
        uri = project.tracking_uri
        hook_after_epoch(
            patch, lambda row: wait_for_system_metrics(uri) if row["epoch"] == 1 else None
        )
        summaries = {
            name: run_module.train(name, project.params) for name in ("cnn", "transformer")
        }
    client = MlflowClient(uri)
    runs = {}
    for name in summaries:
        info = json.loads((project.root / "data/models" / name / "mlflow_run.json").read_text())
        runs[name] = client.get_run(info["run_id"])
    return Trained(project, client, runs, summaries)


def test_the_run_finished_in_the_configured_store(trained: Trained) -> None:
    for name, run in trained.runs.items():
        assert run.info.status == "FINISHED"
        info = json.loads(
            (trained.project.root / "data/models" / name / "mlflow_run.json").read_text()
        )
        assert info["tracking_uri"] == trained.project.tracking_uri
        assert info["experiment_id"] == run.info.experiment_id
        experiment = trained.client.get_experiment(run.info.experiment_id)
        assert experiment.name == trained.project.params.mlflow.experiment
        # artifacts beside the sqlite file, whatever the working directory
        assert (
            experiment.artifact_location
            == (
                Path(trained.project.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
            ).as_uri()
        )


def test_params_share_names_across_model_families(trained: Trained) -> None:
    params = trained.project.params
    transformer = trained.runs["transformer"].data.params
    for key in SHARED_PARAMS:
        assert key in transformer, key
    config = params.train["transformer"]
    assert transformer["train.lr"] == str(config.lr)
    assert transformer["train.batch_size"] == str(config.batch_size)
    assert transformer["train.epochs"] == str(config.epochs)
    assert transformer["model.name"] == "transformer"
    assert transformer["model.family"] == config.family == "transformer"
    assert transformer["seed"] == str(params.seed)
    assert transformer["model.d_model"] == str(config.model["d_model"])
    assert transformer["model.positional"] == "sinusoidal"  # a default, logged all the same
    assert transformer["data.name"] == "imdb"
    cnn = trained.runs["cnn"].data.params
    assert cnn["model.family"] == "cnn" and cnn["data.name"] == "mnist"
    train_keys = {
        name: {k for k in run.data.params if k.startswith("train.")}
        for name, run in trained.runs.items()
    }
    assert train_keys["cnn"] == train_keys["transformer"]
    assert train_keys["cnn"] == {f"train.{k}" for k in type(config).model_fields if k != "model"}


def test_every_epoch_metric_has_one_value_per_epoch(trained: Trained) -> None:
    for name, run in trained.runs.items():
        epochs = train_config(trained.project.params, name).epochs
        for key in EPOCH_METRICS:
            assert metric_steps(trained.client, run.info.run_id, key) == list(
                range(1, epochs + 1)
            ), (name, key)
        summary = trained.summaries[name]
        assert run.data.metrics["val_accuracy"] == pytest.approx(summary["final"]["val_accuracy"])
        assert run.data.metrics["best_epoch"] == summary["best_epoch"]
        assert run.data.metrics["parameters"] == summary["parameters"]


def test_tags_describe_the_run(trained: Trained) -> None:
    for name, run in trained.runs.items():
        tags = run.data.tags
        for key in TAGS:
            assert tags.get(key), (name, key)
        assert tags["model"] == name
        assert tags["model_family"] == trained.project.params.train[name].family
        assert tags["dataset"] == dataset_of(name)
        assert tags["device"] == "CPU" and tags["precision"] == "fp32"
        assert tags["torch_version"] == torch.__version__
        assert tags["dvc_stage"] == f"train@{name}"


def test_system_metrics_are_logged(trained: Trained) -> None:
    metrics = trained.runs["transformer"].data.metrics
    system = [k for k in metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system, sorted(metrics)


def test_the_training_data_is_logged_as_an_input(trained: Trained) -> None:
    [item] = dataset_inputs(trained.runs["transformer"])
    assert item.dataset.name == "imdb-train"
    prepared = trained.project.root / "data/prepared/imdb"
    # The word vectors a text model starts from are part of what it was trained on.
    files = ["train.npz", "val.npz", "word_vectors.npy"]
    assert item.dataset.digest == listed_digest(prepared, files, "rerun")[:12]
    assert {t.key: t.value for t in item.tags}["mlflow.data.context"] == "training"


def test_learning_curves_are_an_artifact(trained: Trained) -> None:
    files = [f.path for f in trained.client.list_artifacts(trained.runs["cnn"].info.run_id)]
    assert "learning_curves.png" in files


def test_text_model_reloads_and_takes_any_sequence_length(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_store(monkeypatch, trained.project.tracking_uri)
    run_id = trained.runs["transformer"].info.run_id
    expected_model = saved_model("transformer", trained.project.root)
    val = load_split(trained.project.root / "data/prepared/imdb", "val")
    width = int(val.features["lengths"][:2].max()) + 7  # the input example is val rows 0 and 1
    rng = np.random.default_rng(0)
    lengths = np.array([3, width, 9])
    tokens = np.zeros((3, width), dtype=np.int64)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(1, 50, n)
    with torch.no_grad():
        expected = expected_model(torch.from_numpy(tokens), torch.from_numpy(lengths)).numpy()

    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    predicted = pyfunc.predict(tokens)
    assert predicted.shape == (3, 2)
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)
    wider = np.pad(tokens, ((0, 0), (0, 30)))  # more padding: the same answers
    np.testing.assert_allclose(pyfunc.predict(wider), expected, rtol=1e-5, atol=1e-5)

    module = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    with torch.no_grad():
        logits = module(torch.from_numpy(tokens))
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cnn_model_reloads_and_predicts_float_images(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_store(monkeypatch, trained.project.tracking_uri)
    run_id = trained.runs["cnn"].info.run_id
    val = load_split(trained.project.root / "data/prepared/mnist", "val")
    images = val.features["images"][:5].float().div(255.0).numpy()
    with torch.no_grad():
        expected = saved_model("cnn", trained.project.root)(torch.from_numpy(images)).numpy()

    [output] = model_outputs(trained.runs["cnn"])
    logged = trained.client.get_logged_model(output.model_id)
    for uri in (f"runs:/{run_id}/model", logged.model_uri):
        predicted = mlflow.pyfunc.load_model(uri).predict(images.astype(np.float32))
        assert predicted.shape == (5, 10)
        np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-4)
    module = mlflow.pytorch.load_model(logged.model_uri)
    with torch.no_grad():
        logits = module(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# --- a real tracking server ---------------------------------------------------------------------


@pytest.mark.integration
def test_training_against_a_real_tracking_server(
    tiny_project: TinyProject, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run_module.train("cnn", tiny_project.with_train("cnn", epochs=1))

    info = json.loads(Path("data/models/cnn/mlflow_run.json").read_text())
    assert info["tracking_uri"] == mlflow_server
    client = MlflowClient(mlflow_server)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.family"] == "cnn" and run.data.params["train.epochs"] == "1"
    assert metric_steps(client, run.info.run_id, "val_accuracy") == [1]
    assert "learning_curves.png" in [f.path for f in client.list_artifacts(run.info.run_id)]
    [output] = model_outputs(run)
    files = {f.path for f in client.list_logged_model_artifacts(output.model_id)}
    assert {"MLmodel", "data"} <= files, files
    predicted = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(
        np.zeros((1, 1, 28, 28), dtype=np.float32)
    )
    assert predicted.shape == (1, 10)


# --- an unusable store --------------------------------------------------------------------------


def outputs_in(root: Path) -> list[Path]:
    return [p for p in (root / "data/models", root / "reports", root / ".dlpipe") if p.exists()]


def test_unreachable_server_fails_fast_before_any_output(
    tiny_project: TinyProject, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(DlpipeError, match="unreachable") as err:
        run_module.train("cnn", tiny_project.params)
    assert time.monotonic() - start < 10
    assert uri in str(err.value) and "require_tracking" in str(err.value)
    assert outputs_in(tiny_project.root) == []


def test_stage_script_reports_an_unreachable_server_in_one_line(
    tiny_project: TinyProject, closed_port: int
) -> None:
    tiny_project.write_params()
    uri = f"http://127.0.0.1:{closed_port}"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "train.py"), "cnn"],
        cwd=tiny_project.root,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and uri in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert outputs_in(tiny_project.root) == []


def test_an_unwritable_sqlite_folder_is_a_user_error(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"
    with pytest.raises(DlpipeError, match="missing or not writable") as err:
        check_store(uri)
    assert uri in str(err.value)


def test_optional_tracking_trains_anyway_with_a_warning(
    tiny_project: TinyProject, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port}")
    params = tiny_project.with_mlflow(require_tracking=False)
    with pytest.warns(UserWarning, match="training without MLflow tracking"):
        summary = run_module.train("cnn", params)
    assert summary["epochs"] == params.train["cnn"].epochs
    for path in (
        "data/models/cnn/model.pt",
        "reports/models/cnn/train.json",
        "reports/models/cnn/history.csv",
    ):
        assert Path(path).is_file(), path
    assert json.loads(Path("data/models/cnn/mlflow_run.json").read_text())["run_id"] is None


def test_a_logging_failure_mid_training_keeps_the_outputs(
    tiny_project: TinyProject,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_log_metrics = mlflow.log_metrics
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs.get("step"))
        if len(calls) > 1:
            raise ConnectionError("tracking server went away")
        real_log_metrics(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", flaky)
    params = tiny_project.with_train("cnn", epochs=3)
    summary = run_module.train("cnn", params)

    assert "warning: MLflow log metrics failed, tracking stops" in capsys.readouterr().err
    assert calls == [1, 2]  # tracking stopped at the failure; training did not
    assert summary["epochs"] == 3
    assert torch.load("data/models/cnn/model.pt", weights_only=True)
    assert json.loads(Path("reports/models/cnn/train.json").read_text())["epochs"] == 3
    assert len(Path("reports/models/cnn/history.csv").read_text().splitlines()) == 1 + 3
    run_id = json.loads(Path("data/models/cnn/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tiny_project.tracking_uri)
    assert metric_steps(client, run_id, "val_accuracy") == [1]
    assert client.get_run(run_id).info.status == "FINISHED"
    # what MLflow refused is kept, and delivered once it takes it again
    assert f".dlpipe/spool/{run_id}.jsonl" in summary["tracking"]
    assert "not logged: log artifact, log model" in summary["tracking"]
    monkeypatch.setattr(mlflow, "log_metrics", real_log_metrics)
    assert sync() == [
        f"MLflow run {run_id}: delivered {2 * len(EPOCH_METRICS) + 2} spooled metric values"
    ]
    assert metric_steps(client, run_id, "val_accuracy") == [1, 2, 3]
    assert client.get_run(run_id).data.metrics["best_epoch"] == summary["best_epoch"]


def test_resuming_an_untracked_training_starts_a_complete_run(
    tiny_project: TinyProject, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint written without tracking has no run to resume: the rerun opens a new run with
    its params and dataset, not a bare one."""

    def stop_after_first(row: dict[str, float]) -> None:
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    params = tiny_project.with_train("cnn", epochs=2)
    untracked = params.model_copy(
        update={"mlflow": params.mlflow.model_copy(update={"require_tracking": False})}
    )
    with monkeypatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port}")
        hook_after_epoch(patch, stop_after_first)
        with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):
            run_module.train("cnn", untracked)

    run_module.train("cnn", untracked)  # the mlflow section is not part of the checkpoint key
    run_id = json.loads(Path("data/models/cnn/mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(tiny_project.tracking_uri).get_run(run_id)
    assert run.data.params["model.family"] == "cnn"
    assert [d.dataset.name for d in dataset_inputs(run)] == ["mnist-train"]
    assert metric_steps(MlflowClient(tiny_project.tracking_uri), run_id, "val_accuracy") == [1, 2]


@pytest.mark.parametrize("how", ["store-replaced", "run-deleted"])
def test_a_checkpoint_whose_run_is_gone_resumes_into_a_new_run(
    tiny_project: TinyProject,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    _mlflow_db_template: Path,
    how: str,
) -> None:
    """Deleting mlflow.db (or the run) between an interruption and the rerun must not make the
    checkpoint unusable: the rerun resumes the training and records it in a new run."""

    def stop_after_first(row: dict[str, float]) -> None:
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    params = tiny_project.with_train("cnn", epochs=2)
    with monkeypatch.context() as patch:
        hook_after_epoch(patch, stop_after_first)
        with pytest.raises(KeyboardInterrupt):
            run_module.train("cnn", params)
    [folder] = (tiny_project.root / ".dlpipe/checkpoints").iterdir()
    state = torch.load(folder / "last.pt", weights_only=True)
    old_run_id = state["extra"]["mlflow_run_id"]
    uri = tiny_project.tracking_uri
    if how == "run-deleted":
        MlflowClient(uri).delete_run(old_run_id)
    else:
        shutil.copyfile(_mlflow_db_template, tmp_path / "fresh.db")
        uri = f"sqlite:///{tmp_path / 'fresh.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    run_module.train("cnn", params)
    out, err = capsys.readouterr()
    assert "resuming from epoch 1" in out
    assert f"MLflow run {old_run_id} is not in {uri}; starting a new run" in err
    run_id = json.loads(Path("data/models/cnn/mlflow_run.json").read_text())["run_id"]
    assert run_id != old_run_id
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.family"] == "cnn"
    assert [d.dataset.name for d in dataset_inputs(run)] == ["mnist-train"]
    assert metric_steps(MlflowClient(uri), run_id, "val_accuracy") == [1, 2]  # epoch 1 too


# --- where the store is -------------------------------------------------------------------------


def test_tracking_uri_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri() == "http://tracking.example:5000"


def test_tracking_uri_defaults_to_sqlite_under_the_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path.resolve()
    monkeypatch.chdir(root)
    assert tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    assert tracking_uri().startswith("sqlite:////")  # absolute

    temp_copy = root / ".dvc" / "tmp" / "exps" / "tmpab12cd" / "stages"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    assert project_root() == root
    assert tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"


def test_training_run_without_a_store_is_inert(closed_port: int) -> None:
    with pytest.warns(UserWarning, match="training without MLflow tracking"):
        run = StageRun(f"http://127.0.0.1:{closed_port}", required=False)
    run.start("x", "y", None, {}, {"a": 1}, 1.0)
    run.log_metrics({"m": 1.0}, step=1)
    run.end()
    assert run.run_id is None and not run.active


def test_flatten_names_nested_keys_with_dots() -> None:
    assert flatten("train", {"lr": 0.1, "model": {"d_model": 8, "x": {"y": True}}}) == {
        "train.lr": 0.1,
        "train.model.d_model": 8,
        "train.model.x.y": True,
    }


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://alice:tok@host:5000", "http://***@host:5000"),
        (
            "https://tok@host/mlflow?token=abc&experiment=1",
            "https://***@host/mlflow?token=***&experiment=1",
        ),
        ("https://host/?api_key=zz#frag", "https://host/?api_key=***#frag"),
        (
            "server http://u:p@10.0.0.1:5/ is unreachable",
            "server http://***@10.0.0.1:5/ is unreachable",
        ),
        ("https://host/?Access_Token=q;password=w", "https://host/?Access_Token=***;password=***"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("databricks://profile:prefix", "databricks://profile:prefix"),
        ("mail me at user@example.com", "mail me at user@example.com"),
    ],
)
def test_redact_hides_uri_credentials(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_a_redacted_recorded_store_is_the_current_one_or_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:tok@host:5000")
    assert recorded_store("https://***@host:5000", "f.json", "r1") == "https://alice:tok@host:5000"
    assert recorded_store(None, "f.json", "r1") == "https://alice:tok@host:5000"
    assert recorded_store("sqlite:////x/mlflow.db", "f.json", "r1") == "sqlite:////x/mlflow.db"
    with pytest.raises(
        DlpipeError, match=r"^f.json: the training's MLflow run r1 is in https://\*\*\*@other"
    ) as err:
        recorded_store("https://***@other:5000", "f.json", "r1")
    assert "tok" not in str(err.value)


# --- the tracking server dies mid-training ------------------------------------------------------


def spool_files(root: Path) -> list[Path]:
    return sorted((root / ".dlpipe" / "spool").glob("*.jsonl"))


def train_while_the_server_dies(
    project: TinyProject, server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], str]:
    """Train the CNN for 3 epochs against `server`, killed (SIGKILL) once epoch 1 is logged, so
    that it is dead throughout epoch 2; returns the summary and the run id."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    with monkeypatch.context() as patch:
        hook_after_epoch(patch, lambda row: server.kill() if row["epoch"] == 1 else None)
        summary = run_module.train("cnn", project.with_train("cnn", epochs=3))
    run_id = json.loads(Path("data/models/cnn/mlflow_run.json").read_text())["run_id"]
    return summary, run_id


@pytest.mark.integration
def test_metrics_survive_a_dead_tracking_server_and_are_synced_once(
    tiny_project: TinyProject,
    killable_mlflow_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The server dies during epoch 2: training finishes with complete outputs, the undelivered
    metrics wait in a spool file, and `dlpipe sync` delivers them once it is back (#10)."""
    server = killable_mlflow_server
    summary, run_id = train_while_the_server_dies(tiny_project, server, monkeypatch)
    assert summary["epochs"] == 3
    history = Path("reports/models/cnn/history.csv").read_text().splitlines()
    assert [row["epoch"] for row in csv.DictReader(history)] == ["1", "2", "3"]
    assert Path("data/models/cnn/model.pt").is_file()
    assert not list((tiny_project.root / ".dlpipe" / "checkpoints").iterdir())  # finished
    [spool] = spool_files(tiny_project.root)
    assert spool.name == f"{run_id}.jsonl"
    assert "MLflow" in summary["tracking"] and "dlpipe sync" in summary["tracking"]
    assert str(spool.relative_to(tiny_project.root)) in summary["tracking"]
    capsys.readouterr()
    tiny_project.write_params()

    with pytest.raises(SystemExit) as down:  # still dead: one line, the spool is kept
        cli_main(["sync"])
    assert down.value.code == 2 and "unreachable" in capsys.readouterr().err
    assert spool_files(tiny_project.root) == [spool]

    server.start()
    client = MlflowClient(server.url)
    assert metric_steps(client, run_id, "val_accuracy") == [1]
    assert client.get_run(run_id).info.status == "RUNNING"  # its end could not be recorded
    # a delivery interrupted earlier had already logged val_accuracy of epoch 2
    client.log_metric(run_id, "val_accuracy", summary["final"]["val_accuracy"], step=2)

    assert cli_main(["sync"]) == 0
    assert f"{run_id}" in capsys.readouterr().out
    for key in EPOCH_METRICS:
        assert metric_steps(client, run_id, key) == [1, 2, 3], key
    run = client.get_run(run_id)
    assert run.data.metrics["best_epoch"] == summary["best_epoch"]
    assert run.data.metrics["parameters"] == summary["parameters"]
    assert run.info.status == "FINISHED"
    assert spool_files(tiny_project.root) == []
    assert cli_main(["sync"]) == 0  # nothing left: nothing logged twice
    assert "nothing to deliver" in capsys.readouterr().out
    assert metric_steps(client, run_id, "train_loss") == [1, 2, 3]


# --- a failure never leaves a FINISHED run --------------------------------------------------------


def family_runs(project: TinyProject) -> list[Run]:
    client = MlflowClient(project.tracking_uri)
    experiment = client.get_experiment_by_name(project.params.mlflow.experiment)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def test_a_model_that_cannot_be_built_leaves_no_run(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the model comes before the run starts: `dlpipe compare` can never show an empty
    run of a training that never began (#10)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise DlpipeError("transformer: heads must divide d_model")

    monkeypatch.setattr(run_module, "build_model", refuse)
    with pytest.raises(DlpipeError, match="heads must divide"):
        run_module.train("cnn", tiny_project.params)
    assert family_runs(tiny_project) == []


def test_a_failure_after_the_run_started_ends_it_failed(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails between the run's start and its end marks it FAILED, never FINISHED
    (MLflow's exit hook would otherwise finish it), and `dlpipe compare` skips it (#10)."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(run_module, "fit_and_record", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_module.train("cnn", tiny_project.params)
    [run] = family_runs(tiny_project)
    assert run.info.status == "FAILED"


# --- no orphans: a run a killed process left RUNNING is ended KILLED ------------------------------


def orphan_of_a_killed_process(project: TinyProject, model: str) -> str:
    """A run of `model` started by a process that is then killed with SIGKILL: RUNNING for good,
    unless something ends it. Returns its id."""
    code = (
        "import os, signal\n"
        "from dlpipe.tracking.run import StageRun\n"
        f"run = StageRun({project.tracking_uri!r}, required=True)\n"
        f"run.start({project.params.mlflow.experiment!r}, 'doomed', None, {{'model': {model!r}}},"
        " {}, 5.0)\n"
        "print(run.run_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=project.root
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    run_id = done.stdout.split()[-1]
    assert MlflowClient(project.tracking_uri).get_run(run_id).info.status == "RUNNING"
    return run_id


def test_the_next_training_ends_a_killed_training_s_run_whatever_its_key(
    tiny_project: TinyProject, capsys: pytest.CaptureFixture[str]
) -> None:
    orphan = orphan_of_a_killed_process(tiny_project, "cnn")
    other = orphan_of_a_killed_process(tiny_project, "transformer")  # another model's: kept
    run_module.train("cnn", tiny_project.with_train("cnn", epochs=1, lr=0.003))  # another key
    client = MlflowClient(tiny_project.tracking_uri)
    ended = client.get_run(orphan)
    assert ended.info.status == "KILLED"
    assert "is gone" in ended.data.tags["killed_reason"]
    assert f"MLflow run {orphan} of cnn left RUNNING: marked KILLED" in capsys.readouterr().out
    assert client.get_run(other).info.status == "RUNNING"
    tiny_project.write_params()
    assert cli_main(["sync"]) == 0  # sync ends every model's
    assert client.get_run(other).info.status == "KILLED"
    assert "of transformer left RUNNING: marked KILLED" in capsys.readouterr().out


def test_a_live_owner_s_run_is_kept_and_a_silent_remote_one_ended(
    tiny_project: TinyProject,
) -> None:
    """Never the run of a process still at work; a run owned on another machine only after
    `orphan_after_s` of silence."""
    from dlpipe.tracking.orphans import OWNER_TAG, end_orphans, owner

    client = MlflowClient(tiny_project.tracking_uri)
    experiment = client.create_experiment("orphans")
    now = int(time.time() * 1000)

    def running(tag: str, started_s_ago: float) -> str:
        start = now - int(started_s_ago * 1000)
        tags = {"model": "cnn", OWNER_TAG: tag}
        return client.create_run(experiment, start_time=start, tags=tags).info.run_id

    mine = running(owner(), 3600)
    remote_busy = running("elsewhere:123:456", 30)
    remote_silent = running("elsewhere:123:456", 3600)
    client.log_metric(remote_busy, "system/cpu_utilization_percentage", 50.0, timestamp=now)
    lines = end_orphans(client, experiment, "cnn", set(), stale_after_s=900)
    assert [client.get_run(r).info.status for r in (mine, remote_busy, remote_silent)] == [
        "RUNNING",
        "RUNNING",
        "KILLED",
    ]
    reason = client.get_run(remote_silent).data.tags["killed_reason"]
    assert reason.startswith("nothing logged for 36") and "(owner: elsewhere:123:456)" in reason
    assert len(lines) == 1 and remote_silent in lines[0]


def test_requirement_check_skips_the_module_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """skip_module_scan spares MLflow's scan of every installed file, and a pin this environment
    does not satisfy is still reported (the check reads the installed version, not the scan)."""
    import importlib_metadata
    from mlflow.utils import requirements_utils

    from dlpipe.tracking.requirements import skip_module_scan

    def scan() -> None:
        raise AssertionError("packages_distributions() ran")

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(importlib_metadata, "packages_distributions", scan)
    skip_module_scan()
    assert requirements_utils._check_requirement_satisfied(f"numpy=={np.__version__}") is None
    mismatch = requirements_utils._check_requirement_satisfied("numpy==0.0.1")
    assert mismatch is not None and mismatch.installed_version == np.__version__
