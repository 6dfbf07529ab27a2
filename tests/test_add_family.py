"""Adding a model family takes one module, one params.yaml section and one dvc.yaml entry.

In a copy of the project, add examples/mlp.py as a fourth family the way the README says (those
three places, nothing else), run the real smoke pipeline on it, and check the new family end to
end: trained, evaluated, in MLflow and the registry, in the report, and predictable through
`dlpipe predict` and the pyfunc model.
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

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "mlp: {dataset: mnist, inputs: images}"


def add_mlp_family(project: Path) -> list[str]:
    """The three edits of README's "How to add a model"; the files touched."""
    shutil.copyfile(ROOT / "examples" / "mlp.py", project / "src/dlpipe/models/mlp.py")
    params = project / "params.yaml"
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    raw["train"]["mlp"] = {
        **raw["train"]["cnn"],
        "batch_size": 128,
        "model": {"hidden": 256, "dropout": 0.1},
    }
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    dvc_yaml = project / "dvc.yaml"
    text = dvc_yaml.read_text(encoding="utf-8")
    anchor = "      cnn: {dataset: mnist, inputs: images}\n"
    assert text.count(anchor) == 2, "the train and evaluate foreach lists"
    dvc_yaml.write_text(text.replace(anchor, anchor + f"      {ENTRY}\n"), encoding="utf-8")
    return ["src/dlpipe/models/mlp.py", "params.yaml", "dvc.yaml"]


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


@pytest.mark.slow
@pytest.mark.integration
def test_a_fourth_family_needs_only_its_module_a_params_section_and_a_dvc_entry(
    tmp_path: Path, data_mirror: str
) -> None:
    mirror = data_mirror
    project = copy_project(tmp_path / "project")
    touched = add_mlp_family(project)
    assert touched == ["src/dlpipe/models/mlp.py", "params.yaml", "dvc.yaml"]

    # The real smoke run: dvc repro of all stages, outputs, MLflow runs, registry, dvc status.
    # The copy's own src (with mlp.py) is what runs, in this process's interpreter.
    out = tmp_path / "out"
    smoke = [sys.executable, "-m", "dlpipe.smoke", "--mirror", mirror, "--out", str(out)]
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
