"""The registry rule: every version is a candidate; champion moves only on a real improvement."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from dlpipe import registry
from dlpipe.config import RegistryConfig
from dlpipe.errors import DlpipeError
from dlpipe.registry import SplitIdentity, beats, register_and_promote

Register = Callable[..., dict[str, Any]]


def make_register(client: MlflowClient, experiment_id: str) -> Register:
    """register(value, metric=..., model=..., split=..., **config) -> decision, each from a new
    run."""

    def register(
        value: float,
        metric: str = "test_accuracy",
        model: str = "cnn",
        split: SplitIdentity | None = None,
        **config: Any,
    ) -> dict[str, Any]:
        run = client.create_run(experiment_id)
        run_id = run.info.run_id
        client.log_metric(run_id, metric, value)
        client.set_terminated(run_id)
        return register_and_promote(
            model,
            f"runs:/{run_id}/raw_model",
            run_id,
            {metric: value},
            RegistryConfig.model_validate({"metric": metric, **config}),
            client,
            split,
        )

    return register


@pytest.fixture
def client(tmp_path: Path, _mlflow_db_template: Path) -> MlflowClient:
    shutil.copyfile(_mlflow_db_template, tmp_path / "mlflow.db")
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def register(client: MlflowClient, tmp_path: Path) -> Register:
    experiment = client.create_experiment("registry", (tmp_path / "artifacts").as_uri())
    return make_register(client, experiment)


def aliases(client: MlflowClient, name: str = "dlpipe-cnn") -> dict[str, int]:
    return {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}


def test_first_becomes_champion_worse_stays_candidate_better_takes_over(
    client: MlflowClient, register: Register
) -> None:
    first = register(0.90)
    assert first | {"reason": None} == {
        "registered_model": "dlpipe-cnn",
        "version": 1,
        "metric": "test_accuracy",
        "value": 0.90,
        "champion_version_before": None,
        "champion_value_before": None,
        "promoted": True,
        "reason": None,
    }
    assert aliases(client) == {"candidate": 1, "champion": 1}

    worse = register(0.85)
    assert (worse["version"], worse["promoted"]) == (2, False)
    assert (worse["champion_version_before"], worse["champion_value_before"]) == (1, 0.90)
    assert "does not beat champion v1" in worse["reason"]
    assert aliases(client) == {"candidate": 2, "champion": 1}

    better = register(0.95)
    assert (better["version"], better["promoted"]) == (3, True)
    assert aliases(client) == {"candidate": 3, "champion": 3}


def test_a_tie_does_not_move_the_champion(client: MlflowClient, register: Register) -> None:
    register(0.9)
    assert register(0.9)["promoted"] is False
    assert aliases(client)["champion"] == 1


def test_lower_log_loss_is_better(client: MlflowClient, register: Register) -> None:
    register(0.30, metric="test_log_loss")
    assert register(0.35, metric="test_log_loss")["promoted"] is False
    decision = register(0.25, metric="test_log_loss")
    assert decision["promoted"] is True and "lower is better" in decision["reason"]
    assert aliases(client) == {"candidate": 3, "champion": 3}


def test_min_delta_is_respected(client: MlflowClient, register: Register) -> None:
    register(0.900, min_delta=0.01)
    assert register(0.905, min_delta=0.01)["promoted"] is False  # better, but not enough
    assert register(0.915, min_delta=0.01)["promoted"] is True
    register(0.20, metric="test_log_loss", model="rnn", min_delta=0.05)
    assert register(0.17, metric="test_log_loss", model="rnn", min_delta=0.05)["promoted"] is False
    assert register(0.14, metric="test_log_loss", model="rnn", min_delta=0.05)["promoted"] is True
    assert aliases(client, "dlpipe-rnn") == {"candidate": 3, "champion": 3}


def test_versions_carry_their_metrics_and_the_decision(
    client: MlflowClient, register: Register
) -> None:
    register(0.9)
    version = client.get_model_version("dlpipe-cnn", "1")
    assert float(version.tags["test_accuracy"]) == 0.9
    assert version.tags["promotion"] == "no champion yet"
    assert version.run_id


def test_the_champion_value_falls_back_to_its_run_metrics(
    client: MlflowClient, register: Register, tmp_path: Path
) -> None:
    """A champion registered by hand, without tags: its run's logged metric is compared."""
    experiment = client.get_experiment_by_name("registry")
    assert experiment is not None
    run = client.create_run(experiment.experiment_id)
    client.log_metric(run.info.run_id, "test_accuracy", 0.97)
    client.create_registered_model("dlpipe-cnn")
    client.create_model_version("dlpipe-cnn", f"runs:/{run.info.run_id}/m", run.info.run_id)
    client.set_registered_model_alias("dlpipe-cnn", "champion", "1")

    decision = register(0.95)
    assert decision["champion_value_before"] == 0.97 and decision["promoted"] is False


def test_the_configured_metric_must_be_given(client: MlflowClient) -> None:
    with pytest.raises(DlpipeError, match="test_macro_f1"):
        register_and_promote(
            "cnn",
            "runs:/x/raw_model",
            "x",
            {"test_accuracy": 0.9},
            RegistryConfig(metric="test_macro_f1"),
            client,
        )


def test_beats_is_strict_and_directional() -> None:
    assert beats(0.91, 0.90, "test_accuracy", 0.0)
    assert not beats(0.90, 0.90, "test_accuracy", 0.0)
    assert beats(0.2, 0.3, "test_log_loss", 0.05)
    assert not beats(0.26, 0.3, "test_log_loss", 0.05)


def test_each_model_is_registered_under_its_own_name(
    client: MlflowClient, register: Register
) -> None:
    """Two models of one family (cnn, and a wider `cnn_wide`) never compete: each is its own
    registered model, dlpipe-<model>, with its own champion."""
    assert register(0.95)["promoted"] is True
    assert register(0.90, model="cnn_wide")["promoted"] is True  # worse, but the first of its own
    assert aliases(client, "dlpipe-cnn_wide") == {"candidate": 1, "champion": 1}
    assert aliases(client) == {"candidate": 1, "champion": 1}
    assert registry.registered_name("cnn_wide", RegistryConfig(name_prefix="team-")) == (
        "team-cnn_wide"
    )


@pytest.mark.integration
def test_the_rule_against_a_tracking_server(mlflow_server: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("registry-http")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("registry-http")
    )
    register = make_register(client, experiment_id)
    assert register(0.8, model="http")["promoted"] is True
    assert register(0.7, model="http")["promoted"] is False
    assert aliases(client, "dlpipe-http") == {"candidate": 2, "champion": 1}


# --- parallel evaluations -----------------------------------------------------------------------


def test_a_promotion_that_read_a_stale_registry_is_put_right(
    client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two evaluations promote at once, with no lock: the better one's first read of the
    versions is slowed until the worse one has registered and settled, so the better one moves
    the aliases from a stale read; its re-read after the write puts the champion right."""
    uri = client.tracking_uri
    experiment = client.create_experiment("parallel", (tmp_path / "artifacts").as_uri())
    make_register(client, experiment)(0.90)

    worse_done, reads = threading.Event(), []
    fold = registry.fold

    def stale_first_fold(client: MlflowClient, name: str, versions: Any, config: Any) -> Any:
        reads.append(len(versions))
        if len(reads) == 1:  # the better one's first read: v1 and itself only
            assert worse_done.wait(10)
        return fold(client, name, versions, config)

    monkeypatch.setattr(registry, "fold", stale_first_fold)
    decisions: dict[float, dict[str, Any]] = {}

    def evaluate(value: float) -> None:  # each evaluation has its own client, as processes do
        decisions[value] = make_register(MlflowClient(uri), experiment)(value)

    better = threading.Thread(target=evaluate, args=(0.95,))
    better.start()
    while not reads:
        time.sleep(0.01)
    evaluate(0.92)
    worse_done.set()
    better.join(30)

    assert decisions[0.95]["promoted"] and decisions[0.95]["champion_version_before"] == 1
    assert decisions[0.92]["version"] == 3 and not decisions[0.92]["promoted"], decisions
    assert decisions[0.92]["champion_value_before"] == 0.95  # the fold is in version order
    assert aliases(client) == {"candidate": 3, "champion": 2}
    assert reads[0] == 2 and max(reads) == 3  # the stale read, then a re-read that saw v3


def test_an_excluded_version_takes_no_part(client: MlflowClient, register: Register) -> None:
    """A rollback by hand: tag the champion `promotion_excluded=true`; the next promotion
    settles on the best of the others."""
    register(0.90)
    register(0.95)
    client.set_model_version_tag("dlpipe-cnn", "2", registry.EXCLUDED, "true")
    decision = register(0.91)
    assert decision["promoted"] and decision["champion_version_before"] == 1
    assert aliases(client) == {"candidate": 3, "champion": 3}


@pytest.mark.slow
@pytest.mark.integration
def test_racing_promotions_from_separate_processes_always_settle_on_the_rule(
    mlflow_server: str, tmp_path: Path
) -> None:
    """Clones on separate machines share only the tracking server: three processes, each in its
    own folder with its own client, register at once for 20 rounds, with random delays around
    every registry call; after each round the champion is what the rule, applied one version at
    a time in version order, gives, and the candidate is the newest version."""
    from support.race import ROUNDS, WORKERS, run_race

    name = "dlpipe-race"
    client = MlflowClient(mlflow_server)
    for round_, versions in enumerate(run_race(mlflow_server, tmp_path), start=1):
        expected: Any = None
        for version in versions:  # the rule, by hand: min_delta 0, one test split
            if expected is None or version[1] > expected[1]:
                expected = version
        got = aliases(client, name)
        assert got == {"candidate": versions[-1][0], "champion": expected[0]}, (round_, versions)
    assert len(versions) == ROUNDS * WORKERS


# --- scores on different test rows ---------------------------------------------------------------

FULL = SplitIdentity(10000, "a" * 16, True)
SAMPLE = SplitIdentity(2000, "b" * 16, False)
OTHER_SAMPLE = SplitIdentity(2000, "c" * 16, False)


def test_versions_carry_the_identity_of_their_test_split(
    client: MlflowClient, register: Register
) -> None:
    register(0.9, split=SAMPLE)
    tags = client.get_model_version("dlpipe-cnn", "1").tags
    assert (tags["test_split_rows"], tags["test_split_digest"]) == ("2000", "b" * 16)
    assert tags["test_split_full"] == "false"
    assert SplitIdentity.from_tags(tags) == SAMPLE


def test_scores_on_the_same_rows_compete(client: MlflowClient, register: Register) -> None:
    register(0.90, split=SAMPLE)
    assert register(0.89, split=SAMPLE)["promoted"] is False
    assert register(0.91, split=SAMPLE)["promoted"] is True


def test_a_score_on_a_subset_never_competes_with_one_on_the_full_split(
    client: MlflowClient, register: Register
) -> None:
    register(0.90, split=FULL)
    decision = register(0.99, split=SAMPLE)  # far better, but on other rows
    assert decision["promoted"] is False
    assert "a test subset (2000 rows" in decision["reason"]
    assert "is not compared with champion v1" in decision["reason"]
    assert "the full test split (10000 rows" in decision["reason"]
    assert aliases(client) == {"candidate": 2, "champion": 1}


def test_the_full_split_replaces_a_champion_scored_on_a_subset(
    client: MlflowClient, register: Register
) -> None:
    register(0.99, split=SAMPLE)
    decision = register(0.90, split=FULL)  # lower, but the first score on the full split
    assert decision["promoted"] is True
    assert decision["reason"].startswith("scored on the full test split (10000 rows")
    assert "replaces champion v1, scored on a test subset (2000 rows" in decision["reason"]
    assert aliases(client) == {"candidate": 2, "champion": 2}


def test_two_different_subsets_do_not_compete(client: MlflowClient, register: Register) -> None:
    register(0.90, split=SAMPLE)
    assert register(0.99, split=OTHER_SAMPLE)["promoted"] is False
    assert aliases(client)["champion"] == 1


def test_a_champion_without_a_recorded_split_is_compared_as_before(
    client: MlflowClient, register: Register
) -> None:
    """Versions registered before splits were recorded keep competing on the metric."""
    register(0.90)
    assert register(0.89, split=FULL)["promoted"] is False
    assert register(0.95, split=FULL)["promoted"] is True
