"""What a finished smoke run must show: every declared output parses, every family has its
MLflow run with params, history, test metrics, a logged model and a champion, `dvc status` is
clean."""

from __future__ import annotations

import csv
import gzip
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dlpipe import paths
from dlpipe.config import Params, train_config
from dlpipe.smoke.workspace import SmokeFailure, declared_outputs, run_command

CHAMPION = "champion"


def expected_stages(params: Params) -> list[str]:
    """The stages dvc.yaml must define for the datasets and models params.yaml declares."""
    return [
        "fetch",
        *(f"prepare@{d}" for d in params.datasets),
        *(f"train@{m}" for m in params.models),
        *(f"evaluate@{m}" for m in params.models),
        *(f"linear@{d}" for d in params.datasets),
        "report",
    ]


def _check_csv(path: Path) -> None:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2 or not all(rows[0]) or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("expected a header and at least one row of the same width")


def _check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        if image.format != "PNG" or min(image.size) < 10:
            raise ValueError(f"not a real PNG image ({image.format}, {image.size})")


def _check_npz(path: Path) -> None:
    import numpy as np

    with np.load(path, allow_pickle=False) as arrays:
        if not arrays.files or any(arrays[key].size == 0 for key in arrays.files):
            raise ValueError("no arrays, or an empty one")


def _check_json(path: Path) -> None:
    if not json.loads(path.read_text(encoding="utf-8")):
        raise ValueError("empty JSON")


def _check_text(path: Path) -> None:
    if not path.read_text(encoding="utf-8").strip():
        raise ValueError("empty")


def _check_gzip(path: Path) -> None:
    with gzip.open(path, "rb") as handle:
        while handle.read(1 << 20):
            pass


def _check_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    if pq.read_metadata(path).num_rows == 0:
        raise ValueError("no rows")


def _check_torch(path: Path) -> None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not state:
        raise ValueError("empty state dict")


def _check_any(path: Path) -> None:
    if path.stat().st_size == 0:
        raise ValueError("empty file")


CHECKERS: dict[str, Callable[[Path], None]] = {
    ".json": _check_json,
    ".csv": _check_csv,
    ".png": _check_png,
    ".npz": _check_npz,
    ".md": _check_text,
    ".txt": _check_text,
    ".gz": _check_gzip,
    ".parquet": _check_parquet,
    ".pt": _check_torch,
}


def check_file(path: Path) -> None:
    """Raise ValueError (or the parser's own error) unless `path` parses as its suffix says."""
    CHECKERS.get(path.suffix.lower(), _check_any)(path)


def check_outputs(repo: Path, params: Params) -> int:
    """Every output of every stage in dvc.yaml exists and parses; the number of files checked."""
    stages = declared_outputs(repo)
    missing_stages = sorted(set(expected_stages(params)) - set(stages))
    if missing_stages:
        raise SmokeFailure(f"dvc.yaml lacks stage(s) {', '.join(missing_stages)}")
    problems, checked = [], 0
    for stage, outs in stages.items():
        for out in outs:
            declared = repo / str(out.def_path)
            if declared.is_dir():
                files = sorted(p for p in declared.rglob("*") if p.is_file())
                if not files:
                    problems.append(f"{stage}: {out.def_path}/ is empty")
            elif declared.is_file():
                files = [declared]
            else:
                problems.append(f"{stage}: {out.def_path} was not written")
                continue
            for path in files:
                checked += 1
                try:
                    check_file(path)
                except Exception as err:
                    rel = path.relative_to(repo)
                    problems.append(f"{stage}: {rel} does not parse ({type(err).__name__}: {err})")
    if problems:
        raise SmokeFailure("outputs:\n  " + "\n  ".join(problems))
    return checked


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def check_linear(repo: Path, runs: list[Any]) -> list[str]:
    """Each linear model in reports/linear/<dataset>.json has its FINISHED run, with the same
    test accuracy."""
    problems = []
    logged = {run.data.tags.get("model"): run for run in runs}
    for path in sorted((repo / paths.REPORTS_DIR / "linear").glob("*.json")):
        for result in json.loads(path.read_text()).values():
            name = f"{result['model']}@{result['dataset']}"
            run = logged.get(name)
            if run is None or run.info.status != "FINISHED":
                problems.append(f"MLflow: no finished run of {name}")
            elif abs(run.data.metrics.get("test_accuracy", -1) - result["test_accuracy"]) > 1e-6:
                problems.append(f"MLflow: {name} test_accuracy differs")
    return problems


def check_mlflow(uri: str, params: Params, repo: Path) -> dict[str, str]:
    """Each model's run: params, per-epoch history, test metrics, a logged model, the champion
    alias in the registry. Returns {model: run id}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    if experiment is None:
        raise SmokeFailure(f"MLflow: no experiment {params.mlflow.experiment!r} in {uri}")
    found = client.search_runs([experiment.experiment_id], max_results=100)
    runs = [run for run in found if run.data.tags.get("linear") != "true"]
    by_model: dict[str, list[Any]] = {}
    for run in runs:
        by_model.setdefault(run.data.tags.get("model", "?"), []).append(run)
    problems = check_linear(repo, [run for run in found if run not in runs])
    if sorted(by_model) != sorted(params.models) or len(runs) != len(params.models):
        counts = {model: len(found) for model, found in by_model.items()}
        raise SmokeFailure(f"MLflow: expected one run per model, found {counts}")
    run_ids: dict[str, str] = {}
    reports = repo / paths.MODEL_REPORTS_DIR
    for model in params.models:
        run = by_model[model][0]
        run_ids[model] = run_id = run.info.run_id
        config = train_config(params, model)
        where = f"MLflow run {model} ({run_id[:8]})"
        if run.info.status != "FINISHED":
            problems.append(f"{where}: status {run.info.status}")
        expected = {
            "seed": str(params.seed),
            "model.name": model,
            "model.family": config.family,
            "train.epochs": str(config.epochs),
            "train.lr": str(config.lr),
            "train.batch_size": str(config.batch_size),
            "data.name": config.dataset,
        }
        for key, value in expected.items():
            if run.data.params.get(key) != value:
                problems.append(
                    f"{where}: param {key} is {run.data.params.get(key)!r}, expected {value!r}"
                )
        epochs = int(json.loads((reports / model / "train.json").read_text())["epochs"])
        for key in ("train_loss", "val_accuracy"):
            history = client.get_metric_history(run_id, key)
            steps = sorted(m.step for m in history)
            if steps != list(range(1, epochs + 1)) or not _finite([m.value for m in history]):
                problems.append(f"{where}: {key} logged at steps {steps}, expected 1..{epochs}")
        evaluation = json.loads((reports / model / "eval.json").read_text())
        logged = run.data.metrics.get("test_accuracy")
        if logged is None or abs(logged - evaluation["test_accuracy"]) > 1e-6:
            problems.append(
                f"{where}: test_accuracy {logged} (eval.json: {evaluation['test_accuracy']})"
            )
        models = client.search_logged_models(
            experiment_ids=[experiment.experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
        if not any(str(m.status).endswith("READY") for m in models):
            problems.append(f"{where}: no logged model ({len(models)} found, none READY)")
        name = f"{params.registry.name_prefix}{model}"
        if params.registry.enabled:
            try:
                champion = client.get_model_version_by_alias(name, CHAMPION)
            except Exception as err:
                problems.append(f"registry: {name}@{CHAMPION} missing ({type(err).__name__})")
            else:
                if champion.run_id != run_id:
                    problems.append(f"registry: {name}@{CHAMPION} is from run {champion.run_id}")
    if problems:
        raise SmokeFailure("MLflow:\n  " + "\n  ".join(problems))
    return run_ids


def check_dvc_status(repo: Path, env: dict[str, str]) -> None:
    status = json.loads(
        run_command([sys.executable, "-m", "dvc", "status", "--json"], repo, env) or "{}"
    )
    if status:
        raise SmokeFailure(f"`dvc status` after repro is not clean: {json.dumps(status)}")
