"""Anthropic's wire format for a run: a Messages object, or its stream of typed events
(``message_start``, content blocks of thinking, text and tool use, ``message_delta``,
``message_stop``), and its error envelope."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from llamastream.api.errors import ANTHROPIC
from llamastream.api.openai.framing import sse_or_json_head
from llamastream.chat.reasoning import ReasoningSplitter
from llamastream.chat.tools import Pieces, ToolCall, ToolCallParser
from llamastream.errors import LlamaStreamError
from llamastream.streaming import Run


class AnthropicFraming:
    """One Messages reply: SSE events when streaming, one JSON body otherwise."""

    def __init__(
        self,
        model: str,
        *,
        stream: bool,
        tools: ToolCallParser | None = None,
        reasoning: ReasoningSplitter | None = None,
    ) -> None:
        self.model = model
        self.streaming = stream
        self.tools = tools
        self.reasoning = reasoning
        self._started = False
        self._block: str | None = None  # the kind of the open content block
        self._index = -1

    def head(self, run: Run) -> tuple[int, list[tuple[bytes, bytes]]]:
        return sse_or_json_head(self.streaming)

    def piece(self, run: Run, text: str, index: int = 0) -> bytes:
        out = self._start(run)
        parts = self.reasoning.feed(text) if self.reasoning else [("content", text)]
        for kind, part in parts:
            out += self._block_text("thinking", part) if kind == "reasoning" else self._answer(part)
        return out

    def tail(self, run: Run) -> bytes:
        finished = run.finished
        cut = finished is not None and finished.reason == "length"
        if not self.streaming:
            return json.dumps(self._whole(run, cut), ensure_ascii=False).encode()
        out = self._start(run)
        if self.reasoning is not None:
            for kind, part in self.reasoning.finish():
                if kind == "reasoning":
                    out += self._block_text("thinking", part)
                else:
                    out += self._answer(part)
        if self.tools is not None:
            out += self._pieces(self.tools.finish(cut=cut))
        out += self._close()
        called = self.tools is not None and bool(self.tools.calls)
        out += _event(
            "message_delta",
            {
                "delta": {
                    "stop_reason": _stop_reason(run, called),
                    "stop_sequence": finished.stop_sequence if finished else None,
                },
                "usage": _usage(run),
            },
        )
        return out + _event("message_stop", {})

    def error_tail(self, run: Run, exc: LlamaStreamError) -> bytes | None:
        if not self.streaming:
            return None
        return ANTHROPIC.mid_stream(exc)

    def error_response(self, exc: LlamaStreamError) -> Response:
        return ANTHROPIC.response(exc)

    # streamed events

    def _start(self, run: Run) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict[str, Any] = {
            "id": "msg_" + run.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": len(run.tokens), "output_tokens": 0},
        }
        return _event("message_start", {"message": message})

    def _answer(self, text: str) -> bytes:
        if self.tools is None:
            return self._block_text("text", text)
        return self._pieces(self.tools.feed(text))

    def _pieces(self, pieces: Pieces) -> bytes:
        out = b""
        for piece in pieces:
            if isinstance(piece, str):
                out += self._block_text("text", piece)
            elif piece.id is not None:  # a call begins: its own block
                out += self._close()
                block: dict[str, Any] = {
                    "type": "tool_use",
                    "id": piece.id,
                    "name": piece.name,
                    "input": {},
                }
                out += self._open("tool_use", block)
            else:
                delta = {"type": "input_json_delta", "partial_json": piece.arguments}
                out += _event("content_block_delta", {"index": self._index, "delta": delta})
        return out

    def _block_text(self, kind: str, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if self._block != kind:
            out += self._close()
            out += self._open(kind, {"type": kind, kind: ""})
        delta = {"type": f"{kind}_delta", kind: text}
        return out + _event("content_block_delta", {"index": self._index, "delta": delta})

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        self._index += 1
        self._block = kind
        if kind == "thinking":
            block["signature"] = ""
        return _event("content_block_start", {"index": self._index, "content_block": block})

    def _close(self) -> bytes:
        if self._block is None:
            return b""
        out = b""
        if self._block == "thinking":  # no signature: this server's thinking is not signed
            delta = {"type": "signature_delta", "signature": ""}
            out += _event("content_block_delta", {"index": self._index, "delta": delta})
        self._block = None
        return out + _event("content_block_stop", {"index": self._index})

    # one JSON body

    def _whole(self, run: Run, cut: bool) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        answer = run.reply
        if self.reasoning is not None:
            thought, answer = self.reasoning.split(answer)
            if thought:
                content.append({"type": "thinking", "thinking": thought, "signature": ""})
        calls: list[ToolCall] = []
        if self.tools is not None:
            answer, calls = self.tools.parse(answer, cut=cut)
            if calls and not answer.strip():
                answer = ""
        if answer:
            content.append({"type": "text", "text": answer})
        for call in calls:
            content.append(
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    "input": json.loads(call.arguments),
                }
            )
        finished = run.finished
        return {
            "id": "msg_" + run.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": _stop_reason(run, bool(calls)),
            "stop_sequence": finished.stop_sequence if finished else None,
            "usage": _usage(run),
        }


def _stop_reason(run: Run, called: bool) -> str:
    finished = run.finished
    if finished is not None and finished.reason == "length":
        return "max_tokens"
    if called:
        return "tool_use"
    if finished is not None and finished.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def _usage(run: Run) -> dict[str, int]:
    """Anthropic's usage: input tokens read, those read from the cache apart, output tokens."""
    finished = run.finished
    cached = finished.cached_tokens if finished else 0
    return {
        "input_tokens": len(run.tokens) - cached,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
        "output_tokens": finished.completion_tokens if finished else 0,
    }


def _event(kind: str, data: dict[str, Any]) -> bytes:
    body = json.dumps({"type": kind, **data}, ensure_ascii=False)
    return f"event: {kind}\ndata: {body}\n\n".encode()
