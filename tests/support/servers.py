"""Servers for tests: a local HTTP server, a port nobody listens on, MLflow tracking servers
and model servers, started and stopped whole."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests


@dataclass
class Route:
    """What the test server answers for one path; `length` overrides Content-Length."""

    body: bytes = b""
    status: int = 200
    length: int | None = None


@dataclass
class Server:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def serve(
        self, path: str, body: bytes = b"", status: int = 200, length: int | None = None
    ) -> str:
        """Answer `path` with this response; returns its URL."""
        self.routes[path] = Route(body, status, length)
        return self.url(path)


@pytest.fixture
def http_server() -> Iterator[Server]:
    """A threaded HTTP server on 127.0.0.1; unknown paths answer 404."""
    state = Server(base="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] += 1
            route = state.routes.get(self.path, Route(status=404))
            self.send_response(route.status)
            length = route.length if route.length is not None else len(route.body)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(route.body)
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_model_server(
    model_uri: str, tracking_uri: str, log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """`mlflow models serve` of `model_uri` on a free 127.0.0.1 port, logging to `log_path`;
    the process (its own session: stop it with stop_process_group) and its URL."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri,
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, f"http://127.0.0.1:{port}"


def wait_for_ping(
    process: subprocess.Popen[bytes], url: str, log_path: Path, started: float
) -> None:
    """Until the scoring server answers /ping; fails the test if it exits or takes over 120 s."""
    while True:
        if process.poll() is not None:
            pytest.fail(f"server exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() - started > 120:
            pytest.fail(f"no /ping within 120 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server started with start_new_session=True (its workers too), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class MlflowServer:
    """A real `mlflow server` started as `make mlflow-server` starts it (`python -m
    dlpipe.team_server`: proxied artifacts, 127.0.0.1), with store `backend` (default: sqlite in
    `folder`), on `port`; a test may kill it and start it again: the same store comes back at
    the same URL."""

    folder: Path
    backend: str = ""
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    admin_password: str = ""  # given: MLflow's basic-auth app, users in `folder`/auth.db
    artifacts: str = ""  # where it keeps artifacts (default: `folder`/artifacts)
    env: dict[str, str] = field(default_factory=dict)  # the server's own (storage credentials)
    workers: int = 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start it and wait (≤ 60 s) until it answers /health; returns its URL."""
        command = [
            sys.executable, "-m", "dlpipe.team_server",
            "--backend-store-uri", self.backend or f"sqlite:///{self.folder / 'srv.db'}",
            "--artifacts-destination", self.artifacts or str(self.folder / "artifacts"),
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        if self.admin_password:
            command += ["--auth", "--auth-db-uri", f"sqlite:///{self.folder / 'auth.db'}"]
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = self.admin_password
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                tail = (self.folder / "server.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow server exited with {self.process.returncode}:\n{tail}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {self.url}/health within 60 s")
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


@contextmanager
def running_mlflow_server(folder: Path, backend: str) -> Iterator[str]:
    """An MlflowServer on store `backend` for the block; yields its URL."""
    server = MlflowServer(folder, backend)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free port; yields its URL."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()


@contextmanager
def started(server: MlflowServer) -> Iterator[MlflowServer]:
    """`server`, in a new folder of its own, started for the block."""
    server.folder.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def killable_mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A started `mlflow server` of this test's own, to kill and restart at will."""
    with started(MlflowServer(tmp_path / "mlflow-server")) as server:
        yield server
