"""Two llamastream processes sharing sessions in a real Redis, as replicas behind a balancer."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import free_port, subprocess_server
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

COOKIE = "llamastream_session"


@contextlib.contextmanager
def replicas(model: Path, redis_url: str, *flags: str, count: int = 2) -> Iterator[list[str]]:
    """``count`` `llamastream serve` processes on the same Redis; yields their base URLs."""
    common = ["--model", str(model), "--session-backend", "redis", "--redis-url", redis_url]
    common += ["--n-ctx", "8192", "--max-new-tokens", "16", "--n-threads", "1", *flags]
    with contextlib.ExitStack() as stack:
        urls = []
        for _ in range(count):
            port = free_port()
            args = [sys.executable, "-m", "llamastream", "serve", "--port", str(port), *common]
            stack.enter_context(subprocess_server(args, {"PYTHONUNBUFFERED": "1"}, port))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
        for url in urls:  # every test leaves both replicas idle
            deadline = time.monotonic() + 5
            while httpx.get(f"{url}/health").json()["processing"]:
                assert time.monotonic() < deadline, f"{url} still busy"
                time.sleep(0.05)


@pytest.fixture
def fresh_db(redis_server: RedisServer) -> str:
    """A Redis database of its own for one test, emptied first."""
    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


def history(client: httpx.Client, url: str) -> list[str]:
    return [m["content"] for m in client.get(f"{url}/get_prompt").json()["messages"]]


def test_a_conversation_alternating_between_replicas_keeps_its_history(
    tiny_model: Path, fresh_db: str
) -> None:
    with replicas(tiny_model, fresh_db) as (a, b), httpx.Client(timeout=30) as client:
        # One client, two ports: the cookie goes to both, as behind a balancer on one host.
        replies = []
        for turn, url in enumerate([a, b, a, b]):
            response = client.post(f"{url}/chat_stream", json={"user_input": f"turn {turn}"})
            assert response.status_code == 200, response.text
            replies.append(response.text)
        expected = [text for turn in range(4) for text in (f"turn {turn}", replies[turn])]
        assert history(client, a) == expected
        assert history(client, b) == expected
        assert client.post(f"{b}/chat_stream", json={"regenerate": True}).status_code == 200
        assert history(client, a)[:-1] == expected[:-1]
        assert client.post(f"{a}/clear_context").status_code == 200
        assert history(client, b) == []


def test_one_session_runs_one_turn_at_a_time_across_replicas(
    tiny_model: Path, fresh_db: str
) -> None:
    # Greedy decoding: the tiny model's reply to a first "long" runs to the 8000-token limit.
    flags = ["--max-new-tokens", "8000", "--temperature", "0"]
    with replicas(tiny_model, fresh_db, *flags) as (a, b), httpx.Client(timeout=30) as client:
        assert client.post(f"{a}/set_generation_params", json={}).status_code == 200  # a cookie
        with client.stream("POST", f"{a}/chat_stream", json={"user_input": "long"}) as r:
            chunks = r.iter_raw()  # kept: a dropped iterator closes the connection
            assert next(chunks)  # streaming on replica a
            busy = client.post(f"{b}/chat_stream", json={"user_input": "meanwhile"})
            assert busy.status_code == 409
            assert busy.json()["error"] == "session_busy"
            assert client.post(f"{b}/clear_context").status_code == 409
        # a's client left mid-stream: the lock is released, the partial reply kept.
        short = {"max_new_tokens": 4}
        deadline = time.monotonic() + 5
        while client.post(f"{b}/set_generation_params", json=short).status_code == 409:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post(f"{b}/chat_stream", json={"user_input": "now"}).status_code == 200
        messages = client.get(f"{a}/get_prompt").json()["messages"]
        assert [m["content"] for m in messages][::2] == ["long", "now"]
        assert messages[1]["partial"] is True


def test_concurrent_turns_of_one_session_lose_no_update(tiny_model: Path, fresh_db: str) -> None:
    with replicas(tiny_model, fresh_db) as (a, b), httpx.Client(timeout=30) as client:
        client.post(f"{a}/chat_stream", json={"user_input": "start"})
        cookie = client.cookies[COOKIE]
        outcomes: list[tuple[str, int]] = []

        def turn(url: str, text: str) -> None:
            with httpx.Client(timeout=30, cookies={COOKIE: cookie}) as c:
                outcomes.append(
                    (text, c.post(f"{url}/chat_stream", json={"user_input": text}).status_code)
                )

        threads = [
            threading.Thread(target=turn, args=(url, f"{url[-5:]}-{i}"))
            for i in range(6)
            for url in (a, b)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        accepted = [text for text, status in outcomes if status == 200]
        assert {status for _, status in outcomes} <= {200, 409}
        assert accepted  # at least one turn got through
        users = history(client, b)[::2]
        # Every accepted turn is in the history, once; no refused turn is.
        assert users[0] == "start"
        assert sorted(users[1:]) == sorted(accepted)


def test_redis_going_away_gives_clear_errors_then_recovers(
    tiny_model: Path, tmp_path: Path
) -> None:
    with RedisServer(tmp_path, persistent=True) as store:
        with replicas(tiny_model, store.url, count=1) as (a,), httpx.Client(timeout=30) as client:
            first = client.post(f"{a}/chat_stream", json={"user_input": "before"})
            assert first.status_code == 200
            store.stop()
            down = client.post(f"{a}/chat_stream", json={"user_input": "during"})
            assert down.status_code == 503
            assert down.json()["error"] == "session_store_unavailable"
            assert "redis://127.0.0.1" in down.json()["message"]
            assert client.get(f"{a}/get_prompt").status_code == 503
            assert httpx.get(f"{a}/health").status_code == 200  # the model still serves /v1
            store.start()
            assert history(client, a) == ["before", first.text]
            again = client.post(f"{a}/chat_stream", json={"user_input": "after"})
            assert again.status_code == 200
            assert history(client, a)[::2] == ["before", "after"]


def test_sessions_expire_in_redis(tiny_model: Path, fresh_db: str) -> None:
    with replicas(tiny_model, fresh_db, "--session-ttl-s", "1") as (a, b):
        with httpx.Client(timeout=30) as client:
            client.post(f"{a}/chat_stream", json={"user_input": "short-lived"})
            old = client.cookies[COOKIE]
            assert history(client, b)[0] == "short-lived"
            time.sleep(1.5)
            assert history(client, b) == []
            assert client.cookies[COOKIE] != old  # a fresh session was issued
