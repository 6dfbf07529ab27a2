"""`make mlflow-server`: one MLflow tracking server a team (and CI) logs to.

    python -m dlpipe.team_server                       sqlite store <project>/mlflow.db
    DLPIPE_MLFLOW_BACKEND_URI=postgresql://user:pw@db.example/mlflow python -m dlpipe.team_server

The backend store is the URI in DLPIPE_MLFLOW_BACKEND_URI (PostgreSQL for a team: the
`postgres` extra installs the driver), else the project's sqlite file. Artifacts are proxied
(`--artifacts-destination`, default <project>/mlartifacts): clients send and read models and
plots through the server and need no storage credentials. It listens on 127.0.0.1 unless
DLPIPE_MLFLOW_HOST (or --host) says otherwise. Point every checkout at it with
`export MLFLOW_TRACKING_URI=http://<host>:<port>`.

Bound beyond loopback it always runs MLflow's `basic-auth` app (on loopback with --auth or
DLPIPE_MLFLOW_AUTH=1): every request needs a user's name and password, users are kept in
DLPIPE_MLFLOW_AUTH_DB_URI (default <project>/mlflow-auth.db), and each one reads everything
(`default_permission = READ`) but writes only where an admin granted it (`dlpipe.team_users`).
The first start creates the admin user, `admin` (or MLFLOW_AUTH_ADMIN_USERNAME), with the
password in MLFLOW_AUTH_ADMIN_PASSWORD, read from the environment only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
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


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
AUTH_CONFIG = """[mlflow]
default_permission = READ
database_uri = {database}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = {cache_seconds}
"""


def auth_environment(database: str, config_path: Path, cache_seconds: int) -> dict[str, str]:
    """What the `basic-auth` app reads: its config (no secret in it) and the key that signs its
    forms; refuses to start an empty user store without an admin password.

    `cache_seconds` > 0: each worker checks a user's password once per that many seconds, not
    on every request (MLflow's `auth_cache_ttl_seconds`). The check is a deliberately slow
    scrypt hash, and a training's logging sends a request every few seconds."""
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        raise DlpipeError(
            "MLflow's basic-auth app needs Flask-WTF: pip install flask-wtf"
        ) from None
    database = with_driver(database)
    first_start = (
        database.startswith("sqlite:///") and not Path(database.removeprefix("sqlite:///")).exists()
    )
    if first_start and not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        raise DlpipeError(
            "the first authenticated start creates the admin user: set MLFLOW_AUTH_ADMIN_PASSWORD"
        )
    config = AUTH_CONFIG.format(database=database, cache_seconds=cache_seconds)
    config_path.write_text(config, encoding="utf-8")
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config_path),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or secrets.token_hex(32),  # one server's workers share it; a team's servers set their own
    }


def server_command(
    backend: str, artifacts: str, host: str, port: int, workers: int, auth: bool = False
) -> list[str]:
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
        *(["--app-name", "basic-auth"] if auth else []),
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
    parser.add_argument(
        "--auth",
        action="store_true",
        default=os.environ.get("DLPIPE_MLFLOW_AUTH", "") not in ("", "0", "false"),
        help="MLflow's basic-auth app on loopback too (always on beyond it)",
    )
    parser.add_argument(
        "--auth-db-uri",
        default=os.environ.get("DLPIPE_MLFLOW_AUTH_DB_URI")
        or f"sqlite:///{root / 'mlflow-auth.db'}",
        help="where the users and their permissions are kept",
    )
    parser.add_argument(
        "--auth-cache-seconds",
        type=int,
        default=int(os.environ.get("DLPIPE_MLFLOW_AUTH_CACHE_S", "60")),
        help="how long a worker trusts a checked password (0: check on every request); a "
        "password change reaches the server's other workers within it",
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    auth = args.auth or args.host not in LOOPBACK
    command = server_command(
        args.backend_store_uri, args.artifacts_destination, args.host, args.port, args.workers, auth
    )
    if auth:
        config = Path(tempfile.gettempdir(), f"dlpipe-mlflow-auth-{args.port}.ini")  # no secret
        os.environ.update(auth_environment(args.auth_db_uri, config, args.auth_cache_seconds))
    print(
        f"mlflow server: store {redact(args.backend_store_uri)}, artifacts "
        f"{args.artifacts_destination}, http://{args.host}:{args.port}"
        + (f", basic-auth (users in {redact(args.auth_db_uri)})" if auth else ""),
        flush=True,
    )
    os.execv(command[0], command)  # the server itself, so signals reach it directly


if __name__ == "__main__":
    main()
