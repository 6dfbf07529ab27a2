"""The model registry rule: every evaluated model is a `candidate`; `champion` moves on merit.

Each call registers a new version of `<name_prefix><model>` and tags it with its metrics and the
identity of the test split it was scored on, so the comparison later never depends on the run
still existing. `champion` moves to it only when there is no champion yet, the champion has no
value of the metric to compare, or the new value beats the champion's by more than `min_delta`
(lower is better for test_log_loss). Only scores on the same test rows are compared: a version
scored on other rows stays a candidate, unless it was scored on the full test split and the
champion on a sample of it (`datasets.<dataset>.max_test`).

No lock, so it is safe between machines that share only the tracking server: the champion is a
function of the registered versions, the rule folded over them in version order (the server
numbers versions atomically), and every promotion, after registering its version, re-reads the
versions and the aliases and moves `champion` (and `candidate`, the newest version) until what it
read agrees with the fold. Whatever the interleaving, the last process to write re-reads after
its write, so the registry always settles on the fold over every version: what one process
promoting them one at a time would have left. A version tagged `promotion_excluded=true` (a
rollback by hand) takes no part; an alias moved by hand is moved back at the next promotion.
Uses only the given `MlflowClient`, so it works the same against a sqlite store and a server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dlpipe.config import RegistryConfig
from dlpipe.errors import DlpipeError

CANDIDATE, CHAMPION = "candidate", "champion"
LOWER_IS_BETTER = frozenset({"test_log_loss"})
EXCLUDED = "promotion_excluded"  # tag a version "true" to take it out of the running
SETTLE_ROUNDS = 100  # re-reads before giving up: each is one write by a racing promotion


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
    model: str,
    model_uri: str,
    run_id: str,
    metrics: dict[str, float],
    config: RegistryConfig,
    client: MlflowClient,
    split: SplitIdentity | None = None,
) -> dict[str, Any]:
    """Register `model_uri` as a new version, then settle the aliases on the fold of the rule
    over every version (`settle`). `split`: the test rows `metrics` come from (None: compared
    whatever the champion's were, as before splits existed).

    Returns the new version's decision, as the fold made it: registered_model, version, metric,
    value, champion_version_before, champion_value_before, promoted, reason."""
    metric = config.metric
    if metric not in metrics or not math.isfinite(float(metrics[metric])):
        raise DlpipeError(f"registry.metric is {metric} but the evaluation gave no finite value")
    name = registered_name(model, config)
    _ensure_registered_model(client, name)
    tags = {key: repr(float(v)) for key, v in metrics.items() if isinstance(v, int | float)}
    tags |= split.tags() if split is not None else {}
    version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=tags, model_id=_model_id(model_uri)
    ).version
    decision = settle(client, name, config)[str(version)]
    client.set_model_version_tag(name, str(version), "promotion", decision["reason"])
    return decision


def settle(client: MlflowClient, name: str, config: RegistryConfig) -> dict[str, dict[str, Any]]:
    """Move `champion` and `candidate` until a read of the versions and the aliases agrees with
    the fold; the fold's decision for each version."""
    for _ in range(SETTLE_ROUNDS):
        versions = sorted(
            client.search_model_versions(f"name = '{name}'", max_results=10000),
            key=lambda v: int(v.version),
        )
        decisions, champion = fold(client, name, versions, config)
        aliases = client.get_registered_model(name).aliases
        wanted = {CHAMPION: champion, CANDIDATE: str(versions[-1].version) if versions else None}
        stale = {a: v for a, v in wanted.items() if v is not None and str(aliases.get(a)) != v}
        if not stale:
            return decisions
        for alias, number in stale.items():
            client.set_registered_model_alias(name, alias, number)
    raise DlpipeError(f"the aliases of {name} did not settle after {SETTLE_ROUNDS} re-reads")


def fold(
    client: MlflowClient, name: str, versions: list[ModelVersion], config: RegistryConfig
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The rule applied to the versions one at a time, in version order: each one's decision,
    and the champion it leaves."""
    metric = config.metric
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    champion: tuple[ModelVersion, float, SplitIdentity | None] | None = None
    decisions: dict[str, dict[str, Any]] = {}
    for version in versions:
        tags = version.tags or {}
        value = _metric_of(client, version, metric)
        split = SplitIdentity.from_tags(tags)
        if tags.get(EXCLUDED) == "true":
            promoted, reason = False, f"excluded ({EXCLUDED})"
        elif value is None:
            promoted, reason = False, f"has no {metric} to compare"
        elif champion is None:
            promoted, reason = True, "no champion yet"
        else:
            old, old_value, old_split = champion
            if split and old_split and not split.same_rows(old_split):
                promoted = split.full and not old_split.full
                verdict = "replaces" if promoted else "is not compared with"
                reason = (
                    f"scored on {split.describe()}: {verdict} champion v{old.version}, "
                    f"scored on {old_split.describe()}"
                )
            else:
                promoted = beats(value, old_value, metric, config.min_delta)
                reason = (
                    f"{metric} {value:.6g} {'beats' if promoted else 'does not beat'} champion "
                    f"v{old.version} ({old_value:.6g}) by more than {config.min_delta:g} "
                    f"({direction} is better)"
                )
        decisions[str(version.version)] = {
            "registered_model": name,
            "version": int(version.version),
            "metric": metric,
            "value": value,
            "champion_version_before": int(champion[0].version) if champion else None,
            "champion_value_before": champion[1] if champion else None,
            "promoted": promoted,
            "reason": reason,
        }
        if promoted and value is not None:
            champion = (version, value, split)
    return decisions, str(champion[0].version) if champion else None
