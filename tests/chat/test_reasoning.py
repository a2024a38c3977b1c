"""A thinking model's reasoning kept apart from its answer, whole and streamed in every split."""

from __future__ import annotations

import pytest

from llamastream.chat.reasoning import ReasoningSplitter, opens_thinking, thinks
from tests import tool_templates

CASES = [
    # (reply, starts inside <think>, reasoning, answer)
    ("<think>\nThe user greets.\n</think>\n\nHello!", False, "The user greets.\n", "Hello!"),
    ("  <think>a < b</think>yes", False, "a < b", "yes"),
    ("No thinking here <think> at all", False, "", "No thinking here <think> at all"),
    ("Plan: add 2 and 2.\n</think>\n\n4", True, "Plan: add 2 and 2.\n", "4"),
    ("cut off while thinking </thi", True, "cut off while thinking </thi", ""),
    ("<thi", False, "", "<thi"),
    ("日本語で考える</think>答え", True, "日本語で考える", "答え"),
]


@pytest.mark.parametrize(("reply", "inside", "reasoning", "answer"), CASES)
def test_split_whole_and_streamed(reply: str, inside: bool, reasoning: str, answer: str) -> None:
    assert ReasoningSplitter(inside=inside).split(reply) == (reasoning, answer)
    for cut in range(len(reply) + 1):
        splitter = ReasoningSplitter(inside=inside)
        pieces = splitter.feed(reply[:cut]) + splitter.feed(reply[cut:]) + splitter.finish()
        assert "".join(t for k, t in pieces if k == "reasoning") == reasoning
        assert "".join(t for k, t in pieces if k == "content") == answer
    splitter = ReasoningSplitter(inside=inside)
    pieces = [p for char in reply for p in splitter.feed(char)] + splitter.finish()
    assert all("<think>" not in t and "</think>" not in t for k, t in pieces if k == "reasoning")


def test_thinking_templates_and_prompts_are_recognised() -> None:
    assert thinks(tool_templates.THINKING)
    assert not thinks(tool_templates.HERMES)
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
