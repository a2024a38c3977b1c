"""Reasoning: a thinking model's ``<think>…</think>`` kept apart from its answer, as it streams.

Models of the DeepSeek-R1 and Qwen 3 families think first, inside ``<think>`` tags (Seed-OSS
in ``<seed:think>``, Magistral in ``[THINK]``, Command R7B in ``<|START_THINKING|>``); some
templates open the tag in the generation prompt itself (the reply then starts inside it), and
close it there too when thinking is switched off (``enable_thinking: false``). A reasoning
budget closes the thinking after so many tokens (`BudgetWatch`, run by the worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["reasoning", "content"]
Pieces = list[tuple[Kind, str]]


@dataclass(frozen=True)
class ThinkTags:
    """The tags a model family writes around its reasoning."""

    open: str
    close: str

    def opened_by(self, prompt: str) -> bool:
        """Whether ``prompt`` ends inside an open tag (the reply starts in the reasoning)."""
        return prompt.rstrip().endswith(self.open)


THINK = ThinkTags("<think>", "</think>")
# Longest first: "<seed:think>" must not be read as a template that writes "<think>".
FAMILIES = (
    ThinkTags("<seed:think>", "</seed:think>"),
    ThinkTags("<|START_THINKING|>", "<|END_THINKING|>"),
    ThinkTags("[THINK]", "[/THINK]"),
    THINK,
)


def think_tags(template_source: str) -> ThinkTags | None:
    """The reasoning tags a chat template writes (None: not a thinking model's template).

    >>> think_tags("{{ '<think>' + thought + '</think>' }}"), think_tags("{{ messages }}")
    (ThinkTags(open='<think>', close='</think>'), None)
    """
    for tags in FAMILIES:
        if tags.open in template_source and tags.close in template_source:
            return tags
    return None


@dataclass(frozen=True)
class ReasoningBudget:
    """At most ``tokens`` tokens of reasoning; then ``close_tokens`` (the closing tag) are
    written for the model, which goes on with its answer."""

    tags: ThinkTags
    tokens: int
    close_tokens: tuple[int, ...]
    inside: bool  # the prompt opened the reasoning


@dataclass(frozen=True)
class Thinking:
    """How a model thinks in one reply: its tags, whether the prompt opened them, whether
    they are control tokens (shown as text so they can be read), and the budget if any."""

    tags: ThinkTags
    inside: bool
    special: bool
    budget: ReasoningBudget | None

    def splitter(self) -> ReasoningSplitter:
        return ReasoningSplitter(self.tags, inside=self.inside)


class BudgetWatch:
    """Counts a reply's reasoning tokens as they are generated; says when to close it.

    >>> watch = BudgetWatch(ReasoningBudget(THINK, 2, (7,), inside=False))
    >>> [watch.feed(t) for t in ("<think>", "a", "b", "c")]
    [False, False, True, False]
    """

    def __init__(self, budget: ReasoningBudget) -> None:
        self.budget = budget
        self._state: Literal["before", "thinking", "done"] = (
            "thinking" if budget.inside else "before"
        )
        self._text = ""  # the reply's start (before), or the end of the reasoning so far
        self._used = 0

    def at_start(self) -> bool:
        """Whether the reasoning must be closed before anything is generated (budget 0)."""
        return self._check()

    def feed(self, text: str) -> bool:
        """One generated token's text (possibly empty); True when the closing tag must be
        written now."""
        tags = self.budget.tags
        if self._state == "before":
            self._text += text
            start = self._text.lstrip()
            if start.startswith(tags.open):
                self._state, self._text = "thinking", start[len(tags.open) :]
                if tags.close in self._text:
                    self._state = "done"
            elif start and not tags.open.startswith(start):
                self._state = "done"  # the reply does not think
            return self._check()
        if self._state == "thinking":
            self._used += 1
            self._text = (self._text + text)[-(len(tags.close) + len(text)) :]
            if tags.close in self._text:
                self._state = "done"
        return self._check()

    def _check(self) -> bool:
        if self._state == "thinking" and self._used >= self.budget.tokens:
            self._state = "done"
            return True
        return False


class ReasoningSplitter:
    """Splits a reply into reasoning and answer, whole (`split`) or as it streams (`feed`).

    Text that may be the beginning of a tag is held back until it is known; the tags and the
    whitespace right after them are dropped.

    >>> ReasoningSplitter().split("<think>\\nThe sky is blue.\\n</think>\\n\\nBlue.")
    ('The sky is blue.\\n', 'Blue.')
    >>> ReasoningSplitter(inside=True).split("Hmm.</think>Yes.")
    ('Hmm.', 'Yes.')
    """

    def __init__(self, tags: ThinkTags = THINK, *, inside: bool = False) -> None:
        self._open, self._close = tags.open, tags.close
        self._state: Literal["before", "thinking", "answer"] = "thinking" if inside else "before"
        self._held = ""
        self._strip = True  # drop the whitespace that opens the reasoning or the answer

    def feed(self, text: str) -> Pieces:
        self._held += text
        out: Pieces = []
        while True:
            if self._state == "before":
                start = self._held.lstrip()
                if start.startswith(self._open):
                    self._held, self._state, self._strip = (
                        start[len(self._open) :],
                        "thinking",
                        True,
                    )
                    continue
                if start and not self._open.startswith(start):
                    self._state = "answer"
                    continue
                return out  # whitespace, or the beginning of "<think>": not known yet
            if self._state == "thinking":
                self._lstrip()
                at = self._held.find(self._close)
                if at >= 0:
                    self._emit(out, "reasoning", self._held[:at])
                    self._held = self._held[at + len(self._close) :]
                    self._state, self._strip = "answer", True
                    continue
                keep = _partial_suffix(self._held, self._close)
                self._emit(out, "reasoning", self._held[: len(self._held) - keep])
                self._held = self._held[len(self._held) - keep :]
                return out
            self._lstrip()
            self._emit(out, "content", self._held)
            self._held = ""
            return out

    def finish(self) -> Pieces:
        """The end of the reply: what was held back goes where it was."""
        out: Pieces = []
        kind: Kind = "reasoning" if self._state == "thinking" else "content"
        if not (self._state == "thinking" and self._strip):
            self._emit(out, kind, self._held)
        self._held = ""
        return out

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) of a whole reply."""
        pieces = self.feed(text) + self.finish()
        reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
        return reasoning, "".join(t for kind, t in pieces if kind == "content")

    def _lstrip(self) -> None:
        if self._strip:
            self._held = self._held.lstrip()
            self._strip = not self._held

    @staticmethod
    def _emit(out: Pieces, kind: Kind, text: str) -> None:
        if text:
            out.append((kind, text))


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
