"""Ollama's API through the official ollama client, against a live server: chat streamed and
not, generate, embed, list, show, ps, version, tools, thinking, JSON format, errors."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from llamastream import create_app
from tests import tool_templates
from tests.conftest import LiveServer, wait_idle, write_tiny_gguf
from tests.e2e.test_tools import WEATHER_SCHEMA

HELLO = [{"role": "user", "content": "こんにちは"}]
GREEDY = {"temperature": 0, "num_predict": 12}


@contextlib.contextmanager
def served(settings_kwargs: dict[str, Any], **changes: Any) -> Iterator[tuple[ollama.Client, str]]:
    app = create_app(**{**settings_kwargs, "n_ctx": 2048, "max_new_tokens": 64, **changes})
    with LiveServer(app) as live:
        client = ollama.Client(host=live.url)
        try:
            yield client, live.url
        finally:
            client._client.close()
            with live.client() as probe:
                wait_idle(probe)


def test_chat_generate_and_the_model_listings(
    settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    embedder = write_tiny_gguf(tmp_path / "embed" / "tiny-embed.gguf", pooling=1)
    with served(settings_kwargs, embedding_model_path=embedder) as (client, url):
        whole = client.chat(model="tiny", messages=HELLO, options=GREEDY, stream=False)
        assert whole.done and whole.done_reason in ("stop", "length")
        assert whole.message.role == "assistant" and whole.message.content
        assert whole.eval_count and whole.prompt_eval_count

        chunks = list(client.chat(model="tiny:latest", messages=HELLO, options=GREEDY, stream=True))
        assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
        assert "".join(c.message.content or "" for c in chunks) == whole.message.content
        assert chunks[-1].eval_count == whole.eval_count

        generated = client.generate(model="tiny", prompt="Once upon", options=GREEDY)
        assert generated.done and generated.response
        streamed = "".join(
            c.response
            for c in client.generate(model="tiny", prompt="Once upon", options=GREEDY, stream=True)
        )
        assert streamed == generated.response
        raw = client.generate(model="tiny", prompt="Once upon", raw=True, options=GREEDY)
        assert (
            raw.response
            and raw.prompt_eval_count
            and raw.prompt_eval_count < (generated.prompt_eval_count or 0) + 20
        )

        names = [m.model for m in client.list().models]
        assert names == ["tiny:latest", "tiny-embed:latest"]
        shown = client.show("tiny")
        assert shown.template and "completion" in (shown.capabilities or [])
        assert shown.details and shown.details.format == "gguf" and shown.details.family == "llama"
        assert [m.model for m in client.ps().models] == names
        assert httpx.get(url + "/api/version").json()["version"]

        vectors = client.embed(model="tiny-embed", input=["hello", "world"]).embeddings
        assert len(vectors) == 2 and len(vectors[0]) == 64
        loading = client.chat(model="tiny", messages=[])  # how clients load a model
        assert loading.done and loading.done_reason == "load"


def test_tools_thinking_and_json(settings_kwargs: dict[str, Any], tmp_path: Path) -> None:
    hermes = write_tiny_gguf(tmp_path / "h" / "tiny.gguf", chat_template=tool_templates.HERMES)
    tools: list[Any] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city for some days.",
                "parameters": WEATHER_SCHEMA,
            },
        }
    ]
    with served(settings_kwargs, model_path=hermes, seed=3) as (client, url):
        # Ollama has no tool_choice; a grammar still holds a call once it opens. Forced through
        # the OpenAI route for a call to answer, then the round trip in Ollama's shapes.
        forced = httpx.post(
            url + "/v1/chat/completions",
            json={
                "messages": HELLO,
                "tools": tools,
                "tool_choice": "required",
                "temperature": 0,
                "max_tokens": 200,
            },
            timeout=60,
        ).json()["choices"][0]["message"]["tool_calls"][0]
        arguments = json.loads(forced["function"]["arguments"])
        jsonschema.validate(arguments, WEATHER_SCHEMA)
        history = [
            *HELLO,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": arguments}}],
            },
            {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 21°C"},
        ]
        answer = client.chat(model="tiny", messages=history, tools=tools, options=GREEDY)
        assert answer.done
        orphan = [*HELLO, {"role": "tool", "tool_name": "get_weather", "content": "?"}]
        with pytest.raises(ollama.ResponseError) as refused:
            client.chat(model="tiny", messages=orphan, tools=tools)
        assert refused.value.status_code == 400 and "messages.1" in refused.value.error

    thinking = write_tiny_gguf(tmp_path / "t" / "tiny.gguf", chat_template=tool_templates.THINKING)
    with served(settings_kwargs, model_path=thinking, reasoning_budget=4) as (client, _):
        options = {"temperature": 0, "num_predict": 20}
        thought = client.chat(model="tiny", messages=HELLO, options=options, think=True)
        assert thought.message.thinking and thought.message.content
        chunks = list(client.chat(model="tiny", messages=HELLO, options=options, stream=True))
        assert "".join(c.message.thinking or "" for c in chunks) == thought.message.thinking
        plain = client.chat(model="tiny", messages=HELLO, options=options, think=False)
        assert not plain.message.thinking
        assert plain.message.content and "</think>" not in plain.message.content

    with served(settings_kwargs) as (client, _):
        schema = {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["n"],
        }
        shaped = client.chat(
            model="tiny", messages=HELLO, format=schema, options={"num_predict": 40}
        )
        jsonschema.validate(json.loads(shaped.message.content or ""), schema)


def test_errors_in_ollamas_envelope(settings_kwargs: dict[str, Any]) -> None:
    with served(settings_kwargs) as (client, url):
        with pytest.raises(ollama.ResponseError) as missing:
            client.chat(model="llama3", messages=HELLO)
        assert missing.value.status_code == 404 and "llama3" in missing.value.error
        for options, field in (
            ({"mirostat": 2}, "options.mirostat"),
            ({"num_ctx": 999999}, "options.num_ctx"),
            ({"temperature": 9}, "options.temperature"),
        ):
            with pytest.raises(ollama.ResponseError) as refused:
                client.chat(model="tiny", messages=HELLO, options=options)
            assert refused.value.status_code == 400 and refused.value.error.startswith(field)
        # keep_alive 0: the reply, then the model unloads (the next request loads it again).
        assert client.generate(model="tiny", prompt="x", keep_alive=0, options=GREEDY).done
        deadline = time.monotonic() + 5
        while client.ps().models and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.ps().models == []
        with pytest.raises(ollama.ResponseError) as bad_keep_alive:
            client.generate(model="tiny", prompt="x", keep_alive="soon")
        assert bad_keep_alive.value.error.startswith("keep_alive")
        kept = client.generate(model="tiny", prompt="x", keep_alive="10m", options=GREEDY)
        assert kept.done
        for think in (True, "low"):
            with pytest.raises(ollama.ResponseError) as no_thinking:
                client.chat(model="tiny", messages=HELLO, think=think)
            assert no_thinking.value.status_code == 400
            assert no_thinking.value.error.startswith("think:")
        with pytest.raises(ollama.ResponseError) as too_long:
            client.chat(model="tiny", messages=HELLO, options={"num_predict": 100000})
        assert too_long.value.error.startswith("options.num_predict")
        with pytest.raises(ollama.ResponseError) as no_embed:
            client.embed(model="tiny", input="x")
        assert no_embed.value.status_code == 404
        unknown = httpx.post(url + "/api/pull", json={"model": "x"})
        assert unknown.status_code == 404 and "error" in unknown.json()
