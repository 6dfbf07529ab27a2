"""The programs people run instead of dlpipe, as published, timed alike for `make bench`.

Run one per process (`python scripts/bench_programs.py PROGRAM --out FILE`) so each has its own
peak memory; scripts/bench.py runs them beside dlpipe's stages and writes the table. Keras needs
TensorFlow, so those run in .venv-keras and TensorFlow never enters requirements.lock.

Every program records the same things: each epoch's training time (what follows the epoch, a pass
over the test split to see when it peaked, is not timed: the published programs hold no
validation split), the held-out accuracy after each epoch and the final test accuracy.
  - keras-cnn: the classic Keras MNIST convnet, Adam, batch 32, 5 epochs, 60k images;
  - torch-cnn: the same network in a tutorial-style PyTorch loop (torchvision MNIST + DataLoader,
    ToTensor + Normalize, batch 32, fp32, Adam);
  - keras-bilstm: the Keras "Bidirectional LSTM on IMDB" example (20k words, last 200 words,
    embedding 128, 2x BiLSTM 64, batch 32, 2 epochs);
  - keras-transformer: the Keras "Text classification with Transformer" example (20k words, 200
    words, embedding 32, 2 heads, feed-forward 32, batch 32, 2 epochs);
  - tfidf, nbsvm: the pipeline's own linear models (dlpipe.linear.tfidf_logreg and .nbsvm, with
    their default settings), fit on the 25k training reviews;
  - tfidf-20k, nbsvm-20k: the same, fit on the 20k of them that dlpipe's models train on
    (prepare's split).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as published by LeCun et al.: big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def mnist(raw: Path, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (read_idx(raw / name) for name in MNIST_FILES[split])
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def imdb(raw: Path, split: str, limit: int) -> tuple[list[str], np.ndarray]:
    frame = pd.read_parquet(raw / f"{split}.parquet", columns=["text", "label"])
    if limit:  # the parquet is ordered by label: sample, do not cut
        frame = frame.sample(n=limit, random_state=0)
    return frame["text"].tolist(), frame["label"].to_numpy(np.int64)


def without_markup(texts: list[str]) -> list[str]:
    """The reviews as the linear stage reads them (dlpipe.inputs.tokens.labelled_texts): line
    breaks ("<br />") as spaces, not the word "br"."""
    from dlpipe.inputs.tokens import clean_markup

    return [clean_markup(text) for text in texts]


class EpochRecorder:
    """Training time per epoch and held-out accuracy after it (measured outside the timing)."""

    def __init__(self, heldout_accuracy: Callable[[], float]) -> None:
        self.heldout_accuracy = heldout_accuracy
        self.epoch_times: list[float] = []
        self.heldout: list[float] = []
        self._start = 0.0

    def begin(self) -> None:
        self._start = time.perf_counter()

    def end(self) -> None:
        self.epoch_times.append(time.perf_counter() - self._start)
        self.heldout.append(round(float(self.heldout_accuracy()), 4))


def keras_fit(model: Any, x: Any, y: Any, epochs: int, x_test: Any, y_test: Any) -> EpochRecorder:
    """model.fit as the examples call it, with an EpochRecorder riding along as a callback."""
    import keras

    recorder = EpochRecorder(lambda: model.evaluate(x_test, y_test, batch_size=1024, verbose=0)[1])

    class Record(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            recorder.begin()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            recorder.end()

    model.fit(x, y, batch_size=32, epochs=epochs, verbose=2, callbacks=[Record()])
    return recorder


def keras_cnn(mnist_raw: Path, imdb_raw: Path, quick: bool) -> dict[str, Any]:
    import keras
    from keras import layers

    limit = (6000, 2000) if quick else (0, 0)
    splits = zip(MNIST_FILES, limit, strict=True)
    (x, y), (x_test, y_test) = (mnist(mnist_raw, split, n) for split, n in splits)
    x, x_test = (a.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0 for a in (x, x_test))
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    recorder = keras_fit(model, x, y, 1 if quick else 5, x_test, y_test)
    return result(recorder, len(x), f"Keras {keras.__version__} (TensorFlow), fp32, batch 32")


def torch_cnn(mnist_raw: Path, imdb_raw: Path, quick: bool) -> dict[str, Any]:
    """The loop a PyTorch tutorial teaches, on torchvision's MNIST reading the same IDX files."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="bench-mnist-"))
    (root / "MNIST" / "raw").mkdir(parents=True)
    for name in (n for pair in MNIST_FILES.values() for n in pair):  # torchvision wants them raw
        with gzip.open(mnist_raw / name) as src, open(root / "MNIST/raw" / name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )
    train_set: Any = datasets.MNIST(str(root), train=True, transform=transform)
    test_set: Any = datasets.MNIST(str(root), train=False, transform=transform)
    if quick:
        train_set, test_set = Subset(train_set, range(6000)), Subset(test_set, range(2000))
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=1000)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def test_accuracy() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
        return correct / len(test_set)

    recorder = EpochRecorder(test_accuracy)
    for _ in range(1 if quick else 5):
        recorder.begin()
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
        recorder.end()
    shutil.rmtree(root)
    return result(recorder, len(train_set), f"PyTorch {torch.__version__} tutorial loop, fp32")


def imdb_sequences(imdb_raw: Path, quick: bool) -> tuple[Any, ...]:
    """The Keras examples' input: the 20k most frequent words, each review's last 200 of them."""
    import keras

    limit = (8000, 2000) if quick else (0, 0)
    (texts, y), (test_texts, y_test) = (
        imdb(imdb_raw, s, n) for s, n in zip(("train", "test"), limit, strict=True)
    )
    vectorize = keras.layers.TextVectorization(max_tokens=20000, ragged=True)
    vectorize.adapt(texts, batch_size=1024)

    def encode(batch: list[str]) -> np.ndarray:
        ids = [row.numpy().tolist() for row in vectorize(batch)]
        return keras.utils.pad_sequences(ids, maxlen=200)  # pre-padding and -truncation, as there

    return encode(texts), y, encode(test_texts), y_test


def keras_bilstm(mnist_raw: Path, imdb_raw: Path, quick: bool) -> dict[str, Any]:
    import keras
    from keras import layers

    x, y, x_test, y_test = imdb_sequences(imdb_raw, quick)
    inputs = keras.Input(shape=(None,), dtype="int32")
    hidden = layers.Embedding(20000, 128)(inputs)
    hidden = layers.Bidirectional(layers.LSTM(64, return_sequences=True))(hidden)
    hidden = layers.Bidirectional(layers.LSTM(64))(hidden)
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(hidden))
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    recorder = keras_fit(model, x, y, 1 if quick else 2, x_test, y_test)
    return result(recorder, len(x), f"Keras {keras.__version__} BiLSTM example, fp32, batch 32")


def keras_transformer(mnist_raw: Path, imdb_raw: Path, quick: bool) -> dict[str, Any]:
    import keras
    from keras import layers, ops

    x, y, x_test, y_test = imdb_sequences(imdb_raw, quick)
    maxlen, vocab, embed, heads, ff = 200, 20000, 32, 2, 32

    class TokenAndPositionEmbedding(layers.Layer):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.token_emb = layers.Embedding(vocab, embed)
            self.pos_emb = layers.Embedding(maxlen, embed)

        def call(self, x: Any) -> Any:
            positions = ops.arange(0, ops.shape(x)[-1], 1)
            return self.token_emb(x) + self.pos_emb(positions)

    inputs = keras.Input(shape=(maxlen,))
    hidden = TokenAndPositionEmbedding()(inputs)
    attention = layers.MultiHeadAttention(num_heads=heads, key_dim=embed)(hidden, hidden)
    hidden = layers.LayerNormalization(epsilon=1e-6)(hidden + layers.Dropout(0.1)(attention))
    ffn = keras.Sequential([layers.Dense(ff, activation="relu"), layers.Dense(embed)])
    hidden = layers.LayerNormalization(epsilon=1e-6)(hidden + layers.Dropout(0.1)(ffn(hidden)))
    hidden = layers.Dropout(0.1)(layers.GlobalAveragePooling1D()(hidden))
    hidden = layers.Dropout(0.1)(layers.Dense(20, activation="relu")(hidden))
    model = keras.Model(inputs, layers.Dense(2, activation="softmax")(hidden))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    recorder = keras_fit(model, x, y, 1 if quick else 2, x_test, y_test)
    return result(recorder, len(x), f"Keras {keras.__version__} Transformer example, fp32")


def fit_linear(
    name: str, texts: list[str], y: np.ndarray, test_texts: list[str], y_test: np.ndarray
) -> dict[str, Any]:
    """dlpipe's linear model `name` (a module of dlpipe.linear) with its default settings."""
    import importlib

    import sklearn

    from dlpipe.config import LinearConfig

    module = importlib.import_module(f"dlpipe.linear.{name}")
    model = module.make_model(getattr(LinearConfig(), name), seed=0)
    texts, test_texts = without_markup(texts), without_markup(test_texts)
    recorder = EpochRecorder(
        lambda: float((model.predict_proba(test_texts).argmax(1) == y_test).mean())
    )
    recorder.begin()
    model.fit(texts, y)
    recorder.end()
    return result(
        recorder, len(texts), f"scikit-learn {sklearn.__version__} {module.__doc__.split(':')[0]}"
    )


def reviews_25k(imdb_raw: Path, quick: bool) -> tuple[tuple[list[str], np.ndarray], ...]:
    """The official training and test reviews (all 25k each, as the other programs)."""
    limit = (8000, 2000) if quick else (0, 0)
    return tuple(imdb(imdb_raw, s, n) for s, n in zip(("train", "test"), limit, strict=True))


def reviews_20k(imdb_raw: Path, quick: bool) -> tuple[tuple[list[str], np.ndarray], ...]:
    """The rows dlpipe's models train on: prepare's split of the training reviews (params.yaml's
    val_size and seed), so the comparison holds the data fixed; the same test reviews."""
    import yaml

    from dlpipe.config import parse_params
    from dlpipe.data.splits import stratified_split, stratified_subset

    params = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    (texts, y), test = reviews_25k(imdb_raw, quick)
    config, seed = params.datasets["imdb"], params.seed
    max_train, val_size = config.model_dump()["max_train"], config.model_dump()["val_size"]
    rows = np.arange(len(y)) if quick else stratified_subset(y, max_train, seed)
    val_size = len(rows) // 5 if quick else val_size
    keep = rows[stratified_split(y[rows], val_size, seed)[0]]
    return ([texts[i] for i in keep], y[keep]), test


def linear_program(name: str, reviews: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
    def run(mnist_raw: Path, imdb_raw: Path, quick: bool) -> dict[str, Any]:
        (texts, y), (test_texts, y_test) = reviews(imdb_raw, quick)
        return fit_linear(name, texts, y, test_texts, y_test)

    return run


def result(recorder: EpochRecorder, samples: int, program: str) -> dict[str, Any]:
    return {
        "program": program,
        "train_samples": samples,
        "epoch_times_s": [round(t, 2) for t in recorder.epoch_times],
        "heldout": "test",
        "heldout_accuracy": recorder.heldout,
        "test_accuracy": recorder.heldout[-1],
    }


PROGRAMS = {
    "keras-cnn": keras_cnn,
    "torch-cnn": torch_cnn,
    "keras-bilstm": keras_bilstm,
    "keras-transformer": keras_transformer,
    "tfidf": linear_program("tfidf_logreg", reviews_25k),
    "tfidf-20k": linear_program("tfidf_logreg", reviews_20k),
    "nbsvm": linear_program("nbsvm", reviews_25k),
    "nbsvm-20k": linear_program("nbsvm", reviews_20k),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", choices=sorted(PROGRAMS))
    parser.add_argument("--mnist", type=Path, default=Path("data/raw/mnist"))
    parser.add_argument("--imdb", type=Path, default=Path("data/raw/imdb"))
    parser.add_argument("--quick", action="store_true", help="slices and one epoch (CI)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON record")
    args = parser.parse_args()
    record = PROGRAMS[args.program](args.mnist, args.imdb, args.quick)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
