"""StopScanner: stop strings are never emitted, even when they arrive in pieces."""

from __future__ import annotations

from llamastream.engine.stops import StopScanner


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = []
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


def test_stop_split_over_pieces() -> None:
    assert feed_all(["STOP"], ["ab S", "T", "OP cd"]) == ("ab ", True)


def test_false_start_is_released() -> None:
    assert feed_all(["STOP"], ["ab ST", "ing"]) == ("ab STing", False)
    assert feed_all(["STOP"], ["ends with ST"]) == ("ends with ST", False)


def test_earliest_of_several_stops_wins() -> None:
    assert feed_all(["\n\n", "User:"], ["Hi. User:", " x\n\n"]) == ("Hi. ", True)


def test_no_stops_passes_everything() -> None:
    assert feed_all([], ["a", "b"]) == ("ab", False)
    assert feed_all([""], ["a", "b"]) == ("ab", False)
