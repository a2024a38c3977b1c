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
