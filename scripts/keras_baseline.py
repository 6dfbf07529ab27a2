"""The classic Keras MNIST convnet, run as published on this machine, next to train@cnn's numbers.

The brief's yardstick: conv32(3x3)-maxpool-conv64-maxpool-conv64-dense64-dense10, Adam, 5 epochs,
`model.fit` defaults (batch 32), trained on the 60k training images and scored on the 10k test
images. It needs TensorFlow, so `make bench-keras` runs it in its own venv (.venv-keras) and
TensorFlow never enters requirements.lock. It reads the same canonical IDX files as the pipeline
(data/raw/mnist, from `dvc repro fetch`) and compares with reports/models/cnn/{train,eval}.json,
so run `dvc repro evaluate@cnn` first, on the same machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data.mnist import load_split
from dlpipe.errors import DlpipeError, exit_on_user_error


def run_keras_program(raw_dir: Path, epochs: int) -> dict[str, Any]:
    """The Keras program, unchanged apart from reading the local IDX files."""
    import tensorflow as tf
    from tensorflow.keras import layers, models

    (train_images, train_labels), (test_images, test_labels) = (
        load_split(raw_dir, "train"),
        load_split(raw_dir, "test"),
    )
    train_images = train_images.reshape((-1, 28, 28, 1)).astype(np.float32) / 255.0
    test_images = test_images.reshape((-1, 28, 28, 1)).astype(np.float32) / 255.0

    model = models.Sequential(
        [
            layers.Input(shape=(28, 28, 1)),
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
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(train_images, train_labels, epochs=epochs, verbose=2)
    fit_s = time.perf_counter() - start
    _, test_accuracy = model.evaluate(test_images, test_labels, verbose=0)
    return {
        "program": f"Keras (TensorFlow {tf.__version__}), fp32",
        "parameters": int(model.count_params()),
        "train_images": len(train_images),
        "epochs": epochs,
        "train_time_s": round(fit_s, 1),
        "samples_per_s": round(len(train_images) * epochs / fit_s),
        "test_accuracy": round(float(test_accuracy), 4),
    }


def read_pipeline_cnn(reports: Path) -> dict[str, Any]:
    """train@cnn's own record of the same measurements."""
    try:
        trained = json.loads((reports / "models" / "cnn" / "train.json").read_text())
        evaluated = json.loads((reports / "models" / "cnn" / "eval.json").read_text())
        data = json.loads((reports / "data" / "mnist.json").read_text())
    except (OSError, ValueError) as err:
        raise DlpipeError(f"{reports}: no train@cnn record ({err}); run `dvc repro`") from None
    return {
        "program": f"dlpipe train@cnn, {trained['precision']}",
        "parameters": trained["parameters"],
        "train_images": data["train"]["count"],  # the rest of the 60k is its validation split
        "epochs": trained["epochs"],
        "train_time_s": round(trained["train_time_s"], 1),
        "samples_per_s": round(trained["samples_per_s"]),
        "test_accuracy": round(evaluated["test_accuracy"], 4),
    }


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=Path("data/raw/mnist"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    ours = read_pipeline_cnn(args.reports)
    rows = [run_keras_program(args.raw, args.epochs), ours]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
