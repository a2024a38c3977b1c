"""Tool-call formats: detection, grammars llama.cpp accepts, and the parsers on model output,
whole and streamed in every split."""

from __future__ import annotations

import json
import re

import llama_cpp
import pytest

from llamastream.chat.templates import ChatTemplate
from llamastream.chat.tools import (
    FORMATS,
    CallDelta,
    Tool,
    ToolCallParser,
    ToolChoice,
    check_tools,
    detect_format,
    int_range_gbnf,
    template_messages,
)
from llamastream.errors import InvalidRequestError
from tests import tool_templates

WEATHER = Tool(
    "get_weather",
    "The weather in a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
)
TIME = Tool("get_time", "", {"type": "object", "properties": {"zone": {"type": "string"}}})


def test_formats_are_detected_from_the_template() -> None:
    assert detect_format(tool_templates.HERMES) == "hermes"
    assert detect_format(tool_templates.LLAMA3) == "llama3"
    assert detect_format(tool_templates.MISTRAL) == "mistral"
    assert detect_format(ChatTemplate().source) == "generic"


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize(
    "choice",
    [ToolChoice("auto"), ToolChoice("required"), ToolChoice("function", "get_time", False)],
)
def test_every_grammar_is_one_llama_cpp_accepts(name: str, choice: ToolChoice) -> None:
    held = FORMATS[name].grammar([WEATHER, TIME], choice)  # type: ignore[index]
    assert held is not None
    grammar = llama_cpp.LlamaGrammar.from_string(held.gbnf, verbose=False)
    assert grammar._root == "root"
    lazy = choice.mode == "auto" and name != "generic"
    assert bool(held.triggers) == lazy
    if choice.mode == "function":
        assert "get_time" in held.gbnf and "get_weather" not in held.gbnf


def test_bad_tools_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        check_tools([WEATHER], ToolChoice("function", "nope"))
    assert raised.value.field == "tool_choice"
    with pytest.raises(InvalidRequestError) as raised:
        check_tools([WEATHER, WEATHER], ToolChoice())
    assert raised.value.field == "tools.1"
    bad = Tool("bad", "", {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}})
    with pytest.raises(InvalidRequestError) as raised:
        check_tools([bad], ToolChoice())
    assert raised.value.field == "tools.0.function.parameters"


def _streamed(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Feed ``pieces``; reassemble content and calls as the OpenAI SDK does from deltas."""
    content = ""
    calls: dict[int, list[str]] = {}
    for out in [p for piece in pieces for p in parser.feed(piece)] + parser.finish():
        if isinstance(out, str):
            content += out
        elif out.id is not None:
            assert out.index == len(calls) and out.name
            calls[out.index] = [out.name, ""]
        else:
            calls[out.index][1] += out.arguments
    return content, [(name, args) for name, args in calls.values()]


def _whole(name: str, text: str) -> tuple[str, list[tuple[str, str]]]:
    content, calls = FORMATS[name].parser().parse(text)  # type: ignore[index]
    return content, [(c.name, c.arguments) for c in calls]


CASES = [
    # Hermes / Qwen: one call, text before it, two calls, a malformed block.
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>',
        ("", [("get_weather", '{"city": "東京"}')]),
    ),
    (
        "hermes",
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
        (
            "Let me check.\n",
            [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"zone": "CET"}')],
        ),
    ),
    (
        "hermes",
        "<tool_call>\nnot json\n</tool_call>",
        ("<tool_call>\nnot json\n</tool_call>", []),
    ),
    ("hermes", "Hello, <tool world!", ("Hello, <tool world!", [])),
    # Llama 3.x: a bare object, or after <|python_tag|>; JSON later in a text is content.
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        ("", [("get_weather", '{"city": "Oslo"}')]),
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "get_time", "parameters": {}}',
        ("", [("get_time", "{}")]),
    ),
    (
        "llama3",
        'The answer is {"name": "x"}.',
        ('The answer is {"name": "x"}.', []),
    ),
    # Mistral: [TOOL_CALLS] and an array (with the ids Mistral writes).
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "a1b2c3d4e"},'
        ' {"name": "get_time", "arguments": {"zone": "UTC"}, "id": "f5g6h7i8j"}]',
        ("", [("get_weather", '{"city": "Rome"}'), ("get_time", '{"zone": "UTC"}')]),
    ),
    ("mistral", "Just text, no calls.", ("Just text, no calls.", [])),
    # Generic: a direct answer (escapes and multibyte text decoded) or calls.
    (
        "generic",
        '{"response": "Line one\\nsays \\"hi\\" \\u3053\\u3093 \\ud83d\\ude00 ok"}',
        ('Line one\nsays "hi" こん 😀 ok', []),
    ),
    (
        "generic",
        '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "JST"}}]}',
        ("", [("get_time", '{"zone": "JST"}')]),
    ),
]


@pytest.mark.parametrize(("name", "text", "expected"), CASES)
def test_parse_whole_and_streamed_in_every_split(
    name: str, text: str, expected: tuple[str, list[tuple[str, str]]]
) -> None:
    assert _whole(name, text) == expected
    # Token by token (one character each), and cut in two at every position.
    assert _streamed(FORMATS[name].parser(), list(text)) == expected  # type: ignore[index]
    for cut in range(1, len(text)):
        parser = FORMATS[name].parser()  # type: ignore[index]
        assert _streamed(parser, [text[:cut], text[cut:]]) == expected


def test_a_call_is_never_streamed_as_text_nor_before_it_is_complete() -> None:
    parser = FORMATS["hermes"].parser()
    text = 'Sure. <tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    seen: list[str | CallDelta] = []
    for i, char in enumerate(text):
        seen += parser.feed(char)
        sent = "".join(p for p in seen if isinstance(p, str))
        assert "<" not in sent  # the opener is held back, never sent as content
        if i < len(text) - 1:
            assert not any(isinstance(p, CallDelta) for p in seen)
    assert next(p for p in seen if isinstance(p, CallDelta)).name == "get_time"


def test_call_ids_fit_each_family() -> None:
    (mistral,) = (
        FORMATS["mistral"].parser().parse('[TOOL_CALLS][{"name": "f", "arguments": {}}]')[1]
    )
    assert len(mistral.id) == 9 and mistral.id.isalnum()
    (hermes,) = (
        FORMATS["hermes"]
        .parser()
        .parse('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')[1]
    )
    assert hermes.id.startswith("call_")


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "a1b2c3d4e",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "sunny, 21°C"},
]


@pytest.mark.parametrize(
    ("template", "call_text", "result_text"),
    [
        (
            tool_templates.HERMES,
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            "<tool_response>\nsunny, 21°C\n</tool_response>",
        ),
        (
            tool_templates.LLAMA3,
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
            "<|im_start|>ipython\nsunny, 21°C",
        ),
        (
            tool_templates.MISTRAL,
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, '
            '"id": "a1b2c3d4e"}]',
            '[TOOL_RESULTS]{"content": "sunny, 21°C", "call_id": "a1b2c3d4e"}',
        ),
        (
            ChatTemplate().source,
            '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}',
            '{"tool_response": {"name": "get_weather", "content": "sunny, 21°C"}}',
        ),
    ],
)
def test_calls_and_results_reach_the_template_in_its_own_words(
    template: str, call_text: str, result_text: str
) -> None:
    rendered = ChatTemplate(template).render(
        template_messages(HISTORY, detect_format(template)),
        tools=[WEATHER.to_template()],
    )
    assert call_text in rendered
    assert result_text in rendered
    assert json.dumps(WEATHER.to_template()["function"]["name"]) in rendered or (
        detect_format(template) == "generic"
    )


def _as_regex(gbnf: str) -> re.Pattern[str]:
    """An integer-range expression (quoted literals, digit classes, groups) as a regex."""
    text = re.sub(r'"(-?\d*)"', r"\1", gbnf).replace(" ", "")
    return re.compile(f"(?:{text})\\Z")


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (1, 7),
        (-5, 12),
        (0, 0),
        (0, 100),
        (7, 1234),
        (-300, -7),
        (-15, None),
        (None, -3),
        (None, None),
        (13, None),
        (99, 1000),
        (10, 19),
        (123, 456),
    ],
)
def test_integer_bounds_are_held_exactly(low: int | None, high: int | None) -> None:
    gbnf = int_range_gbnf(low, high)
    llama_cpp.LlamaGrammar.from_string(f"root ::= {gbnf}", verbose=False)
    pattern = _as_regex(gbnf)
    for n in [*range(-1500, 1500), 10**15, -(10**15)]:
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(pattern.match(str(n))) == inside, n
    for spelled in ["01", "-0", "00", "+1", ""]:
        assert not pattern.match(spelled)


def test_an_integer_range_in_a_tool_schema_reaches_the_grammar() -> None:
    tool = Tool(
        "f",
        "",
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 1, "exclusiveMaximum": 8}},
            "required": ["n"],
        },
    )
    held = FORMATS["llama3"].grammar([tool], ToolChoice("required"))
    assert held is not None and "[1-7]" in held.gbnf


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("hermes", 'Checking. <tool_call>\n{"name": "get_time", "argu'),
        ("llama3", '{"name": "get_time", "parameters": {"zo'),
        ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"na'),
        ("generic", '{"tool_calls": [{"name": "get_time", "argum'),
    ],
)
def test_a_call_cut_by_the_length_limit_is_never_sent_as_text(name: str, text: str) -> None:
    content, calls = FORMATS[name].parser().parse(text, cut=True)  # type: ignore[index]
    assert calls == []
    assert content == ("Checking. " if name == "hermes" else "")
    parser = FORMATS[name].parser()  # type: ignore[index]
    streamed = [p for char in text for p in parser.feed(char)] + parser.finish(cut=True)
    assert "".join(p for p in streamed if isinstance(p, str)) == content
    assert not any(isinstance(p, CallDelta) for p in streamed)


def test_prose_after_the_calls_streams_as_content() -> None:
    parser = FORMATS["hermes"].parser()
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    pieces = parser.feed(call) + parser.feed("\nI asked for the time")
    assert [p for p in pieces if isinstance(p, str)] == ["\nI asked for the time"]
    assert parser.finish() == []


def test_without_tools_offered_a_generic_history_is_plain_text() -> None:
    offered = template_messages(HISTORY, "generic")
    plain = template_messages(HISTORY, "generic", offered=False)
    assert offered[1]["content"].startswith('{"tool_calls": ')
    assert plain[1]["content"] == 'Called get_weather({"city": "Paris"})'
    assert plain[2] == {"role": "user", "content": "Result of get_weather: sunny, 21°C"}
    reply = {"role": "assistant", "content": "It is sunny."}
    assert template_messages([reply], "generic")[0]["content"] == '{"response": "It is sunny."}'
    assert template_messages([reply], "generic", offered=False)[0] == reply


def test_schemas_with_refs_and_bounds_of_every_spelling() -> None:
    schema = {
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}},
        "type": "object",
        "properties": {
            "place": {"$ref": "#/$defs/Place"},
            "old_style": {"type": "integer", "minimum": 2, "maximum": 4, "exclusiveMaximum": True},
            "maybe": {"type": ["integer", "null"], "minimum": 5, "maximum": 6},
            "pick": {"type": "integer", "enum": [10, 30], "minimum": 0},
        },
        "required": ["place", "old_style", "maybe", "pick"],
    }
    tool = Tool("plan", "", schema)
    check_tools([tool], ToolChoice("required"))
    held = FORMATS["hermes"].grammar([tool], ToolChoice("required"))
    assert held is not None
    llama_cpp.LlamaGrammar.from_string(held.gbnf, verbose=False)
    assert "[2-3]" in held.gbnf  # draft 4: maximum 4, exclusive
    assert "[5-6]" in held.gbnf  # the bounds of a nullable integer
    assert '"10"' in held.gbnf and '"30"' in held.gbnf  # an enum wins over the range
    assert schema["properties"]["place"] == {"$ref": "#/$defs/Place"}  # the request untouched


def test_parameters_must_describe_an_object() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        check_tools([Tool("f", "", {"type": "array"})], ToolChoice())
    assert raised.value.field == "tools.0.function.parameters"
