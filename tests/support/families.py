"""Models of params.yaml by name: their dataset, a fresh network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.config import Params, load_params

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = load_params(REPO_ROOT / "params.yaml").models


def dataset_of(name: str) -> str:
    """The dataset model `name` trains on (params.yaml's train.<name>.dataset)."""
    return load_params(REPO_ROOT / "params.yaml").train[name].dataset


def family_model(name: str, params: Params, meta: Any) -> Any:
    """A fresh network of model `name`, built from `params`' train.<name>."""
    from dlpipe.family import model_family

    family = model_family(params, name)
    return family.build(family.model_config(params, name), meta)
