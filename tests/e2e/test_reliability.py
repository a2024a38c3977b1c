"""Operations, access control, limits and faults, end to end on a live server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llamastream.api.middleware import RequestIdFilter
from tests.conftest import eventually, wait_idle
from tests.e2e.conftest import chat, metric, paused, prompt_of, server


def chat_once(live: Any, **body: Any) -> httpx.Response:
    with live.client() as client:
        return chat(client, **body)


def test_metrics_count_requests_waits_and_tokens(settings_kwargs: dict[str, Any]) -> None:
    with server(settings_kwargs) as (live, _), live.client() as client:
        reply = chat(client, user_input="hello")
        assert reply.status_code == 200
        assert chat(client, user_input="").status_code == 400
        live.recorder.wait_for(1)
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        gen = {"route": "/chat_stream", "outcome": "success"}
        assert metric(text, "llamastream_generations_total", **gen) == 1
        ok = {"route": "/chat_stream", "method": "POST", "status": "200"}
        assert metric(text, "llamastream_http_requests_total", **ok) == 1
        bad = {"route": "/chat_stream", "method": "POST", "status": "400"}
        assert metric(text, "llamastream_http_requests_total", **bad) == 1
        assert metric(text, "llamastream_generated_tokens_total") >= 1
        assert metric(text, "llamastream_prompt_tokens_total") >= 1
        assert metric(text, "llamastream_queue_wait_seconds_count") == 1
        assert metric(text, "llamastream_time_to_first_token_seconds_count") == 1
        assert metric(text, "llamastream_slots") == 2
        assert metric(text, "llamastream_busy_slots") == 0
        assert metric(text, "llamastream_queue_depth") == 0
        # The worker's own step timers: one decode per generated token at least (the prompt's
        # step included), every row of each counted, and time in each phase a step has.
        generated = metric(text, "llamastream_generated_tokens_total")
        steps = metric(text, "llamastream_decode_steps_total")
        assert steps >= generated
        rows = metric(text, "llamastream_decode_step_tokens_total")
        assert rows >= steps + metric(text, "llamastream_prompt_tokens_total") - 1
        assert metric(text, "llamastream_decode_step_slots_total") == steps  # one slot in use
        assert metric(text, "llamastream_decode_step_runs_total") == steps
        for phase in ("build", "decode", "sample", "emit"):
            assert metric(text, "llamastream_decode_step_seconds_total", phase=phase) > 0, phase
        assert metric(text, "llamastream_decode_step_seconds_total", phase="draft") == 0
        # Every event the worker handed over was taken by the stream, each after some wait.
        events = metric(text, "llamastream_stream_events_total")
        assert events >= 2  # text, and the end
        assert 0 < metric(text, "llamastream_stream_event_wait_seconds_total") < events * 5
        # Unknown paths share one label value: no label per probed URL.
        client.get("/no/such/path/12345")
        text = client.get("/metrics").text
        assert metric(text, "llamastream_http_requests_total", route="unmatched") == 1
        assert "/no/such/path" not in text


def test_busy_slots_and_queue_depth_are_live(settings_kwargs: dict[str, Any]) -> None:
    with server(settings_kwargs, num_of_concurrent_executions=1) as (live, app):
        threads = [
            threading.Thread(target=chat_once, args=(live,), kwargs={"user_input": text})
            for text in ("x", "y")
        ]
        with live.client() as client, paused(app.state.service.pool.workers[0]):
            for thread in threads:
                thread.start()
            eventually(lambda: client.get("/get_load").json()["waiting"] == 1)
            text = client.get("/metrics").text
            assert metric(text, "llamastream_busy_slots") == 1
            assert metric(text, "llamastream_queue_depth") == 1
        for thread in threads:
            thread.join(10)


def test_request_ids(settings_kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    with server(settings_kwargs) as (live, _), live.client() as client:
        caplog.set_level("INFO", logger="llamastream.access")
        caplog.handler.addFilter(RequestIdFilter())
        minted = client.get("/health").headers["x-request-id"]
        assert len(minted) == 32
        assert client.get("/health").headers["x-request-id"] != minted
        given = client.get("/health", headers={"X-Request-Id": "lb-1234.abc"})
        assert given.headers["x-request-id"] == "lb-1234.abc"
        hostile = client.get("/health", headers={"X-Request-Id": b"a b;" + b"\xe9" * 100})
        assert hostile.headers["x-request-id"] != "a b"
        assert len(hostile.headers["x-request-id"]) == 32
        eventually(
            lambda: any("lb-1234.abc" in getattr(r, "request_id", "") for r in caplog.records)
        )
        streamed = client.post("/chat_stream", json={"user_input": "hi"})
        assert len(streamed.headers["x-request-id"]) == 32


@pytest.fixture
def roles(settings_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        **settings_kwargs,
        "api_keys": ["user-key"],
        "admin_keys": ["admin-key"],
        "endpoint_roles": {"get_prompt": "admin", "get_load": "admin", "metrics": "admin"},
    }


def test_roles_per_endpoint(roles: dict[str, Any]) -> None:
    user = {"Authorization": "Bearer user-key"}
    admin = {"Authorization": "Bearer admin-key"}
    with server(roles) as (live, _), live.client() as client:
        # Users chat, regenerate, clear and set their parameters without a key (public).
        assert chat(client, user_input="hi").status_code == 200
        assert chat(client, regenerate=True).status_code == 200
        assert client.post("/set_generation_params", json={"top_k": 5}).status_code == 200
        assert client.get("/get_generation_params").json()["top_k"] == 5
        assert client.post("/clear_context").status_code == 200
        for path in ("/get_prompt", "/get_load", "/metrics"):
            anonymous = client.get(path)
            assert anonymous.status_code == 401, path
            assert anonymous.json()["error"] == "invalid_api_key"
            wrong = client.get(path, headers={"Authorization": "Bearer guess"})
            assert wrong.status_code == 401, path
            forbidden = client.get(path, headers=user)
            assert forbidden.status_code == 403, path
            assert forbidden.json()["error"] == "forbidden"
            assert client.get(path, headers=admin).status_code == 200, path
        # The /v1 API takes user keys, and admin keys too.
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        assert client.post("/v1/chat/completions", json=body, headers=user).status_code == 200
        assert client.post("/v1/chat/completions", json=body, headers=admin).status_code == 200
        assert client.get("/health").status_code == 200  # always public
        assert live.recorder.wait_for(4) == ["success"] * 4


def test_an_admin_role_without_admin_keys_is_refused_at_start(
    settings_kwargs: dict[str, Any],
) -> None:
    from llamastream import Settings

    with pytest.raises(ValueError, match="admin_keys is empty"):
        Settings(**settings_kwargs, endpoint_roles={"metrics": "admin"})
    with pytest.raises(ValueError, match="unknown endpoint 'metrix'"):
        Settings(**settings_kwargs, endpoint_roles={"metrix": "public"})


def _chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 4096):
        yield data[start : start + 4096]


BAD_REQUESTS = [
    # (method, path, body bytes, expected status, expected field)
    ("POST", "/chat_stream", b"not json", 400, "body"),
    ("POST", "/chat_stream", b"\xff\xfe{", 400, "body"),
    ("POST", "/chat_stream", b'"a string"', 400, "body"),
    ("POST", "/chat_stream", b'{"user_input": ["a"]}', 400, "user_input"),
    ("POST", "/chat_stream", b'{"user_input": null}', 400, "user_input"),
    ("POST", "/chat_stream", b'{"user_input": "' + b"x" * 2001 + b'"}', 400, "user_input"),
    ("POST", "/chat_stream", b'{"user_input": "a", "regenerate": 1}', 400, "regenerate"),
    ("POST", "/set_generation_params", b'{"temperature": -1}', 400, "temperature"),
    ("POST", "/set_generation_params", b'{"max_new_tokens": 1e300}', 400, "max_new_tokens"),
    (
        "POST",
        "/set_generation_params",
        b'{"max_new_tokens": 99999999999999999999}',
        400,
        "max_new_tokens",
    ),
    # above what the context allows (n_ctx 512: at most 511 tokens of reply)
    ("POST", "/set_generation_params", b'{"max_new_tokens": 512}', 400, "max_new_tokens"),
    ("POST", "/set_generation_params", b'{"seed": -5}', 400, "seed"),
    ("POST", "/set_generation_params", b'{"seed": false}', 400, "seed"),
    ("POST", "/set_generation_params", b'{"temperature": true}', 400, "temperature"),
    ("POST", "/set_generation_params", b'{"temprature": 0.5}', 400, "temprature"),
    ("POST", "/set_generation_params", b'{"top_p": "high"}', 400, "top_p"),
    ("POST", "/set_generation_params", b"[]", 400, "body"),
    ("POST", "/v1/chat/completions", b'{"model": "tiny"}', 400, "messages"),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "robot"}]}',
        400,
        "messages.0.role",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * 2001 + b'"}]}',
        400,
        "messages.0.content",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1000}',
        400,
        "max_tokens",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": -3}',
        400,
        "max_tokens",
    ),
    ("POST", "/v1/completions", b'{"model": "tiny", "prompt": 12}', 400, "prompt"),
    (
        "POST",
        "/v1/completions",
        b'{"model": "tiny", "prompt": "a", "temperature": 1e999}',
        400,
        "temperature",
    ),
]


def test_malformed_requests_get_4xx_naming_the_field_and_change_nothing(
    settings_kwargs: dict[str, Any],
) -> None:
    with server(settings_kwargs, max_input_chars=2000, max_body_bytes=8192) as (live, _):
        with live.client() as client:
            assert chat(client, user_input="before").status_code == 200
            client.post("/set_generation_params", json={"top_k": 7})
            before = prompt_of(client), client.get("/get_generation_params").json()
            for method, path, body, status, field in BAD_REQUESTS:
                response = client.request(
                    method, path, content=body, headers={"content-type": "application/json"}
                )
                assert response.status_code == status, (path, body[:60], response.text)
                payload = response.json()
                named = payload["field"] if "field" in payload else payload["error"]["param"]
                assert named == field, (path, body[:60], payload)
            # A body past the limit, with or without Content-Length (chunked).
            big = json.dumps({"user_input": "y" * 20_000}).encode()
            for content in (big, _chunks(big)):
                response = client.post(
                    "/chat_stream", content=content, headers={"content-type": "application/json"}
                )
                assert response.status_code == 413
                assert response.json()["field"] == "body"
            after = prompt_of(client), client.get("/get_generation_params").json()
            assert after == before
            wait_idle(client)
            assert chat(client, user_input="after").status_code == 200
            assert live.recorder.wait_for(2) == ["success", "success"]  # none for the refused


def test_a_request_waiting_too_long_gets_503(settings_kwargs: dict[str, Any]) -> None:
    limits = {"num_of_concurrent_executions": 1, "max_queue_wait_s": 0.5}
    with server(settings_kwargs, **limits) as (live, app), live.client() as client:
        results: list[httpx.Response] = []
        holder = threading.Thread(target=lambda: results.append(chat_once(live, user_input="a")))
        with paused(app.state.service.pool.workers[0]):
            holder.start()
            eventually(lambda: client.get("/get_load").json()["processing"] == 1)
            with live.client() as waiter:
                started = time.monotonic()
                late = chat(waiter, user_input="b")
                waited = time.monotonic() - started
                assert late.status_code == 503
                assert late.json()["error"] == "queue_timeout"
                assert int(late.headers["retry-after"]) >= 1
                assert 0.4 < waited < 5
                assert prompt_of(waiter)["messages"] == []  # the turn was not kept
            assert client.get("/get_load").json()["waiting"] == 0
        holder.join(10)
        assert results[0].status_code == 200
        assert sorted(live.recorder.wait_for(2)) == ["success", "unknown_error_occurred"]


def test_generation_stops_at_the_time_limit(settings_kwargs: dict[str, Any]) -> None:
    with server(settings_kwargs, max_generation_s=0.3) as (live, app), live.client() as client:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "stream": False}
        results: list[httpx.Response] = []
        asker = threading.Thread(
            target=lambda: results.append(client.post("/v1/chat/completions", json=body))
        )
        with paused(app.state.service.pool.workers[0]):
            asker.start()
            time.sleep(0.6)
        asker.join(10)
        answer = results[0].json()
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 0
        assert live.recorder.wait_for(1) == ["success"]
        # Without the pause the same request finishes well within the limit.
        assert client.post("/v1/chat/completions", json=body).json()["choices"][0][
            "finish_reason"
        ] in ("stop", "length")


def test_an_unwritable_session_store_refuses_chat(
    settings_kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with server(settings_kwargs) as (live, app), live.client() as client:
        assert chat(client, user_input="kept").status_code == 200
        before = prompt_of(client)
        cache = app.state.session_store._cache

        def full(*args: object, **kwargs: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(cache, "set", full)
        refused = chat(client, user_input="would be lost")
        assert refused.status_code == 503
        assert refused.json()["error"] == "session_store_unavailable"
        assert "disk is full" in refused.json()["message"]
        assert client.post("/clear_context").status_code == 503
        assert client.get("/health").status_code == 200  # the model still serves
        wait_idle(client)
        monkeypatch.undo()
        assert prompt_of(client) == before
        assert chat(client, user_input="again").status_code == 200
        assert live.recorder.wait_for(2) == ["success", "success"]  # refused: not accepted


def test_drain_lets_streams_finish_then_stops_them(settings_kwargs: dict[str, Any]) -> None:
    with server(settings_kwargs, num_of_concurrent_executions=1) as (live, app):
        chat_stream = app.state.chat_stream
        worker = chat_stream.service.pool.workers[0]
        results: list[httpx.Response] = []
        with live.client() as client:
            assert chat(client, user_input="one").status_code == 200
            running = threading.Thread(
                target=lambda: results.append(chat(client, user_input="two"))
            )
            queued = threading.Thread(
                target=lambda: results.append(chat_once(live, user_input="three"))
            )
            with paused(worker):
                running.start()
                eventually(lambda: client.get("/get_load").json()["processing"] == 1)
                queued.start()
                eventually(lambda: client.get("/get_load").json()["waiting"] == 1)
                loop = live.server_loop()
                drained = asyncio.run_coroutine_threadsafe(chat_stream.drain(0.5), loop)
                eventually(lambda: client.get("/health").status_code == 503)
                health = client.get("/health")
                assert health.json()["status"] == "draining"
                assert health.headers["retry-after"]
                refused = chat_once(live, user_input="new")
                assert refused.status_code == 503
                assert refused.json()["error"] == "not_ready"
                time.sleep(0.7)  # past the grace period: the running turn is stopped
            drained.result(10)
            running.join(10)
            queued.join(10)
            statuses = sorted(r.status_code for r in results)
            # The queued request got 503 at once; the running one (paused: no text yet) was
            # stopped at the end of the grace period and answered 503 before any text.
            assert statuses == [503, 503]
            assert sorted(live.recorder.wait_for(3)) == [
                "success",
                "unknown_error_occurred",
                "unknown_error_occurred",
            ]
            assert chat_stream.service.slots.load().processing == 0
            # Nothing of the stopped turn was kept: the history is the first turn.
            chat_stream.service.draining = False
            assert [m["content"] for m in prompt_of(client)["messages"]][:1] == ["one"]
            assert len(prompt_of(client)["messages"]) == 2


def test_one_session_cannot_read_or_alter_another(settings_kwargs: dict[str, Any]) -> None:
    with server(settings_kwargs) as (live, _):
        with live.client() as alice, live.client() as mallory:
            assert chat(alice, user_input="alice's secret").status_code == 200
            cookie = alice.cookies["llamastream_session"]
            assert chat(mallory, user_input="hello").status_code == 200
            assert "alice's secret" not in str(prompt_of(mallory))
            # Guesses near Alice's id name no stored session: each gets a fresh one.
            near = cookie[:-1] + ("A" if cookie[-1] != "A" else "B")
            for guess in (cookie[:-1], near, cookie + "=", "x" * 500):
                with live.client(headers={"cookie": f"llamastream_session={guess}"}) as forger:
                    seen = forger.get("/get_prompt")
                    assert seen.json()["messages"] == []
                    assert seen.cookies["llamastream_session"] not in (guess, cookie)
                    assert forger.post("/clear_context").status_code == 200
            mallory.post("/set_generation_params", json={"temperature": 0.1})
            assert [m["content"] for m in prompt_of(alice)["messages"]][:1] == ["alice's secret"]
            assert alice.get("/get_generation_params").json()["temperature"] == 0.7


def test_the_cookie_can_be_marked_secure(settings_kwargs: dict[str, Any]) -> None:
    with server(settings_kwargs, cookie_secure=True) as (live, _), live.client() as client:
        issued = client.get("/get_generation_params").headers["set-cookie"]
        assert "Secure" in issued and "HttpOnly" in issued and "SameSite=Lax" in issued


def test_a_client_leaving_during_prompt_evaluation(settings_kwargs: dict[str, Any]) -> None:
    """The slot is granted and the prompt handed to the worker, no token yet: the client
    leaves. The job is cancelled, the slot freed, the history left as it was."""
    with server(settings_kwargs, num_of_concurrent_executions=1) as (live, app):
        worker = app.state.service.pool.workers[0]
        with live.client() as client:
            assert chat(client, user_input="kept").status_code == 200
            before = prompt_of(client)
            with paused(worker), live.client(cookies=client.cookies) as leaver:
                with pytest.raises(httpx.ReadTimeout):
                    leaver.post("/chat_stream", json={"user_input": "left"}, timeout=0.5)
                assert client.get("/health").json()["processing"] == 1  # it held the slot
            assert live.recorder.wait_for(2)[1] == "client_disconnected_before_streaming"
            wait_idle(client)
            assert prompt_of(client) == before
            assert chat(client, user_input="next").status_code == 200


def test_a_cookie_the_store_could_not_check_is_never_adopted(
    settings_kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with server(settings_kwargs) as (live, app):
        cache = app.state.session_store._cache
        real_get = cache.get
        failures = iter([True])

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if next(failures, False):  # the middleware's load fails, the store then recovers
                raise sqlite3.OperationalError("disk I/O error")
            return real_get(*args, **kwargs)

        monkeypatch.setattr(cache, "get", flaky)
        chosen = {"cookie": "llamastream_session=chosen-by-the-client"}
        with live.client(headers=chosen) as client:
            refused = chat(client, user_input="hi")
            assert refused.status_code == 503
            assert refused.json()["error"] == "session_store_unavailable"
        assert real_get("session:chosen-by-the-client") is None  # no record under that id
        with live.client(headers=chosen) as client:
            answer = chat(client, user_input="hi")  # the store works: a server-issued id
            assert answer.status_code == 200
            assert answer.cookies["llamastream_session"] != "chosen-by-the-client"
