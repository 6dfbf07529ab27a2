"""Metric gates: fail CI when a model's test metrics fall below their floors or regress.

    python -m dlpipe.gates                        reports/models/<model>/eval.json vs gates.floors
    python -m dlpipe.gates --smoke                vs gates.smoke_floors (the `make smoke` run)
    python -m dlpipe.gates --baseline main        also: no metric more than gates.max_drop
                                                  below its value at git revision `main`
    python -m dlpipe.gates --reports DIR --model cnn

Every check is one row of a table (model, metric, value, floor or baseline, margin, PASS/FAIL).
Exit codes: 0 all gates pass, 1 a gate failed, 2 bad input (a missing or broken eval.json, a bad
params.yaml, an unknown revision), reported as one `error:` line.

The baseline is read from git (`git show REV:reports/models/<model>/eval.json`: the evaluate stage's
metrics are `cache: false`, so they are committed like code), exactly the files
`dvc metrics diff REV` compares. A model whose eval.json is not in REV has no baseline row.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlpipe import paths
from dlpipe.config import GatesConfig, load_params
from dlpipe.errors import USER_ERROR_EXIT, DlpipeError
from dlpipe.io import read_json
from dlpipe.tables import format_table

CHANCE_MARGIN = 0.01  # a model without floors must beat its largest class by a point

PASS, FAIL = "PASS", "FAIL"


@dataclass(frozen=True)
class Check:
    """One gate: `value` of `metric` against `limit` (a floor, or baseline - max_drop)."""

    model: str
    metric: str
    value: float
    against: str  # "floor" or "baseline <rev>"
    limit: float
    note: str = ""

    @property
    def margin(self) -> float:
        return self.value - self.limit

    @property
    def passed(self) -> bool:
        # A tiny tolerance so that a value equal to its floor (after JSON rounding) passes.
        return self.margin >= -1e-9


def _metric(values: dict[str, Any], metric: str, source: str) -> float:
    if metric not in values:
        raise DlpipeError(f"{source}: has no {metric!r} (a gate in params.yaml needs it)")
    value = values[metric]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DlpipeError(f"{source}: {metric} is {value!r}, not a finite number")
    return float(value)


def _parse_eval(text: str, source: str) -> dict[str, Any]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise DlpipeError(f"{source}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise DlpipeError(f"{source}: expected a JSON object of metrics")
    return values


def read_eval(reports: Path, model: str) -> dict[str, Any]:
    """`reports/models/<model>/eval.json`; missing or broken is a one-line DlpipeError."""
    path = reports / model / "eval.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DlpipeError(
            f"{path}: missing; run the pipeline first (dvc repro, or make smoke)"
        ) from None
    except OSError as err:
        raise DlpipeError(f"{path}: cannot read ({err.strerror or err})") from None
    return _parse_eval(text, str(path))


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=60)
    except OSError as err:
        raise DlpipeError(f"--baseline needs git: {err}") from None


def resolve_revision(rev: str) -> str:
    """The commit `rev` names (short sha); an unknown revision is a DlpipeError."""
    found = _git("rev-parse", "--verify", "--quiet", "--short", f"{rev}^{{commit}}")
    if found.returncode != 0:
        raise DlpipeError(
            f"--baseline {rev}: unknown git revision (fetch it first, e.g. git fetch origin {rev})"
        )
    return found.stdout.strip()


def read_baseline(rev: str, reports: Path, model: str) -> dict[str, Any] | None:
    """eval.json of `model` at git revision `rev`; None when that revision has none."""
    try:
        relative = (reports.resolve() / model / "eval.json").relative_to(Path.cwd().resolve())
    except ValueError:
        raise DlpipeError(
            f"--baseline: {reports} is outside the current folder; run from the project root"
        ) from None
    shown = _git("show", f"{rev}:./{relative.as_posix()}")
    if shown.returncode != 0:
        return None
    return _parse_eval(shown.stdout, f"{rev}:{relative.as_posix()}")


def collect_checks(
    gates: GatesConfig,
    families: Sequence[str],
    reports: Path,
    smoke: bool = False,
    baseline: str | None = None,
    models: Sequence[str] = (),
    notes: list[str] | None = None,
    chance: Mapping[str, float] | None = None,
) -> list[Check]:
    """Every gate row. Reads every eval.json first, so a missing one fails before any table.
    A model without floors must beat always answering its test split's largest class
    (`chance`: that class's share) by CHANCE_MARGIN, so a user's model is gated with no settings.
    Models that have no eval.json at the baseline get no baseline row, and a line in `notes`."""
    floors = gates.smoke_floors if smoke else gates.floors
    chance = chance or {}
    chosen = [m for m in families if (m in models if models else m in floors or m in chance)]
    unknown = sorted(set(models) - set(families))
    if unknown:
        raise DlpipeError(f"unknown model {unknown[0]!r}; choose from {', '.join(families)}")
    without = [m for m in chosen if not floors.get(m) and m not in chance]
    if without:
        section = "smoke_floors" if smoke else "floors"
        raise DlpipeError(f"gates.{section} in params.yaml has no floor for {without[0]}")
    current = {model: read_eval(reports, model) for model in chosen}
    rev = resolve_revision(baseline) if baseline else None

    checks: list[Check] = []
    for model in chosen:
        source = str(reports / model / "eval.json")
        if not floors.get(model):
            value = _metric(current[model], "test_accuracy", source)
            limit = chance[model] + CHANCE_MARGIN
            note = f"largest class {chance[model]:.4f} + {CHANCE_MARGIN:g}"
            checks.append(Check(model, "test_accuracy", value, "chance", limit, note))
            continue
        for metric, floor in floors[model].items():
            checks.append(
                Check(model, metric, _metric(current[model], metric, source), "floor", floor)
            )
        if rev is None:
            continue
        assert baseline is not None
        before = read_baseline(baseline, reports, model)
        if before is None:
            if notes is not None:
                notes.append(f"{model} has no eval.json at {baseline}: no baseline to compare")
            continue
        for metric in floors[model]:
            old = _metric(before, metric, f"{baseline}:{model}/eval.json")
            checks.append(
                Check(
                    model,
                    metric,
                    _metric(current[model], metric, source),
                    f"baseline {rev}",
                    old - gates.max_drop,
                    f"was {old:.4f}, max drop {gates.max_drop:g}",
                )
            )
    return checks


def largest_class_share(reports: Path, dataset: str) -> float:
    """The share of a dataset's test split in its largest class, from its data card (beside
    the models' reports: `<reports>/../data/<dataset>.json`)."""
    card = read_json(reports.parent / "data" / f"{dataset}.json")
    counts = card["test"]["class_counts"]
    return max(counts) / max(1, sum(counts))


def format_checks(checks: Sequence[Check]) -> str:
    """A fixed-width table, one row per check, failed rows marked."""
    header = ("model", "metric", "value", "against", "limit", "margin", "result", "note")
    rows = [
        (
            c.model,
            c.metric,
            f"{c.value:.4f}",
            c.against,
            f"{c.limit:.4f}",
            f"{c.margin:+.4f}",
            PASS if c.passed else FAIL,
            c.note,
        )
        for c in checks
    ]
    return format_table(header, rows)


def run_check(
    reports: str | Path = paths.MODEL_REPORTS_DIR,
    params: str | Path = "params.yaml",
    smoke: bool = False,
    baseline: str | None = None,
    models: Sequence[str] = (),
) -> int:
    """Print the gate table; 0 when every gate passes, 1 when one fails, 2 on bad input."""
    try:
        loaded = load_params(params)
        notes: list[str] = []
        floors = loaded.gates.smoke_floors if smoke else loaded.gates.floors
        chance = {
            model: largest_class_share(Path(reports), loaded.train[model].dataset)
            for model in loaded.models
            if not floors.get(model)
        }
        checks = collect_checks(
            loaded.gates, loaded.models, Path(reports), smoke, baseline, models, notes, chance
        )
    except DlpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    kind = "smoke floors" if smoke else "floors"
    print(
        f"gates: {Path(reports)}/<model>/eval.json against the {kind} in {params}"
        + (f" and baseline {baseline}" if baseline else "")
    )
    print(format_checks(checks))
    for note in notes:
        print(f"gates: {note}")
    failed = [c for c in checks if not c.passed]
    if failed:
        print(
            f"gates: FAILED {len(failed)} of {len(checks)} checks: "
            + "; ".join(
                f"{c.model} {c.metric} {c.value:.4f} < {c.limit:.4f} ({c.against})" for c in failed
            )
        )
        return 1
    print(f"gates: all {len(checks)} checks passed")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `check` options (also used by `dlpipe check`)."""
    parser = parser or argparse.ArgumentParser(
        prog="dlpipe check", description="Fail when test metrics miss their floors or regress."
    )
    parser.add_argument(
        "--smoke", action="store_true", help="use gates.smoke_floors (the make smoke run)"
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also fail when a metric drops more than gates.max_drop below its value at REV",
    )
    parser.add_argument(
        "--reports", default=str(paths.MODEL_REPORTS_DIR), help="folder of <model>/eval.json"
    )
    parser.add_argument("--params", default="params.yaml", help="where the gates are set")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="check only this model (repeatable); default: every model with floors",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_check(args.reports, args.params, args.smoke, args.baseline, args.model)


if __name__ == "__main__":
    sys.exit(main())
