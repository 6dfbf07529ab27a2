"""TF-IDF word n-grams + logistic regression: a linear model of every text dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.config import Params, TfidfLogregConfig
from dlpipe.inputs.tokens import labelled_texts
from dlpipe.linear import Fitted

NAME = "tfidf_logreg"
INPUTS = "tokens"


def make_model(config: TfidfLogregConfig, seed: int) -> Any:
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
    train, val, test = (labelled_texts(prepared_dir, split) for split in ("train", "val", "test"))
    model = make_model(params.linear.tfidf_logreg, params.seed)
    return Fitted(model, train, val, test, features=lambda fitted: len(fitted[0].vocabulary_))
