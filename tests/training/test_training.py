"""The training loop and the train stage: determinism, exact resume, schedules, early stopping,
length bucketing, end-to-end outputs, and interruption (SIGTERM / Ctrl-C) with MLflow resume.

Everything runs on the CPU on the tiny synthetic data of `tiny_project` (tests/support/tiny.py).
"""

from __future__ import annotations

import copy
import csv
import importlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from support.families import dataset_of, family_model
from support.tiny import TinyProject, hook_after_epoch, tiny_mnist_arrays
from torch import Tensor

from dlpipe import paths
from dlpipe.config import Params, TrainConfig, parse_params, train_config
from dlpipe.data.tensors import BUCKET_POOL_BATCHES, Split, load_split
from dlpipe.errors import DlpipeError
from dlpipe.family import DataMeta, model_family, validate_models
from dlpipe.integrity import listed_digest, seal, write_manifest_of
from dlpipe.io import read_json
from dlpipe.tracking.run import StageRun
from dlpipe.training import run as run_module
from dlpipe.training.checkpoint import CheckpointStore, training_key
from dlpipe.training.runtime import make_runtime, seed_everything
from dlpipe.training.schedule import make_optimizer, make_scheduler
from dlpipe.training.signals import signals_deferred
from dlpipe.training.trainer import EpochCallback, Trainer

TIMING_KEYS = {"epoch_time_s", "samples_per_s"}
TRAIN_JSON_KEYS = {
    "model",
    "dataset",
    "device",
    "precision",
    "compute_dtypes",
    "world_size",
    "parameters",
    "epochs",
    "best_epoch",
    "stopped_early",
    "train_time_s",
    "wall_time_s",
    "samples_per_s",
    "final",
    "best",
}
HISTORY_COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "epoch_time_s",
    "samples_per_s",
    "val_loss",
    "val_accuracy",
]


# --- helpers ------------------------------------------------------------------------------------


def tiny_data(name: str) -> tuple[Split, Split, DataMeta]:
    """The train and val splits and the meta of `name`'s dataset in the current tiny project."""
    prepared = paths.PREPARED_DIR / dataset_of(name)
    meta = DataMeta.from_json(read_json(prepared / "meta.json"))
    return load_split(prepared, "train"), load_split(prepared, "val"), meta


def fresh_model(name: str, params: Params, meta: DataMeta) -> torch.nn.Module:
    """The model as the train stage builds it: everything seeded first."""
    config = train_config(params, name)
    seed_everything(params.seed, config.deterministic)
    model: torch.nn.Module = family_model(name, params, meta)
    return model


def make_trainer(
    name: str,
    params: Params,
    meta: DataMeta,
    checkpoints: CheckpointStore | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Trainer:
    config = train_config(params, name)
    return Trainer(
        fresh_model(name, params, meta),
        config,
        make_runtime(config.device, config.precision),
        params.seed,
        checkpoints,
        on_epoch_end,
        label=name,
    )


def recipe(**settings: Any) -> TrainConfig:
    """A training section with these settings (a model names its family and its dataset)."""
    return TrainConfig(family="cnn", dataset="mnist", **settings)


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def interrupt_at_epoch(stop_epoch: int) -> EpochCallback:
    def stop(row: dict[str, float]) -> None:
        if row["epoch"] == stop_epoch:
            raise KeyboardInterrupt

    return stop


def sigterm_self_at_epoch(stop_epoch: int) -> EpochCallback:
    """Send this process a real SIGTERM after epoch `stop_epoch` and wait for its handler."""

    def hook(row: dict[str, float]) -> None:
        if row["epoch"] != stop_epoch:
            return
        # without the stage's handler, SIGTERM would end the test session itself
        assert callable(signal.getsignal(signal.SIGTERM)), "train() installed no SIGTERM handler"
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the handler raises within the next few bytecodes
            time.sleep(0.01)
        raise AssertionError("SIGTERM did not interrupt the training")

    return hook


def read_history(name: str) -> list[dict[str, float]]:
    """reports/<name>/history.csv of the current project, as numbers."""
    with open(paths.MODEL_REPORTS_DIR / name / "history.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def checkpoint_folders(root: Path, name: str) -> list[Path]:
    return sorted((root / ".dlpipe" / "checkpoints").glob(f"{name}-*"))


# --- the loop -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_same_seed_gives_the_same_history_and_weights(tiny_project: TinyProject, name: str) -> None:
    train, val, meta = tiny_data(name)
    runs = []
    for _ in range(2):
        trainer = make_trainer(name, tiny_project.params, meta)
        runs.append((trainer.fit(train, val), trainer.model.state_dict()))
    (first, first_weights), (second, second_weights) = runs
    assert len(first.history) == train_config(tiny_project.params, name).epochs
    assert without_timing(first.history) == without_timing(second.history)
    assert_same_weights(first_weights, second_weights)


def test_the_tiny_mnist_is_learnable(tiny_project: TinyProject) -> None:
    """A sanity check of the fixture data the other tests train on: well above chance (0.1)."""
    train, val, meta = tiny_data("cnn")
    result = make_trainer("cnn", tiny_project.params, meta).fit(train, val)
    assert result.history[-1]["val_accuracy"] > 0.5


@pytest.mark.parametrize(
    ("name", "updates"),
    [
        ("cnn", {"epochs": 2}),
        # dropout > 0 and a warm-up + cosine schedule: RNG and scheduler state both must resume
        ("transformer", {"epochs": 2, "model": {"dropout": 0.3}}),
        # a second, adversarial pass a step (training/adversarial.py)
        ("rnn", {"epochs": 2, "adversarial_eps": 0.05}),
    ],
)
def test_resume_gives_exactly_the_uninterrupted_weights_and_metrics(
    tiny_project: TinyProject, tmp_path: Path, name: str, updates: dict[str, Any]
) -> None:
    params = tiny_project.with_train(name, **updates)
    train, val, meta = tiny_data(name)

    straight_store = CheckpointStore(tmp_path / "straight")
    straight = make_trainer(name, params, meta, straight_store)
    expected = straight.fit(train, val)
    expected_weights = copy.deepcopy(straight.model.state_dict())
    assert straight_store.path.exists()

    store = CheckpointStore(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        make_trainer(name, params, meta, store, interrupt_at_epoch(1)).fit(train, val)
    state = store.load()
    assert state is not None and state["epoch"] == 1

    resumed = make_trainer(name, params, meta, store)  # a new model, as a rerun of the stage
    result = resumed.fit(train, val, resume=state)

    assert result.resumed_from_epoch == 1
    assert without_timing(result.history) == without_timing(expected.history)
    assert (result.best_epoch, result.best_metric) == (expected.best_epoch, expected.best_metric)
    assert_same_weights(resumed.model.state_dict(), expected_weights)
    assert result.history[0]["epoch_time_s"] == state["history"][0]["epoch_time_s"]


def test_resume_depends_on_the_restored_rng_state(
    tiny_project: TinyProject, tmp_path: Path
) -> None:
    """The control for the test above: with another RNG state, dropout draws other masks."""
    params = tiny_project.with_train("transformer", epochs=2, model={"dropout": 0.3})
    train, val, meta = tiny_data("transformer")
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(KeyboardInterrupt):
        make_trainer("transformer", params, meta, store, interrupt_at_epoch(1)).fit(train, val)
    state = store.load()
    assert state is not None

    def resume_with(rng: Tensor) -> dict[str, Tensor]:
        trainer = make_trainer("transformer", params, meta)
        trainer.fit(train, val, resume={**state, "rng": [{"torch": rng, "cuda": None}]})
        return trainer.model.state_dict()

    [saved] = state["rng"]  # one process: one generator state
    restored = resume_with(saved["torch"])
    other = resume_with(torch.Generator().manual_seed(12345).get_state())
    assert any(not torch.equal(restored[k], other[k]) for k in restored)


def test_early_stopping_stops_and_restores_the_best_weights(
    tiny_project: TinyProject, tmp_path: Path
) -> None:
    """Train on digits 0-8 and validate on 9s only: the model learns never to answer 9, so val
    accuracy can never beat its first epoch, and patience 2 ends the training after epoch 3."""
    full_train, _, meta = tiny_data("cnn")
    no_nines = torch.nonzero(full_train.labels != 9).squeeze(1)
    train = Split({"images": full_train.features["images"][no_nines]}, full_train.labels[no_nines])
    nines = tiny_mnist_arrays(200, seed=7)
    keep = nines["labels"] == 9
    val = Split(
        {"images": torch.from_numpy(nines["images"][keep])},
        torch.from_numpy(nines["labels"][keep]),
    )
    params = tiny_project.with_train(
        "cnn", epochs=8, early_stopping_patience=2, monitor="val_accuracy"
    )
    snapshots: dict[int, dict[str, Tensor]] = {}
    trainer: Trainer

    def snapshot(row: dict[str, float]) -> None:
        snapshots[int(row["epoch"])] = copy.deepcopy(trainer.model.state_dict())

    trainer = make_trainer("cnn", params, meta, on_epoch_end=snapshot)
    result = trainer.fit(train, val)

    accuracies = [row["val_accuracy"] for row in result.history]
    assert all(a <= accuracies[0] for a in accuracies[1:]), accuracies  # the premise
    assert result.stopped_early
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.best_epoch == 1 and result.best_metric == accuracies[0]
    assert any(not torch.equal(snapshots[1][k], snapshots[3][k]) for k in snapshots[1])
    assert_same_weights(trainer.model.state_dict(), snapshots[1])


def test_without_patience_every_epoch_runs_and_the_best_epoch_is_kept(
    tiny_project: TinyProject,
) -> None:
    train, val, meta = tiny_data("cnn")
    params = tiny_project.with_train("cnn", epochs=3, early_stopping_patience=0, monitor="val_loss")
    result = make_trainer("cnn", params, meta).fit(train, val)
    losses = [row["val_loss"] for row in result.history]
    assert len(losses) == 3 and not result.stopped_early
    assert result.best_epoch == 1 + losses.index(min(losses))


# --- schedules ----------------------------------------------------------------------------------


def lr_trace(config: TrainConfig, steps_per_epoch: int) -> tuple[list[float], float]:
    """The learning rate of every training step, and the one left after the last step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    trace = []
    for _ in range(config.epochs * steps_per_epoch):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return trace, optimizer.param_groups[0]["lr"]


def test_warmup_then_cosine_decays_to_zero() -> None:
    config = recipe(epochs=4, lr=0.5, schedule="cosine", warmup_epochs=0.5)
    trace, after = lr_trace(config, steps_per_epoch=10)  # 40 steps, 5 of warm-up
    warmup, decay = trace[:5], trace[5:]
    assert warmup == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert max(trace) == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[0] == pytest.approx(0.5) and decay[-1] < 0.01 * 0.5
    assert after == pytest.approx(0.0, abs=1e-12)


def test_cosine_without_warmup_starts_at_the_full_rate() -> None:
    trace, after = lr_trace(recipe(epochs=2, lr=0.1, schedule="cosine"), steps_per_epoch=5)
    assert trace[0] == pytest.approx(0.1)
    assert after == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_stays_at_lr_after_warmup() -> None:
    trace, after = lr_trace(recipe(epochs=3, lr=0.01), steps_per_epoch=7)
    assert trace == [0.01] * 21 and after == 0.01
    warm, _ = lr_trace(recipe(epochs=2, lr=0.01, warmup_epochs=1.0), steps_per_epoch=4)
    assert warm == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01, 0.01])


def test_onecycle_builds_and_peaks_at_lr() -> None:
    config = recipe(epochs=2, lr=0.02, schedule="onecycle", warmup_epochs=0.5)
    trace, _ = lr_trace(config, steps_per_epoch=10)
    peak = trace.index(max(trace))
    assert max(trace) == pytest.approx(0.02)
    assert 3 <= peak <= 6  # pct_start = warm-up share (5 of 20 steps)
    assert trace[0] < 0.02 / 10 and trace[-1] < trace[0]
    default, _ = lr_trace(recipe(epochs=1, lr=0.02, schedule="onecycle"), steps_per_epoch=10)
    assert max(default) == pytest.approx(0.02)


def test_warmup_longer_than_training_is_capped() -> None:
    trace, _ = lr_trace(recipe(epochs=1, lr=1.0, warmup_epochs=5.0), steps_per_epoch=4)
    assert trace == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_max_steps_per_epoch_caps_the_steps_and_the_schedule(tiny_project: TinyProject) -> None:
    train, val, meta = tiny_data("cnn")
    params = tiny_project.with_train("cnn", epochs=2, max_steps_per_epoch=3, schedule="cosine")
    trainer = make_trainer("cnn", params, meta)
    trainer.fit(train, val)
    steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {2 * 3}  # not 2 * 256 / 32
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_make_optimizer_honours_the_choice_and_weight_decay() -> None:
    model = torch.nn.Linear(2, 2)
    adamw = make_optimizer(model, recipe(optimizer="adamw", weight_decay=0.01, lr=0.1))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["weight_decay"] == 0.01 and adamw.param_groups[0]["lr"] == 0.1
    assert type(make_optimizer(model, recipe(optimizer="adam"))) is torch.optim.Adam


# --- length bucketing ---------------------------------------------------------------------------


def text_split(n: int, seed: int = 0, max_len: int = 200) -> Split:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    tokens = torch.randint(1, 50, (n, max_len), generator=g, dtype=torch.int32)
    tokens[torch.arange(max_len) >= lengths[:, None]] = 0
    return Split({"tokens": tokens, "lengths": lengths}, torch.randint(0, 2, (n,), generator=g))


def padding(split: Split, batches: list[Tensor]) -> int:
    lengths = split.features["lengths"]
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


def test_bucketed_batches_cover_every_row_once() -> None:
    split = text_split(1000)
    batch_size = 16
    assert batch_size * BUCKET_POOL_BATCHES < 1000  # more than one pool
    for generator in (torch.Generator().manual_seed(3), None):
        batches = split.batch_indices(batch_size, generator)
        assert torch.equal(torch.sort(torch.cat(batches)).values, torch.arange(1000))
        assert all(len(b) <= batch_size for b in batches)
        assert sum(len(b) == batch_size for b in batches) >= len(batches) - 2  # one short per pool


def test_bucketing_pads_much_less_than_random_batches() -> None:
    split = text_split(1000)
    g = torch.Generator().manual_seed(5)
    bucketed = split.batch_indices(16, g)
    random = list(torch.randperm(1000, generator=g).split(16))
    assert padding(split, bucketed) < 0.2 * padding(split, random)
    # each batch is cut to its own longest row
    inputs, _ = split.batch(bucketed[0])
    assert inputs[0].shape == (len(bucketed[0]), int(split.features["lengths"][bucketed[0]].max()))
    assert inputs[0].dtype == torch.long


def test_bucketed_order_is_shuffled_and_deterministic_per_seed() -> None:
    split = text_split(1000)

    def order(seed: int) -> list[Tensor]:
        return split.batch_indices(16, torch.Generator().manual_seed(seed))

    same, again, other = order(1), order(1), order(2)
    assert all(torch.equal(a, b) for a, b in zip(same, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(same, other, strict=False))
    # batches come in random order, not shortest first
    widths = [int(split.features["lengths"][b].max()) for b in same]
    assert widths != sorted(widths)


def test_evaluation_order_is_sorted_by_length_and_image_batches_cover_all() -> None:
    split = text_split(300)
    order = torch.cat(split.batch_indices(64))
    lengths = split.features["lengths"][order]
    assert torch.all(lengths[1:] >= lengths[:-1])
    images = Split(
        {"images": torch.zeros(70, 1, 28, 28, dtype=torch.uint8)}, torch.zeros(70).long()
    )
    shuffled = images.batch_indices(32, torch.Generator().manual_seed(0))
    assert [len(b) for b in shuffled] == [32, 32, 6]
    assert torch.equal(torch.sort(torch.cat(shuffled)).values, torch.arange(70))
    assert not torch.equal(torch.cat(shuffled), torch.arange(70))


# --- checkpoint identity ------------------------------------------------------------------------


def test_training_key_changes_with_params_and_data(tmp_path: Path) -> None:
    settings = {"seed": 42, **recipe().model_dump()}
    base = training_key("cnn", settings, "digest-a", "code-a")
    assert training_key("cnn", dict(reversed(settings.items())), "digest-a", "code-a") == base
    assert training_key("cnn", {**settings, "lr": 0.002}, "digest-a", "code-a") != base
    assert training_key("cnn", {**settings, "seed": 43}, "digest-a", "code-a") != base
    assert training_key("cnn", settings, "digest-b", "code-a") != base
    assert training_key("cnn", settings, "digest-a", "code-b") != base
    assert training_key("rnn", settings, "digest-a", "code-a") != base


def test_the_data_digest_comes_from_the_checksums_and_changes_with_the_files(
    tmp_path: Path,
) -> None:
    """The checkpoint key's data digest reads the folder's SHA256SUMS (the split loader checks
    the bytes against it), not the files a second time; it follows their contents and order."""
    (tmp_path / "train.npz").write_bytes(b"one")
    (tmp_path / "val.npz").write_bytes(b"two")
    write_manifest_of(tmp_path, ["train.npz", "val.npz"])
    digest = listed_digest(tmp_path, ["train.npz", "val.npz"], "rerun")
    assert listed_digest(tmp_path, ["train.npz", "val.npz"], "rerun") == digest
    assert listed_digest(tmp_path, ["val.npz", "train.npz"], "rerun") != digest
    (tmp_path / "val.npz").write_bytes(b"two!")
    write_manifest_of(tmp_path, ["train.npz", "val.npz"])
    assert listed_digest(tmp_path, ["train.npz", "val.npz"], "rerun") != digest
    with pytest.raises(DlpipeError, match="word_vectors.npy: not listed in .*SHA256SUMS"):
        listed_digest(tmp_path, ["train.npz", "word_vectors.npy"], "rerun")


def test_checkpoint_store_round_trip_and_clear(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "cnn-abc")
    assert store.load() is None
    store.save({"epoch": 3, "weights": torch.ones(2), "history": [{"epoch": 1.0}]})
    state = store.load()
    assert (
        state is not None and state["epoch"] == 3 and torch.equal(state["weights"], torch.ones(2))
    )
    # no temp files left
    assert sorted(p.name for p in store.folder.iterdir()) == ["last.pt", "last.pt.sha256"]
    store.clear()
    assert not store.folder.exists() and store.load() is None


def interrupted_after_epoch_1(
    params: Params, tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Train the cnn of `params` until Ctrl-C after epoch 1; the checkpoint folder it leaves."""
    with monkeypatch.context() as patch:
        hook_after_epoch(patch, interrupt_at_epoch(1))
        with pytest.raises(KeyboardInterrupt):
            run_module.train("cnn", params)
    [stale] = checkpoint_folders(tiny_project.root, "cnn")
    return stale


def test_a_stale_checkpoint_is_not_resumed_after_a_param_or_data_change(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tiny_project.with_train("cnn", epochs=2, schedule="constant")
    stale = interrupted_after_epoch_1(params, tiny_project, monkeypatch)
    capsys.readouterr()

    run_module.train("cnn", tiny_project.with_train("cnn", epochs=2, schedule="constant", lr=0.002))
    assert "resuming" not in capsys.readouterr().out
    assert checkpoint_folders(tiny_project.root, "cnn") == [stale]  # left alone, not used
    history = read_history("cnn")
    assert [row["epoch"] for row in history] == [1, 2] and history[0]["lr"] == 0.002

    # the same params on other data: the digest is part of the key
    val = tiny_project.root / "data/prepared/mnist/val.npz"
    other = tiny_mnist_arrays(64, seed=99)
    np.savez(val, images=other["images"], labels=other["labels"])
    seal(val.parent)  # new data, as prepare would write it
    run_module.train("cnn", params)
    assert "resuming" not in capsys.readouterr().out
    assert checkpoint_folders(tiny_project.root, "cnn") == [stale]
    assert [row["epoch"] for row in read_history("cnn")] == [1, 2]


def edit_source(module_name: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the code digest see an edited `module_name`: its file (a package: its folder's files)
    copied to `folder` with one line added, and the module's `__file__` pointing at the copy."""
    module = importlib.import_module(module_name)
    source = Path(str(module.__file__))
    folder.mkdir()
    if source.name == "__init__.py":  # a package: edit one of its modules
        shutil.copytree(source.parent, folder, dirs_exist_ok=True)
        edited = folder / "trainer.py"
    else:
        edited = folder / source.name
        shutil.copyfile(source, edited)
    edited.write_text(edited.read_text(encoding="utf-8") + "\nEDITED = True\n", encoding="utf-8")
    monkeypatch.setattr(module, "__file__", str(folder / source.name))


@pytest.mark.parametrize("module", ["dlpipe.models.cnn", "dlpipe.inputs.images", "dlpipe.training"])
def test_a_checkpoint_is_not_resumed_after_a_code_edit(
    tiny_project: TinyProject,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    module: str,
) -> None:
    """An edit to the model, its input kind or the trainer after an interruption starts over:
    weights trained by other code are never resumed (#10)."""
    params = tiny_project.with_train("cnn", epochs=2)
    stale = interrupted_after_epoch_1(params, tiny_project, monkeypatch)
    capsys.readouterr()

    with monkeypatch.context() as patch:
        edit_source(module, tmp_path / "edited", patch)
        run_module.train("cnn", params)
    assert "resuming" not in capsys.readouterr().out
    assert checkpoint_folders(tiny_project.root, "cnn") == [stale]  # left alone, not used
    assert [row["epoch"] for row in read_history("cnn")] == [1, 2]


def test_experiments_that_train_alike_never_share_a_checkpoint(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two queued DVC experiments with the same training params (differing, say, in evaluate
    params) each keep their own folder: neither resumes nor clears the other's checkpoint, and a
    rerun of an experiment under its name resumes its own."""
    params = tiny_project.with_train("cnn", epochs=2)
    monkeypatch.setenv("DVC_EXP_NAME", "trial-a")
    with monkeypatch.context() as patch:
        hook_after_epoch(patch, interrupt_at_epoch(1))
        with pytest.raises(KeyboardInterrupt):
            run_module.train("cnn", params)
    [folder_a] = checkpoint_folders(tiny_project.root, "cnn")
    assert folder_a.name.endswith("-trial-a")
    capsys.readouterr()

    monkeypatch.setenv("DVC_EXP_NAME", "trial/b")  # finishes, and clears its own folder only
    run_module.train("cnn", params)
    assert "resuming" not in capsys.readouterr().out
    assert [row["epoch"] for row in read_history("cnn")] == [1, 2]
    assert checkpoint_folders(tiny_project.root, "cnn") == [folder_a]

    monkeypatch.setenv("DVC_EXP_NAME", "trial-a")
    run_module.train("cnn", params)
    assert f"resuming from epoch 1 ({folder_a / 'last.pt'})" in capsys.readouterr().out
    assert checkpoint_folders(tiny_project.root, "cnn") == []

    client = MlflowClient(tiny_project.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("dlpipe").experiment_id])
    folders = {run.data.tags["dvc_exp_name"]: run.data.tags["checkpoint_dir"] for run in runs}
    assert folders == {"trial-a": folder_a.name, "trial/b": folder_a.name[:-7] + "trial_b"}


# --- the train stage end to end -----------------------------------------------------------------


def test_a_dataset_max_len_above_the_transformers_is_one_line(
    tiny_project: TinyProject,
) -> None:
    """prepare keeps the head and tail of each text; a Transformer keeping fewer tokens would
    silently cut that tail off again at training time (#10). The network checks the prepared
    dataset's max_len (its meta.json) when it is built."""
    prepared = Path("data/prepared/imdb")
    meta = {**read_json(prepared / "meta.json"), "max_len": 65}  # the tiny Transformer keeps 64
    (prepared / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    seal(prepared)  # as prepare with datasets.imdb.max_len 65 would write it
    params = tiny_project.params
    validate_models(params)  # the model sections themselves are fine: the data is the problem
    with pytest.raises(DlpipeError) as err:
        run_module.train("transformer", params)
    message = str(err.value)
    assert "\n" not in message, message
    assert "datasets.imdb.max_len 65" in message, message
    assert "model.max_len 64" in message, message
    assert not Path("data/models/transformer").exists()
    assert checkpoint_folders(tiny_project.root, "transformer") == []  # failed before training
    family_model("rnn", params, DataMeta.from_json(meta))  # the RNN reads whole rows: no limit
    family_model("transformer", params, DataMeta.from_json({**meta, "max_len": 64}))  # equal: fine


def test_a_family_on_a_dataset_of_another_input_kind_is_one_line(
    tiny_project: TinyProject,
) -> None:
    """train.<model> names a family and a dataset; the images family cannot read texts."""
    raw = tiny_project.params.model_dump()
    raw["train"]["cnn"]["dataset"] = "imdb"
    params = parse_params(raw, "tiny params")
    with pytest.raises(
        DlpipeError,
        match=r"^train.cnn: the cnn family reads images, but dataset imdb holds tokens",
    ):
        run_module.train("cnn", params)
    assert not Path("data/models/cnn").exists()
    raw["train"]["cnn"]["dataset"] = "pets"  # not declared: a params error
    with pytest.raises(DlpipeError, match=r"train.cnn.dataset: no datasets.pets entry"):
        parse_params(raw, "tiny params")


@pytest.mark.parametrize("name", ["cnn", "rnn", "transformer"])
def test_train_writes_every_output(tiny_project: TinyProject, name: str) -> None:
    summary = run_module.train(name, tiny_project.params)
    config = train_config(tiny_project.params, name)
    models, reports = Path("data/models") / name, Path("reports/models") / name

    saved = json.loads((models / "config.json").read_text())
    assert saved["model"] == name and saved["dataset"] == dataset_of(name)
    family = model_family(tiny_project.params, name)
    assert saved["family"] == family.name == tiny_project.params.train[name].family
    assert saved["model_config"] == family.model_config(tiny_project.params, name).model_dump()
    assert saved["data"] == read_json(Path("data/prepared") / dataset_of(name) / "meta.json")
    _, _, meta = tiny_data(name)
    model = family_model(name, tiny_project.params, meta)
    state = torch.load(models / "model.pt", weights_only=True)
    model.load_state_dict(state)  # strict: every key, every shape
    assert sum(p.numel() for p in model.parameters()) == summary["parameters"]

    run_info = json.loads((models / "mlflow_run.json").read_text())
    assert run_info["tracking_uri"] == tiny_project.tracking_uri and run_info["run_id"]

    report = json.loads((reports / "train.json").read_text())
    assert summary.pop("tracking") == ""  # MLflow took everything
    assert set(report) == TRAIN_JSON_KEYS and report == json.loads(json.dumps(summary))
    assert report["epochs"] == config.epochs and report["model"] == name
    assert report["device"] == "CPU" and report["precision"] == "fp32"
    assert report["world_size"] == 1 and set(report["compute_dtypes"].values()) == {"fp32"}
    # with adversarial_eps (the RNN's default), the adversarial pass's loss beside the clean one
    adversarial = ["train_adversarial_loss"] if config.adversarial_eps else []
    final = {"train_loss", *adversarial, "train_accuracy", "val_loss", "val_accuracy"}
    assert set(report["final"]) == final
    assert 1 <= report["best_epoch"] <= config.epochs

    with open(reports / "history.csv", newline="") as handle:
        columns = HISTORY_COLUMNS[:3] + adversarial + HISTORY_COLUMNS[3:]
        assert next(csv.reader(handle)) == columns
    rows = read_history(name)
    assert [row["epoch"] for row in rows] == list(range(1, config.epochs + 1))
    assert rows[-1]["val_accuracy"] == pytest.approx(report["final"]["val_accuracy"])
    png = (reports / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert checkpoint_folders(tiny_project.root, name) == []  # cleared after success
    assert not list(Path(".").rglob(".*.tmp"))  # no half-written files


def test_float16_weights_halve_model_pt_and_are_the_weights_served(
    tiny_project: TinyProject,
) -> None:
    """weights_dtype float16: model.pt holds 16-bit tensors, half the bytes; what loads from it
    (evaluate, predict, the raw-input pyfunc) and the MLflow model both hold the float32
    training's weights rounded to float16, so the evaluated model is the one shipped."""
    import mlflow.pytorch

    from dlpipe.family import load_trained

    weights = Path("data/models/rnn/model.pt")
    run_module.train("rnn", tiny_project.with_train("rnn", weights_dtype="float32"))
    full = torch.load(weights, weights_only=True)
    full_bytes = weights.stat().st_size
    run_module.train("rnn", tiny_project.with_train("rnn", weights_dtype="float16"))
    half = torch.load(weights, weights_only=True)
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    assert weights.stat().st_size < 0.6 * full_bytes
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in full.items()}
    assert any(not torch.equal(rounded[k], full[k]) for k in full)  # the rounding is visible
    model, _, _ = load_trained(Path("data/models/rnn"))
    assert_same_weights(model.state_dict(), rounded)
    run_id = json.loads(Path("data/models/rnn/mlflow_run.json").read_text())["run_id"]
    logged = mlflow.pytorch.load_model(f"runs:/{run_id}/model").model  # inside TokensOnly
    assert_same_weights(logged.state_dict(), rounded)


def test_train_learns_the_tiny_data(tiny_project: TinyProject) -> None:
    summary = run_module.train("cnn", tiny_project.params)
    assert summary["best"]["val_accuracy"] > 0.5  # chance is 0.1


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize(
    "interrupt",
    [sigterm_self_at_epoch, interrupt_at_epoch],
    ids=["sigterm", "ctrl-c"],
)
def test_interrupted_training_resumes_the_same_mlflow_run(
    tiny_project: TinyProject,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    interrupt: Callable[[int], EpochCallback],
) -> None:
    params = tiny_project.with_train("cnn", epochs=3)
    handler_before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        hook_after_epoch(patch, interrupt(2))
        with pytest.raises(KeyboardInterrupt):
            run_module.train("cnn", params)
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the stage's handler is undone
    assert "interrupted; last finished epoch is checkpointed" in capsys.readouterr().out

    [folder] = checkpoint_folders(tiny_project.root, "cnn")
    state = CheckpointStore(folder).load()
    assert state is not None and state["epoch"] == 2
    run_id = state["extra"]["mlflow_run_id"]
    client = MlflowClient(tiny_project.tracking_uri)
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert metric_steps(client, run_id, "val_accuracy") == [1, 2]
    assert not (Path("data/models/cnn/model.pt")).exists()
    assert not (Path("reports/models/cnn/train.json")).exists()

    summary = run_module.train("cnn", params)
    assert f"resuming from epoch 2 ({folder / 'last.pt'})" in capsys.readouterr().out
    assert json.loads(Path("data/models/cnn/mlflow_run.json").read_text())["run_id"] == run_id
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    for key in ("val_accuracy", "train_loss", "lr", "epoch_time_s"):
        assert metric_steps(client, run_id, key) == [1, 2, 3], key
    assert finished.data.params["train.lr"] == str(params.train["cnn"].lr)  # logged once, kept
    assert len(client.search_runs([killed.info.experiment_id])) == 1
    assert summary["epochs"] == 3
    assert [row["epoch"] for row in read_history("cnn")] == [1, 2, 3]
    assert checkpoint_folders(tiny_project.root, "cnn") == []


def test_an_epoch_interrupted_while_logging_is_logged_on_resume(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during the MLflow call of epoch 2, which is already checkpointed: the rerun starts
    at epoch 3, and logs epoch 2 first, so that the run still has every step once."""
    real_log_metrics = StageRun.log_metrics

    def interrupted(self: StageRun, metrics: dict[str, float], step: int | None = None) -> None:
        if step == 2:
            raise KeyboardInterrupt
        real_log_metrics(self, metrics, step)

    params = tiny_project.with_train("cnn", epochs=3)
    with monkeypatch.context() as patch:
        patch.setattr(StageRun, "log_metrics", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_module.train("cnn", params)
    [folder] = checkpoint_folders(tiny_project.root, "cnn")
    state = CheckpointStore(folder).load()
    assert state is not None and state["epoch"] == 2
    client = MlflowClient(tiny_project.tracking_uri)
    run_id = state["extra"]["mlflow_run_id"]
    assert metric_steps(client, run_id, "val_accuracy") == [1]

    run_module.train("cnn", params)
    for key in ("val_accuracy", "train_loss", "lr"):
        assert metric_steps(client, run_id, key) == [1, 2, 3], key
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_accuracy")}
    assert logged[2] == state["history"][1]["val_accuracy"]


def test_resuming_matches_the_uninterrupted_stage(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage's own wiring (seeding, model building, data loading) resumes exactly too."""
    params = tiny_project.with_train("transformer", epochs=2, model={"dropout": 0.3})
    run_module.train("transformer", params)
    straight = torch.load("data/models/transformer/model.pt", weights_only=True)
    straight_history = without_timing(read_history("transformer"))
    with monkeypatch.context() as patch:
        hook_after_epoch(patch, interrupt_at_epoch(1))
        with pytest.raises(KeyboardInterrupt):
            run_module.train("transformer", params)
    run_module.train("transformer", params)
    assert_same_weights(torch.load("data/models/transformer/model.pt", weights_only=True), straight)
    assert without_timing(read_history("transformer")) == straight_history


def test_a_stop_asked_for_while_outputs_are_written_waits_for_them() -> None:
    """SIGTERM and SIGINT inside the block: the block runs to its end, then Ctrl-C is raised."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        before = signal.getsignal(sig)
        finished = False
        with (
            pytest.raises(KeyboardInterrupt, match=f"signal {int(sig)}"),
            signals_deferred(),
        ):
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the handler has run by now; an unheld signal would have struck
            finished = True
        assert finished
        assert signal.getsignal(sig) == before  # the handler is restored
    with signals_deferred():  # no signal: nothing raised
        pass
