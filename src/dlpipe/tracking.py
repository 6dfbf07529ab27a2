"""MLflow tracking for a training: one run per training, resumable, never fatal mid-training.

The store is `MLFLOW_TRACKING_URI` when set, else `sqlite:///<project root>/mlflow.db` with
artifacts in `<project root>/mlartifacts`: absolute, so `dvc exp run --temp/--queue` runs (which
execute in `.dvc/tmp/exps/...`) land in the same place as plain `dvc repro`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from dlpipe.errors import DlpipeError
from dlpipe.paths import REPORTS_DIR, project_root

# Fail in seconds rather than retrying for minutes when a tracking server is down.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402  (reads the two settings above on import)
from mlflow.tracking import MlflowClient  # noqa: E402


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def check_server(uri: str, advice: str) -> None:
    """One DlpipeError line (ending in `advice`) unless the tracking server answers /health."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise DlpipeError(
            f"MLflow tracking server {uri} is unreachable ({type(err).__name__}); {advice}"
        ) from None


def check_reachable(uri: str) -> None:
    """Raise one clear DlpipeError line when the store cannot be used, before any training."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise DlpipeError(f"MLflow store {uri}: folder {folder} is missing or not writable")
        return
    if uri.startswith(("http://", "https://")):
        check_server(
            uri, "start it, fix MLFLOW_TRACKING_URI, or set mlflow.require_tracking: false"
        )
        return
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # any backend: its own exception types
        raise DlpipeError(f"MLflow store {uri} is unusable: {str(err).splitlines()[0]}") from None


def experiment_id(name: str, uri: str) -> str:
    """The experiment's id, creating it (with an absolute artifact folder for local stores)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


# Changed tracked files that are not code: params.yaml (what `dvc exp run -S` writes: its own
# flag), and what DVC itself writes, dvc.lock and the uncached outputs under reports/.
PARAMS_FILE = "params.yaml"
DVC_RECORDS = ("dvc.lock", f"{REPORTS_DIR.as_posix()}/")


def git_state() -> dict[str, str]:
    """The commit being run and two dirty flags ('unknown' outside a git checkout): `git_dirty`
    for edited code (any tracked file but params.yaml and DVC's records), `params_dirty` for an
    edited params.yaml, so a DVC experiment's overrides do not look like a code change."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        changed = git("diff", "--name-only", "--no-renames", "HEAD").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": "unknown", "params_dirty": "unknown"}
    code = [f for f in changed if f != PARAMS_FILE and not f.startswith(DVC_RECORDS)]
    return {
        "git_sha": sha,
        "git_dirty": str(bool(code)).lower(),
        "params_dirty": str(PARAMS_FILE in changed).lower(),
    }


def flatten(prefix: str, mapping: dict[str, Any]) -> dict[str, Any]:
    """`{'model': {'d_model': 128}}` -> `{'<prefix>.model.d_model': 128}`."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat |= flatten(name, value)
        else:
            flat[name] = value
    return flat


class TrainingRun:
    """An MLflow run that survives interruptions and never takes the training down with it.

    Starting is strict (an unusable store is an error before training, unless tracking is
    optional); everything after start only warns, so local outputs are always written.
    """

    def __init__(self, uri: str, required: bool) -> None:
        self.uri = uri
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False  # start() continued the run of an interrupted training
        self._end_time: int | None = None  # what `end` restores after `reopen`
        self._broken = False
        try:
            check_reachable(uri)
        except DlpipeError as err:
            if required:
                raise
            warnings.warn(f"{err}; training without MLflow tracking", stacklevel=2)
            self._broken = True

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._broken

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # a logging failure must never lose the training
            self._broken = True
            print(f"warning: MLflow {what} failed, tracking stops: {err}", file=sys.stderr)
            return None

    def _run_exists(self, run_id: str) -> bool:
        """False when the store has no such run (it was deleted, or the store changed)."""
        from mlflow.exceptions import MlflowException

        try:
            run = MlflowClient(self.uri).get_run(run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return bool(run.info.lifecycle_stage != "deleted")

    def start(
        self,
        experiment: str,
        run_name: str,
        resume_run_id: str | None,
        tags: dict[str, str],
        params: dict[str, Any],
        system_metrics_interval_s: float,
    ) -> None:
        if self._broken:
            return
        mlflow.set_tracking_uri(self.uri)
        self.experiment_id = experiment_id(experiment, self.uri)
        mlflow.set_system_metrics_sampling_interval(system_metrics_interval_s)
        mlflow.set_system_metrics_samples_before_logging(1)
        if resume_run_id is not None and not self._run_exists(resume_run_id):
            print(
                f"warning: the checkpoint's MLflow run {resume_run_id} is not in {self.uri}; "
                "starting a new run",
                file=sys.stderr,
            )
            resume_run_id = None
        self.resumed = resume_run_id is not None
        run = mlflow.start_run(
            run_id=resume_run_id,
            experiment_id=None if resume_run_id else self.experiment_id,
            run_name=None if resume_run_id else run_name,
            log_system_metrics=True,
        )
        self.run_id = run.info.run_id
        if resume_run_id is None:
            self._guard("log params", mlflow.log_params, params)
        self._guard("set tags", mlflow.set_tags, tags)

    def reopen(self, run_id: str) -> None:
        """Continue a finished run (the evaluate stage adds its results to the training's run).
        `end` gives it back its end time: its duration stays the training's, not the time until
        this later stage finished."""
        if self._broken:
            return
        mlflow.set_tracking_uri(self.uri)
        self._end_time = MlflowClient(self.uri).get_run(run_id).info.end_time
        run = mlflow.start_run(run_id=run_id)
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id

    def log_dataset(self, name: str, source: Path, digest: str, context: str) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        def log() -> None:
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": harmless
                warnings.simplefilter("ignore", UserWarning)
                source_ = resolve_dataset_source(str(source))
            dataset = MetaDataset(source_, name=name, digest=digest)  # type: ignore[abstract]
            mlflow.log_input(dataset, context=context)

        self._guard("log input", log)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._guard("log metrics", mlflow.log_metrics, metrics, step=step)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which the run has `key` (none when tracking is off or fails)."""

        def read() -> set[int]:
            history = MlflowClient(self.uri).get_metric_history(str(self.run_id), key)
            return {m.step for m in history}

        steps: set[int] | None = self._guard("read metric history", read)
        return steps or set()

    def log_artifact(self, path: Path) -> None:
        self._guard("log artifact", mlflow.log_artifact, str(path))

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run any other logging call under the same never-fatal rule."""
        return self._guard(what, fn, *args, **kwargs)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None and mlflow.active_run() is not None:
            try:
                mlflow.end_run(status=status)
                if self._end_time is not None:
                    MlflowClient(self.uri).set_terminated(
                        self.run_id, status, end_time=self._end_time
                    )
            except Exception as err:
                print(f"warning: MLflow end_run failed: {err}", file=sys.stderr)
