"""`make smoke`: the whole pipeline on small slices of the real data, in a throw-away copy.

    python -m dlpipe.smoke                    (DLPIPE_DATA_MIRROR: where fetch reads the data)
    python -m dlpipe.smoke --keep             keep the temporary workspace for a look afterwards
    python -m dlpipe.smoke --set train.rnn.epochs=2
    python -m dlpipe.smoke --models cnn       only these models' stages (and their datasets')

What it does, in a temporary folder:

1. copies the working tree as a commit would hold it (tracked and untracked-not-ignored files,
   uncommitted edits included; never files under a DVC output), `git init`s and commits it;
2. shrinks params.yaml (`dlpipe.smoke.params`: a few thousand rows, two epochs, each family's
   small model);
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
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dlpipe import paths
from dlpipe.config import Params, parse_params
from dlpipe.errors import USER_ERROR_EXIT, DlpipeError
from dlpipe.smoke.checks import check_dvc_status, check_mlflow, check_outputs
from dlpipe.smoke.params import parse_set
from dlpipe.smoke.workspace import SmokeFailure, build_workspace, isolated_env, workspace


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


def _metrics_lines(repo: Path, params: Params) -> list[str]:
    lines = []
    for model in params.models:
        train = json.loads((repo / paths.MODEL_REPORTS_DIR / model / "train.json").read_text())
        evaluation = json.loads((repo / paths.MODEL_REPORTS_DIR / model / "eval.json").read_text())
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
    tracking_uri: str | None = None,
    models: Sequence[str] = (),
) -> int:
    """The smoke run; 0 when every check holds. `tracking_uri`: log to that store (a shared
    server) instead of a throw-away sqlite file in the workspace; `models`: only these models
    (default: all of params.yaml's)."""
    from dlpipe.gates import run_check

    steps = Steps()
    stage_times: dict[str, float] = {}
    repo: Path | None = None
    code = 1
    try:
        with workspace(keep, tmp_base) as work:
            repo = work / "repo"
            env = isolated_env(repo, work, mirror)
            if tracking_uri:
                env["MLFLOW_TRACKING_URI"] = tracking_uri
            print(f"smoke: workspace {work}; data mirror {mirror or '<none: downloads>'}")
            with steps.step("copy the working tree, shrink params.yaml, commit") as note:
                raw = build_workspace(source, work, env, extra or {}, models)
                params = parse_params(raw, "smoke params")
                note.append(f"{sum(1 for p in repo.rglob('*') if p.is_file())} files")
            with steps.step("dvc repro") as note:
                stage_times = repro(repo, env, timeout)
                note.append(f"{len(stage_times)} stages ran")
            with steps.step("outputs exist and parse") as note:
                note.append(f"{check_outputs(repo, params)} files")
            with steps.step("MLflow runs, logged models, registry") as note:
                check_mlflow(env["MLFLOW_TRACKING_URI"], params, repo)
                families = len(params.models)
                note.append(f"{families} runs, {families} champions")
            with steps.step("dvc status is clean"):
                check_dvc_status(repo, env)
            with steps.step("metric gates (smoke floors)"):
                reports = repo / paths.MODEL_REPORTS_DIR
                if run_check(reports, repo / "params.yaml", smoke=True) != 0:
                    raise SmokeFailure("a smoke gate failed (table above)")
            _save(repo, out, params, steps, stage_times)
            print("smoke: metrics reached")
            print("\n".join(_metrics_lines(repo, params)))
            code = 0
    except SmokeFailure as err:
        print(f"smoke: FAILED: {err}", file=sys.stderr)
    except DlpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        code = USER_ERROR_EXIT
    finally:
        _summary(steps, stage_times, code)
    return code


def _save(
    repo: Path, out: Path, params: Params, steps: Steps, stage_times: dict[str, float]
) -> None:
    """Keep the smoke run's reports and a smoke.json (timings, metrics) under `out`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(repo / "reports", out / "reports")
    shutil.copy2(repo / "params.yaml", out / "params.yaml")
    metrics = {
        model: json.loads((repo / paths.MODEL_REPORTS_DIR / model / "eval.json").read_text())
        for model in params.models
    }
    summary = {
        "steps_s": {name: round(seconds, 1) for name, seconds, _ in steps.done},
        "stages_s": {name: round(seconds, 1) for name, seconds in stage_times.items()},
        "total_s": round(steps.total, 1),
        "test_accuracy": {model: metrics[model]["test_accuracy"] for model in params.models},
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
    parser.add_argument(
        "--tracking-uri",
        help="log to this MLflow store (e.g. a shared server) instead of a temporary one; "
        "give a fresh --set mlflow.experiment=... and registry.name_prefix=... there",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="only these train sections of params.yaml, and the datasets they train on",
    )
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
    return run_smoke(
        source,
        out,
        mirror,
        args.keep,
        extra,
        args.timeout,
        args.tmp,
        args.tracking_uri,
        args.models,
    )


if __name__ == "__main__":
    sys.exit(main())
