"""Logistic regression on the pixels (scaled to 0-1): the linear model of every image dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlpipe.config import Params
from dlpipe.data.tensors import load_split
from dlpipe.linear import Fitted

NAME = "pixels_logreg"
INPUTS = "images"


def _pixels(prepared_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    data = load_split(prepared_dir, split)
    images = data.features["images"].numpy()
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, data.labels.numpy()


def fit(params: Params, prepared_dir: Path) -> Fitted:
    from sklearn.linear_model import LogisticRegression

    config = params.linear.pixels_logreg
    train, val, test = (_pixels(prepared_dir, split) for split in ("train", "val", "test"))
    model = LogisticRegression(C=config.C, max_iter=config.max_iter, random_state=params.seed)
    return Fitted(model, train, val, test, features=lambda fitted: int(fitted.n_features_in_))
