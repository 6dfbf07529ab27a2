"""`dlpipe sweep`: DVC's own queued grid over one model's params, under one MLflow parent run.

    dlpipe sweep cnn -S train.cnn.lr=0.001,0.002 -S train.cnn.batch_size=32,64 --jobs 2
    dlpipe sweep --show [cnn]

DVC does the grid: `dvc exp run --queue -n NAME -S 'a=1,2' ...` queues one experiment per
combination (named NAME-1 ... NAME-N) and `dvc exp run --run-all -j N` runs the queue (watched:
`dvc_queue`). dlpipe checks every trial first (DVC's expansion and override code, then the params
schema: one error line, nothing queued), runs `train@M evaluate@M` alone (`-s`, on the baseline's
prepared data, so a grid varies `train.<model>.*` and `evaluate.*` only) and forced (`-f`: a trial
that trains like another still trains as its own run), and keeps the grid in an MLflow parent run
whose children are the trials' trainings (`mlflow.sweep_parent`); it ends FINISHED, with the best
trial, when every trial succeeded and logged its run. Trials import their own copy's code
(`PYTHONPATH=src`). `--show` is `dvc exp show` narrowed to what varies and the headline metrics,
plus MLflow runs.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from dlpipe import lineage, paths
from dlpipe.config import Params, load_params, parse_params, train_config
from dlpipe.dvc_queue import dvc, run_queued, trial_env
from dlpipe.errors import DlpipeError
from dlpipe.family import model_family
from dlpipe.tables import format_table

SWEEP_PARENT = "mlflow.sweep_parent"


def trial_overrides(params_path: str, model: str, grid: Sequence[str]) -> list[list[str]]:
    """Each trial's `-S` overrides, expanded as DVC will, each trial's params.yaml validated."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides, get_hydra_sweeps, to_hydra_overrides
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    allowed, keys = (f"train.{model}.", "evaluate."), list[str]()
    for item in grid:
        try:
            [override] = to_hydra_overrides([item])
        except HydraException as err:
            raise DlpipeError(f"-S {item}: {str(err).splitlines()[0]}") from None
        key = override.key_or_group
        if override.type != OverrideType.CHANGE:
            raise DlpipeError(f"-S {item}: expected KEY=VALUES (keys must be in params.yaml)")
        if not key.startswith(allowed):
            raise DlpipeError(
                f"-S {key}: a sweep of {model} varies train.{model}.* and evaluate.* only "
                f"(its trials rerun train@{model} and evaluate@{model} on the baseline's data)"
            )
        if key in keys:
            raise DlpipeError(f"-S {key} is given twice")
        keys.append(key)
    try:
        trials = [sweep["params.yaml"] for sweep in get_hydra_sweeps({"params.yaml": list(grid)})]
    except HydraException as err:
        raise DlpipeError(f"-S: {str(err).splitlines()[0]}") from None
    with tempfile.TemporaryDirectory() as folder:
        trial_params = Path(folder, "params.yaml")
        for overrides in trials:
            label = "trial " + " ".join(overrides)
            shutil.copyfile(params_path, trial_params)
            try:
                apply_overrides(trial_params, overrides)
            except InvalidArgumentError as err:
                raise DlpipeError(f"{label}: {str(err.__cause__ or err).splitlines()[0]}") from None
            params = parse_params(yaml.safe_load(trial_params.read_text(encoding="utf-8")), label)
            model_family(params, model).model_config(params, model)
    return trials


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


def run_sweep(model: str, grid: Sequence[str], jobs: int, params_path: str) -> int:
    """Queue and run the grid; 0 when every trial finished and logged its run, 1 otherwise."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from dlpipe.registry import LOWER_IS_BETTER
    from dlpipe.tracking.store import check_store, experiment_id, tracking_uri

    if jobs < 1:
        raise DlpipeError(f"--jobs {jobs}: must be at least 1")
    if not Path("dvc.yaml").is_file():
        raise DlpipeError("no dvc.yaml here: run `dlpipe sweep` from the project root")
    params = load_params(params_path)
    dataset = train_config(params, model).dataset
    trials = trial_overrides(params_path, model, grid)
    check_baseline(dataset)
    uri = tracking_uri()
    check_store(uri)
    client = MlflowClient(uri)
    experiment = experiment_id(params.mlflow.experiment, uri)
    parent = client.create_run(
        experiment,
        run_name=f"sweep-{model}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"sweep_family": model, **lineage.git_state()},
    ).info.run_id
    prefix = f"{model}-{parent[:6]}"  # DVC names a grid's trials <prefix>-1 ... <prefix>-N
    names = [f"{prefix}-{n}" for n in range(1, len(trials) + 1)] if len(trials) > 1 else [prefix]
    client.log_batch(
        parent,
        params=[Param(f"grid.{item.partition('=')[0]}", item.partition("=")[2]) for item in grid]
        + [Param("sweep.trials", str(len(trials))), Param("sweep.jobs", str(jobs))],
    )
    client.set_tag(parent, "dvc_exp_names", ",".join(names))
    print(f"sweep: {len(trials)} trials of {model}, MLflow parent run {parent} in {uri}")
    status = "FAILED"
    try:
        sets = [f"{SWEEP_PARENT}='{parent}'", *grid]
        try:
            print(dvc(
                "exp", "run", "--queue", "-f", "-s", "-n", prefix,
                *itertools.chain.from_iterable(("-S", s) for s in sets),
                f"train@{model}", f"evaluate@{model}",
            ), end="")  # fmt: skip
        except DlpipeError:  # no trial of a sweep that failed to queue is left to run later
            with contextlib.suppress(DlpipeError):
                dvc("queue", "remove", *names)
            raise
        env = trial_env(jobs) | {"MLFLOW_TRACKING_URI": uri}  # the parent's store, any cwd
        states = run_queued(names, jobs, env)  # each trial's state: Success, Failed, ...
        runs = client.search_runs(
            [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
        )
        finished = {r.data.tags.get("dvc_exp_name"): r for r in runs if r.info.status == "FINISHED"}
        ok = [n for n in names if states[n] == "Success" and n in finished]
        for name in sorted(set(names) - set(ok)):
            print(f"sweep: trial {name} failed ({states[name]}): `dvc queue logs {name}`")
        client.log_metric(parent, "trials_finished", len(ok))
        client.log_metric(parent, "trials_failed", len(names) - len(ok))
        metric = params.registry.metric
        scored = {
            n: finished[n].data.metrics[metric] for n in ok if metric in finished[n].data.metrics
        }
        if scored:
            best = (min if metric in LOWER_IS_BETTER else max)(scored, key=scored.__getitem__)
            client.log_metric(parent, f"best_{metric}", scored[best])
            client.set_tag(parent, "best_trial", best)
            print(f"sweep: best {metric} {scored[best]:.4f} ({best})")
        status = "FINISHED" if len(ok) == len(names) else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent, status)
    print(show_table(params, model))
    return 0 if status == "FINISHED" else 1


def exp_show_args(families: Sequence[str]) -> list[str]:
    """`dvc exp show` options that keep the experiment, the params of these models (and
    `evaluate.*`) that differ between rows, and each model's headline metrics."""
    reports = paths.MODEL_REPORTS_DIR.as_posix()
    headline = "|".join(
        rf"({reports}/{m}/eval\.json:)?test_accuracy$"
        rf"|({reports}/{m}/train\.json:)?(best\.val_accuracy|train_time_s)$"
        for m in families
    )
    varied = "|".join(rf"train\.{m}\." for m in families)
    drop = rf"(?!Experiment$|Created$|State$|{varied}|evaluate\.)"
    return ["--no-pager", "--only-changed", "--keep", headline, "--drop", drop]


def show_table(params: Params, model: str | None) -> str:
    """`dvc exp show`, narrowed (`exp_show_args`), then the MLflow runs of each experiment (by
    their `dvc_exp_name` tag; none without a reachable store: the table is DVC's)."""
    from mlflow.tracking import MlflowClient

    from dlpipe.tracking.store import check_store, tracking_uri

    table = dvc("exp", "show", "--md", *exp_show_args([model] if model else params.models))
    names = set(dvc("exp", "list", "--name-only").split())
    uri = tracking_uri()
    try:
        check_store(uri, reading=True)
    except DlpipeError as err:
        print(f"warning: {err}; showing no MLflow runs", file=sys.stderr)
        return table.rstrip()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    ids: dict[str, list[str]] = {}
    for run in client.search_runs(
        [experiment.experiment_id] if experiment and names else [],
        filter_string="tags.dvc_exp_name LIKE '%'",  # tags take no IN (...)
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    ):
        if run.data.tags["dvc_exp_name"] in names:
            ids.setdefault(run.data.tags["dvc_exp_name"], []).append(run.info.run_id[:8])
    runs = [[name, " ".join(run_ids)] for name, run_ids in sorted(ids.items())]
    return table.rstrip() + (
        "\n\n" + format_table(["experiment", "mlflow runs"], runs) if runs else ""
    )
