"""The smoke run's params: the project's params.yaml, shrunk to a two-minute run.

Small enough for about two minutes on two busy CPU cores, big enough that every model must learn
for real to pass `gates.smoke_floors`. What sets the learning budget is pinned: the data slices of
each dataset's format (`DatasetFormat.smoke`), and each family's epochs, batch size, learning
rate and model size in its `Family.smoke`;
everything else (optimiser, schedule, pooling, ...) is the project's. Two epochs, not one: the
per-epoch MLflow history, the best-epoch choice and the LR schedule are exercised across epochs,
and one epoch left the GRU near chance.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml

from dlpipe.config import parse_params, set_dotted
from dlpipe.datasets import get_format
from dlpipe.errors import DlpipeError
from dlpipe.family import get_family

SMOKE_EVALUATE: dict[str, Any] = {"evaluate": {"latency_repeats": 3}}


def merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """`base` with `updates` merged in, nested mappings key by key (neither is modified)."""
    merged = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`["train.rnn.epochs=2"]` -> `{"train": {"rnn": {"epochs": 2}}}` (values are YAML)."""
    updates: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DlpipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.cnn.epochs=2")
        set_dotted(updates, key.strip(), yaml.safe_load(value))
    return updates


def smoke_params(
    raw: dict[str, Any], extra: dict[str, Any] | None = None, models: Sequence[str] = ()
) -> dict[str, Any]:
    """The project's params with the smoke overrides (and `extra`) merged in, validated;
    with `models`, only those models and the datasets they train on."""
    raw = only_models(raw, models) if models else raw
    merged = merge(merge(raw, smoke_overrides(raw)), extra or {})
    parse_params(merged, "smoke params")
    return merged


def only_models(raw: dict[str, Any], models: Sequence[str]) -> dict[str, Any]:
    """`raw` with just these `train` sections, the `datasets` they train on and their gates:
    a smoke run of one model runs only its own stages (and its datasets' linear models)."""
    train = raw.get("train") or {}
    unknown = [model for model in models if model not in train]
    if unknown:
        raise DlpipeError(f"unknown model {unknown[0]!r}; choose from {', '.join(train)}")
    kept = copy.deepcopy(raw)
    kept["train"] = {name: section for name, section in train.items() if name in models}
    used = {section.get("dataset") for section in kept["train"].values()}
    datasets = raw.get("datasets") or {}
    kept["datasets"] = {name: entry for name, entry in datasets.items() if name in used}
    for section, floors in (raw.get("gates") or {}).items():
        if section in ("floors", "smoke_floors") and isinstance(floors, dict):
            kept["gates"][section] = {m: f for m, f in floors.items() if m in models}
    return kept


def smoke_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """Each dataset's format's data slices and each model's family's smoke settings."""
    datasets = (raw.get("datasets") or {}) if isinstance(raw, dict) else {}
    models = (raw.get("train") or {}) if isinstance(raw, dict) else {}
    slices = {name: dict(get_format(entry["format"]).smoke) for name, entry in datasets.items()}
    train = {name: dict(get_family(section["family"]).smoke) for name, section in models.items()}
    return merge(SMOKE_EVALUATE, {"datasets": slices, "train": train})
