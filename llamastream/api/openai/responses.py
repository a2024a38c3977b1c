"""OpenAI's Responses API (stateless): the request, validated and translated into the chat
request the engine serves; the reply as a Response object or its stream of typed events."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator
from starlette.responses import Response

from llamastream.api.errors import OPENAI
from llamastream.api.openai.framing import sse_or_json_head
from llamastream.api.openai.models import ChatCompletionRequest
from llamastream.chat.reasoning import ReasoningSplitter
from llamastream.chat.tools import Pieces, ToolCall, ToolCallParser
from llamastream.errors import InvalidRequestError, LlamaStreamError
from llamastream.limits import OPENAI_MAX_TEMPERATURE, MaxNewTokens, Temperature, TopP
from llamastream.streaming import Run

# reasoning.effort → the reasoning budget in tokens (-1: none).
EFFORT_BUDGET = {"none": 0, "minimal": 0, "low": 1024, "medium": 4096, "high": -1}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: StrictStr
    # Echoed back by clients; this server writes none, so only empty ones are taken.
    annotations: Annotated[list[Any], Field(max_length=0)] | None = None
    logprobs: Annotated[list[Any], Field(max_length=0)] | None = None


class MessageItem(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[InputText]
    id: StrictStr | None = None
    status: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | list[InputText]
    id: StrictStr | None = None
    status: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(part.text for part in self.output)


class ReasoningText(_Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: StrictStr


class ReasoningItem(_Strict):
    type: Literal["reasoning"]
    id: StrictStr | None = None
    summary: Annotated[list[ReasoningText], Field(max_length=0)] = []  # none written here
    content: list[ReasoningText] | None = None
    encrypted_content: None = None
    status: StrictStr | None = None


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(_Strict):
    type: Literal["function"]
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: StrictStr


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None  # the schema is always held by a grammar


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ReasoningConfig(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: None = None  # summaries are not written here


class ResponsesRequest(_Strict):
    """``POST /v1/responses``; fields it does not know are refused (400 naming them)."""

    model: StrictStr | None = None
    input: StrictStr | Annotated[list[Item], Field(min_length=1)]
    instructions: StrictStr | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: StrictBool = True
    max_output_tokens: MaxNewTokens | None = None
    temperature: Annotated[Temperature, Field(le=OPENAI_MAX_TEMPERATURE)] | None = None
    top_p: TopP | None = None
    stream: StrictBool = False
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    store: StrictBool = False  # nothing is kept: true is refused
    previous_response_id: StrictStr | None = None  # refused: nothing is kept to go on from
    user: StrictStr | None = None
    truncation: Literal["disabled"] | None = None
    include: Annotated[list[Any], Field(max_length=0)] | None = None
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool) -> bool:
        if value:
            raise ValueError("this server keeps no responses: send store false")
        return value

    @field_validator("previous_response_id")
    @classmethod
    def _no_previous(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "this server keeps no responses (store is false): send the whole conversation "
                "as input"
            )
        return value

    def check_lengths(self, max_chars: int) -> None:
        """400 naming the text longer than ``max_chars`` characters."""
        texts = [("instructions", self.instructions or "")]
        if isinstance(self.input, str):
            texts.append(("input", self.input))
        else:
            for i, item in enumerate(self.input):
                if isinstance(item, MessageItem):
                    texts.append((f"input.{i}.content", item.text()))
                elif isinstance(item, FunctionCallOutputItem):
                    texts.append((f"input.{i}.output", item.text()))
        for field, text in texts:
            if len(text) > max_chars:
                raise InvalidRequestError(f"{field}: at most {max_chars} characters", field=field)

    def chat_request(self) -> ChatCompletionRequest:
        """The same conversation as a chat-completions request."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = (
            [MessageItem(role="user", content=self.input)]
            if isinstance(self.input, str)
            else self.input
        )
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                messages.append(
                    {"role": "tool", "tool_call_id": item.call_id, "content": item.text()}
                )
            elif item.content:  # reasoning the client sends back: for the template
                messages.append(
                    {
                        "role": "assistant",
                        "content": None,
                        "reasoning_content": "".join(p.text for p in item.content),
                    }
                )
        messages = _merge_assistant(messages)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
            "user": self.user,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                        "strict": t.strict,
                    },
                }
                for t in self.tools
            ]
        if isinstance(self.tool_choice, NamedFunction):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        else:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise InvalidRequestError(
                    "text.format.schema: required with json_schema", field="text.format.schema"
                )
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": fmt.name or "answer", "schema": fmt.schema_},
            }
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_budget"] = EFFORT_BUDGET[self.reasoning.effort]
            if self.reasoning.effort in ("none", "minimal"):
                body["chat_template_kwargs"] = {"enable_thinking": False}
        return ChatCompletionRequest.model_validate(
            {k: v for k, v in body.items() if v is not None}
        )


def _merge_assistant(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive assistant items (reasoning, text, calls) as one assistant message."""
    out: list[dict[str, Any]] = []
    for message in messages:
        last = out[-1] if out else None
        if message["role"] == "assistant" and last is not None and last["role"] == "assistant":
            if message.get("content"):
                last["content"] = (last.get("content") or "") + message["content"]
            for key in ("tool_calls",):
                if message.get(key):
                    last[key] = [*(last.get(key) or []), *message[key]]
            if message.get("reasoning_content"):
                last["reasoning_content"] = message["reasoning_content"]
            continue
        out.append(dict(message))
    return out


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesFraming:
    """A Response object, or its typed events when streaming."""

    def __init__(
        self,
        request: ResponsesRequest,
        model: str,
        *,
        tools: ToolCallParser | None = None,
        reasoning: ReasoningSplitter | None = None,
    ) -> None:
        self.request = request
        self.model = model
        self.streaming = request.stream
        self.tools = tools
        self.reasoning = reasoning
        self.created = int(time.time())
        self._seq = 0
        self._started = False
        self._open: dict[str, Any] | None = None  # the output item being streamed
        self._output: list[dict[str, Any]] = []  # finished output items

    def head(self, run: Run) -> tuple[int, list[tuple[bytes, bytes]]]:
        return sse_or_json_head(self.streaming)

    def piece(self, run: Run, text: str, index: int = 0) -> bytes:
        out = self._start(run)
        parts = self.reasoning.feed(text) if self.reasoning else [("content", text)]
        for kind, part in parts:
            out += self._reasoning(part) if kind == "reasoning" else self._answer(part)
        return out

    def tail(self, run: Run) -> bytes:
        finished = run.finished
        cut = finished is not None and finished.reason == "length"
        if not self.streaming:
            return json.dumps(
                self._response(run, self._whole_output(run, cut)), ensure_ascii=False
            ).encode()
        out = self._start(run)
        if self.reasoning is not None:
            for kind, part in self.reasoning.finish():
                out += self._reasoning(part) if kind == "reasoning" else self._answer(part)
        if self.tools is not None:
            out += self._pieces(self.tools.finish(cut=cut))
        out += self._close("incomplete" if cut else "completed")
        response = self._response(run, self._output)
        last = "response.incomplete" if cut else "response.completed"
        return out + self._event(last, {"response": response})

    def error_tail(self, run: Run, exc: LlamaStreamError) -> bytes | None:
        if not self.streaming:
            return None
        body = OPENAI.body(exc)["error"]
        return self._event(
            "error", {"code": body["code"], "message": body["message"], "param": body["param"]}
        )

    def error_response(self, exc: LlamaStreamError) -> Response:
        return OPENAI.response(exc)

    # the Response object

    def _response(
        self, run: Run, output: list[dict[str, Any]], status: str | None = None
    ) -> dict[str, Any]:
        finished = run.finished
        cut = finished is not None and finished.reason == "length"
        completion = finished.completion_tokens if finished else 0
        cached = finished.cached_tokens if finished else 0
        req = self.request
        return {
            "id": "resp_" + run.id,
            "object": "response",
            "created_at": self.created,
            "status": status or ("incomplete" if cut else "completed"),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut and not status else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {
                "effort": req.reasoning.effort if req.reasoning else None,
                "summary": None,
            },
            "store": False,
            "temperature": req.temperature,
            "text": {"format": self._format()},
            "tool_choice": req.tool_choice.model_dump()
            if isinstance(req.tool_choice, NamedFunction)
            else (req.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p,
            "truncation": "disabled",
            "user": req.user,
            "metadata": {},
            "usage": None
            if status
            else {
                "input_tokens": len(run.tokens),
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": len(run.tokens) + completion,
            },
        }

    def _format(self) -> dict[str, Any]:
        fmt = self.request.text.format if self.request.text else None
        if fmt is None:
            return {"type": "text"}
        return fmt.model_dump(by_alias=True, exclude_none=True)

    def _whole_output(self, run: Run, cut: bool) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = []
        answer = run.reply
        if self.reasoning is not None:
            thought, answer = self.reasoning.split(answer)
            if thought:
                output.append(_reasoning_item(_id("rs"), thought))
        calls: list[ToolCall] = []
        if self.tools is not None:
            answer, calls = self.tools.parse(answer, cut=cut)
        if answer.strip() or not calls:
            output.append(_message_item(_id("msg"), answer, "incomplete" if cut else "completed"))
        output += [_call_item(_id("fc"), c.id, c.name, c.arguments) for c in calls]
        return output

    # streamed events

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        body = json.dumps({"type": kind, "sequence_number": self._seq, **data}, ensure_ascii=False)
        self._seq += 1
        return f"event: {kind}\ndata: {body}\n\n".encode()

    def _start(self, run: Run) -> bytes:
        if self._started:
            return b""
        self._started = True
        response = self._response(run, [], status="in_progress")
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def _answer(self, text: str) -> bytes:
        if self.tools is None:
            return self._text(text)
        return self._pieces(self.tools.feed(text))

    def _pieces(self, pieces: Pieces) -> bytes:
        out = b""
        for piece in pieces:
            if isinstance(piece, str):
                out += self._text(piece)
            elif piece.id is not None:
                out += self._close()
                item = _call_item(_id("fc"), piece.id, piece.name or "", "", "in_progress")
                out += self._begin(item)
            elif self._open is not None:
                self._open["arguments"] += piece.arguments
                out += self._event(
                    "response.function_call_arguments.delta",
                    {
                        "item_id": self._open["id"],
                        "output_index": len(self._output),
                        "delta": piece.arguments,
                    },
                )
        return out

    def _text(self, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if self._open is None or self._open["type"] != "message":
            out += self._close()
            item = _message_item(_id("msg"), "", "in_progress")
            out += self._begin(item)
            out += self._event(
                "response.content_part.added",
                self._part_of(item, {"type": "output_text", "text": "", "annotations": []}),
            )
        assert self._open is not None
        self._open["content"][0]["text"] += text
        return out + self._event("response.output_text.delta", {**self._where(), "delta": text})

    def _reasoning(self, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if self._open is None or self._open["type"] != "reasoning":
            out += self._close()
            out += self._begin(_reasoning_item(_id("rs"), "", "in_progress"))
            out += self._event(
                "response.content_part.added",
                self._part_of(self._open, {"type": "reasoning_text", "text": ""}),
            )
        assert self._open is not None
        self._open["content"][0]["text"] += text
        return out + self._event("response.reasoning_text.delta", {**self._where(), "delta": text})

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._output), "content_index": 0}

    def _part_of(self, item: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
        assert item is not None
        return {
            "item_id": item["id"],
            "output_index": len(self._output),
            "content_index": 0,
            "part": part,
        }

    def _begin(self, item: dict[str, Any]) -> bytes:
        shown = {**item, "content": []} if "content" in item else dict(item)
        self._open = item
        return self._event(
            "response.output_item.added", {"output_index": len(self._output), "item": shown}
        )

    def _close(self, status: str = "completed") -> bytes:
        item = self._open
        if item is None:
            return b""
        out = b""
        if item["type"] == "function_call":
            out += self._event(
                "response.function_call_arguments.done",
                {
                    "item_id": item["id"],
                    "output_index": len(self._output),
                    "arguments": item["arguments"],
                },
            )
        else:
            part = item["content"][0]
            kind = (
                "response.output_text.done"
                if item["type"] == "message"
                else "response.reasoning_text.done"
            )
            out += self._event(kind, {**self._where(), "text": part["text"]})
            out += self._event("response.content_part.done", self._part_of(item, part))
        item["status"] = status
        out += self._event(
            "response.output_item.done", {"output_index": len(self._output), "item": item}
        )
        self._output.append(item)
        self._open = None
        return out


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }
