"""`deterministic: true`: two trainings write byte-identical model files and identical metrics on
the CPU, and the MLflow run says how deterministic it was: `deterministic` is `false`, `true`,
or `best-effort (<kernels>)` when a kernel without a deterministic variant ran (#10).

The byte comparison covers every file of data/models/<model> but mlflow_run.json (the run id),
and train.json and history.csv without their timing keys.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from support.families import REPO_ROOT
from support.tiny import TinyProject, hook_after_epoch

from dlpipe.training import run as run_module
from dlpipe.training import runtime as runtime_module
from dlpipe.training.runtime import determinism_label, seed_everything, watch_nondeterminism

TIMING_KEYS = {"epoch_time_s", "samples_per_s", "train_time_s", "wall_time_s"}
NOT_COMPARED = {"mlflow_run.json"}  # names the run: another one each time


@pytest.fixture(autouse=True)
def _deterministic_mode_restored() -> Iterator[None]:
    """The in-process trainings here turn torch's deterministic mode on: off again afterwards."""
    yield
    torch.use_deterministic_algorithms(False)


def model_files(root: Path, model: str) -> dict[str, bytes]:
    folder = root / "data" / "models" / model
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in NOT_COMPARED}
    # the checksums, all but that of the run-naming file
    sums = files["SHA256SUMS"].decode().splitlines(keepends=True)
    files["SHA256SUMS"] = "".join(
        s for s in sums if not s.rstrip().endswith(tuple(NOT_COMPARED))
    ).encode()
    return files


def metrics(root: Path, model: str) -> dict[str, Any]:
    reports = root / "reports" / "models" / model
    summary = json.loads((reports / "train.json").read_text())
    with open(reports / "history.csv", newline="") as handle:
        history = [
            {k: v for k, v in row.items() if k not in TIMING_KEYS} for row in csv.DictReader(handle)
        ]
    return {
        "train.json": {k: v for k, v in summary.items() if k not in TIMING_KEYS},
        "history": history,
    }


def run_id(root: Path, model: str) -> str:
    return str(json.loads((root / "data/models" / model / "mlflow_run.json").read_text())["run_id"])


def remove_outputs(root: Path, model: str) -> None:
    """As `dvc repro` does before it reruns the stage."""
    shutil.rmtree(root / "data" / "models" / model)
    shutil.rmtree(root / "reports" / "models" / model)


def determinism_tag(project: TinyProject, model: str) -> str:
    run = MlflowClient(project.tracking_uri).get_run(run_id(project.root, model))
    return str(run.data.tags["deterministic"])


def take_outputs(project: TinyProject, model: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A deterministic training's model files and metrics; its outputs removed for the next."""
    taken = model_files(project.root, model), metrics(project.root, model)
    assert determinism_tag(project, model) == "true"
    remove_outputs(project.root, model)
    return taken


def assert_same_runs(
    first: tuple[dict[str, bytes], dict[str, Any]], second: tuple[dict[str, bytes], dict[str, Any]]
) -> None:
    (first_files, first_metrics), (second_files, second_metrics) = first, second
    assert first_files.keys() == second_files.keys()
    assert "model.pt" in first_files
    different = [name for name in first_files if first_files[name] != second_files[name]]
    assert not different, f"files differ between two deterministic runs: {different}"
    assert first_metrics == second_metrics


@pytest.mark.parametrize(
    ("model", "updates"),
    [("cnn", {}), ("transformer", {"model": {"dropout": 0.3}})],
    ids=["cnn", "transformer-dropout"],
)
def test_two_deterministic_trainings_write_byte_identical_models(
    tiny_project: TinyProject, model: str, updates: dict[str, Any]
) -> None:
    params = tiny_project.with_train(model, epochs=2, deterministic=True, **updates)
    results = []
    for _ in range(2):
        run_module.train(model, params)
        results.append(take_outputs(tiny_project, model))
    assert_same_runs(*results)
    assert len(results[0][1]["history"]) == 2


@pytest.mark.slow
def test_two_stage_processes_write_byte_identical_models(tiny_project: TinyProject) -> None:
    """The same through `python stages/train.py`, in two processes with other hash seeds (set
    and dict orders differ between them, unlike between two trainings in one process)."""
    model = "transformer"
    tiny_project.write_params(
        tiny_project.with_train(model, epochs=2, deterministic=True, model={"dropout": 0.3})
    )
    results = []
    for hash_seed in ("1", "2"):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT / "src"),
            "PYTHONHASHSEED": hash_seed,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        done = subprocess.run(
            [sys.executable, str(REPO_ROOT / "stages" / "train.py"), model],
            cwd=tiny_project.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        results.append(take_outputs(tiny_project, model))
    assert_same_runs(*results)


# --- the `deterministic` tag ----------------------------------------------------------------------


def put_without_accumulate() -> None:
    """A real CPU kernel without a deterministic variant: torch warns in warn-only mode."""
    torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), accumulate=False)


def test_the_watch_names_each_kernel_without_a_deterministic_variant_once() -> None:
    seed_everything(0, deterministic=True)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        with watch_nondeterminism() as ops:
            put_without_accumulate()
            put_without_accumulate()
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
            torch.mm(torch.ones(2, 2), torch.ones(2, 2))  # deterministic: no warning
            warnings.warn(  # torch's message when CUBLAS_WORKSPACE_CONFIG is missing on CUDA
                "Deterministic behavior was enabled with either `torch.use_deterministic_"
                "algorithms(True)` or `at::Context::setDeterministicAlgorithms(true)`, but this "
                "operation is not deterministic because it uses CuBLAS and you have CUDA >= 10.2.",
                UserWarning,
                stacklevel=1,
            )
    assert ops == ["put_", "CuBLAS"]
    texts = [str(w.message) for w in shown]
    # still shown, once per kernel; other warnings pass through untouched
    assert sum("put_ does not have a deterministic" in t for t in texts) == 1, texts
    assert "an unrelated warning" in texts
    assert determinism_label(True, ops) == "best-effort (put_, CuBLAS)"
    assert determinism_label(True, []) == "true"
    assert determinism_label(False, []) == "false"


def test_a_kernel_seen_before_the_watch_is_still_named() -> None:
    """Python shows a warning once per place by default: a kernel that already warned (an
    earlier training in the same process) must not slip past the next watch."""
    seed_everything(0, deterministic=True)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("default")
        put_without_accumulate()
        with watch_nondeterminism() as ops:
            put_without_accumulate()
    assert ops == ["put_"]


def test_without_deterministic_mode_nothing_is_named() -> None:
    seed_everything(0, deterministic=False)  # also turns off a mode left on before
    with watch_nondeterminism() as ops:
        put_without_accumulate()
    assert ops == []


def during_epoch_1(action: Callable[[], None]) -> Callable[[dict[str, float]], None]:
    def hook(row: dict[str, float]) -> None:
        if row["epoch"] == 1:
            action()

    return hook


@pytest.mark.parametrize(
    ("deterministic", "nondeterministic_kernel", "tag"),
    [(False, False, "false"), (True, True, "best-effort (put_)")],
)
def test_the_run_is_tagged_with_how_deterministic_the_training_was(
    tiny_project: TinyProject,
    monkeypatch: pytest.MonkeyPatch,
    deterministic: bool,
    nondeterministic_kernel: bool,
    tag: str,
) -> None:
    """(`true` is the tag of the byte-identical trainings above.)"""
    if nondeterministic_kernel:  # one in the training loop, as a CUDA-only kernel would be
        hook_after_epoch(monkeypatch, during_epoch_1(put_without_accumulate))
    run_module.train("cnn", tiny_project.with_train("cnn", epochs=1, deterministic=deterministic))
    assert determinism_tag(tiny_project, "cnn") == tag


class RuntimeMade(Exception):
    pass


def test_deterministic_cuda_gets_its_cublas_setting_before_cuda_starts(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once: it must be set before the runtime is made
    (which starts CUDA), not after, when the model is seeded. A value the user set is kept."""
    seen: list[str | None] = []

    def select_device(*args: Any, **kwargs: Any) -> Any:  # where CUDA would start
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise RuntimeMade

    monkeypatch.setattr(runtime_module, "select_device", select_device)
    for deterministic, preset in [(False, None), (True, None), (True, ":16:8")]:
        if preset is None:
            monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        else:
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)
        params = tiny_project.with_train("cnn", deterministic=deterministic)
        with pytest.raises(RuntimeMade):
            run_module.train("cnn", params)
    assert seen == [None, ":4096:8", ":16:8"]
