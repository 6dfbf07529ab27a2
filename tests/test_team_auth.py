"""The team server with MLflow's basic-auth app: who may do what, what a refusal looks like, and
that no password ends up in anything the pipeline writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from support.families import REPO_ROOT
from support.servers import MlflowServer, started
from support.tiny import TinyProject, add_test_splits, run_stage_here

from dlpipe import team_server

ADMIN_PASSWORD = "admin-Secret-4242"
PASSWORDS = {"tina": "trainer-Secret-7373", "vic": "viewer-Secret-5151"}


def test_the_server_authenticates_beyond_loopback_and_needs_an_admin_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bound to 0.0.0.0 the basic-auth app is on without asking; a first start with no admin
    password is one line, and no server starts."""
    execs: list[list[str]] = []
    monkeypatch.setattr(team_server.os, "execv", lambda path, argv: execs.append(argv))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    for name in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY"):  # main sets them
        monkeypatch.setenv(name, "")
    users = f"sqlite:///{tmp_path / 'auth.db'}"
    with pytest.raises(SystemExit) as exit_:
        team_server.main(["--host", "0.0.0.0", "--auth-db-uri", users])
    assert exit_.value.code == 2 and execs == []
    assert "set MLFLOW_AUTH_ADMIN_PASSWORD" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
    team_server.main(["--host", "0.0.0.0", "--auth-db-uri", users, "--port", "5099"])
    [argv] = execs
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    config = Path(os.environ["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert users in config and "default_permission = READ" in config
    assert "auth_cache_ttl_seconds = 60" in config  # a password is checked once a minute
    assert ADMIN_PASSWORD not in config + " ".join(argv)
    execs.clear()
    team_server.main(["--host", "0.0.0.0", "--auth-db-uri", users, "--auth-cache-seconds", "0"])
    assert "auth_cache_ttl_seconds = 0" in Path(os.environ["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    execs.clear()
    team_server.main(["--host", "127.0.0.1", "--port", "5099"])  # loopback: as before
    assert "--app-name" not in execs[0]


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[MlflowServer]:
    with started(MlflowServer(tmp_path / "server", admin_password=ADMIN_PASSWORD)) as server:
        yield server


def as_user(monkeypatch: pytest.MonkeyPatch, name: str, password: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def add_user(url: str, name: str, role: str, project: Path) -> str:
    """`python -m dlpipe.team_users NAME --role ROLE`, run by the admin as the docs show."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
        "DLPIPE_NEW_USER_PASSWORD": PASSWORDS[name],
    }
    command = [sys.executable, "-m", "dlpipe.team_users", name, "--role", role]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.integration
def test_viewers_read_trainers_train_and_refusals_are_one_line(
    tiny_project: TinyProject,
    auth_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = auth_server.url
    add_test_splits(tiny_project)
    tiny_project.write_params(tiny_project.with_train("cnn", epochs=1))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 401  # no credentials, no answer

    granted = add_user(url, "tina", "trainer", tiny_project.root)
    assert "EDIT on experiment" in granted and "EDIT on registered model dlpipe-cnn" in granted
    assert "reads everything and writes nothing" in add_user(
        url, "vic", "viewer", tiny_project.root
    )
    assert "password changed" in add_user(url, "vic", "viewer", tiny_project.root)  # rerunnable

    # A wrong password stops the stage before training: one line, nothing written.
    as_user(monkeypatch, "tina", "not-her-password")
    assert run_stage_here("train", "cnn", monkeypatch) == 2
    out, err = capsys.readouterr()
    [line] = err.strip().splitlines()
    assert "401 Unauthorized: the password of user tina is wrong" in line, err
    assert "epoch" not in out and not Path("data/models/cnn").exists()

    # A trainer logs the run, registers the version and moves the aliases.
    as_user(monkeypatch, "tina", PASSWORDS["tina"])
    assert run_stage_here("train", "cnn", monkeypatch) == 0
    assert run_stage_here("evaluate", "cnn", monkeypatch) == 0
    logs = capsys.readouterr()
    client = MlflowClient(url)
    champion = client.get_model_version_by_alias("dlpipe-cnn", "champion")
    run_id = json.loads(Path("data/models/cnn/mlflow_run.json").read_text())["run_id"]
    assert champion.run_id == run_id

    # A viewer reads it all, and can neither log a run nor move an alias.
    as_user(monkeypatch, "vic", PASSWORDS["vic"])
    assert MlflowClient(url).get_run(run_id).info.status == "FINISHED"
    with pytest.raises(MlflowException) as refused:
        MlflowClient(url).set_registered_model_alias("dlpipe-cnn", "champion", champion.version)
    assert refused.value.get_http_status_code() == 403
    for stage in ("evaluate", "train"):
        assert run_stage_here(stage, "cnn", monkeypatch) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert "403 Permission denied for user vic" in line, line

    # No password in anything the pipeline wrote, logged or printed.
    texts = [logs.out, logs.err]
    run = MlflowClient(url).get_run(run_id)
    texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    version = client.get_model_version("dlpipe-cnn", champion.version)
    texts += [json.dumps(version.tags), version.source]
    written = [p for folder in ("data", "reports", ".dlpipe") for p in Path(folder).rglob("*")]
    written += list((auth_server.folder / "artifacts").rglob("*"))
    assert any(p.name == "mlflow_run.json" for p in written)
    texts += [p.read_bytes().decode("latin-1") for p in written if p.is_file()]
    for secret in (ADMIN_PASSWORD, *PASSWORDS.values()):
        assert not [t for t in texts if secret in t], secret

    # A trainer made a viewer loses the grants.
    add_user(url, "tina", "viewer", tiny_project.root)
    as_user(monkeypatch, "tina", PASSWORDS["tina"])
    with pytest.raises(MlflowException) as refused:
        MlflowClient(url).set_registered_model_alias("dlpipe-cnn", "champion", champion.version)
    assert refused.value.get_http_status_code() == 403


def test_a_viewer_needs_no_grants_and_a_short_password_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dlpipe import team_users

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("DLPIPE_NEW_USER_PASSWORD", "short")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(SystemExit):
        team_users.main(["ben", "--role", "trainer"])
    assert "at least 12 characters" in capsys.readouterr().err
    monkeypatch.setenv("DLPIPE_NEW_USER_PASSWORD", "long-enough-password")
    with pytest.raises(SystemExit):
        team_users.main(["ben", "--role", "trainer"])
    assert "users live on a tracking server" in capsys.readouterr().err
