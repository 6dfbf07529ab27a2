"""Shared fixtures: a local HTTP server, a port nobody listens on, tiny IMDB data builders."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from dlpipe.config import Params, load_params, parse_params
from dlpipe.data.text import word_vectors
from dlpipe.inputs.tokens import WORD_VECTORS_FILE
from dlpipe.integrity import seal

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = load_params(REPO_ROOT / "params.yaml").models


@dataclass
class Route:
    """What the test server answers for one path; `length` overrides Content-Length."""

    body: bytes = b""
    status: int = 200
    length: int | None = None


@dataclass
class Server:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def serve(
        self, path: str, body: bytes = b"", status: int = 200, length: int | None = None
    ) -> str:
        """Answer `path` with this response; returns its URL."""
        self.routes[path] = Route(body, status, length)
        return self.url(path)


@pytest.fixture
def http_server() -> Iterator[Server]:
    """A threaded HTTP server on 127.0.0.1; unknown paths answer 404."""
    state = Server(base="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] += 1
            route = state.routes.get(self.path, Route(status=404))
            self.send_response(route.status)
            length = route.length if route.length is not None else len(route.body)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(route.body)
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Tiny IMDB: (split folder, label folder) -> texts by review id. Twelve train/neg reviews so that
# numeric id order (2 < 10) differs from name order; texts carry CSV-hostile characters.
TINY_IMDB: dict[tuple[str, str], list[str]] = {
    ("train", "neg"): [
        'He said "no", then left, sadly.',
        "  leading and trailing spaces  ",
        "A bad film.<br /><br />Really.",
        "NA",
        *[f"negative review number {i}" for i in range(4, 12)],
    ],
    ("train", "pos"): ["Bromwell High is a cartoon comedy. It ran", "Ünïcödé — fine 😀", "N/A"],
    ("test", "neg"): ["null", 'Meh; 4/10, "quoted"'],
    ("test", "pos"): ["Great: 9/10!"],
    ("train", "unsup"): ["first unlabeled, with comma", "second", "None", "third\tone"],
}
RATING = {"neg": 3, "pos": 8, "unsup": 0}


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def make_acl_archive() -> Callable[..., Path]:
    """Writes an aclImdb-shaped tar.gz (ids in scrambled order, plus files the reader ignores)."""

    def make(path: Path, extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
        with tarfile.open(path, "w:gz") as tar:
            _tar_add(tar, "aclImdb/README", b"Large Movie Review Dataset v1.0\n")
            _tar_add(tar, "aclImdb/train/labeledBow.feat", b"0 0:1 1:2\n")
            _tar_add(tar, "aclImdb/train/urls_pos.txt", b"http://www.imdb.com/title/x\n")
            for (split, folder), texts in TINY_IMDB.items():
                for review_id in reversed(range(len(texts))):
                    name = f"aclImdb/{split}/{folder}/{review_id}_{RATING[folder]}.txt"
                    _tar_add(tar, name, texts[review_id].encode("utf-8"))
            if extra is not None:
                extra(tar)
        return path

    return make


@pytest.fixture
def make_csv_export() -> Callable[[Path], dict[str, Path]]:
    """Writes the mirror's CSV export (gzip, CRLF, minimal quoting) of the tiny IMDB data."""

    def write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(rows)
        path.write_bytes(gzip.compress(buffer.getvalue().encode("utf-8"), mtime=0))
        return path

    def make(folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for split in ("train", "test"):
            rows: list[list[object]] = [[0, t] for t in TINY_IMDB[(split, "neg")]]
            rows += [[1, t] for t in TINY_IMDB[(split, "pos")]]
            files[split] = write(folder / f"{split}.csv.gz", ["label", "text"], rows)
        unsup: list[list[object]] = [[t] for t in TINY_IMDB[("train", "unsup")]]
        files["unsup"] = write(folder / "unsup.csv.gz", ["text"], unsup)
        return files

    return make


# --- training / tracking: a tiny project with synthetic prepared data ---------------------------

TINY_VOCAB = 50
TINY_MAX_TOKENS = 40
SIGNAL_TOKEN = 2  # its presence makes a tiny-IMDB review positive


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_stage_here(stage: str, name: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """`python stages/<stage>.py <name>`, in this process (so that faults can be injected)."""
    monkeypatch.setattr(sys, "argv", [f"{stage}.py", name])
    try:
        runpy.run_path(str(REPO_ROOT / "stages" / f"{stage}.py"), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def start_model_server(
    model_uri: str, tracking_uri: str, log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """`mlflow models serve` of `model_uri` on a free 127.0.0.1 port, logging to `log_path`;
    the process (its own session: stop it with stop_process_group) and its URL."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri,
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, f"http://127.0.0.1:{port}"


def wait_for_ping(
    process: subprocess.Popen[bytes], url: str, log_path: Path, started: float
) -> None:
    """Until the scoring server answers /ping; fails the test if it exits or takes over 120 s."""
    while True:
        if process.poll() is not None:
            pytest.fail(f"server exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() - started > 120:
            pytest.fail(f"no /ping within 120 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server started with start_new_session=True (its workers too), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class MlflowServer:
    """A real `mlflow server` started as `make mlflow-server` starts it (`python -m
    dlpipe.server`: proxied artifacts, 127.0.0.1), with store `backend` (default: sqlite in
    `folder`), on `port`; a test may kill it and start it again: the same store comes back at
    the same URL."""

    folder: Path
    backend: str = ""
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start it and wait (≤ 60 s) until it answers /health; returns its URL."""
        command = [
            sys.executable, "-m", "dlpipe.server",
            "--backend-store-uri", self.backend or f"sqlite:///{self.folder / 'srv.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                tail = (self.folder / "server.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow server exited with {self.process.returncode}:\n{tail}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {self.url}/health within 60 s")
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


@contextmanager
def running_mlflow_server(folder: Path, backend: str) -> Iterator[str]:
    """An MlflowServer on store `backend` for the block; yields its URL."""
    server = MlflowServer(folder, backend)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free port; yields its URL."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def killable_mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A started `mlflow server` of this test's own, to kill and restart at will."""
    server = MlflowServer(tmp_path / "mlflow-server")
    server.folder.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- serving / registry / CLI: tiny trained-model folders and a registry store ------------------

SERVING_REVIEWS = [
    "A wonderful film, moving and beautifully acted.",
    "An awful, boring film. The plot made no sense at all.",
    "Great acting, great music, a great story!",
    "Dull, slow and far too long; I fell asleep.",
    "The best movie I have seen this year.",
    "Terrible dialogue and a silly, predictable ending.",
]
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
    from dlpipe.tracking import experiment_id

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


# --- the real data --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_mirror() -> str:
    """Where the real files are: DLPIPE_DATA_MIRROR if set, else `../shared/datasets` beside the
    repo. Where neither holds the data the test is skipped, saying so in one line; under CI=true
    it fails instead, so that a CI without its data never passes with its real tests skipped."""
    mirror = os.environ.get("DLPIPE_DATA_MIRROR") or str(REPO_ROOT.parent / "shared" / "datasets")
    if "://" not in mirror and not (
        Path(mirror, "mnist").is_dir() and Path(mirror, "imdb").is_dir()
    ):
        missing = f"no data mirror with mnist/ and imdb/ at {mirror} (set DLPIPE_DATA_MIRROR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {missing}", pytrace=False)
        pytest.skip(missing)
    return mirror


# --- families -----------------------------------------------------------------------------------


def dataset_of(name: str) -> str:
    """The dataset model `name` trains on (params.yaml's train.<name>.dataset)."""
    return load_params(REPO_ROOT / "params.yaml").train[name].dataset


def family_model(name: str, params: Params, meta: Any) -> Any:
    """A fresh network of model `name`, built from `params`' train.<name>."""
    from dlpipe.family import model_family

    family = model_family(params, name)
    return family.build(family.model_config(params, name), meta)
