"""`dlpipe sweep --search`: an Optuna search over one model's params, in a study that workers on
several machines share.

    dlpipe sweep cnn --search 20 -S 'train.cnn.lr=tag(log, interval(0.0005, 0.01))' \\
        -S 'train.cnn.batch_size=choice(64, 128, 256)' -S train.cnn.epochs=4
    dlpipe sweep --join cnn-20261207-101500      # another worker, in its own clone
    dlpipe sweep --show --study cnn-20261207-101500

The space is Hydra's override grammar, read as the Hydra Optuna sweeper reads it: `choice(a, b)`
or `a,b` (categorical), `range(lo, hi[, step])` (integers, hi excluded), `interval(lo, hi)` (a
float), `tag(log, interval(lo, hi))` (on a log scale), `tag(int, interval(lo, hi))`; a plain value
is fixed for every trial. The study lives in `--storage`, else $DLPIPE_SEARCH_STORAGE (a team's
PostgreSQL, whose URL holds a password: keep it in the environment), else a SQLite file in
.dlpipe/. It keeps all a worker needs (the model, the space, the pruner, the number of trials,
the MLflow parent run), so a worker that joins needs only the study's name.

Each trial is `dvc exp run --temp` of train@M and evaluate@M with its `-S` values on the baseline's
data: a DVC experiment named <study>-<trial>, an MLflow run nested under the search's parent. Its
training reports every epoch's monitored validation value to the trial and stops when the pruner
says so (`dlpipe.training.pruning`); the trial's value is the best of those reports, so the search
never sees the test split. A worker beats a heartbeat while its trial runs: when it dies, the next
trial that any worker starts after the grace period marks its trial FAIL, and the study goes on.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlpipe import lineage, paths
from dlpipe.config import load_params, train_config
from dlpipe.dvc_queue import dvc, trial_env
from dlpipe.errors import DlpipeError, first_line, redact
from dlpipe.sweep import check_baseline, trial_overrides
from dlpipe.tables import format_table
from dlpipe.training import pruning

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

STORAGE_FILE = Path(".dlpipe/search.db")
PRUNER_KINDS = ("median", "halving")


# --- the space -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Space:
    """What a search varies (Optuna distributions, by params key) and what it fixes."""

    varied: dict[str, BaseDistribution]
    fixed: dict[str, str]  # key -> the value as given (`-S key=value`)

    @classmethod
    def parse(cls, items: Sequence[str]) -> Space:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import OverrideType
        from hydra.errors import HydraException

        parser = OverridesParser.create()
        varied: dict[str, BaseDistribution] = {}
        fixed: dict[str, str] = {}
        for item in items:
            try:
                [override] = parser.parse_overrides([item])
            except HydraException as err:
                raise DlpipeError(f"-S {item}: {str(err).splitlines()[0]}") from None
            key = override.key_or_group
            if override.type != OverrideType.CHANGE:
                raise DlpipeError(f"-S {item}: expected KEY=VALUES (keys must be in params.yaml)")
            if key in varied or key in fixed:
                raise DlpipeError(f"-S {key} is given twice")
            if override.is_sweep_override():
                varied[key] = distribution(item, override.value())
            else:
                fixed[key] = item.partition("=")[2]
        if not varied:
            raise DlpipeError("a search needs an -S that varies: choice, range or interval")
        return cls(varied, fixed)

    def values(self, key: str) -> list[Any]:
        """The values of a varied key that bound it: every choice, or both ends."""
        from optuna.distributions import CategoricalDistribution

        dist = self.varied[key]
        if isinstance(dist, CategoricalDistribution):
            return list(dist.choices)
        return [dist.low, dist.high]  # type: ignore[attr-defined]

    def check(self, params_path: str, model: str) -> None:
        """Every key is one the search may vary, and every choice and end of every range passes
        the params schema (one line naming the value that does not): before any trial runs."""
        fixed = [f"{key}={value}" for key, value in self.fixed.items()]
        trial_overrides(params_path, model, fixed)
        for key in self.varied:
            bounds = ",".join(hydra_value(v) for v in self.values(key))
            trial_overrides(params_path, model, [f"{key}={bounds}", *fixed])


def distribution(item: str, sweep: Any) -> BaseDistribution:
    """The Optuna distribution of one Hydra sweep (`choice`, `range`, `interval`)."""
    from hydra.core.override_parser.types import (
        ChoiceSweep,
        IntervalSweep,
        QuotedString,
        RangeSweep,
    )
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if isinstance(sweep, ChoiceSweep):
        if any(isinstance(c, (list, dict)) for c in sweep.list):
            raise DlpipeError(f"-S {item}: a search chooses among plain values, not lists")
        choices = [c.text if isinstance(c, QuotedString) else c for c in sweep.list]
        return CategoricalDistribution(choices)  # type: ignore[arg-type]
    if isinstance(sweep, RangeSweep):
        values = list(sweep.range())
        if not values:
            raise DlpipeError(f"-S {item}: the range is empty")
        if all(isinstance(v, int) for v in values) and len(values) > 1:
            return IntDistribution(values[0], values[-1], step=values[1] - values[0])
        return CategoricalDistribution(values)
    if isinstance(sweep, IntervalSweep):
        low, high, log = sweep.start, sweep.end, "log" in sweep.tags
        if low is None or high is None or not low < high:
            raise DlpipeError(f"-S {item}: an interval needs low < high")
        if log and low <= 0:
            raise DlpipeError(f"-S {item}: a log interval needs low > 0")
        if "int" in sweep.tags:
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)
    raise DlpipeError(f"-S {item}: a search takes choice, range or interval")


def hydra_value(value: Any) -> str:
    """A value as `dvc exp run -S` reads it back (Hydra's grammar): strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


def suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log)  # type: ignore[attr-defined]


# --- the study -----------------------------------------------------------------------------------


def storage_url(given: str | None) -> str:
    """--storage, else $DLPIPE_SEARCH_STORAGE, else SQLite in this project's .dlpipe/ (absolute:
    trials run in DVC's temporary copies), with the PostgreSQL driver that is installed."""
    url = given or os.environ.get(pruning.STORAGE_ENV)
    if url and url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; the postgres extra installs psycopg2
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    if url:
        return url
    path = paths.project_root() / STORAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def rdb_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.RDBStorage:
    """The study's storage (one line when it cannot be reached)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna still marks heartbeats and fail_stale_trials "experimental" (since 2.9): no warnings
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_s,
            grace_period=2 * heartbeat_s if heartbeat_s else None,
        )
    except Exception as err:  # sqlalchemy's OperationalError, a missing driver, ...
        raise DlpipeError(f"search storage {redact(url)}: {first_line(err)}") from None


def study_attrs(storage: optuna.storages.RDBStorage, name: str) -> dict[str, Any]:
    import optuna

    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage)) or "none"
        raise DlpipeError(f"no study {name!r} in the search storage (studies: {names})") from None
    attrs = storage.get_study_user_attrs(study_id)
    if "parent_run" not in attrs:  # the last thing `create_study` records
        raise DlpipeError(f"study {name!r} was not made (whole) by `dlpipe sweep MODEL --search`")
    return attrs


def create_study(
    model: str,
    items: Sequence[str],
    n_trials: int,
    params_path: str,
    url: str,
    *,
    name: str | None = None,
    pruner: str = "median",
    startup_trials: int = 3,
    warmup_epochs: int = 0,
    heartbeat_s: int = 60,
) -> str:
    """Check the space, then create the study and its MLflow parent run; the study's name."""
    import optuna
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from dlpipe.tracking.store import check_store, experiment_id, tracking_uri

    if n_trials < 1:
        raise DlpipeError(f"--search {n_trials}: must be at least 1 trial")
    if pruner not in PRUNER_KINDS:
        raise DlpipeError(f"--pruner {pruner}: one of {', '.join(PRUNER_KINDS)}")
    if startup_trials < 0 or warmup_epochs < 0 or heartbeat_s < 1:
        raise DlpipeError("--startup-trials and --warmup-epochs >= 0, --heartbeat-s >= 1")
    if not Path("dvc.yaml").is_file():
        raise DlpipeError("no dvc.yaml here: run `dlpipe sweep` from the project root")
    name = name or f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise DlpipeError(f"--study {name!r}: letters, digits, '_', '.' and '-' only")
    params = load_params(params_path)
    config = train_config(params, model)
    space = Space.parse(items)
    monitor_key = f"train.{model}.monitor"
    if monitor_key in space.varied:
        raise DlpipeError(f"-S {monitor_key}: the search's objective is fixed, not searched")
    space.check(params_path, model)
    monitor = space.fixed.get(monitor_key, config.monitor).strip("'\"")
    check_baseline(config.dataset)
    storage = rdb_storage(url)
    uri = tracking_uri()
    check_store(uri)
    client = MlflowClient(uri)
    experiment = experiment_id(params.mlflow.experiment, uri)
    try:
        optuna.create_study(
            storage=storage,
            study_name=name,
            direction="minimize" if monitor == "val_loss" else "maximize",
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise DlpipeError(f"study {name!r} exists: `dlpipe sweep --join {name}` joins it") from None
    parent = client.create_run(
        experiment,
        run_name=f"search-{name}",
        tags={"sweep_family": model, "optuna_study": name, **lineage.git_state()},
    ).info.run_id
    settings = {"kind": pruner, "startup_trials": startup_trials, "warmup_epochs": warmup_epochs}
    client.log_batch(
        parent,
        params=[Param(f"space.{item.partition('=')[0]}", item.partition("=")[2]) for item in items]
        + [Param("search.trials", str(n_trials)), Param("search.monitor", monitor)]
        + [Param(f"search.pruner.{k}", str(v)) for k, v in settings.items()],
    )
    study_id = storage.get_study_id_from_name(name)
    for key, value in {  # parent_run last: a study without it was not made whole
        "model": model,
        "space": list(items),
        "n_trials": n_trials,
        "monitor": monitor,
        "pruner": settings,
        "heartbeat_s": heartbeat_s,
        "git_sha": lineage.git_state()["git_sha"],
        "parent_run": parent,
    }.items():
        storage.set_study_user_attr(study_id, key, value)
    print(f"search: study {name} in {redact(url)}: {n_trials} trials of {model}, {monitor}")
    print(f"search: MLflow parent run {parent} in {redact(uri)}; more: dlpipe sweep --join {name}")
    return name


# --- a worker ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """One working copy's share of a study: its trials run here, one at a time."""

    name: str
    url: str
    storage: optuna.storages.RDBStorage  # uncached: reads what trainings wrote
    attrs: dict[str, Any]
    space: Space
    tracking_uri: str

    @property
    def model(self) -> str:
        return str(self.attrs["model"])

    def trial_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(self.name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def objective(self, trial: optuna.Trial) -> float:
        """Run the trial as a DVC experiment; its best reported value, or pruned."""
        import optuna

        values = {key: suggest(trial, key, dist) for key, dist in self.space.varied.items()}
        exp = f"{self.name}-{trial.number}"
        trial.set_user_attr("dvc_exp", exp)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{Path.cwd()}")
        sets = [f"mlflow.sweep_parent='{self.attrs['parent_run']}'"]
        sets += [f"{key}={value}" for key, value in self.space.fixed.items()]
        sets += [f"{key}={hydra_value(value)}" for key, value in values.items()]
        shown = " ".join(f"{key.rsplit('.', 1)[-1]}={format_value(v)}" for key, v in values.items())
        log = paths.project_root() / ".dlpipe" / "search" / f"{exp}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"search: trial {trial.number} ({shown}) as {exp} ...", flush=True)
        env = trial_env(1) | {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            pruning.STORAGE_ENV: self.url,
            pruning.STUDY_ENV: self.name,
            pruning.TRIAL_ENV: str(trial.number),
        }
        args = ["exp", "run", "--temp", "-f", "-s", "-n", exp]
        args += [arg for s in sets for arg in ("-S", s)]
        try:
            dvc(*args, f"train@{self.model}", f"evaluate@{self.model}", env=env, log=log)
        except DlpipeError as err:
            print(f"search: trial {trial.number} failed: {err} (log: {log})")
            raise
        frozen = self.storage.get_trial(self.trial_id(trial.number))
        reports = frozen.intermediate_values
        if not reports:
            raise DlpipeError(f"trial {trial.number} reported no epoch (log: {log})")
        maximize = self.attrs["monitor"] != "val_loss"
        best = max(reports.values()) if maximize else min(reports.values())
        pruned_at = frozen.user_attrs.get(pruning.PRUNED_AT)
        if pruned_at:
            print(f"search: trial {trial.number} pruned after epoch {pruned_at}: {best:.4f}")
            raise optuna.TrialPruned()
        print(f"search: trial {trial.number}: {self.attrs['monitor']} {best:.4f}")
        return best


def open_worker(name: str, url: str, params_path: str) -> Worker:
    """Join study `name`: its settings read back and checked against this copy."""
    from dlpipe.tracking.store import check_store, tracking_uri

    if not Path("dvc.yaml").is_file():
        raise DlpipeError("no dvc.yaml here: run `dlpipe sweep` from the project root")
    attrs = study_attrs(rdb_storage(url), name)
    storage = rdb_storage(url, heartbeat_s=int(attrs["heartbeat_s"]))
    params = load_params(params_path)
    model = str(attrs["model"])
    config = train_config(params, model)  # this copy trains that model
    space = Space.parse(attrs["space"])
    space.check(params_path, model)
    check_baseline(config.dataset)
    here = lineage.git_state()["git_sha"]
    if here != attrs["git_sha"]:
        print(f"warning: this copy is at {here[:7]}, the study began at {attrs['git_sha'][:7]}")
    uri = tracking_uri()
    check_store(uri)
    return Worker(name, url, storage, attrs, space, uri)


def work(name: str, url: str, params_path: str) -> int:
    """Run trials of the study until it has its number of trials begun (any state but waiting,
    counted across every worker); 0 when every trial this worker ran completed or was pruned."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    worker = open_worker(name, url, params_path)
    n_trials = int(worker.attrs["n_trials"])
    study = optuna.load_study(study_name=name, storage=worker.storage)
    begun = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=begun))  # not WAITING: enqueued ones
    seed = load_params(params_path).seed + done  # a worker alone from the start reproduces
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    print(f"search: worker on study {name} ({done} of {n_trials} trials begun)", flush=True)
    numbers: list[int] = []
    try:
        if done < n_trials:
            study.optimize(
                worker.objective,
                callbacks=[
                    MaxTrialsCallback(n_trials, states=begun),
                    lambda _, trial: numbers.append(trial.number),
                ],
                catch=(DlpipeError,),
            )
    finally:  # Ctrl-C too: Optuna has marked the trial it stopped FAIL
        optuna.storages.fail_stale_trials(study)
        finish_parent(study, worker)
    ended = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    failed = [n for n in numbers if ended[n] == TrialState.FAIL]
    print(show_table(name, url))
    return 1 if failed else 0


def finish_parent(study: optuna.Study, worker: Worker) -> None:
    """The last worker out ends the parent run: FINISHED with the best trial when one completed."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        return
    client = MlflowClient(worker.tracking_uri)
    parent = str(worker.attrs["parent_run"])
    count = {state: sum(t.state == state for t in trials) for state in TrialState}
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        client.log_metric(parent, f"trials_{state.name.lower()}", count[state])
    status = "FAILED"
    if count[TrialState.COMPLETE]:
        best = study.best_trial
        client.log_metric(parent, f"best_{worker.attrs['monitor']}", float(best.value or 0.0))
        client.set_tag(parent, "best_trial", best.user_attrs.get("dvc_exp", str(best.number)))
        status = "FINISHED"
    client.set_terminated(parent, status)


# --- the table -----------------------------------------------------------------------------------


def show_table(name: str, url: str) -> str:
    """The study's trials: state, value, epochs reported, the values tried, experiment, worker."""
    import optuna

    storage = rdb_storage(url)
    attrs = study_attrs(storage, name)
    study = optuna.load_study(study_name=name, storage=storage)
    keys = list(Space.parse(attrs["space"]).varied)
    short = {key: key.rsplit(".", 1)[-1] for key in keys}
    rows = []
    for t in study.get_trials(deepcopy=False):
        cells = [t.number, t.state.name.lower(), "" if t.value is None else f"{t.value:.4f}"]
        cells.append(len(t.intermediate_values))
        cells += [format_value(t.params.get(key, "")) for key in keys]
        cells += [t.user_attrs.get("dvc_exp", ""), t.user_attrs.get("worker", "")]
        rows.append(cells)
    header = ["trial", "state", attrs["monitor"], "epochs", *short.values(), "dvc exp", "worker"]
    title = f"study {name}: {len(rows)} of {attrs['n_trials']} trials of {attrs['model']}"
    return title + "\n" + format_table(header, rows)


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
