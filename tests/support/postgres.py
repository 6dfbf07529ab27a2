"""A throw-away PostgreSQL cluster for the tests of a shared tracking server."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.servers import free_port


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL server binaries (/usr/lib/postgresql/<version>/bin), if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def as_postgres(command: list[str]) -> list[str]:
    """initdb and pg_ctl refuse to run as root: run them as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres_uri() -> Iterator[str]:
    """$DLPIPE_TEST_POSTGRES_URI (an empty database, e.g. CI's postgres service container), else
    a PostgreSQL cluster in a temporary folder, on its own unix socket and port, with an empty
    database `mlflow`; stopped and deleted afterwards."""
    given = os.environ.get("DLPIPE_TEST_POSTGRES_URI")
    if given:
        yield given
        return
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL")
    folder = Path(tempfile.mkdtemp(prefix="dlpipe-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, port = folder / "data", free_port()
    options = f"-k {folder} -p {port} -c listen_addresses='' -c fsync=off"
    pg_ctl = as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-w"])
    try:
        subprocess.run(
            as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*pg_ctl, "-o", options, "-l", str(folder / "log"), "start"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            as_postgres([str(bindir / "createdb"), "-h", str(folder), "-p", str(port), "mlflow"]),
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@/mlflow?host={folder}&port={port}"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
