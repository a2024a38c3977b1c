"""A real redis-server on 127.0.0.1 for tests: `RedisServer`, and the `redis_server` fixture.

Use the fixture with ``from tests.redis_server import redis_server`` in a test module. Tests
that need a server of their own (to stop and restart it) use `RedisServer` directly.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_redis_server() -> str:
    """The path of redis-server, or skip the test."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server)")
    return path


def ping(port: int, timeout: float = 0.5) -> bool:
    """True if a Redis server answers PING on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a fixed port, startable again; no persistence unless asked."""

    def __init__(
        self, directory: Path, port: int | None = None, *, persistent: bool = False
    ) -> None:
        self.persistent = persistent  # an append-only file, synced on every write
        self.executable = require_redis_server()
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = directory / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the whole test session; tests keep apart by key prefix or db."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    for attempt in range(3):
        try:
            server.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            server = RedisServer(server.directory)  # the port was taken meanwhile: another
    try:
        yield server
    finally:
        server.stop()
