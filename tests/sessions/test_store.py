"""DiskSessionStore on a real diskcache directory."""

from __future__ import annotations

import time
from pathlib import Path

from llamastream.chat.prompt import ChatPrompt
from llamastream.sessions.store import DiskSessionStore, Session, new_session_id


def test_session_with_a_chat_prompt_survives_reopening(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path)
    session = Session(new_session_id())
    prompt = ChatPrompt()
    prompt.add_user_message("こんにちは")
    prompt.add_assistant_message("やあ")
    session["chat_prompt"] = prompt
    session["generation_params"] = {"temperature": 0.2}
    store.save(session)
    store.close()

    reopened = DiskSessionStore(tmp_path)
    loaded = reopened.load(session.id)
    assert loaded is not None
    assert isinstance(loaded["chat_prompt"], ChatPrompt)
    assert loaded["chat_prompt"].to_dict() == prompt.to_dict()
    assert loaded["generation_params"] == {"temperature": 0.2}
    assert len(reopened) == 1
    reopened.close()


def test_unknown_and_expired_ids_load_nothing(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path, ttl_s=0.2)
    assert store.load("no-such-session") is None
    session = Session(new_session_id(), {"k": 1})
    store.save(session)
    assert store.load(session.id) == {"k": 1}
    time.sleep(0.3)
    assert store.load(session.id) is None
    store.close()


def test_ids_are_unguessable() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) >= 43 for i in ids)  # 32 random bytes, url-safe base64


def test_a_corrupt_record_starts_afresh(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path)
    store._cache.set("session:broken", "{not json")
    assert store.load("broken") is None
    store.close()
