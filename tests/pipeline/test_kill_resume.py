"""A real signal kills the real train stage mid-epoch; the rerun resumes bit-exactly (#10).

Each test runs `python stages/train.py <model>` three times in the tiny project, as `dvc repro`
would: once uninterrupted (the reference), once with a signal delivered at a random batch of
epoch 2, and once more to resume. The kill run goes through a wrapper script (written to the
test's tmp folder, library code untouched) that, when the training fetches batch k of epoch 2,
writes a marker file and waits; the test then sends the process SIGKILL, SIGTERM or SIGINT from
outside. After the kill no DVC output of the stage is half-written, the checkpoint of epoch 1 is
there, and the MLflow run is KILLED (SIGTERM, SIGINT) or left RUNNING (SIGKILL: nothing can
record it). The rerun resumes from epoch 1, continues and finishes that same run, and leaves
exactly the uninterrupted run's weights (torch.equal) and per-epoch metrics (==).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from support.families import REPO_ROOT, dataset_of
from support.tiny import TinyProject

from dlpipe.data.tensors import load_split
from dlpipe.training.checkpoint import CheckpointStore

# Three processes a test, each importing torch and MLflow: ~30-40 s a test on a 2-core machine.
pytestmark = pytest.mark.slow

STAGE = REPO_ROOT / "stages" / "train.py"
TIMING_KEYS = {"epoch_time_s", "samples_per_s", "train_time_s", "wall_time_s"}
KILL_EPOCH = 2
BATCH_SIZE = 8  # 256 tiny training rows: 32 batches an epoch

# Run as the kill attempt's main script: the stage itself, with `Split.batch` counting the
# training batches of epoch KILL_EPOCH (evaluation batches are not counted). At batch
# KILL_BATCH (0-based: after that many optimizer steps of the epoch) it writes KILL_MARKER and
# waits for the test's signal; exit 99 says none came.
KILL_WRAPPER = """\
import os, runpy, sys, time
from pathlib import Path

from dlpipe.data.tensors import Split
from dlpipe.training.trainer import Trainer

EPOCH, BATCH = int(os.environ["KILL_EPOCH"]), int(os.environ["KILL_BATCH"])
MARKER = Path(os.environ["KILL_MARKER"])
seen = {"epoch": 0, "batch": -1}
train_epoch, split_batch = Trainer._train_epoch, Split.batch


def counted_train_epoch(self, train, epoch, scheduler):
    seen["epoch"], seen["batch"] = epoch, -1
    try:
        return train_epoch(self, train, epoch, scheduler)
    finally:
        seen["epoch"] = 0


def counted_batch(self, *args, **kwargs):
    if seen["epoch"] == EPOCH:
        seen["batch"] += 1
        if seen["batch"] == BATCH:
            MARKER.write_text(f"{EPOCH} {BATCH} {os.getpid()}")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.01)
            print("kill wrapper: no signal came", file=sys.stderr)
            sys.exit(99)
    return split_batch(self, *args, **kwargs)


Trainer._train_epoch = counted_train_epoch
Split.batch = counted_batch
sys.argv = [os.environ["KILL_STAGE"], *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _sigint_as_from_a_terminal() -> None:
    """The child gets SIGINT's default disposition (Python turns it into KeyboardInterrupt), as
    under a terminal, even where this test runs with SIGINT ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_stage(
    project: TinyProject, model: str, kill_at: tuple[int, Path] | None = None
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    script = STAGE
    if kill_at is not None:
        batch, marker = kill_at
        script = marker.parent / "kill_wrapper.py"
        script.write_text(KILL_WRAPPER, encoding="utf-8")
        env |= {
            "KILL_EPOCH": str(KILL_EPOCH),
            "KILL_BATCH": str(batch),
            "KILL_MARKER": str(marker),
            "KILL_STAGE": str(STAGE),
        }
    return subprocess.Popen(
        [sys.executable, str(script), model],
        cwd=project.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_sigint_as_from_a_terminal,
    )


def finish(process: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the stage ran over {timeout} s:\n{output[-3000:]}") from None
    return process.returncode, output


def kill_at_batch(
    process: subprocess.Popen[str], marker: Path, sig: signal.Signals, where: str
) -> tuple[int, str]:
    """Wait for the wrapper's marker, send `sig` from outside, wait for the process to end."""
    deadline = time.monotonic() + 180
    while not marker.exists():
        if process.poll() is not None:
            code, output = finish(process)
            raise AssertionError(
                f"{where}: ended ({code}) before the kill point:\n{output[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{where}: the kill point never came")
        time.sleep(0.02)
    assert marker.read_text().split()[2] == str(process.pid), where
    process.send_signal(sig)
    return finish(process, timeout=60)


def outputs(project: TinyProject, model: str) -> dict[str, Any]:
    """What the stage left: weights, per-epoch metrics and train.json, timing keys dropped."""
    models, reports = (
        project.root / "data/models" / model,
        project.root / "reports/models" / model,
    )
    with open(reports / "history.csv", newline="") as handle:
        history = [
            {k: float(v) for k, v in row.items() if k not in TIMING_KEYS}
            for row in csv.DictReader(handle)
        ]
    summary = json.loads((reports / "train.json").read_text())
    return {
        "weights": torch.load(models / "model.pt", weights_only=True),
        "history": history,
        "summary": {k: v for k, v in summary.items() if k not in TIMING_KEYS},
        "run_id": json.loads((models / "mlflow_run.json").read_text())["run_id"],
    }


def remove_outputs(project: TinyProject, model: str) -> None:
    """What `dvc repro` does before it reruns a stage: its outputs go."""
    shutil.rmtree(project.root / "data/models" / model)
    shutil.rmtree(project.root / "reports/models" / model)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize(
    ("sig", "model", "updates"),
    [
        # dropout > 0 and warm-up + cosine: the RNG and scheduler state must resume too
        (signal.SIGKILL, "transformer", {"model": {"dropout": 0.3}, "warmup_epochs": 0.5}),
        (signal.SIGTERM, "cnn", {}),
        (signal.SIGINT, "cnn", {}),
    ],
    ids=["sigkill-transformer", "sigterm-cnn", "sigint-cnn"],
)
def test_a_signal_at_a_random_batch_of_epoch_2_resumes_to_the_uninterrupted_result(
    tiny_project: TinyProject,
    tmp_path: Path,
    sig: signal.Signals,
    model: str,
    updates: dict[str, Any],
) -> None:
    params = tiny_project.with_train(model, epochs=2, batch_size=BATCH_SIZE, **updates)
    tiny_project.write_params(params)
    prepared = tiny_project.root / "data/prepared" / dataset_of(model)
    steps_per_epoch = load_split(prepared, "train").steps(BATCH_SIZE, 1)
    batch = random.Random(f"{sig.name}-{model}").randrange(1, steps_per_epoch)
    where = f"{sig.name} at batch {batch}/{steps_per_epoch} of epoch {KILL_EPOCH} ({model})"
    client = MlflowClient(tiny_project.tracking_uri)
    checkpoints = tiny_project.root / ".dlpipe" / "checkpoints"

    code, output = finish(start_stage(tiny_project, model))
    assert code == 0, output[-3000:]
    expected = outputs(tiny_project, model)
    assert [row["epoch"] for row in expected["history"]] == [1, 2]
    remove_outputs(tiny_project, model)

    marker = tmp_path / "kill-point"
    code, output = kill_at_batch(
        start_stage(tiny_project, model, (batch, marker)), marker, sig, where
    )
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, f"{where}: exit {code}\n{output[-3000:]}"
    else:  # the stage's own handling: KeyboardInterrupt, the run ended KILLED, exit 130
        assert code == 130, f"{where}: exit {code}\n{output[-3000:]}"
        assert "interrupted; last finished epoch is checkpointed" in output, where
    assert "epoch 1/2" in output and "epoch 2/2" not in output, f"{where}\n{output[-3000:]}"

    # no DVC output half-written: the training had not reached them, so none exists
    for out in (f"data/models/{model}", f"reports/models/{model}"):
        assert not (tiny_project.root / out).exists(), f"{where}: {out} left behind"
    assert temp_files(tiny_project.root) == [], where
    [folder] = checkpoints.glob(f"{model}-*")
    state = CheckpointStore(folder).load()
    assert state is not None and state["epoch"] == 1, where
    run_id = state["extra"]["mlflow_run_id"]
    assert run_id and run_id != expected["run_id"], where
    interrupted = client.get_run(run_id)
    status = "RUNNING" if sig == signal.SIGKILL else "KILLED"  # SIGKILL: nothing can record it
    assert interrupted.info.status == status, where
    assert steps(client, run_id, "val_accuracy") == [1], where

    code, output = finish(start_stage(tiny_project, model))
    assert code == 0, f"{where}: rerun exit {code}\n{output[-3000:]}"
    assert f"resuming from epoch 1 ({folder / 'last.pt'})" in output, f"{where}\n{output[-3000:]}"
    resumed = outputs(tiny_project, model)
    different = [
        k
        for k in expected["weights"]
        if not torch.equal(expected["weights"][k], resumed["weights"][k])
    ]
    assert resumed["weights"].keys() == expected["weights"].keys(), where
    assert not different, f"{where}: tensors differ from the uninterrupted run's: {different}"
    assert resumed["history"] == expected["history"], where
    assert resumed["summary"] == expected["summary"], where

    # the interrupted attempt's run, continued and finished by the rerun: each epoch once, with
    # the uninterrupted run's values
    assert resumed["run_id"] == run_id, where
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED", where
    for key in ("val_accuracy", "val_loss", "train_loss", "lr"):
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        straight = {m.step: m.value for m in client.get_metric_history(expected["run_id"], key)}
        assert steps(client, run_id, key) == [1, 2], (where, key)
        assert logged == straight, (where, key)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 2, where  # no third run
    assert not any(checkpoints.glob(f"{model}-*")), where  # cleared after success
    assert temp_files(tiny_project.root) == [], where
