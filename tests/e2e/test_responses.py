"""OpenAI's Responses API through the official openai client, against a live server: text,
streaming events, function calls and their outputs, reasoning, JSON output, refusals."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from llamastream import create_app
from tests import tool_templates
from tests.conftest import LiveServer, wait_idle, write_tiny_gguf
from tests.e2e.test_tools import WEATHER_SCHEMA

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city for some days.",
        "parameters": WEATHER_SCHEMA,
    }
]


@contextlib.contextmanager
def served(settings_kwargs: dict[str, Any], **changes: Any) -> Iterator[openai.OpenAI]:
    app = create_app(**{**settings_kwargs, "n_ctx": 2048, "max_new_tokens": 64, **changes})
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        try:
            yield client
        finally:
            client.close()
            with live.client() as probe:
                wait_idle(probe)


def test_text_and_its_stream_of_events(settings_kwargs: dict[str, Any]) -> None:
    with served(settings_kwargs) as client:
        asked: dict[str, Any] = {
            "model": "tiny",
            "input": [
                {"role": "user", "content": "こんにちは"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "はい"}]},
                {"role": "user", "content": [{"type": "input_text", "text": "Tell me more."}]},
            ],
            "instructions": "Be brief.",
            "max_output_tokens": 12,
            "temperature": 0,
        }
        response = client.responses.create(**asked)
        assert response.id.startswith("resp_") and response.object == "response"
        assert response.status in ("completed", "incomplete")
        assert response.output_text
        assert response.usage is not None and 0 < response.usage.output_tokens <= 12

        events = list(client.responses.create(**asked, stream=True))
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] in ("response.completed", "response.incomplete")
        assert [e.sequence_number for e in events] == list(range(len(events)))
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == response.output_text
        assert events[-1].response.output_text == response.output_text  # type: ignore[union-attr]


def test_function_call_round_trip(settings_kwargs: dict[str, Any], tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "hermes" / "tiny.gguf", chat_template=tool_templates.HERMES)
    with served(settings_kwargs, model_path=model, seed=3) as client:
        asked: dict[str, Any] = {
            "model": "tiny",
            "input": "What's the weather in Paris?",
            "tools": TOOLS,
            "tool_choice": "required",
            "temperature": 0,
            "max_output_tokens": 200,
        }
        response = client.responses.create(**asked)
        calls = [item for item in response.output if item.type == "function_call"]
        assert calls and calls[0].name == "get_weather"
        jsonschema.validate(json.loads(calls[0].arguments), WEATHER_SCHEMA)

        events = list(client.responses.create(**asked, stream=True))
        pieces = "".join(
            e.delta for e in events if e.type == "response.function_call_arguments.delta"
        )
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert pieces == done[0].arguments == calls[0].arguments  # type: ignore[union-attr]
        # The SDK's stream helper (which wants the reply to end by itself: it does, here)
        with client.responses.stream(**asked) as stream:
            final = stream.get_final_response()
        assert [(c.name, c.arguments) for c in final.output if c.type == "function_call"] == [
            (calls[0].name, calls[0].arguments)
        ]

        history: list[Any] = [
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": calls[0].name,
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"},
        ]
        answer = client.responses.create(
            model="tiny", input=history, tools=TOOLS, tool_choice="none", max_output_tokens=8
        )
        assert [item.type for item in answer.output] == ["message"]
        orphan = [history[0], history[2]]
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model="tiny", input=orphan, tools=TOOLS)


def test_reasoning_and_json_output(settings_kwargs: dict[str, Any], tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "think" / "tiny.gguf", chat_template=tool_templates.THINKING)
    with served(settings_kwargs, model_path=model, reasoning_budget=4) as client:
        response = client.responses.create(
            model="tiny", input="Why?", max_output_tokens=20, temperature=0
        )
        assert [item.type for item in response.output] == ["reasoning", "message"]
        thought = response.output[0].content[0].text  # type: ignore[union-attr]
        events = list(
            client.responses.create(
                model="tiny", input="Why?", max_output_tokens=20, temperature=0, stream=True
            )
        )
        streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        assert streamed == thought
        off = client.responses.create(
            model="tiny", input="Why?", max_output_tokens=20, reasoning={"effort": "none"}
        )
        assert [item.type for item in off.output] == ["message"]

    with served(settings_kwargs) as client:
        schema = {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["n"],
            "additionalProperties": False,
        }
        shaped = client.responses.create(
            model="tiny",
            input="A number?",
            max_output_tokens=40,
            text={"format": {"type": "json_schema", "name": "n", "schema": schema}},
        )
        jsonschema.validate(json.loads(shaped.output_text), schema)


def test_refusals_name_the_field(settings_kwargs: dict[str, Any]) -> None:
    with served(settings_kwargs) as client:
        for extra, param in (
            ({"previous_response_id": "resp_1"}, "previous_response_id"),
            ({"store": True}, "store"),
            ({"background": True}, "background"),
            ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
            ({"include": ["reasoning.encrypted_content"]}, "include"),
            ({"max_output_tokens": 100000}, "max_output_tokens"),
            ({"reasoning": {"effort": "high"}}, "reasoning.effort"),  # the model does not think
        ):
            with pytest.raises(openai.BadRequestError) as refused:
                client.responses.create(model="tiny", input="hi", extra_body=extra)
            assert refused.value.param == param, extra
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="gpt-9", input="hi")
