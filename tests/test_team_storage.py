"""S3-compatible object storage for a team, against a real S3 API server (moto's, on 127.0.0.1):
the DVC remote, and the MLflow server's artifact store behind its proxy. Two clones share nothing
on disk but the venv: one runs the pipeline and pushes, the other pulls and has nothing to rerun,
and reads the first one's artifacts through the server without any storage credentials."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from support.families import REPO_ROOT
from support.servers import MlflowServer, free_port, started, stop_process_group

from dlpipe.smoke.workspace import isolated_env

BUCKET = "dlpipe-team"
KEYS = {"AWS_ACCESS_KEY_ID": "team-key-id", "AWS_SECRET_ACCESS_KEY": "team-secret-key"}


@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port, with an empty bucket BUCKET."""
    import boto3

    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if moto is None:
        pytest.fail("moto_server is not installed (the dev extra installs moto[server])")
    port = free_port()
    with open(tmp_path / "moto.log", "wb") as log:
        process = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url, timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(
                        f"moto_server did not start:\n{(tmp_path / 'moto.log').read_text()}"
                    )
                time.sleep(0.25)
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", **_boto_keys())
        s3.create_bucket(Bucket=BUCKET)
        yield url
    finally:
        stop_process_group(process)


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip


def machine(folder: Path, repo: Path, tracking_uri: str, mirror: str) -> dict[str, str]:
    """A machine of its own: HOME, DVC's configs and site cache in `folder`; no storage keys."""
    env = isolated_env(repo, folder, mirror)
    for name in [*KEYS, "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE"]:
        env.pop(name, None)
    home = folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    return env | {"HOME": str(home), "MLFLOW_TRACKING_URI": tracking_uri}


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def use_team_remote(repo: Path, env: dict[str, str], endpoint: str) -> None:
    """The commands docs/team.md shows: the remote in .dvc/config, its keys in config.local."""
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "remote", "add", "-f", "-d", "team", f"s3://{BUCKET}/dvc"], repo, env)
    run([*dvc, "remote", "modify", "team", "endpointurl", endpoint], repo, env)
    for option, key in (("access_key_id", "AWS_ACCESS_KEY_ID"),
                        ("secret_access_key", "AWS_SECRET_ACCESS_KEY")):  # fmt: skip
        run([*dvc, "remote", "modify", "--local", "team", option, KEYS[key]], repo, env)


@pytest.mark.slow
@pytest.mark.integration
def test_two_clones_share_data_models_and_artifacts_through_object_storage(
    tmp_path: Path, s3_endpoint: str, data_mirror: str
) -> None:
    import boto3

    server_env = {**KEYS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    server = MlflowServer(tmp_path / "server", artifacts=f"s3://{BUCKET}/mlflow", env=server_env)
    with started(server):
        # The workstation: the smoke-sized pipeline of one model, logged to the server, pushed.
        first = tmp_path / "workstation"
        first.mkdir()
        env = machine(first, REPO_ROOT, server.url, data_mirror)
        smoke = [sys.executable, "-m", "dlpipe.smoke", "--keep", "--tmp", str(first),
                 "--tracking-uri", server.url, "--out", str(first / "out"),
                 "--models", "cnn"]  # fmt: skip
        run(smoke, REPO_ROOT, env, timeout=1200)
        [work] = first.glob("dlpipe-smoke-*")
        repo = work / "repo"
        env = machine(first, repo, server.url, data_mirror)
        use_team_remote(repo, env, s3_endpoint)
        run(["git", "add", "-A"], repo, env)
        run(["git", "commit", "-q", "-m", "results, the team remote"], repo, env)
        assert "team-secret-key" not in (repo / ".dvc" / "config").read_text()
        run([sys.executable, "-m", "dvc", "push"], repo, env)

        # The GPU box: a clone with its own HOME, DVC cache and folders, pulls and reruns nothing.
        second = tmp_path / "gpu-box"
        second.mkdir()
        clone = second / "repo"
        run(["git", "clone", "-q", str(repo), str(clone)], second, env)
        env2 = machine(second, clone, server.url, data_mirror)
        use_team_remote(clone, env2, s3_endpoint)
        run([sys.executable, "-m", "dvc", "pull"], clone, env2)
        status = run([sys.executable, "-m", "dvc", "status"], clone, env2)
        assert "up to date" in status, status
        repro = run([sys.executable, "-m", "dvc", "repro"], clone, env2)
        assert "Running stage" not in repro, repro
        assert (clone / "data" / "models" / "cnn" / "model.pt").is_file()
        assert (clone / "data" / "prepared" / "mnist" / "meta.json").is_file()

        # The first clone's artifacts, read through the server by the second: no keys needed.
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("dlpipe")
        assert experiment is not None
        runs = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("model") == "cnn"]  # fmt: skip
        download = subprocess.run(
            [sys.executable, "-c",
             "import sys; from mlflow.tracking import MlflowClient; "
             "print(MlflowClient().download_artifacts(sys.argv[1], 'learning_curves.png', "
             "sys.argv[2]))", runs[0].info.run_id, str(second)],
            env=env2, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert download.returncode == 0, download.stderr[-3000:]
        assert Path(download.stdout.strip()).read_bytes()[:4] == b"\x89PNG"

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **_boto_keys())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, MaxKeys=1000).get("Contents", [])]
    assert any(k.startswith("dvc/files/md5/") for k in keys), keys[:5]
    assert any(k.startswith("mlflow/") and k.endswith("learning_curves.png") for k in keys)
