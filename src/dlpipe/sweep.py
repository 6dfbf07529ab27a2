"""`dlpipe sweep`: a small grid over one model family, run as queued DVC experiments and grouped
under one MLflow parent run.

    dlpipe sweep cnn -S train.cnn.lr=0.001,0.002 -S train.cnn.batch_size=32,64 --jobs 2
    dlpipe sweep --show [cnn]

`-S` takes the override grammar of `dvc exp run -S` (Hydra's): comma-separated values, or
`range(a,b)`, make the axes of the grid. A sweep

1. checks every trial's params (one error line, before anything is queued) and that the
   baseline's prepared data is up to date;
2. opens the parent run in MLflow: the grid as params, the trials' experiment names as a tag;
3. queues one experiment per trial, named `<family>-<parent run id[:6]>-<n>`:
   `dvc exp run --queue -f -s -S ... -S mlflow.sweep_parent=<parent> train@F evaluate@F`.
   Forced, so a trial that trains like another, or like the baseline, still trains as its own
   run instead of taking a model from DVC's run cache; single stages, so trials reuse the
   baseline's prepared data, which is why a grid varies `train.<family>.*` and `evaluate.*` only;
4. runs them with `dvc queue start -j N` and waits until each has succeeded or failed (Ctrl-C
   stops the waiting, not the trials);
5. ends the parent run FINISHED when every trial succeeded and logged its run, FAILED otherwise,
   and prints the trials as `--show` does. Exit code 1 when a trial failed.

Trials run with `PYTHONPATH=src`, so each imports the code of its own copy of the repo (not what
the checkout holds by the time it runs), and with `OMP_NUM_THREADS` = cores / jobs unless set.

`--show` is `dvc exp show` on one screen: per experiment, the params that differ between the rows
and each family's test accuracy, best val accuracy and training time, with the MLflow run its
training logged (found by the run's `dvc_exp_name` tag).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dlpipe import lineage, paths
from dlpipe.config import Params, load_params, parse_params, set_dotted, train_config
from dlpipe.errors import DlpipeError
from dlpipe.family import model_family
from dlpipe.tables import format_table

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

SWEEP_PARENT = "mlflow.sweep_parent"
DONE = ("Success", "Failed")
POLL_S = 5.0
MISSING_POLLS = 3  # a trial absent from the queue this many polls in a row was removed


@dataclass(frozen=True)
class Axis:
    """One `-S KEY=V1,V2` of the grid: the key, and each value as `dvc exp run -S` takes it."""

    key: str
    values: tuple[str, ...]


def parse_grid(items: Sequence[str]) -> list[Axis]:
    """`["train.cnn.lr=0.001,0.002"]` -> one axis with two values, as DVC would read them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    axes: list[Axis] = []
    for item in items:
        try:
            [override] = parser.parse_overrides([item])
            if override.type != OverrideType.CHANGE:
                raise DlpipeError(f"-S {item}: expected KEY=VALUES (keys must be in params.yaml)")
            if override.is_sweep_override():
                values = tuple(override.sweep_string_iterator())
            else:
                values = (override.get_value_element_as_str(),)
        except HydraException as err:
            raise DlpipeError(f"-S {item}: {str(err).splitlines()[0]}") from None
        if override.key_or_group in {axis.key for axis in axes}:
            raise DlpipeError(f"-S {override.key_or_group} is given twice")
        axes.append(Axis(override.key_or_group, values))
    return axes


def _lookup(raw: Any, key: str) -> bool:
    """Whether the dotted `key` names a value in the params mapping `raw`."""
    for part in key.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return False
        raw = raw[part]
    return True


def trials(raw: dict[str, Any], family: str, axes: Sequence[Axis]) -> list[dict[str, str]]:
    """Every combination of the axes, each checked against the params schema.

    Only `train.<family>.*` and `evaluate.*` may vary: trials rerun train@<family> and
    evaluate@<family> alone, on the baseline's prepared data."""
    allowed = (f"train.{family}.", "evaluate.")
    for axis in axes:
        if not axis.key.startswith(allowed):
            raise DlpipeError(
                f"-S {axis.key}: a sweep of {family} varies train.{family}.* and evaluate.* only "
                f"(its trials rerun train@{family} and evaluate@{family} on the baseline's data)"
            )
        if not _lookup(raw, axis.key):
            raise DlpipeError(f"-S {axis.key}: no such key in params.yaml")
    grid = [
        dict(zip([a.key for a in axes], combo, strict=True))
        for combo in itertools.product(*(a.values for a in axes))
    ]
    for trial in grid:
        updated = copy.deepcopy(raw)
        for key, value in trial.items():
            set_dotted(updated, key, yaml.safe_load(value))
        params = parse_params(updated, "trial " + " ".join(f"{k}={v}" for k, v in trial.items()))
        model_family(params, family).model_config(params, family)
    return grid


# --- DVC -----------------------------------------------------------------------------------------


def trial_env(jobs: int) -> dict[str, str]:
    """The queue workers' environment: this venv's `python` and `dvc` first on PATH, each trial
    importing its own copy's code, one share of the cores per worker."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in ("src", env.get("PYTHONPATH")) if p)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    return env


def dvc(*args: str, env: dict[str, str] | None = None) -> str:
    """`dvc ARGS` in the project; its stdout, or one DlpipeError line with DVC's own error.
    Output goes through files, not pipes: the workers `dvc queue start` leaves running would
    hold a pipe open until they exit."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(
            [sys.executable, "-m", "dvc", *args], stdout=out, stderr=err, text=True, env=env
        ).returncode
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        lines = [line for line in (stderr + stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["?"]
        raise DlpipeError(f"`dvc {' '.join(args[:3])} ...` failed: {errors[0]}")
    return stdout


def check_baseline(dataset: str) -> None:
    """Trials train on the baseline's data/prepared/<dataset>: it must be in dvc.lock, current."""
    from dvc.repo import Repo

    stage = f"prepare@{dataset}"
    if lineage.lock_entry(stage) is None:
        raise DlpipeError(f"dvc.lock has no {stage}: run `dvc repro {stage}` (the trials' data)")
    with Repo(".") as repo:
        changed = repo.status(targets=[stage])
    if changed:
        raise DlpipeError(f"{stage} is not up to date: run `dvc repro {stage}` first")


def queue_states(names: Collection[str]) -> dict[str, str]:
    """Each named experiment's state in DVC's queue (Queued, Running, Success, Failed)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        found = {e["name"]: str(e["status"]) for e in repo.experiments.celery_queue.status()}
    return {name: found.get(name, "Missing") for name in names}


def wait_for(names: Sequence[str]) -> dict[str, str]:
    """Poll the queue until every trial is done; print each change of the counts."""
    missing = dict.fromkeys(names, 0)
    shown = ""
    while True:
        states = queue_states(names)
        for name, state in states.items():
            missing[name] = missing[name] + 1 if state == "Missing" else 0
            if missing[name] >= MISSING_POLLS:
                states[name] = "Failed"
        counts = {
            state: list(states.values()).count(state) for state in sorted(set(states.values()))
        }
        line = ", ".join(f"{n} {state.lower()}" for state, n in counts.items())
        if line != shown:
            print(f"sweep: {line}", flush=True)
            shown = line
        if all(state in DONE for state in states.values()):
            return states
        time.sleep(POLL_S)


def log_tail(name: str, lines: int = 15) -> str:
    """The end of a trial's output (`dvc queue logs`): why it failed."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "queue", "logs", name], capture_output=True, text=True
    )
    return "\n".join((done.stdout + done.stderr).rstrip().splitlines()[-lines:])


def remove_from_queue(names: Sequence[str]) -> None:
    """Best effort: a sweep that failed to start leaves none of its trials to run later."""
    if names:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "remove", *names])


# --- the sweep -----------------------------------------------------------------------------------


def queue_trials(
    family: str,
    parent: str,
    names: Sequence[str],
    grid: Sequence[dict[str, str]],
    queued: list[str],
) -> None:
    """One queued experiment per trial; `queued` gets each name once it is in the queue."""
    for name, trial in zip(names, grid, strict=True):
        sets = [f"{SWEEP_PARENT}='{parent}'", *(f"{k}={v}" for k, v in trial.items())]
        dvc(
            "exp", "run", "--queue", "-f", "-s", "-n", name,
            *itertools.chain.from_iterable(("-S", s) for s in sets),
            f"train@{family}", f"evaluate@{family}",
        )  # fmt: skip
        queued.append(name)
        print(f"sweep: queued {name}: {' '.join(sets[1:])}")


def run_sweep(model: str, grid_items: Sequence[str], jobs: int, params_path: str) -> int:
    """Queue, run and wait for the grid; 0 when every trial finished, 1 otherwise."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from dlpipe.lineage import git_state
    from dlpipe.tracking.store import check_store, experiment_id, tracking_uri

    if jobs < 1:
        raise DlpipeError(f"--jobs {jobs}: must be at least 1")
    if not Path("dvc.yaml").is_file():
        raise DlpipeError("no dvc.yaml here: run `dlpipe sweep` from the project root")
    params = load_params(params_path)

    dataset = train_config(params, model).dataset
    raw = yaml.safe_load(Path(params_path).read_text(encoding="utf-8"))
    axes = parse_grid(grid_items)
    grid = trials(raw, model, axes)
    check_baseline(dataset)
    uri = tracking_uri()
    check_store(uri)
    client = MlflowClient(uri)

    experiment = experiment_id(params.mlflow.experiment, uri)
    parent = client.create_run(
        experiment,
        run_name=f"sweep-{model}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"sweep_family": model, **git_state()},
    ).info.run_id
    names = [f"{model}-{parent[:6]}-{n}" for n in range(1, len(grid) + 1)]
    client.log_batch(
        parent,
        params=[Param(f"grid.{a.key}", ",".join(a.values)) for a in axes]
        + [Param("sweep.trials", str(len(grid))), Param("sweep.jobs", str(jobs))],
    )
    client.set_tag(parent, "dvc_exp_names", ",".join(names))
    print(f"sweep: {len(grid)} trials of {model}, MLflow parent run {parent} in {uri}")
    status, started, queued = "FAILED", False, list[str]()
    try:
        try:
            queue_trials(model, parent, names, grid, queued)
            env = trial_env(jobs)
            env["MLFLOW_TRACKING_URI"] = uri  # the store the parent is in, whatever the cwd
            dvc("queue", "start", "-j", str(jobs), env=env)
        except BaseException:  # no trial of a failed sweep is left to run later
            remove_from_queue(queued)
            raise
        started = True
        states = wait_for(names)
        status = _finish(client, parent, experiment, names, states, params)
    except KeyboardInterrupt:
        status = "KILLED"
        if started:
            print(
                "sweep: stopped waiting; the trials go on (`dvc queue status`, "
                f"`dvc queue kill {' '.join(names)}`)",
                file=sys.stderr,
            )
        raise
    finally:
        client.set_terminated(parent, status)
    print(show_table(params, model, names))
    return 0 if status == "FINISHED" else 1


def _finish(
    client: MlflowClient,
    parent: str,
    experiment: str,
    names: Sequence[str],
    states: dict[str, str],
    params: Params,
) -> str:
    """Log the outcome on the parent run; its final status."""
    from dlpipe.registry import LOWER_IS_BETTER

    runs = client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
    )
    finished = {r.data.tags.get("dvc_exp_name"): r for r in runs if r.info.status == "FINISHED"}
    ok = [n for n in names if states[n] == "Success" and n in finished]
    for name in names:
        if name not in ok:
            print(f"sweep: trial {name} failed ({states[name]}); its log ends:\n{log_tail(name)}")
    metric = params.registry.metric
    scored = {n: finished[n].data.metrics[metric] for n in ok if metric in finished[n].data.metrics}
    client.log_metric(parent, "trials_finished", len(ok))
    client.log_metric(parent, "trials_failed", len(names) - len(ok))
    if scored:
        pick = min if metric in LOWER_IS_BETTER else max
        best = pick(scored, key=lambda n: scored[n])
        client.log_metric(parent, f"best_{metric}", scored[best])
        client.set_tag(parent, "best_trial", best)
        print(f"sweep: best {metric} {scored[best]:.4f} ({best})")
    return "FINISHED" if len(ok) == len(names) else "FAILED"


# --- dvc exp show, readable ----------------------------------------------------------------------


@dataclass
class ExpRow:
    """One row of `dvc exp show`: the workspace, a commit, or an experiment on it."""

    name: str
    rev: str
    state: str
    params: dict[str, Any]
    metrics: dict[str, Any]  # metrics file -> its data


def exp_rows(shown: list[dict[str, Any]]) -> list[ExpRow]:
    """The rows of `dvc exp show --json`: each commit, then its experiments."""
    from dlpipe.config import flatten

    def row(entry: dict[str, Any], name: str, state: str) -> ExpRow:
        data = entry.get("data") or {}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
        metrics = {
            path: found["data"]
            for path, found in (data.get("metrics") or {}).items()
            if isinstance(found, dict) and "data" in found
        }
        return ExpRow(name, str(entry.get("rev", "")), state, flatten("", params), metrics)

    rows = []
    for commit in shown:
        rev = str(commit.get("rev", ""))
        rows.append(row(commit, commit.get("name") or (rev if rev == "workspace" else rev[:7]), ""))
        for exp in commit.get("experiments") or []:
            state = ((exp.get("executor") or {}).get("state")) or "done"
            for entry in exp.get("revs") or []:
                rows.append(row(entry, exp.get("name") or entry.get("name") or "?", state))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def headline(row: ExpRow, family: str) -> list[Any]:
    """test accuracy, best val accuracy and train time (s) of `family` in one row."""
    reports = paths.MODEL_REPORTS_DIR / family
    evaluation = row.metrics.get((reports / "eval.json").as_posix()) or {}
    train = row.metrics.get((reports / "train.json").as_posix()) or {}
    return [
        evaluation.get("test_accuracy"),
        (train.get("best") or {}).get("val_accuracy"),
        train.get("train_time_s"),
    ]


def format_rows(rows: Sequence[ExpRow], families: Sequence[str], runs: dict[str, str]) -> str:
    """The table: name, rev, state, the params that differ, each family's headline metrics (for
    the families any row has), and the MLflow run(s) of each experiment (`runs`: name -> ids)."""
    known = [row.params for row in rows if row.params]  # a queued experiment has none yet
    keys = sorted({k for params in known for k in params} - {SWEEP_PARENT})
    varying = [k for k in keys if len({json.dumps(p.get(k), default=str) for p in known}) > 1]
    shown = [f for f in families if any(v is not None for r in rows for v in headline(r, f))]
    header = ["experiment", "rev", "state", *varying]
    for family in shown:
        header += [f"{family} test acc", f"{family} val acc", f"{family} train s"]
    header.append("mlflow run")
    table = []
    for row in rows:
        rev = "" if row.rev == "workspace" else row.rev[:7]
        cells = [row.name, rev, row.state, *(_fmt(row.params.get(k)) for k in varying)]
        for family in shown:
            test, val, seconds = headline(row, family)
            cells += [
                "-" if test is None else f"{test:.4f}",
                "-" if val is None else f"{val:.4f}",
                "-" if seconds is None else f"{seconds:.1f}",
            ]
        cells.append(runs.get(row.name, "-"))
        table.append(cells)
    return format_table(header, table)


def mlflow_runs(names: Collection[str], family: str | None, params: Params) -> dict[str, str]:
    """Experiment name -> the short ids of the runs tagged with it (latest first). The table is
    DVC's and the run ids a convenience: without a reachable store there are none."""
    from mlflow.tracking import MlflowClient

    from dlpipe.tracking.store import check_store, tracking_uri

    uri = tracking_uri()
    try:
        check_store(uri, reading=True)
    except DlpipeError as err:
        print(f"warning: {err}; showing no MLflow runs", file=sys.stderr)
        return {}
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    if experiment is None or not names:
        return {}
    only = f" and tags.model = '{family}'" if family else ""
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.dvc_exp_name LIKE '%'{only}",  # tags take no IN (...)
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    ids: dict[str, list[str]] = {}
    for run in runs:
        if run.data.tags["dvc_exp_name"] in names:
            ids.setdefault(run.data.tags["dvc_exp_name"], []).append(run.info.run_id[:8])
    return {name: " ".join(run_ids) for name, run_ids in ids.items()}


def show_table(params: Params, family: str | None, only: Collection[str] | None = None) -> str:
    """`dvc exp show` as one screen (`only`: these experiments and the commits they are on)."""
    families = [family] if family else list(params.models)
    rows = exp_rows(json.loads(dvc("exp", "show", "--json") or "[]"))
    if only is not None:  # the baseline commit(s) and these experiments
        rows = [r for r in rows if r.name in only or (r.state == "" and r.rev != "workspace")]
    names = [r.name for r in rows if r.state]
    return format_rows(rows, families, mlflow_runs(names, family, params))
