"""`make smoke` (dlpipe.smoke): its params overrides, the workspace copy, the output checks.

The fast tests cover the pieces; the slow one runs the whole smoke (real data, real DVC, about
two minutes) when the data mirror is available.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from dlpipe.config import parse_params
from dlpipe.datasets import get_format, validate_datasets
from dlpipe.errors import DlpipeError
from dlpipe.family import model_family, validate_models
from dlpipe.smoke.checks import check_file, check_outputs
from dlpipe.smoke.params import merge, parse_set, smoke_params
from dlpipe.smoke.workspace import SmokeFailure, workspace, workspace_files

ROOT = Path(__file__).resolve().parents[2]


def project_params() -> dict[str, object]:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    return raw


# --- params -------------------------------------------------------------------------------------


def test_smoke_params_shrink_the_real_params_and_stay_valid() -> None:
    raw = project_params()
    params = parse_params(smoke_params(raw), "smoke")
    models = validate_models(params)
    datasets = validate_datasets(params)
    for settings in datasets.values():  # each format's own slices
        for key, value in get_format(settings.format).smoke.items():
            assert getattr(settings, key) == value
    assert datasets["imdb"].max_len == models["transformer"].max_len  # type: ignore[attr-defined]
    for name in params.models:
        assert params.train[name].epochs == 2  # history over more than one step
        # each family's own smoke settings, and nothing else of its section, are overridden
        smoke = model_family(params, name).smoke
        for key, value in smoke.items():
            if key != "model":
                assert getattr(params.train[name], key) == value
        project = parse_params(raw).train[name]
        assert params.train[name].optimizer == project.optimizer
        assert params.train[name].model == {**project.model, **smoke.get("model", {})}
    # everything the overrides do not name is the project's own
    assert params.gates == parse_params(raw).gates
    assert params.registry == parse_params(raw).registry


def test_extra_overrides_win_and_are_validated() -> None:
    raw = project_params()
    params = parse_params(smoke_params(raw, parse_set(["train.rnn.epochs=3"])), "smoke")
    assert params.train["rnn"].epochs == 3
    with pytest.raises(DlpipeError, match=r"smoke params: train.rnn.epochs: .*greater than"):
        smoke_params(raw, parse_set(["train.rnn.epochs=0"]))


def test_models_keep_only_their_sections_datasets_and_gates() -> None:
    raw = project_params()
    params = parse_params(smoke_params(raw, models=["transformer"]), "smoke")
    assert params.models == ("transformer",)
    assert list(params.datasets) == [params.train["transformer"].dataset]
    assert list(params.gates.smoke_floors) == list(params.gates.floors) == ["transformer"]
    assert params.train["transformer"] == parse_params(smoke_params(raw)).train["transformer"]
    assert list(parse_params(smoke_params(raw, models=["rnn", "cnn"])).train) == ["cnn", "rnn"]
    with pytest.raises(DlpipeError, match=r"unknown model 'gpt'; choose from cnn, rnn"):
        smoke_params(raw, models=["gpt"])


def test_parse_set_reads_yaml_values_into_nested_keys() -> None:
    assert parse_set(["train.cnn.lr=0.01", "evaluate.latency_batch_sizes=[1, 8]", "a=x"]) == {
        "train": {"cnn": {"lr": 0.01}},
        "evaluate": {"latency_batch_sizes": [1, 8]},
        "a": "x",
    }
    with pytest.raises(DlpipeError, match="expected KEY=VALUE"):
        parse_set(["train.cnn.lr"])


def test_merge_leaves_its_inputs_alone() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 2}
    updates = {"a": {"b": 5}}
    merged = merge(base, updates)
    assert merged == {"a": {"b": 5, "c": [1]}, "d": 2}
    merged["a"]["c"].append(2)
    assert base == {"a": {"b": 1, "c": [1]}, "d": 2} and updates == {"a": {"b": 5}}


# --- the output checks --------------------------------------------------------------------------


def good_and_bad_files(folder: Path) -> tuple[list[Path], list[Path]]:
    good, bad = [], []

    def add(target: list[Path], name: str, data: bytes | str) -> Path:
        path = folder / f"{len(good) + len(bad)}-{name}"
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        target.append(path)
        return path

    add(good, "eval.json", '{"test_accuracy": 0.9}')
    add(bad, "eval.json", '{"test_accuracy": ')
    add(bad, "empty.json", "{}")
    add(good, "history.csv", "epoch,val_accuracy\n1,0.5\n2,0.6\n")
    add(bad, "header-only.csv", "epoch,val_accuracy\n")
    add(bad, "ragged.csv", "epoch,val_accuracy\n1\n")
    png = folder / "plot.png"
    Image.new("RGB", (40, 30), "white").save(png)
    good.append(png)
    add(bad, "truncated.png", png.read_bytes()[:40])
    npz = folder / "train.npz"
    np.savez(npz, labels=np.arange(3))
    good.append(npz)
    empty_npz = folder / "empty.npz"
    np.savez(empty_npz, labels=np.arange(0))
    bad.append(empty_npz)
    add(good, "summary.md", "# report\n")
    add(bad, "blank.md", "  \n")
    add(good, "labels.gz", gzip.compress(b"data"))
    add(bad, "broken.gz", gzip.compress(b"data" * 100)[:20])
    parquet = folder / "train.parquet"
    pd.DataFrame({"text": ["a"], "label": [1]}).to_parquet(parquet)
    good.append(parquet)
    add(bad, "broken.parquet", b"PAR1 nonsense")
    add(good, "tokenizer.bin", b"\x00\x01")
    add(bad, "nothing.bin", b"")
    return good, bad


def test_check_file_accepts_good_files_and_rejects_broken_ones(tmp_path: Path) -> None:
    good, bad = good_and_bad_files(tmp_path)
    for path in good:
        check_file(path)
    for path in bad:
        with pytest.raises(Exception):  # noqa: B017  (each parser raises its own kind)
            check_file(path)
        assert path.exists(), path


def git(folder: Path, *args: str) -> None:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True)


def dvc_project(folder: Path) -> Path:
    """A git + DVC repo holding the project's dvc.yaml and params.yaml (no outputs)."""
    for name in ("dvc.yaml", "params.yaml", ".dvc/config"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)
    git(folder, "init", "-q")
    return folder


def test_check_outputs_names_every_missing_output(tmp_path: Path) -> None:
    repo = dvc_project(tmp_path)
    (repo / "reports" / "models" / "cnn").mkdir(parents=True)
    (repo / "reports" / "models" / "cnn" / "eval.json").write_text("{broken", encoding="utf-8")
    (repo / "data" / "raw").mkdir(parents=True)
    with pytest.raises(SmokeFailure) as failure:
        check_outputs(repo, parse_params(project_params()))
    message = str(failure.value)
    assert "fetch: data/raw/ is empty" in message
    assert "prepare@imdb: data/prepared/imdb was not written" in message
    assert "evaluate@cnn: reports/models/cnn/eval.json does not parse (JSONDecodeError" in message
    assert "report: reports/summary.md was not written" in message


def test_the_workspace_is_the_working_tree_without_dvc_outputs(tmp_path: Path) -> None:
    repo = dvc_project(tmp_path)
    (repo / ".gitignore").write_text("/ignored.txt\n", encoding="utf-8")
    for name in ("src/a.py", "gone.py", "data/raw/mnist/x.gz", "new.py", "ignored.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x\n", encoding="utf-8")
    git(repo, "add", "src/a.py", "gone.py", "data/raw/mnist/x.gz", "dvc.yaml", ".gitignore")
    (repo / "gone.py").unlink()  # deleted, not yet committed
    files, skipped = workspace_files(repo)
    assert skipped == ["data/raw/mnist/x.gz"]
    assert "src/a.py" in files and "new.py" in files and "dvc.yaml" in files
    assert "gone.py" not in files and "ignored.txt" not in files


def test_outside_a_git_checkout_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DlpipeError, match="not a git checkout"):
        workspace_files(tmp_path)


def test_the_workspace_parent_is_made_or_refused_in_one_line(tmp_path: Path) -> None:
    with workspace(keep=False, base=str(tmp_path / "new" / "parent")) as work:
        assert work.parent == (tmp_path / "new" / "parent").resolve()
    assert not work.exists()
    (tmp_path / "file").write_text("")
    refused = pytest.raises(DlpipeError, match="--tmp .*file/x: cannot create it")
    with refused, workspace(keep=False, base=str(tmp_path / "file" / "x")):
        pass


# --- the whole thing ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_make_smoke_passes(tmp_path: Path, data_mirror: str) -> None:
    """The real smoke run: fetch from the mirror, dvc repro, every check, the smoke gates."""
    mirror = data_mirror
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "dlpipe.smoke", "--mirror", mirror, "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "== smoke PASSED" in result.stdout
    summary = json.loads((out / "smoke.json").read_text())
    assert set(summary["test_accuracy"]) == set(parse_params(project_params()).models)
    assert (out / "reports" / "summary.md").is_file()
