"""A sweep's baseline (a committed copy of the project whose smoke pipeline has run), and
`dlpipe` called in-process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlpipe.cli import main
from dlpipe.smoke.params import smoke_params
from dlpipe.smoke.workspace import isolated_env, workspace_files
from support.families import REPO_ROOT


def check_output(args: list[str], repo: Path, env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def baseline_project(folder: Path, mirror: str) -> tuple[Path, dict[str, str]]:
    """A copy of the project with the smoke settings, `dvc repro evaluate@cnn` run and
    committed: the sweep's baseline. MLflow uses its default store, <repo>/mlflow.db, which the
    trials (in .dvc/tmp/exps/...) must find too."""
    repo = folder / "repo"
    files, _ = workspace_files(REPO_ROOT)
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, repo / name)
    raw = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    cnn_only = smoke_params(raw, models=["cnn"])  # the trials' family; no other data to fetch
    (repo / "params.yaml").write_text(yaml.safe_dump(cnn_only, sort_keys=False))
    env = isolated_env(repo, folder, mirror)
    env.pop("MLFLOW_TRACKING_URI")
    python = [sys.executable, "-m"]
    check_output(["git", "init", "-q"], repo, env)
    check_output(["git", "add", "-A"], repo, env)
    check_output(["git", "commit", "-qm", "project"], repo, env)
    check_output([*python, "dvc", "repro", "evaluate@cnn"], repo, env)
    check_output(["git", "add", "-A"], repo, env)
    check_output(["git", "commit", "-qm", "baseline"], repo, env)
    return repo, env


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`dlpipe ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
