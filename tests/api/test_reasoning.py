"""A thinking model's reasoning on /v1: apart as reasoning_content, or left in content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import tool_templates
from tests.api.conftest import Client
from tests.conftest import write_tiny_gguf

BODY: dict[str, Any] = {
    "model": "thinking",
    "messages": [{"role": "user", "content": "Why is the sky blue?"}],
    "max_tokens": 8,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("thinking") / "thinking.gguf"
    return write_tiny_gguf(path, chat_template=tool_templates.THINKING)


async def test_reasoning_goes_apart_whole_and_streamed(api: Client, thinking_model: Path) -> None:
    async with api(model_path=thinking_model) as (client, _):
        whole = (await client.post("/v1/chat/completions", json=BODY)).json()
        message = whole["choices"][0]["message"]
        # The prompt opened <think> and the random model never closes it: all reasoning.
        assert message["reasoning_content"]
        assert message["content"] == ""
        streamed = await client.post("/v1/chat/completions", json={**BODY, "stream": True})
        deltas = [
            json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
            for line in streamed.text.splitlines()
            if line.startswith("data: {")
        ]
        thought = "".join(d.get("reasoning_content", "") for d in deltas)
        assert thought == message["reasoning_content"]  # same seed: the same reply
        assert "".join(d.get("content", "") for d in deltas) == ""


async def test_reasoning_format_none_and_thinking_switched_off(
    api: Client, thinking_model: Path
) -> None:
    async with api(model_path=thinking_model) as (client, _):
        plain = (
            await client.post("/v1/chat/completions", json={**BODY, "reasoning_format": "none"})
        ).json()["choices"][0]["message"]
        assert "reasoning_content" not in plain and plain["content"]
        off = {**BODY, "chat_template_kwargs": {"enable_thinking": False}}
        answer = (await client.post("/v1/chat/completions", json=off)).json()
        message = answer["choices"][0]["message"]
        assert "reasoning_content" not in message and message["content"]
        reserved = {**BODY, "chat_template_kwargs": {"messages": []}}
        refused = await client.post("/v1/chat/completions", json=reserved)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "chat_template_kwargs"


async def test_a_model_that_does_not_think_has_no_reasoning(api: Client) -> None:
    async with api() as (client, _):
        message = await client.post("/v1/chat/completions", json={**BODY, "model": "tiny"})
        assert "reasoning_content" not in message.json()["choices"][0]["message"]


async def test_reasoning_budget_closes_the_thinking(api: Client, thinking_model: Path) -> None:
    greedy = {**BODY, "temperature": 0, "max_tokens": 16, "reasoning_format": "none"}
    async with api(model_path=thinking_model) as (client, _):

        async def reply(**changes: Any) -> dict[str, Any]:
            answer = await client.post("/v1/chat/completions", json={**greedy, **changes})
            assert answer.status_code == 200, answer.text
            return answer.json()  # type: ignore[no-any-return]

        free = (await reply())["choices"][0]["message"]["content"]
        first3 = (await reply(max_tokens=3))["choices"][0]["message"]["content"]
        assert "</think>" not in free  # the random model never closes it by itself
        budgeted = await reply(reasoning_budget=3)
        raw = budgeted["choices"][0]["message"]["content"]
        # Three tokens of reasoning, then the closing tag written for the model, then more.
        assert raw.startswith(first3 + "\n</think>\n\n") and len(raw) > len(first3) + 11
        assert budgeted["usage"]["completion_tokens"] == 16
        split = await reply(reasoning_budget=3, reasoning_format="auto")
        message = split["choices"][0]["message"]
        # The reasoning keeps its last line's end (the "\n" before the closing tag).
        assert message["reasoning_content"] == first3.lstrip() + "\n"
        assert message["content"] == raw.split("</think>\n\n", 1)[1]
        streamed = await client.post(
            "/v1/chat/completions",
            json={**greedy, "reasoning_budget": 3, "reasoning_format": "auto", "stream": True},
        )
        deltas = [
            json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
            for line in streamed.text.splitlines()
            if line.startswith("data: {")
        ]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == first3.lstrip() + "\n"
        assert "".join(d.get("content", "") for d in deltas) == message["content"]
        none = (await reply(reasoning_budget=0, reasoning_format="auto"))["choices"][0]
        assert "reasoning_content" not in none["message"] and none["message"]["content"]


async def test_reasoning_budget_setting_and_bad_values(api: Client, thinking_model: Path) -> None:
    async with api(model_path=thinking_model, reasoning_budget=0) as (client, _):
        longer = {**BODY, "max_tokens": 16}  # room for the closing tag's tokens and more
        message = (await client.post("/v1/chat/completions", json=longer)).json()
        assert "reasoning_content" not in message["choices"][0]["message"]
        assert message["choices"][0]["message"]["content"]
        unlimited = {**BODY, "reasoning_budget": -1}
        again = (await client.post("/v1/chat/completions", json=unlimited)).json()
        assert again["choices"][0]["message"]["reasoning_content"]
        for bad in (-2, True, "3"):
            refused = await client.post(
                "/v1/chat/completions", json={**BODY, "reasoning_budget": bad}
            )
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "reasoning_budget"


async def test_no_budget_against_a_grammar_holding_the_whole_reply(
    api: Client, thinking_model: Path
) -> None:
    # The closing tag cannot be written for the model under a JSON grammar: no budget then
    # (the grammar would refuse the tag), and the server answers and goes on.
    body = {**BODY, "max_tokens": 24, "reasoning_budget": 2}
    async with api(model_path=thinking_model) as (client, _):
        shaped = await client.post(
            "/v1/chat/completions", json={**body, "response_format": {"type": "json_object"}}
        )
        assert shaped.status_code == 200
        again = await client.post("/v1/chat/completions", json=body)
        assert again.status_code == 200


async def test_asking_a_model_that_does_not_think_to_think_is_refused(api: Client) -> None:
    async with api() as (client, _):
        asked = {**BODY, "model": "tiny", "reasoning_budget": 16}
        refused = await client.post("/v1/chat/completions", json=asked)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "reasoning_budget"
        fine = await client.post("/v1/chat/completions", json={**asked, "reasoning_budget": 0})
        assert fine.status_code == 200
