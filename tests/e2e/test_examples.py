"""ChatStream's three documented endpoint examples, run unchanged under uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from tests.conftest import eventually, free_port, subprocess_server


def _serve(module: str, tiny_model: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    env = {
        "LLAMASTREAM_MODEL_PATH": str(tiny_model),
        "LLAMASTREAM_SESSION_DIR": str(tmp_path / "sessions"),
        "LLAMASTREAM_MAX_NEW_TOKENS": "16",
        "LLAMASTREAM_N_CTX": "512",
        "PYTHONUNBUFFERED": "1",
    }
    args = [sys.executable, "-m", "uvicorn", f"examples.{module}:app", "--port", str(port)]
    return port, subprocess_server(args, env, port, ready_path="/openapi.json")


def _chat(port: int, client: httpx.Client, body: dict[str, object]) -> tuple[str, str]:
    with client.stream("POST", f"http://127.0.0.1:{port}/chat_stream", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        text = "".join(r.iter_text())
        return text, r.headers["x-chatstream-last-generated-message-id"]


def test_basic_example(tiny_model: Path, tmp_path: Path) -> None:
    port, server = _serve("basic", tiny_model, tmp_path)
    with server, httpx.Client(timeout=30) as client:
        first, first_id = _chat(port, client, {"user_input": "hello"})
        again, again_id = _chat(port, client, {"user_input": "and again"})
        assert first and again
        assert first_id != again_id
        assert "llamastream_session" in client.cookies


def test_interception_example_reads_the_body_first(tiny_model: Path, tmp_path: Path) -> None:
    port, server = _serve("interception", tiny_model, tmp_path)
    with server, httpx.Client(timeout=30) as client:
        text, _ = _chat(port, client, {"user_input": "hello", "regenerate": False})
        assert text
        regenerated, _ = _chat(port, client, {"user_input": "hello", "regenerate": True})
        assert regenerated


def test_callback_example_prints_the_conversation(tiny_model: Path, tmp_path: Path) -> None:
    port, server = _serve("callback", tiny_model, tmp_path)
    with server as proc, httpx.Client(timeout=30) as client:
        text, _ = _chat(port, client, {"user_input": "callback check"})
        expected = (
            f"<|im_start|>user\ncallback check<|im_end|>\n<|im_start|>assistant\n{text}<|im_end|>"
        )
        eventually(lambda: expected in proc.output())
