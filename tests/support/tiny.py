"""A tiny project: the real params.yaml shrunk, synthetic prepared data, its own MLflow store."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from dlpipe.config import Params, load_params, parse_params
from dlpipe.data.text import word_vectors
from dlpipe.inputs.tokens import TEXTS_FILE, WORD_VECTORS_FILE
from dlpipe.integrity import seal
from support.families import MODELS, REPO_ROOT

TINY_VOCAB = 50
TINY_MAX_TOKENS = 40
SIGNAL_TOKEN = 2  # its presence makes a tiny-IMDB review positive
# What prepare@imdb writes, sorted: the splits, the texts, the tokenizer and word vectors, the card.
PREPARED_IMDB_FILES = [
    "SHA256SUMS",
    "meta.json",
    "test.npz",
    "texts.parquet",
    "tokenizer.json",
    "train.npz",
    "val.npz",
    "word_vectors.npy",
]


def tiny_mnist_arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    """MNIST-shaped uint8 images [n, 1, 28, 28]: dim noise plus a bright 6x6 patch whose place
    is the label."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 1, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = 2 + 14 * (label // 5), 1 + 5 * (label % 5)
        images[i, 0, row : row + 6, col : col + 6] = 255
    return {"images": images, "labels": labels.astype(np.int64)}


def tiny_imdb_arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    """IMDB-shaped token rows (pad 0, lengths 3..40): positive iff SIGNAL_TOKEN occurs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    lengths = rng.integers(3, TINY_MAX_TOKENS + 1, size=n)
    tokens = np.zeros((n, TINY_MAX_TOKENS), dtype=np.int32)
    for i, (label, length) in enumerate(zip(labels, lengths, strict=True)):
        row = rng.integers(SIGNAL_TOKEN + 1, TINY_VOCAB, size=length)
        if label:  # at least one signal token, and about one in four
            hits = rng.random(length) < 0.25
            hits[rng.integers(length)] = True
            row[hits] = SIGNAL_TOKEN
        tokens[i, :length] = row
    return {"tokens": tokens, "lengths": lengths, "labels": labels.astype(np.int64)}


MNIST_META: dict[str, Any] = {
    "inputs": "images",
    "dataset": "mnist",
    "num_classes": 10,
    "label_names": [str(d) for d in range(10)],
    "image": {"channels": 1, "height": 28, "width": 28, "mean": [0.1307], "std": [0.3081],
              "raw": "digit"},
}  # fmt: skip


def imdb_meta(vocab_size: int, max_len: int) -> dict[str, Any]:
    """A prepared text dataset's meta.json, as prepare@imdb writes it."""
    return {
        "inputs": "tokens",
        "dataset": "imdb",
        "num_classes": 2,
        "label_names": ["negative", "positive"],
        "vocab_size": vocab_size,
        "pad_id": 0,
        "max_len": max_len,
        "truncation": "head+tail",
    }


def _write_prepared(folder: Path, meta: dict[str, Any], splits: dict[str, dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, arrays in splits.items():
        np.savez(folder / f"{split}.npz", **arrays)
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def tiny_params_dict() -> dict[str, Any]:
    """The real params.yaml, shrunk to seconds of CPU training per model."""
    raw = load_params(REPO_ROOT / "params.yaml").model_dump()
    for name in MODELS:
        raw["train"][name].update(
            epochs=2,
            batch_size=32,
            eval_batch_size=64,
            device="cpu",
            precision="fp32",
            deterministic=False,
            max_steps_per_epoch=0,
        )
    raw["train"]["cnn"]["lr"] = 0.003
    raw["train"]["rnn"]["model"].update(embed_dim=16, hidden_size=16)
    raw["train"]["transformer"]["model"].update(
        d_model=16, heads=2, layers=1, ff_dim=32, max_len=64
    )
    raw["train"]["transformer"]["lr"] = 0.003
    raw["datasets"]["imdb"]["max_len"] = 64  # no more than the Transformer keeps
    raw["mlflow"]["system_metrics_interval_s"] = 1.0
    return raw


def tiny_tokenizer() -> Any:
    """A tokenizer learned from a few sentences: its ids fit the tiny models' embeddings."""
    from dlpipe.data.text import TextSettings, train_tokenizer

    settings = TextSettings(format="table", path="-", vocab_size=120, min_frequency=1)
    return train_tokenizer(SERVING_REVIEWS, settings)


@dataclass
class TinyProject:
    """A project folder (the cwd) with prepared tiny data, its params and its MLflow store."""

    root: Path
    params: Params
    tracking_uri: str

    def with_train(self, family: str, /, **updates: Any) -> Params:
        """`params` with `train.<family>` keys replaced (`model={...}` merges into its model)."""
        raw = self.params.model_dump()
        section = raw["train"][family]
        section["model"].update(updates.pop("model", {}))
        section.update(updates)
        return parse_params(raw, "tiny params")

    def with_mlflow(self, **updates: Any) -> Params:
        """`params` with `mlflow.<key>` values replaced."""
        raw = self.params.model_dump()
        raw["mlflow"].update(updates)
        return parse_params(raw, "tiny params")

    def write_params(self, params: Params | None = None) -> Path:
        """params.yaml in the project root, for stage scripts run as subprocesses."""
        path = self.root / "params.yaml"
        path.write_text(yaml.safe_dump((params or self.params).model_dump()), encoding="utf-8")
        return path


@pytest.fixture(scope="session")
def _mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow sqlite store: copying it skips the migrations per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@contextmanager
def use_tiny_project(
    folder: Path, monkeypatch: pytest.MonkeyPatch, db_template: Path
) -> Iterator[TinyProject]:
    """Make `folder/project` a tiny project with its MLflow store `folder/mlflow.db`; cwd and
    MLFLOW_TRACKING_URI point at them (through `monkeypatch`) while the block runs.

    Torch runs single-threaded meanwhile: these models are far too small to gain from threads,
    and on a busy 2-core machine oversubscribed threads made them several times slower."""
    import mlflow
    import torch
    from mlflow.tracking._tracking_service import utils as tracking_utils

    root = folder / "project"
    prepared = root / "data" / "prepared"
    _write_prepared(
        prepared / "mnist",
        MNIST_META,
        {"train": tiny_mnist_arrays(256, seed=1), "val": tiny_mnist_arrays(64, seed=2)},
    )
    tokenizer = tiny_tokenizer()
    vocab_size = max(TINY_VOCAB, tokenizer.get_vocab_size())
    text_train = tiny_imdb_arrays(256, seed=3)
    _write_prepared(
        prepared / "imdb",
        imdb_meta(vocab_size, TINY_MAX_TOKENS),
        {"train": text_train, "val": tiny_imdb_arrays(64, seed=4)},
    )
    tokenizer.save(str(prepared / "imdb" / "tokenizer.json"))  # trained models bundle it
    reviews = [row[:n] for row, n in zip(text_train["tokens"], text_train["lengths"], strict=True)]
    vectors = word_vectors(reviews, vocab_size, dim=16, window=5, seed=0)  # as prepare@imdb does
    np.save(prepared / "imdb" / WORD_VECTORS_FILE, vectors)
    for dataset in ("mnist", "imdb"):
        seal(prepared / dataset)  # as prepare does: load_split checks the files against it
    db = folder / "mlflow.db"
    shutil.copyfile(db_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    global_uri = tracking_utils._tracking_uri  # train() sets MLflow's global tracking URI
    try:
        yield TinyProject(root, parse_params(tiny_params_dict(), "tiny params"), uri)
    finally:
        torch.set_num_threads(threads)
        while mlflow.active_run() is not None:  # a failed test must not leak its run
            mlflow.end_run("FAILED")
        tracking_utils._tracking_uri = global_uri


@pytest.fixture
def tiny_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _mlflow_db_template: Path
) -> Iterator[TinyProject]:
    """cwd = a tiny project (data/prepared/{mnist,imdb}), MLflow store = sqlite in tmp_path."""
    with use_tiny_project(tmp_path, monkeypatch, _mlflow_db_template) as project:
        yield project


def hook_after_epoch(
    monkeypatch: pytest.MonkeyPatch, after_epoch: Callable[[dict[str, float]], None]
) -> None:
    """Make `dlpipe.training.run.train` call `after_epoch(row)` after its own epoch callback
    (which logs the epoch to MLflow), e.g. to interrupt the training at a chosen epoch."""
    from dlpipe.training import run
    from dlpipe.training.trainer import Trainer

    class HookedTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            inner = self.on_epoch_end

            def hook(row: dict[str, float]) -> None:
                if inner is not None:
                    inner(row)
                after_epoch(row)

            self.on_epoch_end = hook

    monkeypatch.setattr(run, "Trainer", HookedTrainer)


def run_stage_here(stage: str, name: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """`python stages/<stage>.py <name>`, in this process (so that faults can be injected)."""
    monkeypatch.setattr(sys, "argv", [f"{stage}.py", name])
    try:
        runpy.run_path(str(REPO_ROOT / "stages" / f"{stage}.py"), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


SERVING_REVIEWS = [
    "A wonderful film, moving and beautifully acted.",
    "An awful, boring film. The plot made no sense at all.",
    "Great acting, great music, a great story!",
    "Dull, slow and far too long; I fell asleep.",
    "The best movie I have seen this year.",
    "Terrible dialogue and a silly, predictable ending.",
]


def add_test_splits(project: TinyProject) -> None:
    """What prepare writes beyond the training fixture: test splits, the texts by row id
    (texts.parquet, which the mistakes table reads), and the data cards."""
    prepared = project.root / "data" / "prepared"
    mnist = tiny_mnist_arrays(80, seed=5)
    np.savez(prepared / "mnist" / "test.npz", **mnist)
    imdb = tiny_imdb_arrays(80, seed=6)
    row_ids = np.array([f"test/x/{i}" for i in range(80)])
    np.savez(prepared / "imdb" / "test.npz", **imdb, row_id=row_ids)
    texts = pd.DataFrame(
        {
            "split": "test",
            "row_id": row_ids,
            "text": [f"review number {i} | with a pipe" for i in range(80)],
        }
    )
    texts.to_parquet(prepared / "imdb" / TEXTS_FILE, index=False)
    for dataset in ("mnist", "imdb"):
        seal(prepared / dataset)  # as prepare does: what evaluate reads is checked against it
    reports_data = project.root / "reports" / "data"
    reports_data.mkdir(parents=True)
    for dataset, arrays in (("mnist", mnist), ("imdb", imdb)):
        counts = np.bincount(arrays["labels"]).tolist()
        card = {split: {"count": 80, "class_counts": counts} for split in ("train", "val", "test")}
        (reports_data / f"{dataset}.json").write_text(json.dumps(card))
