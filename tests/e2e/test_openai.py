"""The /v1 API through the official openai client, against a live server on the tiny model."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llamastream import create_app
from tests.conftest import LiveServer, eventually, wait_idle
from tests.e2e.conftest import Recorder, paused

MODEL = "tiny"


@contextlib.contextmanager
def api(settings_kwargs: dict[str, Any], **changes: Any) -> Iterator[tuple[openai.OpenAI, Any]]:
    recorder = Recorder()
    app = create_app(callback=recorder, **{**settings_kwargs, "max_new_tokens": 64, **changes})
    app.state.recorder = recorder
    with LiveServer(app) as live:
        client = openai.OpenAI(
            base_url=live.url + "/v1", api_key="sk-test", max_retries=0, timeout=30
        )
        app.state.url = live.url
        try:
            yield client, app
        finally:
            client.close()
            with live.client() as probe:
                wait_idle(probe)


def hello(**kwargs: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **kwargs}


def test_chat_non_streaming(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, app):
        reply = client.chat.completions.create(**hello(max_tokens=8))
        assert reply.object == "chat.completion"
        assert reply.id.startswith("chatcmpl-")
        assert reply.model == MODEL
        assert reply.created > 0
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason == "length"
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 8
        assert reply.usage.prompt_tokens > 5
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
        assert app.state.recorder.wait_for(1) == ["success"]


def test_chat_streaming_with_usage(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, _):
        chunks = list(
            client.chat.completions.create(
                **hello(max_tokens=10), stream=True, stream_options={"include_usage": True}
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finals = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finals[-1] == "length" and set(finals[:-1]) == {None}
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 10
        assert len({c.id for c in chunks}) == 1
        assert text
        # The same request without streaming gives the same text (same seed, same prompt).
        whole = client.chat.completions.create(**hello(max_tokens=10))
        assert whole.choices[0].message.content == text


def test_content_as_text_parts_and_system_messages(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, _):
        parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
        messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": parts}]
        one = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
        flat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}]
        two = client.chat.completions.create(model=MODEL, messages=flat, max_tokens=6)
        assert one.choices[0].message.content == two.choices[0].message.content
        assert one.usage is not None and two.usage is not None
        assert one.usage.prompt_tokens == two.usage.prompt_tokens


def test_completions_both_modes(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, _):
        whole = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=7)
        assert whole.object == "text_completion"
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage is not None and whole.usage.completion_tokens == 7
        streamed = list(
            client.completions.create(model=MODEL, prompt="Once upon", max_tokens=7, stream=True)
        )
        assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
        assert streamed[-1].choices[0].finish_reason == "length"


def test_seed_repeats_at_nonzero_temperature(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs, seed=None) as (client, _):
        texts = [
            client.chat.completions.create(**hello(max_tokens=16, temperature=1.2, seed=s))
            .choices[0]
            .message.content
            for s in (7, 7, 8)
        ]
        assert texts[0] == texts[1]
        assert texts[0] != texts[2]


def test_stop_is_not_emitted(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, _):
        free = client.completions.create(model=MODEL, prompt="x", max_tokens=30, seed=3)
        text = free.choices[0].text
        # Stop at a piece of text that appears mid-way in the unconstrained reply.
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        cut = client.completions.create(model=MODEL, prompt="x", max_tokens=30, seed=3, stop=stop)
        assert cut.choices[0].text == text[: text.index(stop)]
        assert stop not in cut.choices[0].text
        assert cut.choices[0].finish_reason == "stop"
        streamed = client.completions.create(
            model=MODEL, prompt="x", max_tokens=30, seed=3, stop=[stop], stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_json_schema_output_parses(settings_kwargs: dict[str, Any]) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    with api(settings_kwargs) as (client, _):
        reply = client.chat.completions.create(
            **hello(max_tokens=60),
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        )
        data = json.loads(reply.choices[0].message.content or "")
        assert isinstance(data["ok"], bool) and isinstance(data["n"], int)


def test_models_list(settings_kwargs: dict[str, Any], tiny_model: Path) -> None:
    with api(settings_kwargs) as (client, _):
        models = client.models.list().data
        assert [m.id for m in models] == [tiny_model.stem]
        assert models[0].model_extra == {"context_length": 512, "state": "loaded"}


def test_sdk_errors(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, _):
        with pytest.raises(openai.BadRequestError) as bad_role:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "robot", "content": "hi"}]
            )
        assert bad_role.value.param == "messages.0.role"
        with pytest.raises(openai.BadRequestError) as bad_n:
            client.chat.completions.create(**hello(n=3))  # more than the server's slots
        assert bad_n.value.param == "n"
        with pytest.raises(openai.BadRequestError) as bad_temp:
            client.chat.completions.create(**hello(temperature=9))
        assert bad_temp.value.param == "temperature"
        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(**hello(max_tokens=5000))
        assert too_long.value.param == "max_tokens"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(**{**hello(), "model": "gpt-9"})


def test_api_keys(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs, api_keys=["sk-right"]) as (client, app):
        with pytest.raises(openai.AuthenticationError) as wrong:
            client.chat.completions.create(**hello(max_tokens=2))
        assert wrong.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        no_key = httpx.get(app.state.url + "/v1/models")
        assert no_key.status_code == 401
        assert set(no_key.json()["error"]) == {"message", "type", "param", "code"}
        allowed = client.with_options(api_key="sk-right")
        assert allowed.chat.completions.create(**hello(max_tokens=2)).choices


def test_queue_full_raises_rate_limit(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs, num_of_concurrent_executions=1, max_queue_size=0) as (client, app):
        pool = app.state.service.pool
        done: list[Any] = []
        with paused(pool.workers[0]):
            holder = threading.Thread(
                target=lambda: done.append(client.chat.completions.create(**hello(max_tokens=2)))
            )
            holder.start()
            eventually(lambda: app.state.service.slots.load().processing == 1)
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(**hello(max_tokens=2))
            assert int(refused.value.response.headers["retry-after"]) >= 1
        holder.join(10)
        assert done and done[0].choices


def test_body_too_large(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs, max_body_bytes=2048) as (_, app):
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
        response = httpx.post(app.state.url + "/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"


def test_dropped_stream_stops_generation(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs, n_ctx=8192, max_new_tokens=8000) as (client, app):
        stream = client.chat.completions.create(**hello(max_tokens=8000), stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()
        recorder = app.state.recorder
        assert recorder.wait_for(1) == ["client_disconnected_while_streaming"]
        eventually(lambda: app.state.service.slots.load().processing == 0, timeout=2)
