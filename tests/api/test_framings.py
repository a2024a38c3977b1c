"""The wire formats, through the real app: plain text, OpenAI SSE chunks and JSON bodies."""

from __future__ import annotations

import json
from typing import Any

from tests.api.conftest import Client

MESSAGES = [{"role": "user", "content": "こんにちは"}]


def _events(text: str) -> list[Any]:
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


async def test_plain_text_streams_the_reply_with_its_message_id(api: Client) -> None:
    async with api() as (client, _):
        response = await client.post("/chat_stream", json={"user_input": "hi"})
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.headers["cache-control"] == "no-store"
        message_id = response.headers["x-chatstream-last-generated-message-id"]
        stored = (await client.get("/get_prompt")).json()["messages"][-1]
        assert stored == {**stored, "id": message_id, "content": response.text}


async def test_a_chat_stream_opens_with_the_role_and_ends_with_usage_and_done(
    api: Client,
) -> None:
    async with api() as (client, _):
        body = {
            "model": "tiny",
            "messages": MESSAGES,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        response = await client.post("/v1/chat/completions", json=body)
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.text)
        assert events[-1] == "[DONE]"
        first, *pieces, last, usage, _ = events
        assert first["object"] == "chat.completion.chunk"
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(set(p["choices"][0]["delta"]) == {"content"} for p in pieces)
        assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
        assert usage["choices"] == []
        assert usage["usage"]["completion_tokens"] == 6
        assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 6
        assert len({e["id"] for e in events[:-1]}) == 1


async def test_whole_answers_of_chat_and_text_completions(api: Client) -> None:
    async with api() as (client, _):
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "ignore_eos": True},
        )
        answer = chat.json()
        assert answer["object"] == "chat.completion"
        assert answer["id"].startswith("chatcmpl-")
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 4
        text = await client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "Once", "max_tokens": 3, "ignore_eos": True},
        )
        answer = text.json()
        assert answer["object"] == "text_completion"
        assert answer["choices"][0]["logprobs"] is None
        assert isinstance(answer["choices"][0]["text"], str)
        assert answer["usage"]["completion_tokens"] == 3


async def test_a_json_schema_response_holds_integer_ranges(api: Client) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 11}},
        "required": ["n"],
        "additionalProperties": False,
    }
    async with api() as (client, _):
        for seed in range(4):
            answer = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "tiny",
                    "messages": MESSAGES,
                    "seed": seed,
                    "max_tokens": 32,
                    "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
                },
            )
            value = json.loads(answer.json()["choices"][0]["message"]["content"])
            assert 3 <= value["n"] <= 11
