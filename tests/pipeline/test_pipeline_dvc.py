"""The real dvc.yaml under real DVC: the data stages run, cache, skip and rerun exactly when their
own inputs change.

Each test builds a throwaway git + DVC repo holding a copy of the project's dvc.yaml, params.yaml,
stages/ and src/, and runs `python -m dvc` in it; the stage scripts import the copied src.

* The fast tests cannot run `fetch` for real: it verifies the checksums pinned for the real files,
  which no tiny file passes. So they write tiny raw data where fetch would (its one output,
  data/raw, holding data/raw/<dataset> for each built-in dataset), record it with
  `dvc commit fetch` (DVC's own way to accept outputs made outside `repro`), and run the real
  prepare@<dataset> stages on it.
* The slow test runs the whole `dvc repro prepare@mnist prepare@imdb` honestly, fetch included,
  from the real files in the shared datasets mirror (about 30 s: IMDB has 50k reviews to encode).
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from support.tiny import PREPARED_IMDB_FILES

from dlpipe.config import set_dotted
from dlpipe.datasets.imdb import frame
from dlpipe.smoke.workspace import isolated_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DATA_STAGES = ("fetch", "prepare@mnist", "prepare@imdb")
PREPARE_STAGES = DATA_STAGES[1:]
UP_TO_DATE = "Data and pipelines are up to date."


@dataclass
class DvcRepo:
    root: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def dvc(self, *args: str, timeout: float = 120) -> str:
        """Run `python -m dvc ARGS`; fail the test with its output unless it exits 0."""
        result = self.run(sys.executable, "-m", "dvc", *args, timeout=timeout)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"dvc {' '.join(args)} exited {result.returncode}:\n{output}"
        return output

    def changed_stages(self) -> dict[str, Any]:
        """`dvc status --json` of the data stages: {stage: what changed}; empty when up to date."""
        return dict(json.loads(self.dvc("status", "--json", *DATA_STAGES)))

    def edit_params(self, edit: Callable[[dict[str, Any]], None]) -> None:
        path = self.root / "params.yaml"
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        edit(raw)
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


# --- building the repo ---------------------------------------------------------------------------


def project_files() -> list[str]:
    """What a commit of the project would hold (tracked + untracked-not-ignored) of the files the
    pipeline needs; a plain listing where the project is not a git checkout."""
    wanted = ["dvc.yaml", "params.yaml", "stages", "src"]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *wanted],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode == 0 and listed.stdout.strip():
        files = listed.stdout.splitlines()
    else:
        files = [
            str(p.relative_to(ROOT))
            for name in wanted
            for p in ([ROOT / name] if (ROOT / name).is_file() else (ROOT / name).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
        ]
    return sorted(f for f in set(files) if (ROOT / f).is_file())


def make_repo(folder: Path, mirror: str | None) -> DvcRepo:
    """A fresh git + DVC repo with a copy of the pipeline, DVC isolated from the user's configs."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = folder / "repo"
    for name in project_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    # `python` in the stage commands is this interpreter; stages import the copied src.
    repo = DvcRepo(root, isolated_env(root, folder, mirror))
    init = repo.run("git", "init", "-q")
    assert init.returncode == 0, init.stderr
    repo.dvc("init", "-q")
    repo.dvc("config", "core.analytics", "false")
    return repo


def idx_gz(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def write_tiny_raw_data(raw: Path) -> None:
    """What fetch writes, in miniature: MNIST's four IDX files and the IMDB parquet files."""
    rng = np.random.default_rng(0)
    (raw / "mnist").mkdir(parents=True)
    for prefix, count in (("train", 200), ("t10k", 50)):
        labels = rng.permutation(np.arange(count) % 10)
        images = rng.integers(0, 256, (count, 28, 28))
        (raw / "mnist" / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_gz(2051, images))
        (raw / "mnist" / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_gz(2049, labels))
    words = {0: ["bad", "dull", "awful", "boring"], 1: ["good", "great", "superb", "funny"]}
    (raw / "imdb").mkdir(parents=True)
    for split, per_label in (("train", 30), ("test", 10)):
        rows = [(label, i) for label in (0, 1) for i in range(per_label)]
        texts = [
            f"The film was {' and '.join(rng.choice(words[label], size=int(rng.integers(1, 30))))}."
            for label, _ in rows
        ]
        ids = [f"{split}/{'pos' if label else 'neg'}/{i}" for label, i in rows]
        data = frame(ids, [label for label, _ in rows], texts)
        data.to_parquet(raw / "imdb" / f"{split}.parquet", index=False, engine="pyarrow")
    unsup = frame([f"unsup/{i}" for i in range(4)], [-1] * 4, ["an unlabeled review"] * 4)
    unsup.to_parquet(raw / "imdb" / "unsup.parquet", index=False, engine="pyarrow")


def set_small_data_params(raw: dict[str, Any]) -> None:
    raw["datasets"]["mnist"]["val_size"] = 20
    raw["datasets"]["imdb"].update(val_size=10, vocab_size=150, max_len=32)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DvcRepo, str]]:
    """A repo whose fetch outputs are tiny data accepted with `dvc commit`, after one
    `dvc repro prepare@mnist prepare@imdb`; yields the repo and that repro's output."""
    folder = tmp_path_factory.mktemp("dvc-tiny")
    repo = make_repo(folder, mirror=None)
    repo.edit_params(set_small_data_params)
    write_tiny_raw_data(repo.root / "data" / "raw")
    repo.dvc("commit", "--force", "fetch")
    output = repo.dvc("repro", *PREPARE_STAGES)
    yield repo, output
    shutil.rmtree(folder, ignore_errors=True)


# --- shared checks -------------------------------------------------------------------------------


def load_card(repo: DvcRepo, dataset: str) -> dict[str, Any]:
    card: dict[str, Any] = json.loads(
        (repo.root / "reports" / "data" / f"{dataset}.json").read_text(encoding="utf-8")
    )
    return card


def assert_outputs_exist(repo: DvcRepo) -> None:
    prepared = repo.root / "data" / "prepared"
    assert sorted(p.name for p in (prepared / "mnist").iterdir()) == [
        "SHA256SUMS",
        "meta.json",
        "test.npz",
        "train.npz",
        "val.npz",
    ]
    assert sorted(p.name for p in (prepared / "imdb").iterdir()) == PREPARED_IMDB_FILES
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text(encoding="utf-8"))
    assert set(lock["stages"]) == set(DATA_STAGES)
    params = yaml.safe_load((repo.root / "params.yaml").read_text(encoding="utf-8"))
    locked = lock["stages"]["prepare@imdb"]["params"]["params.yaml"]
    assert locked == {"seed": params["seed"], "datasets.imdb": params["datasets"]["imdb"]}
    # prepare@<dataset> reads its raw files where datasets.<dataset>.path says: inside fetch's
    # one output, data/raw.
    assert [out["path"] for out in lock["stages"]["fetch"]["outs"]] == ["data/raw"]
    for dataset in ("mnist", "imdb"):
        deps = [dep["path"] for dep in lock["stages"][f"prepare@{dataset}"]["deps"]]
        assert params["datasets"][dataset]["path"] == f"data/raw/{dataset}"
        assert f"data/raw/{dataset}" in deps and f"src/dlpipe/datasets/{dataset}.py" in deps


def assert_up_to_date_and_second_repro_skips(repo: DvcRepo) -> None:
    assert UP_TO_DATE in repo.dvc("status", *DATA_STAGES)
    assert repo.changed_stages() == {}
    lock = (repo.root / "dvc.lock").read_bytes()
    again = repo.dvc("repro", *PREPARE_STAGES)
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in again, again
    assert "Running stage" not in again, again
    assert (repo.root / "dvc.lock").read_bytes() == lock


def assert_vocab_size_change_marks_only_prepare_imdb(repo: DvcRepo) -> None:
    """Of the prepare stages, only prepare@imdb; fetch too, as it reads the whole `datasets`
    section (each dataset's format and path)."""
    params = repo.root / "params.yaml"
    before = params.read_text(encoding="utf-8")
    try:
        repo.edit_params(lambda raw: raw["datasets"]["imdb"].update(vocab_size=123))
        changed = repo.changed_stages()
        assert set(changed) == {"fetch", "prepare@imdb"}, changed
        assert changed["prepare@imdb"] == [
            {"changed deps": {"params.yaml": {"datasets.imdb": "modified"}}}
        ]
        assert changed["fetch"] == [{"changed deps": {"params.yaml": {"datasets": "modified"}}}]
    finally:
        params.write_text(before, encoding="utf-8")
    assert repo.changed_stages() == {}


# --- fast: the real prepare stages under DVC, on tiny committed raw data -----------------------


def test_repro_runs_both_prepare_stages_once(tiny_repo: tuple[DvcRepo, str]) -> None:
    repo, output = tiny_repo
    assert "Stage 'fetch' didn't change, skipping" in output, output
    assert "Running stage 'fetch'" not in output
    assert "prepare@mnist: train 180, val 20, test 50 in" in output, output
    assert "prepare@imdb: train 50, val 10, test 20 in" in output, output
    assert output.count("Running stage 'prepare@mnist'") == 1
    assert output.count("Running stage 'prepare@imdb'") == 1
    assert_outputs_exist(repo)
    assert load_card(repo, "mnist")["val"]["class_counts"] == [2] * 10
    imdb_card = load_card(repo, "imdb")
    assert imdb_card["max_len"] == 32
    assert imdb_card["vocab_size"] <= 150


def test_then_status_is_up_to_date_and_repro_skips_everything(
    tiny_repo: tuple[DvcRepo, str],
) -> None:
    assert_up_to_date_and_second_repro_skips(tiny_repo[0])


def test_vocab_size_change_marks_only_prepare_imdb(tiny_repo: tuple[DvcRepo, str]) -> None:
    assert_vocab_size_change_marks_only_prepare_imdb(tiny_repo[0])


def set_param(dotted: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        set_dotted(raw, dotted, value)

    return edit


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("datasets.mnist.val_size", 30, {"fetch", "prepare@mnist"}),
        ("seed", 7, {"prepare@mnist", "prepare@imdb"}),
        ("fetch.retries", 5, {"fetch"}),
        ("train.rnn.epochs", 9, set()),
    ],
)
def test_a_param_change_marks_only_the_stages_that_read_it(
    tiny_repo: tuple[DvcRepo, str], dotted: str, value: object, expected: set[str]
) -> None:
    repo = tiny_repo[0]
    params = repo.root / "params.yaml"
    before = params.read_text(encoding="utf-8")
    try:
        repo.edit_params(set_param(dotted, value))
        assert set(repo.changed_stages()) == expected
    finally:
        params.write_text(before, encoding="utf-8")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # A format's module: its own prepare stage, and fetch (which holds the folder
        # src/dlpipe/datasets: the built-ins' fetch code and pinned checksums live there).
        ("src/dlpipe/datasets/imdb.py", {"fetch", "prepare@imdb"}),
        ("src/dlpipe/datasets/mnist.py", {"fetch", "prepare@mnist"}),
        ("src/dlpipe/datasets/table.py", {"fetch"}),  # no dataset of the format: no prepare
        ("src/dlpipe/data/splits.py", set(DATA_STAGES)),
        ("src/dlpipe/data/fetch.py", {"fetch"}),
        ("src/dlpipe/config.py", set(DATA_STAGES)),
        ("src/dlpipe/models/transformer.py", set()),
    ],
)
def test_a_code_change_marks_only_the_stages_that_run_it(
    tiny_repo: tuple[DvcRepo, str], path: str, expected: set[str]
) -> None:
    repo = tiny_repo[0]
    source = repo.root / path
    before = source.read_bytes()
    try:
        source.write_bytes(before + b"\n# edited\n")
        assert set(repo.changed_stages()) == expected
    finally:
        source.write_bytes(before)


def test_a_declared_dataset_is_a_prepare_stage_with_no_dvc_yaml_edit(
    tiny_repo: tuple[DvcRepo, str],
) -> None:
    """A user's own table, declared in params.yaml only: `prepare@tickets` exists and runs on its
    file; the built-in datasets' stages do not run."""
    repo = tiny_repo[0]
    saved = {name: (repo.root / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    table = repo.root / "data" / "own" / "tickets.csv"
    table.parent.mkdir(parents=True)
    words = {"billing": ["invoice", "refund", "charge"], "bug": ["crash", "error", "freeze"]}
    lines = ["body,category"]
    lines += [f"my {words[c][i % 3]} again {i},{c}" for c in words for i in range(30)]
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tickets = {"format": "table", "path": "data/own/tickets.csv", "text": "body"}
    tickets.update(label="category", val_size=10, vocab_size=100, min_frequency=1)
    try:
        repo.edit_params(lambda raw: raw["datasets"].update(tickets=tickets))
        output = repo.dvc("repro", "prepare@tickets")
        assert output.count("Running stage") == 1, output
        assert "Running stage 'prepare@tickets'" in output, output
        assert "prepare@tickets: train 38, val 10, test 12 in" in output, output
        card = load_card(repo, "tickets")
        assert card["label_names"] == ["billing", "bug"]
        assert card["test"]["class_counts"] == [6, 6]
        meta = json.loads((repo.root / "data/prepared/tickets/meta.json").read_text("utf-8"))
        assert (meta["inputs"], meta["dataset"]) == ("tokens", "tickets")
        assert UP_TO_DATE in repo.dvc("status", "prepare@tickets")
    finally:
        for name, data in saved.items():
            (repo.root / name).write_bytes(data)
        shutil.rmtree(repo.root / "data" / "own", ignore_errors=True)
        shutil.rmtree(repo.root / "data" / "prepared" / "tickets", ignore_errors=True)
        (repo.root / "reports" / "data" / "tickets.json").unlink(missing_ok=True)
    assert repo.changed_stages() == {}


# --- slow: fetch too, from the real files ---------------------------------------------------------


@pytest.mark.slow
def test_full_data_pipeline_from_the_real_files(tmp_path: Path, data_mirror: str) -> None:
    repo = make_repo(tmp_path, data_mirror)

    def smaller(raw: dict[str, Any]) -> None:
        raw["datasets"]["mnist"]["val_size"] = 1000
        # every labelled review, 8,000 of the 50,000 unlabeled (as smoke runs do; params.yaml
        # keeps all of them)
        raw["datasets"]["imdb"].update(val_size=1000, vocab_size=2000, max_unlabeled=8000)

    repo.edit_params(smaller)
    try:
        output = repo.dvc("repro", *PREPARE_STAGES, timeout=600)
        for stage in DATA_STAGES:
            assert output.count(f"Running stage '{stage}'") == 1, output
        assert "fetch: mnist: 4 files" in output, output
        assert "prepare@mnist: train 59000, val 1000, test 10000" in output, output
        assert "prepare@imdb: train 24000, val 1000, test 25000" in output, output
        assert_outputs_exist(repo)
        assert load_card(repo, "mnist")["test"]["class_counts"] == [
            980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
        ]  # fmt: skip
        assert load_card(repo, "imdb")["val"]["class_counts"] == [500, 500]
        assert_up_to_date_and_second_repro_skips(repo)
        assert_vocab_size_change_marks_only_prepare_imdb(repo)
    finally:
        shutil.rmtree(tmp_path / "repo" / ".dvc" / "cache", ignore_errors=True)
        shutil.rmtree(tmp_path / "repo" / "data", ignore_errors=True)
