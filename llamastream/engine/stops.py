"""Stop strings: text is held back while it could still be the start of a stop string."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """Feed generated text; get back what is safe to emit, and whether a stop string matched.

    >>> scanner = StopScanner(["</s>"])
    >>> scanner.feed("Hello </")
    ('Hello ', False)
    >>> scanner.feed("s> more")
    ('', True)
    >>> scanner.matched
    '</s>'
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text
        self.sent_before_stop = ""  # the text held back when it matched, before the stop

    def feed(self, text: str) -> tuple[str, bool]:
        buffer = self._held + text
        hits = [(at, stop) for stop in self.stops if (at := buffer.find(stop)) >= 0]
        if hits:
            self._held = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])
            self.sent_before_stop = buffer[:at]
            return buffer[:at], True
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """What was held back, once generation has ended without a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest
