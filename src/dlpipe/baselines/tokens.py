"""TF-IDF word n-grams + logistic regression: the yardstick of every text dataset."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.baselines import Fitted
from dlpipe.config import Params, TextBaselineConfig
from dlpipe.errors import DlpipeError
from dlpipe.inputs.tokens import clean_markup, read_texts
from dlpipe.integrity import read_verified

NAME = "tfidf_logreg"


def split_texts(prepared_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    """The raw texts of a prepared split, in its row order, markup as spaces, with its labels."""
    path = prepared_dir / f"{split}.npz"
    rerun = f"dvc repro prepare@{prepared_dir.name}"
    if not path.is_file():
        raise DlpipeError(f"{path}: missing; run `{rerun}` first")
    with np.load(io.BytesIO(read_verified(path, rerun))) as arrays:
        if "row_id" not in arrays:  # written by a prepare stage older than the row ids
            raise DlpipeError(f"{path}: no row ids; rerun `{rerun}`")
        ids, labels = arrays["row_id"], arrays["labels"].astype(np.int64)
    texts = read_texts(prepared_dir, split)
    return [clean_markup(texts[row]) for row in ids], labels


def make_model(config: TextBaselineConfig, seed: int) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(
            ngram_range=(1, config.ngram_max),
            min_df=config.min_df,
            sublinear_tf=config.sublinear_tf,
            dtype=np.float32,
        ),
        LogisticRegression(C=config.C, max_iter=config.max_iter, random_state=seed),
    )


def fit(params: Params, prepared_dir: Path) -> Fitted:
    train, val, test = (split_texts(prepared_dir, split) for split in ("train", "val", "test"))
    model = make_model(params.baseline.tokens, params.seed)
    return Fitted(model, train, val, test, features=lambda fitted: len(fitted[0].vocabulary_))
