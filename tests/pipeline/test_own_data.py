"""A newcomer's own data trains with params.yaml entries alone.

In a copy of the project, as docs/own-data.md says: a folder of colour pictures (four
classes, several sizes and file types, `dvc add`-ed) and a CSV of support tickets (five classes)
become two `datasets` entries, and a `cnn` and a `transformer` on them two `train` entries. No
other file changes. The real smoke pipeline then prepares, trains, evaluates, registers and reports
them (the built-in datasets are left out of this copy's params.yaml to keep it quick and offline);
the gates judge them with no settings (better than always answering the largest class), and
`dlpipe predict` answers with the data's own class names. Editing one picture afterwards leaves
only that dataset's prepare stage out of date.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from support.own_data import COLOURS, TOPICS, picture, tickets

from dlpipe.smoke.workspace import workspace_files

ROOT = Path(__file__).resolve().parents[2]


def copy_project(dest: Path) -> Path:
    files, _ = workspace_files(ROOT)
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    identity = ["-c", "user.name=newcomer", "-c", "user.email=newcomer@dlpipe.invalid"]
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", *identity, "-c", "commit.gpgsign=false", "commit", "-qm", "clone"],
    ):
        subprocess.run(command, cwd=dest, check=True)
    return dest


def own_pictures(root: Path, per_class: int = 150) -> None:
    """`root/<class>/<n>.png|jpg`: pictures of 24-48 px, mostly colour, a few grayscale."""
    for c, name in enumerate(COLOURS):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = picture(COLOURS[name], (24 + (i * 7) % 25, 24 + (i * 5) % 25), 1000 * c + i)
            image.save(root / name / (f"{i}.jpg" if i % 3 else f"{i}.png"))


def own_params(project: Path) -> list[str]:
    """The newcomer's params.yaml edits: two datasets and two models (copies of the built-in
    sections with another name and dataset). Returns the files touched."""
    path = project / "params.yaml"
    raw: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["datasets"] = {
        "shapes": {"format": "images", "path": "data/own/shapes", "image_size": [32, 32]},
        "tickets": {
            "format": "table",
            "path": "data/own/tickets.csv",
            "text": "body",
            "label": "category",
        },
    }
    raw["train"] = {
        "shapes_cnn": {**raw["train"]["cnn"], "dataset": "shapes"},
        "tickets_transformer": {**raw["train"]["transformer"], "dataset": "tickets"},
    }
    raw["gates"]["floors"] = raw["gates"]["smoke_floors"] = {}  # the chance gate judges them
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return ["params.yaml"]


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_own_pictures_and_texts_train_with_params_entries_alone(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    env.pop("DLPIPE_DATA_MIRROR", None)  # nothing to download: the data is the user's own
    own_pictures(project / "data/own/shapes")
    frame = tickets(600, seed=3)
    frame.to_csv(project / "data/own/tickets.csv", index=False)
    run([sys.executable, "-m", "dvc", "add", "-q", "data/own/shapes"], project, env)
    assert own_params(project) == ["params.yaml"]
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--", "src", "stages", "dvc.yaml"],
        cwd=project,
        capture_output=True,
        text=True,
    ).stdout
    assert changed == "", f"only params.yaml and the data may change:\n{changed}"

    out = tmp_path / "out"
    smoke = [sys.executable, "-m", "dlpipe.smoke", "--out", str(out), "--keep"]
    run([*smoke, "--tmp", str(tmp_path)], project, env)
    [work] = tmp_path.glob("dlpipe-smoke-*")
    repo = work / "repo"

    reports = out / "reports"
    for model in ("shapes_cnn", "tickets_transformer"):
        evaluation = json.loads((reports / "models" / model / "eval.json").read_text())
        registry = json.loads((reports / "models" / model / "registry.json").read_text())
        assert registry["registered_model"] == f"dlpipe-{model}"
        print(f"{model}: test accuracy {evaluation['test_accuracy']:.4f}")
    for dataset, linear in (("shapes", ["pixels_logreg"]), ("tickets", ["nbsvm", "tfidf_logreg"])):
        assert list(json.loads((reports / "linear" / f"{dataset}.json").read_text())) == linear
    summary = (reports / "summary.md").read_text()
    for name in ("shapes_cnn", "tickets_transformer", "pixels_logreg", "tfidf_logreg", "nbsvm"):
        assert name in summary
    assert (reports / "models/shapes_cnn/mistakes/mistakes.png").is_file()
    with Image.open(reports / "models/shapes_cnn/mistakes/mistakes.png") as figure:
        assert figure.mode in ("RGB", "RGBA")  # colour pictures shown in colour
    mistakes = (reports / "models/tickets_transformer/mistakes/mistakes.md").read_text()
    header = [cell.strip() for cell in mistakes.splitlines()[0].strip("|").split("|")]
    assert header == ["text", "actual", "predicted", "confidence"]

    # Gated with no settings: each beats always answering its largest class.
    gates = [sys.executable, "-m", "dlpipe.gates", "--smoke", "--reports", str(reports / "models")]
    assert "chance" in run(gates, repo, env)

    # Served with the data's own words, from the DVC outputs and from the registry.
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env["PYTHONPATH"] = str(repo / "src")
    owl = tmp_path / "owl.png"
    picture(COLOURS["owl"], (64, 48), seed=5).convert("RGBA").save(owl)
    for model, inputs, classes in (
        ("shapes_cnn", [str(owl)], set(COLOURS)),
        ("tickets_transformer", ["my parcel never came, where is the courier"], set(TOPICS)),
    ):
        answers = []
        for extra in ([], ["--model-uri", f"models:/dlpipe-{model}@champion"]):
            predict = [sys.executable, "-m", "dlpipe.cli", "predict", model, *inputs, "--json"]
            [record] = json.loads(run([*predict, *extra], repo, env))
            assert set(record["probabilities"]) == classes
            assert record["label_name"] in classes
            answers.append(record)
        assert answers[0]["label_name"] == answers[1]["label_name"]
        print(f"{model}: {inputs[0]} -> {answers[0]['label_name']}")

    # Editing one picture leaves only its dataset's prepare stage out of date.
    edited = repo / "data/own/shapes/owl/0.png"
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(edited)
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], repo, env))
    assert set(status) <= {"prepare@shapes", "data/own/shapes.dvc"} and "prepare@shapes" in status
    shutil.rmtree(work)
