"""One error mapping: the same failure gets the same status everywhere, in the envelope of the
route family that answered, before and after a stream started."""

from __future__ import annotations

import json

import pytest

from llamastream.chat.templates import ChatTemplate
from llamastream.engine.worker import Worker
from tests.api.conftest import Client

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_a_template_refusal_is_400_on_every_route(api: Client) -> None:
    async with api() as (client, app):
        app.state.service.pool.template = ChatTemplate("{{ raise_exception('roles!') }}")
        native = await client.post("/chat_stream", json={"user_input": "hi"})
        v1 = await client.post("/v1/chat/completions", json=CHAT)
        assert native.status_code == v1.status_code == 400
        assert native.json()["error"] == "template_error"
        assert "roles!" in native.json()["message"]
        assert v1.json()["error"]["code"] == "template_error"
        assert v1.json()["error"]["param"] == "messages"
        # Nothing was kept of the refused turn.
        assert (await client.get("/get_prompt")).status_code == 400  # the template refuses
        app.state.service.pool.template = ChatTemplate()
        assert (await client.get("/get_prompt")).json()["messages"] == []


async def test_not_ready_is_503_with_retry_after_in_each_envelope(api: Client) -> None:
    async with api(start=False) as (client, _):
        native = await client.post("/chat_stream", json={"user_input": "hi"})
        v1 = await client.post("/v1/chat/completions", json=CHAT)
        models = await client.get("/v1/models")
        health = await client.get("/health")
        for answer in (native, v1, models, health):
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "5"
        assert native.json() == {"error": "not_ready", "message": "the model is not loaded"}
        assert v1.json()["error"] == {
            "message": "the model is not loaded",
            "type": "server_error",
            "param": None,
            "code": "not_ready",
        }
        assert health.json()["status"] == "loading"


async def test_unknown_paths_and_methods(api: Client) -> None:
    async with api() as (client, _):
        missing = await client.post("/v1/chat/complete", json=CHAT)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        assert missing.json()["error"]["type"] == "invalid_request_error"
        wrong = await client.delete("/v1/chat/completions")
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "POST"
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        native_missing = await client.get("/no-such-page")
        assert native_missing.status_code == 404
        assert native_missing.json()["error"] == "not_found"
        native_wrong = await client.get("/chat_stream")
        assert native_wrong.status_code == 405
        assert native_wrong.json()["error"] == "method_not_allowed"
        assert "POST" in native_wrong.headers["allow"]


async def test_bad_bodies_name_the_field_in_each_envelope(api: Client) -> None:
    async with api() as (client, _):
        native = await client.post("/set_generation_params", json={"top_k": True})
        assert native.status_code == 400
        assert native.json()["field"] == "top_k"
        v1 = await client.post("/v1/chat/completions", json={**CHAT, "top_k": True})
        assert v1.status_code == 400
        assert v1.json()["error"]["param"] == "top_k"
        # The same limit, declared once, refuses the same value on both routes.
        native = await client.post("/set_generation_params", json={"repeat_penalty": 0})
        v1 = await client.post("/v1/chat/completions", json={**CHAT, "repeat_penalty": 0})
        assert native.status_code == v1.status_code == 400
        assert native.json()["field"] == v1.json()["error"]["param"] == "repeat_penalty"
        not_json = await client.post(
            "/v1/completions", content=b"{", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
        assert not_json.json()["error"]["param"] == "body"


async def test_an_error_mid_stream_ends_the_sse_stream_with_an_error_event(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_piece = Worker._piece
    calls = {"n": 0}

    def failing_piece(self: Worker, token: int, special: bool = False) -> bytes:
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected fault")
        return real_piece(self, token, special)

    monkeypatch.setattr(Worker, "_piece", failing_piece)
    async with api() as (client, _):
        body = {**CHAT, "max_tokens": 16, "stream": True}
        response = await client.post("/v1/chat/completions", json=body)
        events = [
            json.loads(line.removeprefix("data: "))
            for line in response.text.splitlines()
            if line.startswith("data: {")
        ]
        assert response.status_code == 200
        assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events)
        assert "[DONE]" not in response.text
        assert events[-1]["error"]["code"] == "generation_failed"
        assert events[-1]["error"]["type"] == "server_error"
