"""A thinking model's reasoning kept apart from its answer, whole and streamed in every split."""

from __future__ import annotations

import pytest

from llamastream.chat.reasoning import (
    FAMILIES,
    THINK,
    BudgetWatch,
    ReasoningBudget,
    ReasoningSplitter,
    ThinkTags,
    think_tags,
)
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
    assert think_tags(tool_templates.THINKING) == THINK
    assert think_tags(tool_templates.HERMES) is None
    assert THINK.opened_by("<|im_start|>assistant\n<think>\n")
    assert not THINK.opened_by("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    seed = think_tags("{{ '<seed:think>' + m.reasoning_content + '</seed:think>' }}")
    assert seed == ThinkTags("<seed:think>", "</seed:think>")
    assert think_tags("[THINK]{{ r }}[/THINK]") == ThinkTags("[THINK]", "[/THINK]")


@pytest.mark.parametrize("tags", FAMILIES)
def test_every_family_splits_whole_and_streamed(tags: ThinkTags) -> None:
    reply = f"  {tags.open}\nweigh 日本 {tags.close[:-1]} not yet\n{tags.close}\n\nThe answer."
    expected = (f"weigh 日本 {tags.close[:-1]} not yet\n", "The answer.")
    assert ReasoningSplitter(tags).split(reply) == expected
    splitter = ReasoningSplitter(tags)
    pieces = [p for char in reply for p in splitter.feed(char)] + splitter.finish()
    assert "".join(t for k, t in pieces if k == "reasoning") == expected[0]
    assert "".join(t for k, t in pieces if k == "content") == expected[1]


def _watch(tokens: list[str], budget: int, inside: bool) -> int | None:
    """After which token (its index) the watch closes the reasoning, if it does."""
    watch = BudgetWatch(ReasoningBudget(THINK, budget, (1,), inside=inside))
    if watch.at_start():
        return -1
    for i, token in enumerate(tokens):
        if watch.feed(token):
            return i
    return None


def test_budget_counts_reasoning_tokens_only() -> None:
    opened = [" ", "<th", "ink>", "a", "b", "c", "d"]
    assert _watch(opened, 2, inside=False) == 4  # the tag and what precedes it are free
    assert _watch(opened, 0, inside=False) == 2  # closed as soon as it opens
    assert _watch(opened, 9, inside=False) is None
    assert _watch(["a", "b", "c"], 2, inside=True) == 1
    assert _watch(["a"], 0, inside=True) == -1  # closed before anything is generated
    assert _watch(["x", "<think>", "a", "b"], 1, inside=False) is None  # an answer, no thought
    assert _watch(["a", "</th", "ink>", "b", "c"], 3, inside=True) is None  # closed in time
    assert _watch(["<think>", "x</think>", "b", "c"], 1, inside=False) is None
