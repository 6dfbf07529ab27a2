"""scripts/bench.py's arithmetic: the figures, ratios and target verdicts it writes from the
programs' records (the programs themselves run in `make bench`, not here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from support.tiny import TinyProject

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


def record(times: list[float], heldout: list[float], test: float, samples: int) -> dict[str, Any]:
    return {
        "program": "p",
        "train_samples": samples,
        "epoch_times_s": times,
        "heldout": "test",
        "heldout_accuracy": heldout,
        "test_accuracy": test,
        "stage_wall_s": sum(times) + 5,
        "peak_rss_mib": 100,
    }


def rows_of(bench: Any, **records: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {name: bench.summarise(name, rec) for name, rec in records.items()}
    bench.add_ratios(rows)
    return rows


def test_figures_of_one_program(bench: Any) -> None:
    row = bench.summarise("keras-cnn", record([10.0, 30.0, 20.0], [0.90, 0.95, 0.93], 0.93, 600))
    assert row["median_epoch_s"] == 20.0
    assert row["train_time_s"] == 60.0
    assert row["samples_per_s"] == 30  # 600 samples x 3 epochs / 60 s
    assert row["time_to_best_s"] == 40.0  # best held-out accuracy after epoch 2
    assert (row["dataset"], row["kind"], row["epochs"]) == ("mnist", "cnn", 3)


def test_ratios_are_to_the_first_program_of_each_kind_and_points_to_the_best_linear(
    bench: Any,
) -> None:
    rows = rows_of(
        bench,
        **{
            "keras-cnn": record([40.0], [0.99], 0.99, 60000),
            "cnn": record([10.0], [0.99], 0.993, 55000),
            "tfidf": record([8.0], [0.87], 0.86, 25000),
            "nbsvm": record([9.0], [0.87], 0.87, 25000),
            "keras-bilstm": record([100.0], [0.85], 0.85, 25000),
            "rnn": record([50.0], [0.89], 0.8925, 20000),
        },
    )
    assert rows["cnn"]["time_vs_yardstick"] == 0.25 and rows["cnn"]["yardstick"] == "keras-cnn"
    assert rows["rnn"]["time_vs_yardstick"] == 0.5 and rows["rnn"]["yardstick"] == "keras-bilstm"
    assert rows["rnn"]["points_over_linear"] == 2.25  # over nbsvm, the better linear model
    assert rows["keras-bilstm"]["points_over_linear"] == -2.0
    assert "points_over_linear" not in rows["cnn"]  # another dataset


@pytest.mark.parametrize(
    ("cnn_acc", "cnn_time", "met"),
    [(0.9921, 10.0, True), (0.9919, 10.0, False), (0.9921, 13.0, False)],
)
def test_cnn_targets_follow_the_numbers(
    bench: Any, cnn_acc: float, cnn_time: float, met: bool
) -> None:
    rows = rows_of(
        bench,
        **{
            "keras-cnn": record([25.0], [0.99], 0.99, 60000),
            "torch-cnn": record([50.0], [0.99], 0.99, 60000),
            "cnn": record([cnn_time], [0.99], cnn_acc, 55000),
        },
    )
    verdicts = dict(bench.targets(rows))
    assert len(verdicts) == 4
    assert all(verdicts.values()) == met


def test_text_targets_and_the_markdown(bench: Any) -> None:
    rows = rows_of(
        bench,
        **{
            "tfidf": record([8.0], [0.90], 0.9066, 25000),
            "tfidf-20k": record([7.0], [0.90], 0.9035, 20000),
            "nbsvm-20k": record([7.0], [0.90], 0.9010, 20000),
            "rnn": record([50.0], [0.89], 0.8826, 20000),
            "transformer": record([40.0], [0.91], 0.9250, 20000),
        },
    )
    rows["rnn"] |= {"model_mb": 41.94, "latency_ms": 250.4}  # dlpipe rows: what it ships
    verdicts = dict(bench.targets(rows))
    assert verdicts == {
        "rnn test accuracy 88.26 % >= 92.0 %": False,
        "rnn >= 0.5 points over the best linear model fit on the same 20k reviews (-2.09 points)": (
            False
        ),
        "rnn >= 0.5 points over the best linear model fit on all 25k training reviews "
        "(-2.40 points)": False,
        "transformer test accuracy 92.50 % >= 92.0 %": True,
        "transformer >= 0.5 points over the best linear model fit on the same 20k reviews "
        "(+2.15 points)": True,
        "transformer >= 0.5 points over the best linear model fit on all 25k training reviews "
        "(+1.84 points)": True,
    }
    result = {
        "quick": False,
        "machine": {k: "x" for k in ("cpu", "cores", "cpu_flags", "python", "torch")}
        | {"tensorflow": "x", "scikit_learn": "x", "date": "x"},
        "programs": rows,
        "prepare": {"imdb": {"wall_s": 30.0, "peak_rss_mib": 600}},
        "noop_repro_s": 1.2,
    }
    text = bench.markdown(result)
    assert (
        "| rnn | p | 1 | 50.0 s | 400 | 50.0 s | 50.0 s (test) | 88.26 % | -2.40 / -2.09 pt |"
        in text
    )
    assert "| 1.00x rnn | 41.9 MiB | 250 ms |" in text
    assert (
        "| tfidf-20k | p | 1 | 7.0 s | 2,857 | 7.0 s | 7.0 s (test) | 90.35 % | -0.31 / +0.00 pt |"
        in text
    )
    assert "| 1.00x tfidf | - | - |" in text.splitlines()[6]  # the tfidf row: no model.pt
    assert (
        "- MISSED: rnn >= 0.5 points over the best linear model fit on the same 20k reviews "
        "(-2.09 points)" in text
    )
    assert "- no-op `dvc repro`: 1.2 s" in text
    assert "- met: no-op `dvc repro` 1.2 s < 1.5 s" in text


def test_mlflow_logging_share_target(bench: Any) -> None:
    fast = record([20.0], [0.99], 0.993, 55000) | {"mlflow_logging_s": 0.5}
    slow = record([100.0], [0.9], 0.9, 20000) | {"mlflow_logging_s": 0.5}
    verdicts = dict(bench.targets(rows_of(bench, cnn=fast, rnn=slow), noop_repro_s=1.6))
    assert verdicts["cnn: MLflow's closing logging 2.5 % of its training time < 2 %"] is False
    assert verdicts["rnn: MLflow's closing logging 0.5 % of its training time < 2 %"] is True
    assert verdicts["no-op `dvc repro` 1.6 s < 1.5 s"] is False


def test_shipped_figures_of_a_trained_model(bench: Any, tiny_project: TinyProject) -> None:
    """model.pt's size as the file says, and a latency measured on test rows."""
    from support.tiny import add_test_splits

    from dlpipe.training.run import train

    add_test_splits(tiny_project)
    train("rnn", tiny_project.params)
    model_dir = tiny_project.root / "data" / "models" / "rnn"
    model, test = bench.load_shipped(model_dir, tiny_project.root)
    figures = bench.shipped_figures(model_dir, model, test)
    assert figures["model_mb"] == round((model_dir / "model.pt").stat().st_size / 2**20, 1) > 0
    assert figures["latency_ms"] > 0
    assert 0.0 <= bench.test_accuracy(model, test) <= 1.0
