"""Anthropic's Messages request, validated, and translated into the chat request the engine
already serves (the model's template, tools and reasoning as on /v1/chat/completions)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from llamastream.api.openai.models import ChatCompletionRequest
from llamastream.errors import InvalidRequestError
from llamastream.limits import MaxNewTokens, TopK

# Stop sequences one request may give (each is scanned for at every token).
MAX_STOP_SEQUENCES = 16

# Anthropic's sampling ranges.
UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(_Block):
    type: Literal["ephemeral"]
    ttl: str | None = None


class TextBlock(_Block):
    type: Literal["text"]
    text: StrictStr
    cache_control: CacheControl | None = None  # prompt caching is automatic here
    citations: None = None


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: StrictStr
    name: StrictStr
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: None = None  # what the official client echoes back: only null
    toolset_name: None = None


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: StrictStr
    content: StrictStr | list[TextBlock] = ""
    is_error: StrictBool = False
    cache_control: CacheControl | None = None

    def text(self) -> str:
        body = (
            self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        )
        return f"Error: {body}" if self.is_error else body


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: StrictStr
    signature: StrictStr = ""


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: StrictStr


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(_Block):
    role: Literal["user", "assistant"]
    content: StrictStr | list[Block]

    def blocks(self) -> list[Any]:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        return list(self.content)


class Tool(_Block):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None


class ToolChoice(_Block):
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool = False


class ThinkingEnabled(_Block):
    type: Literal["enabled"]
    budget_tokens: Annotated[StrictInt, Field(ge=0)]


class ThinkingDisabled(_Block):
    type: Literal["disabled"]


class Metadata(_Block):
    user_id: StrictStr | None = None


class MessagesRequest(_Block):
    """``POST /v1/messages``. Fields it does not know are refused (400 naming them)."""

    model: StrictStr
    max_tokens: MaxNewTokens
    messages: Annotated[list[Message], Field(min_length=1)]
    system: StrictStr | list[TextBlock] | None = None
    stop_sequences: Annotated[list[StrictStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: StrictBool = False
    temperature: UnitFloat | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: TopK | None = None
    metadata: Metadata | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Annotated[ThinkingEnabled | ThinkingDisabled, Field(discriminator="type")] | None = (
        None
    )
    service_tier: Literal["auto", "standard_only"] | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The same conversation as a chat-completions request (its checks name our fields)."""
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            text = (
                self.system
                if isinstance(self.system, str)
                else "".join(b.text for b in self.system)
            )
            messages.append({"role": "system", "content": text})
        last = len(self.messages) - 1
        if self.messages[last].role == "assistant":
            field = f"messages.{last}"
            raise InvalidRequestError(
                f"{field}: prefilling the assistant's reply is not supported; end with a user "
                "message",
                field=field,
            )
        called: set[str] = set()
        for i, message in enumerate(self.messages):
            messages += _translate(i, message, called)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stream": self.stream,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "user": self.metadata.user_id if self.metadata else None,
        }
        if self.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.input_schema,
                    },
                }
                for t in self.tools
            ]
        choice = self.tool_choice
        if choice is not None:
            if choice.type == "tool":
                if not choice.name:
                    raise InvalidRequestError(
                        "tool_choice.name: required with type tool", field="tool_choice.name"
                    )
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            elif self.tools:
                body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[
                    choice.type
                ]
            body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
        if isinstance(self.thinking, ThinkingEnabled):
            body["reasoning_budget"] = self.thinking.budget_tokens
        elif isinstance(self.thinking, ThinkingDisabled):
            body["reasoning_budget"] = 0
            body["chat_template_kwargs"] = {"enable_thinking": False}
        return ChatCompletionRequest.model_validate(
            {k: v for k, v in body.items() if v is not None}
        )


def _translate(i: int, message: Message, called: set[str]) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become tool messages (before
    the user's own text), an assistant's tool uses its tool calls, its thinking its
    reasoning."""
    texts: list[str] = []
    out: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    thought: list[str] = []
    for j, block in enumerate(message.blocks()):
        field = f"messages.{i}.content.{j}"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            if message.role != "user":
                raise InvalidRequestError(f"{field}: tool results come from the user", field=field)
            if block.tool_use_id not in called:
                field += ".tool_use_id"
                raise InvalidRequestError(
                    f"{field}: answers no tool_use of an earlier assistant message", field=field
                )
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
        elif isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise InvalidRequestError(f"{field}: only the assistant uses tools", field=field)
            called.add(block.id)
            calls.append(
                {
                    "id": block.id,
                    "type": "function",
                    "function": {"name": block.name, "arguments": json.dumps(block.input)},
                }
            )
        elif isinstance(block, ThinkingBlock):
            if message.role != "assistant":
                raise InvalidRequestError(f"{field}: only the assistant thinks", field=field)
            thought.append(block.thinking)
        # redacted thinking carries nothing this server can read back: left out
    if message.role == "user":
        if texts or not out:
            out.append({"role": "user", "content": "".join(texts)})
        return out
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        reply["tool_calls"] = calls
    if thought:
        reply["reasoning_content"] = "".join(thought)
    return [reply]


class CountTokensRequest(_Block):
    """``POST /v1/messages/count_tokens``: the prompt a Messages request would read."""

    model: StrictStr
    messages: Annotated[list[Message], Field(min_length=1)]
    system: StrictStr | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Annotated[ThinkingEnabled | ThinkingDisabled, Field(discriminator="type")] | None = (
        None
    )

    def as_messages(self) -> MessagesRequest:
        given = self.model_dump(exclude_none=True)
        return MessagesRequest.model_validate({**given, "max_tokens": 1})
