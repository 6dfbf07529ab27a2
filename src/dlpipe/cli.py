"""`dlpipe`: predict on raw reviews and digit pictures, and compare the model families' runs.

    dlpipe predict cnn digit.png more.jpg
    dlpipe predict transformer "a review" "another review"
    dlpipe predict rnn --file reviews.txt            (one review per line, blank lines skipped)
    dlpipe predict transformer --model-uri models:/dlpipe-transformer@champion "a review"
    dlpipe compare [--lineage]
    dlpipe check [--smoke] [--baseline REV]
    dlpipe sync                                      (metrics kept while MLflow was down)
    dlpipe sweep cnn -S train.cnn.lr=0.001,0.002 -S train.cnn.batch_size=32,64 --jobs 2
    dlpipe sweep --show [MODEL]                       (dvc exp show, narrowed)
    dlpipe sweep cnn --search 20 -S 'train.cnn.lr=tag(log, interval(0.0005, 0.01))'
    dlpipe sweep --join STUDY                         (another worker on the same search)
    dlpipe sweep --show --study STUDY                 (its trials and their values)

Predictions come from the local DVC outputs (data/models/<name> under the current folder: the
weights and what reading raw inputs needs, such as the tokenizer) or from any MLflow pyfunc URI;
both go through `dlpipe.serving`, so they agree. Every user mistake ends in one `error:` line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pandas as pd

from dlpipe import gates, paths
from dlpipe.config import Params, load_params
from dlpipe.errors import DlpipeError, exit_on_user_error, first_line
from dlpipe.family import model_family
from dlpipe.tables import format_table

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


class _Parser(argparse.ArgumentParser):
    """Usage mistakes become one DlpipeError line, like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise DlpipeError(f"{message} (see `{self.prog} --help`)")


# --- predict -------------------------------------------------------------------------------------


def _pyfunc_predict(model_uri: str, column: str, inputs: list[Any]) -> pd.DataFrame:
    """Load any MLflow pyfunc (e.g. models:/dlpipe-rnn@champion) and predict a one-column frame."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    import mlflow
    from mlflow.exceptions import MlflowException

    from dlpipe.tracking.store import check_store, tracking_uri

    store = tracking_uri()
    if model_uri.startswith(("models:/", "runs:/")):
        check_store(store, reading=True)
    mlflow.set_tracking_uri(store)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise DlpipeError(f"cannot load {model_uri} from {store}: {first_line(err)}") from None
    schema = model.metadata.get_input_schema()
    names = schema.input_names() if schema is not None else [column]
    if column not in names:
        raise DlpipeError(f"{model_uri} takes {names}, not {column!r}: is it the right model?")
    frame = model.predict(pd.DataFrame({column: inputs}))
    if not isinstance(frame, pd.DataFrame) or "label_name" not in frame.columns:
        raise DlpipeError(f"{model_uri}: not a dlpipe raw-input model (log it with serving.py)")
    return frame


def _local_predict(args: argparse.Namespace, inputs: list[Any], names: list[str]) -> pd.DataFrame:
    from dlpipe.serving import Predictor

    model_dir = Path(args.model_dir) if args.model_dir else paths.MODELS_DIR / args.model
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.pt").is_file():
        raise DlpipeError(
            f"{model_dir}: no trained {args.model} model; run `dvc repro train@{args.model}` "
            "first (or pass --model-uri)"
        )
    return Predictor.from_folder(model_dir).predict(inputs, names)


def _records(frame: pd.DataFrame, originals: list[str]) -> list[dict[str, Any]]:
    prob_columns = [c for c in frame.columns if str(c).startswith("prob_")]
    records = []
    for original, (_, row) in zip(originals, frame.iterrows(), strict=True):
        probabilities = {str(c).removeprefix("prob_"): float(row[c]) for c in prob_columns}
        records.append(
            {
                "input": original,
                "label": int(row["label"]),
                "label_name": str(row["label_name"]),
                "probability": float(row["probabilities"][int(row["label"])]),
                "probabilities": probabilities,
            }
        )
    return records


def predict(args: argparse.Namespace) -> int:
    family = model_family(load_params(args.params), args.model)
    inputs, names, shown = family.inputs.read_cli_inputs(args.inputs, args.file)
    if args.model_uri:
        frame = _pyfunc_predict(args.model_uri, family.inputs.column, inputs)
    else:
        frame = _local_predict(args, inputs, names)
    # A text is its own best label in JSON; a picture is named by its path.
    originals = [v if isinstance(v, str) else n for v, n in zip(inputs, names, strict=True)]
    records = _records(frame, originals)
    if args.json:
        print(json.dumps(records, ensure_ascii=False))
    else:
        for short, record in zip(shown, records, strict=True):
            print(f"{short}\t{record['label_name']}\t{record['probability']:.4f}")
    return 0


# --- compare -------------------------------------------------------------------------------------


def _count(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


# key in a compare row, its header, how to show it
COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("model", "model", str),
    ("run_id", "run id", str),
    ("parameters", "params", _count),
    ("epochs", "epochs", lambda v: f"{v:.0f}"),
    ("train_time_s", "train time", _duration),
    ("samples_per_s", "samples/s", lambda v: f"{v:,.0f}"),
    ("val_accuracy", "val acc", lambda v: f"{v:.4f}"),
    ("test_accuracy", "test acc", lambda v: f"{v:.4f}"),
    ("test_macro_f1", "macro-F1", lambda v: f"{v:.4f}"),
    ("over_linear", "vs best linear (pts)", lambda v: f"{v:+.2f}"),
    ("latency_b1_ms", "latency b1 (ms)", lambda v: f"{v:.2f}"),
    ("model_size_mb", "size (MB)", lambda v: f"{v:.2f}"),
    ("device", "device", str),
]

# `dlpipe compare --lineage`: where each run came from (its tags), in place of the metrics.
LINEAGE: list[tuple[str, str, Callable[[Any], str]]] = [
    ("model", "model", str),
    ("run_id", "run id", str),
    ("git_sha", "git", lambda v: str(v)[:10]),
    ("git_dirty", "code edited", str),
    ("params_dirty", "params edited", str),
    ("dvc_exp_name", "dvc experiment", str),
    ("dvc_data_md5", "data (dvc md5)", lambda v: str(v)[:12]),
    ("dvc_train_lock", "train@ lock", str),
]


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """step -> value of an epoch metric; a resumed training's repeated step keeps its last value."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {int(m.step): float(m.value) for m in history}


def compare_row(client: MlflowClient, experiment_id: str, model: str) -> dict[str, Any]:
    """The latest FINISHED run of one model (or linear model, `<name>@<dataset>`), as the
    values `dlpipe compare` shows."""
    row: dict[str, Any] = dict.fromkeys(key for key, _, _ in COLUMNS + LINEAGE)
    row["model"] = model
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.model = '{model}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return row
    run = runs[0]
    metrics, run_id = run.data.metrics, run.info.run_id
    row["run_id"], row["device"] = run_id, run.data.tags.get("device")
    row["dataset"], row["linear"] = run.data.tags.get("dataset"), run.data.tags.get("linear")
    for key, _, _ in LINEAGE[2:]:
        row[key] = run.data.tags.get(key)
    for key in ("parameters", "test_accuracy", "test_macro_f1", "latency_b1_ms", "model_size_mb"):
        row[key] = metrics.get(key)
    val = _history(client, run_id, "val_accuracy")
    best = metrics.get("best_epoch")
    row["epochs"] = max(val) if val else None
    row["val_accuracy"] = val.get(int(best)) if best is not None else None
    if row["val_accuracy"] is None:
        row["val_accuracy"] = metrics.get("val_accuracy")
    times = _history(client, run_id, "epoch_time_s")
    row["train_time_s"] = sum(times.values()) if times else metrics.get("train_time_s")
    speeds = _history(client, run_id, "samples_per_s")
    row["samples_per_s"] = sum(speeds.values()) / len(speeds) if speeds else None
    return row


def format_compare(rows: list[dict[str, Any]], lineage: bool = False) -> str:
    """Aligned columns (the metrics, or with `lineage` the tags saying where each run came
    from); a missing or non-finite value is `-`."""

    def cell(value: Any, fmt: Callable[[Any], str]) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return fmt(value)

    columns = LINEAGE if lineage else COLUMNS
    header = [header for _, header, _ in columns]
    return format_table(header, [[cell(row.get(k), fmt) for k, _, fmt in columns] for row in rows])


def compared(params: Params) -> list[str]:
    """The models `dlpipe compare` shows: params.yaml's, then each dataset's linear models."""
    from dlpipe.datasets import get_format
    from dlpipe.linear import models_for, run_name

    linear = [
        run_name(model.NAME, dataset)
        for dataset, entry in params.datasets.items()
        for model in models_for(get_format(entry.format).inputs.name)
    ]
    return [*params.models, *linear]


def over_best_linear(rows: list[dict[str, Any]]) -> None:
    """Each deep model's test-accuracy points over the best linear model of its dataset."""
    for row in rows:
        linear = [
            r["test_accuracy"]
            for r in rows
            if r.get("linear") == "true"
            and r.get("dataset") == row.get("dataset")
            and r["test_accuracy"] is not None
        ]
        if row.get("linear") != "true" and linear and row["test_accuracy"] is not None:
            row["over_linear"] = 100 * (row["test_accuracy"] - max(linear))


def compare(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from dlpipe.tracking.store import check_store, tracking_uri

    params = load_params(args.params)
    experiment = args.experiment or params.mlflow.experiment
    store = tracking_uri()
    check_store(store, reading=True)
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise DlpipeError(f"no experiment {experiment!r} in {store}; train a model first")
    rows = [compare_row(client, found.experiment_id, name) for name in compared(params)]
    over_best_linear(rows)
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_compare(rows, args.lineage))
    return 0


# --- sync ----------------------------------------------------------------------------------------


def sync(args: argparse.Namespace) -> int:
    """Deliver the metrics trainings kept on disk while MLflow was unreachable, and end as
    KILLED the runs that killed processes left RUNNING."""
    from mlflow.tracking import MlflowClient

    from dlpipe.tracking.orphans import end_orphans
    from dlpipe.tracking.spool import spool_dir
    from dlpipe.tracking.spool import sync as deliver
    from dlpipe.tracking.store import check_store, tracking_uri

    params = load_params(args.params)
    lines = deliver() or [f"nothing to deliver ({spool_dir()} holds no undelivered metrics)"]
    uri = tracking_uri()
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file():
        check_store(uri, reading=True)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(params.mlflow.experiment)
        if experiment is not None:
            ended = end_orphans(
                client, experiment.experiment_id, None, set(), params.mlflow.orphan_after_s
            )
            lines += ended or ["no run left RUNNING by a killed process"]
    for line in lines:
        print(line)
    return 0


# --- sweep ---------------------------------------------------------------------------------------


def sweep(args: argparse.Namespace) -> int:
    """`dlpipe sweep`: a grid of queued DVC experiments (`dlpipe.sweep`), a search shared by
    workers (`dlpipe.search`), or a table of either."""
    from dlpipe import search
    from dlpipe import sweep as sweeps

    if args.show:
        if args.grid:
            raise DlpipeError("--show takes no -S (it shows the experiments there are)")
        if args.study:
            print(search.show_table(args.study, search.storage_url(args.storage)))
            return 0
        params = load_params(args.params)
        if args.model:
            model_family(params, args.model)
        print(sweeps.show_table(params, args.model))
        return 0
    if args.join:
        if args.model or args.grid or args.search:
            raise DlpipeError("--join STUDY takes no MODEL, -S or --search: the study has them")
        return search.work(args.join, search.storage_url(args.storage), args.params)
    if not args.model or not args.grid:
        raise DlpipeError("give a MODEL and at least one -S KEY=V1,V2 (see `dlpipe sweep --help`)")
    if args.search is None:
        return sweeps.run_sweep(args.model, args.grid, args.jobs, args.params)
    if args.jobs != 1:
        raise DlpipeError("a search runs one trial at a time: start more workers with --join")
    url = search.storage_url(args.storage)
    study = search.create_study(
        args.model,
        args.grid,
        args.search,
        args.params,
        url,
        name=args.study,
        pruner=args.pruner,
        startup_trials=args.startup_trials,
        warmup_epochs=args.warmup_epochs,
        heartbeat_s=args.heartbeat_s,
    )
    return search.work(study, url, args.params)


# --- entry point ---------------------------------------------------------------------------------


def check(args: argparse.Namespace) -> int:
    """`dlpipe check`: exit 1 when a gate fails (see `dlpipe.gates`)."""
    return gates.run_check(args.reports, args.params, args.smoke, args.baseline, args.model)


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for --help and usage errors) and one parser per subcommand."""
    parser = _Parser(prog="dlpipe", description=(__doc__ or "").split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("predict", help="label raw reviews or digit images")
    p.add_argument("model", metavar="MODEL", help="a model (a train.<name> in params.yaml)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="texts, or image paths")
    p.add_argument("--file", help="text models: a UTF-8 file with one text per line")
    p.add_argument("--params", default="params.yaml", help="default params.yaml")
    p.add_argument("--model-uri", help="an MLflow pyfunc URI instead of the local DVC outputs")
    p.add_argument("--model-dir", help="the trained model folder (default data/models/MODEL)")
    p.add_argument("--json", action="store_true", help="print JSON records")
    p.set_defaults(handler=predict)

    c = commands.add_parser(
        "compare", help="the latest finished run of each model and of each dataset's linear models"
    )
    c.add_argument("--experiment", help="default: mlflow.experiment in params.yaml")
    c.add_argument("--params", default="params.yaml", help="default params.yaml")
    c.add_argument("--json", action="store_true", help="print JSON records")
    c.add_argument(
        "--lineage",
        action="store_true",
        help="where each run came from: git commit, edited code or params, DVC experiment, "
        "data and train stage hashes",
    )
    c.set_defaults(handler=compare)

    g = commands.add_parser("check", help="metric gates: floors, and regressions vs a git revision")
    gates.build_parser(g)
    g.set_defaults(handler=check)

    s = commands.add_parser(
        "sync", help="deliver metrics kept while MLflow was unreachable; end orphaned runs"
    )
    s.add_argument("--params", default="params.yaml", help="default params.yaml")
    s.set_defaults(handler=sync)
    w = commands.add_parser(
        "sweep", help="a grid or an Optuna search of one model's params as DVC experiments"
    )
    w.add_argument("model", nargs="?", metavar="MODEL", help="the model (train.MODEL) it trains")
    w.add_argument(
        "-S",
        "--set-param",
        dest="grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one axis of the grid, in `dvc exp run -S` syntax (train.MODEL.* or evaluate.*)",
    )
    w.add_argument("-j", "--jobs", type=int, default=1, help="trials run at once (default 1)")
    w.add_argument("--show", action="store_true", help="print the experiments, one screen")
    w.add_argument(
        "--search",
        type=int,
        metavar="N",
        help="an Optuna search of N trials (TPE, pruned on the per-epoch validation metric) "
        "instead of the grid: -S takes choice(...), range(...), interval(...)",
    )
    w.add_argument("--study", help="the search's name (default MODEL-DATE-TIME); with --show")
    w.add_argument("--join", metavar="STUDY", help="run trials of an existing search here")
    w.add_argument(
        "--storage",
        metavar="URL",
        help="the study's database URL (default $DLPIPE_SEARCH_STORAGE, else .dlpipe/search.db)",
    )
    w.add_argument("--pruner", default="median", metavar="KIND", help="median (default), halving")
    w.add_argument(
        "--startup-trials",
        type=int,
        default=3,
        metavar="N",
        help="median: no pruning before N trials complete (default 3)",
    )
    w.add_argument(
        "--warmup-epochs", type=int, default=0, metavar="N", help="epochs never pruned (default 0)"
    )
    w.add_argument(
        "--heartbeat-s",
        type=int,
        default=60,
        metavar="S",
        help="a worker silent for twice this long has its trial marked failed (default 60)",
    )
    w.add_argument("--params", default="params.yaml", help="default params.yaml")
    w.set_defaults(handler=sweep)
    return parser, {"predict": p, "compare": c, "check": g, "sync": s, "sweep": w}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options may come anywhere (`predict rnn "a review" --json "another"`): each subcommand is
    parsed intermixed, which argparse cannot do through subparsers."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parsers()
    if args and args[0] in commands:
        return commands[args[0]].parse_intermixed_args(args[1:])
    return parser.parse_args(args)  # --help, or one usage error line


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; expected failures become one DlpipeError line (exit code 2)."""
    from mlflow.exceptions import MlflowException
    from PIL import UnidentifiedImageError

    args = parse_args(argv)
    try:
        return int(args.handler(args))
    except DlpipeError:
        raise
    except BrokenPipeError:  # `dlpipe predict ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UnidentifiedImageError as err:
        raise DlpipeError(f"not an image: {first_line(err)}") from None
    except UnicodeDecodeError as err:
        raise DlpipeError(f"not UTF-8 text: {err.reason}") from None
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        raise DlpipeError(f"{where}{err.strerror or first_line(err)}") from None
    except MlflowException as err:
        raise DlpipeError(f"MLflow: {first_line(err)}") from None


if __name__ == "__main__":
    raise SystemExit(main())
