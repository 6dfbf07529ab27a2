"""The model registry rule: every evaluated model is a `candidate`; `champion` moves on merit.

Each call registers a new version of `<name_prefix><family>` and tags it with its metrics, so the
comparison later never depends on the run still existing. `champion` moves to it only when there
is no champion yet, the champion has no value of the metric to compare, or the new value beats the
champion's by more than `min_delta` (lower is better for test_log_loss). Uses only the given
`MlflowClient`, so it works the same against a sqlite store and a tracking server.
"""

from __future__ import annotations

import math
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dlpipe.config import RegistryConfig
from dlpipe.errors import DlpipeError

CANDIDATE, CHAMPION = "candidate", "champion"
LOWER_IS_BETTER = frozenset({"test_log_loss"})


def registered_name(family: str, config: RegistryConfig) -> str:
    return f"{config.name_prefix}{family}"


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name)
        except MlflowException as race:  # created meanwhile by another evaluation
            if race.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _metric_of(client: MlflowClient, version: ModelVersion, metric: str) -> float | None:
    """The version's metric: its own tag first, else its run's logged value."""
    tagged = (version.tags or {}).get(metric)
    if tagged is not None:
        try:
            return float(tagged)
        except ValueError:
            pass
    if version.run_id:
        try:
            value = client.get_run(version.run_id).data.metrics.get(metric)
        except MlflowException:  # the run was deleted: no value to compare
            return None
        return None if value is None else float(value)
    return None


def _model_id(model_uri: str) -> str | None:
    """`models:/m-<id>` (MLflow 3 logged models) -> `m-<id>`; registry URIs and others -> None."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and rest.startswith("m-") and "/" not in rest else None


def beats(new: float, old: float, metric: str, min_delta: float) -> bool:
    """True when `new` is better than `old` by more than `min_delta`."""
    if metric in LOWER_IS_BETTER:
        return new < old - min_delta
    return new > old + min_delta


def register_and_promote(
    family: str,
    model_uri: str,
    run_id: str,
    metrics: dict[str, float],
    config: RegistryConfig,
    client: MlflowClient,
) -> dict[str, Any]:
    """Register `model_uri` as a new version (alias `candidate`); promote it if it wins.

    Returns the decision: registered_model, version, metric, value, champion_version_before,
    champion_value_before, promoted, reason."""
    metric = config.metric
    if metric not in metrics or not math.isfinite(float(metrics[metric])):
        raise DlpipeError(f"registry.metric is {metric} but the evaluation gave no finite value")
    value = float(metrics[metric])
    name = registered_name(family, config)
    _ensure_registered_model(client, name)
    champion = _champion(client, name)
    champion_value = _metric_of(client, champion, metric) if champion is not None else None

    tags = {key: repr(float(v)) for key, v in metrics.items() if isinstance(v, int | float)}
    version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=tags, model_id=_model_id(model_uri)
    )
    client.set_registered_model_alias(name, CANDIDATE, version.version)

    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif champion_value is None:
        promoted, reason = True, f"champion v{champion.version} has no {metric} to compare"
    elif beats(value, champion_value, metric, config.min_delta):
        promoted = True
        reason = (
            f"{metric} {value:.6g} beats champion v{champion.version} ({champion_value:.6g}) "
            f"by more than {config.min_delta:g} ({direction} is better)"
        )
    else:
        promoted = False
        reason = (
            f"{metric} {value:.6g} does not beat champion v{champion.version} "
            f"({champion_value:.6g}) by more than {config.min_delta:g} ({direction} is better)"
        )
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.set_model_version_tag(name, version.version, "promotion", reason)
    return {
        "registered_model": name,
        "version": int(version.version),
        "metric": metric,
        "value": value,
        "champion_version_before": int(champion.version) if champion is not None else None,
        "champion_value_before": champion_value,
        "promoted": promoted,
        "reason": reason,
    }
