"""The smoke run's workspace: a committed copy of the working tree, with DVC, git and MLflow
kept away from the user's own configs and stores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from dlpipe.errors import DlpipeError
from dlpipe.smoke.params import smoke_params


class SmokeFailure(Exception):
    """A check of the smoke run failed (exit 1)."""


def run_command(
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
    """{stage address: its `Output`s} of the dvc.yaml in `root`, foreach stages expanded (not
    the `.dvc` files of `dvc add`-ed inputs: those are the user's data, not outputs)."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        stages = [stage for stage in repo.index.stages if isinstance(stage, PipelineStage)]
        return {stage.name: list(stage.outs) for stage in stages}


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


def isolated_env(repo: Path, state: Path, mirror: str | None) -> dict[str, str]:
    """The environment of every command run in a throw-away copy `repo` of the project (the
    smoke run, and the tests that run real DVC): this venv first on PATH, the copy's src
    importable, MLflow, DVC's site cache and configs in the `state` folder, so nothing reads or
    writes the user's own."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(repo / "src"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(state / "dvc-site-cache"),
        "DVC_GLOBAL_CONFIG_DIR": str(state / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(state / "dvc-system"),
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
    # OpenMP threads per process made the GRU's training crawl (spinning workers starve each
    # other).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    if mirror:
        env["DLPIPE_DATA_MIRROR"] = mirror
    else:
        env.pop("DLPIPE_DATA_MIRROR", None)
    return env


def _share_downloads(source: Path, repo: Path) -> None:
    """Let fetch reuse (and fill) the checkout's download cache, `.dlpipe/downloads`: without a
    data mirror a dataset's archive is then downloaded once, not once per smoke run. Best effort."""
    shared = source / ".dlpipe" / "downloads"
    try:
        shared.mkdir(parents=True, exist_ok=True)
        (repo / ".dlpipe").mkdir(exist_ok=True)
        (repo / ".dlpipe" / "downloads").symlink_to(shared, target_is_directory=True)
    except OSError as err:
        print(f"smoke: not sharing {shared} ({err}); fetch downloads into the workspace")


def _copy_own_data(source: Path, repo: Path, raw: dict[str, Any]) -> None:
    """Each dataset's own files (`datasets.<name>.path`) that git does not carry, such as a
    `dvc add`-ed folder: copied as they are, so the smoke run prepares the user's real data."""
    outs = [str(o.def_path) for stage in declared_outputs(source).values() for o in stage]
    for entry in (raw.get("datasets") or {}).values():
        path = Path(str(entry.get("path", "")))
        if path.is_absolute() or _under(str(path), outs) or (repo / path).exists():
            continue
        if not (source / path).exists():
            continue
        if (source / path).is_dir():
            shutil.copytree(source / path, repo / path)
        else:
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / path, repo / path)


def build_workspace(
    source: Path,
    work: Path,
    env: dict[str, str],
    extra: dict[str, Any],
    models: Sequence[str] = (),
) -> dict[str, Any]:
    """Copy the working tree into `work/repo`, shrink its params (to `models`, if any),
    commit; its params."""
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
    params = smoke_params(raw, extra, models)
    _copy_own_data(source, repo, params)
    (repo / "params.yaml").write_text(
        "# make smoke: the project's params.yaml with dlpipe.smoke.params merged in\n"
        + yaml.safe_dump(params, sort_keys=False),
        encoding="utf-8",
    )
    _share_downloads(source, repo)
    run_command(["git", "init", "-q"], repo, env)
    if not (repo / ".dvc" / "config").is_file():
        run_command([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    run_command(["git", "add", "-A"], repo, env)
    run_command(["git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "smoke"], repo, env)
    return params


@contextmanager
def workspace(keep: bool, base: str | None) -> Iterator[Path]:
    """A temporary folder, removed afterwards unless `keep` or the block failed."""
    if base:
        try:
            Path(base).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DlpipeError(f"--tmp {base}: cannot create it ({err.strerror})") from None
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
