"""Anthropic's Messages API through the official anthropic client (and LangChain's
ChatAnthropic tool loop), against a live server: text, streaming, stop sequences, tool use
round trips, thinking, token counting, keys, and errors in Anthropic's envelope."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from llamastream import create_app
from tests import tool_templates
from tests.conftest import LiveServer, eventually, wait_idle, write_tiny_gguf
from tests.e2e.conftest import paused
from tests.e2e.test_tools import WEATHER_SCHEMA

TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "The weather in a city for some days.",
        "input_schema": WEATHER_SCHEMA,
    }
]
HELLO: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]


@contextlib.contextmanager
def served(
    settings_kwargs: dict[str, Any], **changes: Any
) -> Iterator[tuple[anthropic.Anthropic, LiveServer, Any]]:
    app = create_app(**{**settings_kwargs, "n_ctx": 2048, "max_new_tokens": 64, **changes})
    with LiveServer(app) as live:
        client = anthropic.Anthropic(
            base_url=live.url, api_key=changes.get("api_keys", ["unused"])[0], max_retries=0
        )
        try:
            yield client, live, app
        finally:
            client.close()
            with live.client() as probe:
                wait_idle(probe)


@pytest.fixture(scope="module")
def hermes_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(
        tmp_path_factory.mktemp("hermes") / "tiny.gguf", chat_template=tool_templates.HERMES
    )


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(
        tmp_path_factory.mktemp("thinking") / "tiny.gguf", chat_template=tool_templates.THINKING
    )


def test_text_streaming_and_stop_sequences(settings_kwargs: dict[str, Any]) -> None:
    with served(settings_kwargs) as (client, _, _):
        asked: dict[str, Any] = {
            "model": "tiny",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "こんにちは"}],
            "extra_body": {"temperature": 0},  # (this client version no longer names it)
            "system": "Be brief.",
        }
        message = client.messages.create(**asked)
        assert message.id.startswith("msg_") and message.role == "assistant"
        assert message.model == "tiny"
        assert [b.type for b in message.content] == ["text"]
        text = message.content[0].text  # type: ignore[union-attr]
        assert message.stop_reason in ("end_turn", "max_tokens")
        assert 0 < message.usage.output_tokens <= 16

        with client.messages.stream(**asked) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed == text == final.content[0].text  # type: ignore[union-attr]
        assert final.usage.output_tokens == message.usage.output_tokens
        assert final.usage.cache_read_input_tokens  # the same prompt: read from the cache

        stop = text[2:4]
        stopped = client.messages.create(**asked, stop_sequences=["never there", stop])
        assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
        assert stopped.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]

        counted = client.messages.count_tokens(
            model="tiny", messages=asked["messages"], system="Be brief."
        )
        usage = message.usage
        assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)


def test_tool_use_round_trip_whole_and_streamed(
    settings_kwargs: dict[str, Any], hermes_model: Path
) -> None:
    with served(settings_kwargs, model_path=hermes_model, seed=3) as (client, _, _):
        asked: dict[str, Any] = {
            "model": "tiny",
            "max_tokens": 200,
            "messages": HELLO,
            "tools": TOOLS,
            "tool_choice": {"type": "any"},
            "extra_body": {"temperature": 0},
        }
        message = client.messages.create(**asked)
        assert message.stop_reason == "tool_use"
        uses = [b for b in message.content if b.type == "tool_use"]
        assert uses and uses[0].name == "get_weather"
        jsonschema.validate(uses[0].input, WEATHER_SCHEMA)
        with client.messages.stream(**asked) as stream:
            final = stream.get_final_message()
        streamed = [b for b in final.content if b.type == "tool_use"]
        assert [(b.name, b.input) for b in streamed] == [(b.name, b.input) for b in uses]
        assert final.stop_reason == "tool_use"

        history = [
            *HELLO,
            {"role": "assistant", "content": [b.model_dump() for b in message.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny, 21°C"}
                ],
            },
        ]
        answer = client.messages.create(
            model="tiny",
            max_tokens=8,
            messages=history,
            tools=TOOLS,
            tool_choice={"type": "none"},
        )
        assert [b.type for b in answer.content] == ["text"]
        named = client.messages.create(
            **{**asked, "tool_choice": {"type": "tool", "name": "get_weather"}}
        )
        assert [b.name for b in named.content if b.type == "tool_use"] == ["get_weather"]

        prefill = [*HELLO, {"role": "assistant", "content": "{"}]
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model="tiny", max_tokens=8, messages=prefill)
        assert refused.value.body["error"]["message"].startswith("messages.1:")  # type: ignore[index]
        orphan = [*HELLO, history[2]]
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model="tiny", max_tokens=8, messages=orphan, tools=TOOLS)
        assert "messages.1.content.0.tool_use_id" in refused.value.message


def test_thinking_blocks(settings_kwargs: dict[str, Any], thinking_model: Path) -> None:
    with served(settings_kwargs, model_path=thinking_model) as (client, _, _):
        asked: dict[str, Any] = {
            "model": "tiny",
            "max_tokens": 30,
            "messages": HELLO,
            "extra_body": {"temperature": 0},
            "thinking": {"type": "enabled", "budget_tokens": 5},
        }
        message = client.messages.create(**asked)
        assert [b.type for b in message.content] == ["thinking", "text"]
        with client.messages.stream(**asked) as stream:
            kinds = [event.delta.type for event in stream if event.type == "content_block_delta"]
            final = stream.get_final_message()
        assert "thinking_delta" in kinds and "text_delta" in kinds
        assert kinds.index("thinking_delta") < kinds.index("text_delta")
        assert [b.model_dump() for b in final.content] == [b.model_dump() for b in message.content]
        off = client.messages.create(**{**asked, "thinking": {"type": "disabled"}})
        assert [b.type for b in off.content] == ["text"]
        # The thinking goes back in the history; the template drops it by its own rule.
        again = client.messages.create(
            **{
                **asked,
                "messages": [
                    *HELLO,
                    {"role": "assistant", "content": [b.model_dump() for b in message.content]},
                    {"role": "user", "content": "And tomorrow?"},
                ],
            }
        )
        assert again.content


def test_keys_and_errors_in_anthropics_envelope(settings_kwargs: dict[str, Any]) -> None:
    with served(settings_kwargs, api_keys=["sk-right"]) as (client, live, _):
        ok = client.messages.create(model="tiny", max_tokens=2, messages=HELLO)  # x-api-key
        assert ok.content is not None
        wrong = anthropic.Anthropic(base_url=live.url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as denied:
            wrong.messages.create(model="tiny", max_tokens=2, messages=HELLO)
        assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        with pytest.raises(anthropic.NotFoundError) as unknown:
            client.messages.create(model="claude-x", max_tokens=2, messages=HELLO)
        assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        headers = {"x-api-key": "sk-right", "anthropic-version": "2023-06-01"}
        for body, field in (
            ({"model": "tiny", "messages": HELLO}, "max_tokens"),
            (
                {"model": "tiny", "max_tokens": 5, "messages": HELLO, "temperature": 1.5},
                "temperature",
            ),
            ({"model": "tiny", "max_tokens": 5, "messages": HELLO, "top_a": 1}, "top_a"),
            ({"model": "tiny", "max_tokens": 5, "messages": []}, "messages"),
            (
                {
                    "model": "tiny",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
                },
                "messages.0.content",
            ),
        ):
            refused = httpx.post(live.url + "/v1/messages", json=body, headers=headers)
            assert refused.status_code == 400, body
            error = refused.json()
            assert error["type"] == "error"
            assert error["error"]["type"] == "invalid_request_error"
            assert error["error"]["message"].startswith(field), error


def test_a_busy_server_answers_429_in_anthropics_envelope(
    settings_kwargs: dict[str, Any],
) -> None:
    with served(settings_kwargs, num_of_concurrent_executions=1, max_queue_size=0) as (
        client,
        live,
        app,
    ):
        with paused(app.state.service.pool.workers[0]):
            holder = threading.Thread(
                target=lambda: httpx.post(
                    live.url + "/v1/messages",
                    json={"model": "tiny", "max_tokens": 4, "messages": HELLO},
                    timeout=30,
                )
            )
            holder.start()
            with live.client() as probe:
                eventually(lambda: probe.get("/get_load").json()["processing"] >= 1)
            with pytest.raises(anthropic.RateLimitError) as busy:
                client.messages.create(model="tiny", max_tokens=2, messages=HELLO)
            assert busy.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
            assert int(busy.value.response.headers["retry-after"]) >= 1
        holder.join()


def test_a_langchain_chat_anthropic_tool_loop(
    settings_kwargs: dict[str, Any], hermes_model: Path
) -> None:
    from langchain_anthropic import ChatAnthropic
    from langchain_core.messages import HumanMessage, ToolMessage

    def get_weather(city: str, days: int, unit: str = "celsius") -> str:
        return f"Sunny in {city} for {days} days ({unit})."

    with served(settings_kwargs, model_path=hermes_model, seed=3) as (_, live, _):
        model = ChatAnthropic(
            model="tiny", base_url=live.url, api_key="unused", max_tokens=200, temperature=0
        )
        messages: list[Any] = [HumanMessage("What's the weather in Paris?")]
        first = model.bind_tools(TOOLS, tool_choice="any").invoke(messages)
        assert first.tool_calls, first
        messages.append(first)
        for call in first.tool_calls:
            assert call["name"] == "get_weather"
            jsonschema.validate(call["args"], WEATHER_SCHEMA)
            messages.append(ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"]))
        final = model.invoke(messages)  # the tool's result read, an answer
        assert not final.tool_calls
        assert final.response_metadata["stop_reason"] in ("end_turn", "max_tokens")
