"""Which MLflow store the pipeline logs to, and whether it can be used.

The store is `MLFLOW_TRACKING_URI` when set, else `sqlite:///<project root>/mlflow.db` with
artifacts in `<project root>/mlartifacts`: absolute, so `dvc exp run --temp/--queue` runs (which
execute in `.dvc/tmp/exps/...`) land in the same place as plain `dvc repro`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient

from dlpipe.errors import REDACTED, DlpipeError, first_line, redact, refused_status
from dlpipe.paths import project_root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def fail_fast() -> None:
    """Make MLflow's HTTP calls fail in seconds rather than retry for minutes when a tracking
    server is down (MLflow reads these settings at each call; the user's own values win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def recorded_store(recorded: str | None, source: str, run_id: str) -> str:
    """The URI of the store holding a run recorded with `recorded` (as written, credentials
    redacted): the current tracking URI when it is that store, one DlpipeError line when not."""
    current = tracking_uri()
    if not recorded or redact(current) == recorded:
        return current
    if REDACTED not in recorded:  # no credentials: the recorded URI is the store's whole address
        return recorded
    raise DlpipeError(
        f"{source}: the training's MLflow run {run_id} is in {recorded}, but MLFLOW_TRACKING_URI "
        f"is {redact(current)}; point it at the training's store (credentials included)"
    )


def check_server(uri: str, advice: str) -> None:
    """One DlpipeError line (ending in `advice`) unless the tracking server answers /health."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise DlpipeError(
            f"MLflow tracking server {redact(uri)} is unreachable ({type(err).__name__}); {advice}"
        ) from None


class Refused(DlpipeError):
    """The tracking server refused these credentials: a setting to fix, never an outage to
    train through (`mlflow.require_tracking: false` does not cover it)."""


@contextmanager
def refused_as_error(uri: str) -> Iterator[None]:
    """A 401 or 403 from the tracking server, raised in the block, as one `Refused` line."""
    try:
        yield
    except Exception as err:  # any client: MlflowException carries the HTTP status
        if refused_status(err) is None:
            raise
        raise Refused(f"MLflow tracking server {redact(uri)}: {first_line(err)}") from None


def check_credentials(uri: str) -> None:
    """A server running MLflow's basic-auth app answers /health to anyone: one authenticated
    read shows, before any work starts, whether it takes this user's credentials."""
    from mlflow.exceptions import MlflowException

    with refused_as_error(uri):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except MlflowException as err:
            if refused_status(err) is not None:
                raise
            raise DlpipeError(f"MLflow tracking server {redact(uri)}: {first_line(err)}") from None


def check_store(uri: str, *, reading: bool = False) -> None:
    """One clear DlpipeError line when the store cannot be used, before MLflow retries or
    creates anything: for writing (a training), a local store's folder must be writable; for
    `reading` (predict, compare, `sweep --show`), its database must already exist."""
    fail_fast()
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if reading and not database.is_file():
            raise DlpipeError(
                f"MLflow store {uri}: no such database (train a model first, or set "
                "MLFLOW_TRACKING_URI)"
            )
        if not reading and not os.access(database.parent, os.W_OK):
            raise DlpipeError(
                f"MLflow store {uri}: folder {database.parent} is missing or not writable"
            )
        return
    if uri.startswith(("http://", "https://")):
        if reading:
            check_server(uri, "start it or fix MLFLOW_TRACKING_URI")
        else:
            check_server(
                uri, "start it, fix MLFLOW_TRACKING_URI, or set mlflow.require_tracking: false"
            )
        check_credentials(uri)
        return
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # any backend: its own exception types
        raise DlpipeError(f"MLflow store {redact(uri)} is unusable: {first_line(err)}") from None


def experiment_id(name: str, uri: str) -> str:
    """The experiment's id, creating it (with an absolute artifact folder for local stores);
    trainings that start together on a new store all get the one that was created."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException as err:
        created = client.get_experiment_by_name(name)  # by a training that started meanwhile
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS") or created is None:
            raise
        return str(created.experiment_id)
