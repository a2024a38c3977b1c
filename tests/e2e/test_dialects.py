"""What every dialect shares, against one live server: the completion callback, metrics by
route, a client leaving mid-stream, and a full queue answered in the dialect's own shape."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from tests.conftest import eventually
from tests.e2e.conftest import paused, server

CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 3}),
    (
        "/v1/messages",
        {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
    ),
    (
        "/api/chat",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "options": {"num_predict": 3},
        },
    ),
    (
        "/api/generate",
        {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 3}},
    ),
]


def test_callbacks_metrics_and_disconnects_in_every_dialect(
    settings_kwargs: dict[str, Any],
) -> None:
    with server(settings_kwargs, n_ctx=2048, max_new_tokens=2000) as (live, _):
        with live.client() as client:
            for path, body in CALLS:
                assert client.post(path, json=body).status_code == 200, path
            assert live.recorder.wait_for(len(CALLS)) == ["success"] * len(CALLS)  # type: ignore[attr-defined]
            # A client that leaves mid-stream stops the generation; the callback says so.
            long = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "a long story"}],
                "options": {"num_predict": 1500},
            }
            with client.stream("POST", "/api/chat", json=long) as stream:
                for _ in stream.iter_lines():
                    break
            messages = live.recorder.wait_for(len(CALLS) + 1)  # type: ignore[attr-defined]
            assert messages[-1] == "client_disconnected_while_streaming"
            metrics = client.get("/metrics").text
        for path, _ in CALLS:
            assert f'route="{path}"' in metrics, path


def test_a_full_queue_in_each_dialects_shape(settings_kwargs: dict[str, Any]) -> None:
    with server(settings_kwargs, num_of_concurrent_executions=1, max_queue_size=0) as (live, app):
        with paused(app.state.service.pool.workers[0]):
            holder = threading.Thread(
                target=lambda: httpx.post(
                    live.url + "/chat_stream", json={"user_input": "x"}, timeout=30
                )
            )
            holder.start()
            with live.client() as client:
                eventually(lambda: client.get("/get_load").json()["processing"] >= 1)
                shapes = {}
                for path, body in CALLS:
                    busy = client.post(path, json=body)
                    assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
                    shapes[path] = busy.json()
        holder.join()
    assert shapes["/v1/chat/completions"]["error"]["type"] == "rate_limit_error"
    assert shapes["/v1/responses"]["error"]["type"] == "rate_limit_error"
    assert shapes["/v1/messages"] == {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": shapes["/v1/messages"]["error"]["message"],
        },
    }
    assert set(shapes["/api/chat"]) == {"error"} and isinstance(shapes["/api/chat"]["error"], str)
    assert set(shapes["/api/generate"]) == {"error"}
