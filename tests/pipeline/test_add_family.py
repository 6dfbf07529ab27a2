"""Adding a model family takes one module and one params.yaml section: dvc.yaml's stages come
from params.yaml (`train.<model>` names the family and the dataset), so it is not edited.

In a copy of the project, add examples/mlp.py as a fourth family the way docs/models.md says (those
two places, nothing else), check that DVC then has its stages, run the real smoke pipeline on it
(slow), and check the new family end to end: trained, evaluated, in MLflow and the registry, in
the report, and predictable through `dlpipe predict` and the pyfunc model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from dlpipe.smoke.workspace import workspace_files

ROOT = Path(__file__).resolve().parents[2]


def add_mlp_family(project: Path) -> list[str]:
    """The two edits of docs/models.md's "How to add a model"; the files touched."""
    shutil.copyfile(ROOT / "examples" / "mlp.py", project / "src/dlpipe/models/mlp.py")
    params = project / "params.yaml"
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    raw["train"]["mlp"] = {
        **raw["train"]["cnn"],  # the shared training keys
        "family": "mlp",
        "dataset": "mnist",
        "batch_size": 128,
        "model": {"hidden": 256, "dropout": 0.1},
    }
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return ["src/dlpipe/models/mlp.py", "params.yaml"]


def copy_project(dest: Path) -> Path:
    files, _ = workspace_files(ROOT)
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def digit_png(path: Path) -> Path:
    """A dark "7" drawn on white paper, as a person would draw it."""
    image = Image.new("L", (90, 120), 255)
    ImageDraw.Draw(image).line([(15, 15), (75, 15), (35, 105)], fill=0, width=9)
    image.save(path)
    return path


def test_the_new_family_s_stages_come_from_its_params_section(tmp_path: Path) -> None:
    """After the two edits, DVC has train@mlp and evaluate@mlp (on the mlp module and the MNIST
    data), the copy's params.yaml validates with the new family, and dvc.yaml is unchanged."""
    from dvc.repo import Repo

    project = copy_project(tmp_path / "project")
    add_mlp_family(project)
    assert (project / "dvc.yaml").read_bytes() == (ROOT / "dvc.yaml").read_bytes()
    with Repo(str(project)) as repo:
        stages = {stage.name: stage for stage in repo.index.stages}
    for name in ("train@mlp", "evaluate@mlp"):
        deps = {str(dep.def_path) for dep in stages[name].deps}
        assert {"src/dlpipe/models/mlp.py", "data/prepared/mnist"} <= deps, (name, deps)
        assert not any(d.startswith("src/dlpipe/models/") and "mlp" not in d for d in deps)
    assert [str(out.def_path) for out in stages["train@mlp"].outs][0] == "data/models/mlp"

    # The copy's own src (with mlp.py): the model section validates against the mlp schema.
    check = (
        "from dlpipe.config import load_params\n"
        "from dlpipe.family import model_family, validate_models\n"
        "from dlpipe.smoke.checks import expected_stages\n"
        "params = load_params()\n"
        "print(sorted(validate_models(params)), model_family(params, 'mlp').name)\n"
        "print(' '.join(expected_stages(params)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    models, stage_names = done.stdout.splitlines()
    assert models == "['cnn', 'mlp', 'rnn', 'transformer'] mlp"
    assert {"train@mlp", "evaluate@mlp", "linear@mnist"} <= set(stage_names.split())
    assert set(stage_names.split()) <= set(stages)  # every stage the smoke run expects exists


@pytest.mark.slow
@pytest.mark.integration
def test_a_fourth_family_needs_only_its_module_and_a_params_section(
    tmp_path: Path, data_mirror: str
) -> None:
    mirror = data_mirror
    project = copy_project(tmp_path / "project")
    touched = add_mlp_family(project)
    assert touched == ["src/dlpipe/models/mlp.py", "params.yaml"]
    assert (project / "dvc.yaml").read_bytes() == (ROOT / "dvc.yaml").read_bytes()

    # The real smoke run: dvc repro of all stages, outputs, MLflow runs, registry, dvc status.
    # The copy's own src (with mlp.py) is what runs, in this process's interpreter.
    out = tmp_path / "out"
    smoke = [sys.executable, "-m", "dlpipe.smoke", "--mirror", mirror, "--out", str(out)]
    smoke += ["--models", "mlp"]  # its own stages: the others are the CI smoke step's
    result = subprocess.run(
        [*smoke, "--keep", "--tmp", str(tmp_path)],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project / "src")},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    [work] = tmp_path.glob("dlpipe-smoke-*")
    repo = work / "repo"

    evaluation = json.loads((out / "reports/models/mlp/eval.json").read_text())
    assert evaluation["test_accuracy"] >= 0.88  # 5,000 images, two epochs: 0.913 measured
    summary = (out / "reports/summary.md").read_text()
    assert "| mlp " in summary and "dlpipe-mlp" in summary
    assert (out / "reports/models/mlp/mistakes/mistakes.png").is_file()

    # Predictable through the CLI (local outputs) and the registered pyfunc.
    image = digit_png(tmp_path / "seven.png")
    env = {
        **os.environ,
        "PYTHONPATH": str(repo / "src"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
    }
    dlpipe = [sys.executable, "-m", "dlpipe.cli", "predict", "mlp", str(image), "--json"]
    records = []
    for extra in ([], ["--model-uri", "models:/dlpipe-mlp@champion"]):
        result = subprocess.run(
            dlpipe + extra, cwd=repo, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        [record] = json.loads(result.stdout)
        assert record["input"] == str(image)
        assert set(record["probabilities"]) == {str(digit) for digit in range(10)}
        records.append(record)
    local, registered = records  # the DVC output and the registry's model are the same model
    assert local["label_name"] == registered["label_name"]
    for digit, value in local["probabilities"].items():
        assert registered["probabilities"][digit] == pytest.approx(value, abs=1e-6)
    print(f"mlp: test accuracy {evaluation['test_accuracy']:.4f}; a drawn 7 -> {local}")
    shutil.rmtree(work)
