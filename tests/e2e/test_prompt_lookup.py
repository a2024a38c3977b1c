"""Prompt lookup through a live server: the same replies as without it over /v1 (streamed and
not, several at once), its acceptance counters in /metrics, per model."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from tests.e2e.conftest import server

ECHO = [
    {
        "role": "user",
        "content": "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the cat sat "
        "on the mat, and the dog sat on the log, the dog sat on the log.",
    }
]


def replies(settings: dict[str, Any]) -> tuple[list[str], str]:
    """Four greedy replies asked at once (two streamed), and the metrics after."""
    with server(settings) as (live, _), live.client() as client:
        out: list[str] = [""] * 4

        def ask(i: int) -> None:
            body = {"messages": ECHO, "temperature": 0, "max_tokens": 48, "stream": i % 2 == 1}
            with live.client() as own:
                response = own.post("/v1/chat/completions", json=body)
                assert response.status_code == 200
                if i % 2:
                    events = [
                        json.loads(line[6:])
                        for line in response.text.splitlines()
                        if line.startswith("data: {")
                    ]
                    out[i] = "".join(
                        e["choices"][0]["delta"].get("content") or ""
                        for e in events
                        if e["choices"]
                    )
                else:
                    out[i] = response.json()["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return out, client.get("/metrics").text


def greedy_smollm2(settings_kwargs: dict[str, Any], smollm2: Path) -> dict[str, Any]:
    """Settings of a SmolLM2 server with 4 slots and no repetition penalty."""
    return {
        **settings_kwargs,
        "model_path": smollm2,
        "n_ctx": 1024,
        "max_new_tokens": 64,
        "num_of_concurrent_executions": 4,
        "repeat_penalty": 1.0,
    }


def draft_counts(metrics: str) -> tuple[float, float]:
    """The drafted and accepted token counters of the (one) model in ``metrics``."""
    counts = [
        float(re.search(rf'llamastream_{name}_total\{{model="[^"]+"\}} (\S+)', metrics)[1])
        for name in ("draft_tokens", "draft_accepted_tokens")
    ]
    return counts[0], counts[1]


def test_prompt_lookup_gives_the_same_replies_and_counts_its_drafts(
    settings_kwargs: dict[str, Any], smollm2: Path
) -> None:
    base = greedy_smollm2(settings_kwargs, smollm2)
    plain, plain_metrics = replies(base)
    looked_up, metrics = replies({**base, "prompt_lookup": True, "draft_max": 6})
    assert looked_up == plain
    assert all(plain) and len(set(plain)) == 1  # greedy: the same reply four times
    drafted, accepted = draft_counts(metrics)
    assert drafted > 0 and 0 < accepted <= drafted
    assert re.search(r'llamastream_draft_tokens_total\{model="[^"]+"\} 0\.0', plain_metrics)


def test_a_draft_model_gives_the_same_replies(
    settings_kwargs: dict[str, Any], smollm2: Path
) -> None:
    base = greedy_smollm2(settings_kwargs, smollm2)
    plain, _ = replies(base)
    drafted_replies, metrics = replies({**base, "draft_model_path": smollm2})
    assert drafted_replies == plain
    drafted, accepted = draft_counts(metrics)
    # The model drafting for itself: every draft is taken but those past a reply's end (each
    # of the 4 replies' last draft, at most draft_max = 8 tokens, may run past its end).
    assert drafted > 40 and drafted - accepted <= 4 * 8
