"""Ollama's wire format for a run: NDJSON chunks (``done: false``, then a last ``done: true``
with the counts and durations), or one JSON object with ``stream: false``."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Literal

from starlette.responses import Response

from llamastream.api.errors import OLLAMA
from llamastream.chat.reasoning import ReasoningSplitter
from llamastream.chat.tools import ToolCall, ToolCallParser
from llamastream.errors import LlamaStreamError
from llamastream.streaming import Run

Kind = Literal["chat", "generate"]


def now() -> str:
    """Ollama's ``created_at``: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class OllamaFraming:
    """One /api/chat or /api/generate reply."""

    def __init__(
        self,
        kind: Kind,
        model: str,
        *,
        stream: bool,
        tools: ToolCallParser | None = None,
        reasoning: ReasoningSplitter | None = None,
        show_thinking: bool = True,
        apart: bool = True,
    ) -> None:
        self.kind = kind
        self.show_thinking = show_thinking  # false: the reasoning parts are left out
        self.apart = apart  # false: the reasoning stays in the text, tags and all
        self.model = model
        self.streaming = stream
        self.tools = tools
        self.reasoning = reasoning
        self.started = time.monotonic_ns()
        self._sent_calls = 0

    def head(self, run: Run) -> tuple[int, list[tuple[bytes, bytes]]]:
        media = b"application/x-ndjson" if self.streaming else b"application/json; charset=utf-8"
        return 200, [(b"content-type", media), (b"cache-control", b"no-store")]

    def piece(self, run: Run, text: str, index: int = 0) -> bytes:
        if self.reasoning is None or (not self.apart and self.show_thinking):
            return self._part("content", text)
        return b"".join(self._part(kind, part) for kind, part in self.reasoning.feed(text))

    def tail(self, run: Run) -> bytes:
        finished = run.finished
        cut = finished is not None and finished.reason == "length"
        if not self.streaming:
            return json.dumps(self._whole(run, cut), ensure_ascii=False).encode()
        out = b""
        if self.reasoning is not None and (self.apart or not self.show_thinking):
            out += b"".join(self._part(kind, part) for kind, part in self.reasoning.finish())
        if self.tools is not None:
            for piece in self.tools.finish(cut=cut):
                if isinstance(piece, str):
                    out += self._chunk({"content": piece})
            out += self._calls()
        return out + _line(self._done(run, {"content": ""} if self.kind == "chat" else ""))

    def error_tail(self, run: Run, exc: LlamaStreamError) -> bytes | None:
        return _line(OLLAMA.body(exc)) if self.streaming else None

    def error_response(self, exc: LlamaStreamError) -> Response:
        return OLLAMA.response(exc)

    def _part(self, kind: str, text: str) -> bytes:
        if not text:
            return b""
        if kind == "reasoning":
            if not self.show_thinking:
                return b""
            if not self.apart:
                return self._part("content", text)
            return self._chunk({"thinking": text})
        if self.tools is None:
            return self._chunk({"content": text})
        out = b""
        for piece in self.tools.feed(text):
            if isinstance(piece, str):
                out += self._chunk({"content": piece})
        return out + self._calls()

    def _calls(self) -> bytes:
        """Tool calls completed since the last chunk, whole (never a half-read call)."""
        assert self.tools is not None
        calls = self.tools.calls[self._sent_calls :]
        self._sent_calls = len(self.tools.calls)
        return self._chunk({"content": "", "tool_calls": _tool_calls(calls)}) if calls else b""

    def _chunk(self, fields: dict[str, Any]) -> bytes:
        head = {"model": self.model, "created_at": now()}
        if self.kind == "chat":
            return _line({**head, "message": {"role": "assistant", **fields}, "done": False})
        body = {"response": fields.get("content", "")}
        if "thinking" in fields:
            body["thinking"] = fields["thinking"]
        return _line({**head, **body, "done": False})

    def _done(self, run: Run, last: Any) -> dict[str, Any]:
        finished = run.finished
        elapsed = time.monotonic_ns() - self.started
        generated = finished.completion_tokens if finished else 0
        first = run.first_text_at
        prompt_ns = int((first - run.accepted_at) * 1e9) if first else elapsed
        body: dict[str, Any] = {"model": self.model, "created_at": now()}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", **last}
        else:
            body["response"] = last
        return {
            **body,
            "done": True,
            "done_reason": "length" if finished and finished.reason == "length" else "stop",
            "total_duration": elapsed,
            "load_duration": 0,
            "prompt_eval_count": len(run.tokens) - (finished.cached_tokens if finished else 0),
            "prompt_eval_duration": prompt_ns,
            "eval_count": generated,
            "eval_duration": max(0, elapsed - prompt_ns),
        }

    def _whole(self, run: Run, cut: bool) -> dict[str, Any]:
        answer, thought = run.reply, ""
        if self.reasoning is not None and (self.apart or not self.show_thinking):
            thought, answer = self.reasoning.split(answer)
            if not self.show_thinking:
                thought = ""
        calls: list[ToolCall] = []
        if self.tools is not None:
            answer, calls = self.tools.parse(answer, cut=cut)
        if self.kind == "generate":
            done = self._done(run, answer)
            return {**done, "thinking": thought} if thought else done
        message: dict[str, Any] = {"content": answer}
        if thought:
            message["thinking"] = thought
        if calls:
            message["tool_calls"] = _tool_calls(calls)
        return self._done(run, message)


def _tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
        for c in calls
    ]


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode() + b"\n"
