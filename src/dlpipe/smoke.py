"""`make smoke`: the whole pipeline on small slices of the real data, in a throw-away copy.

    python -m dlpipe.smoke                    (DLPIPE_DATA_MIRROR: where fetch reads the data)
    python -m dlpipe.smoke --keep             keep the temporary workspace for a look afterwards
    python -m dlpipe.smoke --set train.rnn.epochs=2

What it does, in a temporary folder:

1. copies the working tree as a commit would hold it (tracked and untracked-not-ignored files,
   uncommitted edits included; never files under a DVC output), `git init`s and commits it;
2. shrinks params.yaml with `SMOKE_PARAMS` (a few thousand rows, one epoch, small models);
3. runs the real `dvc repro` (DVC cache in the temp folder) with MLflow logging to a temporary
   sqlite store;
4. checks that every output every stage declares exists and parses (JSON, CSV, PNG, npz, ...),
   that each model's MLflow run has its params, per-epoch `train_loss`/`val_accuracy`,
   `test_accuracy` and a logged model, that the registry holds `dlpipe-<model>@champion`, and
   that `dvc status` is clean;
5. runs the smoke metric gates (`gates.smoke_floors` in params.yaml, see `dlpipe.gates`).

The reports are copied to `--out` (default `.dlpipe/smoke/`, with `smoke.json`: timings and
metrics) for CI to show or gate on. Exit 0 when everything holds, 1 when a check fails, 2 on a
usage or environment problem.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from dlpipe.config import DATASET_OF_MODEL, MODEL_NAMES, Params, parse_params, train_config
from dlpipe.errors import USER_ERROR_EXIT, DlpipeError

# Merged into the copy's params.yaml. Small enough for about two minutes on two busy CPU cores,
# big enough that every model must learn for real to pass `gates.smoke_floors`. What sets the
# learning budget (data, epochs, batch size, learning rate, model size) is pinned here, so that
# retuning the full-data training in params.yaml does not move the smoke metrics; everything else
# (optimiser, schedule, pooling, ...) is the project's. Two epochs, not one: the per-epoch MLflow
# history, the best-epoch choice and the LR schedule are exercised across epochs, and one epoch
# left the GRU near chance.
SMOKE_PARAMS: dict[str, Any] = {
    "prepare": {
        "mnist": {"max_train": 6000, "max_test": 2000, "val_size": 1000},
        "imdb": {
            "max_train": 8000,
            "max_test": 2000,
            "val_size": 1000,
            "vocab_size": 2000,
            "max_len": 128,
        },
    },
    "train": {
        "cnn": {"epochs": 2, "batch_size": 64, "lr": 0.001},
        "rnn": {
            "epochs": 2,
            "batch_size": 64,
            "lr": 0.01,
            "model": {"embed_dim": 64, "hidden_size": 32, "dropout": 0.1},
        },
        "transformer": {
            "epochs": 2,
            "batch_size": 64,
            "lr": 0.002,
            "model": {"d_model": 32, "heads": 2, "layers": 1, "ff_dim": 64, "max_len": 128},
        },
    },
    "evaluate": {"latency_repeats": 3},
}

EXPECTED_STAGES = (
    "fetch",
    *(f"prepare@{d}" for d in ("mnist", "imdb")),
    *(f"train@{m}" for m in MODEL_NAMES),
    *(f"evaluate@{m}" for m in MODEL_NAMES),
    "report",
)
CHAMPION = "champion"


class SmokeFailure(Exception):
    """A check of the smoke run failed (exit 1)."""


# --- params -----------------------------------------------------------------------------------


def merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """`base` with `updates` merged in, nested mappings key by key (neither is modified)."""
    merged = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`["train.rnn.epochs=2"]` -> `{"train": {"rnn": {"epochs": 2}}}` (values are YAML)."""
    updates: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DlpipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.cnn.epochs=2")
        node = updates
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return updates


def smoke_params(raw: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The project's params with the smoke overrides (and `extra`) merged in, validated."""
    merged = merge(merge(raw, SMOKE_PARAMS), extra or {})
    parse_params(merged, "smoke params")
    return merged


# --- the workspace ----------------------------------------------------------------------------


def _run(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> str:
    """Run a command; its stdout, or a SmokeFailure with its output when it fails."""
    result = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise SmokeFailure(f"`{' '.join(args)}` exited {result.returncode}:\n{output}")
    return result.stdout


def declared_outputs(root: Path) -> dict[str, list[Any]]:
    """{stage address: its `Output`s} of the dvc.yaml in `root`, foreach stages expanded."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.name: list(stage.outs) for stage in repo.index.stages}


def _under(path: str, folders: Sequence[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def workspace_files(source: Path) -> tuple[list[str], list[str]]:
    """(files a commit of `source` would hold now, tracked files skipped as DVC outputs)."""
    if shutil.which("git") is None:
        raise DlpipeError("git is not installed")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        raise DlpipeError(f"{source}: not a git checkout ({listed.stderr.strip()})")
    files = sorted({f for f in listed.stdout.split("\0") if f and (source / f).is_file()})
    outs = [str(o.def_path) for stage in declared_outputs(source).values() for o in stage]
    return [f for f in files if not _under(f, outs)], [f for f in files if _under(f, outs)]


def isolated_env(work: Path, mirror: str | None) -> dict[str, str]:
    """The environment of every command in the workspace: this venv first on PATH, the copy's
    src importable, MLflow in the workspace, DVC and git kept from the user's configs."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(work / "repo" / "src"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(work / "dvc-site-cache"),
        "DVC_GLOBAL_CONFIG_DIR": str(work / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(work / "dvc-system"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "dlpipe smoke",
        "GIT_AUTHOR_EMAIL": "smoke@dlpipe.invalid",
        "GIT_COMMITTER_NAME": "dlpipe smoke",
        "GIT_COMMITTER_EMAIL": "smoke@dlpipe.invalid",
        "MPLBACKEND": "Agg",
    }
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT", "GIT_DIR", "GIT_WORK_TREE"):
        env.pop(var, None)
    # One compute thread per process unless the caller chose: on a busy 2-core machine two
    # OpenMP threads made the GRU's training ~100x slower (spinning workers starve each other).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    if mirror:
        env["DLPIPE_DATA_MIRROR"] = mirror
    else:
        env.pop("DLPIPE_DATA_MIRROR", None)
    return env


def _share_downloads(source: Path, repo: Path) -> None:
    """Let fetch reuse (and fill) the checkout's download cache, `.dlpipe/downloads`: without a
    data mirror the IMDB archive is then downloaded once, not once per smoke run. Best effort."""
    shared = source / ".dlpipe" / "downloads"
    try:
        shared.mkdir(parents=True, exist_ok=True)
        (repo / ".dlpipe").mkdir(exist_ok=True)
        (repo / ".dlpipe" / "downloads").symlink_to(shared, target_is_directory=True)
    except OSError as err:
        print(f"smoke: not sharing {shared} ({err}); fetch downloads into the workspace")


def build_workspace(
    source: Path, work: Path, env: dict[str, str], extra: dict[str, Any]
) -> dict[str, Any]:
    """Copy the working tree into `work/repo`, shrink its params, commit; its params."""
    files, skipped = workspace_files(source)
    if skipped:
        print(
            f"smoke: warning: {len(skipped)} tracked file(s) lie under DVC outputs and were not "
            f"copied (they belong in the DVC cache, not git), e.g. {skipped[0]}",
            file=sys.stderr,
        )
    repo = work / "repo"
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, repo / name, follow_symlinks=True)
    if not (repo / "dvc.yaml").is_file() or not (repo / "params.yaml").is_file():
        raise DlpipeError(f"{source}: no dvc.yaml / params.yaml (run from the project root)")
    raw = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8")) or {}
    params = smoke_params(raw, extra)
    (repo / "params.yaml").write_text(
        "# make smoke: the project's params.yaml with dlpipe.smoke.SMOKE_PARAMS merged in\n"
        + yaml.safe_dump(params, sort_keys=False),
        encoding="utf-8",
    )
    _share_downloads(source, repo)
    _run(["git", "init", "-q"], repo, env)
    if not (repo / ".dvc" / "config").is_file():
        _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "smoke"], repo, env)
    return params


# --- running dvc repro --------------------------------------------------------------------------


def repro(repo: Path, env: dict[str, str], timeout: float) -> dict[str, float]:
    """`dvc repro`, its output streamed (indented); seconds spent per stage."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: a timeout stops the stages too
    )
    assert process.stdout is not None

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, stop)  # also when a stage hangs without output
    timer.start()
    timings: dict[str, float] = {}
    current: str | None = None
    start = stage_start = time.perf_counter()
    try:
        for line in process.stdout:
            print(f"  | {line.rstrip()}", flush=True)
            if line.startswith("Running stage '"):
                now = time.perf_counter()
                if current is not None:
                    timings[current] = now - stage_start
                current, stage_start = line.split("'")[1], now
    except BaseException:  # Ctrl-C: the stages are not in the terminal's process group
        stop()
        raise
    finally:
        timer.cancel()
    if time.perf_counter() - start > timeout:
        process.wait()
        raise SmokeFailure(f"dvc repro took over {timeout:.0f}s; stopped (--timeout)")
    code = process.wait()
    if current is not None:
        timings[current] = time.perf_counter() - stage_start
    if code != 0:
        raise SmokeFailure(f"dvc repro exited {code} (its output is above)")
    return timings


# --- checking the outputs -----------------------------------------------------------------------


def _check_csv(path: Path) -> None:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2 or not all(rows[0]) or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("expected a header and at least one row of the same width")


def _check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        if image.format != "PNG" or min(image.size) < 10:
            raise ValueError(f"not a real PNG image ({image.format}, {image.size})")


def _check_npz(path: Path) -> None:
    import numpy as np

    with np.load(path, allow_pickle=False) as arrays:
        if not arrays.files or any(arrays[key].size == 0 for key in arrays.files):
            raise ValueError("no arrays, or an empty one")


def _check_json(path: Path) -> None:
    if not json.loads(path.read_text(encoding="utf-8")):
        raise ValueError("empty JSON")


def _check_text(path: Path) -> None:
    if not path.read_text(encoding="utf-8").strip():
        raise ValueError("empty")


def _check_gzip(path: Path) -> None:
    with gzip.open(path, "rb") as handle:
        while handle.read(1 << 20):
            pass


def _check_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    if pq.read_metadata(path).num_rows == 0:
        raise ValueError("no rows")


def _check_torch(path: Path) -> None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not state:
        raise ValueError("empty state dict")


def _check_any(path: Path) -> None:
    if path.stat().st_size == 0:
        raise ValueError("empty file")


CHECKERS: dict[str, Callable[[Path], None]] = {
    ".json": _check_json,
    ".csv": _check_csv,
    ".png": _check_png,
    ".npz": _check_npz,
    ".md": _check_text,
    ".txt": _check_text,
    ".gz": _check_gzip,
    ".parquet": _check_parquet,
    ".pt": _check_torch,
}


def check_file(path: Path) -> None:
    """Raise ValueError (or the parser's own error) unless `path` parses as its suffix says."""
    CHECKERS.get(path.suffix.lower(), _check_any)(path)


def check_outputs(repo: Path) -> int:
    """Every output of every stage in dvc.yaml exists and parses; the number of files checked."""
    stages = declared_outputs(repo)
    missing_stages = sorted(set(EXPECTED_STAGES) - set(stages))
    if missing_stages:
        raise SmokeFailure(f"dvc.yaml lacks stage(s) {', '.join(missing_stages)}")
    problems, checked = [], 0
    for stage, outs in stages.items():
        for out in outs:
            declared = repo / str(out.def_path)
            if declared.is_dir():
                files = sorted(p for p in declared.rglob("*") if p.is_file())
                if not files:
                    problems.append(f"{stage}: {out.def_path}/ is empty")
            elif declared.is_file():
                files = [declared]
            else:
                problems.append(f"{stage}: {out.def_path} was not written")
                continue
            for path in files:
                checked += 1
                try:
                    check_file(path)
                except Exception as err:
                    rel = path.relative_to(repo)
                    problems.append(f"{stage}: {rel} does not parse ({type(err).__name__}: {err})")
    if problems:
        raise SmokeFailure("outputs:\n  " + "\n  ".join(problems))
    return checked


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def check_mlflow(uri: str, params: Params, repo: Path) -> dict[str, str]:
    """Each model's run: params, per-epoch history, test metrics, a logged model, the champion
    alias in the registry. Returns {model: run id}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    if experiment is None:
        raise SmokeFailure(f"MLflow: no experiment {params.mlflow.experiment!r} in {uri}")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_family: dict[str, list[Any]] = {}
    for run in runs:
        by_family.setdefault(run.data.tags.get("model_family", "?"), []).append(run)
    problems: list[str] = []
    if sorted(by_family) != sorted(MODEL_NAMES) or len(runs) != len(MODEL_NAMES):
        counts = {family: len(found) for family, found in by_family.items()}
        raise SmokeFailure(f"MLflow: expected one run per model, found {counts}")
    run_ids: dict[str, str] = {}
    for model in MODEL_NAMES:
        run = by_family[model][0]
        run_ids[model] = run_id = run.info.run_id
        config = train_config(params, model)
        where = f"MLflow run {model} ({run_id[:8]})"
        if run.info.status != "FINISHED":
            problems.append(f"{where}: status {run.info.status}")
        expected = {
            "seed": str(params.seed),
            "model.family": model,
            "train.epochs": str(config.epochs),
            "train.lr": str(config.lr),
            "train.batch_size": str(config.batch_size),
            "data.name": DATASET_OF_MODEL[model],
        }
        for key, value in expected.items():
            if run.data.params.get(key) != value:
                problems.append(
                    f"{where}: param {key} is {run.data.params.get(key)!r}, expected {value!r}"
                )
        epochs = int(json.loads((repo / "reports" / model / "train.json").read_text())["epochs"])
        for key in ("train_loss", "val_accuracy"):
            history = client.get_metric_history(run_id, key)
            steps = sorted(m.step for m in history)
            if steps != list(range(1, epochs + 1)) or not _finite([m.value for m in history]):
                problems.append(f"{where}: {key} logged at steps {steps}, expected 1..{epochs}")
        evaluation = json.loads((repo / "reports" / model / "eval.json").read_text())
        logged = run.data.metrics.get("test_accuracy")
        if logged is None or abs(logged - evaluation["test_accuracy"]) > 1e-6:
            problems.append(
                f"{where}: test_accuracy {logged} (eval.json: {evaluation['test_accuracy']})"
            )
        models = client.search_logged_models(
            experiment_ids=[experiment.experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
        if not any(str(m.status).endswith("READY") for m in models):
            problems.append(f"{where}: no logged model ({len(models)} found, none READY)")
        name = f"{params.registry.name_prefix}{model}"
        if params.registry.enabled:
            try:
                champion = client.get_model_version_by_alias(name, CHAMPION)
            except Exception as err:
                problems.append(f"registry: {name}@{CHAMPION} missing ({type(err).__name__})")
            else:
                if champion.run_id != run_id:
                    problems.append(f"registry: {name}@{CHAMPION} is from run {champion.run_id}")
    if problems:
        raise SmokeFailure("MLflow:\n  " + "\n  ".join(problems))
    return run_ids


def check_dvc_status(repo: Path, env: dict[str, str]) -> None:
    status = json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], repo, env) or "{}")
    if status:
        raise SmokeFailure(f"`dvc status` after repro is not clean: {json.dumps(status)}")


# --- the run ------------------------------------------------------------------------------------


@contextmanager
def workspace(keep: bool, base: str | None) -> Iterator[Path]:
    """A temporary folder, removed afterwards unless `keep` or the block failed."""
    work = Path(tempfile.mkdtemp(prefix="dlpipe-smoke-", dir=base)).resolve()
    ok = False
    try:
        yield work
        ok = True
    finally:
        if keep or not ok:
            print(f"smoke: workspace kept at {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


class Steps:
    """Timed steps for the summary."""

    def __init__(self) -> None:
        self.done: list[tuple[str, float, str]] = []
        self.start = time.perf_counter()

    @contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        note: list[str] = []
        print(f"smoke: {name} ...", flush=True)
        began = time.perf_counter()
        try:
            yield note
        except BaseException:
            self.done.append((name, time.perf_counter() - began, "FAIL"))
            raise
        self.done.append((name, time.perf_counter() - began, "; ".join(note) or "ok"))

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def _metrics_lines(repo: Path) -> list[str]:
    lines = []
    for model in MODEL_NAMES:
        train = json.loads((repo / "reports" / model / "train.json").read_text())
        evaluation = json.loads((repo / "reports" / model / "eval.json").read_text())
        lines.append(
            f"  {model:<12} val_accuracy {train['best']['val_accuracy']:.4f}  test_accuracy "
            f"{evaluation['test_accuracy']:.4f}  macro-F1 {evaluation['test_macro_f1']:.4f}  "
            f"train {train['train_time_s']:.1f}s on {train['device']} ({train['precision']})"
        )
    return lines


def run_smoke(
    source: Path,
    out: Path,
    mirror: str | None,
    keep: bool = False,
    extra: dict[str, Any] | None = None,
    timeout: float = 1200,
    tmp_base: str | None = None,
) -> int:
    from dlpipe.gates import run_check

    steps = Steps()
    stage_times: dict[str, float] = {}
    repo: Path | None = None
    code = 1
    try:
        with workspace(keep, tmp_base) as work:
            repo = work / "repo"
            env = isolated_env(work, mirror)
            print(f"smoke: workspace {work}; data mirror {mirror or '<none: downloads>'}")
            with steps.step("copy the working tree, shrink params.yaml, commit") as note:
                raw = build_workspace(source, work, env, extra or {})
                params = parse_params(raw, "smoke params")
                note.append(f"{sum(1 for p in repo.rglob('*') if p.is_file())} files")
            with steps.step("dvc repro") as note:
                stage_times = repro(repo, env, timeout)
                note.append(f"{len(stage_times)} stages ran")
            with steps.step("outputs exist and parse") as note:
                note.append(f"{check_outputs(repo)} files")
            with steps.step("MLflow runs, logged models, registry") as note:
                check_mlflow(env["MLFLOW_TRACKING_URI"], params, repo)
                note.append(f"{len(MODEL_NAMES)} runs, {len(MODEL_NAMES)} champions")
            with steps.step("dvc status is clean"):
                check_dvc_status(repo, env)
            with steps.step("metric gates (smoke floors)"):
                if run_check(repo / "reports", repo / "params.yaml", smoke=True) != 0:
                    raise SmokeFailure("a smoke gate failed (table above)")
            _save(repo, out, steps, stage_times)
            print("smoke: metrics reached")
            print("\n".join(_metrics_lines(repo)))
            code = 0
    except SmokeFailure as err:
        print(f"smoke: FAILED: {err}", file=sys.stderr)
    except DlpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        code = USER_ERROR_EXIT
    finally:
        _summary(steps, stage_times, code)
    return code


def _save(repo: Path, out: Path, steps: Steps, stage_times: dict[str, float]) -> None:
    """Keep the smoke run's reports and a smoke.json (timings, metrics) under `out`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(repo / "reports", out / "reports")
    shutil.copy2(repo / "params.yaml", out / "params.yaml")
    metrics = {
        model: json.loads((repo / "reports" / model / "eval.json").read_text())
        for model in MODEL_NAMES
    }
    summary = {
        "steps_s": {name: round(seconds, 1) for name, seconds, _ in steps.done},
        "stages_s": {name: round(seconds, 1) for name, seconds in stage_times.items()},
        "total_s": round(steps.total, 1),
        "test_accuracy": {model: metrics[model]["test_accuracy"] for model in MODEL_NAMES},
    }
    (out / "smoke.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"smoke: reports and smoke.json saved in {out}")


def _summary(steps: Steps, stage_times: dict[str, float], code: int) -> None:
    print("\n== smoke summary")
    for name, seconds, note in steps.done:
        print(f"  {seconds:7.1f}s  {name}: {note}")
    if stage_times:
        print("  stages: " + ", ".join(f"{s} {t:.0f}s" for s, t in stage_times.items()))
    verdict = "PASSED" if code == 0 else "FAILED"
    print(f"== smoke {verdict} in {steps.total:.0f}s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlpipe.smoke",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--project", default=".", help="the checkout to copy (default: .)")
    parser.add_argument("--out", default=".dlpipe/smoke", help="where reports are kept")
    parser.add_argument(
        "--mirror",
        default=os.environ.get("DLPIPE_DATA_MIRROR"),
        help="data mirror for fetch (default: $DLPIPE_DATA_MIRROR)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more params override, e.g. train.rnn.epochs=2",
    )
    parser.add_argument("--timeout", type=float, default=1200, help="dvc repro limit (s)")
    parser.add_argument("--tmp", default=None, help="parent of the temporary workspace")
    args = parser.parse_args(argv)
    source = Path(args.project).resolve()
    mirror = args.mirror
    try:
        extra = parse_set(args.set)
        if mirror and "://" not in mirror:
            mirror = str(Path(mirror).expanduser().resolve())
            if not Path(mirror).is_dir():
                raise DlpipeError(f"data mirror {args.mirror}: no such folder")
    except DlpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    out = Path(args.out)
    out = out if out.is_absolute() else source / out
    return run_smoke(source, out, mirror, args.keep, extra, args.timeout, args.tmp)


if __name__ == "__main__":
    sys.exit(main())
