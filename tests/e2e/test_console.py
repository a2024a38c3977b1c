"""`llamastream chat` driven through a real terminal (a pty, with pexpect) against a live
server on the tiny model: streaming, the session cookie, commands, multi-line and Japanese
input, a busy server and an unreachable one."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pexpect

from tests.conftest import eventually
from tests.e2e.conftest import paused, server

PROMPT = "\r\n> "


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamastream", "chat", *args],
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 200),
    )
    child.expect("/help for commands")
    child.expect("> ")
    return child


def say(child: pexpect.spawn, *lines: str) -> str:
    """Send lines; what the console wrote back until its next prompt (the echo left out)."""
    for line in lines[:-1]:
        child.sendline(line)
        child.expect(r"\.\.\. ")
    child.sendline(lines[-1])
    child.expect(PROMPT)
    out = child.before.replace("\r\n", "\n")
    return out.split("\n", 1)[1] if "\n" in out else ""


def stored(url: str, session_file: Path) -> list[dict[str, Any]]:
    cookies = json.loads(session_file.read_text(encoding="utf-8"))
    answer = httpx.get(url + "/get_prompt", cookies=cookies, timeout=30)
    return answer.json()["messages"]  # type: ignore[no-any-return]


def test_a_conversation_in_the_console(settings_kwargs: dict[str, Any], tmp_path: Path) -> None:
    cookie = tmp_path / "session.json"
    with server(settings_kwargs, max_new_tokens=24) as (live, _):
        child = spawn("--url", live.url, "--session-file", str(cookie))
        reply = say(child, "こんにちは、元気？")
        history = stored(live.url, cookie)
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert history[0]["content"] == "こんにちは、元気？"
        assert reply.rstrip("\n") == history[1]["content"].replace("\r\n", "\n")  # streamed whole

        say(child, "first line\\", "second line")
        say(child, '"""', "一行目", "", "三行目", '"""')
        users = [m["content"] for m in stored(live.url, cookie) if m["role"] == "user"]
        assert users[1:] == ["first line\nsecond line", "一行目\n\n三行目"]

        assert "temperature=0.3" in say(child, "/params temperature=0.3 top_k=5")
        assert "refused (400)" in say(child, "/params temperature=99")
        before = stored(live.url, cookie)[-1]["id"]
        say(child, "/regenerate")
        after = stored(live.url, cookie)
        assert len(after) == 6 and after[-1]["id"] != before
        assert "/regenerate" in say(child, "/help")
        assert "unknown command" in say(child, "/nope")
        assert "cleared" in say(child, "/clear")
        assert stored(live.url, cookie) == []

        # Another run of the console with the same session file goes on with it.
        say(child, "remember me")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.wait()
        assert child.exitstatus == 0
        again = spawn("--url", live.url, "--session-file", str(cookie))
        say(again, "and now?")
        assert [m["content"] for m in stored(live.url, cookie) if m["role"] == "user"] == [
            "remember me",
            "and now?",
        ]

    # The server is gone: the console says so and goes on.
    assert "cannot reach" in say(again, "hello")
    again.sendeof()
    again.expect(pexpect.EOF)
    # Started against a server that does not answer: it says so and exits 1.
    dead = pexpect.spawn(
        sys.executable, ["-m", "llamastream", "chat", "--url", live.url], encoding="utf-8"
    )
    dead.expect("cannot reach")
    dead.expect(pexpect.EOF)
    dead.wait()
    assert dead.exitstatus == 1


def test_a_busy_server_is_announced(settings_kwargs: dict[str, Any]) -> None:
    with server(settings_kwargs, num_of_concurrent_executions=1, max_queue_size=0) as (
        live,
        app,
    ):
        child = spawn("--url", live.url)
        with paused(app.state.service.pool.workers[0]):
            holder = threading.Thread(
                target=lambda: httpx.post(
                    live.url + "/chat_stream", json={"user_input": "x"}, timeout=30
                )
            )
            holder.start()
            with live.client() as probe:
                eventually(lambda: probe.get("/get_load").json()["processing"] >= 1)
            assert "the server is busy (try again in" in say(child, "hello")
        holder.join()
        assert say(child, "hello again").strip()  # a slot is free again: it answers
        child.sendline("/quit")
        child.expect(pexpect.EOF)


def test_in_process_model(tiny_model: Path) -> None:
    child = spawn("--model", str(tiny_model))
    assert say(child, "日本語で話して").strip()
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
