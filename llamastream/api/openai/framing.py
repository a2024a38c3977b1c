"""OpenAI's wire format for a run: chat and text completion objects, SSE chunks or one JSON
body, and its error envelope (before the stream and within it)."""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable
from typing import Any, Literal

from starlette.responses import Response

from llamastream.api.errors import OPENAI
from llamastream.chat.reasoning import Pieces as ReasoningPieces
from llamastream.chat.reasoning import ReasoningSplitter
from llamastream.chat.tools import Pieces, ToolCallParser
from llamastream.engine.worker import Finished, TokenLogprob
from llamastream.errors import LlamaStreamError
from llamastream.streaming import Run

Kind = Literal["chat", "text"]


def sse_or_json_head(streaming: bool) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Status and headers of an answer streamed as server-sent events, or one JSON body."""
    media = b"text/event-stream; charset=utf-8" if streaming else b"application/json"
    return 200, [
        (b"content-type", media),
        (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no"),
    ]


class _Choice:
    """What the framing keeps of one choice (candidate) while it streams."""

    def __init__(
        self,
        index: int,
        tools: ToolCallParser | None,
        reasoning: ReasoningSplitter | None,
    ) -> None:
        self.index = index
        self.tools = tools  # reads tool calls out of the reply when the request offered tools
        self.reasoning = reasoning  # keeps a thinking model's reasoning apart from its answer
        self.role_sent = False
        self.sent = 0  # log probabilities sent so far
        self.offset = 0  # characters of text sent so far (text completions' offsets)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.counted = codecs.getincrementaldecoder("utf-8")(errors="replace")


class OpenAIFraming:
    """OpenAI's objects for a run: SSE chunks when streaming, one JSON body otherwise; one
    choice per candidate, each with its own parser state."""

    def __init__(
        self,
        kind: Kind,
        model: str,
        *,
        stream: bool,
        include_usage: bool,
        choices: int = 1,
        tools: Callable[[], ToolCallParser] | None = None,
        reasoning: Callable[[], ReasoningSplitter] | None = None,
        logprobs: bool = False,
        fingerprint: str | None = None,
    ) -> None:
        self.kind = kind
        self.model = model
        self.streaming = stream
        self.include_usage = include_usage
        self.logprobs = logprobs  # each token's log probabilities go with its chunk
        self.fingerprint = fingerprint
        self.created = int(time.time())
        self.choices = [
            _Choice(i, tools() if tools else None, reasoning() if reasoning else None)
            for i in range(choices)
        ]

    def head(self, run: Run) -> tuple[int, list[tuple[bytes, bytes]]]:
        return sse_or_json_head(self.streaming)

    def piece(self, run: Run, text: str, index: int = 0) -> bytes:
        c = self.choices[index]
        out = self._role(run, c)
        if c.reasoning is None:
            return out + self._answer(run, c, text)
        return out + self._split(run, c, c.reasoning.feed(text))

    def tail(self, run: Run) -> bytes:
        if not self.streaming:
            return json.dumps(self._whole(run), ensure_ascii=False).encode()
        out = b""
        for c in self.choices:
            reason = _reason(run.candidates[c.index].finished)
            out += self._role(run, c)
            if c.reasoning is not None:
                out += self._split(run, c, c.reasoning.finish())
            if c.tools is not None:
                out += self._pieces(run, c, c.tools.finish(cut=reason == "length"))
                if c.tools.calls and reason == "stop":
                    reason = "tool_calls"
            out += self._event(self._chunk(run, c, None, reason))
        if self.include_usage:
            usage = {**self._envelope(run), "choices": [], "usage": _usage(run)}
            out += self._event(usage)
        return out + b"data: [DONE]\n\n"

    def error_tail(self, run: Run, exc: LlamaStreamError) -> bytes | None:
        return OPENAI.mid_stream(exc) if self.streaming else None

    def error_response(self, exc: LlamaStreamError) -> Response:
        return OPENAI.response(exc)

    # streamed chunks

    def _split(self, run: Run, c: _Choice, parts: ReasoningPieces) -> bytes:
        """Chunks of reasoning and of the answer, in the order they came."""
        out = b""
        for kind, part in parts:
            if kind == "content":
                out += self._answer(run, c, part)
            else:
                out += self._delta(run, c, {"reasoning_content": part})
        return out

    def _answer(self, run: Run, c: _Choice, text: str) -> bytes:
        """Chunks of the answer's text (content, or tool calls read out of it)."""
        if c.tools is None:
            return self._event(self._chunk(run, c, text, None))
        return self._pieces(run, c, c.tools.feed(text))

    def _pieces(self, run: Run, c: _Choice, pieces: Pieces) -> bytes:
        """Chunks of content and of tool calls (a call's id and name, then its arguments)."""
        out = b""
        for piece in pieces:
            if isinstance(piece, str):
                out += self._event(self._chunk(run, c, piece, None))
                continue
            call: dict[str, Any] = {"index": piece.index}
            if piece.id is not None:
                call["id"] = piece.id
                call["type"] = "function"
                call["function"] = {"name": piece.name, "arguments": ""}
            else:
                call["function"] = {"arguments": piece.arguments}
            out += self._delta(run, c, {"tool_calls": [call]})
        return out

    def _role(self, run: Run, c: _Choice) -> bytes:
        """The opening chunk of a chat choice, which names the role."""
        if self.kind != "chat" or c.role_sent:
            return b""
        c.role_sent = True
        return self._delta(run, c, {"role": "assistant", "content": ""})

    def _delta(self, run: Run, c: _Choice, delta: dict[str, Any]) -> bytes:
        """One chat chunk carrying ``delta``."""
        return self._event({**self._envelope(run), "choices": [self._choice(run, c, delta)]})

    def _chunk(self, run: Run, c: _Choice, text: str | None, reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = {"content": text} if text is not None else {}
            choice = self._choice(run, c, delta, reason)
        else:
            choice = {"index": c.index, "text": text or "", "logprobs": None}
            choice["finish_reason"] = reason
            if self.logprobs:
                new = self._new_logprobs(run, c)
                choice["logprobs"] = _text_logprobs(new, c.offset, c.decoder)
                c.offset += sum(len(c.counted.decode(t.piece)) for t in new)
        return {**self._envelope(run), "choices": [choice]}

    def _choice(
        self, run: Run, c: _Choice, delta: dict[str, Any], reason: str | None = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": c.index, "delta": delta, "finish_reason": reason}
        if self.logprobs and "role" not in delta:
            content = _chat_logprobs(self._new_logprobs(run, c))
            choice["logprobs"] = {"content": content, "refusal": None}
        return choice

    @staticmethod
    def _new_logprobs(run: Run, c: _Choice) -> list[TokenLogprob]:
        """The choice's log probabilities not sent yet: they go with the chunk being made."""
        logprobs = run.candidates[c.index].logprobs
        new = logprobs[c.sent :]
        c.sent = len(logprobs)
        return new

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

    @staticmethod
    def _event(data: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

    # one JSON body

    def _whole(self, run: Run) -> dict[str, Any]:
        choices = [self._whole_choice(run, c) for c in self.choices]
        return {**self._envelope(run), "choices": choices, "usage": _usage(run)}

    def _whole_choice(self, run: Run, c: _Choice) -> dict[str, Any]:
        candidate = run.candidates[c.index]
        reason = _reason(candidate.finished)
        reply = candidate.reply
        if self.kind == "text":
            choice: dict[str, Any] = {"index": c.index, "text": reply, "logprobs": None}
            choice["finish_reason"] = reason
            if self.logprobs:
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                choice["logprobs"] = _text_logprobs(candidate.logprobs, 0, decoder)
            return choice
        message: dict[str, Any] = {"role": "assistant", "content": reply}
        if c.reasoning is not None:
            thought, message["content"] = c.reasoning.split(reply)
            if thought:
                message["reasoning_content"] = thought
        if c.tools is not None:
            content, calls = c.tools.parse(message["content"], cut=reason == "length")
            message["content"] = None if calls and not content.strip() else content
            if calls:
                message["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in calls
                ]
                reason = "tool_calls" if reason == "stop" else reason
        choice = {"index": c.index, "message": message, "finish_reason": reason}
        if self.logprobs:
            choice["logprobs"] = {"content": _chat_logprobs(candidate.logprobs), "refusal": None}
        return choice


def _reason(finished: Finished | None) -> str:
    return "length" if finished is not None and finished.reason == "length" else "stop"


def _usage(run: Run) -> dict[str, Any]:
    finished = run.finished
    completion = finished.completion_tokens if finished else 0
    cached = finished.cached_tokens if finished else 0
    return {
        "prompt_tokens": run.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": run.prompt_tokens + completion,
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


def _text_logprobs(
    tokens: list[TokenLogprob], offset: int, decoder: codecs.IncrementalDecoder
) -> dict[str, Any]:
    """Text completions' legacy ``logprobs`` (tokens, their logprobs, the top ones, and each
    token's offset in the text, counted through ``decoder``: a character split over tokens
    counts once, where it ends)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(decoder.decode(t.piece))
    return {
        "tokens": [_token_text(t.piece) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{_token_text(p): lp for _, p, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }
