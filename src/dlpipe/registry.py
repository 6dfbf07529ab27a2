"""The model registry rule: every evaluated model is a `candidate`; `champion` moves on merit.

Each call registers a new version of `<name_prefix><model>` and tags it with its metrics and the
identity of the test split it was scored on, so the comparison later never depends on the run
still existing. `champion` moves to it only when there is no champion yet, the champion has no
value of the metric to compare, or the new value beats the champion's by more than `min_delta`
(lower is better for test_log_loss). Only scores on the same test rows are compared: a version
scored on other rows stays a candidate, unless it was scored on the full test split and the
champion on a sample of it (`datasets.<dataset>.max_test`).

Reading the champion and moving the alias happen under one file lock in the project root's
`.dlpipe/locks/`, so parallel evaluations (queued experiments) cannot both promote against the
same old champion and leave the worse one on top. The lock spans one machine: clones on other
machines logging to one tracking server are not serialised. Uses only the given `MlflowClient`
otherwise, so it works the same against a sqlite store and a tracking server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dlpipe.config import RegistryConfig
from dlpipe.errors import DlpipeError
from dlpipe.paths import project_root

CANDIDATE, CHAMPION = "candidate", "champion"
LOWER_IS_BETTER = frozenset({"test_log_loss"})
LOCK_TIMEOUT_S = 600.0  # a promotion takes seconds; waiting longer means a stuck process


@dataclass(frozen=True)
class SplitIdentity:
    """The test rows a version was scored on: how many, a digest of their labels and ids, and
    whether they are the whole official test split."""

    rows: int
    digest: str
    full: bool

    def tags(self) -> dict[str, str]:
        return {
            "test_split_rows": str(self.rows),
            "test_split_digest": self.digest,
            "test_split_full": str(self.full).lower(),
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> SplitIdentity | None:
        """None for a version registered without one (before splits were recorded)."""
        try:
            rows, digest = int(tags["test_split_rows"]), tags["test_split_digest"]
        except (KeyError, ValueError):
            return None
        return cls(rows, digest, tags.get("test_split_full") == "true")

    def same_rows(self, other: SplitIdentity) -> bool:
        return (self.rows, self.digest) == (other.rows, other.digest)

    def describe(self) -> str:
        kind = "the full test split" if self.full else "a test subset"
        return f"{kind} ({self.rows} rows, {self.digest[:8]})"


def registered_name(model: str, config: RegistryConfig) -> str:
    return f"{config.name_prefix}{model}"


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


def lock_file(name: str) -> Path:
    """The lock serialising promotions of registered model `name` from this project."""
    return project_root() / ".dlpipe" / "locks" / f"registry-{name}.lock"


def register_and_promote(
    model: str,
    model_uri: str,
    run_id: str,
    metrics: dict[str, float],
    config: RegistryConfig,
    client: MlflowClient,
    split: SplitIdentity | None = None,
    lock: Path | None = None,
) -> dict[str, Any]:
    """Register `model_uri` as a new version (alias `candidate`); promote it if it wins against
    the champion read under the lock (`lock`, default `lock_file(name)`). `split`: the test rows
    `metrics` come from (None: compared whatever the champion's were, as before splits existed).

    Returns the decision: registered_model, version, metric, value, champion_version_before,
    champion_value_before, promoted, reason."""
    metric = config.metric
    if metric not in metrics or not math.isfinite(float(metrics[metric])):
        raise DlpipeError(f"registry.metric is {metric} but the evaluation gave no finite value")
    value = float(metrics[metric])
    name = registered_name(model, config)
    _ensure_registered_model(client, name)
    tags = {key: repr(float(v)) for key, v in metrics.items() if isinstance(v, int | float)}
    tags |= split.tags() if split is not None else {}
    path = lock or lock_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, timeout=LOCK_TIMEOUT_S):
        return _promote(client, name, model_uri, run_id, tags, value, split, config)


def _promote(
    client: MlflowClient,
    name: str,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    value: float,
    split: SplitIdentity | None,
    config: RegistryConfig,
) -> dict[str, Any]:
    """The new version and the decision; run under the lock, so the champion read here is
    still the champion when the alias moves."""
    metric = config.metric
    champion = _champion(client, name)
    champion_value = _metric_of(client, champion, metric) if champion is not None else None
    champion_split = SplitIdentity.from_tags(champion.tags or {}) if champion else None

    version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=tags, model_id=_model_id(model_uri)
    )
    client.set_registered_model_alias(name, CANDIDATE, version.version)

    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif split and champion_split and not split.same_rows(champion_split):
        promoted = split.full and not champion_split.full
        verdict = "replaces" if promoted else "is not compared with"
        reason = (
            f"scored on {split.describe()}: {verdict} champion v{champion.version}, "
            f"scored on {champion_split.describe()}"
        )
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
