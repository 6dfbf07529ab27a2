"""Tiny trained-model folders (one per family) and a registry store, for serving, registry
and CLI tests."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dlpipe.integrity import seal
from support.tiny import MNIST_META, imdb_meta, tiny_tokenizer

SERVING_DATA_MAX_LEN = 16  # tokens kept per review: short, so truncation is exercised


@dataclass
class TrainedFolders:
    """A project folder (as `dvc repro` leaves it) holding tiny untrained-but-saved models."""

    root: Path

    def model_dir(self, family: str) -> Path:
        return self.root / "data" / "models" / family

    @property
    def tokenizer(self) -> Path:
        return self.root / "data" / "prepared" / "imdb" / "tokenizer.json"


def build_trained_folders(root: Path) -> TrainedFolders:
    """Save tiny cnn / rnn / transformer models in the train stage's layout (model.pt +
    config.json with the prepared meta.json under "data"), and a tokenizer trained on a few
    sentences; random weights: these tests check plumbing, not accuracy."""
    import torch

    from dlpipe.family import DataMeta, get_family
    from dlpipe.models.cnn import CNNConfig
    from dlpipe.models.rnn import RNNConfig
    from dlpipe.models.transformer import TransformerConfig

    folders = TrainedFolders(root)
    folders.tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save(str(folders.tokenizer))
    text_meta = imdb_meta(tokenizer.get_vocab_size(), SERVING_DATA_MAX_LEN)
    configs: dict[str, tuple[Any, dict[str, Any]]] = {
        "cnn": (CNNConfig(), MNIST_META),
        "rnn": (RNNConfig(embed_dim=8, hidden_size=8, dropout=0.0), text_meta),
        "transformer": (
            TransformerConfig(d_model=16, heads=2, layers=1, ff_dim=32, dropout=0.0, max_len=64),
            text_meta,
        ),
    }
    torch.manual_seed(0)
    for family, (config, meta) in configs.items():
        model = get_family(family).build(config, DataMeta.from_json(meta))
        folder = folders.model_dir(family)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "model.pt")
        for name in get_family(family).inputs.bundled:
            shutil.copyfile(folders.tokenizer.parent / name, folder / name)
        info = {
            "model": family,
            "family": family,
            "dataset": meta["dataset"],
            "model_config": config.model_dump(),
            "data": meta,
        }
        (folder / "config.json").write_text(json.dumps(info), encoding="utf-8")
        seal(folder)  # as stages/train.py does: load_trained checks the files against it
    return folders


@pytest.fixture(scope="session")
def trained_folders(tmp_path_factory: pytest.TempPathFactory) -> TrainedFolders:
    """Read-only tiny trained outputs: `root/data/models/<family>`, `root/data/prepared/imdb`."""
    return build_trained_folders(tmp_path_factory.mktemp("trained") / "project")


@contextmanager
def mlflow_tracking(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (global URI and MLFLOW_TRACKING_URI) at `uri`, then restore
    both, so a session fixture does not leave later tests talking to its store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_uri, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        # None (nothing was set) is what resets it, though the annotation says str.
        mlflow.set_tracking_uri(old_uri)  # type: ignore[arg-type]
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


@dataclass
class RegistryStore:
    """A sqlite MLflow store where the raw-input transformer and CNN are logged, registered as
    dlpipe-<family> and promoted to `champion`."""

    uri: str
    folders: TrainedFolders
    model_uris: dict[str, str]
    run_ids: dict[str, str]
    experiment: str = "dlpipe"


@pytest.fixture(scope="session")
def registry_store(
    tmp_path_factory: pytest.TempPathFactory,
    trained_folders: TrainedFolders,
    _mlflow_db_template: Path,
) -> RegistryStore:
    import mlflow
    from mlflow.tracking import MlflowClient

    from dlpipe.config import RegistryConfig
    from dlpipe.registry import register_and_promote
    from dlpipe.serving import log_raw_input_model
    from dlpipe.tracking.store import experiment_id

    folder = tmp_path_factory.mktemp("registry-store")
    db = folder / "mlflow.db"
    shutil.copyfile(_mlflow_db_template, db)
    uri = f"sqlite:///{db}"
    store = RegistryStore(uri, trained_folders, {}, {})
    client = MlflowClient(uri)
    with mlflow_tracking(uri):
        exp = experiment_id(store.experiment, uri)
        for family in ("transformer", "cnn"):
            with mlflow.start_run(experiment_id=exp, run_name=f"{family}-raw") as run:
                mlflow.set_tag("model_family", family)
                model_uri = log_raw_input_model(trained_folders.model_dir(family))
            decision = register_and_promote(
                family, model_uri, run.info.run_id, {"test_accuracy": 0.5}, RegistryConfig(), client
            )
            assert decision["promoted"], decision
            store.model_uris[family] = model_uri
            store.run_ids[family] = run.info.run_id
    return store
