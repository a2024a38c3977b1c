"""`llamastream chat`: a console chat against a running server, or a model run in-process.

Replies stream as they are generated (a thinking model's reasoning dimmed before its answer);
the session cookie keeps the conversation (``--session-file`` keeps it across runs too).
Commands: ``/regenerate``, ``/clear``, ``/params [name=value ...]``, ``/help``, ``/quit``.
A line ending with a backslash goes on on the next line; ``\"\"\"`` opens and closes a block
of several lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx

HELP = """\
/regenerate          a new reply to the last input
/clear               forget the conversation
/params              the session's generation parameters
/params k=v ...      set some (temperature, top_p, top_k, repeat_penalty, max_new_tokens, seed)
/help                this text
/quit                leave (Ctrl+D too); Ctrl+C stops a reply
A line ending with \\ goes on on the next line; \"\"\" opens and closes a block of lines."""

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ChatError(Exception):
    """A turn the server did not take (busy, unreachable, refused): the message says why."""


class ConsoleChat:
    """One conversation with a llamastream server, over its native session API."""

    def __init__(self, url: str, *, session_file: Path | None = None, timeout: float = 600):
        self.url = url.rstrip("/")
        self.session_file = session_file
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=5))
        if session_file is not None and session_file.exists():
            for name, value in json.loads(session_file.read_text(encoding="utf-8")).items():
                self.client.cookies.set(name, value)

    def close(self) -> None:
        self._keep_cookies()
        self.client.close()

    def model(self) -> str:
        return str(self._json("GET", "/health").get("model", ""))

    def turn(
        self, user_input: str | None, *, regenerate: bool = False
    ) -> Iterator[tuple[str, str]]:
        """The reply as (kind, text) parts: ``reasoning`` and ``content``."""
        body: dict[str, Any] = {"regenerate": True} if regenerate else {"user_input": user_input}
        headers = {"accept": "application/x-ndjson"}
        try:
            with self.client.stream("POST", "/chat_stream", json=body, headers=headers) as reply:
                if reply.status_code != 200:
                    reply.read()
                    raise ChatError(_refusal(reply))
                self._keep_cookies()
                for line in reply.iter_lines():
                    if not line:
                        continue
                    event = json.loads(line)
                    if event["type"] in ("reasoning", "content"):
                        yield event["type"], event["text"]
                    elif event["type"] == "error":
                        raise ChatError(f"the reply failed: {event.get('message', '')}")
        except httpx.TransportError as exc:
            raise ChatError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from None

    def clear(self) -> None:
        self._json("POST", "/clear_context")

    def params(self, changes: dict[str, Any] | None = None) -> dict[str, Any]:
        if changes:
            return self._json("POST", "/set_generation_params", changes)
        return self._json("GET", "/get_generation_params")

    def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            reply = self.client.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise ChatError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from None
        if reply.status_code != 200:
            raise ChatError(_refusal(reply))
        self._keep_cookies()
        data = reply.json()
        return data if isinstance(data, dict) else {}

    def _keep_cookies(self) -> None:
        if self.session_file is not None:
            cookies = {c.name: c.value for c in self.client.cookies.jar}
            self.session_file.write_text(json.dumps(cookies), encoding="utf-8")


def _refusal(reply: httpx.Response) -> str:
    """What a refused request says, in words a person reads."""
    try:
        message = reply.json().get("message") or reply.text
    except ValueError:
        message = reply.text
    if reply.status_code in (429, 503):
        wait = reply.headers.get("retry-after")
        when = f" (try again in {wait} s)" if wait else ""
        return f"the server is busy{when}: {message}"
    return f"refused ({reply.status_code}): {message}"


def _parse_params(words: list[str]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep:
            raise ChatError(f"/params takes name=value, not {word!r}")
        try:
            changes[name] = json.loads(value)
        except ValueError:
            changes[name] = value
    return changes


def read_message(stdin: TextIO, stdout: TextIO) -> str | None:
    """One message from the user (None at the end of input): a line, lines joined by a
    trailing backslash, or a \"\"\" block."""
    stdout.write("> ")
    stdout.flush()
    line = stdin.readline()
    if not line:
        return None
    line = line.rstrip("\n")
    lines: list[str] = []
    if line.strip() == '"""':
        while True:
            stdout.write("... ")
            stdout.flush()
            more = stdin.readline()
            if not more or more.rstrip("\n").strip() == '"""':
                return "\n".join(lines)
            lines.append(more.rstrip("\n"))
    while line.endswith("\\"):
        lines.append(line[:-1])
        stdout.write("... ")
        stdout.flush()
        more = stdin.readline()
        if not more:
            break
        line = more.rstrip("\n")
    else:
        lines.append(line)
    return "\n".join(lines)


def run(chat: ConsoleChat, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The conversation loop; returns the exit status."""
    color = stdout.isatty()
    try:
        model = chat.model()
    except ChatError as exc:
        stdout.write(f"{exc}\n")
        return 1
    stdout.write(f"llamastream chat with {model} at {chat.url}. /help for commands.\n")
    while True:
        try:
            message = read_message(stdin, stdout)
        except KeyboardInterrupt:
            stdout.write("\n")
            continue
        if message is None or message.strip() in ("/quit", "/exit"):
            stdout.write("\n" if message is None else "")
            return 0
        words = message.strip().split()
        try:
            if not words:
                continue
            if words[0] == "/help":
                stdout.write(HELP + "\n")
            elif words[0] == "/clear":
                chat.clear()
                stdout.write("(the conversation is cleared)\n")
            elif words[0] == "/params":
                params = chat.params(_parse_params(words[1:]))
                stdout.write(" ".join(f"{k}={v}" for k, v in params.items()) + "\n")
            elif words[0] == "/regenerate":
                _show(chat.turn(None, regenerate=True), stdout, color)
            elif words[0].startswith("/") and len(words) == 1 and words[0][1:].isalpha():
                stdout.write(f"unknown command {words[0]}; /help lists them\n")
            else:
                _show(chat.turn(message), stdout, color)
        except ChatError as exc:
            stdout.write(f"{exc}\n")
        stdout.flush()


def _show(parts: Iterator[tuple[str, str]], stdout: TextIO, color: bool) -> None:
    """Write a reply as it comes; Ctrl+C stops it (the server stops generating)."""
    kind_shown = None
    try:
        for kind, text in parts:
            if kind != kind_shown:
                if kind_shown == "reasoning":
                    stdout.write((RESET if color else "") + "\n\n")
                elif kind == "reasoning":
                    stdout.write(DIM if color else "[reasoning] ")
                kind_shown = kind
            stdout.write(text)
            stdout.flush()
    except KeyboardInterrupt:
        stdout.write(" (stopped)")
    finally:
        if kind_shown == "reasoning" and color:
            stdout.write(RESET)
        stdout.write("\n")
        stdout.flush()


@contextlib.contextmanager
def in_process_server(model: Path, session_dir: Path | None) -> Iterator[str]:
    """A server for ``model`` on a free 127.0.0.1 port in this process; its URL."""
    import uvicorn

    from llamastream.api.app import create_app

    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(model_path=model, session_dir=session_dir or Path(scratch))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise SystemExit(f"llamastream chat: could not start {model}")
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llamastream chat", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000", help="a running server")
    where.add_argument("--model", type=Path, help="a GGUF model to run in this process instead")
    parser.add_argument("--session-dir", type=Path, help="sessions of --model (default: temp)")
    parser.add_argument(
        "--session-file", type=Path, help="keep the session cookie here, to go on later"
    )
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url
        if args.model is not None:
            url = stack.enter_context(in_process_server(args.model, args.session_dir))
        chat = ConsoleChat(url, session_file=args.session_file)
        stack.callback(chat.close)
        return run(chat)
