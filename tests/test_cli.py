"""The `dlpipe` command: predictions on raw inputs, `compare`, and one-line user errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw
from support.families import REPO_ROOT
from support.trained import RegistryStore, TrainedFolders

from dlpipe.cli import COLUMNS, format_compare, main
from dlpipe.config import Params
from dlpipe.serving import Predictor

VENV_BIN = Path(sys.executable).parent


@dataclass
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def _restore_mlflow_state() -> Iterator[None]:
    """`main` points MLflow's global URI at the store and quiets its logger, as a process should;
    put both back so later tests are not affected."""
    from mlflow.tracking._tracking_service import utils

    uri, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    level = logging.getLogger("mlflow").level
    yield
    utils._tracking_uri = uri
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env
    logging.getLogger("mlflow").setLevel(level)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `dlpipe <argv>` in-process: exit code, stdout, stderr."""

    def run(*argv: str) -> Result:
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def write_project_params(folder: Path) -> Path:
    """The project's params.yaml in `folder`: `dlpipe predict` finds a model's family there."""
    return Path(shutil.copyfile(REPO_ROOT / "params.yaml", folder / "params.yaml"))


@pytest.fixture
def project(
    trained_folders: TrainedFolders, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> TrainedFolders:
    """cwd = a copy of a project holding trained outputs (data/models, data/prepared/imdb) and
    the project's params.yaml."""
    root = tmp_path / "project"
    shutil.copytree(trained_folders.root, root)
    write_project_params(root)
    monkeypatch.chdir(root)
    return TrainedFolders(root)


def digit_png(path: Path, ink: str = "black", paper: str = "white") -> Path:
    image = Image.new("RGB", (90, 70), paper)
    ImageDraw.Draw(image).line([(40, 10), (62, 10), (48, 60)], fill=ink, width=6)
    image.save(path)
    return path


def assert_one_error_line(result: Result, *fragments: str) -> None:
    assert result.code == 2, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err and result.out == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- predict: happy paths ------------------------------------------------------------------------


def test_predict_cnn_prints_one_line_per_image(
    project: TrainedFolders, cli: Cli, tmp_path: Path
) -> None:
    first = digit_png(tmp_path / "seven.png")
    second = digit_png(tmp_path / "inverted.png", ink="white", paper="black")
    result = cli("predict", "cnn", str(first), str(second))

    assert result.code == 0, result.err
    lines = [line.split("\t") for line in result.out.splitlines()]
    assert [line[0] for line in lines] == [str(first), str(second)]
    expected = Predictor.from_folder(project.model_dir("cnn")).predict([first.read_bytes()])
    for _, label, probability in lines:
        assert label == expected["label_name"][0]
        assert float(probability) == pytest.approx(max(expected["probabilities"][0]), abs=1e-4)


def test_predict_text_from_arguments_and_a_file(
    project: TrainedFolders, cli: Cli, tmp_path: Path
) -> None:
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("A fine film.\n\n   \nAwful,\tboring film.\n", encoding="utf-8")
    result = cli("predict", "rnn", "--file", str(reviews))
    assert result.code == 0, result.err
    lines = [line.split("\t") for line in result.out.splitlines()]
    assert [line[0] for line in lines] == ["A fine film.", "Awful, boring film."]
    rnn = Predictor.from_folder(project.model_dir("rnn"))
    expected = rnn.predict(["A fine film.", "Awful,\tboring film."])
    assert [line[1] for line in lines] == expected["label_name"].tolist()
    top = [max(row) for row in expected["probabilities"]]
    assert [float(line[2]) for line in lines] == pytest.approx(top, abs=1e-4)

    long_review = "word " * 200
    result = cli("predict", "transformer", "Great!", long_review)
    first, second = (line.split("\t") for line in result.out.splitlines())
    assert first[0] == "Great!"
    assert len(second[0]) == 50 and second[0].endswith("...")


def test_predict_json_records(project: TrainedFolders, cli: Cli) -> None:
    result = cli("predict", "transformer", "Great!", "--json", "Dull and slow.")
    assert result.code == 0, result.err
    records = json.loads(result.out)
    assert [r["input"] for r in records] == ["Great!", "Dull and slow."]
    for record in records:
        assert set(record) == {"input", "label", "label_name", "probability", "probabilities"}
        assert record["label_name"] == ["negative", "positive"][record["label"]]
        assert record["probabilities"][record["label_name"]] == record["probability"]
        assert sum(record["probabilities"].values()) == pytest.approx(1.0)


def test_predict_through_a_registered_model_matches_the_local_outputs(
    project: TrainedFolders,
    registry_store: RegistryStore,
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_store.uri)
    texts = ["Great!", "word " * 100]
    uri = "models:/dlpipe-transformer@champion"
    remote = json.loads(cli("predict", "transformer", "--model-uri", uri, "--json", *texts).out)
    local = json.loads(cli("predict", "transformer", "--json", *texts).out)
    assert [r["label"] for r in remote] == [r["label"] for r in local]
    for mine, theirs in zip(remote, local, strict=True):
        assert mine["probability"] == pytest.approx(theirs["probability"], rel=1e-5)

    image = digit_png(tmp_path / "digit.png")
    result = cli("predict", "cnn", "--model-uri", "models:/dlpipe-cnn@champion", str(image))
    assert result.code == 0 and result.out.startswith(f"{image}\t"), result.err


def test_predict_finds_a_model_s_family_in_params(
    project: TrainedFolders, cli: Cli, tmp_path: Path
) -> None:
    """A model is a family on a dataset: `digits`, a cnn model, is served from
    data/models/digits with the cnn family's input kind (images), read from --params."""
    shutil.copytree(project.model_dir("cnn"), project.model_dir("digits"))
    raw = yaml.safe_load((project.root / "params.yaml").read_text(encoding="utf-8"))
    raw["train"]["digits"] = {**raw["train"]["cnn"], "family": "cnn"}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    image = digit_png(tmp_path / "seven.png")

    result = cli("predict", "digits", "--params", str(tmp_path / "mine.yaml"), str(image))
    assert result.code == 0, result.err
    [(path, label, _)] = [line.split("\t") for line in result.out.splitlines()]
    expected = Predictor.from_folder(project.model_dir("cnn")).predict([image.read_bytes()])
    assert (path, label) == (str(image), expected["label_name"][0])
    # params.yaml (the default) trains no `digits`
    assert_one_error_line(cli("predict", "digits", str(image)), "unknown model 'digits'")


def test_the_console_script_runs_in_a_fresh_process(project: TrainedFolders) -> None:
    script = VENV_BIN / "dlpipe"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dlpipe.cli"]
    done = subprocess.run(
        [*command, "predict", "rnn", "What a lovely film."],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("What a lovely film.\t")

    failed = subprocess.run(
        [sys.executable, "-m", "dlpipe.cli", "predict", "cnn", "missing.png"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.splitlines() == ["error: missing.png: no such file"]


# --- predict: user errors ------------------------------------------------------------------------


def test_image_path_errors(project: TrainedFolders, cli: Cli, tmp_path: Path) -> None:
    assert_one_error_line(cli("predict", "cnn", str(tmp_path / "nope.png")), "no such file")
    assert_one_error_line(cli("predict", "cnn", str(tmp_path)), "is a directory")
    text = tmp_path / "notes.png"
    text.write_text("not a picture", encoding="utf-8")
    assert_one_error_line(cli("predict", "cnn", str(text)), str(text), "not an image")
    good = digit_png(tmp_path / "good.png")
    assert_one_error_line(cli("predict", "cnn", str(good), str(text)), "notes.png")
    assert_one_error_line(cli("predict", "cnn"), "at least one image")
    assert_one_error_line(cli("predict", "cnn", "--file", str(text)), "--file")


def test_an_unreadable_file_is_one_line(
    project: TrainedFolders, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests may run as root, where chmod 000 does not stop reading: fake the refusal."""
    path = digit_png(tmp_path / "locked.png")

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert_one_error_line(cli("predict", "cnn", str(path)), "cannot read", "Permission denied")


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_one_line(project: TrainedFolders, cli: Cli, text: str) -> None:
    assert_one_error_line(cli("predict", "transformer", "fine", text), "text 2: empty text")


def test_review_file_errors(project: TrainedFolders, cli: Cli, tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un film tr\xe8s ennuyeux\n".encode("latin-1"))
    assert_one_error_line(cli("predict", "rnn", "--file", str(latin1)), "not UTF-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    assert_one_error_line(cli("predict", "rnn", "--file", str(blank)), "no texts")
    assert_one_error_line(cli("predict", "rnn", "--file", str(tmp_path / "x")), "no such file")
    assert_one_error_line(cli("predict", "rnn"), "at least one text")


def test_usage_errors_are_one_line(project: TrainedFolders, cli: Cli) -> None:
    assert_one_error_line(
        cli("predict", "gpt", "hello"), "unknown model 'gpt'; params.yaml trains: cnn, rnn"
    )
    assert_one_error_line(cli("predict", "rnn", "--params", "nope.yaml", "hi"), "nope.yaml")
    assert_one_error_line(cli(), "required")
    assert_one_error_line(cli("train"), "invalid choice")
    assert_one_error_line(cli("predict", "rnn", "--bogus", "x"), "unrecognized arguments")


def test_missing_trained_outputs_name_the_stage_to_run(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained_folders: TrainedFolders
) -> None:
    monkeypatch.chdir(tmp_path)
    write_project_params(tmp_path)
    image = digit_png(tmp_path / "digit.png")
    assert_one_error_line(cli("predict", "cnn", str(image)), "dvc repro train@cnn")
    assert_one_error_line(cli("predict", "transformer", "hi"), "dvc repro train@transformer")
    shutil.copytree(trained_folders.model_dir("rnn"), tmp_path / "data" / "models" / "rnn")
    (tmp_path / "data" / "models" / "rnn" / "tokenizer.json").unlink()
    assert_one_error_line(cli("predict", "rnn", "hi"), "tokenizer.json", "dvc repro")


def test_model_uri_errors(
    project: TrainedFolders,
    registry_store: RegistryStore,
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    closed_port: int,
) -> None:
    image = str(digit_png(tmp_path / "digit.png"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_store.uri)
    missing = cli("predict", "cnn", "--model-uri", "models:/dlpipe-cnn@nobody", image)
    assert_one_error_line(missing, "cannot load models:/dlpipe-cnn@nobody", "nobody")
    wrong = cli("predict", "cnn", "--model-uri", "models:/dlpipe-transformer@champion", image)
    assert_one_error_line(wrong, "takes ['text']")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port}")
    down = cli("predict", "rnn", "--model-uri", "models:/dlpipe-rnn@champion", "hi")
    assert_one_error_line(down, "unreachable")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}")
    absent = cli("predict", "rnn", "--model-uri", "models:/dlpipe-rnn@champion", "hi")
    assert_one_error_line(absent, "no such database")
    assert not (tmp_path / "none").exists()


# --- compare -------------------------------------------------------------------------------------


@pytest.fixture
def runs_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _mlflow_db_template: Path
) -> dict[str, str]:
    """cwd with a params.yaml naming experiment `cmp`, and a store holding fake runs:
    cnn (an older finished run, the newest finished one with test metrics, a newer failed one
    and a running one), transformer (training metrics only) and no rnn. Returns run ids."""
    shutil.copyfile(_mlflow_db_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    params = Params().model_dump()
    params["datasets"] = {
        "mnist": {"format": "mnist", "path": "data/raw/mnist"},
        "imdb": {"format": "imdb", "path": "data/raw/imdb"},
    }
    datasets = {"cnn": "mnist", "rnn": "imdb", "transformer": "imdb"}
    params["train"] = {name: {"family": name, "dataset": ds} for name, ds in datasets.items()}
    params["mlflow"]["experiment"] = "cmp"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    client = MlflowClient(uri)
    experiment = client.create_experiment("cmp", (tmp_path / "art").as_uri())

    def run(
        model: str,
        start: int,
        status: str,
        metrics: dict[str, float],
        family: str = "",
        linear: str = "",
    ) -> str:
        """A run of `model`; with `linear`, a linear model's run on that dataset."""
        tags = {"model": model, "model_family": family or model, "device": "cpu"}
        tags |= (
            {"dataset": linear, "linear": "true"}
            if linear
            else {"dataset": datasets.get(model, "")}
        )
        run_id = client.create_run(experiment, start_time=start, tags=tags).info.run_id
        for epoch, (acc, seconds, speed) in enumerate(
            [(0.90, 10.0, 1000.0), (0.95, 12.0, 1200.0), (0.93, 14.0, 1400.0)], 1
        ):
            client.log_metric(run_id, "val_accuracy", acc, step=epoch)
            client.log_metric(run_id, "epoch_time_s", seconds, step=epoch)
            client.log_metric(run_id, "samples_per_s", speed, step=epoch)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id, status)
        return run_id

    tested = {
        "best_epoch": 2,
        "parameters": 93322,
        "test_accuracy": 0.9876,
        "test_macro_f1": 0.9871,
        "latency_b1_ms": 1.234,
        "model_size_mb": 0.36,
    }
    ids = {
        "cnn_old": run("cnn", 1_000, "FINISHED", {"test_accuracy": 0.5}),
        "cnn": run("cnn", 2_000, "FINISHED", tested),
        "cnn_failed": run("cnn", 3_000, "FAILED", {"test_accuracy": 0.1}),
        "transformer": run(
            "transformer", 2_500, "FINISHED", {"parameters": 1_500_000, "test_accuracy": 0.92}
        ),
        # a linear model's run is found by its model tag, <name>@<dataset>, not by its family
        "tfidf_imdb": run(
            "tfidf_logreg@imdb",
            2_600,
            "FINISHED",
            {"test_accuracy": 0.9035},
            family="tfidf_logreg",
            linear="imdb",
        ),
        "nbsvm_imdb": run(
            "nbsvm@imdb",
            2_700,
            "FINISHED",
            {"test_accuracy": 0.9100},
            family="nbsvm",
            linear="imdb",
        ),
        # another model of the cnn family: not one of params.yaml's, never a cnn row
        "cnn_other": run("wide", 5_000, "FINISHED", {"test_accuracy": 0.2}, family="cnn"),
    }
    ids["cnn_running"] = client.create_run(
        experiment, start_time=4_000, tags={"model": "cnn", "model_family": "cnn"}
    ).info.run_id
    return ids


def test_compare_shows_the_latest_finished_run_of_each_model(
    runs_store: dict[str, str], cli: Cli
) -> None:
    result = cli("compare", "--json")
    assert result.code == 0, result.err
    rows = {row["model"]: row for row in json.loads(result.out)}
    # the models, then each dataset's linear models
    assert list(rows) == [
        "cnn",
        "rnn",
        "transformer",
        "pixels_logreg@mnist",
        "nbsvm@imdb",
        "tfidf_logreg@imdb",
    ]
    cnn = rows["cnn"]
    assert cnn["run_id"] == runs_store["cnn"]
    assert cnn["epochs"] == 3 and cnn["val_accuracy"] == 0.95  # the best epoch's value
    assert cnn["train_time_s"] == 36.0 and cnn["samples_per_s"] == 1200.0
    assert (cnn["test_accuracy"], cnn["latency_b1_ms"], cnn["device"]) == (0.9876, 1.234, "cpu")
    assert set(rows["rnn"].values()) == {"rnn", None}
    assert set(rows["pixels_logreg@mnist"].values()) == {"pixels_logreg@mnist", None}  # no run
    assert rows["tfidf_logreg@imdb"]["run_id"] == runs_store["tfidf_imdb"]
    assert rows["tfidf_logreg@imdb"]["test_accuracy"] == 0.9035
    # points over the best linear model of the same dataset (nbsvm's 0.9100 here)
    assert rows["tfidf_logreg@imdb"]["over_linear"] is None  # linear models get no such value
    assert rows["transformer"]["test_accuracy"] == 0.92
    assert rows["transformer"]["over_linear"] == pytest.approx(1.0)
    assert rows["cnn"]["over_linear"] is None  # mnist's linear model has no run
    assert rows["transformer"]["val_accuracy"] == 0.93  # no best_epoch: the last value


def test_compare_table(runs_store: dict[str, str], cli: Cli) -> None:
    result = cli("compare")
    assert result.code == 0, result.err
    header, rule, *lines = result.out.splitlines()
    assert set(rule) <= {"-", " "}
    assert header.split()[:3] == ["model", "run", "id"] and "macro-F1" in header
    table = {line.split()[0]: line.split() for line in lines}
    assert table["cnn"] == [
        "cnn",
        runs_store["cnn"],
        "93.3k",
        "3",
        "36.0s",
        "1,200",
        "0.9500",
        "0.9876",
        "0.9871",
        "-",  # no linear model of mnist has a run
        "1.23",
        "0.36",
        "cpu",
    ]
    assert table["rnn"] == ["rnn"] + ["-"] * 12
    assert table["transformer"][2] == "1.5M" and table["transformer"][7:10] == [
        "0.9200",
        "-",
        "+1.00",
    ]


def test_compare_lineage_shows_where_each_run_came_from(
    runs_store: dict[str, str], cli: Cli
) -> None:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    lineage = {
        "git_sha": "0123456789abcdef",
        "git_dirty": "false",
        "params_dirty": "true",
        "dvc_exp_name": "cnn-abc123-2",
        "dvc_data_md5": "d41d8cd98f00b204e980.dir",
        "dvc_train_lock": "5f1e2d3c4b5a6978",
    }
    for key, value in lineage.items():
        client.set_tag(runs_store["cnn"], key, value)
    result = cli("compare", "--lineage")
    assert result.code == 0, result.err
    header, _, *lines = result.out.splitlines()
    assert "dvc experiment" in header and "test acc" not in header
    table = {line.split()[0]: line.split() for line in lines}
    assert table["cnn"] == [
        "cnn",
        runs_store["cnn"],
        "0123456789",
        "false",
        "true",
        "cnn-abc123-2",
        "d41d8cd98f00",
        "5f1e2d3c4b5a6978",
    ]
    assert table["rnn"] == ["rnn"] + ["-"] * 7
    rows = {row["model"]: row for row in json.loads(cli("compare", "--json").out)}
    assert rows["cnn"]["dvc_exp_name"] == "cnn-abc123-2"


def test_compare_errors(
    runs_store: dict[str, str],
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    closed_port: int,
) -> None:
    assert_one_error_line(cli("compare", "--experiment", "nope"), "no experiment 'nope'")
    assert_one_error_line(cli("compare", "--params", "missing.yaml"), "missing.yaml: not found")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port}")
    assert_one_error_line(cli("compare"), "unreachable")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}")
    assert_one_error_line(cli("compare"), "no such database")


def test_format_table_shows_missing_values_as_dashes() -> None:
    text = format_compare([{"model": "cnn", "test_accuracy": float("nan")}])
    assert set(text.splitlines()[1]) <= {"-", " "}  # the rule under the header
    assert text.splitlines()[2].split() == ["cnn"] + ["-"] * (len(COLUMNS) - 1)
