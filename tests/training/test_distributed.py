"""Data-parallel training: each process's slice of every batch, and the train stage under torchrun
on the CPU (gloo): 2 processes reach 1 process's weights, keep one MLflow run, and a process
killed mid-epoch fails the stage cleanly, after which the rerun resumes.

The stage tests run `stages/train.py` with `train.cnn.nproc: 2` in the tiny project, so the stage
re-runs itself under `torchrun --standalone`, as `dvc repro` would run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from support.families import REPO_ROOT, family_model
from support.tiny import TinyProject

from dlpipe.config import train_config
from dlpipe.data.tensors import WIDTH_STEP, Batch, Split, load_split
from dlpipe.errors import DlpipeError
from dlpipe.family import DataMeta
from dlpipe.training import run as run_module
from dlpipe.training.checkpoint import CheckpointStore
from dlpipe.training.distributed import World, check_batch_size
from dlpipe.training.runtime import make_runtime
from dlpipe.training.trainer import Trainer

STAGE = REPO_ROOT / "stages" / "train.py"


def text_split(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 200, (n,), generator=g)
    tokens = torch.randint(1, 50, (n, 200), generator=g, dtype=torch.int32)
    return Split({"tokens": tokens, "lengths": lengths}, torch.randint(0, 2, (n,), generator=g))


def image_split(n: int) -> Split:
    return Split({"images": torch.zeros(n, 28, 28, dtype=torch.uint8)}, torch.arange(n) % 10)


# --- each process's slice of the global order ---------------------------------------------------


@pytest.mark.parametrize("split", [text_split(1000), image_split(1000)], ids=["text", "images"])
@pytest.mark.parametrize(("batch_size", "world_size"), [(32, 2), (30, 3), (64, 4), (7, 1)])
def test_processes_slice_the_same_global_batches(
    split: Split, batch_size: int, world_size: int
) -> None:
    def plan(rank: int, size: int) -> list[Batch]:
        return split.batches(batch_size, torch.Generator().manual_seed(3), rank, size)

    whole = [b.index for b in plan(0, 1)]
    parts = [plan(rank, world_size) for rank in range(world_size)]
    steps = split.steps(batch_size, world_size)
    assert all(len(p) == steps for p in parts)  # every process takes as many steps
    short = len(split) % batch_size
    dropped = 0 < short < world_size  # a last batch too short to slice
    kept = [b for b in whole if not (dropped and len(b) == short)]
    assert len(kept) == steps
    lengths = split.features.get("lengths")
    for step, rows in enumerate(kept):
        mine = [p[step] for p in parts]
        assert torch.equal(torch.cat([b.index for b in mine]), rows)  # slices, in rank order
        assert sum(b.share * len(rows) / world_size for b in mine) == pytest.approx(len(rows))
        for b in mine:
            expected = 0
            if lengths is not None:  # the longest row, rounded up to WIDTH_STEP, within the array
                step_up = -(-int(lengths[b.index].max()) // WIDTH_STEP) * WIDTH_STEP
                expected = min(step_up, split.features["tokens"].shape[1])
            assert b.width == expected  # planned on the host, no device read needed


def test_an_uneven_last_batch_is_weighted_to_the_global_mean() -> None:
    """70 rows, batch 32 on 2 processes: 16+16, 16+16, then 3+3 of the last 6 rows."""
    batches = [image_split(70).batches(32, None, rank, 2) for rank in range(2)]
    assert [[len(b.index) for b in p] for p in batches] == [[16, 16, 3], [16, 16, 3]]
    assert [b.share for b in batches[0]] == [1.0, 1.0, 1.0]
    uneven = [image_split(69).batches(32, None, rank, 2)[-1] for rank in range(2)]
    assert [len(b.index) for b in uneven] == [3, 2]
    # DDP averages the two processes' gradients: (1.2 * mean3 + 0.8 * mean2) / 2 = sum5 / 5
    assert [b.share for b in uneven] == [pytest.approx(1.2), pytest.approx(0.8)]

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(69, 4), torch.randint(0, 3, (69,))

    def gradient(rows: torch.Tensor, share: float = 1.0) -> torch.Tensor:
        model.zero_grad()
        (torch.nn.functional.cross_entropy(model(x[rows]), y[rows]) * share).backward()
        assert model.weight.grad is not None
        return model.weight.grad.clone()

    averaged = sum(gradient(b.index, b.share) for b in uneven) / 2
    whole = gradient(torch.cat([b.index for b in uneven]))
    torch.testing.assert_close(averaged, whole)


def test_the_world_comes_from_torchruns_variables() -> None:
    assert World.from_env({}) == World(0, 1, 0)
    world = World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.is_main) == (3, 4, 1, False)
    assert World().all_reduce([1.0, 2.0]) == [1.0, 2.0] and World().gather(5) == [5]
    with pytest.raises(DlpipeError, match="RANK='x': not an integer"):
        World.from_env({"RANK": "x"})
    with pytest.raises(DlpipeError, match="inconsistent"):
        World.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_the_global_batch_must_divide_among_the_processes() -> None:
    check_batch_size(64, 4, "cnn")
    with pytest.raises(DlpipeError, match=r"train.cnn.batch_size 32 does not divide among 3"):
        check_batch_size(32, 3, "cnn")


# --- checkpoints across numbers of processes ----------------------------------------------------


def test_the_number_of_processes_is_not_part_of_the_checkpoint_key(
    tiny_project: TinyProject,
) -> None:
    model = run_module.Model.from_params(tiny_project.params, "cnn")
    data = run_module.load_data(model, make_runtime("cpu", "fp32"))

    def folder(**updates: Any) -> Path:
        return run_module.checkpoints(model, tiny_project.with_train("cnn", **updates), data).folder

    assert folder(nproc=1) == folder(nproc=2)  # the same recipe: a rerun resumes
    assert folder(batch_size=64) != folder()


def test_a_checkpoint_of_two_processes_resumes_in_one(
    tiny_project: TinyProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Say a rerun has fewer GPUs: the weights, optimizer and schedule resume, and the dropout
    generators, which were per process, are reseeded."""
    params = tiny_project.with_train("cnn", epochs=2)
    config = train_config(params, "cnn")
    prepared = Path("data/prepared/mnist")
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    meta = DataMeta.from_json(json.loads((prepared / "meta.json").read_text()))
    store = CheckpointStore(tmp_path / "ck")

    def stop(row: dict[str, float]) -> None:
        raise KeyboardInterrupt

    runtime = make_runtime("cpu", "fp32")
    with pytest.raises(KeyboardInterrupt):
        Trainer(family_model("cnn", params, meta), config, runtime, 0, store, stop).fit(train, val)
    state = store.load()
    assert state is not None and len(state["rng"]) == 1
    state["rng"] = state["rng"] * 2  # as two processes would have saved it
    result = Trainer(family_model("cnn", params, meta), config, runtime, 0).fit(
        train, val, resume=state
    )
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert "checkpoint from 2 process(es), resuming on 1" in capsys.readouterr().out


# --- the train stage under torchrun -------------------------------------------------------------


def stage(project: TinyProject, model: str = "cnn") -> subprocess.Popen[str]:
    """`python stages/train.py MODEL` in the tiny project, importing this checkout's dlpipe."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(STAGE), model],
        cwd=project.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def runs_of(project: TinyProject) -> list[Any]:
    client = MlflowClient(project.tracking_uri)
    experiment = client.get_experiment_by_name(project.params.mlflow.experiment)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "updates"),
    [
        ("cnn", {}),
        # an adversarial pass after the clean one: DDP averages the gradients once, after both
        ("rnn", {"adversarial_eps": 0.05, "model": {"dropout": 0.0}}),
    ],
)
def test_two_processes_train_the_weights_of_one(
    tiny_project: TinyProject, name: str, updates: dict[str, Any]
) -> None:
    """Global batch 32 as 2 x 16 (gloo, fp32): the same weights as one process within float
    tolerance (measured: 2e-6 at most), one more MLflow run, with world_size 2."""
    params = tiny_project.with_train(name, epochs=2, batch_size=32, **updates)
    run_module.train(name, params)
    single = torch.load(f"data/models/{name}/model.pt", weights_only=True)
    single_report = json.loads(Path(f"reports/models/{name}/train.json").read_text())
    assert len(runs_of(tiny_project)) == 1

    tiny_project.write_params(
        tiny_project.with_train(name, epochs=2, batch_size=32, nproc=2, **updates)
    )
    code, output = finish(stage(tiny_project, name))
    assert code == 0, output[-3000:]
    assert "--nproc_per_node=2" in output
    assert output.count(f"{name} epoch 2/2") == 1  # rank 0 alone reports

    double = torch.load(f"data/models/{name}/model.pt", weights_only=True)
    assert double.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=2e-5, msg=key)
    report = json.loads(Path(f"reports/models/{name}/train.json").read_text())
    assert report["world_size"] == 2
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert report["final"][key] == pytest.approx(single_report["final"][key], abs=1e-3)

    runs = runs_of(tiny_project)
    assert len(runs) == 2  # the one-process run and exactly one for the two processes
    [ddp] = [r for r in runs if r.data.params["world_size"] == "2"]
    assert ddp.info.status == "FINISHED"
    assert ddp.data.params["train.nproc"] == "2"
    info = json.loads(Path(f"data/models/{name}/mlflow_run.json").read_text())
    assert info["run_id"] == ddp.info.run_id


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def worker(launcher: subprocess.Popen[str], rank: int) -> psutil.Process:
    """The torchrun worker process of `rank`."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def stopped_mid_training(folders: Path, code: int, output: str) -> dict[str, Any]:
    """The stage failed between epochs 1 and 4: its checkpoint, and no final output written."""
    assert code != 0, output[-3000:]
    [folder] = folders.glob("cnn-*")
    state = CheckpointStore(folder).load()
    assert state is not None and 1 <= state["epoch"] < 4, output[-3000:]
    for output_path in ("data/models/cnn/model.pt", "reports/models/cnn/train.json"):
        assert not Path(output_path).exists(), output_path
    return state


@pytest.mark.integration
def test_a_killed_process_fails_the_stage_cleanly_and_the_rerun_resumes(
    tiny_project: TinyProject,
) -> None:
    params = tiny_project.with_train("cnn", epochs=4, batch_size=4, nproc=2)  # 64 steps an epoch
    tiny_project.write_params(params)
    folders = tiny_project.root / ".dlpipe" / "checkpoints"
    launcher = stage(tiny_project)
    try:
        wait_for(lambda: any(folders.glob("cnn-*/last.pt")), 90, "the first checkpoint")
        time.sleep(0.1)  # into the next epoch
        worker(launcher, 1).send_signal(signal.SIGKILL)
        code, output = finish(launcher)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    state = stopped_mid_training(folders, code, output)
    assert len(state["rng"]) == 2  # both processes' generators
    [killed] = runs_of(tiny_project)
    assert killed.info.status in ("FAILED", "KILLED"), output[-5000:]
    assert not list(Path(".").rglob(".*.tmp"))  # no half-written file

    code, output = finish(stage(tiny_project))
    assert code == 0, output[-3000:]
    assert f"resuming from epoch {state['epoch']}" in output
    [finished] = runs_of(tiny_project)  # the same run, continued
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    history = MlflowClient(tiny_project.tracking_uri).get_metric_history(
        finished.info.run_id, "val_accuracy"
    )
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert json.loads(Path("reports/models/cnn/train.json").read_text())["epochs"] == 4
    assert not any(folders.glob("cnn-*"))  # cleared after success


def node(project: TinyProject, port: int) -> subprocess.Popen[str]:
    """One of two "machines": a torchrun launcher with one process, meeting the other launcher
    at a c10d rendezvous on 127.0.0.1:`port`, as `torchrun --nnodes=2` runs on each machine."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=dlpipe-test",
        "--max-restarts=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*launcher, str(STAGE), "cnn"],
        cwd=project.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.integration
def test_two_machines_train_the_weights_of_one(tiny_project: TinyProject) -> None:
    """Two launchers as two nodes (`--nnodes=2`, c10d rendezvous, one process each): the weights
    one process trains, within float tolerance, and one MLflow run of world size 2."""
    from support.servers import free_port

    params = tiny_project.with_train("cnn", epochs=2, batch_size=32)
    run_module.train("cnn", params)
    single = torch.load("data/models/cnn/model.pt", weights_only=True)

    tiny_project.write_params(params)  # nproc 1: the outer launchers set the world
    port = free_port()
    nodes = [node(tiny_project, port) for _ in range(2)]
    try:
        results = [finish(launcher, timeout=180) for launcher in nodes]
    finally:
        for launcher in nodes:
            if launcher.poll() is None:
                launcher.kill()
    for code, output in results:
        assert code == 0, output[-3000:]
    assert sum(output.count("cnn epoch 2/2") for _, output in results) == 1  # rank 0 alone

    double = torch.load("data/models/cnn/model.pt", weights_only=True)
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=2e-5, msg=key)
    runs = runs_of(tiny_project)
    assert len(runs) == 2  # the one-process run and exactly one for the two machines
    [ddp] = [r for r in runs if r.data.params["world_size"] == "2"]
    assert ddp.info.status == "FINISHED"


@pytest.mark.integration
def test_a_killed_machine_fails_the_stage_cleanly_and_the_rerun_resumes(
    tiny_project: TinyProject,
) -> None:
    """One of two nodes killed mid-epoch (its launcher and its worker, as a machine going down):
    the other node's stage fails without outputs, and a rerun resumes the checkpoint."""
    from support.servers import free_port

    tiny_project.write_params(tiny_project.with_train("cnn", epochs=4, batch_size=4))
    folders = tiny_project.root / ".dlpipe" / "checkpoints"
    port = free_port()
    survivor, doomed = node(tiny_project, port), node(tiny_project, port)
    try:
        wait_for(lambda: any(folders.glob("cnn-*/last.pt")), 120, "the first checkpoint")
        time.sleep(0.1)  # into the next epoch
        for process in [*psutil.Process(doomed.pid).children(recursive=True), doomed]:
            process.kill()
        code, output = finish(survivor, timeout=180)
    finally:
        for launcher in (survivor, doomed):
            if launcher.poll() is None:
                launcher.kill()
    state = stopped_mid_training(folders, code, output)

    code, output = finish(stage(tiny_project))  # rerun here, on one machine
    assert code == 0, output[-3000:]
    assert f"resuming from epoch {state['epoch']}" in output
    assert json.loads(Path("reports/models/cnn/train.json").read_text())["epochs"] == 4


@pytest.mark.integration
def test_a_batch_that_does_not_divide_stops_before_torchrun(tiny_project: TinyProject) -> None:
    tiny_project.write_params(tiny_project.with_train("cnn", batch_size=32, nproc=3))
    code, output = finish(stage(tiny_project))
    assert code == 2
    assert output.strip().splitlines()[-1] == (
        "error: train.cnn.batch_size 32 does not divide among 3 processes "
        "(it is the global batch; each process takes batch_size / 3)"
    )
    assert "torch.distributed.run" not in output
