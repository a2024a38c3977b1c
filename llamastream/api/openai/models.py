"""The OpenAI request bodies, validated, and what each turns into: prompt text, sampling
parameters, and the conversation whose saved KV cache it may continue."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from llama_cpp.llama_grammar import JSON_GBNF
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from llamastream.chat.templates import ChatTemplate
from llamastream.chat.tools import (
    FORMATS,
    GenericFormat,
    Tool,
    ToolChoice,
    ToolFormat,
    check_tools,
    detect_format,
    json_schema_gbnf,
    template_messages,
)
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

# The most candidates (n x prompts) one request may ask for; the server's slots bound it too.
MAX_CHOICES = 128

# Template variables the server sets itself.
_TEMPLATE_NAMES = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers, how the model may use them, and the model's format."""

    tools: list[Tool]
    choice: ToolChoice
    format: ToolFormat


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    name: str
    arguments: str  # JSON text of an object


class MessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier reply's reasoning, for the template

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None  # the schema is always held by a grammar


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition

    def tool(self) -> Tool:
        f = self.function
        return Tool(f.name, f.description or "", f.parameters or {"type": "object"})


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


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
            return json_schema_gbnf(schema)
        except Exception as exc:
            raise InvalidRequestError(
                f"unsupported JSON schema: {exc}", field="response_format"
            ) from None


Bias = Annotated[float, Field(ge=-100, le=100), NOT_A_BOOL]


class _Common(BaseModel):
    """The fields chat and text completions share. Any other field is refused (400 naming
    it): a client must never think a field it sent was honoured when it was not."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the served model
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
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1  # candidates, each on a slot
    response_format: ResponseFormat | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repeat_penalty: RepeatPenalty | None = None
    ignore_eos: StrictBool = False
    logit_bias: dict[str, Bias] | None = None  # token id (as a string) → bias
    # OpenAI's fields that change nothing here at these values; others are refused.
    store: StrictBool | None = None  # completions are never stored: true is refused
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("store", "echo", check_fields=False)
    @classmethod
    def _false_only(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value:
            raise ValueError(f"{info.field_name}: true is not supported by this server")
        return value

    def top_logprobs_asked(self) -> int | None:
        """How many most likely tokens to give with each token's log probability (None: no
        log probabilities)."""
        raise NotImplementedError

    def bias(self, n_vocab: int) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token, bias); 400 for a key that is no token of the model."""
        out = []
        for key, value in (self.logit_bias or {}).items():
            token = int(key) if key.isascii() and key.isdigit() else -1
            if not 0 <= token < n_vocab:
                raise InvalidRequestError(
                    f"logit_bias: {key!r} is not a token id of this model (0 to {n_vocab - 1})",
                    field="logit_bias",
                )
            out.append((token, value))
        return tuple(out)

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

    def sampling(
        self,
        defaults: SamplingParams,
        *,
        n_prompt: int,
        n_ctx: int,
        limit: int,
        n_vocab: int,
        tool_use: ToolUse | None = None,
    ) -> SamplingParams:
        """The request's sampling parameters over the server's ``defaults``; a reply length
        above ``limit`` is refused, one beyond the context's room is cut to it (the reply
        then ends as ``length``, as with the peers)."""
        asked = self.max_completion_tokens or self.max_tokens
        field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        if asked is not None and asked > limit:
            raise InvalidRequestError(f"{field}: at most {limit} on this server", field=field)
        room = n_ctx - n_prompt
        if room < 1:
            raise ContextLengthError(
                f"the prompt takes {n_prompt} tokens, which leaves no room for a reply in "
                f"the context window of {n_ctx}",
                field=self.prompt_field,
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        grammar = self.response_format.grammar() if self.response_format else None
        triggers: tuple[str, ...] = ()
        if tool_use is not None:
            held = tool_use.format.grammar(tool_use.tools, tool_use.choice)
            if held is not None:
                grammar, triggers = held.gbnf, held.triggers
        return defaults.updated(
            grammar_triggers=triggers or None,
            special_tokens=(tool_use is not None and tool_use.format.special_tokens) or None,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_new_tokens=min(asked or defaults.max_new_tokens, room),
            grammar=grammar,
            stop=stop,
            ignore_eos=self.ignore_eos or None,
            logit_bias=self.bias(n_vocab) or None,
            logprobs=self.top_logprobs_asked(),
        )


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    reasoning_format: Literal["auto", "none"] | None = None  # over the server's setting
    reasoning_budget: Annotated[StrictInt, Field(ge=-1)] | None = None  # tokens
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    modalities: list[Literal["text"]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the template
    # OpenAI's deprecated function calling: refused (400) rather than ignored.
    functions: Any = None
    function_call: Any = None

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", field="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_use(self, template: ChatTemplate) -> ToolUse | None:
        """The tools this request offers the model and how (None: none are offered).

        400s naming the field: a choice without tools or naming none of them, schemas no
        grammar can hold, tools together with a JSON response format, a tool message that
        answers no call, call arguments that are not a JSON object.
        """
        self._check_history()
        for legacy in ("functions", "function_call"):
            if getattr(self, legacy) is not None:
                raise InvalidRequestError(
                    f"{legacy} is not supported: use tools and tool_choice", field=legacy
                )
        if self.tool_choice is not None and not self.tools:
            raise InvalidRequestError("tool_choice needs tools", field="tool_choice")
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [t.tool() for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            choice = ToolChoice(
                "function", self.tool_choice.function.name, self.parallel_tool_calls
            )
        else:
            choice = ToolChoice(self.tool_choice or "auto", None, self.parallel_tool_calls)
        check_tools(tools, choice)
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequestError(
                "response_format cannot hold a reply that may call tools; use tool_choice "
                '"none" for a JSON answer',
                field="response_format",
            )
        return ToolUse(tools, choice, FORMATS[detect_format(template.source)])

    def _check_history(self) -> None:
        called: set[str] = set()
        for i, message in enumerate(self.messages):
            if message.tool_calls is not None and message.role != "assistant":
                field = f"messages.{i}.tool_calls"
                raise InvalidRequestError(
                    f"{field}: only assistant messages call tools", field=field
                )
            if message.reasoning_content is not None and message.role != "assistant":
                field = f"messages.{i}.reasoning_content"
                raise InvalidRequestError(f"{field}: only assistant messages reason", field=field)
            if message.tool_call_id is not None and message.role != "tool":
                field = f"messages.{i}.tool_call_id"
                raise InvalidRequestError(f"{field}: only tool messages answer calls", field=field)
            for j, call in enumerate(message.tool_calls or []):
                field = f"messages.{i}.tool_calls.{j}.function.arguments"
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):
                    raise InvalidRequestError(
                        f"{field}: not the JSON text of an object", field=field
                    )
                called.add(call.id)
            if message.role == "tool" and message.tool_call_id not in called:
                field = f"messages.{i}.tool_call_id"
                raise InvalidRequestError(
                    f"{field}: answers no tool call of an earlier assistant message", field=field
                )

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
        tool_use: ToolUse | None = None,
    ) -> str:
        """The messages rendered with the model's template (their text ``defuse``-d), the
        server's system prompt first unless the client sent one, and the tools offered."""
        messages = [self._template_message(m, defuse) for m in self.messages]
        fmt = tool_use.format if tool_use is not None else None
        if fmt is not None or any(m.tool_calls or m.role == "tool" for m in self.messages):
            name = fmt.name if fmt is not None else detect_format(template.source)
            messages = template_messages(messages, name, offered=fmt is not None)
        if isinstance(fmt, GenericFormat) and tool_use is not None:
            described = fmt.system_text(tool_use.tools, tool_use.choice)
            if messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt or ""})
            head = messages[0]["content"]
            messages[0]["content"] = f"{head}\n\n{described}" if head else described
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        tools = fmt.template_tools(tool_use.tools) if fmt and tool_use else None
        variables = self.chat_template_kwargs or {}
        reserved = sorted(set(variables) & _TEMPLATE_NAMES)
        if reserved:
            raise InvalidRequestError(
                f"chat_template_kwargs: {reserved[0]!r} is set by the server",
                field="chat_template_kwargs",
            )
        try:
            return template.render(messages, tools=tools, variables=variables)
        except InvalidRequestError as exc:
            exc.field = "messages"
            raise

    @staticmethod
    def _template_message(m: ChatMessage, defuse: Callable[[str], str]) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": defuse(m.text()),
        }
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": defuse(c.function.arguments),
                    },
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            message["reasoning_content"] = defuse(m.reasoning_content)
        if m.name is not None:  # the participant's name, for templates that write it
            message["name"] = m.name
        return message

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


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Common):
    # One prompt or several (one choice each), as text or as token ids.
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]
    )
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False  # the prompt's own log probabilities: not yet (true refused)
    best_of: Annotated[StrictInt, Field(ge=1, le=1)] | None = None
    suffix: None = None  # insertion: not supported

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """Every prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def texts(self) -> list[tuple[str, str]]:
        many = len(self.prompts()) > 1
        return [
            (f"prompt.{i}" if many else "prompt", p)
            for i, p in enumerate(self.prompts())
            if isinstance(p, str)
        ]


class EmbeddingRequest(BaseModel):
    """``/v1/embeddings``: one input or several, as text or token ids."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the served embedding model
    input: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """Every input: text, or token ids."""
        given = self.input
        if isinstance(given, str):
            return [given]
        if all(isinstance(x, int) for x in given):
            return [given]  # type: ignore[list-item]
        return list(given)  # type: ignore[arg-type]

    def check(self, max_inputs: int, max_chars: int) -> None:
        """400s naming the field: too many inputs, too long a text."""
        inputs = self.inputs()
        if len(inputs) > max_inputs:
            raise InvalidRequestError(
                f"input: at most {max_inputs} inputs per request", field="input"
            )
        for i, item in enumerate(inputs):
            field = f"input.{i}" if len(inputs) > 1 else "input"
            if isinstance(item, str) and len(item) > max_chars:
                raise InvalidRequestError(f"{field}: at most {max_chars} characters", field=field)
