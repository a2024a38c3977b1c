"""OpenAI's wire format for a run: chat and text completion objects, SSE chunks or one JSON
body, and its error envelope (before the stream and within it)."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from starlette.responses import Response

from llamastream.api.errors import OPENAI
from llamastream.chat.reasoning import Pieces as ReasoningPieces
from llamastream.chat.reasoning import ReasoningSplitter
from llamastream.chat.tools import Pieces, ToolCallParser
from llamastream.engine.worker import TokenLogprob
from llamastream.errors import LlamaStreamError
from llamastream.streaming import Run

Kind = Literal["chat", "text"]


class OpenAIFraming:
    """OpenAI's objects for a run: SSE chunks when streaming, one JSON body otherwise."""

    def __init__(
        self,
        kind: Kind,
        model: str,
        *,
        stream: bool,
        include_usage: bool,
        tools: ToolCallParser | None = None,
        reasoning: ReasoningSplitter | None = None,
        logprobs: bool = False,
        fingerprint: str | None = None,
    ) -> None:
        self.kind = kind
        self.model = model
        self.streaming = stream
        self.include_usage = include_usage
        self.tools = tools  # reads tool calls out of the reply when the request offered tools
        self.reasoning = reasoning  # keeps a thinking model's reasoning apart from its answer
        self.logprobs = logprobs  # each token's log probabilities go with its chunk
        self.fingerprint = fingerprint
        self.created = int(time.time())
        self._role_sent = False
        self._run: Run | None = None
        self._sent = 0  # log probabilities sent so far
        self._offset = 0  # characters of text sent so far (text completions' offsets)

    def head(self, run: Run) -> tuple[int, list[tuple[bytes, bytes]]]:
        media = b"text/event-stream; charset=utf-8" if self.streaming else b"application/json"
        return 200, [
            (b"content-type", media),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]

    def piece(self, run: Run, text: str) -> bytes:
        self._run = run
        if self.reasoning is None:
            return self._role(run) + self._answer(run, text)
        return self._role(run) + self._split(run, self.reasoning.feed(text))

    def _split(self, run: Run, parts: ReasoningPieces) -> bytes:
        """Chunks of reasoning and of the answer, in the order they came."""
        out = b""
        for kind, part in parts:
            out += self._answer(run, part) if kind == "content" else self._thought(run, part)
        return out

    def _answer(self, run: Run, text: str) -> bytes:
        """Chunks of the answer's text (content, or tool calls read out of it)."""
        if self.tools is None:
            return self._event(self._chunk(run, text, None))
        return self._pieces(run, self.tools.feed(text))

    def _thought(self, run: Run, text: str) -> bytes:
        return self._delta(run, {"reasoning_content": text})

    def _delta(self, run: Run, delta: dict[str, Any]) -> bytes:
        """One chat chunk carrying ``delta``."""
        return self._event({**self._envelope(run), **self._chunk_with(delta, None)})

    def tail(self, run: Run) -> bytes:
        self._run = run
        finished = run.finished
        if finished is not None and finished.reason == "length":
            reason = "length"
        else:
            reason = "stop"
        if not self.streaming:
            return json.dumps(self._whole(run, reason), ensure_ascii=False).encode()
        out = self._role(run)
        if self.reasoning is not None:
            out += self._split(run, self.reasoning.finish())
        if self.tools is not None:
            out += self._pieces(run, self.tools.finish(cut=reason == "length"))
            if self.tools.calls and reason == "stop":
                reason = "tool_calls"
        out += self._event(self._chunk(run, None, reason))
        if self.include_usage:
            usage = {**self._envelope(run), "choices": [], "usage": _usage(run)}
            out += self._event(usage)
        return out + b"data: [DONE]\n\n"

    def error_tail(self, run: Run, exc: LlamaStreamError) -> bytes | None:
        return OPENAI.mid_stream(exc) if self.streaming else None

    def error_response(self, exc: LlamaStreamError) -> Response:
        return OPENAI.response(exc)

    def _role(self, run: Run) -> bytes:
        """The opening chunk of a chat stream, which names the role."""
        if self.kind != "chat" or self._role_sent:
            return b""
        self._role_sent = True
        return self._delta(run, {"role": "assistant", "content": ""})

    def _envelope(self, run: Run) -> dict[str, Any]:
        prefix, obj = (
            ("chatcmpl-", "chat.completion")
            if self.kind == "chat"
            else ("cmpl-", "text_completion")
        )
        if self.kind == "chat" and self.streaming:
            obj = "chat.completion.chunk"
        envelope = {"id": prefix + run.id, "object": obj, "created": self.created}
        envelope["model"] = self.model
        if self.fingerprint is not None:
            envelope["system_fingerprint"] = self.fingerprint
        return envelope

    def _chunk(self, run: Run, text: str | None, reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = {"content": text} if text is not None else {}
            chunk = self._chunk_with(delta, reason)
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            if self.logprobs:
                choice["logprobs"] = _text_logprobs(self._new_logprobs(), self._offset)
                self._offset += len(text or "")
            chunk = {"choices": [choice]}
        return {**self._envelope(run), **chunk}

    def _chunk_with(self, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
        if self.logprobs and "role" not in delta:
            choice["logprobs"] = {"content": _chat_logprobs(self._new_logprobs()), "refusal": None}
        return {"choices": [choice]}

    def _new_logprobs(self) -> list[TokenLogprob]:
        """The log probabilities not sent yet: they go with the chunk being made."""
        if self._run is None:
            return []
        new = self._run.logprobs[self._sent :]
        self._sent = len(self._run.logprobs)
        return new

    def _pieces(self, run: Run, pieces: Pieces) -> bytes:
        """Chunks of content and of tool calls (a call's id and name, then its arguments)."""
        out = b""
        for piece in pieces:
            if isinstance(piece, str):
                out += self._event(self._chunk(run, piece, None))
                continue
            call: dict[str, Any] = {"index": piece.index}
            if piece.id is not None:
                call["id"] = piece.id
                call["type"] = "function"
                call["function"] = {"name": piece.name, "arguments": ""}
            else:
                call["function"] = {"arguments": piece.arguments}
            out += self._delta(run, {"tool_calls": [call]})
        return out

    def _whole(self, run: Run, reason: str) -> dict[str, Any]:
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": run.reply}
            if self.reasoning is not None:
                thought, message["content"] = self.reasoning.split(run.reply)
                if thought:
                    message["reasoning_content"] = thought
            if self.tools is not None:
                content, calls = self.tools.parse(message["content"], cut=reason == "length")
                message["content"] = None if calls and not content.strip() else content
                if calls:
                    message["tool_calls"] = [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments},
                        }
                        for c in calls
                    ]
                    reason = "tool_calls" if reason == "stop" else reason
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reason}
            if self.logprobs:
                choice["logprobs"] = {"content": _chat_logprobs(run.logprobs), "refusal": None}
        else:
            choice = {"index": 0, "text": run.reply, "logprobs": None, "finish_reason": reason}
            if self.logprobs:
                choice["logprobs"] = _text_logprobs(run.logprobs, 0)
        return {**self._envelope(run), "choices": [choice], "usage": _usage(run)}

    @staticmethod
    def _event(data: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _usage(run: Run) -> dict[str, Any]:
    completion = run.finished.completion_tokens if run.finished else 0
    cached = run.finished.cached_tokens if run.finished else 0
    return {
        "prompt_tokens": len(run.tokens),
        "completion_tokens": completion,
        "total_tokens": len(run.tokens) + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _token_text(piece: bytes) -> str:
    """A token's text; a piece of a multibyte character (its bytes are exact in ``bytes``)
    is written as its escaped bytes, as OpenAI does."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in piece)


def _chat_logprobs(tokens: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat completions' ``logprobs.content``."""
    return [
        {
            "id": t.token,  # llama-server's addition
            "token": _token_text(t.piece),
            "logprob": t.logprob,
            "bytes": list(t.piece),
            "top_logprobs": [
                {"id": token, "token": _token_text(piece), "logprob": lp, "bytes": list(piece)}
                for token, piece, lp in t.top
            ],
        }
        for t in tokens
    ]


def _text_logprobs(tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """Text completions' legacy ``logprobs`` (tokens, their logprobs, the top ones, offsets)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.piece.decode("utf-8", errors="ignore"))
    return {
        "tokens": [_token_text(t.piece) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{_token_text(p): lp for _, p, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }
