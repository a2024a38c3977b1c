"""A thinking model in the session chat: reasoning apart in the stream, the stored history and
the next prompt; JSON lines for clients that ask for them; ChatStream's regenerate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llamastream.chat.prompt import ChatPrompt
from tests import tool_templates
from tests.api.conftest import Client
from tests.conftest import write_tiny_gguf

NDJSON = {"accept": "application/x-ndjson"}
# Greedy, four tokens of reasoning, then the answer (the random model never closes it itself).
THINKS = {"temperature": 0.0, "reasoning_budget": 4, "max_new_tokens": 20}


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("thinking") / "thinking.gguf"
    return write_tiny_gguf(path, chat_template=tool_templates.THINKING)


@pytest.fixture(scope="module")
def keeping_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keeping") / "keeping.gguf"
    return write_tiny_gguf(path, chat_template=tool_templates.THINKING_KEEPS_REASONING)


def lines(body: str) -> list[dict[str, Any]]:
    assert body.endswith("\n")
    return [json.loads(line) for line in body.splitlines()]


async def test_plain_text_and_json_lines_keep_the_reasoning_apart(
    api: Client, thinking_model: Path
) -> None:
    async with api(model_path=thinking_model, **THINKS) as (client, _):
        plain = await client.post("/chat_stream", json={"user_input": "Why?"})
        assert plain.status_code == 200
        # The prompt opened <think>; the stream writes both tags all the same.
        assert plain.text.startswith("<think>")
        thought, answer = plain.text.removeprefix("<think>").split("</think>\n\n")
        assert thought and answer
        stored = (await client.get("/get_prompt")).json()["messages"][-1]
        assert (stored["reasoning"], stored["content"]) == (thought, answer)

        again = await client.post("/chat_stream", json={"regenerate": True}, headers=NDJSON)
        assert again.headers["content-type"] == "application/x-ndjson"
        events = lines(again.text)
        kinds = [e["type"] for e in events]
        assert kinds == sorted(kinds, key=["reasoning", "content", "done"].index)
        assert kinds[0] == "reasoning" and kinds[-1] == "done" and "content" in kinds
        done = events[-1]
        assert done["message_id"] == again.headers["x-chatstream-last-generated-message-id"]
        assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 20
        reasoning = "".join(e["text"] for e in events if e["type"] == "reasoning")
        content = "".join(e["text"] for e in events if e["type"] == "content")
        assert (reasoning, content) == (thought, answer)  # greedy: the same reply again
        # Regenerating reads the same prompt again: all but its last token from the cache.
        assert done["usage"]["cached_tokens"] == done["usage"]["prompt_tokens"] - 1
        messages = (await client.get("/get_prompt")).json()["messages"]
        assert len(messages) == 2 and messages[-1]["id"] == done["message_id"]
        assert (messages[-1]["reasoning"], messages[-1]["content"]) == (thought, answer)


async def test_the_next_prompt_follows_the_templates_rule_for_past_reasoning(
    api: Client, thinking_model: Path, keeping_model: Path
) -> None:
    for model, kept in ((thinking_model, False), (keeping_model, True)):
        async with api(model_path=model, **THINKS) as (client, _):
            await client.post("/chat_stream", json={"user_input": "First?"})
            stored = (await client.get("/get_prompt")).json()
            thought = stored["messages"][-1]["reasoning"]
            assert thought
            prompt = stored["prompt"]
            assert stored["messages"][-1]["content"] in prompt
            assert (thought in prompt) is kept


async def test_reasoning_format_none_leaves_the_reply_whole(
    api: Client, thinking_model: Path
) -> None:
    async with api(model_path=thinking_model, reasoning_format="none", **THINKS) as (client, _):
        plain = await client.post("/chat_stream", json={"user_input": "Why?"})
        assert not plain.text.startswith("<think>") and "\n</think>\n\n" in plain.text
        stored = (await client.get("/get_prompt")).json()["messages"][-1]
        assert (stored["reasoning"], stored["content"]) == ("", plain.text)


async def test_json_lines_without_a_thinking_model_and_chatstream_regenerate(
    api: Client,
) -> None:
    async with api() as (client, _):
        first = await client.post("/chat_stream", json={"user_input": "hi"}, headers=NDJSON)
        events = lines(first.text)
        assert {e["type"] for e in events[:-1]} == {"content"} and events[-1]["type"] == "done"
        # ChatStream's clients regenerate with an empty input: it is no input.
        again = await client.post("/chat_stream", json={"user_input": "", "regenerate": True})
        assert again.status_code == 200
        messages = (await client.get("/get_prompt")).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[0]["content"] == "hi" and messages[1]["content"] == again.text
        refused = await client.post("/chat_stream", json={"user_input": ""})
        assert refused.status_code == 400 and refused.json()["field"] == "user_input"


def test_records_written_before_reasoning_existed_still_load() -> None:
    old = {"messages": [{"role": "assistant", "content": "x", "id": "1", "created": 1.0}]}
    prompt = ChatPrompt.from_record({"__chat_prompt__": old})
    assert prompt.messages[0].reasoning == "" and prompt.messages[0].content == "x"


async def test_a_chat_template_file_replaces_the_models_own(api: Client, tmp_path: Path) -> None:
    own = tmp_path / "think.jinja"
    own.write_text(tool_templates.THINKING_KEEPS_REASONING, encoding="utf-8")
    async with api(chat_template_file=own, **THINKS) as (client, _):
        plain = await client.post("/chat_stream", json={"user_input": "Why?"})
        assert plain.text.startswith("<think>")  # the tiny model thinks now
        prompt = (await client.get("/get_prompt")).json()["prompt"]
        assert prompt.startswith("<|im_start|>user\nWhy?<|im_end|>")
    own.write_text("{% for m in messages %}", encoding="utf-8")
    for bad in (own, tmp_path / "missing.jinja"):
        with pytest.raises(ValueError, match=f"chat_template_file {bad}"):
            async with api(chat_template_file=bad):
                pass
