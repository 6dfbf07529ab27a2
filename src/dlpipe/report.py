"""The report stage: one markdown page comparing the models, built from DVC outputs only.

The models are params.yaml's `train` sections; each one's results are read from
reports/models/<name>/ (what its train and evaluate stages wrote), and each dataset's linear
models from reports/linear/<dataset>.json (their test predictions beside, in
reports/linear/<dataset>/<model>/), so a new model or dataset appears here without a change to
this module.
"""

from __future__ import annotations

import csv
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dlpipe import paths
from dlpipe.config import load_params
from dlpipe.evaluation.paired import PREDICTIONS_FILE, compare_files
from dlpipe.io import atomic_path, read_json
from dlpipe.learning_curves import plot_history
from dlpipe.lineage import git_state
from dlpipe.tables import format_table

LINEAR_WORDS = {
    "tfidf_logreg": "TF-IDF + logistic regression",
    "nbsvm": "NBSVM (naive-Bayes-scaled n-grams + logistic regression)",
    "pixels_logreg": "logistic regression on the pixels",
}
COLUMNS = (
    "model",
    "parameters",
    "epochs",
    "train time (s)",
    "samples/s",
    "val acc",
    "test acc",
    "macro-F1",
    "latency b1 (ms)",
    "latency b256 (ms)",
    "size (MB)",
    "device",
)


def _history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def comparison_row(name: str, train: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    """One row of the comparison table (a linear model has all its numbers in one result)."""
    return [
        name,
        _fmt(train.get("parameters")),
        _fmt(train.get("epochs")),
        _fmt(train.get("train_time_s"), 1),
        _fmt(train.get("samples_per_s"), 0),
        _fmt(train.get("best", {}).get("val_accuracy")),
        _fmt(evaluation.get("test_accuracy")),
        _fmt(evaluation.get("test_macro_f1")),
        _fmt(evaluation.get("latency_b1_ms"), 2),
        _fmt(evaluation.get("latency_b256_ms"), 1),
        _fmt(evaluation.get("model_size_mb"), 2),
        _fmt(train.get("device")),
    ]


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def _environment(devices: set[str]) -> list[str]:
    import torch

    git = git_state()
    return [
        f"- device: {', '.join(sorted(devices))}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda or '-'}), "
        f"DVC {_package_version('dvc')}, MLflow {_package_version('mlflow')}, "
        f"Python {platform.python_version()} on {platform.machine()}",
        f"- git {git['git_sha'][:12]} (uncommitted changes: {git['git_dirty']})",
    ]


def _registry_line(name: str, decision: dict[str, Any]) -> str:
    if not decision.get("registered_model"):
        reason = decision.get("reason")
        return f"- {name}: not registered" + (f" ({reason})" if reason else "")
    verdict = "promoted to `champion`" if decision.get("promoted") else "kept as `candidate`"
    return (
        f"- {name}: `{decision['registered_model']}` v{decision['version']} {verdict} "
        f"({decision.get('metric')} {_fmt(decision.get('value'))}; {decision.get('reason', '')})"
    )


CARD_WARNINGS = {
    "test_texts_also_in_train": "test texts also occur in the training split (leakage)",
    "test_pictures_also_in_train": "test pictures are also in the training split (leakage)",
    "skipped_rows": "rows left out for an empty text",
    "skipped_pictures": "unreadable pictures left out",
}


def _card_lines(dataset: str, card: dict[str, Any]) -> list[str]:
    lines = [f"**{dataset}**"]
    for split in ("train", "val", "test"):
        info = card[split]
        extra = ""
        if "pixel_mean" in info:
            extra = f", pixel mean {info['pixel_mean']}, std {info['pixel_std']}"
        if "length_percentiles" in info:
            pct = info["length_percentiles"]
            extra = (
                f", tokens p50 {pct['p50']} / p95 {pct['p95']}, truncated "
                f"{info['truncation_rate']:.1%}, unk rate {info['unk_rate']:.2e}"
            )
        lines.append(f"- {split}: {info['count']:,} rows, per class {info['class_counts']}{extra}")
    if vectors := card.get("word_vectors"):
        lines.append(
            f"- word vectors: {vectors['dim']}-d PPMI-SVD, window {vectors['window']}, learned "
            f"without labels from {vectors['texts']:,} texts (the training split"
            + (f" and {vectors['unlabeled']:,} unlabeled)" if vectors["unlabeled"] else ")")
        )
    if card.get("image_shape"):
        lines.append(f"- images: {' x '.join(map(str, card['image_shape']))} (channels x H x W)")
    for key, words in CARD_WARNINGS.items():
        if card.get(key):
            lines.append(f"- warning: {card[key]:,} {words}")
    return lines


def _mistakes_line(name: str, models: Path) -> str:
    """A link to the evaluate stage's mistakes file (a figure or a table, by input kind)."""
    found = sorted(models.glob(f"{name}/mistakes/*"))
    if not found:
        return f"- {name}: no mistakes file"
    return f"- {name}: [most confident mistakes]({found[0].relative_to(models.parent)})"


def _linear_lines(
    linear: dict[str, dict[str, dict[str, Any]]],
    results: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    reports: Path,
) -> list[str]:
    """What each deep model buys over the best linear model of its dataset (the highest test
    accuracy of the run's linear models: the strictest yardstick), in points and time, and
    whether the two differ beyond chance on the same test rows (McNemar's exact test)."""
    lines = []
    for dataset, fitted in linear.items():
        top = max(fitted.values(), key=lambda result: float(result["test_accuracy"]))
        accuracy, seconds = top["test_accuracy"], top["train_time_s"]
        lines += [f"## {dataset}: against the best linear model ({top['model']})", ""]
        lines += [
            f"- {LINEAR_WORDS.get(r['model'], r['model'])}: test accuracy "
            f"{r['test_accuracy']:.4f} after {r['train_time_s']:.1f} s of fitting on the same "
            "training rows"
            for r in fitted.values()
        ]
        lines.append("")
        top_predictions = reports / "linear" / dataset / top["model"] / PREDICTIONS_FILE
        for name, (train, evaluation) in results.items():
            if train.get("dataset") != dataset:
                continue
            gain = 100 * (evaluation["test_accuracy"] - accuracy)
            cost = train["train_time_s"] / max(seconds, 1e-9)
            predictions = reports / paths.MODEL_REPORTS_DIR.name / name / PREDICTIONS_FILE
            paired = compare_files(predictions, top_predictions)
            verdict = "beats it" if gain > 0 else "does not beat it"
            evidence = ""
            if paired is not None:
                if not paired.significant:
                    verdict = "ties it"
                evidence = (
                    f" ({'' if paired.significant else 'not '}significant: {paired.only_a:,} "
                    f"test rows only {name} gets right, {paired.only_b:,} only {top['model']}; "
                    f"McNemar p = {paired.p_value:.2g})"
                )
            lines.append(
                f"- {name} {verdict}: {gain:+.2f} points of test accuracy over {top['model']}"
                f"{evidence}, {cost:.0f}x its training time"
            )
        lines.append("")
    return lines


def write_report(
    reports: Path = paths.REPORTS_DIR, params_file: Path = Path("params.yaml")
) -> Path:
    """`reports/summary.md` and `reports/learning_curves.png` from the stages' outputs."""
    models = load_params(params_file).models
    folder = reports / paths.MODEL_REPORTS_DIR.name
    rows: list[list[str]] = []
    histories: dict[str, list[dict[str, float]]] = {}
    devices: set[str] = set()
    registry: list[str] = []
    results: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for name in models:
        train = read_json(folder / name / "train.json")
        evaluation = read_json(folder / name / "eval.json")
        results[name] = train, evaluation
        rows.append(comparison_row(name, train, evaluation))
        histories[name] = _history(folder / name / "history.csv")
        devices.add(f"{train['device']} ({train['precision']})")
        registry.append(_registry_line(name, read_json(folder / name / "registry.json")))
    linear = {p.stem: read_json(p) for p in sorted(reports.glob("linear/*.json"))}
    for fitted in linear.values():
        for result in fitted.values():
            shown = {**result, "best": {"val_accuracy": result.get("val_accuracy")}}
            name = f"{result['model']}@{result['dataset']} (linear)"
            rows.append(comparison_row(name, shown, result))
    curves = reports / "learning_curves.png"
    plot_history(histories, curves)

    lines = [
        "# dlpipe report",
        "",
        "Validation accuracy is the best epoch's (its weights are kept); test metrics are on the",
        "official test splits, used for the first time by the evaluate stage.",
        "",
        format_table(COLUMNS, rows, markdown=True),
        "",
        *_linear_lines(linear, results, reports),
        "## Learning curves",
        "",
        f"![learning curves]({curves.name})",
        "",
        "## Confusion matrices (test split)",
        "",
        *[f"![{n} confusion]({folder.name}/{n}/confusion_matrix.png)" for n in models],
        "",
        "## Mistakes",
        "",
        *[_mistakes_line(name, folder) for name in models],
        "",
        "## Model registry",
        "",
        *registry,
        "",
        "## Data",
        "",
    ]
    for card in sorted((reports / "data").glob("*.json")):
        lines += [*_card_lines(card.stem, read_json(card)), ""]
    lines += ["## Environment", "", *_environment(devices), ""]
    dest = reports / "summary.md"
    with atomic_path(dest) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return dest
