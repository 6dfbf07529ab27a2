"""`dlpipe check` (dlpipe.gates): floors, baseline regressions, the table, one-line input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dlpipe.config import GatesConfig, load_params, parse_params
from dlpipe.errors import DlpipeError
from dlpipe.gates import (
    CHANCE_MARGIN,
    Check,
    collect_checks,
    format_checks,
    largest_class_share,
    main,
    run_check,
)

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"cnn": 0.991, "rnn": 0.88, "transformer": 0.87}
MODELS = tuple(GOOD)


def write_reports(folder: Path, accuracy: dict[str, float], **extra: Any) -> Path:
    """reports/models/<model>/eval.json as evaluate writes them (only the keys gates read)."""
    reports = folder / "reports" / "models"
    for model, value in accuracy.items():
        (reports / model).mkdir(parents=True, exist_ok=True)
        payload = {"test_accuracy": value, "test_macro_f1": value - 0.01, **extra}
        (reports / model / "eval.json").write_text(json.dumps(payload), encoding="utf-8")
    return reports


# The test splits' class counts, as prepare writes them in the data cards (MNIST's real ones).
TEST_CLASS_COUNTS = {
    "mnist": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    "imdb": [12500, 12500],
}


def write_cards(folder: Path, counts: dict[str, list[int]] = TEST_CLASS_COUNTS) -> None:
    """reports/data/<dataset>.json beside reports/models (only the keys gates read)."""
    cards = folder / "reports" / "data"
    cards.mkdir(parents=True, exist_ok=True)
    for dataset, classes in counts.items():
        card = {"test": {"count": sum(classes), "class_counts": classes}}
        (cards / f"{dataset}.json").write_text(json.dumps(card), encoding="utf-8")


def write_params(
    folder: Path, gates: dict[str, Any] | None = None, train: dict[str, Any] | None = None
) -> Path:
    """params.yaml: the project's, with these gates keys and these extra `train` models."""
    raw = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text())).model_dump()
    if gates is not None:
        raw["gates"] = {**raw["gates"], **gates}
    raw["train"].update(train or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = a folder with params.yaml (default gates), passing reports and the data cards."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    write_reports(tmp_path, GOOD)
    write_cards(tmp_path)
    return tmp_path


def git(folder: Path, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t.invalid",
    }
    subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
    )


# --- the schema ---------------------------------------------------------------------------------


def test_the_projects_gates_are_stricter_than_the_smoke_gates() -> None:
    gates = load_params(ROOT / "params.yaml").gates
    assert set(gates.floors) == set(gates.smoke_floors) == {"cnn", "rnn", "transformer"}
    for model, floors in gates.floors.items():
        for metric, floor in floors.items():
            assert gates.smoke_floors[model][metric] < floor


@pytest.mark.parametrize(
    ("gates", "message"),
    [
        ({"floors": {"mlp": {"test_accuracy": 0.5}}}, "gates.floors.mlp"),
        ({"floors": {"cnn": {"accuracy": 0.5}}}, "gates.floors.cnn.accuracy"),
        ({"floors": {"cnn": {"test_accuracy": 1.5}}}, "less than or equal to 1"),
        ({"max_drop": -0.1}, "gates.max_drop"),
        ({"max_dorp": 0.1}, "gates.max_dorp: unknown key"),
    ],
)
def test_bad_gates_are_one_line_errors(
    project: Path, capsys: pytest.CaptureFixture[str], gates: dict[str, Any], message: str
) -> None:
    write_params(project, gates)
    assert run_check() == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: params.yaml: gates."), err
    assert message in err


# --- floors -------------------------------------------------------------------------------------


def test_all_floors_pass(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check() == 0
    out = capsys.readouterr().out
    assert "gates: all 3 checks passed" in out
    assert out.count("PASS") == 3 and "FAIL" not in out


def test_a_metric_below_its_floor_fails(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_reports(project, {"rnn": 0.80})
    assert run_check() == 1
    out = capsys.readouterr().out
    rnn_row = next(line for line in out.splitlines() if line.startswith("rnn "))
    assert rnn_row.split()[:7] == ["rnn", "test_accuracy", "0.8000", "floor", "0.8500"] + [
        "-0.0500",
        "FAIL",
    ]
    assert "gates: FAILED 1 of 3 checks: rnn test_accuracy 0.8000 < 0.8500 (floor)" in out


def test_a_value_equal_to_its_floor_passes(project: Path) -> None:
    write_reports(project, {"cnn": 0.985})
    assert run_check() == 0


def test_smoke_uses_the_smoke_floors(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_reports(project, {"cnn": 0.93, "rnn": 0.7, "transformer": 0.75})
    assert run_check() == 1
    assert run_check(smoke=True) == 0
    assert "against the smoke floors" in capsys.readouterr().out


def test_several_metrics_per_model(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_params(project, {"floors": {"cnn": {"test_accuracy": 0.98, "test_macro_f1": 0.985}}})
    assert run_check() == 1  # macro-F1 is 0.981
    out = capsys.readouterr().out
    assert ["cnn", "test_macro_f1", "0.9810", "floor", "0.9850", "-0.0040", "FAIL"] in [
        line.split() for line in out.splitlines()
    ]
    # the models left without floors are gated against chance (their largest class)
    rows = [line.split() for line in out.splitlines() if line.startswith(("rnn ", "transformer "))]
    assert [row[:5] for row in rows] == [
        ["rnn", "test_accuracy", "0.8800", "chance", "0.5100"],
        ["transformer", "test_accuracy", "0.8700", "chance", "0.5100"],
    ]


def test_only_chosen_models(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_reports(project, {"rnn": 0.5})
    assert main(["--model", "cnn", "--model", "transformer"]) == 0
    assert "rnn" not in capsys.readouterr().out


# --- chance: a model without floors --------------------------------------------------------------

MLP = {"family": "mlp", "dataset": "mnist", "model": {"hidden": 64}}  # a user's model, no floors


def test_a_model_without_a_floor_is_gated_against_chance(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its test accuracy must beat always answering its test split's largest class (MNIST: the
    1s, 1135 of 10000) by CHANCE_MARGIN; the models with floors keep them."""
    write_params(project, train={"mlp": MLP})
    write_reports(project, {"mlp": 0.97})
    assert run_check() == 0
    out = capsys.readouterr().out
    assert "gates: all 4 checks passed" in out
    [row] = [line for line in out.splitlines() if line.startswith("mlp ")]
    limit = 1135 / 10000 + CHANCE_MARGIN
    assert row.split() == [
        "mlp", "test_accuracy", "0.9700", "chance", f"{limit:.4f}", f"{0.97 - limit:+.4f}",
        "PASS", "largest", "class", "0.1135", "+", "0.01",
    ]  # fmt: skip

    write_reports(project, {"mlp": 0.12})  # a model that stopped learning: near chance
    assert run_check() == 1
    out = capsys.readouterr().out
    assert f"gates: FAILED 1 of 4 checks: mlp test_accuracy 0.1200 < {limit:.4f} (chance)" in out
    assert run_check(smoke=True) == 1  # no smoke floor either: chance again
    assert main(["--model", "cnn"]) == 0  # not chosen, not checked
    assert "mlp" not in capsys.readouterr().out.split("gates: all")[-1]


def test_chance_is_the_largest_test_class_share(project: Path) -> None:
    write_cards(project, {"pets": [30, 50, 20]})
    assert largest_class_share(project / "reports" / "models", "pets") == 0.5
    assert largest_class_share(project / "reports" / "models", "imdb") == 0.5
    write_reports(project, {"pets_cnn": 0.6})
    checks = collect_checks(
        GatesConfig(floors={}), ("pets_cnn",), project / "reports" / "models",
        chance={"pets_cnn": 0.5},
    )  # fmt: skip
    assert [(c.against, c.limit) for c in checks] == [("chance", 0.5 + CHANCE_MARGIN)]


def test_a_missing_data_card_for_a_model_without_floors_is_one_line(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_params(project, train={"mlp": MLP})
    write_reports(project, {"mlp": 0.97})
    (project / "reports" / "data" / "mnist.json").unlink()
    assert run_check() == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: reports/data/mnist.json: missing"), err


# --- the table ----------------------------------------------------------------------------------


def test_the_table_is_aligned_and_readable() -> None:
    checks = [
        Check("cnn", "test_accuracy", 0.99123, "floor", 0.985),
        Check("transformer", "test_accuracy", 0.84, "baseline abc1234", 0.86, "was 0.8700"),
    ]
    lines = format_checks(checks).splitlines()
    assert lines[0].split() == [
        "model", "metric", "value", "against", "limit", "margin", "result", "note"
    ]  # fmt: skip
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["cnn", "test_accuracy", "0.9912", "floor", "0.9850", "+0.0062"] + [
        "PASS"
    ]
    assert lines[3].split()[-3:] == ["FAIL", "was", "0.8700"]
    # columns line up: every row has the result column at the same offset
    assert (
        len({line.index(word) for line, word in zip(lines[2:], ("PASS", "FAIL"), strict=True)}) == 1
    )


# --- baseline -----------------------------------------------------------------------------------


@pytest.fixture
def history(project: Path) -> Path:
    """A git repo whose first commit holds the GOOD reports, tagged `base`."""
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "base")
    git(project, "tag", "base")
    return project


def test_a_drop_within_the_margin_passes(history: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_reports(history, {"rnn": GOOD["rnn"] - 0.009})
    assert run_check(baseline="base") == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 6
    assert "baseline " in out and "was 0.8800, max drop 0.01" in out


def test_a_drop_beyond_the_margin_fails_even_above_the_floor(
    history: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_reports(history, {"cnn": GOOD["cnn"] - 0.02})  # 0.971 < floor too
    write_reports(history, {"transformer": GOOD["transformer"] - 0.015})  # 0.855: above floor
    assert run_check(baseline="base") == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("transformer ")]
    # the floor passes, the baseline fails ("baseline <sha>" takes two words)
    assert rows[0].split()[3:7] == ["floor", "0.8500", "+0.0050", "PASS"]
    assert rows[1].split()[3] == "baseline"
    assert rows[1].split()[5:8] == ["0.8600", "-0.0050", "FAIL"]
    assert "FAILED 3 of 6 checks" in out


def test_a_model_new_since_the_baseline_has_no_baseline_row(
    history: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    git(history, "rm", "-q", "reports/models/rnn/eval.json")
    git(history, "commit", "-q", "-m", "drop rnn")
    write_reports(history, GOOD)
    assert run_check(baseline="HEAD") == 0
    out = capsys.readouterr().out
    assert "gates: rnn has no eval.json at HEAD: no baseline to compare" in out
    assert out.index("no baseline to compare") > out.index("result")  # after the table
    assert out.count("PASS") == 5


def test_an_unknown_revision_is_one_line(history: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(baseline="no-such-branch") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "--baseline no-such-branch: unknown git revision" in err


def test_collect_checks_reads_the_baseline_values(history: Path) -> None:
    write_reports(history, {"cnn": 0.995})
    gates = GatesConfig(floors={"cnn": {"test_accuracy": 0.985}}, max_drop=0.0)
    checks = collect_checks(gates, MODELS, Path("reports/models"), baseline="base", models=["cnn"])
    assert [(c.against.split()[0], c.limit, c.passed) for c in checks] == [
        ("floor", 0.985, True),
        ("baseline", GOOD["cnn"], True),
    ]


# --- bad input ----------------------------------------------------------------------------------


def test_a_missing_eval_json_is_one_line_and_exit_2(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "reports" / "models" / "transformer" / "eval.json").unlink()
    assert run_check() == 2
    out, err = capsys.readouterr()
    assert out == ""  # no half table
    assert err == (
        "error: reports/models/transformer/eval.json: missing; run the pipeline first "
        "(dvc repro, or make smoke)\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"test_macro_f1": 0.9}', "has no 'test_accuracy'"),
        ('{"test_accuracy": "high"}', "test_accuracy is 'high', not a finite number"),
        ('{"test_accuracy": NaN}', "test_accuracy is nan, not a finite number"),
    ],
)
def test_a_broken_eval_json_is_one_line(
    project: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    (project / "reports" / "models" / "cnn" / "eval.json").write_text(content, encoding="utf-8")
    assert run_check() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: reports/models/cnn/eval.json: ")
    assert message in err


def test_missing_params_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(tmp_path / "reports" / "models", tmp_path / "params.yaml") == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_smoke_floor_missing_for_a_model(project: Path) -> None:
    write_params(project, {"smoke_floors": {"cnn": {"test_accuracy": 0.5}}})
    with pytest.raises(DlpipeError, match="gates.smoke_floors in params.yaml has no floor for rnn"):
        collect_checks(
            load_params().gates, MODELS, Path("reports/models"), smoke=True, models=["cnn", "rnn"]
        )


def test_the_module_runs_as_a_script(project: Path) -> None:
    """`python -m dlpipe.gates`: the exit code is the gate's, the table is on stdout."""
    write_reports(project, {"cnn": 0.5})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "dlpipe.gates", "--reports", "reports/models"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "cnn" in result.stdout and "FAIL" in result.stdout


def test_dlpipe_check_is_the_cli_entry(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dlpipe import cli

    assert cli.main(["check"]) == 0
    write_reports(project, {"cnn": 0.5})
    assert cli.main(["check", "--model", "cnn"]) == 1
    assert "cnn test_accuracy 0.5000 < 0.9850 (floor)" in capsys.readouterr().out
