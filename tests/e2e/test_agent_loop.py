"""A real agent framework's tool loop against a live server: LangChain's ChatOpenAI with bound
tools calls the tool, gets its result back, and answers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import pytest
from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from llamastream import create_app
from tests import tool_templates
from tests.conftest import LiveServer, wait_idle, write_tiny_gguf

calls_made: list[str] = []


@tool
def get_time(zone: Literal["UTC", "JST", "CET"]) -> str:
    """The current time in a time zone."""
    calls_made.append(zone)
    return f"12:00 in {zone}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model = write_tiny_gguf(
        tmp_path_factory.mktemp("agent") / "tiny.gguf", chat_template=tool_templates.HERMES
    )
    app = create_app(
        model_path=model,
        model_alias="tiny",
        session_dir=tmp_path_factory.mktemp("agent-sessions"),
        n_ctx=2048,
        max_new_tokens=256,
        n_threads=1,
    )
    with LiveServer(app) as server:
        yield server
        with server.client() as probe:
            wait_idle(probe)


def test_langchain_tool_loop(live: LiveServer) -> None:
    llm = ChatOpenAI(
        base_url=live.url + "/v1",
        api_key="unused",  # type: ignore[arg-type]
        model="tiny",
        max_retries=0,
        timeout=60,
        seed=4,
    )
    messages: list[BaseMessage] = [HumanMessage("What time is it in Tokyo?")]
    # First turn: the model must call the tool (a random-weight model would not choose to).
    caller: Any = llm.bind_tools([get_time], tool_choice="get_time", parallel_tool_calls=False)
    ai = caller.invoke(messages)
    assert ai.tool_calls and not ai.invalid_tool_calls
    assert [c["name"] for c in ai.tool_calls] == ["get_time"]
    messages.append(ai)
    for call in ai.tool_calls:
        messages.append(ToolMessage(get_time.invoke(call["args"]), tool_call_id=call["id"]))
    assert calls_made and set(calls_made) <= {"UTC", "JST", "CET"}
    # The result goes back; the final answer arrives as text.
    final = llm.bind_tools([get_time], tool_choice="none").invoke(messages, max_tokens=16)
    assert not final.tool_calls
    assert isinstance(final.content, str) and final.content
