"""The OpenAI request bodies, validated, and what each turns into: prompt text, sampling
parameters, and the conversation whose saved KV cache it may continue."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from llamastream.chat.templates import ChatTemplate
from llamastream.engine.sampling import SamplingParams
from llamastream.errors import ContextLengthError, InvalidRequestError
from llamastream.limits import (
    MAX_STOP_SEQUENCES,
    NOT_A_BOOL,
    OPENAI_MAX_TEMPERATURE,
    MaxNewTokens,
    MinP,
    Penalty,
    RepeatPenalty,
    Seed,
    Temperature,
    TopK,
    TopP,
)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    def grammar(self) -> str | None:
        """The llama.cpp grammar that holds the reply to this format."""
        if self.type == "json_object":
            return JSON_GBNF
        if self.type == "text":
            return None
        schema = (self.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                "json_schema.schema must be a JSON schema object", field="response_format"
            )
        try:
            return json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:
            raise InvalidRequestError(
                f"unsupported JSON schema: {exc}", field="response_format"
            ) from None


class _Common(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: MaxNewTokens | None = None
    max_completion_tokens: MaxNewTokens | None = None
    temperature: Annotated[Temperature, Field(le=OPENAI_MAX_TEMPERATURE)] | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Annotated[int, Field(ge=1, le=1), NOT_A_BOOL] = 1
    response_format: ResponseFormat | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repeat_penalty: RepeatPenalty | None = None
    ignore_eos: StrictBool = False

    @property
    def prompt_field(self) -> str:
        """The field holding the prompt, for errors about its length."""
        return "prompt"

    def texts(self) -> list[tuple[str, str]]:
        """(field, text) of every text the client sent, for the length cap."""
        raise NotImplementedError

    def check_lengths(self, max_chars: int) -> None:
        for field, text in self.texts():
            if len(text) > max_chars:
                raise InvalidRequestError(f"{field}: at most {max_chars} characters", field=field)

    def sampling(self, defaults: SamplingParams, *, n_prompt: int, n_ctx: int) -> SamplingParams:
        """The request's sampling parameters over the server's ``defaults``, whose
        ``max_new_tokens`` is also the cap; the reply length fitted to the context."""
        asked = self.max_completion_tokens or self.max_tokens
        field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        if asked is not None and asked > defaults.max_new_tokens:
            raise InvalidRequestError(
                f"{field}: at most {defaults.max_new_tokens} on this server", field=field
            )
        room = n_ctx - n_prompt
        if (asked is not None and asked > room) or room < 1:
            raise ContextLengthError(
                f"the prompt takes {n_prompt} tokens; with {asked or 1} more it exceeds the "
                f"context window of {n_ctx}",
                field=self.prompt_field,
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return defaults.updated(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_new_tokens=min(asked or defaults.max_new_tokens, room),
            grammar=self.response_format.grammar() if self.response_format else None,
            stop=stop,
            ignore_eos=self.ignore_eos or None,
        )


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)

    @property
    def prompt_field(self) -> str:
        return "messages"

    def texts(self) -> list[tuple[str, str]]:
        return [(f"messages.{i}.content", m.text()) for i, m in enumerate(self.messages)]

    def prompt_text(
        self,
        template: ChatTemplate,
        defuse: Callable[[str], str],
        system_prompt: str | None = None,
    ) -> str:
        """The messages rendered with the model's template (their text ``defuse``-d), the
        server's system prompt first unless the client sent one."""
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": defuse(m.text())}
            for m in self.messages
        ]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        try:
            return template.render(messages)
        except InvalidRequestError as exc:
            exc.field = "messages"
            raise

    def conversation_key(self) -> str | None:
        """Which conversation this stateless request continues, for its saved KV cache.

        /v1 clients resend the whole history, so a conversation is known by how it begins:
        its messages up to the first user message, and the ``user`` field; None for a first
        turn. Conversations that begin alike share a key, which costs at most a miss: a saved
        cache is restored only into a prompt it is a prefix of.
        """
        if not any(m.role == "assistant" for m in self.messages):
            return None  # a first turn: most are never continued, saving its cache costs a pause
        head = []
        for message in self.messages:
            head.append([message.role, message.text()])
            if message.role == "user":
                break
        text = json.dumps([self.user, head], ensure_ascii=False)
        return "v1:" + hashlib.sha256(text.encode()).hexdigest()[:24]


class CompletionRequest(_Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def texts(self) -> list[tuple[str, str]]:
        return [("prompt", self.text)]
