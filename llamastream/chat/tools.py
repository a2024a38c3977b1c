"""Tool calls: the formats of the model families, the grammars that hold a model to them, and the
parsers that read calls out of a reply, whole or as it streams.

A format is chosen from the model's chat template: Hermes / Qwen (``<tool_call>`` JSON),
Llama 3.x (a bare ``{"name", "parameters"}`` object, optionally after ``<|python_tag|>``),
Mistral (``[TOOL_CALLS]`` and a JSON array), or, for templates that know nothing of tools, a
generic JSON answer (``{"response": ...}`` or ``{"tool_calls": [...]}``) that a grammar always
enforces, with the tools described in a system message.

Dialect-neutral: the APIs turn their requests into `Tool`, `ToolChoice` and messages in Hugging
Face's shape, and turn `ToolCall` back into their own.
"""

from __future__ import annotations

import copy
import json
import math
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

from llamastream.errors import InvalidRequestError

FormatName = Literal["hermes", "llama3", "mistral", "generic"]


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description and JSON-schema parameters."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})

    def to_template(self) -> dict[str, Any]:
        """The tool as chat templates receive it (OpenAI's and Hugging Face's shape)."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """``auto`` (the model decides), ``required`` (at least one call) or one ``function``."""

    mode: Literal["auto", "required", "function"] = "auto"
    function: str | None = None
    parallel: bool = True


@dataclass(frozen=True)
class ToolCall:
    """A parsed call; ``arguments`` is the JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolGrammar:
    """A GBNF grammar holding replies to the format, lazy when ``triggers`` are given: it then
    applies from the first match of one of these regular expressions (its first group) on."""

    gbnf: str
    triggers: tuple[str, ...] = ()


def detect_format(template_source: str) -> FormatName:
    """The tool-call format a chat template speaks.

    >>> detect_format("{{ '<tool_call>' }}"), detect_format("{{ '[TOOL_CALLS]' }}")
    ('hermes', 'mistral')
    >>> detect_format("{{ '<|python_tag|>' }}"), detect_format("{{ messages }}")
    ('llama3', 'generic')
    """
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<tool_call>" in template_source:
        return "hermes"
    if "<|python_tag|>" in template_source or (
        "ipython" in template_source and '"parameters"' in template_source
    ):
        return "llama3"
    return "generic"


def new_call_id(format_name: FormatName) -> str:
    """A call id: Mistral's templates require 9 letters and digits; others get OpenAI's shape."""
    if format_name == "mistral":
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def check_tools(tools: Sequence[Tool], choice: ToolChoice) -> None:
    """400s naming the field: duplicate names, schemas that no grammar can hold, a choice
    naming no given tool."""
    names = [t.name for t in tools]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise InvalidRequestError(f"tools: {name!r} is given twice", field=f"tools.{i}")
    for i, tool in enumerate(tools):
        field = f"tools.{i}.function.parameters"
        if tool.parameters.get("type", "object") != "object":
            raise InvalidRequestError(f"{field}: must be a JSON schema of an object", field=field)
        try:
            json_schema_gbnf(tool.parameters)
        except Exception as exc:
            raise InvalidRequestError(
                f"tools.{i}.function.parameters: unsupported JSON schema: {exc}",
                field=f"tools.{i}.function.parameters",
            ) from None
    if choice.mode == "function" and choice.function not in names:
        raise InvalidRequestError(
            f"tool_choice: no tool is named {choice.function!r}", field="tool_choice"
        )


# Formats


class ToolFormat:
    """How one model family writes tool calls, and how to hold and read it."""

    name: FormatName
    arguments_key = "arguments"
    # Whether control tokens are rendered as text while parsing (Mistral's [TOOL_CALLS] is one).
    special_tokens = False

    def grammar(self, tools: Sequence[Tool], choice: ToolChoice) -> ToolGrammar | None:
        """The grammar for this request (None: the model writes freely)."""
        raise NotImplementedError

    def parser(self) -> ToolCallParser:
        raise NotImplementedError

    def template_tools(self, tools: Sequence[Tool]) -> list[dict[str, Any]] | None:
        """What the template receives as ``tools``."""
        return [t.to_template() for t in tools]

    def _calls_grammar(self, tools: Sequence[Tool], choice: ToolChoice) -> SchemaConverter:
        """A converter holding the rule ``call``: one call of a tool ``choice`` allows."""
        chosen = [t for t in tools if choice.mode != "function" or t.name == choice.function]
        schemas: list[dict[str, Any]] = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, self.arguments_key: t.parameters},
                "required": ["name", self.arguments_key],
            }
            for t in chosen
        ]
        converter = _converter({"name": 0, self.arguments_key: 1})
        for i, schema in enumerate(schemas):  # each tool's own $refs, resolved in its schema
            schema["properties"][self.arguments_key] = converter.resolve_refs(
                copy.deepcopy(schema["properties"][self.arguments_key]), f"tool{i}"
            )
        converter.visit({"anyOf": schemas} if len(schemas) > 1 else schemas[0], "call")
        return converter


class _Converter(SchemaConverter):  # type: ignore[misc]
    """llama-cpp-python's JSON-schema converter, which ignores the bounds of integers, with
    bounded integers held to their range."""

    def visit(self, schema: dict[str, Any], name: str) -> str:
        held = not any(k in schema for k in ("$ref", "anyOf", "oneOf", "const", "enum"))
        kind = schema.get("type")
        if held and isinstance(kind, list):  # each type with the schema's own constraints
            alternatives = [{**schema, "type": t} for t in kind]
            return super().visit({"anyOf": alternatives}, name)  # type: ignore[no-any-return]
        if held and kind == "integer":
            low, high = _int_bounds(schema)
            if low is not None or high is not None:
                rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                rule = f"({int_range_gbnf(low, high)}) space"  # `space`: the converter's own
                return self._add_rule(rule_name, rule)  # type: ignore[no-any-return]
        return super().visit(schema, name)  # type: ignore[no-any-return]


def _int_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The integer range a schema allows (draft 4's boolean exclusive bounds included)."""
    low, high = schema.get("minimum"), schema.get("maximum")
    below, above = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(below, bool):
        low = math.floor(low) + 1 if below and low is not None else low
    elif below is not None:
        low = math.floor(below) + 1 if low is None else max(low, math.floor(below) + 1)
    if isinstance(above, bool):
        high = math.ceil(high) - 1 if above and high is not None else high
    elif above is not None:
        high = math.ceil(above) - 1 if high is None else min(high, math.ceil(above) - 1)
    return (
        math.ceil(low) if low is not None else None,
        math.floor(high) if high is not None else None,
    )


_MAX_DIGITS = 16  # unbounded integers: at most this many digits (as llama.cpp's grammars)


def int_range_gbnf(low: int | None, high: int | None) -> str:
    """A GBNF expression of exactly the integers in [low, high] (a bound may be open), written
    without leading zeros.

    >>> int_range_gbnf(1, 7)
    '[1-7]'
    >>> int_range_gbnf(-5, 12)
    '"-" ([1-5]) | [0-9] | "1" [0-2]'
    """
    if low is not None and high is not None and low > high:
        raise ValueError(f"no integer is between {low} and {high}")
    parts = []
    if low is None or low < 0:
        # Negative numbers: "-" and the magnitudes in [max(1, -high), -low].
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        parts.append(f'"-" ({_naturals(bottom, top)})')
    if high is None or high >= 0:
        parts.append(_naturals(max(low or 0, 0), high))
    return " | ".join(parts)


def _naturals(low: int, high: int | None) -> str:
    """Non-negative integers in [low, high] (high None: up to `_MAX_DIGITS` digits)."""
    alternatives = []
    top_digits = len(str(high)) if high is not None else _MAX_DIGITS
    for digits in range(len(str(low)), top_digits + 1):
        first = str(low) if digits == len(str(low)) else "1" + "0" * (digits - 1)
        if digits == 1 and low == 0:
            first = "0"
        last = str(high) if high is not None and digits == top_digits else "9" * digits
        alternatives.append(_same_length(first, last))
    return " | ".join(alternatives)


def _same_length(low: str, high: str) -> str:
    """Digit strings of one length in [low, high]."""
    if low == high:
        return f'"{low}"'
    if len(low) == 1:
        return f"[{low}-{high}]"
    if low[0] == high[0]:
        return f'"{low[0]}" {_group(_same_length(low[1:], high[1:]))}'
    rest = len(low) - 1
    parts = [f'"{low[0]}" {_group(_same_length(low[1:], "9" * rest))}']
    if int(low[0]) + 1 <= int(high[0]) - 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]" + " [0-9]" * rest)
    parts.append(f'"{high[0]}" {_group(_same_length("0" * rest, high[1:]))}')
    return " | ".join(parts)


def _group(expression: str) -> str:
    return f"({expression})" if " | " in expression else expression


def json_schema_gbnf(schema: dict[str, Any]) -> str:
    """A GBNF grammar of the JSON documents ``schema`` allows (integer ranges held).

    >>> "[1-3]" in json_schema_gbnf({"type": "integer", "minimum": 1, "maximum": 3})
    True
    """
    converter = _converter()
    converter.visit(converter.resolve_refs(copy.deepcopy(schema), "schema"), "")
    return converter.format_grammar()  # type: ignore[no-any-return]


def _converter(prop_order: dict[str, int] | None = None) -> SchemaConverter:
    return _Converter(
        prop_order=prop_order or {}, allow_fetch=False, dotall=False, raw_pattern=False
    )


def _gbnf(converter: SchemaConverter, root: str) -> str:
    converter._add_rule("root", root)
    return converter.format_grammar()  # type: ignore[no-any-return]


class HermesFormat(ToolFormat):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call."""

    name: FormatName = "hermes"

    def grammar(self, tools: Sequence[Tool], choice: ToolChoice) -> ToolGrammar | None:
        converter = self._calls_grammar(tools, choice)
        block = r'"<tool_call>\n" call "\n</tool_call>"'
        root = f'{block} ("\\n" {block})*' if choice.parallel else block
        gbnf = _gbnf(converter, root)
        if choice.mode == "auto":
            return ToolGrammar(gbnf, (r"[\s\S]*?(<tool_call>)[\s\S]*",))
        return ToolGrammar(gbnf)

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self, ("<tool_call>",), _hermes_calls)


class Llama3Format(ToolFormat):
    """A bare ``{"name": ..., "parameters": {...}}`` reply (after ``<|python_tag|>`` or not)."""

    name: FormatName = "llama3"
    arguments_key = "parameters"
    special_tokens = True

    def grammar(self, tools: Sequence[Tool], choice: ToolChoice) -> ToolGrammar | None:
        gbnf = _gbnf(self._calls_grammar(tools, choice), "call")
        if choice.mode == "auto":
            return ToolGrammar(gbnf, (r"\s*(?:<\|python_tag\|>)?\s*(\{\s*\"name\")[\s\S]*",))
        return ToolGrammar(gbnf)

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self, ("<|python_tag|>", "{"), _llama3_calls, at_start=True)


class MistralFormat(ToolFormat):
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""

    name: FormatName = "mistral"
    special_tokens = True

    def grammar(self, tools: Sequence[Tool], choice: ToolChoice) -> ToolGrammar | None:
        many = '("," " "? call)*' if choice.parallel else ""
        gbnf = _gbnf(self._calls_grammar(tools, choice), f'"[TOOL_CALLS][" call {many} "]"')
        if choice.mode == "auto":
            return ToolGrammar(gbnf, (r"[\s\S]*?(\[TOOL_CALLS\])[\s\S]*",))
        return ToolGrammar(gbnf)

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self, ("[TOOL_CALLS]",), _mistral_calls)


GENERIC_RESPONSE = '{"response": "'
GENERIC_CALLS = '{"tool_calls": ['


class GenericFormat(ToolFormat):
    """For templates that know nothing of tools: the tools described in a system message and
    the reply always a JSON object, ``{"response": "..."}`` or ``{"tool_calls": [...]}``."""

    name: FormatName = "generic"

    def grammar(self, tools: Sequence[Tool], choice: ToolChoice) -> ToolGrammar | None:
        converter = self._calls_grammar(tools, choice)
        many = '(", " call)*' if choice.parallel else ""
        calls = f'"{{\\"tool_calls\\": [" call {many} "]}}"'
        if choice.mode != "auto":
            return ToolGrammar(_gbnf(converter, calls))
        converter._add_rule(
            "text", r'"\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\""'
        )
        return ToolGrammar(_gbnf(converter, f'"{{\\"response\\": " text "}}" | {calls}'))

    def template_tools(self, tools: Sequence[Tool]) -> list[dict[str, Any]] | None:
        return None  # described in a system message instead

    def system_text(self, tools: Sequence[Tool], choice: ToolChoice) -> str:
        listed = "\n".join(json.dumps(t.to_template(), ensure_ascii=False) for t in tools)
        how = (
            'Answer with a JSON object: {"tool_calls": [{"name": <function name>, '
            '"arguments": <arguments object>}, ...]} to call functions'
        )
        if choice.mode == "auto":
            how += ', or {"response": <your answer as a string>} to answer directly'
        return f"You can call these functions:\n{listed}\n{how}."

    def parser(self) -> ToolCallParser:
        return GenericParser(self)


FORMATS: dict[FormatName, ToolFormat] = {
    "hermes": HermesFormat(),
    "llama3": Llama3Format(),
    "mistral": MistralFormat(),
    "generic": GenericFormat(),
}


# Messages


def template_messages(
    messages: Sequence[dict[str, Any]], format_name: FormatName, *, offered: bool = True
) -> list[dict[str, Any]]:
    """Messages in Hugging Face's shape for the template: tool calls with their arguments as
    objects. For the generic format, calls and results are written as text a template can
    show: as the JSON answers the model gives while tools are ``offered``, as plain text
    otherwise (so a model told nothing of JSON answers is not shown any).

    Messages are ``{"role", "content", "tool_calls"?, "tool_call_id"?}`` with OpenAI's call
    shape (arguments as JSON text, already checked).
    """
    names: dict[str, str] = {}
    out = []
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls")
        parsed = [
            (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls or ()
        ]
        names.update((call_id, name) for call_id, name, _ in parsed)
        generic = format_name == "generic"
        if parsed and generic:
            listed = [{"name": name, "arguments": args} for _, name, args in parsed]
            text = json.dumps({"tool_calls": listed}, ensure_ascii=False)
            if not offered:
                text = "\n".join(
                    f"Called {name}({json.dumps(args, ensure_ascii=False)})"
                    for _, name, args in parsed
                )
            message = {"role": "assistant", "content": text}
        elif parsed:
            message["tool_calls"] = [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
                for call_id, name, args in parsed
            ]
        if message["role"] == "tool":
            name = names.get(message.get("tool_call_id", ""), "")
            if generic:
                result = {"tool_response": {"name": name, "content": message["content"]}}
                text = json.dumps(result, ensure_ascii=False)
                if not offered:
                    text = f"Result of {name}: {message['content']}"
                message = {"role": "user", "content": text}
            else:
                message["name"] = name
        elif generic and offered and message["role"] == "assistant" and not parsed:
            text = json.dumps({"response": message["content"]}, ensure_ascii=False)
            message = {"role": "assistant", "content": text}
        out.append(message)
    return out


# Parsing


@dataclass
class CallDelta:
    """Streamed news of call ``index``: its id and name first, then pieces of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Pieces = list[str | CallDelta]  # content text, or news of a call


class ToolCallParser:
    """Splits a reply into content and calls, whole (`parse`) or as it streams (`feed`).

    Content is passed on as it comes, except text that may begin a call (held back until it is
    known); a call is passed on only once it is complete, its id and name, then its arguments.
    What never forms a call is content again at the end, unless the reply was cut (by its
    length limit) in the middle of a call: a half-written call is never sent as text.
    """

    def __init__(
        self,
        fmt: ToolFormat,
        openers: tuple[str, ...],
        read_calls: Callable[[str], Found],
        *,
        at_start: bool = False,
    ) -> None:
        self.format = fmt
        self.openers = openers
        self.read_calls = read_calls  # (text from the opener) → (calls, rest) or None
        self.at_start = at_start  # calls only open the reply (after whitespace)
        self.calls: list[ToolCall] = []
        self._text = ""  # content not yet passed on
        self._section: str | None = None  # text from the first opener on
        self._content_seen = False

    def feed(self, text: str) -> Pieces:
        out: Pieces = []
        if self._section is None:
            self._text += text
            at = self._opener_at(self._text)
            if at is None:
                keep = self._held_back(self._text)
                emit, self._text = (
                    self._text[: len(self._text) - keep],
                    self._text[len(self._text) - keep :],
                )
                if emit:
                    out.append(emit)
                    self._content_seen = self._content_seen or bool(emit.strip())
                return out
            before, self._section, self._text = self._text[:at], self._text[at:], ""
            if before:
                out.append(before)
        else:
            self._section += text
        out.extend(self._take_calls())
        return out

    def finish(self, *, cut: bool = False) -> Pieces:
        """The end of the reply (``cut``: by its length limit): whatever did not form a call
        is content, but for a call cut in the middle."""
        out = self._take_calls()
        rest = self._text if cut else (self._section or "") + self._text
        self._section, self._text = None, ""
        if rest.strip() or (rest and not self.calls):
            out.append(rest)
        return out

    def parse(self, text: str, *, cut: bool = False) -> tuple[str, list[ToolCall]]:
        pieces = self.feed(text) + self.finish(cut=cut)
        content = "".join(p for p in pieces if isinstance(p, str))
        return content, list(self.calls)

    def _take_calls(self) -> Pieces:
        if self._section is None:
            return []
        out: Pieces = []
        found = self.read_calls(self._section)
        if found is not None:
            calls, self._section = found
            out = self._emit(calls)
        section = self._section
        stripped = section.lstrip()
        if stripped and not any(
            o.startswith(stripped) or stripped.startswith(o) for o in self.openers
        ):
            # Prose after the calls: content again, passed on as it comes.
            self._section, self._text = None, section
            out.extend(self.feed(""))
        return out

    def _emit(self, calls: list[tuple[str, str]]) -> Pieces:
        """News of newly complete calls: each one's id and name, then its arguments."""
        out: Pieces = []
        for name, arguments in calls:
            call = ToolCall(new_call_id(self.format.name), name, arguments)
            index = len(self.calls)
            self.calls.append(call)
            out.append(CallDelta(index, id=call.id, name=name))
            out.append(CallDelta(index, arguments=arguments))
        return out

    def _opener_at(self, text: str) -> int | None:
        if self.at_start:
            if self._content_seen:
                return None
            stripped = len(text) - len(text.lstrip())
            rest = text[stripped:]
            return stripped if any(rest.startswith(o) for o in self.openers) else None
        found = [i for i in (text.find(o) for o in self.openers) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """How much of the end of ``text`` may still become an opener."""
        if self.at_start:
            if self._content_seen:
                return 0
            stripped = text.lstrip()
            if any(o.startswith(stripped) for o in self.openers):
                return len(text)  # only whitespace and the beginning of an opener so far
            return 0
        for n in range(min(len(text), max(map(len, self.openers)) - 1), 0, -1):
            if any(o.startswith(text[-n:]) for o in self.openers):
                return n
        return 0


Found = tuple[list[tuple[str, str]], str] | None


def _object(text: str, start: int = 0) -> tuple[Any, int] | None:
    """The JSON value at ``text[start:]`` (after whitespace) and where it ends; None if it is
    not complete yet or not JSON."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    try:
        return json.JSONDecoder().raw_decode(text, i)
    except ValueError:
        return None


def _call_of(obj: Any, key: str) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(key, obj.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


_HERMES_BLOCK = re.compile(r"\s*<tool_call>(.*?)</tool_call>", re.S)


def _hermes_calls(section: str) -> Found:
    calls = []
    at = 0
    while match := _HERMES_BLOCK.match(section, at):
        parsed = _object(match[1])
        call = (
            _call_of(parsed[0], "arguments")
            if parsed and not match[1][parsed[1] :].strip()
            else None
        )
        if call is None:
            break  # not a call after all: left as content
        calls.append(call)
        at = match.end()
    return (calls, section[at:]) if calls else None


def _llama3_calls(section: str) -> Found:
    text = section.lstrip()
    text = text.removeprefix("<|python_tag|>")
    parsed = _object(text)
    if parsed is None:
        return None
    call = _call_of(parsed[0], "parameters")
    if call is None:
        return None
    return [call], text[parsed[1] :]


def _mistral_calls(section: str) -> Found:
    parsed = _object(section, len("[TOOL_CALLS]"))
    if parsed is None or not isinstance(parsed[0], list):
        return None
    calls = [_call_of(item, "arguments") for item in parsed[0]]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None], section[parsed[1] :]


class GenericParser(ToolCallParser):
    """The generic format's JSON answer: the text of ``{"response": "..."}`` streams as content
    (decoded as it comes); ``{"tool_calls": [...]}`` becomes calls once complete."""

    def __init__(self, fmt: ToolFormat) -> None:
        super().__init__(fmt, (), lambda section: None)
        self._raw = ""
        self._decoded = 0  # characters of the response's JSON string passed on

    def feed(self, text: str) -> Pieces:
        self._raw += text
        if self._raw.startswith(GENERIC_RESPONSE):
            return self._response_text()
        if GENERIC_RESPONSE.startswith(self._raw) or GENERIC_CALLS.startswith(self._raw):
            return []
        if self._raw.startswith(GENERIC_CALLS):
            return self._generic_calls(final=False)
        return []

    def finish(self, *, cut: bool = False) -> Pieces:
        if self._raw.startswith(GENERIC_RESPONSE):
            return self._response_text()
        if self._raw.startswith(GENERIC_CALLS):
            return self._generic_calls(final=not cut)
        rest, self._raw = self._raw, ""
        return [rest] if rest else []

    def _response_text(self) -> Pieces:
        # Decoded as far as it goes (an answer cut by the length limit ends where it stopped).
        whole = _partial_json_string(self._raw[len(GENERIC_RESPONSE) :])
        piece, self._decoded = whole[self._decoded :], len(whole)
        return [piece] if piece else []

    def _generic_calls(self, *, final: bool) -> Pieces:
        parsed = _object(self._raw)
        if parsed is None:
            if not final:
                return []
            rest, self._raw = self._raw, ""
            return [rest]
        items = parsed[0].get("tool_calls") if isinstance(parsed[0], dict) else None
        calls = [_call_of(item, "arguments") for item in items or []]
        if not calls or any(c is None for c in calls):
            if not final:
                return []
            rest, self._raw = self._raw, ""
            return [rest]
        self._raw = ""
        return self._emit([c for c in calls if c is not None])


def _partial_json_string(raw: str) -> str:
    """The decoded text of a JSON string as far as it has come (``raw`` starts after its
    opening quote): up to its closing quote, or to the last complete character or escape.
    A lone half of a surrogate pair decodes to U+FFFD (it is no character of its own)."""
    out = []
    i = 0
    while i < len(raw) and raw[i] != '"':
        if raw[i] != "\\":
            out.append(raw[i])
            i += 1
            continue
        if i + 1 >= len(raw):
            break  # an escape not complete yet
        if raw[i + 1] != "u":
            out.append(_ESCAPES.get(raw[i + 1], raw[i + 1]))
            i += 2
            continue
        code = _hex4(raw, i + 2)
        if code is None:
            break
        i += 6
        if 0xD800 <= code < 0xDC00:  # a high surrogate: its pair's low half may follow
            following = raw[i : i + 2]
            if following in ("", "\\") or (following == "\\u" and _hex4(raw, i + 2) is None):
                i -= 6
                break  # not known yet
            low = _hex4(raw, i + 2) if following == "\\u" else None
            if low is not None and 0xDC00 <= low < 0xE000:
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                i += 6
            else:
                code = 0xFFFD
        elif 0xDC00 <= code < 0xE000:
            code = 0xFFFD
        out.append(chr(code))
    return "".join(out)


_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _hex4(raw: str, at: int) -> int | None:
    """The four hex digits at ``raw[at:]``, None until all four have come."""
    digits = raw[at : at + 4]
    return int(digits, 16) if len(digits) == 4 else None
