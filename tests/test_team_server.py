"""A shared MLflow server (`make mlflow-server`) on a throw-away PostgreSQL cluster, with the
smoke pipeline logging to it: runs, histories, models, registry aliases and artifacts, all read
back through the server. Where PostgreSQL is not installed, the same runs against the sqlite
server, and the test says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.families import REPO_ROOT
from support.postgres import postgres_bin
from support.servers import running_mlflow_server

from dlpipe.cli import compared
from dlpipe.config import parse_params
from dlpipe.smoke.params import smoke_params

# One model (and its dataset's linear models) is enough to see every kind of run go through the
# server; the CI smoke step runs them all.
MODELS = ["transformer"]


def test_the_server_refuses_postgres_without_its_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlpipe.errors import DlpipeError
    from dlpipe.team_server import server_command

    monkeypatch.setitem(sys.modules, "psycopg2", None)  # import fails as if not installed
    with pytest.raises(DlpipeError, match=r"psycopg2://\*\*\*@h/db: PostgreSQL needs"):
        server_command("postgresql://u:pw@h/db", "/tmp/a", "127.0.0.1", 5000, 1)


@pytest.mark.slow
@pytest.mark.integration
def test_smoke_pipeline_through_a_shared_server_on_postgres(
    tmp_path: Path, request: pytest.FixtureRequest, data_mirror: str
) -> None:
    mirror = data_mirror
    if postgres_bin() is None and not os.environ.get("DLPIPE_TEST_POSTGRES_URI"):
        print("PostgreSQL is not installed: the shared server runs on sqlite instead")
        backend = f"sqlite:///{tmp_path / 'server.db'}"
    else:
        backend = request.getfixturevalue("postgres_uri")
    from mlflow.tracking import MlflowClient

    experiment, prefix = f"smoke-{int(time.time())}", "team-"
    with running_mlflow_server(tmp_path, backend) as url:
        out = tmp_path / "out"
        command = [
            sys.executable, "-m", "dlpipe.smoke", "--mirror", mirror, "--out", str(out),
            "--tracking-uri", url, "--tmp", str(tmp_path),
            "--set", f"mlflow.experiment={experiment}", "--set", f"registry.name_prefix={prefix}",
            "--models", *MODELS,
        ]  # fmt: skip
        result = subprocess.run(
            command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]

        # Everything reads back through the server: runs, histories, registry, artifacts.
        client = MlflowClient(url)
        found = client.get_experiment_by_name(experiment)
        assert found is not None
        logged = client.search_runs([found.experiment_id])
        runs = [run for run in logged if run.data.tags.get("linear") != "true"]
        raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
        params = parse_params(smoke_params(raw, models=MODELS))
        linear = [run for run in logged if run not in runs]  # each dataset's linear models
        assert sorted(run.data.tags["model"] for run in linear) == sorted(
            name for name in compared(params) if name not in params.train
        )
        for run in linear:
            assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        assert sorted(r.data.tags["model"] for r in runs) == sorted(params.train)
        for run in runs:
            assert run.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
            model = run.data.tags["model"]
            champion = client.get_model_version_by_alias(f"{prefix}{model}", "champion")
            assert champion.run_id == run.info.run_id
            local = client.download_artifacts(run.info.run_id, "learning_curves.png", str(tmp_path))
            assert Path(local).read_bytes()[:4] == b"\x89PNG"
        # the registered raw-input model loads and predicts through the server
        env = {**os.environ, "MLFLOW_TRACKING_URI": url}
        predict = [sys.executable, "-m", "dlpipe.cli", "predict", "transformer", "a fine film"]
        uri = f"models:/{prefix}transformer@champion"
        done = subprocess.run(
            [*predict, "--model-uri", uri, "--json"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        [record] = json.loads(done.stdout)
        assert record["label_name"] in {"negative", "positive"}
