"""`make mlflow-server`: one MLflow tracking server a team (and CI) logs to.

    python -m dlpipe.team_server                       sqlite store <project>/mlflow.db
    DLPIPE_MLFLOW_BACKEND_URI=postgresql://user:pw@db.example/mlflow python -m dlpipe.team_server

The backend store is the URI in DLPIPE_MLFLOW_BACKEND_URI (PostgreSQL for a team: the
`postgres` extra installs the driver), else the project's sqlite file. Artifacts are proxied
(`--artifacts-destination`, default <project>/mlartifacts): clients send and read models and
plots through the server and need no storage credentials. It listens on 127.0.0.1 unless
DLPIPE_MLFLOW_HOST (or --host) says otherwise. Point every checkout at it with
`export MLFLOW_TRACKING_URI=http://<host>:<port>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from dlpipe.errors import DlpipeError, exit_on_user_error, redact
from dlpipe.paths import project_root


def with_driver(backend: str) -> str:
    """A PostgreSQL URI names the driver the `postgres` extra installs (SQLAlchemy's default
    for plain postgresql:// is psycopg 3)."""
    for scheme in ("postgresql://", "postgres://"):
        if backend.startswith(scheme):
            return "postgresql+psycopg2://" + backend.removeprefix(scheme)
    return backend


def server_command(backend: str, artifacts: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow server` command line; refuses a backend whose driver is missing."""
    backend = with_driver(backend)
    if backend.startswith("postgresql+psycopg2://"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise DlpipeError(
                f"{redact(backend)}: PostgreSQL needs its driver: pip install -e '.[postgres]'"
            ) from None
    mlflow = shutil.which(
        "mlflow", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if mlflow is None:
        raise DlpipeError("the mlflow command is not installed (make installs it in .venv/bin)")
    return [
        mlflow,
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    root = project_root()
    parser = argparse.ArgumentParser(prog="python -m dlpipe.team_server", description=__doc__)
    parser.add_argument(
        "--backend-store-uri",
        default=os.environ.get("DLPIPE_MLFLOW_BACKEND_URI") or f"sqlite:///{root / 'mlflow.db'}",
        help="default: $DLPIPE_MLFLOW_BACKEND_URI, else sqlite:///<project>/mlflow.db",
    )
    parser.add_argument(
        "--artifacts-destination",
        default=os.environ.get("DLPIPE_MLFLOW_ARTIFACTS") or str(root / "mlartifacts"),
        help="where the server keeps artifacts (a folder, s3://..., gs://...)",
    )
    parser.add_argument("--host", default=os.environ.get("DLPIPE_MLFLOW_HOST", "127.0.0.1"))
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("DLPIPE_MLFLOW_PORT", "5000"))
    )
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    command = server_command(
        args.backend_store_uri, args.artifacts_destination, args.host, args.port, args.workers
    )
    print(
        f"mlflow server: store {redact(args.backend_store_uri)}, artifacts "
        f"{args.artifacts_destination}, http://{args.host}:{args.port}",
        flush=True,
    )
    os.execv(command[0], command)  # the server itself, so signals reach it directly


if __name__ == "__main__":
    main()
