"""Ollama's request bodies (/api/chat, /api/generate, /api/embed, /api/show), validated and
translated into the requests the engine already serves."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from llamastream.api.openai.models import ChatCompletionRequest
from llamastream.errors import InvalidRequestError
from llamastream.limits import MinP, Penalty, RepeatPenalty, Seed, Temperature, TopK, TopP

# think: true or an effort → the reasoning budget in tokens (-1: none).
THINK_BUDGET = {"low": 1024, "medium": 4096, "high": -1}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Options(_Strict):
    """The sampling options llamastream honours; others (num_gpu, mirostat...) are refused."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repeat_penalty: RepeatPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    num_predict: StrictInt | None = None  # -1: as long as the context allows
    stop: Annotated[list[StrictStr], Field(max_length=16)] | None = None
    num_ctx: StrictInt | None = None  # at most the server's n_ctx (the context is fixed)


class Function(_Strict):
    name: StrictStr
    arguments: dict[str, Any]


class ToolCall(_Strict):
    function: Function
    id: StrictStr | None = None
    type: Literal["function"] | None = None


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr = ""
    thinking: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: StrictStr | None = None
    tool_call_id: StrictStr | None = None
    images: Annotated[list[Any], Field(max_length=0)] | None = None  # no vision here


class ToolFunction(_Strict):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: ToolFunction


Think = StrictBool | Literal["low", "medium", "high"]
KeepAlive = StrictStr | float | int


class _Generating(_Strict):
    model: StrictStr
    format: Literal["json"] | dict[str, Any] | Literal[""] | None = None
    options: Options | None = None
    stream: StrictBool = True
    think: Think | None = None
    keep_alive: KeepAlive | None = None

    def keep_alive_s(self) -> float | None:
        """The keep-alive asked for in seconds (-1: forever), or None."""
        if self.keep_alive is None:
            return None
        return max(_seconds(self.keep_alive), -1.0)

    def chat_body(self, messages: list[dict[str, Any]], n_ctx: int) -> dict[str, Any]:
        """The fields a chat-completions request takes from these options."""
        o = self.options or Options()
        if o.num_ctx is not None and o.num_ctx > n_ctx:
            raise InvalidRequestError(
                f"options.num_ctx: this server's context is {n_ctx} tokens",
                field="options.num_ctx",
            )
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": self.stream,
            "top_p": o.top_p,
            "top_k": o.top_k,
            "min_p": o.min_p,
            "repeat_penalty": o.repeat_penalty,
            "presence_penalty": o.presence_penalty,
            "frequency_penalty": o.frequency_penalty,
            "seed": o.seed,
        }
        if o.num_predict is not None and o.num_predict > 0:
            body["max_tokens"] = o.num_predict
        if self.format == "json":
            body["response_format"] = {"type": "json_object"}
        elif isinstance(self.format, dict):
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"schema": self.format},
            }
        if self.think is not None:
            if self.think is False:
                body["reasoning_budget"] = 0
                body["chat_template_kwargs"] = {"enable_thinking": False}
            elif self.think is not True:
                body["reasoning_budget"] = THINK_BUDGET[self.think]
        return {k: v for k, v in body.items() if v is not None}

    def sampling_overrides(self) -> dict[str, Any]:
        """What the options set beyond a chat request's ranges (temperature up to 5, up to
        16 stop strings): applied to the sampling parameters directly."""
        o = self.options or Options()
        return {"temperature": o.temperature, "stop": tuple(o.stop) if o.stop else None}

    @property
    def unlimited(self) -> bool:
        """``num_predict: -1``: as many tokens as the context allows."""
        o = self.options
        return o is not None and o.num_predict is not None and o.num_predict < 0


class ChatRequest(_Generating):
    """``POST /api/chat``."""

    messages: list[Message] = []
    tools: list[Tool] | None = None
    logprobs: Literal[False] | None = None

    def chat_request(self, n_ctx: int) -> ChatCompletionRequest:
        """The same conversation as a chat-completions request. Ollama's tool messages name
        their tool, not a call id: each answers the earliest unanswered call of that name."""
        if not self.messages:
            raise InvalidRequestError("messages: at least one message", field="messages")
        messages: list[dict[str, Any]] = []
        waiting: list[tuple[str, str]] = []  # (call id, tool name) not answered yet
        for i, m in enumerate(self.messages):
            out: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.role == "assistant" and m.tool_calls:
                out["tool_calls"] = []
                for j, call in enumerate(m.tool_calls):
                    call_id = call.id or f"call_{i}_{j}"
                    waiting.append((call_id, call.function.name))
                    out["tool_calls"].append(
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {
                                "name": call.function.name,
                                "arguments": json.dumps(call.function.arguments),
                            },
                        }
                    )
            if m.role == "assistant" and m.thinking:
                out["reasoning_content"] = m.thinking
            if m.role == "tool":
                if m.tool_call_id:
                    match = [w for w in waiting if w[0] == m.tool_call_id]
                else:
                    match = [w for w in waiting if m.tool_name in (None, w[1])]
                if not match:
                    field = f"messages.{i}"
                    raise InvalidRequestError(
                        f"{field}: a tool message answering no earlier tool call", field=field
                    )
                waiting.remove(match[0])
                out["tool_call_id"] = match[0][0]
            messages.append(out)
        body = self.chat_body(messages, n_ctx)
        if self.tools:
            body["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        return ChatCompletionRequest.model_validate(body)


class GenerateRequest(_Generating):
    """``POST /api/generate``: a prompt, through the chat template unless ``raw``."""

    prompt: StrictStr = ""
    system: StrictStr | None = None
    raw: StrictBool = False
    suffix: Literal[""] | None = None  # insertion: not supported
    images: Annotated[list[Any], Field(max_length=0)] | None = None
    context: Annotated[list[Any], Field(max_length=0)] | None = None  # deprecated upstream
    template: Literal[""] | None = None  # the model's own template only
    logprobs: Literal[False] | None = None


class EmbedRequest(_Strict):
    """``POST /api/embed``."""

    model: StrictStr
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1)]
    truncate: StrictBool | None = None  # true (cut over-long inputs) is refused
    dimensions: StrictInt | None = None
    keep_alive: KeepAlive | None = None

    def check(self, max_inputs: int, max_chars: int) -> list[str]:
        """The inputs; 400s naming the field."""
        if self.truncate:
            raise InvalidRequestError(
                "truncate: over-long inputs are refused here, never cut; send false",
                field="truncate",
            )
        _check_keep_alive(self.keep_alive)
        inputs = [self.input] if isinstance(self.input, str) else list(self.input)
        if len(inputs) > max_inputs:
            raise InvalidRequestError(f"input: at most {max_inputs} inputs", field="input")
        for i, text in enumerate(inputs):
            if len(text) > max_chars:
                field = f"input.{i}" if len(inputs) > 1 else "input"
                raise InvalidRequestError(f"{field}: at most {max_chars} characters", field=field)
        return inputs


class ShowRequest(_Strict):
    """``POST /api/show``."""

    model: StrictStr = ""
    name: StrictStr = ""  # the older spelling
    verbose: StrictBool = False


def _check_keep_alive(keep_alive: KeepAlive | None) -> None:
    """Embeddings come from a model that stays loaded: any keep-alive but 0 (unload now)."""
    if keep_alive is not None and _seconds(keep_alive) == 0:
        raise InvalidRequestError(
            "keep_alive: the embedding model stays loaded; 0 (unload now) is refused",
            field="keep_alive",
        )


def _seconds(keep_alive: KeepAlive) -> float:
    """Ollama's keep_alive in seconds: a number, or a duration such as "5m" (negative:
    forever)."""
    if isinstance(keep_alive, (int, float)):
        return float(keep_alive)
    text = keep_alive.strip()
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[: -len(unit)].lstrip("-").replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * units[unit]
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError(
            f"keep_alive: {keep_alive!r} is not a duration", field="keep_alive"
        ) from None
