"""Reasoning: a thinking model's ``<think>…</think>`` kept apart from its answer, as it streams.

Models of the DeepSeek-R1 and Qwen 3 families think first, inside ``<think>`` tags; some
templates open the tag in the generation prompt itself (the reply then starts inside it), and
close it there too when thinking is switched off (``enable_thinking: false``).
"""

from __future__ import annotations

from typing import Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

Kind = Literal["reasoning", "content"]
Pieces = list[tuple[Kind, str]]


def thinks(template_source: str) -> bool:
    """Whether a chat template is a thinking model's (it writes ``<think>`` tags).

    >>> thinks("{{ '<think>' + thought + '</think>' }}"), thinks("{{ messages }}")
    (True, False)
    """
    return THINK_OPEN in template_source and THINK_CLOSE in template_source


def opens_thinking(prompt: str) -> bool:
    """Whether the prompt ends inside an open ``<think>`` (the reply starts in the reasoning)."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_OPEN)


class ReasoningSplitter:
    """Splits a reply into reasoning and answer, whole (`split`) or as it streams (`feed`).

    Text that may be the beginning of a tag is held back until it is known; the tags and the
    whitespace right after them are dropped.

    >>> ReasoningSplitter().split("<think>\\nThe sky is blue.\\n</think>\\n\\nBlue.")
    ('The sky is blue.\\n', 'Blue.')
    >>> ReasoningSplitter(inside=True).split("Hmm.</think>Yes.")
    ('Hmm.', 'Yes.')
    """

    def __init__(self, *, inside: bool = False) -> None:
        self._state: Literal["before", "thinking", "answer"] = "thinking" if inside else "before"
        self._held = ""
        self._strip = True  # drop the whitespace that opens the reasoning or the answer

    def feed(self, text: str) -> Pieces:
        self._held += text
        out: Pieces = []
        while True:
            if self._state == "before":
                start = self._held.lstrip()
                if start.startswith(THINK_OPEN):
                    self._held, self._state, self._strip = (
                        start[len(THINK_OPEN) :],
                        "thinking",
                        True,
                    )
                    continue
                if start and not THINK_OPEN.startswith(start):
                    self._state = "answer"
                    continue
                return out  # whitespace, or the beginning of "<think>": not known yet
            if self._state == "thinking":
                self._lstrip()
                at = self._held.find(THINK_CLOSE)
                if at >= 0:
                    self._emit(out, "reasoning", self._held[:at])
                    self._held = self._held[at + len(THINK_CLOSE) :]
                    self._state, self._strip = "answer", True
                    continue
                keep = _partial_suffix(self._held, THINK_CLOSE)
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
