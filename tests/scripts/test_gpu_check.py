"""`make gpu-check` (scripts/gpu_check.py) where a CPU can check it: one line and exit 0 without a
GPU, the full pipeline's params (the project's own, every family on CUDA), one table row per
model from its reports."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from support.families import REPO_ROOT

from dlpipe.smoke.params import smoke_params

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"


def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gpu-check: no GPU (") and result.stdout.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_pipeline_runs_the_projects_own_params_on_the_gpu() -> None:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params = smoke_params(raw, gpu_check().full_run_overrides(raw))
    assert params["datasets"] == raw["datasets"]  # full data, not the smoke slices
    assert params["evaluate"] == raw["evaluate"]
    for name, section in raw["train"].items():
        assert params["train"][name] == {**section, "device": "cuda"}


def test_a_table_row_per_model(tmp_path: Path) -> None:
    folder = tmp_path / "cnn"
    folder.mkdir()
    train = {
        "epochs": 2,
        "samples_per_s": 51234.5,
        "precision": "bf16",
        "best": {"val_accuracy": 0.99123},
    }
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "eval.json").write_text(json.dumps({"test_accuracy": 0.9921}))
    with open(folder / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "epoch_time_s", "peak_gpu_memory_mb"])
        writer.writerows([[1, 1.5, 310.2], [2, 0.5, 301.0]])
    row = gpu_check().model_row(tmp_path, "cnn", "cnn (DDP)", 2)
    assert row == ["cnn (DDP)", "2", "2", "1.00", "51,234", "0.9912", "0.9921", "310", "bf16"]
