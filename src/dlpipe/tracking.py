"""MLflow tracking for a training: one run per training, resumable, never fatal mid-training.

The store is `MLFLOW_TRACKING_URI` when set, else `sqlite:///<project root>/mlflow.db` with
artifacts in `<project root>/mlartifacts`: absolute, so `dvc exp run --temp/--queue` runs (which
execute in `.dvc/tmp/exps/...`) land in the same place as plain `dvc repro`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from dlpipe.errors import REDACTED, DlpipeError, first_line, redact
from dlpipe.paths import REPORTS_DIR, project_root

# Fail in seconds rather than retrying for minutes when a tracking server is down.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402  (reads the two settings above on import)
from mlflow.tracking import MlflowClient  # noqa: E402


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


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
        raise DlpipeError(f"MLflow store {redact(uri)} is unusable: {first_line(err)}") from None


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


def skip_module_scan() -> None:
    """Make MLflow's check of a logged model's pinned requirements cost 0.1 s, not 0.5-1.4 s.

    Before checking each pin against `importlib.metadata.version`, MLflow maps every module of
    every installed distribution (`packages_distributions()`: 31k file stats here), a map it only
    reads for a package that has no metadata. Our pins are read from installed distributions'
    metadata, so that fallback never runs, and an empty map gives the same check: a pin that this
    environment does not satisfy still warns. It was 4 % of the CNN's training time."""
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", {}) is None:  # not built yet
        requirements_utils._MODULES_TO_PACKAGES = {}  # type: ignore[assignment]


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


# --- metrics kept on disk while the store does not answer ----------------------------------------


def spool_dir() -> Path:
    return project_root() / ".dlpipe" / "spool"


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    """Append JSON lines and fsync: a record in the spool survives a crash right after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
        handle.flush()
        os.fsync(handle.fileno())


def _read_spool(path: Path) -> list[dict[str, Any]]:
    """The spool's records; a line cut short by a crash mid-append is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def deliver_spool(path: Path, client: MlflowClient) -> tuple[int, int]:
    """Log a spool file's metrics to its run, skipping every (key, step) the run already has, so
    that delivering twice (or after a delivery cut short) duplicates nothing; then record the
    run's end if the training could not, and delete the file. Returns (delivered, skipped)."""
    from mlflow.entities import Metric

    records = _read_spool(path)
    run_id = path.stem
    latest = {(r["key"], r["step"]): r for r in records if "key" in r}  # one value per step
    have = {
        key: {m.step for m in client.get_metric_history(run_id, key)}
        for key in {key for key, _ in latest}
    }
    new = [
        Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
        for (key, step), r in latest.items()
        if step not in have[key]
    ]
    for start in range(0, len(new), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=new[start : start + 1000])
    ends = [r for r in records if "status" in r]
    if ends and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, ends[-1]["status"], ends[-1]["end_time"])
    path.unlink()
    return len(new), len(latest) - len(new)


def sync(run_id: str | None = None) -> list[str]:
    """Deliver the spooled metrics of `run_id` (default: of every run) to their stores; one line
    per run delivered. A store that still fails is one DlpipeError line (its spool is kept)."""
    paths = [spool_dir() / f"{run_id}.jsonl"] if run_id else sorted(spool_dir().glob("*.jsonl"))
    done = []
    for path in (p for p in paths if p.is_file()):
        [header, *_] = _read_spool(path) or [{}]
        uri = recorded_store(header.get("tracking_uri"), str(path), path.stem)
        check_reachable(uri)
        try:
            delivered, skipped = deliver_spool(path, MlflowClient(uri))
        except Exception as err:  # any backend: its own exception types
            raise DlpipeError(
                f"{path}: delivery to {redact(uri)} failed: {first_line(err)}"
            ) from None
        done.append(
            f"MLflow run {path.stem}: delivered {delivered} spooled metric values"
            + (f" ({skipped} it already had)" if skipped else "")
        )
    return done


class TrainingRun:
    """An MLflow run that survives interruptions and never takes the training down with it.

    Starting is strict (an unusable store is an error before training, unless tracking is
    optional); everything after start only warns, so local outputs are always written. When the
    store stops answering, the metrics still to come (and the run's end) are appended to a spool
    file, `.dlpipe/spool/<run id>.jsonl`, that `sync` delivers later. A `strict` run (the evaluate
    stage, whose job includes the logging) raises one DlpipeError line at the first failed call
    instead.
    """

    def __init__(self, uri: str, required: bool, strict: bool = False) -> None:
        self.uri = uri
        self.strict = strict
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False  # start() continued the run of an interrupted training
        self._end_time: int | None = None  # what `end` restores after `reopen`
        self._broken = False
        self._failure = ""  # the first failed call, once the store stopped answering
        self._spooled = 0  # metric values appended to the spool
        self._end_spooled = ""  # the run's end status, when the store could not take it
        self._skipped: list[str] = []  # what could not be logged, nor spooled
        if redact(uri) != uri:  # MLflow would print run links holding the credentials
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
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

    @property
    def spool(self) -> Path:
        return spool_dir() / f"{self.run_id}.jsonl"

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            if self.run_id is not None:  # the run exists, but its store stopped answering
                self._skipped.append(what)
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # a logging failure must never lose the training
            self._broken = True
            if self.strict:
                raise DlpipeError(f"MLflow {what} failed: {first_line(err)}") from None
            self._failure = f"{what} failed"
            if what != "log metrics":
                self._skipped.append(what)
            print(
                f"warning: MLflow {what} failed, tracking stops (metrics go to {self.spool}): "
                f"{first_line(err)}",
                file=sys.stderr,
            )
            return None

    def _to_spool(self, records: list[dict[str, Any]]) -> None:
        if not self.spool.exists():  # the header: which store the run is in (no credentials)
            records = [{"run_id": self.run_id, "tracking_uri": redact(self.uri)}, *records]
        _append(self.spool, records)

    def outcome(self) -> str:
        """What tracking lost, in one line ('' when MLflow took everything)."""
        if not self._failure:
            return ""
        held = [f"{self._spooled} metric values"] if self._spooled else []
        held += [f"the run's end ({self._end_spooled})"] if self._end_spooled else []
        kept = (
            f"{' and '.join(held)} kept in {self.spool.relative_to(project_root())}: "
            "`dlpipe sync` (or the evaluate stage) delivers them once MLflow answers"
            if held
            else "nothing to deliver later"
        )
        lost = f"; not logged: {', '.join(dict.fromkeys(self._skipped))}" if self._skipped else ""
        return f"MLflow {self._failure}; {kept}{lost}"

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
                f"warning: the checkpoint's MLflow run {resume_run_id} is not in "
                f"{redact(self.uri)}; "
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
        self.run_id = run_id
        previous = self._guard(f"reading run {run_id}", MlflowClient(self.uri).get_run, run_id)
        self._end_time = previous.info.end_time if previous is not None else None
        run = self._guard(f"reopening run {run_id}", mlflow.start_run, run_id=run_id)
        if run is not None:
            self.experiment_id = run.info.experiment_id

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
        """Log to the run; once its store has stopped answering, append to the spool."""
        if self.run_id is None:
            return
        timestamp = int(time.time() * 1000)
        if self.active:
            self._guard("log metrics", mlflow.log_metrics, metrics, step=step, timestamp=timestamp)
        if not self.active:
            step = step or 0
            self._to_spool(
                [
                    {"key": k, "value": float(v), "step": step, "timestamp": timestamp}
                    for k, v in metrics.items()
                ]
            )
            self._spooled += len(metrics)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which the run has `key` (none when tracking is off or fails)."""
        if not self.active:
            return set()

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
                print(f"warning: MLflow end_run failed: {first_line(err)}", file=sys.stderr)
                if not self.strict:  # `sync` records the end once the store answers
                    self._failure = self._failure or "end_run failed"
                    self._to_spool([{"status": status, "end_time": int(time.time() * 1000)}])
                    self._end_spooled = status
