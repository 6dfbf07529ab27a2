"""NBSVM: binary word n-grams scaled by their naive-Bayes log-count ratio, then a linear
classifier (Wang & Manning 2012), the strongest linear model of sentiment; a linear model of
every text dataset.

Logistic loss instead of the hinge, so that it gives probabilities like the other models, and
one-vs-rest for more than two classes. The n-grams are hashed (`features` buckets): memory stays
fixed however many trigrams a corpus has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from dlpipe.config import NbsvmConfig, Params
from dlpipe.inputs.tokens import labelled_texts
from dlpipe.linear import Fitted

NAME = "nbsvm"
INPUTS = "tokens"
TOKEN_PATTERN = r"(?u)\b\w+\b|[!?]"  # words of any length, and the marks that carry tone


class NaiveBayesLogisticRegression(ClassifierMixin, BaseEstimator):
    """Logistic regression on features scaled by r = log((p/|p|) / (q/|q|)), where p and q are
    the smoothed counts of the n-grams the training texts hold, in one class and in the others
    (the norms over those n-grams alone, as over a vocabulary)."""

    def __init__(self, alpha: float = 1.0, C: float = 1.0, max_iter: int = 1000, seed: int = 0):
        self.alpha, self.C, self.max_iter, self.seed = alpha, C, max_iter, seed

    def fit(self, x: Any, y: np.ndarray) -> NaiveBayesLogisticRegression:
        from sklearn.linear_model import LogisticRegression

        self.classes_ = np.unique(y)
        targets = self.classes_[1:] if len(self.classes_) == 2 else self.classes_
        seen = x.getnnz(axis=0) > 0  # the training vocabulary; an unseen n-gram weighs 0
        self.features_seen_ = int(seen.sum())
        self.ratios_: list[np.ndarray] = []
        self.models_: list[Any] = []
        for target in targets:
            positive = y == target
            p = self.alpha + np.asarray(x[positive].sum(axis=0)).ravel()
            q = self.alpha + np.asarray(x[~positive].sum(axis=0)).ravel()
            p_norm, q_norm = p[seen].sum(), q[seen].sum()
            ratio = np.where(seen, np.log((p / p_norm) / (q / q_norm)), 0.0).astype(np.float32)
            model = LogisticRegression(
                C=self.C,
                solver="liblinear",
                dual=True,
                max_iter=self.max_iter,
                random_state=self.seed,
            )
            self.ratios_.append(ratio)
            self.models_.append(model.fit(x.multiply(ratio).tocsr(), positive))
        return self

    def predict_proba(self, x: Any) -> np.ndarray:
        scores = np.column_stack(
            [
                m.predict_proba(x.multiply(r).tocsr())[:, 1]
                for r, m in zip(self.ratios_, self.models_, strict=True)
            ]
        )
        if len(self.classes_) == 2:
            return np.column_stack([1.0 - scores[:, 0], scores[:, 0]])
        return scores / scores.sum(axis=1, keepdims=True)


def make_model(config: NbsvmConfig, seed: int) -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        HashingVectorizer(
            ngram_range=(1, config.ngram_max),
            n_features=config.features,
            token_pattern=TOKEN_PATTERN,
            binary=True,
            norm=None,
            alternate_sign=False,
            dtype=np.float32,
        ),
        NaiveBayesLogisticRegression(config.alpha, config.C, config.max_iter, seed),
    )


def fit(params: Params, prepared_dir: Path) -> Fitted:
    train, val, test = (labelled_texts(prepared_dir, split) for split in ("train", "val", "test"))
    model = make_model(params.linear.nbsvm, params.seed)
    return Fitted(model, train, val, test, features=lambda fitted: fitted[-1].features_seen_)
