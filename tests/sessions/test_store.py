"""DiskSessionStore on a real diskcache directory."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from llamastream.chat.prompt import ChatPrompt
from llamastream.errors import SessionBusyError, SessionStoreError
from llamastream.sessions.disk_store import _HOST, DiskSessionStore
from llamastream.sessions.record import Session, new_session_id


async def test_session_with_a_chat_prompt_survives_reopening(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path)
    session = Session(new_session_id())
    prompt = ChatPrompt()
    prompt.add_user_message("こんにちは")
    prompt.add_assistant_message("やあ")
    session["chat_prompt"] = prompt
    session["generation_params"] = {"temperature": 0.2}
    await store.save(session)
    await store.close()

    reopened = DiskSessionStore(tmp_path)
    loaded = await reopened.load(session.id)
    assert loaded is not None
    # The store keeps what the value serialized; its owner makes a ChatPrompt of it again.
    assert loaded["chat_prompt"] == prompt.to_record()
    assert ChatPrompt.from_record(loaded["chat_prompt"]).messages == prompt.messages
    assert loaded["generation_params"] == {"temperature": 0.2}
    assert await reopened.count() == 1
    await reopened.close()


async def test_unknown_and_expired_ids_load_nothing(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path, ttl_s=0.2)
    assert await store.load("no-such-session") is None
    session = Session(new_session_id(), {"k": 1})
    await store.save(session)
    assert await store.load(session.id) == {"k": 1}
    await asyncio.sleep(0.3)
    assert await store.load(session.id) is None
    await store.close()


def test_ids_are_unguessable() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) >= 43 for i in ids)  # 32 random bytes, url-safe base64


async def test_a_corrupt_record_starts_afresh(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path)
    store._cache.set("session:broken", "{not json")
    assert await store.load("broken") is None
    await store.close()


async def test_the_count_cap_evicts_the_least_recently_saved(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path, max_count=3)
    sessions = [Session(new_session_id(), {"n": n}) for n in range(3)]
    for session in sessions:
        await store.save(session)
    await store.save(sessions[0])  # saved again: now the most recent
    await store.save(Session(new_session_id(), {"n": 3}))
    assert await store.count() == 3
    assert await store.load(sessions[1].id) is None  # the oldest save went
    assert await store.load(sessions[0].id) == {"n": 0}
    assert await store.load(sessions[2].id) == {"n": 2}
    await store.close()


async def test_the_size_cap_evicts_old_records(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path, max_bytes=1 << 20)
    big = "x" * 200_000
    ids = []
    for _ in range(12):
        session = Session(new_session_id(), {"text": big})
        await store.save(session)
        ids.append(session.id)
    assert store._cache.volume() < 3 << 20  # diskcache culls in steps; bounded near the cap
    assert await store.load(ids[-1]) is not None
    assert await store.load(ids[0]) is None
    await store.close()


async def test_turn_locks(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path, lock_ttl_s=1)
    other = DiskSessionStore(tmp_path, lock_ttl_s=1)  # a second process on the same directory
    token = await store.lock("s1")
    with pytest.raises(SessionBusyError):
        await other.lock("s1")
    await other.lock("s2")  # other sessions are not affected
    assert not await other.renew("s1", "wrong-token")
    await other.unlock("s1", "wrong-token")
    with pytest.raises(SessionBusyError):
        await other.lock("s1")
    assert await store.renew("s1", token)
    await store.unlock("s1", token)
    token = await other.lock("s1")
    await asyncio.sleep(1.2)  # its holder died: the lock expires
    await store.lock("s1")
    assert not await other.renew("s1", token)
    await store.close()
    await other.close()


async def test_a_full_disk_raises_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskSessionStore(tmp_path)
    session = Session(new_session_id(), {"k": 1})
    await store.save(session)

    def full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store._cache, "set", full)
    with pytest.raises(SessionStoreError, match=r"session store is unavailable.*disk is full"):
        await store.save(Session(session.id, {"k": 2}))
    assert await store.load(session.id) == {"k": 1}  # the failed write changed nothing
    await store.close()


async def test_the_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    store = DiskSessionStore(tmp_path, lock_ttl_s=60)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = _HOST
    store._locks.set("session:s1", f"{host}:{dead.pid}:left-by-kill-9", expire=60)
    store._locks.set("session:s2", f"{host}:{os.getpid()}:held-by-a-live-process", expire=60)
    # Another machine's (or container's) pid says nothing here: never taken over.
    store._locks.set("session:s3", f"elsewhere/1:{dead.pid}:other-host", expire=60)
    await store.lock("s1")
    for held in ("s2", "s3"):
        with pytest.raises(SessionBusyError):
            await store.lock(held)
    await store.close()
