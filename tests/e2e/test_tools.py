"""Tool calls end to end: tiny models carrying each family's template shape, and the real
SmolLM2 given each family's template (real model outputs), a live server, the official openai
client; arguments validated against the tools' schemas."""

from __future__ import annotations

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

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city for some days.",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_SCHEMA}},
]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
QUESTION: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]
FAMILIES = {
    "hermes": tool_templates.HERMES,
    "llama3": tool_templates.LLAMA3,
    "mistral": tool_templates.MISTRAL,
    "generic": None,  # the tiny model's own ChatML template, which knows nothing of tools
}


@pytest.fixture(
    scope="module",
    params=[(name, model) for model in ("tiny", "smollm2") for name in sorted(FAMILIES)],
    ids=lambda p: "-".join(p),
)
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[str, openai.OpenAI, LiveServer]]:
    name, weights = request.param
    template = FAMILIES[name]
    model, own_template = tiny_model, None
    if weights == "smollm2":  # a real model: its template replaced by the family's
        model = request.getfixturevalue("smollm2")
        if template is not None:
            own_template = tmp_path_factory.mktemp(name) / f"{name}.jinja"
            own_template.write_text(template, encoding="utf-8")
    elif template is not None:
        model = write_tiny_gguf(tmp_path_factory.mktemp(name) / "tiny.gguf", chat_template=template)
    app = create_app(
        model_path=model,
        chat_template_file=own_template,
        model_alias="tiny",
        session_dir=tmp_path_factory.mktemp(f"{name}-sessions"),
        num_of_concurrent_executions=2,
        n_ctx=2048,
        max_new_tokens=256,
        seed=7,
        n_threads=1,
    )
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        yield name, client, live
        with live.client() as probe:
            wait_idle(probe)


def _check_calls(calls: Any, allowed: set[str]) -> list[tuple[str, dict[str, Any]]]:
    assert calls, "no tool call"
    out = []
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in allowed
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_parse_and_match_the_schema(
    family: tuple[str, openai.OpenAI, LiveServer], choice: str
) -> None:
    name, client, _ = family
    tool_choice: Any = (
        "required"
        if choice == "required"
        else {"type": "function", "function": {"name": "get_time"}}
    )
    allowed = {"get_weather", "get_time"} if choice == "required" else {"get_time"}
    request: dict[str, Any] = {
        "model": "tiny",
        "messages": QUESTION,
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "seed": 3,
        "temperature": 0,
        "parallel_tool_calls": False,
    }
    # Greedy replies are equal only from equal logits, and a prompt read whole gives logits a
    # little other than one whose start is read from the cache (the random tiny model has
    # near ties): the reply compared with the stream's is the second, which finds the
    # prompt in the cache as the stream does.
    for _ in range(2):
        answer = client.chat.completions.create(**request)
        message = answer.choices[0].message
        assert answer.choices[0].finish_reason == "tool_calls", (name, message)
        whole = _check_calls(message.tool_calls, allowed)
        if name == "mistral":
            assert all(len(c.id) == 9 for c in message.tool_calls or [])

    # The same request streamed, assembled by the SDK's own stream helper.
    with client.chat.completions.stream(**request) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert _check_calls(final.choices[0].message.tool_calls, allowed) == whole


def test_a_tool_result_round_trip(family: tuple[str, openai.OpenAI, LiveServer]) -> None:
    _, client, _ = family
    first = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=TOOLS, tool_choice="required", seed=5
    )
    message = first.choices[0].message
    assert message.tool_calls
    call = message.tool_calls[0]
    history = [
        *QUESTION,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21°C"},
    ]
    final = client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length")


def test_bad_tool_requests_get_400_naming_the_param(
    family: tuple[str, openai.OpenAI, LiveServer],
) -> None:
    _, client, _ = family
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [TOOLS[0]["function"]]}, "functions"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="tiny", messages=QUESTION, **extra)
        assert raised.value.body["param"] == param  # type: ignore[index]
    misplaced: list[Any] = [{**QUESTION[0], "tool_call_id": "x"}]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=misplaced, tools=TOOLS)
    assert raised.value.body["param"] == "messages.0.tool_call_id"  # type: ignore[index]
    orphan: list[Any] = [*QUESTION, {"role": "tool", "tool_call_id": "x", "content": "?"}]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=orphan, tools=TOOLS)
    assert raised.value.body["param"] == "messages.1.tool_call_id"  # type: ignore[index]
    broken: list[Any] = [
        *QUESTION,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_time", "arguments": "{"}}
            ],
        },
    ]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=broken, tools=TOOLS)
    assert raised.value.body["param"] == "messages.1.tool_calls.0.function.arguments"  # type: ignore[index]


def test_auto_without_a_call_is_plain_content(
    family: tuple[str, openai.OpenAI, LiveServer],
) -> None:
    name, client, _ = family
    answer = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=TOOLS, max_tokens=12, seed=11
    )
    choice = answer.choices[0]
    if choice.message.tool_calls:  # the random model happened to open a call: it is whole
        _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    else:
        assert choice.finish_reason in ("stop", "length")
        assert isinstance(choice.message.content, str)
        if name == "generic":  # the reply was JSON; the client sees its answer text only
            assert not choice.message.content.startswith('{"response"')
