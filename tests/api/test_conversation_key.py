"""Which conversation a stateless /v1 request continues (for its saved KV cache)."""

from __future__ import annotations

from typing import Any

from llamastream.api.openai.models import ChatCompletionRequest


def _request(*messages: tuple[str, str], **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="m", messages=[{"role": r, "content": c} for r, c in messages], **fields
    )


def test_a_first_turn_has_no_key() -> None:
    assert _request(("system", "Be brief."), ("user", "hi")).conversation_key() is None


def test_later_turns_of_one_conversation_share_its_key() -> None:
    turn2 = _request(("system", "s"), ("user", "hi"), ("assistant", "hello"), ("user", "more"))
    turn3 = _request(
        ("system", "s"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "more"),
        ("assistant", "sure"),
        ("user", "again"),
    )
    key = turn2.conversation_key()
    assert key is not None and key.startswith("v1:")
    assert turn3.conversation_key() == key


def test_conversations_that_begin_otherwise_have_other_keys() -> None:
    base = [("system", "s"), ("user", "hi"), ("assistant", "hello"), ("user", "more")]
    key = _request(*base).conversation_key()
    assert _request(*base, user="someone").conversation_key() != key
    assert _request(("system", "t"), *base[1:]).conversation_key() != key
    assert _request(("user", "bye"), *base[2:]).conversation_key() != key
    # Text parts count as their text.
    parts = ChatCompletionRequest(
        model="m",
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "s"}]},
            *[{"role": r, "content": c} for r, c in base[1:]],
        ],
    )
    assert parts.conversation_key() == key
