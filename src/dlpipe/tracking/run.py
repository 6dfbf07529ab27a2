"""`StageRun`: the one MLflow run of a train or linear stage, which the evaluate stage
continues; resumable, and never fatal once the stage's work has started."""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from dlpipe.errors import DlpipeError, first_line, redact
from dlpipe.paths import project_root
from dlpipe.tracking.orphans import OWNER_TAG, end_orphans, owner
from dlpipe.tracking.spool import append, spool_dir
from dlpipe.tracking.store import Refused, check_store, experiment_id, refused_as_error


class StageRun:
    """The MLflow run a stage logs to (a training's, a linear model's; the evaluate stage reopens
    the training's): it survives interruptions and never takes the stage's work down with it.

    Starting is strict (an unusable store is an error before training, unless tracking is
    optional); everything after start only warns, so local outputs are always written. When the
    store stops answering, the metrics still to come (and the run's end) are appended to a spool
    file, `.dlpipe/spool/<run id>.jsonl`, that `sync` delivers later. A `strict` run (the evaluate
    stage, whose job includes the logging) raises one DlpipeError line at the first failed call
    instead.
    """

    def __init__(
        self, uri: str, required: bool, strict: bool = False, orphan_after_s: float = 900.0
    ) -> None:
        self.uri = uri
        self.strict = strict
        self.orphan_after_s = orphan_after_s  # see tracking.orphans
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
            check_store(uri)
        except DlpipeError as err:
            if required or isinstance(err, Refused):
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
        append(self.spool, records)

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
        with refused_as_error(self.uri):  # a refusal is a setting to fix, in one line
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
            self._end_orphans(self.experiment_id, tags.get("model"), keep={resume_run_id or ""})
            run = mlflow.start_run(
                run_id=resume_run_id,
                experiment_id=None if resume_run_id else self.experiment_id,
                run_name=None if resume_run_id else run_name,
                log_system_metrics=True,
            )
            self.run_id = run.info.run_id
            if resume_run_id is None:
                self._guard("log params", mlflow.log_params, params)
            self._guard("set tags", mlflow.set_tags, {**tags, OWNER_TAG: owner()})

    def _end_orphans(self, experiment: str, model: str | None, keep: set[str]) -> None:
        """End the runs of `model` that killed processes left RUNNING; a failure only warns."""
        if not model:
            return
        try:
            lines = end_orphans(
                MlflowClient(self.uri), experiment, model, keep, self.orphan_after_s
            )
        except Exception as err:  # any backend: its own exception types
            print(f"warning: MLflow: looking for orphaned runs failed: {first_line(err)}",
                  file=sys.stderr)  # fmt: skip
            return
        for line in lines:
            print(line)

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
            self._guard("tag the owner", mlflow.set_tag, OWNER_TAG, owner())
            model = previous.data.tags.get("model") if previous is not None else None
            self._end_orphans(run.info.experiment_id, model, keep={run_id})

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
