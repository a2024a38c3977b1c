"""ChatPrompt: one conversation, as messages with ids, rendered through the model's template."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from llamastream.chat.templates import ChatTemplate

Role = Literal["system", "user", "assistant"]
RECORD_TAG = "__chat_prompt__"


def new_message_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Message:
    """One turn. ``partial`` marks a reply cut short because its client left mid-stream;
    ``reasoning`` is a thinking model's reasoning before its answer (``content``)."""

    role: Role
    content: str
    id: str = field(default_factory=new_message_id)
    created: float = field(default_factory=time.time)
    partial: bool = False
    reasoning: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        return cls(**data)


class ChatPrompt:
    """A conversation: an optional system prompt and the user/assistant turns.

    >>> prompt = ChatPrompt(system_prompt="Be brief.")
    >>> _ = prompt.add_user_message("Hello")
    >>> print(prompt.create_prompt(), end="")
    <|im_start|>system
    Be brief.<|im_end|>
    <|im_start|>user
    Hello<|im_end|>
    <|im_start|>assistant
    """

    def __init__(
        self,
        system_prompt: str | None = None,
        messages: list[Message] | None = None,
        template: ChatTemplate | None = None,
    ) -> None:
        self.system_prompt = system_prompt
        self.messages: list[Message] = list(messages or [])
        self.template = template or ChatTemplate()

    def add_user_message(self, content: str) -> Message:
        message = Message("user", content)
        self.messages.append(message)
        return message

    def add_assistant_message(
        self,
        content: str,
        *,
        reasoning: str = "",
        partial: bool = False,
        message_id: str | None = None,
    ) -> Message:
        message = Message("assistant", content, partial=partial, reasoning=reasoning)
        if message_id is not None:
            message.id = message_id
        self.messages.append(message)
        return message

    def last_user_message(self) -> Message | None:
        for message in reversed(self.messages):
            if message.role == "user":
                return message
        return None

    def remove_trailing_assistant(self) -> Message | None:
        """Drop the reply after the last user input (to regenerate it); return it, if any."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages.pop()
        return None

    def clear(self) -> None:
        self.messages.clear()

    def to_chat_messages(self) -> list[dict[str, str]]:
        """The conversation as ``{"role", "content"}`` dicts, system prompt first; a reply's
        reasoning as ``reasoning_content``, which the template keeps or drops by its own rule
        (Hugging Face's convention)."""
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return head + [
            {"role": m.role, "content": m.content}
            | ({"reasoning_content": m.reasoning} if m.reasoning else {})
            for m in self.messages
        ]

    def create_prompt(self, *, add_generation_prompt: bool = True) -> str:
        """The prompt text the model reads, rendered with the chat template."""
        return self.template.render(
            self.to_chat_messages(), add_generation_prompt=add_generation_prompt
        )

    def fit(self, count_tokens: Callable[[str], int], budget: int) -> int:
        """Drop the oldest turns until the rendered prompt takes at most ``budget`` tokens.

        The system prompt and the last user input are always kept. Returns the prompt's token
        count; the caller checks it against the budget (a single input can be too long alone).
        """
        n = count_tokens(self.create_prompt())
        while n > budget and len(self.messages) > 1:
            del self.messages[0]
            while len(self.messages) > 1 and self.messages[0].role != "user":
                del self.messages[0]
            n = count_tokens(self.create_prompt())
        return n

    def copy(self) -> ChatPrompt:
        return ChatPrompt(
            self.system_prompt,
            [Message.from_dict(m.to_dict()) for m in self.messages],
            self.template,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "system_prompt": self.system_prompt,
            "messages": [m.to_dict() for m in self.messages],
        }

    def to_record(self) -> dict[str, Any]:
        """How a session record keeps the conversation (tagged, as every version wrote it)."""
        return {RECORD_TAG: self.to_dict()}

    @classmethod
    def from_record(cls, record: Any) -> ChatPrompt:
        """The conversation a session record kept (an empty one for anything else)."""
        data = record.get(RECORD_TAG, record) if isinstance(record, dict) else {}
        return cls.from_dict(data if isinstance(data, dict) else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any], template: ChatTemplate | None = None) -> ChatPrompt:
        return cls(
            data.get("system_prompt"),
            [Message.from_dict(m) for m in data.get("messages", [])],
            template,
        )

    def __repr__(self) -> str:
        return f"ChatPrompt(messages={len(self.messages)}, system_prompt={self.system_prompt!r})"
