"""RedisSessionStore on a real redis-server (see tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from llamastream.chat.prompt import ChatPrompt
from llamastream.errors import SessionBusyError, SessionStoreError
from llamastream.sessions.record import Session, new_session_id
from llamastream.sessions.redis_store import RedisSessionStore, redact_url
from tests.redis_server import RedisServer, free_port, redis_server

__all__ = ["redis_server"]  # the fixture, imported for this module's tests

StoreFactory = Callable[..., RedisSessionStore]


@pytest.fixture
def prefix() -> str:
    """Keys of their own for each test, on the shared server."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make_store(redis_server: RedisServer, prefix: str) -> AsyncIterator[StoreFactory]:
    stores: list[RedisSessionStore] = []

    def make(**kwargs: Any) -> RedisSessionStore:
        kwargs.setdefault("prefix", prefix)
        store = RedisSessionStore(kwargs.pop("url", redis_server.url), **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client, to look at the keys the store writes."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def bookkeeping(raw: aioredis.Redis, prefix: str) -> dict[str, Any]:
    ids = await raw.zrange(f"{prefix}:sessions", 0, -1)
    sizes = await raw.hgetall(f"{prefix}:sessions:sizes")
    return {
        "ids": ids,
        "expiry_ids": set(await raw.zrange(f"{prefix}:sessions:expiry", 0, -1)),
        "sizes": {k: int(v) for k, v in sizes.items()},
        "bytes": int(await raw.get(f"{prefix}:sessions:bytes") or 0),
        "records": {
            key.removeprefix(f"{prefix}:session:")
            async for key in raw.scan_iter(match=f"{prefix}:session:*")
        },
    }


def assert_consistent(books: dict[str, Any]) -> None:
    ids = set(books["ids"])
    assert ids == books["expiry_ids"] == set(books["sizes"]) == books["records"]
    assert books["bytes"] == sum(books["sizes"].values())


async def test_session_with_a_chat_prompt_survives_reopening(
    make_store: StoreFactory, raw: aioredis.Redis, prefix: str
) -> None:
    store = make_store(ttl_s=3600)
    session = Session(new_session_id())
    prompt = ChatPrompt()
    prompt.add_user_message("こんにちは")
    prompt.add_assistant_message("やあ")
    session["chat_prompt"] = prompt
    session["generation_params"] = {"temperature": 0.2}
    await store.save(session)
    await store.close()

    reopened = make_store(ttl_s=3600)
    loaded = await reopened.load(session.id)
    assert loaded is not None
    assert loaded.id == session.id
    # The store keeps what the value serialized; its owner makes a ChatPrompt of it again.
    assert loaded["chat_prompt"] == prompt.to_record()
    assert ChatPrompt.from_record(loaded["chat_prompt"]).messages == prompt.messages
    assert loaded["generation_params"] == {"temperature": 0.2}
    assert await reopened.count() == 1

    key = f"{prefix}:session:{session.id}"
    assert await raw.get(key) == session.to_json()
    assert 3_590_000 < await raw.pttl(key) <= 3_600_000
    assert_consistent(await bookkeeping(raw, prefix))


async def test_the_default_keys_are_the_documented_ones(redis_server: RedisServer) -> None:
    url = redis_server.url.removesuffix("/0") + "/9"  # a db of its own for the default prefix
    store = RedisSessionStore(url, ttl_s=60)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        session = Session(new_session_id(), {"k": 1})
        await store.save(session)
        token = await store.lock(session.id)
        assert await client.get(f"llamastream:session:{session.id}") == session.to_json()
        assert await client.get(f"llamastream:lock:{session.id}") == token
        assert await client.zrange("llamastream:sessions", 0, -1) == [session.id]
        await store.unlock(session.id, token)
        await store.delete(session.id)
        assert await store.count() == 0
    finally:
        await client.flushdb()
        await client.aclose()
        await store.close()


async def test_unknown_and_expired_ids_load_nothing(make_store: StoreFactory) -> None:
    store = make_store(ttl_s=0.5)
    assert await store.load("no-such-session") is None
    session = Session(new_session_id(), {"k": 1})
    await store.save(session)
    assert await store.load(session.id) == {"k": 1}
    assert await store.count() == 1
    await asyncio.sleep(0.7)
    assert await store.load(session.id) is None
    assert await store.count() == 0


async def test_a_load_refreshes_the_ttl(
    make_store: StoreFactory, raw: aioredis.Redis, prefix: str
) -> None:
    store = make_store(ttl_s=1.0)
    session = Session(new_session_id(), {"k": 1})
    await store.save(session)
    await asyncio.sleep(0.6)
    assert await store.load(session.id) == {"k": 1}
    await asyncio.sleep(0.6)  # 1.2 s after the save, 0.6 s after the load
    assert await store.load(session.id) == {"k": 1}
    assert await store.count() == 1
    assert_consistent(await bookkeeping(raw, prefix))


async def test_a_corrupt_record_starts_afresh(
    make_store: StoreFactory, raw: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    await raw.set(f"{prefix}:session:broken", "{not json")
    with caplog.at_level(logging.WARNING, logger="llamastream.sessions.redis_store"):
        assert await store.load("broken") is None
    assert "unreadable record" in caplog.text


async def test_delete_forgets_the_record_and_its_bookkeeping(
    make_store: StoreFactory, raw: aioredis.Redis, prefix: str
) -> None:
    store = make_store()
    kept, gone = Session(new_session_id(), {"a": 1}), Session(new_session_id(), {"b": 2})
    await store.save(kept)
    await store.save(gone)
    await store.delete(gone.id)
    await store.delete("never-saved")
    assert await store.load(gone.id) is None
    assert await store.load(kept.id) == {"a": 1}
    assert await store.count() == 1
    books = await bookkeeping(raw, prefix)
    assert books["ids"] == [kept.id]
    assert_consistent(books)


async def test_a_held_lock_makes_the_session_busy(make_store: StoreFactory) -> None:
    store = make_store()
    token = await store.lock("s1")
    with pytest.raises(SessionBusyError):
        await store.lock("s1")
    other = await store.lock("s2")  # locks are per session
    await store.unlock("s1", token)
    again = await store.lock("s1")
    assert again != token
    await store.unlock("s1", again)
    await store.unlock("s2", other)


async def test_renew_and_unlock_with_a_wrong_token_do_nothing(
    make_store: StoreFactory, raw: aioredis.Redis, prefix: str
) -> None:
    store = make_store(lock_ttl_s=5.0)
    token = await store.lock("s1")
    await raw.pexpire(f"{prefix}:lock:s1", 1000)
    assert await store.renew("s1", "not-the-token") is False
    assert await raw.pttl(f"{prefix}:lock:s1") <= 1000
    await store.unlock("s1", "not-the-token")
    with pytest.raises(SessionBusyError):
        await store.lock("s1")
    assert await store.renew("s1", token) is True
    assert await raw.pttl(f"{prefix}:lock:s1") > 4000
    assert await store.renew("never-locked", token) is False
    await store.unlock("s1", token)
    assert await raw.exists(f"{prefix}:lock:s1") == 0


async def test_an_expired_lock_can_be_taken_and_its_old_holder_cannot_touch_it(
    make_store: StoreFactory,
) -> None:
    store = make_store(lock_ttl_s=1.0)
    old = await store.lock("s1")
    await asyncio.sleep(0.5)
    assert await store.renew("s1", old) is True  # lives 1 s from now
    await asyncio.sleep(0.6)  # 1.1 s after it was taken
    with pytest.raises(SessionBusyError):
        await store.lock("s1")
    await asyncio.sleep(0.6)
    new = await store.lock("s1")
    assert await store.renew("s1", old) is False
    await store.unlock("s1", old)
    with pytest.raises(SessionBusyError):
        await store.lock("s1")
    await store.unlock("s1", new)


async def test_past_max_count_the_least_recently_saved_go(
    make_store: StoreFactory, raw: aioredis.Redis, prefix: str
) -> None:
    store = make_store(max_count=3)
    sessions = [Session(f"s{i}", {"i": i}) for i in range(5)]
    for session in sessions:
        await store.save(session)
    assert await store.count() == 3
    present = [await store.load(s.id) is not None for s in sessions]
    assert present == [False, False, True, True, True]

    await store.save(sessions[2])  # saved again: now the most recent
    await store.save(Session("s5", {"i": 5}))
    books = await bookkeeping(raw, prefix)
    assert books["ids"] == ["s4", "s2", "s5"]
    assert_consistent(books)


async def test_past_max_bytes_the_least_recently_saved_go(
    make_store: StoreFactory, raw: aioredis.Redis, prefix: str
) -> None:
    one = len(Session("s0", {"text": "x" * 100}).to_json().encode())
    store = make_store(max_bytes=2 * one + one // 2)
    for i in range(4):
        await store.save(Session(f"s{i}", {"text": "x" * 100}))
    books = await bookkeeping(raw, prefix)
    assert books["ids"] == ["s2", "s3"]
    assert books["bytes"] == 2 * one
    assert_consistent(books)

    # Sizes count UTF-8 bytes, and a session that grows pushes out older ones.
    await store.save(Session("s3", {"text": "é" * 100}))
    books = await bookkeeping(raw, prefix)
    assert books["ids"] == ["s3"]
    assert books["bytes"] == len(Session("s3", {"text": "é" * 100}).to_json().encode())
    assert_consistent(books)

    # One record over the cap on its own is kept: the session just saved never goes.
    await store.save(Session("big", {"text": "x" * 1000}))
    assert (await bookkeeping(raw, prefix))["ids"] == ["big"]
    assert await store.load("big") is not None


async def test_expired_sessions_stop_counting_against_the_caps(
    make_store: StoreFactory, raw: aioredis.Redis, prefix: str
) -> None:
    store = make_store(ttl_s=0.5, max_count=2)
    await store.save(Session("old1"))
    await store.save(Session("old2"))
    await asyncio.sleep(0.7)
    await store.save(Session("new1"))
    await store.save(Session("new2"))
    books = await bookkeeping(raw, prefix)
    assert books["ids"] == ["new1", "new2"]
    assert_consistent(books)
    assert await store.count() == 2


async def test_two_replicas_see_each_others_sessions_and_locks(
    make_store: StoreFactory, raw: aioredis.Redis, prefix: str
) -> None:
    a, b = make_store(max_count=50), make_store(max_count=50)
    session = Session(new_session_id(), {"turns": 1})
    await a.save(session)
    loaded = await b.load(session.id)
    assert loaded == {"turns": 1}
    loaded["turns"] = 2
    await b.save(loaded)
    assert await a.load(session.id) == {"turns": 2}

    token = await a.lock(session.id)
    with pytest.raises(SessionBusyError):
        await b.lock(session.id)
    assert await b.renew(session.id, "guess") is False
    await a.unlock(session.id, token)
    await b.unlock(session.id, await b.lock(session.id))

    # Saves racing from both replicas keep the caps and the bookkeeping exact.
    await asyncio.gather(
        *((a if i % 2 else b).save(Session(f"r{i}", {"text": "y" * (i % 7)})) for i in range(200))
    )
    assert await a.count() == await b.count() == 50
    assert_consistent(await bookkeeping(raw, prefix))


async def test_an_unreachable_redis_is_a_clear_store_error(tmp_path: Path) -> None:
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    store = RedisSessionStore(url)
    try:
        calls = [
            store.load("s1"),
            store.save(Session("s1")),
            store.delete("s1"),
            store.lock("s1"),
            store.renew("s1", "t"),
            store.unlock("s1", "t"),
            store.count(),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(SessionStoreError) as caught:
                await call
            assert time.monotonic() - started < 5
            message = str(caught.value)
            assert "the session store (redis://user:***@127.0.0.1:" in message
            assert "is unavailable" in message
            assert "s3cret" not in message
            assert caught.value.status_code == 503
    finally:
        await store.close()


async def test_the_store_recovers_when_redis_comes_back(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        store = RedisSessionStore(server.url)
        try:
            await store.save(Session("before", {"k": 1}))
            token = await store.lock("before")
            server.stop()
            with pytest.raises(SessionStoreError):
                await store.save(Session("during"))
            with pytest.raises(SessionStoreError):
                await store.load("before")
            server.start()  # same port, no persistence: an empty Redis
            # The first call after the restart works: pooled connections reconnect, and the
            # scripts the new server does not know yet are loaded again.
            await store.save(Session("after", {"k": 2}))
            assert await store.load("after") == {"k": 2}
            assert await store.load("before") is None
            assert await store.renew("before", token) is False
            await store.unlock("after", await store.lock("after"))
            assert await store.count() == 1

            # A restart between two calls: the pooled connections are stale, unknown to the
            # client until used. The next call still works.
            server.stop()
            server.start()
            await store.save(Session("again", {"k": 3}))
            assert await store.load("again") == {"k": 3}
            server.stop()
            server.start()
            assert await store.load("again") is None
        finally:
            await store.close()


async def test_a_hung_redis_is_a_prompt_store_error(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        store = RedisSessionStore(server.url, timeout_s=0.3)
        admin = aioredis.Redis.from_url(server.url)
        try:
            await store.save(Session("s1", {"k": 1}))
            await admin.client_pause(1500, all=True)
            started = time.monotonic()
            with pytest.raises(SessionStoreError, match="is unavailable"):
                await store.load("s1")
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(1.5)
            assert await store.load("s1") == {"k": 1}
        finally:
            await admin.aclose()
            await store.close()


def test_passwords_are_redacted_from_urls() -> None:
    assert redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://me:pw@[::1]:6380/2") == "rediss://me:***@[::1]:6380/2"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock?db=1"
