"""`llamastream serve` stopped by SIGTERM (graceful) and by kill -9 (crash), then restarted."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, subprocess_server

# Greedy decoding: the tiny model's first reply to "long" runs to the 8000-token limit (seconds).
FLAGS = ["--n-ctx", "8192", "--max-new-tokens", "8000", "--temperature", "0", "--n-threads", "1"]


@contextlib.contextmanager
def serve(model: Path, sessions: Path, port: int, *flags: str) -> Iterator[subprocess.Popen[str]]:
    args = [sys.executable, "-m", "llamastream", "serve", "--port", str(port)]
    args += ["--model", str(model), "--session-dir", str(sessions), *FLAGS, *flags]
    with subprocess_server(args, {"PYTHONUNBUFFERED": "1"}, port) as proc:
        yield proc


@contextlib.contextmanager
def new_session(base: str) -> Iterator[httpx.Client]:
    """A client of its own (its own cookie jar), holding a new session."""
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.post("/set_generation_params", json={}).status_code == 200
        yield client


def messages(client: httpx.Client) -> list[dict[str, object]]:
    answer = client.get("/get_prompt")
    assert answer.status_code == 200
    return answer.json()["messages"]  # type: ignore[no-any-return]


def test_sigterm_drains_then_exits_cleanly(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (
        serve(tiny_model, tmp_path / "s", port, "--shutdown-grace-s", "1") as proc,
        new_session(base) as client,
    ):
        with client.stream("POST", "/chat_stream", json={"user_input": "long"}) as stream:
            chunks = stream.iter_raw()  # kept: a dropped iterator closes the connection
            received = [next(chunks)]
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # Still answering while it drains: health says so, new work is refused.
            health = httpx.get(f"{base}/health")
            assert health.status_code == 503
            assert health.json()["status"] == "draining"
            refused = httpx.post(f"{base}/chat_stream", json={"user_input": "x"})
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            with contextlib.suppress(httpx.HTTPError):  # plain text can only be cut short
                received.extend(chunks)
            ended = time.monotonic() - signalled
        assert 0.8 < ended < 5  # the grace period, then the stream was stopped
        assert proc.wait(15) == 0
        log = proc.output()  # type: ignore[attr-defined]
        assert "draining" in log
        assert "unknown_error_occurred" in log  # its callback fired
        cookies = client.cookies
    # The stopped turn was kept as a partial reply, whole characters only.
    with (
        serve(tiny_model, tmp_path / "s", port),
        httpx.Client(base_url=base, cookies=cookies, timeout=30) as client,
    ):
        history = messages(client)
        assert [m["content"] for m in history][:1] == ["long"]
        assert history[1]["partial"] is True
        reply = str(history[1]["content"])
        assert reply and "\ufffd" not in reply
        assert b"".join(received).decode("utf-8", errors="ignore").startswith(reply[:1])


def test_kill_9_mid_stream_loses_no_session(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    jars: list[httpx.Cookies] = []
    before: list[list[dict[str, object]]] = []
    with serve(tiny_model, tmp_path / "s", port) as proc, contextlib.ExitStack() as stack:
        clients = [stack.enter_context(new_session(base)) for _ in range(4)]
        for n, client in enumerate(clients):
            client.post("/set_generation_params", json={"max_new_tokens": 8})
            assert client.post("/chat_stream", json={"user_input": f"hi {n}"}).status_code == 200
            client.post("/set_generation_params", json={"max_new_tokens": 8000})
            jars.append(client.cookies)
            before.append(messages(client))
        for client in clients[:2]:  # two sessions are mid-turn when the process dies
            stream = stack.enter_context(
                client.stream("POST", "/chat_stream", json={"user_input": "long"})
            )
            chunks = stream.iter_raw()
            stack.callback(chunks.close)
            assert next(chunks)
        proc.kill()
        proc.wait(10)
    with serve(tiny_model, tmp_path / "s", port):
        for jar, earlier in zip(jars, before, strict=True):
            with httpx.Client(base_url=base, cookies=jar, timeout=30) as client:
                # Every session loads, holding the state before the interrupted turn.
                assert messages(client) == earlier
        # The dead process's turn locks do not block these sessions.
        with httpx.Client(base_url=base, cookies=jars[0], timeout=30) as client:
            client.post("/set_generation_params", json={"max_new_tokens": 4})
            assert client.post("/chat_stream", json={"user_input": "again"}).status_code == 200


@pytest.mark.parametrize("flag", ["--shutdown-grace-s", "--max-queue-wait-s"])
def test_limits_are_flags(flag: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llamastream", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert flag in out
