"""Shared fixtures: the tiny GGUF (generated once per run) and live servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from make_tiny_gguf import write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
def settings_kwargs(tiny_model: Path, tmp_path: Path) -> dict[str, Any]:
    """Settings for a small, fast server on the tiny model, with its own session dir."""
    return {
        "model_path": tiny_model,
        "session_dir": tmp_path / "sessions",
        "num_of_concurrent_executions": 2,
        "max_queue_size": 4,
        "n_ctx": 512,
        "max_new_tokens": 32,
        "seed": 1234,
        "n_threads": 1,
    }


class LiveServer:
    """A real uvicorn server for an ASGI app, on a free 127.0.0.1 port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", ws="none", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def server_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on (for calling into the app from a test)."""
        return self.server.servers[0].get_loop()  # type: ignore[no-any-return]


@pytest.fixture
def live_server() -> Iterator[type[LiveServer]]:
    yield LiveServer


def eventually(predicate: Any, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` is true, or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def wait_idle(client: httpx.Client, timeout: float = 5.0) -> dict[str, int]:
    """Poll /health until no slot is busy and nothing waits; return the last figures."""
    deadline = time.monotonic() + timeout
    while True:
        load = client.get("/health").json()
        if load["processing"] == 0 and load["waiting"] == 0:
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {load}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def subprocess_server(
    args: list[str],
    env: dict[str, str],
    port: int,
    *,
    cwd: Path = ROOT,
    ready_path: str = "/health",
) -> Iterator[subprocess.Popen[str]]:
    """Run a server command in its own process until ``ready_path`` answers 200."""
    proc = subprocess.Popen(
        args,
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    proc.output = lambda: "".join(lines)  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                reader.join(5)
                raise RuntimeError(f"server exited: {''.join(lines)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(5)
        if proc.stdout:
            proc.stdout.close()
